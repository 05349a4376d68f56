"""Logging setup: structlog events, JSON when not on a terminal.

cmdlog's own events are rendered by structlog and written straight to
stderr. aiohttp and the standard library log through `logging`; their
records go through the same renderer, so one stream carries every event in
one format.

The per-request access line (`log_request`) is the only event on the hot
path. Under load, structlog's processor chain cost about 6% of the event
loop's time, so in JSON mode the line is rendered directly, with the same
fields in the same order. A write per request cost about a tenth more, so
when stderr is not a terminal, access lines are buffered. The next other
event writes them, or `flush_logs`, which the server calls every
`ACCESS_FLUSH_INTERVAL_S`. Every other event is written at once, after
the access lines before it, so the stream stays in order. A node killed
with SIGKILL loses at most the access lines of that interval.
"""

from __future__ import annotations

import atexit
import io
import logging
import sys
import threading
import time
from typing import Any, TextIO

import orjson
import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


ACCESS_LOGGER = "cmdlog.access"
ACCESS_FLUSH_INTERVAL_S = 0.2
_BUFFER_BYTES = 256 * 1024


def _dumps(value: object, **_options: object) -> str:
    return orjson.dumps(value, default=repr).decode()


class _Stream:
    """stderr as raw bytes, with access lines held until the next flush."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending = bytearray()
        self._text: TextIO | None = None
        self._lost = False
        """Set once stderr fails (a closed pipe): later lines are dropped."""
        try:
            self._out = io.FileIO(sys.stderr.fileno(), "w", closefd=False)
            self._buffered = not sys.stderr.isatty()
        except (OSError, ValueError):  # a stderr without a file, as under pytest
            self._text = sys.stderr
            self._buffered = False

    def write(self, line: str | bytes, *, access: bool) -> None:
        data = (line if isinstance(line, bytes) else line.encode()) + b"\n"
        if access:
            self.write_access(data)
            return
        with self._lock:
            self._pending += data
            self._write_pending()

    def write_access(self, data: bytes) -> None:
        """Add access lines (`data`, ending in a newline) to the buffer, and
        write the buffer once it is full, or at once to a terminal."""
        with self._lock:
            self._pending += data
            if self._buffered and len(self._pending) < _BUFFER_BYTES:
                return
            self._write_pending()

    def flush(self) -> None:
        with self._lock:
            self._write_pending()

    def _write_pending(self) -> None:
        data = bytes(self._pending)
        self._pending.clear()
        if self._lost:
            return
        try:
            self._write(data)
        except (OSError, ValueError):
            # Logging must never stop the node: a write can fail in the
            # writer thread, which every client write waits for.
            self._lost = True

    def _write(self, data: bytes) -> None:
        if self._text is not None:
            self._text.write(data.decode())
            self._text.flush()
            return
        view = memoryview(data)
        while view:
            written = self._out.write(view)
            if not written:  # a non-blocking stderr that is full drops the rest
                return
            view = view[written:]


class _LineLogger:
    """The structlog logger behind every cmdlog event: one line per call."""

    def __init__(self, stream: _Stream, *, access: bool) -> None:
        self._stream = stream
        self._access = access

    def msg(self, line: str) -> None:
        self._stream.write(line, access=self._access)

    debug = info = warning = error = critical = exception = fatal = log = msg


class _TextAdapter(io.TextIOBase):
    """A text stream for the standard library's handler, written through `_Stream`."""

    def __init__(self, stream: _Stream) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(text.removesuffix("\n"), access=False)
        return len(text)


_stream: _Stream | None = None
_requests_as_json = False
"""True when `log_request` renders lines itself: JSON output at info level."""
_access_log = structlog.get_logger(ACCESS_LOGGER)
_second = -1
_second_text = ""


def log_request(
    method: str, path: str, status: int, duration_ms: float, command_id: str | None
) -> None:
    """Log one handled request as a `request_handled` event."""
    if not _requests_as_json or _stream is None:
        _access_log.info(
            "request_handled",
            method=method,
            path=path,
            status=status,
            duration_ms=duration_ms,
            command_id=command_id,
        )
        return
    event = {
        "method": method,
        "path": path,
        "status": status,
        "duration_ms": duration_ms,
        "command_id": command_id,
        "event": "request_handled",
        "level": "info",
        "timestamp": _utc_timestamp(),
    }
    _stream.write_access(
        orjson.dumps(event, default=repr, option=orjson.OPT_APPEND_NEWLINE)
    )


def _utc_timestamp() -> str:
    """Return the time as ISO 8601 UTC with microseconds, like structlog's."""
    global _second, _second_text
    now = time.time()
    second = int(now)
    if second != _second:
        _second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _second = second
    return f"{_second_text}.{int((now - second) * 1_000_000):06d}Z"


def flush_logs() -> None:
    """Write the access lines held so far."""
    if _stream is not None:
        _stream.flush()


atexit.register(flush_logs)


def _logger_factory(stream: _Stream) -> Any:
    def make(*args: Any) -> _LineLogger:
        return _LineLogger(stream, access=bool(args) and args[0] == ACCESS_LOGGER)

    return make


def configure_logging(level: str = "info", *, json: bool | None = None) -> None:
    """Send structlog and stdlib logging to stderr, as JSON unless on a terminal."""
    global _stream, _requests_as_json
    if json is None:
        json = not sys.stderr.isatty()
    _requests_as_json = json and _LEVELS[level] <= logging.INFO
    if _stream is not None:
        _stream.flush()
    _stream = _Stream()
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer(serializer=_dumps)
        if json
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    # cmdlog's own events skip the standard library's logging machinery, which
    # costs several times more per line; a request log line is on the hot path.
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        logger_factory=_logger_factory(_stream),
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = logging.StreamHandler(_TextAdapter(_stream))
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_LEVELS[level])
