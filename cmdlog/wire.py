"""Body encodings of the HTTP API, JSON and msgpack, and its query strings.

A request body is read by its Content-Type (none means JSON, and
`application/x-msgpack` is taken as msgpack); a response is written in the
encoding the Accept header prefers, JSON when it names neither. Both
decoders hold bodies to the JSON data model through `codec.check_value`,
so a command arrives the same whichever encoding carried it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import orjson

from cmdlog import codec
from cmdlog.errors import InvalidArgument, MalformedBody, UnsupportedMediaType

JSON = "application/json"
MSGPACK = "application/msgpack"
_MSGPACK_TYPES = (MSGPACK, "application/x-msgpack")
_JSON_TYPES = (JSON, "text/json")


def body_format(content_type: str | None) -> str:
    """Return JSON or MSGPACK for a Content-Type header; raise 415 otherwise."""
    if not content_type:
        return JSON
    media = content_type.split(";", 1)[0].strip().lower()
    if media in _JSON_TYPES or media.endswith("+json"):
        return JSON
    if media in _MSGPACK_TYPES:
        return MSGPACK
    raise UnsupportedMediaType(
        f"Content-Type {media!r} is not supported; send {JSON} or {MSGPACK}"
    )


def response_format(accept: str | None) -> str:
    """Return the encoding an Accept header prefers between JSON and msgpack."""
    if not accept:
        return JSON
    best, best_q = JSON, -1.0
    for part in accept.split(","):
        media, *params = (item.strip() for item in part.split(";"))
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        media = media.lower()
        if media in _MSGPACK_TYPES:
            candidate = MSGPACK
        elif media in _JSON_TYPES or media in ("*/*", "application/*"):
            candidate = JSON
        else:
            continue
        if q > best_q or (q == best_q and candidate == JSON):
            best, best_q = candidate, q
    return best if best_q != 0.0 else JSON


def decode(data: bytes, fmt: str) -> Any:
    """Decode a request body; raise `MalformedBody` naming what is wrong."""
    if fmt == MSGPACK:
        try:
            return codec.unpack_checked(data, "body")
        except MalformedBody as exc:
            if data[:1] in (b"{", b"["):
                raise MalformedBody(
                    f"{exc.message}; the body looks like JSON, so send it with "
                    f"Content-Type: {JSON}"
                ) from exc
            raise
    value = _decode_json(data)
    codec.check_value(value, "body")
    return value


def _reject_constant(name: str) -> Any:
    raise MalformedBody(f"body contains {name}, which is not valid JSON; send a number")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Parsers disagree on which of two equal keys wins, so a body with one
    # could mean different commands to a proxy and to this node.
    result = dict(pairs)
    if len(result) != len(pairs):
        keys = [key for key, _ in pairs]
        duplicate = next(key for key in keys if keys.count(key) > 1)
        raise MalformedBody(f"body has the key {duplicate!r} twice in one object")
    return result


# json.loads with options builds a new decoder on every call; this one is reused.
_JSON_DECODER = json.JSONDecoder(
    parse_constant=_reject_constant, object_pairs_hook=_unique_keys
)


def _decode_json(data: bytes) -> Any:
    # The standard library parser keeps big integers exact (faster parsers
    # turn them into floats), so `check_value` can reject them by range.
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedBody(
            f"body is not valid UTF-8 (byte {exc.start}); send UTF-8 encoded JSON"
        ) from exc
    try:
        return _JSON_DECODER.decode(text)
    except ValueError as exc:  # JSONDecodeError, or an integer too long to parse
        raise MalformedBody(f"body is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise MalformedBody(
            f"body is nested too deeply; keep it under {codec.DEPTH_MAX} levels"
        ) from exc


def encode(value: Any, fmt: str) -> bytes:
    if fmt == MSGPACK:
        return codec.pack(value)
    # orjson writes the same JSON as the standard library, about 40 times
    # faster; decoding stays with the standard library for exact big integers.
    return orjson.dumps(value)


def query_args(query: Mapping[str, str]) -> dict[str, str]:
    """Return a query string's arguments, raising `InvalidArgument` for one
    given twice: readers disagree on which of two values counts."""
    args: dict[str, str] = {}
    for name, value in query.items():
        if name in args:
            raise InvalidArgument(
                f"query argument {name!r} is given more than once; send it once"
            )
        args[name] = value
    return args
