"""Tests for the HTTP contract of cmdlog.http_api, against real `cmdlog serve` nodes.

Most tests share one module-scoped node and use fresh keys and account names,
so each test stays independent while the suite starts few processes.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import re
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgpack
import pytest
from multidict import CIMultiDictProxy
from yarl import URL

from tests.nodes import NodeProcess
from tests.raw_http import command_head, raw_request

JSON = "application/json"
MSGPACK = "application/msgpack"
TOKEN = "secret"
GUARDED_BODY_BYTES_MAX = 1000
DEFAULT_BODY_BYTES_MAX = 1 << 20
BATCH_ITEMS_MAX = 1000
KNOWN_TYPES = [
    "ledger.charge",
    "ledger.deposit",
    "ledger.open",
    "ledger.transfer",
    "users.register",
]
POLL_ATTEMPTS_MAX = 100
POLL_INTERVAL_S = 0.02


# encodings and requests


@dataclass(frozen=True, slots=True)
class Encoding:
    """The encoding a test sends (Content-Type) and the one it requests (Accept)."""

    name: str
    content_type: str | None
    accept: str | None
    response_type: str

    def pack(self, value: Any) -> bytes:
        if self.content_type is not None and "msgpack" in self.content_type:
            return bytes(msgpack.packb(value))
        return json.dumps(value).encode()

    def headers(self, key: str | None = None) -> dict[str, str]:
        headers = {}
        if self.content_type is not None:
            headers["Content-Type"] = self.content_type
        if self.accept is not None:
            headers["Accept"] = self.accept
        if key is not None:
            headers["Idempotency-Key"] = key
        return headers


ENCODINGS = [
    Encoding("json", JSON, JSON, JSON),
    Encoding("msgpack", MSGPACK, MSGPACK, MSGPACK),
    Encoding("x-msgpack", "application/x-msgpack", "application/x-msgpack", MSGPACK),
    Encoding("no-content-type", None, None, JSON),
]
JSON_ENCODING = ENCODINGS[0]
by_encoding = pytest.mark.parametrize(
    "encoding", ENCODINGS, ids=[encoding.name for encoding in ENCODINGS]
)


@dataclass(frozen=True, slots=True)
class Reply:
    """A response with its body decoded by its Content-Type."""

    status: int
    headers: CIMultiDictProxy[str]
    content_type: str
    body: Any


def decode_body(content_type: str, raw: bytes) -> Any:
    if content_type == MSGPACK:
        return msgpack.unpackb(raw, raw=False)
    if content_type == JSON:
        return json.loads(raw)
    return raw.decode("utf-8", errors="replace")


async def send(
    session: aiohttp.ClientSession,
    method: str,
    url: str | URL,
    *,
    body: bytes | AsyncIterator[bytes] | None = None,
    headers: dict[str, str] | None = None,
) -> Reply:
    """Send one request with only the given headers, and decode the response.

    aiohttp adds no Content-Type of its own here. A bytes body is sent with a
    Content-Length, and an async iterator with chunked transfer encoding.
    """
    async with session.request(
        method,
        url,
        data=io.BytesIO(body) if isinstance(body, bytes) else body,
        headers=headers or {},
        skip_auto_headers=("Content-Type",),
    ) as response:
        raw = await response.read()
        return Reply(
            response.status,
            response.headers,
            response.content_type,
            decode_body(response.content_type, raw),
        )


async def post_command(
    session: aiohttp.ClientSession,
    node: NodeProcess,
    command: dict[str, Any],
    *,
    key: str | None,
    encoding: Encoding = JSON_ENCODING,
) -> Reply:
    return await send(
        session,
        "POST",
        node.url + "/commands",
        body=encoding.pack(command),
        headers=encoding.headers(key),
    )


async def get(
    session: aiohttp.ClientSession, node: NodeProcess, path: str, **headers: str
) -> Reply:
    return await send(
        session, "GET", URL(node.url + path, encoded=True), headers=headers
    )


async def command_count(session: aiohttp.ClientSession, node: NodeProcess) -> int:
    reply = await get(session, node, "/status")
    assert reply.status == 200, reply.body
    count: int = reply.body["commands"]
    return count


def assert_error(reply: Reply, status: int, code: str) -> dict[str, Any]:
    """Check the status and the `{"error": {"code", "message"}}` shape."""
    assert reply.status == status, reply.body
    assert isinstance(reply.body, dict), reply.body
    error: dict[str, Any] = reply.body["error"]
    assert error["code"] == code, error
    assert isinstance(error["message"], str), error
    assert error["message"].strip(), error
    return error


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def open_command(account: str, currency: str = "EUR") -> dict[str, Any]:
    return {
        "type": "ledger.open",
        "payload": {"account": account, "currency": currency},
    }


def deposit_command(account: str, amount: int) -> dict[str, Any]:
    return {"type": "ledger.deposit", "payload": {"account": account, "amount": amount}}


def path_of(command_id: str) -> str:
    return "/commands/" + urllib.parse.quote(command_id, safe="")


# fixtures


def start_shared_node(
    tmp_path_factory: pytest.TempPathFactory, name: str, **kwargs: Any
) -> Iterator[NodeProcess]:
    node = NodeProcess(tmp_path_factory.mktemp(name) / "node", **kwargs).start()
    yield node
    if node.is_running():
        node.kill()


@pytest.fixture(scope="module")
def api_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """One node with default limits and no token, shared by the module."""
    yield from start_shared_node(tmp_path_factory, "api")


@pytest.fixture(scope="module")
def guarded_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """One node with a token and a 1,000-byte body limit, shared by the module."""
    yield from start_shared_node(
        tmp_path_factory,
        "guarded",
        token=TOKEN,
        extra_args=("--body-bytes-max", str(GUARDED_BODY_BYTES_MAX)),
    )


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as client:
        yield client


def authorized(key: str | None = None, **headers: str) -> dict[str, str]:
    sent = {"Authorization": f"Bearer {TOKEN}", "Content-Type": JSON, **headers}
    if key is not None:
        sent["Idempotency-Key"] = key
    return sent


# POST /commands: new commands and retries


@by_encoding
async def test_new_command_created(
    api_node: NodeProcess, session: aiohttp.ClientSession, encoding: Encoding
) -> None:
    """A new command gets 201 and the full command view in the asked encoding."""
    key, account = unique("new"), unique("acct")
    node_id = (await get(session, api_node, "/status")).body["node"]

    reply = await post_command(
        session, api_node, open_command(account), key=key, encoding=encoding
    )

    assert reply.status == 201, reply.body
    assert reply.content_type == encoding.response_type
    assert reply.headers["Location"] == path_of(key)
    assert "Idempotent-Replayed" not in reply.headers
    view = reply.body
    assert set(view) == {"id", "type", "payload", "stamp", "origin", "outcome"}
    assert view["id"] == key
    assert view["type"] == "ledger.open"
    assert view["payload"] == {"account": account, "currency": "EUR"}
    assert type(view["stamp"]) is int
    assert view["stamp"] > 0
    assert view["origin"] == node_id
    assert view["outcome"] == {
        "status": "applied",
        "result": {"account": account, "currency": "EUR", "balance": 0},
        "reason": None,
    }


async def test_rejected_command_created(
    api_node: NodeProcess, session: aiohttp.ClientSession
) -> None:
    """A command its handler rejects is still recorded: 201 with a rejected outcome."""
    key = unique("rejected")

    reply = await post_command(
        session, api_node, deposit_command(unique("missing"), 5), key=key
    )

    assert reply.status == 201, reply.body
    assert reply.body["outcome"]["status"] == "rejected"
    assert reply.body["outcome"]["reason"] == "no_such_account"
    assert (await get(session, api_node, path_of(key))).status == 200


@by_encoding
async def test_retry_replays(
    api_node: NodeProcess, session: aiohttp.ClientSession, encoding: Encoding
) -> None:
    """The same key and payload again gets 200, the replay header and the same view."""
    key, command = unique("retry"), open_command(unique("acct"))
    first = await post_command(session, api_node, command, key=key, encoding=encoding)
    count = await command_count(session, api_node)

    again = await post_command(session, api_node, command, key=key, encoding=encoding)

    assert first.status == 201, first.body
    assert again.status == 200, again.body
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert again.content_type == encoding.response_type
    assert again.body == first.body
    assert await command_count(session, api_node) == count


@by_encoding
async def test_retry_ignores_key_order(
    api_node: NodeProcess, session: aiohttp.ClientSession, encoding: Encoding
) -> None:
    """A retry whose maps list their keys in another order is still a replay."""
    key, account = unique("order"), unique("acct")
    first = await post_command(
        session,
        api_node,
        {"type": "ledger.open", "payload": {"account": account, "currency": "EUR"}},
        key=key,
        encoding=encoding,
    )

    again = await post_command(
        session,
        api_node,
        {"payload": {"currency": "EUR", "account": account}, "type": "ledger.open"},
        key=key,
        encoding=encoding,
    )

    assert first.status == 201, first.body
    assert again.status == 200, again.body
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert again.body == first.body


@by_encoding
@pytest.mark.parametrize("changed", ["payload", "type"])
async def test_key_reused_rejected(
    api_node: NodeProcess,
    session: aiohttp.ClientSession,
    encoding: Encoding,
    changed: str,
) -> None:
    """The same key with another payload or type gets 422 naming the key."""
    key, account = unique("reused"), unique("acct")
    first = await post_command(
        session, api_node, open_command(account), key=key, encoding=encoding
    )
    other = (
        open_command(account, currency="USD")
        if changed == "payload"
        else deposit_command(account, 1)
    )
    count = await command_count(session, api_node)

    reply = await post_command(session, api_node, other, key=key, encoding=encoding)

    assert first.status == 201, first.body
    error = assert_error(reply, 422, "idempotency_key_reused")
    assert key in error["message"]
    assert await command_count(session, api_node) == count
    stored = await get(session, api_node, path_of(key))
    assert stored.body == first.body


# POST /commands: the Idempotency-Key header

INVALID_KEYS = {
    "missing": None,
    "empty": "",
    "empty-quoted": '""',
    "256-chars": "k" * 256,
    "257-chars-quoted": '"' + "k" * 256 + '"',
    "space": "two words",
    "tab": "tab\there",
    "non-ascii": "cl\u00e9",
    "natural-id-form": "ledger.charge~" + "0" * 32,
}


@by_encoding
@pytest.mark.parametrize("raw_key", INVALID_KEYS.values(), ids=INVALID_KEYS.keys())
async def test_invalid_key_rejected(
    api_node: NodeProcess,
    session: aiohttp.ClientSession,
    encoding: Encoding,
    raw_key: str | None,
) -> None:
    """A missing, empty, too long or non-printable-ASCII key gets 400, and so
    does a key in the form of an ID derived from a natural key."""
    count = await command_count(session, api_node)

    reply = await post_command(
        session, api_node, open_command(unique("acct")), key=raw_key, encoding=encoding
    )

    assert_error(reply, 400, "invalid_idempotency_key")
    assert await command_count(session, api_node) == count


async def test_two_key_headers_rejected(
    api_node: NodeProcess, session: aiohttp.ClientSession
) -> None:
    """Two Idempotency-Key headers get 400 and store nothing."""
    count = await command_count(session, api_node)
    headers = [
        ("Content-Type", JSON),
        ("Idempotency-Key", unique("first")),
        ("Idempotency-Key", unique("second")),
    ]
    body = json.dumps(open_command(unique("acct"))).encode()
    async with session.post(
        api_node.url + "/commands", data=body, headers=headers
    ) as response:
        status = response.status
        error = (await response.json())["error"]

    assert status == 400
    assert error["code"] == "invalid_idempotency_key"
    assert "2 Idempotency-Key headers" in error["message"]
    assert await command_count(session, api_node) == count


@pytest.mark.parametrize("encoding", ["br", "zstd", "br2", "compress", "gzip, br2"])
async def test_unknown_content_encoding_rejected(
    api_node: NodeProcess, session: aiohttp.ClientSession, encoding: str
) -> None:
    """A body in an encoding the node cannot decode gets 415, not stored as is."""
    count = await command_count(session, api_node)
    body = json.dumps(open_command(unique("acct"))).encode()
    reply = await send(
        session,
        "POST",
        api_node.url + "/commands",
        body=body,
        headers={
            "Content-Type": JSON,
            "Content-Encoding": encoding,
            "Idempotency-Key": unique("enc"),
        },
    )

    assert_error(reply, 415, "unsupported_media_type")
    assert await command_count(session, api_node) == count


@pytest.mark.parametrize("order", [("identity", "gzip"), ("gzip", "identity")])
async def test_two_content_encodings_rejected(
    api_node: NodeProcess, session: aiohttp.ClientSession, order: tuple[str, str]
) -> None:
    """Two Content-Encoding headers get 415 whatever their order: aiohttp's
    parser decodes by the last one, so neither one alone may decide."""
    count = await command_count(session, api_node)
    body = gzip.compress(json.dumps(open_command(unique("acct"))).encode())
    head = command_head(api_node.port, unique("two-enc"), len(body)).replace(
        b"\r\n\r\n",
        b"".join(b"\r\nContent-Encoding: " + name.encode() for name in order)
        + b"\r\n\r\n",
    )
    reader, writer = await raw_request("127.0.0.1", api_node.port, head + body)
    try:
        reply = await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()

    assert reply.startswith(b"HTTP/1.1 415 "), reply[:200]
    assert b'"unsupported_media_type"' in reply, reply
    assert await command_count(session, api_node) == count


@by_encoding
async def test_quoted_key_is_bare_key(
    api_node: NodeProcess, session: aiohttp.ClientSession, encoding: Encoding
) -> None:
    """A key in the draft's quoted form names the same command as the bare key."""
    key, command = unique("quoted"), open_command(unique("acct"))

    quoted = await post_command(
        session, api_node, command, key=f'"{key}"', encoding=encoding
    )
    bare = await post_command(session, api_node, command, key=key, encoding=encoding)

    assert quoted.status == 201, quoted.body
    assert quoted.body["id"] == key
    assert bare.status == 200, bare.body
    assert bare.headers.get("Idempotent-Replayed") == "true"
    assert bare.body == quoted.body


async def test_key_of_255_chars_accepted(
    api_node: NodeProcess, session: aiohttp.ClientSession
) -> None:
    """A key of exactly 255 printable ASCII characters is accepted."""
    key = unique("long").ljust(255, "~")

    reply = await post_command(session, api_node, open_command(unique("acct")), key=key)

    assert reply.status == 201, reply.body
    assert reply.body["id"] == key


# POST /commands: the body


def truncated(encoding: Encoding) -> bytes:
    whole = encoding.pack(open_command("truncated"))
    return whole[: len(whole) // 2]


BAD_BODIES: dict[str, Callable[[Encoding], bytes]] = {
    "truncated": truncated,
    "empty": lambda encoding: b"",
    "not-a-map": lambda encoding: encoding.pack(["ledger.open", {}]),
    "missing-type": lambda encoding: encoding.pack({"payload": {"account": "a"}}),
    "missing-payload": lambda encoding: encoding.pack({"type": "ledger.open"}),
    "type-not-a-string": lambda encoding: encoding.pack({"type": 7, "payload": {}}),
    "type-empty": lambda encoding: encoding.pack({"type": "", "payload": {}}),
    "payload-list": lambda encoding: encoding.pack(
        {"type": "ledger.open", "payload": ["account", "a"]}
    ),
    "payload-string": lambda encoding: encoding.pack(
        {"type": "ledger.open", "payload": "account=a"}
    ),
    "payload-null": lambda encoding: encoding.pack(
        {"type": "ledger.open", "payload": None}
    ),
    "unexpected-field": lambda encoding: encoding.pack(
        {**open_command("extra"), "id": "extra"}
    ),
}


@by_encoding
@pytest.mark.parametrize("make_body", BAD_BODIES.values(), ids=BAD_BODIES.keys())
async def test_bad_body_rejected(
    api_node: NodeProcess,
    session: aiohttp.ClientSession,
    encoding: Encoding,
    make_body: Callable[[Encoding], bytes],
) -> None:
    """A malformed body, a missing type or a payload that is not a map gets 400."""
    count = await command_count(session, api_node)

    reply = await send(
        session,
        "POST",
        api_node.url + "/commands",
        body=make_body(encoding),
        headers=encoding.headers(unique("bad-body")),
    )

    assert_error(reply, 400, "malformed_body")
    assert reply.content_type == encoding.response_type
    assert await command_count(session, api_node) == count


@by_encoding
async def test_unknown_type_lists_known(
    api_node: NodeProcess, session: aiohttp.ClientSession, encoding: Encoding
) -> None:
    """An unknown command type gets 422 listing every registered type."""
    count = await command_count(session, api_node)

    reply = await post_command(
        session,
        api_node,
        {"type": "ledger.refund", "payload": {"account": "a"}},
        key=unique("unknown"),
        encoding=encoding,
    )

    error = assert_error(reply, 422, "unknown_command_type")
    assert error["known_types"] == KNOWN_TYPES
    for type_name in KNOWN_TYPES:
        assert type_name in error["message"], type_name
    assert "ledger.refund" in error["message"]
    assert await command_count(session, api_node) == count


INVALID_PAYLOADS: dict[str, tuple[str, dict[str, Any], str]] = {
    "currency-lowercase": (
        "ledger.open",
        {"account": "a", "currency": "eur"},
        "currency",
    ),
    "currency-missing": ("ledger.open", {"account": "a"}, "currency"),
    "account-with-space": (
        "ledger.open",
        {"account": "a b", "currency": "EUR"},
        "account",
    ),
    "account-number": ("ledger.open", {"account": 12, "currency": "EUR"}, "account"),
    "unexpected-field": (
        "ledger.open",
        {"account": "a", "currency": "EUR", "colour": "red"},
        "colour",
    ),
    "amount-zero": ("ledger.deposit", {"account": "a", "amount": 0}, "amount"),
    "amount-string": ("ledger.deposit", {"account": "a", "amount": "5"}, "amount"),
    "amount-float": ("ledger.deposit", {"account": "a", "amount": 5.0}, "amount"),
    "amount-bool": ("ledger.deposit", {"account": "a", "amount": True}, "amount"),
    "amount-2-pow-53": ("ledger.charge", {"account": "a", "amount": 2**53}, "amount"),
    "transfer-same-account": (
        "ledger.transfer",
        {"from": "a", "to": "a", "amount": 1},
        "to",
    ),
    "username-with-space": (
        "users.register",
        {"username": "a b", "display_name": "A B"},
        "username",
    ),
    "display-name-blank": (
        "users.register",
        {"username": "blank", "display_name": "   "},
        "display_name",
    ),
}


@by_encoding
@pytest.mark.parametrize(
    ("type_name", "payload", "field"),
    INVALID_PAYLOADS.values(),
    ids=INVALID_PAYLOADS.keys(),
)
async def test_invalid_payload_names_field(
    api_node: NodeProcess,
    session: aiohttp.ClientSession,
    encoding: Encoding,
    type_name: str,
    payload: dict[str, Any],
    field: str,
) -> None:
    """A payload its type's validation rejects gets 422 naming the field."""
    count = await command_count(session, api_node)

    reply = await post_command(
        session,
        api_node,
        {"type": type_name, "payload": payload},
        key=unique("invalid"),
        encoding=encoding,
    )

    error = assert_error(reply, 422, "invalid_payload")
    assert error["field"] == field
    assert field in error["message"]
    assert await command_count(session, api_node) == count


# POST /commands: size, media type and token


def padded_body(size_bytes: int) -> bytes:
    """Return a valid ledger.open JSON body padded with spaces to `size_bytes`."""
    bare = json.dumps(open_command(unique("padded"))).encode()
    padding = size_bytes - len(bare)
    assert padding >= 0, f"a body of {size_bytes} bytes cannot hold a command"
    return bare[:-1] + b" " * padding + bare[-1:]


async def chunks(body: bytes, chunk_bytes: int = 64 * 1024) -> AsyncIterator[bytes]:
    for start in range(0, len(body), chunk_bytes):
        yield body[start : start + chunk_bytes]


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_body_over_default_limit(
    api_node: NodeProcess, session: aiohttp.ClientSession, framing: str
) -> None:
    """A body over the default 1 MiB limit gets 413, however it is framed."""
    body = padded_body(DEFAULT_BODY_BYTES_MAX + 1)
    count = await command_count(session, api_node)

    reply = await send(
        session,
        "POST",
        api_node.url + "/commands",
        body=body if framing == "content-length" else chunks(body),
        headers={"Content-Type": JSON, "Idempotency-Key": unique("large")},
    )

    assert_error(reply, 413, "payload_too_large")
    assert await command_count(session, api_node) == count


async def test_body_at_default_limit_accepted(
    api_node: NodeProcess, session: aiohttp.ClientSession
) -> None:
    """A body of exactly 1 MiB is accepted."""
    reply = await send(
        session,
        "POST",
        api_node.url + "/commands",
        body=padded_body(DEFAULT_BODY_BYTES_MAX),
        headers={"Content-Type": JSON, "Idempotency-Key": unique("at-limit")},
    )

    assert reply.status == 201, reply.body


async def test_body_limit_flag(
    guarded_node: NodeProcess, session: aiohttp.ClientSession
) -> None:
    """--body-bytes-max sets the limit: one byte over it gets 413, at it 201."""
    url = guarded_node.url + "/commands"
    over_limit = padded_body(GUARDED_BODY_BYTES_MAX + 1)
    at_limit = padded_body(GUARDED_BODY_BYTES_MAX)

    over_reply = await send(
        session, "POST", url, body=over_limit, headers=authorized(unique("over"))
    )
    at_reply = await send(
        session, "POST", url, body=at_limit, headers=authorized(unique("at"))
    )

    error = assert_error(over_reply, 413, "payload_too_large")
    assert str(GUARDED_BODY_BYTES_MAX) in error["message"]
    assert at_reply.status == 201, at_reply.body


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",
        "application/xml",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/octet-stream",
    ],
)
async def test_unsupported_content_type(
    api_node: NodeProcess, session: aiohttp.ClientSession, content_type: str
) -> None:
    """A Content-Type other than JSON or msgpack gets 415."""
    count = await command_count(session, api_node)

    reply = await send(
        session,
        "POST",
        api_node.url + "/commands",
        body=json.dumps(open_command(unique("acct"))).encode(),
        headers={"Content-Type": content_type, "Idempotency-Key": unique("media")},
    )

    assert_error(reply, 415, "unsupported_media_type")
    assert await command_count(session, api_node) == count


BAD_AUTHORIZATIONS = {
    "missing": None,
    "wrong-token": "Bearer wrong",
    "no-scheme": TOKEN,
    "basic-scheme": "Basic c2VjcmV0",
    "token-prefix": f"Bearer {TOKEN[:-1]}",
    "token-longer": f"Bearer {TOKEN}x",
}


@pytest.mark.parametrize(
    "authorization", BAD_AUTHORIZATIONS.values(), ids=BAD_AUTHORIZATIONS.keys()
)
async def test_bad_token_rejected(
    guarded_node: NodeProcess, session: aiohttp.ClientSession, authorization: str | None
) -> None:
    """A node with a token returns 401 for a request without that bearer token."""
    key = unique("auth")
    headers = {"Content-Type": JSON, "Idempotency-Key": key}
    if authorization is not None:
        headers["Authorization"] = authorization

    reply = await send(
        session,
        "POST",
        guarded_node.url + "/commands",
        body=json.dumps(open_command(unique("acct"))).encode(),
        headers=headers,
    )
    stored = await get(session, guarded_node, path_of(key), **authorized())

    assert_error(reply, 401, "unauthorized")
    assert "Bearer" in reply.headers.get("WWW-Authenticate", "")
    assert stored.status == 404, stored.body


@pytest.mark.parametrize("path", ["/status", "/metrics", "/commands/x", "/queries/q"])
async def test_reads_need_token(
    guarded_node: NodeProcess, session: aiohttp.ClientSession, path: str
) -> None:
    """Reads other than /healthz also need the token when auth is on."""
    reply = await get(session, guarded_node, path)

    assert_error(reply, 401, "unauthorized")


async def test_right_token_accepted(
    guarded_node: NodeProcess, session: aiohttp.ClientSession
) -> None:
    """The right bearer token gets a command recorded."""
    reply = await send(
        session,
        "POST",
        guarded_node.url + "/commands",
        body=json.dumps(open_command(unique("acct"))).encode(),
        headers=authorized(unique("auth-ok")),
    )

    assert reply.status == 201, reply.body


async def test_healthz_needs_no_token(
    guarded_node: NodeProcess, session: aiohttp.ClientSession
) -> None:
    """/healthz returns 200 without a token on a node that has one."""
    reply = await get(session, guarded_node, "/healthz")

    assert reply.status == 200, reply.body


# POST /commands: over the node's limits


async def hold_request(
    node: NodeProcess,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """Send a request's headers and part of its body, so the node keeps it in flight.

    Return the connection and the rest of the body, to send later.
    """
    body = json.dumps(open_command(unique("held"))).encode()
    head = command_head(node.port, unique("held"), len(body))
    reader, writer = await raw_request("127.0.0.1", node.port, head + body[:10])
    return reader, writer, body[10:]


async def poll_until_overloaded(
    session: aiohttp.ClientSession, node: NodeProcess
) -> Reply:
    """GET /status until it gets 503, a bounded number of times."""
    reply = await get(session, node, "/status")
    for _ in range(POLL_ATTEMPTS_MAX):
        if reply.status == 503:
            break
        await asyncio.sleep(POLL_INTERVAL_S)
        reply = await get(session, node, "/status")
    return reply


def assert_overloaded(reply: Reply) -> None:
    assert_error(reply, 503, "overloaded")
    retry_after = reply.headers.get("Retry-After", "")
    assert retry_after.isdigit(), reply.headers
    assert int(retry_after) >= 1


async def test_requests_over_limit(
    node_factory: Callable[..., NodeProcess], session: aiohttp.ClientSession
) -> None:
    """With --requests-max 1, a second request while one is in flight gets 503."""
    node = node_factory(extra_args=("--requests-max", "1"))
    reader, writer, rest = await hold_request(node)

    overloaded = await poll_until_overloaded(session, node)
    health = await get(session, node, "/healthz")
    writer.write(rest)
    await writer.drain()
    held_response = await asyncio.wait_for(reader.read(), timeout=10)
    writer.close()
    await writer.wait_closed()
    after = await get(session, node, "/status")

    assert_overloaded(overloaded)
    assert health.status == 200, health.body
    assert held_response.startswith(b"HTTP/1.1 201"), held_response[:200]
    assert after.status == 200, after.body


async def test_connections_over_limit(
    node_factory: Callable[..., NodeProcess],
) -> None:
    """With --connections-max 1 and that connection busy with a request, a
    request on a second connection gets 503 and its connection is closed."""
    node = node_factory(extra_args=("--connections-max", "1"))
    host, port = node.url.removeprefix("http://").split(":")
    busy = await raw_request(
        host,
        int(port),
        b"POST /commands HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Idempotency-Key: slow\r\nContent-Length: 100\r\n\r\n{",
    )
    try:
        await asyncio.sleep(0.2)  # the node reads the headers and waits
        reader, writer = await raw_request(
            host, int(port), b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        reply = await asyncio.wait_for(reader.read(4096), timeout=10)
        after_reply = await asyncio.wait_for(reader.read(4096), timeout=10)
        writer.close()
    finally:
        busy[1].close()
    assert reply.startswith(b"HTTP/1.1 503"), reply[:100]
    assert b"overloaded" in reply
    assert b"Connection: close" in reply
    assert after_reply == b""


async def test_idle_connections_make_room(
    node_factory: Callable[..., NodeProcess],
) -> None:
    """Connections that sent no request do not block others: over the
    limit, the node closes the oldest idle ones and serves the request."""
    node = node_factory(extra_args=("--connections-max", "2"))
    host, port = node.url.removeprefix("http://").split(":")
    idle = [await asyncio.open_connection(host, int(port)) for _ in range(3)]
    try:
        await asyncio.sleep(0.2)  # the node accepts all three
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            served = await get(session, node, "/status")
        oldest = await asyncio.wait_for(idle[0][0].read(4096), timeout=10)
    finally:
        for _reader, writer in idle:
            writer.close()
    assert served.status == 200, served.body
    assert oldest == b""


async def test_idle_timeout_closes_connections(
    node_factory: Callable[..., NodeProcess],
) -> None:
    """A connection that never sends a request, and one idle after its
    response, are closed after --idle-timeout-s, not kept open."""
    timeout_s = 1.0
    node = node_factory(extra_args=("--idle-timeout-s", str(timeout_s)))
    host, port = node.url.removeprefix("http://").split(":")
    silent_reader, silent_writer = await asyncio.open_connection(host, int(port))
    used_reader, used_writer = await asyncio.open_connection(host, int(port))
    try:
        used_writer.write(f"GET /healthz HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        await used_writer.drain()
        opened_at = time.monotonic()
        silent = await asyncio.wait_for(silent_reader.read(4096), timeout=10)
        silent_open_s = time.monotonic() - opened_at
        response = await asyncio.wait_for(used_reader.read(4096), timeout=10)
        after_response = await asyncio.wait_for(used_reader.read(4096), timeout=10)
        used_open_s = time.monotonic() - opened_at
    finally:
        silent_writer.close()
        used_writer.close()
    assert silent == b""
    assert timeout_s * 0.5 < silent_open_s < timeout_s + 3
    assert response.startswith(b"HTTP/1.1 200"), response[:100]
    assert after_response == b""
    assert used_open_s < timeout_s + 3


async def read_head_and_body(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """Read one response with a Content-Length, without waiting for the
    connection to close."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
    length = int(re.search(rb"Content-Length: (\d+)", head, re.I)[1])  # type: ignore[index]
    return head, await asyncio.wait_for(reader.readexactly(length), timeout=10)


async def test_stalled_body_gets_408(
    node_factory: Callable[..., NodeProcess], session: aiohttp.ClientSession
) -> None:
    """A body that stops arriving for --body-timeout-s gets 408 and records
    nothing, with a Content-Length or chunked. A body that keeps arriving,
    however slowly, is not cut off."""
    timeout_s = 1.0
    node = node_factory(extra_args=("--body-timeout-s", str(timeout_s)))
    body = json.dumps(open_command(unique("slow"))).encode()
    keys = {name: unique(name) for name in ("stalled", "chunked", "trickled")}
    chunked_head = command_head(node.port, keys["chunked"], 0).replace(
        b"Content-Length: 0", b"Transfer-Encoding: chunked"
    )
    stalled = await raw_request(
        "127.0.0.1",
        node.port,
        command_head(node.port, keys["stalled"], len(body)) + body[:7],
    )
    chunked = await raw_request(
        "127.0.0.1", node.port, chunked_head + b"7\r\n" + body[:7] + b"\r\n"
    )
    trickled = await raw_request(
        "127.0.0.1", node.port, command_head(node.port, keys["trickled"], len(body))
    )
    started = time.monotonic()
    try:
        for index in range(len(body)):
            trickled[1].write(body[index : index + 1])
            await asyncio.sleep(timeout_s * 2.5 / len(body))
        replies = {
            name: await read_head_and_body(connection[0])
            for name, connection in zip(keys, (stalled, chunked, trickled), strict=True)
        }
        elapsed_s = time.monotonic() - started
        # aiohttp would keep a 408's connection open for its 10 s lingering
        # time; the node closes it after the response.
        after_408 = [
            await asyncio.wait_for(reader.read(), timeout=5)
            for reader, _writer in (stalled, chunked)
        ]
    finally:
        for _reader, writer in (stalled, chunked, trickled):
            writer.close()

    for name in ("stalled", "chunked"):
        head, error = replies[name]
        assert head.startswith(b"HTTP/1.1 408 "), head
        assert b"Connection: close" in head, head
        assert json.loads(error)["error"]["code"] == "body_timeout", error
        missing = await get(session, node, "/commands/" + keys[name])
        assert missing.status == 404, missing.body
    assert replies["trickled"][0].startswith(b"HTTP/1.1 201 "), replies["trickled"]
    assert elapsed_s < timeout_s * 2.5 + 4
    assert after_408 == [b"", b""]


# POST /commands: which error wins


async def test_401_beats_413(
    guarded_node: NodeProcess, session: aiohttp.ClientSession
) -> None:
    """A body over the limit without a token gets 401."""
    reply = await send(
        session,
        "POST",
        guarded_node.url + "/commands",
        body=padded_body(GUARDED_BODY_BYTES_MAX * 2),
        headers={"Content-Type": JSON, "Idempotency-Key": unique("both")},
    )

    assert_error(reply, 401, "unauthorized")


async def test_413_beats_415(
    guarded_node: NodeProcess, session: aiohttp.ClientSession
) -> None:
    """A body over the limit with an unsupported Content-Type gets 413."""
    reply = await send(
        session,
        "POST",
        guarded_node.url + "/commands",
        body=padded_body(GUARDED_BODY_BYTES_MAX * 2),
        headers=authorized(unique("both"), **{"Content-Type": "text/plain"}),
    )

    assert_error(reply, 413, "payload_too_large")


LATE_400_CASES: dict[str, tuple[bytes, str | None]] = {
    "key-missing": (json.dumps(open_command("x")).encode(), None),
    "key-with-space": (json.dumps(open_command("x")).encode(), "a b"),
    "body-empty": (b"", "media-empty"),
    "body-malformed": (b'{"type": ', "media-malformed"),
}


@pytest.mark.parametrize(
    ("body", "key"), LATE_400_CASES.values(), ids=LATE_400_CASES.keys()
)
async def test_415_beats_400(
    api_node: NodeProcess,
    session: aiohttp.ClientSession,
    body: bytes,
    key: str | None,
) -> None:
    """A bad key or body with an unsupported Content-Type gets 415."""
    headers = {"Content-Type": "text/plain"}
    if key is not None:
        headers["Idempotency-Key"] = key

    reply = await send(
        session, "POST", api_node.url + "/commands", body=body, headers=headers
    )

    assert_error(reply, 415, "unsupported_media_type")


EARLY_400_CASES: dict[str, tuple[dict[str, Any], str | None, str]] = {
    "key-missing-unknown-type": (
        {"type": "ledger.refund", "payload": {}},
        None,
        "invalid_idempotency_key",
    ),
    "key-too-long-invalid-payload": (
        {"type": "ledger.deposit", "payload": {"account": "a", "amount": 0}},
        "k" * 256,
        "invalid_idempotency_key",
    ),
    "payload-list-unknown-type": (
        {"type": "ledger.refund", "payload": []},
        "early-payload-list",
        "malformed_body",
    ),
    "missing-payload-unknown-type": (
        {"type": "ledger.refund"},
        "early-missing-payload",
        "malformed_body",
    ),
}


@by_encoding
@pytest.mark.parametrize(
    ("command", "key", "code"), EARLY_400_CASES.values(), ids=EARLY_400_CASES.keys()
)
async def test_400_beats_422(
    api_node: NodeProcess,
    session: aiohttp.ClientSession,
    encoding: Encoding,
    command: dict[str, Any],
    key: str | None,
    code: str,
) -> None:
    """A request with both a 400 and a 422 fault gets 400."""
    reply = await post_command(session, api_node, command, key=key, encoding=encoding)

    assert_error(reply, 400, code)


# response encodings

ACCEPT_CASES = {
    "none": (None, JSON),
    "json": (JSON, JSON),
    "msgpack": (MSGPACK, MSGPACK),
    "x-msgpack": ("application/x-msgpack", MSGPACK),
    "any": ("*/*", JSON),
    "msgpack-preferred": (f"{JSON};q=0.5, {MSGPACK}", MSGPACK),
    "json-preferred": (f"{MSGPACK};q=0.2, {JSON};q=0.9", JSON),
}


@pytest.mark.parametrize(
    ("accept", "expected"), ACCEPT_CASES.values(), ids=ACCEPT_CASES.keys()
)
async def test_accept_chooses_encoding(
    api_node: NodeProcess,
    session: aiohttp.ClientSession,
    accept: str | None,
    expected: str,
) -> None:
    """The response is encoded as the Accept header prefers, JSON by default."""
    headers = {} if accept is None else {"Accept": accept}

    found = await get(session, api_node, "/commands/absent-accept", **headers)

    assert found.content_type == expected
    assert_error(found, 404, "not_found")


# POST /commands/batch


def batch_item(key: str, command: dict[str, Any]) -> dict[str, Any]:
    return {"id": key, **command}


@pytest.mark.parametrize(
    "encoding", ENCODINGS[:2], ids=[encoding.name for encoding in ENCODINGS[:2]]
)
async def test_batch_mixed_items(
    api_node: NodeProcess, session: aiohttp.ClientSession, encoding: Encoding
) -> None:
    """A batch returns each item's status and body, in order, as if sent alone."""
    account = unique("batch")
    keys = [unique(f"item{index}") for index in range(6)]
    items = [
        batch_item(keys[0], open_command(account)),
        batch_item(keys[1], {"type": "ledger.refund", "payload": {}}),
        batch_item(keys[2], deposit_command(account, 0)),
        {"type": "ledger.deposit", "payload": {"account": account, "amount": 1}},
        batch_item(keys[4], deposit_command(account, 40)),
        batch_item(keys[5], {"type": "ledger.deposit", "payload": "forty"}),
    ]

    reply = await send(
        session,
        "POST",
        api_node.url + "/commands/batch",
        body=encoding.pack(items),
        headers=encoding.headers(),
    )
    balance = await get(session, api_node, f"/queries/ledger.balance?account={account}")

    assert reply.status == 200, reply.body
    results = reply.body["results"]
    assert [result["status"] for result in results] == [201, 422, 422, 400, 201, 400]
    assert results[0]["body"]["id"] == keys[0]
    assert results[0]["body"]["outcome"]["status"] == "applied"
    assert results[1]["body"]["error"]["code"] == "unknown_command_type"
    assert results[2]["body"]["error"]["field"] == "amount"
    assert results[3]["body"]["error"]["code"] == "invalid_idempotency_key"
    assert results[4]["body"]["id"] == keys[4]
    assert results[4]["body"]["outcome"]["result"]["balance"] == 40
    assert results[5]["body"]["error"]["code"] == "malformed_body"
    for index in (0, 4):
        stored = await get(session, api_node, path_of(keys[index]))
        assert stored.status == 200, f"item {index}: {stored.body}"
        assert stored.body == results[index]["body"], f"item {index}"
    for index in (1, 2, 5):
        absent = await get(session, api_node, path_of(keys[index]))
        assert absent.status == 404, f"item {index}: {absent.body}"
    assert balance.body["result"]["balance"] == 40


async def test_batch_over_item_limit(
    api_node: NodeProcess, session: aiohttp.ClientSession
) -> None:
    """A batch of 1,001 items gets 413 and records none of them."""
    prefix = unique("over")
    items = [
        batch_item(f"{prefix}-{index}", open_command(f"{prefix}-{index}"))
        for index in range(BATCH_ITEMS_MAX + 1)
    ]
    count = await command_count(session, api_node)

    reply = await send(
        session,
        "POST",
        api_node.url + "/commands/batch",
        body=json.dumps(items).encode(),
        headers={"Content-Type": JSON},
    )

    assert_error(reply, 413, "payload_too_large")
    assert await command_count(session, api_node) == count
    assert (await get(session, api_node, path_of(f"{prefix}-0"))).status == 404


async def test_batch_at_item_limit(
    api_node: NodeProcess, session: aiohttp.ClientSession
) -> None:
    """A batch of exactly 1,000 items records every one."""
    prefix = unique("limit")
    items = [
        batch_item(f"{prefix}-{index}", open_command(f"{prefix}-{index}"))
        for index in range(BATCH_ITEMS_MAX)
    ]
    count = await command_count(session, api_node)

    reply = await send(
        session,
        "POST",
        api_node.url + "/commands/batch",
        body=json.dumps(items).encode(),
        headers={"Content-Type": JSON},
    )

    assert reply.status == 200, reply.body
    statuses = {result["status"] for result in reply.body["results"]}
    assert statuses == {201}
    assert await command_count(session, api_node) == count + BATCH_ITEMS_MAX


NOT_ARRAYS_OF_MAPS: dict[str, Callable[[str], Any]] = {
    "map": lambda key: batch_item(key, open_command(key)),
    "string": lambda key: key,
    "null": lambda key: None,
    "number": lambda key: 1,
    "array-with-number": lambda key: [batch_item(key, open_command(key)), 1],
    "array-with-array": lambda key: [batch_item(key, open_command(key)), [key]],
    "array-with-null": lambda key: [batch_item(key, open_command(key)), None],
}


@pytest.mark.parametrize(
    "make_body", NOT_ARRAYS_OF_MAPS.values(), ids=NOT_ARRAYS_OF_MAPS.keys()
)
async def test_batch_not_array_of_maps(
    api_node: NodeProcess,
    session: aiohttp.ClientSession,
    make_body: Callable[[str], Any],
) -> None:
    """A batch body that is not an array of maps gets 400 and records nothing."""
    key = unique("shape")
    count = await command_count(session, api_node)

    reply = await send(
        session,
        "POST",
        api_node.url + "/commands/batch",
        body=json.dumps(make_body(key)).encode(),
        headers={"Content-Type": JSON},
    )

    assert_error(reply, 400, "malformed_body")
    assert await command_count(session, api_node) == count
    assert (await get(session, api_node, path_of(key))).status == 404


async def test_batch_duplicate_ids(
    api_node: NodeProcess, session: aiohttp.ClientSession
) -> None:
    """Two items with one id in a batch: the first gets 201, the second 200."""
    key, command = unique("twice"), open_command(unique("acct"))
    count = await command_count(session, api_node)

    reply = await send(
        session,
        "POST",
        api_node.url + "/commands/batch",
        body=json.dumps([batch_item(key, command), batch_item(key, command)]).encode(),
        headers={"Content-Type": JSON},
    )

    assert reply.status == 200, reply.body
    first, second = reply.body["results"]
    assert first["status"] == 201
    assert second["status"] == 200
    assert second["body"] == first["body"]
    assert await command_count(session, api_node) == count + 1


async def test_batch_duplicate_ids_other_payload(
    api_node: NodeProcess, session: aiohttp.ClientSession
) -> None:
    """A second item reusing an id with another payload gets 422 in its slot."""
    key, account = unique("twice"), unique("acct")
    items = [
        batch_item(key, open_command(account)),
        batch_item(key, open_command(account, currency="USD")),
    ]

    reply = await send(
        session,
        "POST",
        api_node.url + "/commands/batch",
        body=json.dumps(items).encode(),
        headers={"Content-Type": JSON},
    )

    assert reply.status == 200, reply.body
    first, second = reply.body["results"]
    assert first["status"] == 201
    assert second["status"] == 422
    assert second["body"]["error"]["code"] == "idempotency_key_reused"
    assert key in second["body"]["error"]["message"]


# GET /commands/{id}

ODD_IDS = ["a/b", "100%", "why?", "tag#1", "a%2Fb", "..%2F?x#y/%", "/lead", "trail/"]


async def test_get_percent_encoded_ids(
    api_node: NodeProcess, session: aiohttp.ClientSession
) -> None:
    """IDs with '/', '%', '?' and '#' round-trip through a percent-encoded path."""
    prefix = unique("odd")
    for suffix in ODD_IDS:
        key = f"{prefix}{suffix}"
        created = await post_command(
            session, api_node, open_command(unique("acct")), key=key
        )
        assert created.status == 201, f"{key!r}: {created.body}"
        assert created.headers["Location"] == path_of(key), key

        found = await get(session, api_node, path_of(key))

        assert found.status == 200, f"{key!r}: {found.body}"
        assert found.body == created.body, key


@pytest.mark.parametrize("key", [".", ".."])
async def test_dot_ids_get_followable_location(
    api_node: NodeProcess, session: aiohttp.ClientSession, key: str
) -> None:
    """The IDs '.' and '..' get a Location with percent-encoded dots, which a
    client resolving the URL keeps, and which leads to the command."""
    created = await post_command(
        session, api_node, open_command(unique("acct")), key=key
    )
    assert created.status == 201, created.body
    location = created.headers["Location"]

    found = await get(session, api_node, location)

    assert location == "/commands/" + "%2E" * len(key)
    assert found.status == 200, found.body
    assert found.body["id"] == key


@pytest.mark.parametrize(
    "command_id", ["absent", "absent/with/slashes", "absent%", "absent?q", "absent#f"]
)
async def test_get_absent_command(
    api_node: NodeProcess, session: aiohttp.ClientSession, command_id: str
) -> None:
    """GET of an ID that is not stored gets 404."""
    reply = await get(session, api_node, path_of(unique(command_id)))

    assert_error(reply, 404, "not_found")


# GET /queries/{name}


async def test_balance_query(
    api_node: NodeProcess, session: aiohttp.ClientSession
) -> None:
    """ledger.balance returns the account, its currency and its balance."""
    account = unique("balance")
    await post_command(session, api_node, open_command(account, "JPY"), key=unique("o"))
    await post_command(
        session, api_node, deposit_command(account, 250), key=unique("d")
    )

    reply = await get(session, api_node, f"/queries/ledger.balance?account={account}")

    assert reply.status == 200, reply.body
    assert reply.body == {
        "result": {"account": account, "currency": "JPY", "balance": 250}
    }


def fullwidth(text: str) -> str:
    return "".join(
        chr(ord(char) + 0xFEE0) if "!" <= char <= "~" else char for char in text
    )


async def test_lookup_folds_variants(
    api_node: NodeProcess, session: aiohttp.ClientSession
) -> None:
    """users.lookup finds a registration by any case or compatibility variant."""
    name = "fiona" + uuid.uuid4().hex[:8]
    registered = await post_command(
        session,
        api_node,
        {"type": "users.register", "payload": {"username": name, "display_name": "F"}},
        key=unique("register"),
    )
    variants = {
        "same": name,
        "upper": name.upper(),
        "title": name.title(),
        "fullwidth": fullwidth(name),
        "ligature": "\ufb01" + name[2:],
        "zero-width-space": name[:3] + "\u200b" + name[3:],
    }

    assert registered.status == 201, registered.body
    for label, variant in variants.items():
        query = urllib.parse.urlencode({"username": variant})
        reply = await get(session, api_node, f"/queries/users.lookup?{query}")
        assert reply.status == 200, f"{label}: {reply.body}"
        assert reply.body["result"]["username"] == name, label


BAD_QUERIES: dict[str, tuple[str, int, str]] = {
    "balance-no-args": ("/queries/ledger.balance", 400, "invalid_argument"),
    "balance-empty-account": (
        "/queries/ledger.balance?account=",
        400,
        "invalid_argument",
    ),
    "balance-other-arg": ("/queries/ledger.balance?acct=a", 400, "invalid_argument"),
    "balance-unknown-account": (
        "/queries/ledger.balance?account=never-opened",
        404,
        "not_found",
    ),
    "lookup-no-args": ("/queries/users.lookup", 400, "invalid_argument"),
    "lookup-space": ("/queries/users.lookup?username=a%20b", 400, "invalid_argument"),
    "lookup-only-ignorable": (
        "/queries/users.lookup?username=%E2%80%8B",
        400,
        "invalid_argument",
    ),
    "lookup-unknown-user": (
        "/queries/users.lookup?username=never-registered",
        404,
        "not_found",
    ),
    "unknown-query": ("/queries/ledger.history?account=a", 404, "not_found"),
    "balance-account-twice": (
        "/queries/ledger.balance?account=a&account=b",
        400,
        "invalid_argument",
    ),
    "replicate-after-twice": ("/replicate?after=1&after=2", 400, "invalid_argument"),
    "id-too-long": ("/commands/" + "k" * 321, 400, "invalid_argument"),
    "id-non-ascii": ("/commands/cl%C3%A9", 400, "invalid_argument"),
    "id-with-space": ("/commands/a%20b", 400, "invalid_argument"),
}


async def test_unknown_path_lists_endpoints(
    api_node: NodeProcess, session: aiohttp.ClientSession
) -> None:
    """A 404 for an unknown path lists the endpoints, and a 405 names the
    methods the path allows."""
    missing = await get(session, api_node, "/command")
    wrong_method = await get(session, api_node, "/commands")

    assert_error(missing, 404, "not_found")
    assert "POST /commands" in missing.body["error"]["message"]
    assert_error(wrong_method, 405, "method_not_allowed")
    assert wrong_method.body["error"]["message"] == (
        "GET is not allowed on /commands; use POST"
    )


@pytest.mark.parametrize(
    ("path", "status", "code"), BAD_QUERIES.values(), ids=BAD_QUERIES.keys()
)
async def test_bad_query(
    api_node: NodeProcess,
    session: aiohttp.ClientSession,
    path: str,
    status: int,
    code: str,
) -> None:
    """A missing, invalid or repeated query argument gets 400, and a missing
    record 404."""
    reply = await get(session, api_node, path)

    assert_error(reply, status, code)


# GET /status, /healthz and /metrics

HEX_DIGEST = re.compile(r"[0-9a-f]+")


async def test_status_fields(
    api_node: NodeProcess, session: aiohttp.ClientSession
) -> None:
    """/status has the node ID, counts, both digests, peers and pending types."""
    health = await get(session, api_node, "/healthz")

    reply = await get(session, api_node, "/status")

    assert reply.status == 200, reply.body
    assert reply.content_type == JSON
    status = reply.body
    assert status["node"] == health.body["node"]
    assert isinstance(status["node"], str)
    assert status["node"]
    assert type(status["commands"]) is int
    assert type(status["applied"]) is int
    assert status["applied"] <= status["commands"]
    assert set(status["digest"]) >= {"state", "log"}
    assert HEX_DIGEST.fullmatch(status["digest"]["state"]), status["digest"]
    assert HEX_DIGEST.fullmatch(status["digest"]["log"]), status["digest"]
    assert isinstance(status["peers"], list)
    assert isinstance(status["pending_types"], dict)


async def test_status_counts_commands(
    api_node: NodeProcess, session: aiohttp.ClientSession
) -> None:
    """A new command adds one to `commands` and `applied`, and a replay adds none."""
    key, command = unique("count"), open_command(unique("acct"))
    before = (await get(session, api_node, "/status")).body

    await post_command(session, api_node, command, key=key)
    middle = (await get(session, api_node, "/status")).body
    await post_command(session, api_node, command, key=key)
    after = (await get(session, api_node, "/status")).body

    assert middle["commands"] == before["commands"] + 1
    assert middle["applied"] == before["applied"] + 1
    assert middle["digest"]["log"] != before["digest"]["log"]
    assert after["commands"] == middle["commands"]
    assert after["applied"] == middle["applied"]
    assert after["digest"] == middle["digest"]


async def test_healthz(api_node: NodeProcess, session: aiohttp.ClientSession) -> None:
    """/healthz returns 200 on a serving node."""
    reply = await get(session, api_node, "/healthz")

    assert reply.status == 200, reply.body


async def test_metrics_prometheus_text(
    api_node: NodeProcess, session: aiohttp.ClientSession
) -> None:
    """/metrics is Prometheus text exposition with cmdlog_ metrics."""
    await get(session, api_node, "/healthz")

    async with session.get(api_node.url + "/metrics") as response:
        text = await response.text()
        content_type = response.headers["Content-Type"]

    assert response.status == 200
    assert content_type.startswith("text/plain"), content_type
    assert re.search(r"^# TYPE cmdlog_\w+ (counter|gauge|histogram)$", text, re.M)
    assert re.search(r"^cmdlog_commands \d", text, re.M), text[:500]
    assert re.search(r"^cmdlog_http_requests_total\{", text, re.M), text[:500]
    assert re.search(r"^cmdlog_store_runs 1\.0$", text, re.M), text[:500]
    filters = re.search(r"^cmdlog_key_filter_bytes (\S+)$", text, re.M)
    # One first layer per tree (IDs, ledger, users): 64 Ki keys at 2 bytes.
    assert filters is not None and float(filters.group(1)) == 3 * 2 * 65_536


async def test_metrics_unknown_method_label(
    api_node: NodeProcess, session: aiohttp.ClientSession
) -> None:
    """Requests are counted by method, route and status; other methods as 'other'."""
    for _ in range(2):
        await get(session, api_node, "/healthz")
    async with session.request("PROPFIND", api_node.url + "/healthz") as response:
        propfind_status = response.status

    async with session.get(api_node.url + "/metrics") as response:
        text = await response.text()

    healthz = re.search(
        r'^cmdlog_http_requests_total\{method="GET",route="/healthz",status="200"\} '
        r"(\S+)$",
        text,
        re.M,
    )
    assert healthz is not None, text[:2000]
    assert float(healthz.group(1)) >= 2
    assert propfind_status == 405
    assert re.search(r'method="other",route="[^"]+",status="405"', text), text[:2000]
    assert "PROPFIND" not in text


def command_counts(text: str) -> dict[str, float]:
    """Read `cmdlog_client_commands_total` by result from /metrics text."""
    found = re.findall(
        r'^cmdlog_client_commands_total\{result="(\w+)"\} (\S+)$', text, re.M
    )
    return {result: float(value) for result, value in found}


async def post_json_batch(
    session: aiohttp.ClientSession, node: NodeProcess, items: list[dict[str, Any]]
) -> Reply:
    return await send(
        session,
        "POST",
        node.url + "/commands/batch",
        body=JSON_ENCODING.pack(items),
        headers=JSON_ENCODING.headers(),
    )


async def node_command_counts(
    session: aiohttp.ClientSession, node: NodeProcess
) -> dict[str, float]:
    async with session.get(node.url + "/metrics") as response:
        return command_counts(await response.text())


async def test_metrics_count_batch_results(
    api_node: NodeProcess, session: aiohttp.ClientSession
) -> None:
    """A batch counts each item once under its result."""
    account = unique("counted")
    keys = [unique(f"counted{index}") for index in range(3)]
    await post_json_batch(
        session, api_node, [batch_item(keys[0], open_command(account))]
    )
    before = await node_command_counts(session, api_node)
    items = [
        batch_item(keys[0], open_command(account)),
        batch_item(keys[1], deposit_command(account, 5)),
        batch_item(keys[2], deposit_command(account, 6)),
        batch_item(keys[1], deposit_command(account, 7)),
        batch_item(unique("bad"), {"type": "ledger.deposit", "payload": "five"}),
    ]

    reply = await post_json_batch(session, api_node, items)
    after = await node_command_counts(session, api_node)

    assert reply.status == 200, reply.body
    assert [item["status"] for item in reply.body["results"]] == [
        200, 201, 201, 422, 400,
    ]  # fmt: skip
    added = {result: after[result] - before.get(result, 0.0) for result in after}
    assert added == {
        "created": 2,
        "replayed": 1,
        "key_reused": 1,
        "invalid": 1,
        "redirected": 0,
    }
