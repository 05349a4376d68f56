"""Fuzz tests of cmdlog.http_api on a live node.

Schemathesis generates requests from docs/openapi.yaml for every operation
but GET /replicate and checks each response against the spec. Hand-written
hypothesis strategies then send arbitrary JSON and msgpack bodies and
arbitrary header bytes to POST /commands and /commands/batch, and arbitrary
arguments to GET /replicate. For each of those requests: no 5xx, every 4xx
body is an error object, and the node's command count changes only with a
2xx. One node with a token serves the whole module, on 127.0.0.1.
"""

from __future__ import annotations

import http.client
import itertools
import json
import re
import struct
import time
import urllib.parse
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest
import schemathesis
from hypothesis import HealthCheck, event, given, note, reject, settings
from hypothesis import strategies as st

from cmdlog import wire
from cmdlog.apps.currencies import CURRENCY_CODES
from tests.nodes import NodeProcess

SPEC_PATH = Path(__file__).resolve().parent.parent / "docs" / "openapi.yaml"
TOKEN = "fuzz-api-token"
AUTHORIZATION = f"Bearer {TOKEN}"
REQUEST_TIMEOUT_S = 10.0
JSON = "application/json"
MSGPACK = "application/msgpack"
STREAMS_OPEN_MAX = 16
"""Number of open /replicate streams at which the stream fuzzer waits before
opening another. The node notices a closed stream only when a heartbeat
write fails, a second or two later, and it serves at most 64 streams, so
fast fuzzing would otherwise get 503."""

FUZZ_SETTINGS = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
}


# Schemathesis setup.

SCHEMATHESIS_CONFIG = schemathesis.Config.from_dict(
    {
        "auth": {"openapi": {"bearerAuth": {"bearer": TOKEN}}},
        "request-timeout": REQUEST_TIMEOUT_S,
        "checks": {
            # A schema-valid request can still get 4xx by rules a schema cannot
            # state: a reused key, a transfer to the same account, a username
            # without a canonical form, a query for an absent account.
            "positive_data_acceptance": {"enabled": False},
            # 413 is the documented response to a batch of more than 1,000 items.
            "negative_data_rejection": {
                "expected-statuses": ["400", "401", "404", "405", "413", "415", "422"]
            },
        },
        "operations": [
            {
                # A batch with invalid items is 200 with each item's own 4xx
                # inside, and the batch fuzzers below check every item.
                "include-path": "/commands/batch",
                "checks": {"negative_data_rejection": {"enabled": False}},
            }
        ],
    }
)

# /replicate streams until the reader goes away, so it has its own fuzzer.
schema = schemathesis.openapi.from_path(SPEC_PATH, config=SCHEMATHESIS_CONFIG).exclude(
    path="/replicate"
)

ACCEPT_VALUES = [
    None,
    JSON,
    MSGPACK,
    "application/x-msgpack",
    "application/msgpack;q=0.5, application/json",
    "*/*",
]


@schemathesis.serializer(MSGPACK, "application/x-msgpack")
def pack_body(context: schemathesis.SerializationContext, value: Any) -> bytes:
    try:
        return bytes(msgpack.packb(value, use_bin_type=True))
    except OverflowError:
        # Negative generation draws integers beyond msgpack's 64 bits, which
        # no client can send as msgpack. JSON bodies cover them.
        reject()


@schemathesis.deserializer(MSGPACK, "application/x-msgpack")
def unpack_body(
    context: schemathesis.DeserializationContext, response: schemathesis.Response
) -> Any:
    return msgpack.unpackb(response.content, raw=False)


# The node and plain HTTP calls.


@pytest.fixture(scope="module")
def api_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """One node with a token, shared by every fuzzer in this module."""
    node = NodeProcess(tmp_path_factory.mktemp("fuzz-api") / "node", token=TOKEN)
    node.start()
    yield node
    if node.is_running():
        node.kill()


@dataclass(frozen=True, slots=True)
class Reply:
    """One HTTP response, read in full."""

    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def decoded(self) -> Any:
        """Decode the body by its Content-Type, JSON or msgpack."""
        media = (self.headers.get("Content-Type") or "").split(";")[0].strip()
        if media == MSGPACK:
            return msgpack.unpackb(self.body, raw=False)
        assert media == JSON, (f"unexpected Content-Type {media!r}", self.body)
        return json.loads(self.body)


def send(
    node: NodeProcess,
    method: str,
    path: str,
    *,
    headers: Sequence[tuple[str, bytes | str]] = (),
    body: bytes | None = None,
) -> Reply:
    """Send one request with exactly these header bytes and read the response."""
    connection = http.client.HTTPConnection(
        "127.0.0.1", node.port, timeout=REQUEST_TIMEOUT_S
    )
    try:
        connection.putrequest(method, path, skip_accept_encoding=True)
        for name, value in headers:
            connection.putheader(name, value)
        if body is not None:
            connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body)
        response = connection.getresponse()
        return Reply(response.status, response.headers, response.read())
    finally:
        connection.close()


def get_json(node: NodeProcess, path: str) -> Any:
    reply = send(node, "GET", path, headers=[("Authorization", AUTHORIZATION.encode())])
    assert reply.status == 200, reply.body
    return reply.decoded()


def command_count(node: NodeProcess) -> int:
    count: int = get_json(node, "/status")["commands"]
    return count


def assert_error_body(reply: Reply) -> None:
    """Check that a 4xx carries `{"error": {"code", "message"}}`."""
    body = reply.decoded()
    assert isinstance(body, dict), body
    assert set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error, dict), body
    assert isinstance(error.get("code"), str), body
    assert error["code"], body
    assert isinstance(error.get("message"), str), body
    assert error["message"].strip(), body


def test_spec_valid_openapi() -> None:
    """docs/openapi.yaml is valid against the OpenAPI 3.1 meta-schema."""
    schema.validate()


def test_spec_currencies_match_app() -> None:
    """The spec's currency enum is exactly the example ledger's ISO 4217 list."""
    listed = schema.raw_schema["components"]["schemas"]["Currency"]["enum"]

    assert sorted(listed) == sorted(CURRENCY_CODES)


# Schemathesis runs: one test per operation of the spec.


@schema.given(accept=st.sampled_from(ACCEPT_VALUES))
@schema.parametrize()
@settings(max_examples=15, **FUZZ_SETTINGS)  # type: ignore[arg-type]
def test_spec_conformance(
    case: schemathesis.Case[Any], accept: str | None, api_node: NodeProcess
) -> None:
    """Generated requests get no 5xx and responses that match the spec."""
    headers = {"Accept": accept} if accept else None
    case.call_and_validate(base_url=api_node.url, headers=headers)


@pytest.mark.slow
@pytest.mark.timeout(300)
@schema.given(accept=st.sampled_from(ACCEPT_VALUES))
@schema.parametrize()
@settings(max_examples=250, **FUZZ_SETTINGS)  # type: ignore[arg-type]
def test_spec_conformance_thorough(
    case: schemathesis.Case[Any], accept: str | None, api_node: NodeProcess
) -> None:
    """Many more generated requests: no 5xx, responses that match the spec."""
    headers = {"Accept": accept} if accept else None
    case.call_and_validate(base_url=api_node.url, headers=headers)


# Strategies for the hand-written fuzzers.

TYPES = ["ledger.open", "ledger.deposit", "ledger.charge", "ledger.transfer"]
TYPES += ["users.register"]
ACCOUNTS = st.sampled_from(["alice", "bob", "carol"]) | st.from_regex(
    r"\A[A-Za-z0-9._:@-]{1,128}\Z"
)
AMOUNTS = st.integers(1, 2**53 - 1) | st.sampled_from([1, 2**53 - 1])
CURRENCIES = st.sampled_from(sorted(CURRENCY_CODES))
USERNAMES = st.from_regex(r"\A[A-Za-z][A-Za-z0-9._-]{0,30}\Z")
PRINTABLE = st.characters(codec="utf-8", exclude_categories=["Cc", "Cs"])
VALID_PAYLOADS: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    "ledger.open": st.fixed_dictionaries({"account": ACCOUNTS, "currency": CURRENCIES}),
    "ledger.deposit": st.fixed_dictionaries({"account": ACCOUNTS, "amount": AMOUNTS}),
    "ledger.charge": st.fixed_dictionaries(
        {"account": ACCOUNTS, "amount": AMOUNTS},
        optional={"reference": ACCOUNTS | st.none()},
    ),
    "ledger.transfer": st.fixed_dictionaries(
        {"from": ACCOUNTS, "to": ACCOUNTS, "amount": AMOUNTS}
    ),
    "users.register": st.fixed_dictionaries(
        {
            "username": USERNAMES | st.text(min_size=1, max_size=20),
            "display_name": st.text(PRINTABLE, min_size=1, max_size=40),
        }
    ),
}

JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
MSGPACK_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=20)
    | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=8))
    | st.builds(msgpack.Timestamp, st.integers(0, 2**32 - 1), st.integers(0, 10**9 - 1))
)
MSGPACK_KEYS = st.text(max_size=10) | st.integers(-5, 5) | st.binary(max_size=4)
MSGPACK_VALUES = st.recursive(
    MSGPACK_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(MSGPACK_KEYS, inner, max_size=4)
    ),
    max_leaves=12,
)


def weighted(**weights: int) -> st.SearchStrategy[str]:
    """Return a strategy of the given names, each drawn in proportion to its weight.

    The first name is the one hypothesis shrinks towards.
    """
    names = list(weights)
    bounds = list(itertools.accumulate(weights.values()))

    def pick(roll: int) -> str:
        return next(
            name for name, bound in zip(names, bounds, strict=True) if roll < bound
        )

    return st.integers(0, bounds[-1] - 1).map(pick)


def nested(depth: int) -> Any:
    """Return a payload map nested `depth` levels deep."""
    value: Any = "bottom"
    for _ in range(depth):
        value = {"inner": value}
    return value


@st.composite
def command_values(draw: st.DrawFn, *, values: st.SearchStrategy[Any]) -> Any:
    """Draw a command map, valid or broken in one or two places."""
    if draw(weighted(known=6, other=1)) == "known":
        type_name = draw(st.sampled_from(TYPES))
    else:
        type_name = draw(st.text(max_size=20))
    payload: dict[str, Any] = draw(
        VALID_PAYLOADS.get(type_name, st.dictionaries(st.text(), values))
    )
    field_change = draw(weighted(none=4, replace=2, drop=1, extra=1))
    if field_change == "replace" and payload:
        payload[draw(st.sampled_from(sorted(payload)))] = draw(values)
    elif field_change == "drop" and payload:
        del payload[draw(st.sampled_from(sorted(payload)))]
    elif field_change == "extra":
        payload[draw(st.text(max_size=10))] = draw(values)

    command: dict[Any, Any] = {"type": type_name, "payload": payload}
    shape_change = draw(weighted(none=12, payload=1, type=1, extra=1))
    if shape_change == "payload":
        command["payload"] = draw(values | st.integers(30, 40).map(nested))
    elif shape_change == "type":
        command["type"] = draw(values)
    elif shape_change == "extra":
        command[draw(st.text(max_size=10))] = draw(values)
    return command


def encode_json(value: Any, *, ascii_only: bool) -> bytes:
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


def encode_msgpack(value: Any) -> bytes:
    return bytes(msgpack.packb(value, use_bin_type=True))


JSON_TEXTS = st.sampled_from(
    [
        b"",
        b"null",
        b"{",
        b'{"type": "ledger.open", "type": "ledger.open", "payload": {}}',
        b'{"type": "ledger.deposit", "payload": {"account": "a", "amount": NaN}}',
        b'{"type": "ledger.deposit", "payload": {"account": "a", "amount": 1e999}}',
        b'{"type": "ledger.deposit", "payload": {"account": "a", "amount": 1.0}}',
        b'{"type": "ledger.open", "payload": {"account": "\\ud800"}}',
        b'{"type": "ledger.open", "payload": {"account": "a"}} trailing',
        b"\xef\xbb\xbf{}",
        b"\xff\xfe{}",
        b"[" * 100_000 + b"]" * 100_000,
        b'{"type": "ledger.open", "payload": ' + b"1" * 5000 + b"}",
        b" " * ((1 << 20) + 1),
    ]
)


@st.composite
def json_bodies(draw: st.DrawFn, *, batch: bool) -> bytes:
    """Draw a JSON body: a command (or a batch of them), any value, or odd text."""
    kind = draw(weighted(command=12, value=2, text=1, cut=1))
    if kind == "text":
        return draw(JSON_TEXTS)
    if kind == "value":
        value = draw(JSON_VALUES)
    else:
        value = draw(
            batch_values(JSON_VALUES) if batch else command_values(values=JSON_VALUES)
        )
    data = encode_json(value, ascii_only=draw(st.booleans()))
    if kind == "cut":
        data = data[: draw(st.integers(0, max(len(data) - 1, 0)))]
    return data


@st.composite
def msgpack_bodies(draw: st.DrawFn, *, batch: bool) -> bytes:
    """Draw a msgpack body: a command (or a batch of them), any value, or bytes."""
    kind = draw(weighted(command=12, value=2, bytes=1, cut=1))
    if kind == "bytes":
        return draw(st.binary(max_size=64))
    if kind == "value":
        value = draw(MSGPACK_VALUES)
    else:
        value = draw(
            batch_values(MSGPACK_VALUES)
            if batch
            else command_values(values=MSGPACK_VALUES)
        )
    data = encode_msgpack(value)
    if kind == "cut":
        data = data[: draw(st.integers(0, max(len(data) - 1, 0)))]
    return data


KEY_KINDS = weighted(fresh=12, pool=3, quoted=1, odd=1, missing=1)


@st.composite
def batch_values(draw: st.DrawFn, values: st.SearchStrategy[Any]) -> Any:
    """Draw a batch: a list of command maps with an `id` each, some broken."""
    items = draw(st.lists(command_values(values=values), min_size=1, max_size=6))
    for item in items:
        kind = draw(KEY_KINDS)
        if kind == "odd":
            item["id"] = draw(values)
        elif kind != "missing":
            item["id"] = key_text(kind, draw(st.integers(0, 3)))
    if draw(st.integers(0, 9)) == 0:
        items.append(draw(values))
    return items


KEY_COUNTER = itertools.count()


def key_text(kind: str, pool_index: int) -> str:
    """Return a fresh key, one of a few reused keys, or the quoted form."""
    if kind == "pool":
        return f"pool-{pool_index}"
    key = f"fuzz-{next(KEY_COUNTER)}"
    return f'"{key}"' if kind == "quoted" else key


# Header values that reach cmdlog. aiohttp's parser (3.14) rejects a header
# with a control byte other than tab, or with DEL, by a plain-text 400 of its
# own before any handler runs, so those bytes are left out.
HEADER_BYTES = st.binary(max_size=40).map(
    lambda data: bytes(b for b in data if b == 0x09 or (b >= 0x20 and b != 0x7F))
)
CONTENT_TYPES = st.sampled_from(
    [
        None,
        JSON.encode(),
        MSGPACK.encode(),
        b"application/x-msgpack",
        b"application/json; charset=utf-8",
        b"text/json",
        b"application/problem+json",
        b"APPLICATION/MSGPACK",
        b"text/plain",
        b"multipart/form-data; boundary=x",
        b";",
        b"",
    ]
) | HEADER_BYTES.map(lambda value: value or None)
ACCEPTS = st.sampled_from(
    [value.encode() if value else None for value in ACCEPT_VALUES]
)
ACCEPTS = ACCEPTS | st.sampled_from([b"application/msgpack;q=0", b"text/html"])
ACCEPTS = ACCEPTS | HEADER_BYTES.map(lambda value: value or None)


@dataclass(frozen=True, slots=True)
class WriteRequest:
    """One drawn request to a write endpoint."""

    path: str
    body: bytes
    headers: list[tuple[str, bytes]]
    accept: bytes | None


@st.composite
def write_requests(draw: st.DrawFn, *, path: str) -> WriteRequest:
    """Draw a body in one encoding and a Content-Type that may not match it."""
    batch = path == "/commands/batch"
    encoding = draw(st.sampled_from(["json", "msgpack"]))
    if encoding == "json":
        body = draw(json_bodies(batch=batch))
        matching = st.sampled_from([None, JSON.encode()])
        content_type = draw(
            matching if draw(weighted(same=6, other=1)) == "same" else CONTENT_TYPES
        )
    else:
        body = draw(msgpack_bodies(batch=batch))
        matching = st.just(MSGPACK.encode())
        content_type = draw(
            matching if draw(weighted(same=6, other=1)) == "same" else CONTENT_TYPES
        )

    headers = [("Authorization", AUTHORIZATION.encode())]
    if content_type is not None:
        headers.append(("Content-Type", content_type))
    accept = draw(ACCEPTS)
    if accept is not None:
        headers.append(("Accept", accept))
    if not batch:
        kind = draw(KEY_KINDS)
        if kind == "odd":
            headers.append(("Idempotency-Key", draw(HEADER_BYTES)))
        elif kind != "missing":
            headers.append(
                ("Idempotency-Key", key_text(kind, draw(st.integers(0, 3))).encode())
            )
    return WriteRequest(path, body, headers, accept)


# Hand-written fuzzers of the write endpoints.


def expected_format(accept: bytes | None) -> str:
    """Return the encoding the node picks for these Accept bytes."""
    if accept is None:
        return JSON
    # aiohttp (3.14) decodes header bytes as UTF-8 with surrogateescape.
    return wire.response_format(accept.decode("utf-8", "surrogateescape"))


def check_write(node: NodeProcess, request: WriteRequest) -> None:
    """Send one write and check status, body shape and the command count."""
    note(f"request: {request!r}")
    before = command_count(node)
    reply = send(node, "POST", request.path, headers=request.headers, body=request.body)
    after = command_count(node)

    assert reply.status < 500, (reply.status, reply.body)
    event(f"status {reply.status}")
    media = (reply.headers.get("Content-Type") or "").split(";")[0].strip()
    assert media == expected_format(request.accept), (request.accept, media)
    if reply.status >= 400:
        assert_error_body(reply)
        event(f"error {reply.decoded()['error']['code']}")
        assert after == before, (reply.status, reply.body)
        return

    body = reply.decoded()
    if request.path == "/commands/batch":
        assert reply.status == 200, body
        statuses = [result["status"] for result in body["results"]]
        event(f"batch item statuses {sorted(set(statuses))}")
        for result in body["results"]:
            if result["status"] >= 400:
                assert set(result["body"]) == {"error"}, result
        assert after - before == statuses.count(201), statuses
        return

    assert reply.status in (200, 201), body
    assert after - before == (1 if reply.status == 201 else 0), reply.status
    if reply.status == 201:
        location = reply.headers.get("Location")
        assert location is not None
        assert get_json(node, location)["id"] == body["id"]
    else:
        assert reply.headers.get("Idempotent-Replayed") == "true"


@given(request=write_requests(path="/commands"))
@settings(max_examples=100, **FUZZ_SETTINGS)  # type: ignore[arg-type]
def test_fuzz_post_command(api_node: NodeProcess, request: WriteRequest) -> None:
    """POST /commands: no 5xx, 4xx are error objects, count moves only on 2xx."""
    check_write(api_node, request)


@given(request=write_requests(path="/commands/batch"))
@settings(max_examples=60, **FUZZ_SETTINGS)  # type: ignore[arg-type]
def test_fuzz_post_batch(api_node: NodeProcess, request: WriteRequest) -> None:
    """POST /commands/batch: no 5xx, errors per item, count moves by 201 items."""
    check_write(api_node, request)


@pytest.mark.slow
@pytest.mark.timeout(300)
@given(
    request=write_requests(path="/commands") | write_requests(path="/commands/batch")
)
@settings(max_examples=2000, **FUZZ_SETTINGS)  # type: ignore[arg-type]
def test_fuzz_writes_thorough(api_node: NodeProcess, request: WriteRequest) -> None:
    """2,000 writes to both endpoints hold the same invariants."""
    check_write(api_node, request)


AUTHORIZATION_SCHEMES = st.sampled_from([b"", b"Bearer ", b"bearer  ", b"Basic "])


@given(authorization=st.builds(bytes.__add__, AUTHORIZATION_SCHEMES, HEADER_BYTES))
@settings(max_examples=50, **FUZZ_SETTINGS)  # type: ignore[arg-type]
def test_fuzz_authorization(api_node: NodeProcess, authorization: bytes) -> None:
    """A wrong Authorization header of any bytes gets 401 with an error body."""
    reply = send(api_node, "GET", "/status", headers=[("Authorization", authorization)])

    assert reply.status == 401, (authorization, reply.status, reply.body)
    assert_error_body(reply)


# /replicate arguments. An `announce` URL makes the node pull from it, so the
# fuzzer sends only values that can never start a puller: the node's own URL,
# text without a colon (no URL scheme), and URLs that do not parse.

ANNOUNCE_VALUES = (
    st.text(alphabet=st.characters(exclude_characters=":"), max_size=20)
    | st.sampled_from(["http://[", "https://[::1", "http://]", "http://a]b"])
    | st.just("SELF")
)
NUMBER_TEXTS = (
    st.integers(0, 2**70).map(str)
    | st.text(alphabet=st.characters(categories=["Nd", "No"]), min_size=1, max_size=5)
    | st.text(max_size=8)
)
# 4,400 digits are over the 4,300 that int() parses by default. Only `after`
# gets them, so the request line stays under aiohttp's limit of 8,190 bytes.
LONG_NUMBER = st.just("9" * 4400)


@st.composite
def replicate_queries(draw: st.DrawFn) -> dict[str, str]:
    """Draw query arguments of GET /replicate, each of which may be left out."""
    query: dict[str, str] = {}
    for name, values in [
        ("after", NUMBER_TEXTS | LONG_NUMBER),
        ("version", NUMBER_TEXTS | st.sampled_from(["1", "01", "2"])),
        ("instance", st.text(max_size=40)),
        ("announce", ANNOUNCE_VALUES),
    ]:
        if draw(st.booleans()):
            query[name] = draw(values)
    return query


def wait_streams_below(node: NodeProcess, streams_max: int) -> None:
    """Wait up to 5 s until the node serves fewer than `streams_max` streams."""
    pattern = re.compile(rb"^cmdlog_replication_streams (\S+)$", re.MULTILINE)
    for _ in range(100):
        reply = send(
            node, "GET", "/metrics", headers=[("Authorization", AUTHORIZATION.encode())]
        )
        match = pattern.search(reply.body)
        assert match is not None
        if float(match.group(1)) < streams_max:
            return
        time.sleep(0.05)
    raise AssertionError(
        f"the node still serves {streams_max} or more replication streams after 5 s"
    )


def read_first_frame(response: http.client.HTTPResponse) -> dict[str, Any]:
    """Read one frame off a /replicate response and check its CRC-32."""
    header = response.read(8)
    length, checksum = struct.unpack(">II", header)
    body = response.read(length)
    assert zlib.crc32(body) == checksum
    frame: dict[str, Any] = msgpack.unpackb(body, raw=False)
    return frame


@given(query=replicate_queries())
@settings(max_examples=40, **FUZZ_SETTINGS)  # type: ignore[arg-type]
def test_fuzz_replicate_arguments(api_node: NodeProcess, query: dict[str, str]) -> None:
    """GET /replicate with any arguments: a hello frame or a 4xx, never a 5xx."""
    if query.get("announce") == "SELF":
        query["announce"] = api_node.url
    note(f"query: {query!r}")
    wait_streams_below(api_node, STREAMS_OPEN_MAX)
    # A lone surrogate that the strategies draw is sent as the bytes of its
    # UTF-8-like encoding, which is not UTF-8: the node must reject those too.
    path = "/replicate?" + urllib.parse.urlencode(query, errors="surrogatepass")
    connection = http.client.HTTPConnection(
        "127.0.0.1", api_node.port, timeout=REQUEST_TIMEOUT_S
    )
    try:
        connection.putrequest("GET", path)
        connection.putheader("Authorization", AUTHORIZATION)
        connection.endheaders()
        response = connection.getresponse()
        status = response.status
        if status == 200:
            hello = read_first_frame(response)
        else:
            reply = Reply(status, response.headers, response.read())
    finally:
        connection.close()

    assert status < 500, (query, status)
    if status == 200:
        assert hello["t"] == "hello"
        assert hello["version"] == 1
    else:
        assert status == 400, (query, status)
        assert_error_body(reply)


# Bugs found by the fuzzers above, each pinned with its exact request.


@pytest.mark.parametrize(
    "query",
    [
        "after=%C2%B2",
        "version=%C2%B2",
        "after=" + "9" * 5000,
        "announce=http://%5B",
        "announce=http://" + "a" * 600 + ":1",
        "announce=%ED%A0%80",
    ],
    ids=[
        "superscript-after",
        "superscript-version",
        "5000-digit-after",
        "bad-announce",
        "600-character-announce",
        "surrogate-announce",
    ],
)
def test_replicate_bad_argument_rejected(api_node: NodeProcess, query: str) -> None:
    """A /replicate argument that is not a number or not a URL gets 400, not 500."""
    reply = send(
        api_node,
        "GET",
        "/replicate?" + query,
        headers=[("Authorization", AUTHORIZATION.encode())],
    )

    assert reply.status == 400, (reply.status, reply.body)
    assert_error_body(reply)


def test_authorization_not_utf8_rejected(api_node: NodeProcess) -> None:
    """An Authorization header that is not UTF-8 gets 401, not 500."""
    reply = send(
        api_node, "GET", "/status", headers=[("Authorization", b"Bearer \xff")]
    )

    assert reply.status == 401, (reply.status, reply.body)
    assert_error_body(reply)


def test_method_not_allowed_lists_allow(api_node: NodeProcess) -> None:
    """A 405 lists the allowed methods in Allow (RFC 9110, section 15.5.6)."""
    reply = send(
        api_node,
        "DELETE",
        "/commands",
        headers=[("Authorization", AUTHORIZATION.encode())],
    )

    assert reply.status == 405
    assert reply.headers.get("Allow") == "POST"


def test_node_healthy_after_fuzzing(api_node: NodeProcess) -> None:
    """After every fuzzer above, the node still runs and /healthz is 200."""
    reply = send(api_node, "GET", "/healthz")

    assert api_node.is_running()
    assert reply.status == 200
    assert reply.decoded()["status"] == "ok"
