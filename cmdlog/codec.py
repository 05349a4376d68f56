"""The codec: one set of msgpack options for the log, the wire and fingerprints.

Everything cmdlog stores or sends goes through `pack` and `unpack`, so a
value that reaches the log decodes again the same way on every node. Client
values are checked with `check_value` before they are stored: only the
JSON data model (null, booleans, integers that fit msgpack, finite floats,
UTF-8 strings, arrays and string-keyed maps) is accepted, nested no deeper
than `DEPTH_MAX`. `canonical` sorts map keys so that fingerprints and
digests do not depend on the order a client wrote them in.
"""

from __future__ import annotations

import hashlib
import math
import threading
from typing import Any

import msgpack

from cmdlog.errors import MalformedBody

DEPTH_MAX = 32
INT_MIN = -(2**63)
INT_MAX = 2**64 - 1
FINGERPRINT_BYTES = 16


def _reject_ext(code: int, data: bytes) -> Any:
    raise MalformedBody(
        f"msgpack extension type {code} is not allowed; send only nil, "
        "booleans, integers, floats, strings, arrays and maps"
    )


_packer_options: dict[str, Any] = {"use_bin_type": True, "datetime": False}
_unpacker_options: dict[str, Any] = {
    "raw": False,
    "use_list": True,
    "strict_map_key": True,
    "ext_hook": _reject_ext,
    "timestamp": 0,
}


_unpackb = msgpack.unpackb

_OPTIONS_AT_DEFAULTS = {"raw", "use_list", "strict_map_key", "timestamp"}
"""The options in `_unpacker_options` that have msgpack's default values, so
`unpack` leaves them out: passing five keyword arguments cost each call about
200 ns, a third of decoding a log entry. tests/test_codec.py checks that the
results are the same."""
_local = threading.local()


def _packer() -> msgpack.Packer:
    # A Packer keeps an internal buffer, so each thread needs its own; reusing
    # one per thread is several times faster than msgpack.packb.
    try:
        return _local.packer
    except AttributeError:
        packer = _local.packer = msgpack.Packer(**_packer_options)
        return packer


def pack(value: Any) -> bytes:
    """Encode `value` with the project's msgpack options."""
    try:
        packer = _local.packer
    except AttributeError:
        packer = _packer()
    return packer.pack(value)  # type: ignore[no-any-return]


def unpack(data: bytes) -> Any:
    """Decode one msgpack value; raise `MalformedBody` on bytes that are not one.

    Use `unpack_checked` for bytes from a client or a peer.
    """
    try:
        return _unpackb(data, ext_hook=_reject_ext)
    except MalformedBody:
        raise
    except (msgpack.StackError, RecursionError) as exc:
        raise MalformedBody(
            f"msgpack body is nested too deeply; keep it under {DEPTH_MAX} levels"
        ) from exc
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        detail = str(exc) or type(exc).__name__
        raise MalformedBody(f"body is not valid msgpack: {detail}") from exc


def unpack_checked(data: bytes, field: str) -> Any:
    """Decode msgpack from outside (a client or a peer) and check it is plain data.

    msgpack decodes its timestamp extension (type -1) itself instead of
    passing it to the extension hook, so only `check_value` rejects it.
    """
    try:
        value = _unpackb(data, object_pairs_hook=_unique_keys, **_unpacker_options)
    except MalformedBody:
        raise
    except Exception:
        value = unpack(data)  # raises MalformedBody with the reason
    check_value(value, field)
    return value


def _unique_keys(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    # Decoders disagree on which of two equal keys wins, so a map with one
    # could mean different commands to different readers.
    result = dict(pairs)
    if len(result) != len(pairs):
        raise MalformedBody("a msgpack map has the same key twice; send each once")
    return result


def new_unpacker(*, buffer_bytes_max: int) -> msgpack.Unpacker:
    """Return a streaming unpacker with the project's options and a buffer bound."""
    return msgpack.Unpacker(max_buffer_size=buffer_bytes_max, **_unpacker_options)


def check_value(value: Any, field: str) -> None:
    """Raise `MalformedBody` unless `value` is plain JSON-model data.

    `field` names the place in the request, for example `payload.items[3]`,
    so the message can point at it.
    """
    try:
        _check(value, 0)
    except _Invalid as invalid:
        place = field + "".join(reversed(invalid.path))
        raise MalformedBody(place + invalid.problem) from invalid.__cause__


class _Invalid(Exception):
    """A value outside the data model. Each container it passes through on
    the way out adds its step to `path`, so a valid value, the common case,
    never builds a field name."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem
        self.path: list[str] = []


def _check(value: Any, depth: int) -> None:
    if depth > DEPTH_MAX:
        raise _Invalid(f" is nested more than {DEPTH_MAX} levels deep; flatten it")
    if value is None or value is True or value is False:
        return
    kind = type(value)
    if kind is str:
        _check_text(value)
    elif kind is int:
        if not INT_MIN <= value <= INT_MAX:
            raise _Invalid(
                f" is {value}, outside the integer range "
                f"[{INT_MIN}, {INT_MAX}]; send a smaller number or a string"
            )
    elif kind is float:
        if not math.isfinite(value):
            raise _Invalid(f" is {value}; send a finite number")
    elif kind is list:
        for index, item in enumerate(value):
            try:
                _check(item, depth + 1)
            except _Invalid as invalid:
                invalid.path.append(f"[{index}]")
                raise
    elif kind is dict:
        for key, item in value.items():
            if type(key) is not str:
                raise _Invalid(
                    f" has a map key of type {type(key).__name__}; "
                    "map keys must be strings"
                )
            try:
                _check_text(key)
            except _Invalid as invalid:
                invalid.path.append(" key")
                raise
            try:
                _check(item, depth + 1)
            except _Invalid as invalid:
                invalid.path.append(f".{key}")
                raise
    else:
        raise _Invalid(
            f" has a value of type {kind.__name__}; send only null, "
            "booleans, integers, floats, strings, arrays and maps"
        )


def _check_text(text: str) -> None:
    # ASCII text, the common case, cannot hold a surrogate; the flag is
    # stored with the string, so the test costs no scan.
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _Invalid(
            f" contains a lone surrogate at position {exc.start}; send valid UTF-8 text"
        ) from exc


_CONTAINERS = (dict, list)


def sort_maps(value: Any) -> Any:
    """Return `value` with every map's keys in sorted order, recursively."""
    kind = type(value)
    if kind is dict:
        # Keys are unique, so sorting the pairs never compares two values.
        pairs = sorted(value.items())
        for _key, item in pairs:
            if type(item) in _CONTAINERS:
                return {
                    key: sort_maps(item) if type(item) in _CONTAINERS else item
                    for key, item in pairs
                }
        return dict(pairs)  # a flat map, the common payload
    if kind is list:
        return [
            sort_maps(item) if type(item) in _CONTAINERS else item for item in value
        ]
    return value


def canonical(value: Any) -> bytes:
    """Encode `value` so that equal data gives equal bytes, whatever its key order."""
    return pack(sort_maps(value))


def fingerprint(type_name: str, payload: dict[str, Any]) -> bytes:
    """Hash a command's type and payload, ignoring map key order.

    The bytes hashed are `canonical([type_name, payload])`.
    """
    pairs = sorted(payload.items())
    for _key, item in pairs:
        if type(item) in _CONTAINERS:
            data = pack([type_name, sort_maps(payload)])
            break
    else:
        # A flat payload, the common case. Packing its sorted pairs gives the
        # bytes of the sorted map without building it.
        packer = _packer()
        data = (
            packer.pack_array_header(2)
            + packer.pack(type_name)
            + packer.pack_map_pairs(pairs)
        )
    return hashlib.blake2b(data, digest_size=FINGERPRINT_BYTES).digest()
