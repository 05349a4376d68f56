"""The HTTP/1.1 connection handler: aiohttp's, with parse errors as API errors.

aiohttp's parser rejects some requests before any middleware runs: a
malformed request line, a header line without a colon, an invalid
Content-Length or chunk size, or a line over 8190 bytes (aiohttp 3.14's
default limit). aiohttp responds to those with a text/plain page. The handler
here responds with the API's `{"error": {"code", "message"}}` body instead,
keeps aiohttp's status, and logs one `request_malformed` event in place of
aiohttp's traceback. A request line with no HTTP version, or with another
version than 1.0 and 1.1, passes the parser and gets its 400 from the error
middleware (see `_checked_requests`).

NOTE: a chunked body that turns invalid after a handler has started to read
it gets 408 once `--body-timeout-s` passes, not an immediate 400. aiohttp
queues the parse error behind that request, so for the handler's body read
the body has only stopped arriving.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable

import structlog
from aiohttp import hdrs, web, web_protocol
from aiohttp.http import HttpVersion10, HttpVersion11, RawRequestMessage
from aiohttp.http_exceptions import (
    BadStatusLine,
    ContentEncodingError,
    HttpProcessingError,
    InvalidHeader,
    InvalidURLError,
    LineTooLong,
)
from multidict import CIMultiDict, CIMultiDictProxy

from cmdlog import wire
from cmdlog.errors import CmdlogError, MalformedRequest
from cmdlog.http_api import (
    EXCHANGE,
    Exchange,
    error_body,
    unsupported_encoding,
)

log = structlog.get_logger(__name__)

REASON_CHARS_MAX = 300
"""Maximum length of aiohttp's description of a parse error, which quotes the
rejected bytes, in an error message."""

_WELL_FORMED = (
    "send a request line such as 'POST /commands HTTP/1.1', then one "
    "'Name: value' line per header, each line ending in CRLF, and a body that "
    "matches its Content-Length or its chunked Transfer-Encoding"
)

# The most specific class comes first, because LineTooLong, InvalidHeader and
# the others all derive from aiohttp's BadHttpMessage.
_PARSE_ERRORS: tuple[tuple[type[HttpProcessingError], str, str], ...] = (
    (
        LineTooLong,
        "line_too_long",
        "shorten the URL or the header line, or send the data in the body",
    ),
    (
        BadStatusLine,
        "malformed_request_line",
        "start the request with a line such as 'POST /commands HTTP/1.1' that "
        "ends in CRLF",
    ),
    (
        InvalidURLError,
        "invalid_url",
        "send a path such as /commands, and percent-encode every character "
        "that a URL cannot contain",
    ),
    (
        InvalidHeader,
        "invalid_header",
        "correct the header quoted there, or leave it out",
    ),
)


_ENCODING_NAMED = re.compile(r"\((\w+)\)")
"""Pattern for the encoding in aiohttp's message 'Can not decode
content-encoding: brotli (br)'."""


def parse_error(exc: HttpProcessingError) -> CmdlogError:
    """Return the API error for a request that aiohttp's parser rejected.

    The message repeats aiohttp's description of the problem, which quotes
    the rejected bytes, and adds the fix for that kind of problem. A body
    in br or zstd, which aiohttp decodes only when optional modules are
    installed, is rejected while the headers are parsed, and gets 415.
    """
    if isinstance(exc, ContentEncodingError):
        named = _ENCODING_NAMED.search(exc.message)
        return unsupported_encoding(named.group(1) if named else "")
    code, fix = MalformedRequest.code, _WELL_FORMED
    for error_type, error_code, error_fix in _PARSE_ERRORS:
        if isinstance(exc, error_type):
            code, fix = error_code, error_fix
            break
    error = MalformedRequest(
        f"the request is not valid HTTP/1.1 ({_reason(exc)}), so nothing was "
        f"recorded; {fix}"
    )
    error.code = code
    return error


def _reason(exc: HttpProcessingError) -> str:
    """Join aiohttp's description into one line, without its caret line."""
    lines = [line.strip() for line in exc.message.splitlines()]
    text = " ".join(line for line in lines if line.strip("^"))
    if len(text) > REASON_CHARS_MAX:
        text = text[:REASON_CHARS_MAX] + "..."
    return text or type(exc).__name__


class RequestHandler(web.RequestHandler):
    """aiohttp's connection handler, with parser rejections in the API's format.

    NOTE: aiohttp has no public hook for the response to a request that its
    parser rejects. This class relies on aiohttp (read in 3.14) calling
    `handle_error` with the parser's `HttpProcessingError` for each such
    request. If a release stops doing so, those responses are text/plain
    again, and the raw-socket tests in tests/test_http_malformed.py fail.
    """

    __slots__ = ("on_rejected",)

    on_rejected: Callable[[int], None] | None
    """Called with the status of each request the parser rejected."""

    async def finish_response(
        self,
        request: web.BaseRequest,
        resp: web.StreamResponse,
        start_time: float | None,
    ) -> tuple[web.StreamResponse, bool]:
        """Send the response, then close the connection at once if the rest of
        the body is not expected (see `Exchange.close_after_response`)."""
        finished = await super().finish_response(request, resp, start_time)
        state = request.get(EXCHANGE)
        if state is not None and state.close_after_response:
            self.force_close()
        return finished

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """Return the JSON error response for a request the parser rejected.

        Any other error, such as a crash outside every middleware, keeps
        aiohttp's own response.
        """
        if not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)
        error = parse_error(exc)
        if isinstance(error, MalformedRequest):
            error.status = status  # aiohttp's status for the parse error
        if self.on_rejected is not None:
            self.on_rejected(error.status)
        log.info(
            "request_malformed",
            status=error.status,
            code=error.code,
            remote=request.remote,
            reason=_reason(exc),
        )
        response = web.Response(
            body=wire.encode(error_body(error), wire.JSON),
            status=error.status,
            content_type=wire.JSON,
        )
        # Close the connection, because the parser cannot find where the next
        # request starts.
        response.force_close()
        return response


_HTTP1 = frozenset({HttpVersion10, HttpVersion11})
_PARSE_FAILED = web_protocol.ERROR
"""The message aiohttp passes for each request that its parser rejected."""


def _checked_requests(
    factory: Callable[..., web.BaseRequest],
) -> Callable[..., web.BaseRequest]:
    """Wrap a server's request factory so that each request gets its
    `Exchange`, and handle other HTTP versions and the Expect header.

    aiohttp's parser accepts a request line with no version (HTTP/0.9) or
    with a version such as HTTP/2.0, and would write that version in the
    response's status line. The request built here has version HTTP/1.1,
    and its connection closes after the response. It carries the version
    the client named in `Exchange.requested_version`, so the error
    middleware responds 400.

    aiohttp responds to `Expect: 100-continue` with 100 Continue before any
    middleware runs, so a client would send a body that the node then
    rejects for its size, its type or a missing token. The request built
    here has no Expect header; its value is in `Exchange.expectation`, and
    `cmdlog.http_api` sends 100 Continue once the request has passed every
    check that needs no body.
    """

    def make_request(message: RawRequestMessage, *args: object) -> web.BaseRequest:
        if message is _PARSE_FAILED:
            # aiohttp builds the request of a parse error from a stand-in
            # message that names HTTP/1.0, which the status line would repeat.
            message = message._replace(version=HttpVersion11)
            return factory(message, *args)
        expectation = None
        if hdrs.EXPECT in message.headers:
            expectation = ", ".join(message.headers.getall(hdrs.EXPECT))
            message = _without_expect(message)
        state = Exchange(expectation=expectation)
        if message.version not in _HTTP1:
            state.requested_version = message.version
            message = message._replace(version=HttpVersion11, should_close=True)
        request = factory(message, *args)
        request[EXCHANGE] = state
        return request

    return make_request


def _without_expect(message: RawRequestMessage) -> RawRequestMessage:
    headers = CIMultiDict(message.headers)
    del headers[hdrs.EXPECT]
    raw_headers = tuple(
        (name, value)
        for name, value in message.raw_headers
        if name.lower() != b"expect"
    )
    return message._replace(headers=CIMultiDictProxy(headers), raw_headers=raw_headers)


def handler_factory(
    server: web.Server,
    *,
    idle_timeout_s: float,
    on_rejected: Callable[[int], None] | None = None,
) -> Callable[[], RequestHandler]:
    """Return a protocol factory for `asyncio.loop.create_server`.

    Each connection gets a `RequestHandler` that passes requests to
    `server`'s application and registers with `server`, as the handlers that
    `server` makes itself do, so `server.connections` and aiohttp's shutdown
    include it. Call this in the event loop that will serve the connections.
    """
    loop = asyncio.get_running_loop()
    server.request_factory = _checked_requests(server.request_factory)

    def make_handler() -> RequestHandler:
        # None turns aiohttp's access log off (cmdlog logs each request in a
        # middleware). aiohttp accepts it, as AppRunner(access_log=None) shows,
        # though the parameter is annotated as a Logger.
        handler = RequestHandler(
            server,
            loop=loop,
            keepalive_timeout=idle_timeout_s,
            access_log=None,  # type: ignore[arg-type]
        )
        handler.on_rejected = on_rejected
        return handler

    return make_handler
