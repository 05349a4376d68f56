"""An HTTP/1.1 proxy on 127.0.0.1 that loses, delays or replaces replies.

It sits between a client and one node. Each request is forwarded over a new
connection to the node, and the proxy reads the node's whole reply before it
decides what the client gets. The client gets the reply itself, or a reset
connection (as when a network drops the reply of a request that took
effect), or the reply only after the client gave up, or a canned reply to a
request that never reached the node. Every request and every status the
node returned is recorded, so a test can compare what the client sent with
what the node stored.

Only what the cmdlog client sends is supported: requests with a
Content-Length body or none. Every reply carries `Connection: close`.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

REPLY_BYTES_MAX = 4 * 1024 * 1024
UPSTREAM_TIMEOUT_S = 10.0
STALL_S_MAX = 5.0
"""Longest time a stalled reply is held before the connection is reset."""


@dataclass(frozen=True, slots=True)
class SeenRequest:
    """One request as the proxy received it."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True, slots=True)
class CannedReply:
    """A reply the proxy sends in place of forwarding a request."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


class LossyProxy:
    """Forwards HTTP requests to one node and loses replies on request.

    Set `drop_replies` to reset the client's connection after the next N
    requests reached the node, `stall_replies` to hold the next N replies
    until the client disconnects, and append to `canned` to answer the next
    requests without forwarding them.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.drop_replies = 0
        self.stall_replies = 0
        self.canned: list[CannedReply] = []
        self.requests: list[SeenRequest] = []
        self.upstream_statuses: list[int] = []
        """Statuses the node returned, also for replies the client never got."""
        self.upstream_headers: list[dict[str, str]] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> LossyProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    def requests_to(self, method: str, path: str) -> list[SeenRequest]:
        return [r for r in self.requests if r.method == method and r.path == path]

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._serve_one(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass  # a peer closed the connection, or the node timed out
        finally:
            self._tasks.discard(task)
            writer.transport.abort()

    async def _serve_one(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        method, path, headers = _parse_request_head(head)
        assert "chunked" not in headers.get("transfer-encoding", ""), (
            "the lossy proxy reads only Content-Length bodies"
        )
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        self.requests.append(SeenRequest(method, path, headers, body))

        if self.canned:
            canned = self.canned.pop(0)
            writer.write(_reply_bytes(canned.status, canned.headers, canned.body))
            await writer.drain()
            return

        reply = await self._forward(head, body)
        status, reply_headers, reply_body = _parse_reply(reply)
        self.upstream_statuses.append(status)
        self.upstream_headers.append(reply_headers)
        if self.drop_replies > 0:
            self.drop_replies -= 1
            return
        if self.stall_replies > 0:
            self.stall_replies -= 1
            # Hold the reply until the client times out and disconnects.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(STALL_S_MAX):
                    await reader.read()
            return
        writer.write(_reply_bytes(status, reply_headers, reply_body))
        await writer.drain()

    async def _forward(self, head: bytes, body: bytes) -> bytes:
        """Send one request to the node and return its whole raw reply."""
        async with asyncio.timeout(UPSTREAM_TIMEOUT_S):
            upstream_reader, upstream_writer = await asyncio.open_connection(
                "127.0.0.1", self.target_port
            )
            try:
                upstream_writer.write(_with_connection_close(head) + body)
                await upstream_writer.drain()
                reply = await upstream_reader.read(REPLY_BYTES_MAX)
                while chunk := await upstream_reader.read(REPLY_BYTES_MAX):
                    reply += chunk
                    assert len(reply) <= REPLY_BYTES_MAX, "reply over the proxy limit"
            finally:
                upstream_writer.transport.abort()
        return reply


def _parse_request_head(head: bytes) -> tuple[str, str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    method, path, _version = lines[0].split(" ", 2)
    return method, path, _parse_headers(lines[1:])


def _parse_headers(lines: list[str]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in lines:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return headers


def _parse_reply(reply: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = reply.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = _parse_headers(lines[1:])
    # The node answers a Connection: close request without chunked encoding.
    assert "chunked" not in headers.get("transfer-encoding", "")
    return status, headers, body


def _with_connection_close(head: bytes) -> bytes:
    lines = head.decode("latin-1").split("\r\n")
    other_lines = [line for line in lines if not line.lower().startswith("connection:")]
    # other_lines ends with the two empty strings of the closing blank line.
    closed = [*other_lines[:-2], "Connection: close", "", ""]
    return "\r\n".join(closed).encode("latin-1")


def _reply_bytes(status: int, headers: dict[str, str], body: bytes) -> bytes:
    lines = [f"HTTP/1.1 {status} Proxied"]
    for name, value in headers.items():
        if name.lower() not in ("connection", "content-length", "transfer-encoding"):
            lines.append(f"{name}: {value}")
    lines += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1") + body
