"""Tests for `Expect: 100-continue` against a real node, over raw sockets.

A client that sends `Expect: 100-continue` sends its body only after the
node responds 100 Continue. The node sends it only after the checks that
need no body (token, size, Content-Encoding, Content-Type) pass. A request
that fails one of them gets its error at once, and its connection closes,
because the body it announced never came.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator

import pytest

from tests.nodes import NodeProcess
from tests.raw_http import REPLY_TIMEOUT_S, raw_request

TOKEN = "expect-test-token"
BODY_BYTES_MAX = 1000
CLOSE_TIMEOUT_S = 5.0
"""How long a rejected request's connection may stay open after its response.
aiohttp would keep it open for 10 s, waiting for the body."""
INTERIM = b"HTTP/1.1 100 Continue\r\n\r\n"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    node = NodeProcess(
        tmp_path_factory.mktemp("expect") / "node",
        token=TOKEN,
        extra_args=("--body-bytes-max", str(BODY_BYTES_MAX)),
    ).start()
    yield node
    if node.is_running():
        node.kill()


def open_body(account: str) -> bytes:
    return json.dumps(
        {"type": "ledger.open", "payload": {"account": account, "currency": "EUR"}}
    ).encode()


def head(
    port: int,
    *,
    content_length: int,
    expect: str = "100-continue",
    content_type: str = "application/json",
    token: str | None = TOKEN,
    version: str = "HTTP/1.1",
) -> bytes:
    """Return the head of a `POST /commands` with an Expect header."""
    lines = [
        f"POST /commands {version}",
        f"Host: 127.0.0.1:{port}",
        f"Content-Type: {content_type}",
        f"Idempotency-Key: expect-{uuid.uuid4()}",
        f"Expect: {expect}",
        f"Content-Length: {content_length}",
    ]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def status_request(extra_header: str = "") -> bytes:
    return (
        f"GET /status HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"{extra_header}Connection: close\r\n\r\n"
    ).encode()


async def exchange(
    node: NodeProcess, request: bytes, timeout_s: float = REPLY_TIMEOUT_S
) -> bytes:
    """Send `request` on a new connection and return all the node sends back
    until it closes the connection."""
    reader, writer = await raw_request("127.0.0.1", node.port, request)
    try:
        return await asyncio.wait_for(reader.read(), timeout=timeout_s)
    finally:
        writer.close()


async def command_count(node: NodeProcess) -> int:
    """Return the node's command count, read over a raw socket with the token."""
    data = await exchange(node, status_request())
    count: int = json.loads(data.partition(b"\r\n\r\n")[2])["commands"]
    return count


def error_code(response: bytes) -> str:
    code: str = json.loads(response.partition(b"\r\n\r\n")[2])["error"]["code"]
    return code


REJECTED_EARLY = {
    "over-the-size-limit": (
        {"content_length": BODY_BYTES_MAX + 1},
        413,
        "payload_too_large",
    ),
    "unsupported-content-type": (
        {"content_length": 50, "content_type": "text/plain"},
        415,
        "unsupported_media_type",
    ),
    "no-token": ({"content_length": 50, "token": None}, 401, "unauthorized"),
}


@pytest.mark.parametrize(
    ("head_args", "status", "code"), REJECTED_EARLY.values(), ids=REJECTED_EARLY.keys()
)
async def test_rejected_before_continue(
    node: NodeProcess, head_args: dict[str, object], status: int, code: str
) -> None:
    """A request that fails a check needing no body gets its error without a
    100 Continue, and its connection closes right after the response."""
    count = await command_count(node)
    request = head(node.port, **head_args)  # type: ignore[arg-type]
    data = await exchange(node, request, CLOSE_TIMEOUT_S)

    assert data.startswith(f"HTTP/1.1 {status} ".encode()), data[:200]
    assert b"100 Continue" not in data, data[:200]
    assert b"\r\nConnection: close\r\n" in data, data[:400]
    assert error_code(data) == code, data
    assert await command_count(node) == count


async def test_continue_then_stored(node: NodeProcess) -> None:
    """A request that passes the checks gets 100 Continue, then, once its body
    arrives, 201."""
    body = open_body(f"expect-{uuid.uuid4().hex[:8]}")
    count = await command_count(node)
    reader, writer = await raw_request(
        "127.0.0.1", node.port, head(node.port, content_length=len(body))
    )
    try:
        interim = await asyncio.wait_for(
            reader.readuntil(b"\r\n\r\n"), timeout=REPLY_TIMEOUT_S
        )
        writer.write(body)
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), REPLY_TIMEOUT_S)
    finally:
        writer.close()

    assert interim == INTERIM
    assert status_line.startswith(b"HTTP/1.1 201 "), status_line
    assert await command_count(node) == count + 1


async def test_other_expectation_gets_417(node: NodeProcess) -> None:
    """An Expect header other than 100-continue gets 417 in the API's error
    format, and nothing is recorded."""
    body = open_body(f"expect-{uuid.uuid4().hex[:8]}")
    count = await command_count(node)
    request = head(node.port, content_length=len(body), expect="fast-please") + body
    reader, writer = await raw_request("127.0.0.1", node.port, request)
    try:
        data = await asyncio.wait_for(reader.read(1000), timeout=REPLY_TIMEOUT_S)
    finally:
        writer.close()

    assert data.startswith(b"HTTP/1.1 417 "), data[:200]
    assert b"application/json" in data.partition(b"\r\n\r\n")[0], data[:400]
    assert error_code(data) == "expectation_failed", data
    assert await command_count(node) == count


@pytest.mark.parametrize(
    "expect", ["100-continue, fast-please", "fast-please, 100-Continue"]
)
async def test_417_closes_held_back_body(node: NodeProcess, expect: str) -> None:
    """A client that named 100-continue waits for it before it sends its
    body, so a 417's connection closes right after the response. Kept open,
    the node would read the client's next request as the announced body."""
    body = open_body(f"expect-{uuid.uuid4().hex[:8]}")
    count = await command_count(node)
    request = head(node.port, content_length=len(body), expect=expect)
    data = await exchange(node, request, CLOSE_TIMEOUT_S)

    assert data.startswith(b"HTTP/1.1 417 "), data[:200]
    assert b"\r\nConnection: close\r\n" in data, data[:400]
    assert error_code(data) == "expectation_failed", data
    assert await command_count(node) == count


async def test_417_with_body_keeps_connection(node: NodeProcess) -> None:
    """A client whose expectation is not 100-continue sends its body at once,
    so after the 417 the connection carries its next request."""
    body = open_body(f"expect-{uuid.uuid4().hex[:8]}")
    request = head(node.port, content_length=len(body), expect="fast-please")
    data = await exchange(node, request + body + status_request())

    first, _, second = data.partition(b"HTTP/1.1 200 ")
    assert first.startswith(b"HTTP/1.1 417 "), data[:200]
    assert b"\r\nConnection: close\r\n" not in first, first[:400]
    assert second, data[-400:]


async def test_http_1_0_expectation_ignored(node: NodeProcess) -> None:
    """An HTTP/1.0 client cannot read a 100 response, so its Expect header is
    ignored: no 100 Continue, and the command it sent is stored."""
    body = open_body(f"expect-{uuid.uuid4().hex[:8]}")
    count = await command_count(node)
    request = head(node.port, content_length=len(body), version="HTTP/1.0") + body
    data = await exchange(node, request)

    assert data.startswith(b"HTTP/1.0 201 "), data[:200]
    assert b"100 Continue" not in data
    assert await command_count(node) == count + 1


async def test_get_gets_no_continue(node: NodeProcess) -> None:
    """A request without a body has nothing to wait for, so it gets its
    response and no 100 Continue."""
    data = await exchange(node, status_request("Expect: 100-continue\r\n"))

    assert data.startswith(b"HTTP/1.1 200 "), data[:200]
    assert b"100 Continue" not in data
