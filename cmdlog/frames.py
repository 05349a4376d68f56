"""Frames of the replication stream: length, checksum, msgpack body.

Each frame is a 4-byte big-endian body length, the 4-byte CRC-32 of the
body, then the body: one msgpack map whose `t` field names its kind. The
length comes first so a reader can refuse an oversized frame before
buffering it, and the checksum catches a stream corrupted on the way. A
stream that ends inside a frame is an error, never a quiet end.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from typing import Any

from cmdlog import codec
from cmdlog.errors import DataError, MalformedBody

HEADER = struct.Struct(">II")
PROTOCOL_VERSION = 1
"""Version of the replication stream; a node refuses a peer speaking another."""

HELLO = "hello"
COMMANDS = "commands"
HEARTBEAT = "heartbeat"


class FrameError(DataError):
    """A replication frame is oversized, corrupt, truncated or malformed."""

    code = "bad_frame"


class StreamTruncated(DataError):
    """The stream ended inside a frame: a broken connection, worth a retry."""

    code = "stream_truncated"


def encode_frame(body: dict[str, Any]) -> bytes:
    data = codec.pack(body)
    return HEADER.pack(len(data), zlib.crc32(data)) + data


class FrameReader:
    """Splits a byte stream into checked frames, holding at most one frame."""

    def __init__(self, *, frame_bytes_max: int) -> None:
        self.frame_bytes_max = frame_bytes_max
        self._buffer = bytearray()

    def feed(self, data: bytes) -> Iterator[dict[str, Any]]:
        """Add bytes from the stream and yield every frame now complete.

        Raises `FrameError` for a frame over the limit, a checksum mismatch
        or a body that is not a msgpack map with a string `t`.
        """
        self._buffer += data
        while len(self._buffer) >= HEADER.size:
            length, checksum = HEADER.unpack_from(self._buffer)
            if length > self.frame_bytes_max:
                raise FrameError(
                    f"replication frame of {length} bytes is over the limit of "
                    f"{self.frame_bytes_max}; the peer allows larger commands "
                    "than this node, so give every node the same --body-bytes-max"
                )
            end = HEADER.size + length
            if len(self._buffer) < end:
                return
            body = bytes(self._buffer[HEADER.size : end])
            del self._buffer[:end]
            if zlib.crc32(body) != checksum:
                raise FrameError(
                    f"replication frame checksum {zlib.crc32(body):08x} does not "
                    f"match the header's {checksum:08x}; the stream is corrupt"
                )
            yield _decode(body)

    def close(self) -> None:
        """Raise `StreamTruncated` if the stream ended inside a frame."""
        if self._buffer:
            raise StreamTruncated(
                f"replication stream ended inside a frame ({len(self._buffer)} "
                "bytes left over)"
            )


def _decode(body: bytes) -> dict[str, Any]:
    try:
        frame = codec.unpack(body)
    except MalformedBody as exc:
        raise FrameError(f"replication frame is not msgpack: {exc.message}") from exc
    if type(frame) is not dict or type(frame.get("t")) is not str:
        raise FrameError("replication frame is not a map with a string field 't'")
    return frame
