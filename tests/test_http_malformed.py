"""Tests that malformed requests get a 4xx error and record nothing.

Malformed bodies (the cases of tests.malformed_corpus) reach cmdlog.http_api;
requests that aiohttp's HTTP parser rejects reach cmdlog.http_protocol. All
cases run against one node, which must keep serving after each of them.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import msgpack
import pytest

from tests.malformed_corpus import CASES, MalformedCase
from tests.nodes import NodeProcess
from tests.raw_http import (
    REPLY_TIMEOUT_S,
    command_head,
    raw_exchange,
    raw_request,
    read_reply,
)

JSON = "application/json"
MSGPACK = "application/msgpack"


@pytest.fixture(scope="module")
def corpus_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """One node with default limits, shared by every case of the corpus."""
    node = NodeProcess(tmp_path_factory.mktemp("malformed") / "node").start()
    yield node
    if node.is_running():
        node.kill()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as client:
        yield client


def decode_body(content_type: str, raw: bytes) -> Any:
    if content_type == MSGPACK:
        return msgpack.unpackb(raw, raw=False)
    if content_type == JSON:
        return json.loads(raw)
    return raw.decode("utf-8", errors="replace")


async def command_count(session: aiohttp.ClientSession, node: NodeProcess) -> int:
    async with session.get(node.url + "/status") as response:
        assert response.status == 200
        status = await response.json()
    count: int = status["commands"]
    return count


def test_corpus_size() -> None:
    """The corpus has at least 50 cases, each with its own name."""
    names = [case.name for case in CASES]

    assert len(names) >= 50
    assert len(set(names)) == len(names)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
async def test_malformed_body_rejected(
    corpus_node: NodeProcess, session: aiohttp.ClientSession, case: MalformedCase
) -> None:
    """A malformed body gets a 4xx error, records nothing and leaves the node up."""
    headers = {"Idempotency-Key": f"corpus-{case.name}", **case.headers}
    if case.content_type is not None:
        headers["Content-Type"] = case.content_type
    count = await command_count(session, corpus_node)

    async with session.post(
        corpus_node.url + case.path,
        data=io.BytesIO(case.body),
        headers=headers,
        skip_auto_headers=("Content-Type",),
    ) as response:
        status = response.status
        body = decode_body(response.content_type, await response.read())
    async with session.get(corpus_node.url + "/healthz") as health:
        health_status = health.status

    assert 400 <= status < 500, body
    assert isinstance(body, dict), body
    assert isinstance(body["error"]["code"], str), body
    assert body["error"]["message"].strip(), body
    assert await command_count(session, corpus_node) == count
    assert health_status == 200


# Requests that aiohttp's parser rejects before any handler runs: the bytes
# sent, the expected error code, and a part of aiohttp's description that the
# message must repeat. Bodies are valid commands, so a request that got past
# the parser would record one.
_OPEN_BODY = json.dumps(
    {"type": "ledger.open", "payload": {"account": "unparsed", "currency": "EUR"}}
).encode()
_POST_HEAD = b"POST /commands HTTP/1.1\r\nHost: x\r\nIdempotency-Key: unparsed\r\n"
_CHUNKED_HEAD = _POST_HEAD + b"Transfer-Encoding: chunked\r\n\r\n"
_CHUNK_SIZE = b"%x" % len(_OPEN_BODY)
UNPARSABLE: dict[str, tuple[bytes, str, str]] = {
    "request-line-garbage": (b"GARBAGE\r\n\r\n", "malformed_request_line", "GARBAGE"),
    "method-invalid": (
        b"P(ST /commands HTTP/1.1\r\nHost: x\r\n\r\n",
        "malformed_request_line",
        "method",
    ),
    "version-invalid": (
        b"GET /status HTTP/9.Z\r\nHost: x\r\n\r\n",
        "malformed_request_line",
        "version",
    ),
    "line-ends-bare-lf": (
        b"GET /status HTTP/1.1\nHost: x\n\n",
        "malformed_request_line",
        "CRLF",
    ),
    "url-control-char": (
        b"GET /status\x01 HTTP/1.1\r\nHost: x\r\n\r\n",
        "invalid_url",
        "url",
    ),
    "header-without-colon": (
        _POST_HEAD + b"NoColonHere\r\n\r\n",
        "malformed_request",
        "NoColonHere",
    ),
    "header-value-nul": (
        _POST_HEAD + b"X-Note: a\x00b\r\n\r\n",
        "malformed_request",
        "header value",
    ),
    "header-old-websocket": (
        b"GET /status HTTP/1.1\r\nHost: x\r\nSec-WebSocket-Key1: 1\r\n\r\n",
        "invalid_header",
        "Sec-WebSocket-Key1",
    ),
    "header-too-long": (
        b"GET /status HTTP/1.1\r\nHost: x\r\nX-Note: " + b"a" * 9000 + b"\r\n\r\n",
        "line_too_long",
        "8190 bytes",
    ),
    "request-line-too-long": (
        b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        "line_too_long",
        "8190 bytes",
    ),
    "headers-too-many": (
        b"GET /status HTTP/1.1\r\nHost: x\r\n"
        + b"".join(b"X-Note-%d: a\r\n" % index for index in range(200))
        + b"\r\n",
        "malformed_request",
        "Too many headers",
    ),
    "content-length-not-number": (
        _POST_HEAD + b"Content-Length: 1e3\r\n\r\n" + _OPEN_BODY,
        "malformed_request",
        "Content-Length",
    ),
    "content-length-twice": (
        _POST_HEAD
        + b"Content-Length: %d\r\nContent-Length: %d\r\n\r\n"
        % (len(_OPEN_BODY), len(_OPEN_BODY) + 1)
        + _OPEN_BODY,
        "malformed_request",
        "Content-Length",
    ),
    "content-length-and-chunked": (
        _POST_HEAD
        + b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n" % len(_OPEN_BODY)
        + _CHUNK_SIZE
        + b"\r\n"
        + _OPEN_BODY
        + b"\r\n0\r\n\r\n",
        "malformed_request",
        "Transfer-Encoding",
    ),
    "chunk-size-not-hex": (
        _CHUNKED_HEAD + b"zz\r\n" + _OPEN_BODY + b"\r\n0\r\n\r\n",
        "malformed_request",
        "chunk size",
    ),
    "chunk-without-crlf": (
        _CHUNKED_HEAD + _CHUNK_SIZE + b"\r\n" + _OPEN_BODY + b"0\r\n\r\n",
        "malformed_request",
        "chunk",
    ),
}


# Request lines that name another HTTP version than 1.0 and 1.1. aiohttp's
# parser accepts these, and the error middleware rejects them.
_OPEN_HEAD = (
    b"Host: x\r\nIdempotency-Key: other-version\r\n"
    b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(_OPEN_BODY)
)
OTHER_VERSIONS: dict[str, tuple[bytes, str, str]] = {
    "version-missing": (
        b"POST /commands\r\n" + _OPEN_HEAD + _OPEN_BODY,
        "malformed_request_line",
        "no HTTP version",
    ),
    "version-0.9": (
        b"POST /commands HTTP/0.9\r\n" + _OPEN_HEAD + _OPEN_BODY,
        "malformed_request_line",
        "no HTTP version",
    ),
    "version-2.0": (
        b"POST /commands HTTP/2.0\r\n" + _OPEN_HEAD + _OPEN_BODY,
        "malformed_request_line",
        "HTTP/2.0",
    ),
}
REJECTED = {**UNPARSABLE, **OTHER_VERSIONS}


@pytest.mark.parametrize(
    ("request_bytes", "code", "reason"), REJECTED.values(), ids=REJECTED.keys()
)
async def test_unparsable_request_rejected(
    corpus_node: NodeProcess,
    session: aiohttp.ClientSession,
    request_bytes: bytes,
    code: str,
    reason: str,
) -> None:
    """A request that aiohttp's parser rejects gets a JSON 400 error, records
    nothing and leaves the node serving."""
    count = await command_count(session, corpus_node)

    reader, writer = await raw_request("127.0.0.1", corpus_node.port, request_bytes)
    try:
        reply = await read_reply(reader)
    finally:
        writer.close()
    async with session.get(corpus_node.url + "/healthz") as health:
        health_status = health.status

    assert reply.status == 400, reply
    assert reply.version == "HTTP/1.1", reply
    assert reply.headers.get("content-type") == JSON, reply
    body = json.loads(reply.body)
    assert list(body) == ["error"], body
    assert sorted(body["error"]) == ["code", "message"], body
    assert body["error"]["code"] == code, body
    assert reason.lower() in body["error"]["message"].lower(), body
    assert await command_count(session, corpus_node) == count
    assert health_status == 200


@pytest.mark.parametrize("line", [b"GET /status", b"GET /status HTTP/2.0"])
async def test_other_version_gets_http_1_1(
    corpus_node: NodeProcess, line: bytes
) -> None:
    """A request line with no version or another one gets an HTTP/1.1 status
    line, which any HTTP/1 client can read, and the connection closes."""
    reader, writer = await raw_request(
        "127.0.0.1", corpus_node.port, line + b"\r\nHost: x\r\n\r\n"
    )
    try:
        data = await asyncio.wait_for(reader.read(), timeout=REPLY_TIMEOUT_S)
    finally:
        writer.close()
    assert data.startswith(b"HTTP/1.1 400 "), data[:100]
    assert b"\r\nConnection: close\r\n" in data, data[:400]


@pytest.mark.parametrize("encoding", ["br", "zstd"])
async def test_parser_encoding_error_gets_http_1_1(
    corpus_node: NodeProcess, encoding: str
) -> None:
    """A body in br or zstd, which aiohttp's parser rejects while it reads
    the headers, gets 415 under an HTTP/1.1 status line, as any other error."""
    head = command_head(corpus_node.port, f"enc-{encoding}", len(_OPEN_BODY))
    head = head.replace(
        b"\r\n\r\n", f"\r\nContent-Encoding: {encoding}\r\n\r\n".encode()
    )
    reply = await raw_exchange("127.0.0.1", corpus_node.port, head + _OPEN_BODY)

    assert reply.status == 415, reply
    assert reply.version == "HTTP/1.1", reply
    assert json.loads(reply.body)["error"]["code"] == "unsupported_media_type"


@pytest.mark.parametrize("codings", ["gzip, chunked", "identity, chunked"])
async def test_transfer_coding_besides_chunked_rejected(
    corpus_node: NodeProcess, session: aiohttp.ClientSession, codings: str
) -> None:
    """A body with a transfer coding before chunked, which aiohttp's parser
    ignores, gets 501 and records nothing."""
    count = await command_count(session, corpus_node)
    head = (
        "POST /commands HTTP/1.1\r\nHost: x\r\n"
        f"Idempotency-Key: te-{uuid.uuid4().hex}\r\n"
        "Content-Type: application/json\r\n"
        f"Transfer-Encoding: {codings}\r\nConnection: close\r\n\r\n"
    ).encode()
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(_OPEN_BODY), _OPEN_BODY)
    reply = await raw_exchange("127.0.0.1", corpus_node.port, head + chunked)

    assert reply.status == 501, reply
    error = json.loads(reply.body)["error"]
    assert error["code"] == "unsupported_transfer_coding", error
    assert "chunked alone" in error["message"], error
    assert await command_count(session, corpus_node) == count


async def test_unparsable_request_logged(corpus_node: NodeProcess) -> None:
    """A request that the parser rejects is logged as one `request_malformed`
    event, without a traceback."""
    reader, writer = await raw_request("127.0.0.1", corpus_node.port, b"LOGGED\r\n\r\n")
    try:
        await read_reply(reader)
    finally:
        writer.close()

    lines = [
        json.loads(line)
        for line in corpus_node.log_text().splitlines()
        if "LOGGED" in line
    ]
    assert [line["event"] for line in lines] == ["request_malformed"], lines
    assert lines[0]["code"] == "malformed_request_line", lines
    assert "exception" not in lines[0], lines


async def request_statuses(
    session: aiohttp.ClientSession, node: NodeProcess, method: str, route: str
) -> Counter[str]:
    """Return the node's count of requests to `route` by status, from /metrics."""
    async with session.get(node.url + "/metrics") as response:
        text = await response.text()
    pattern = re.compile(
        rf'^cmdlog_http_requests_total\{{method="{method}",route="{re.escape(route)}",'
        r'status="(\d+)"\} ([0-9.e+]+)$',
        re.M,
    )
    return Counter(
        {status: int(float(value)) for status, value in pattern.findall(text)}
    )


async def test_unparsable_request_counted(
    corpus_node: NodeProcess, session: aiohttp.ClientSession
) -> None:
    """A request that the parser rejects is counted in /metrics, under the
    route "unparsed", as the requests that reach a route are."""
    before = await request_statuses(session, corpus_node, "other", "unparsed")
    reader, writer = await raw_request(
        "127.0.0.1", corpus_node.port, b"COUNTED\r\n\r\n"
    )
    try:
        await read_reply(reader)
    finally:
        writer.close()
    after = await request_statuses(session, corpus_node, "other", "unparsed")
    assert after - before == Counter({"400": 1})


async def test_body_cut_short_counts_as_400(
    corpus_node: NodeProcess, session: aiohttp.ClientSession
) -> None:
    """A client that closes its connection partway through a body gets a 400
    request, not a crash, and records nothing."""
    count = await command_count(session, corpus_node)
    before = await request_statuses(session, corpus_node, "POST", "/commands")
    _reader, writer = await raw_request(
        "127.0.0.1",
        corpus_node.port,
        command_head(corpus_node.port, f"cut-short-{uuid.uuid4()}", 1000)
        + b'{"type": "ledger.op',
    )
    writer.close()
    await writer.wait_closed()

    after = before
    for _ in range(50):
        after = await request_statuses(session, corpus_node, "POST", "/commands")
        if after != before:
            break
        await asyncio.sleep(0.1)
    assert after - before == Counter({"400": 1})
    assert "request_crashed" not in corpus_node.log_text()
    assert await command_count(session, corpus_node) == count


async def test_undecodable_gzip_body_logged_once(corpus_node: NodeProcess) -> None:
    """A gzip body that fails to decode gets 400 and its connection closes,
    without aiohttp logging the decode error again as an unhandled exception
    while it drains the rest of the body."""
    key = f"bad-gzip-{uuid.uuid4()}"
    body = b"\x1f\x8b" + b"z" * 18
    head = (
        "POST /commands HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{corpus_node.port}\r\n"
        "Content-Type: application/json\r\n"
        "Content-Encoding: gzip\r\n"
        f"Idempotency-Key: {key}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    reply = await raw_exchange("127.0.0.1", corpus_node.port, head + body)
    await asyncio.sleep(0.2)

    assert reply.status == 400, reply
    assert json.loads(reply.body)["error"]["code"] == "malformed_body", reply
    assert reply.headers.get("connection") == "close", reply.headers
    assert "Unhandled exception" not in corpus_node.log_text()
