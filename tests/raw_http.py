"""Raw HTTP/1.1 bytes over a socket, for requests no client library sends."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

REPLY_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class RawReply:
    """A response read off the socket: status, headers (names in lower case),
    body, and the version its status line names."""

    status: int
    headers: dict[str, str]
    body: bytes
    version: str


async def raw_request(
    host: str, port: int, request: bytes
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open a connection, send `request` as it is, and return the connection."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(request)
    await writer.drain()
    return reader, writer


async def read_reply(reader: asyncio.StreamReader) -> RawReply:
    """Read one response up to the end of the connection and split it up.

    Raise TimeoutError if the node keeps the connection open longer than
    REPLY_TIMEOUT_S, and ValueError if the bytes are not an HTTP response.
    """
    data = await asyncio.wait_for(reader.read(), timeout=REPLY_TIMEOUT_S)
    head, separator, body = data.partition(b"\r\n\r\n")
    if not separator:
        raise ValueError(f"no complete HTTP response in {data[:200]!r}")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    version, status = status_line.split(" ")[:2]
    return RawReply(int(status), headers, body, version)


async def raw_exchange(host: str, port: int, request: bytes) -> RawReply:
    """Send `request` as it is on a new connection and read its one response."""
    reader, writer = await raw_request(host, port, request)
    try:
        return await read_reply(reader)
    finally:
        writer.close()


def command_head(port: int, key: str, content_length: int) -> bytes:
    """Return the head of a JSON `POST /commands` that closes its connection,
    up to and including the blank line before the body."""
    return (
        "POST /commands HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{port}\r\n"
        "Content-Type: application/json\r\n"
        f"Idempotency-Key: {key}\r\n"
        f"Content-Length: {content_length}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
