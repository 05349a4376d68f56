"""The HTTP API: the Idempotency-Key contract on top of a node.

Each handler turns a request into node calls and a response; everything
about encodings lives in `wire`, and every failure is a `CmdlogError`
rendered by one middleware as `{"error": {"code", "message"}}`. When
several errors apply, the first of 401, 413, 415, 400, 422 wins, which is
the order in which a request is checked: the token (middleware), the body
size, the Content-Type, the key and body shape, then the command itself.

Retries follow the IETF Idempotency-Key draft with two differences: a key
reused with another payload is 422 (the draft leaves the status open), and
a retry that arrives while the first request is still committing waits for
that commit and replays it instead of getting 409, because the single
writer thread serializes them anyway.
"""

from __future__ import annotations

import asyncio
import collections
import re
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog
from aiohttp import web, web_protocol
from aiohttp.http import HttpVersion11
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from cmdlog import wire
from cmdlog.auth import Credentials, scope_key
from cmdlog.engine import Accepted, prepare_submission
from cmdlog.errors import (
    BodyTimeout,
    ClientError,
    CmdlogError,
    ExpectationFailed,
    InvalidArgument,
    InvalidKey,
    KeyReused,
    MalformedBody,
    MalformedRequest,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    ShuttingDown,
    Unauthorized,
    UnknownCommandType,
    UnsupportedMediaType,
    UnsupportedTransferCoding,
    ValidationError,
)
from cmdlog.logs import log_request
from cmdlog.metrics import Metrics
from cmdlog.model import NATURAL_ID, command_view, parse_key
from cmdlog.node import Node
from cmdlog.peering import serve_stream
from cmdlog.replication import ID_CHARS_MAX, ID_PATTERN

log = structlog.get_logger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
NODE = web.AppKey("node", Node)
METRICS = web.AppKey("metrics", Metrics)
UNAUTHENTICATED_PATHS = frozenset({"/healthz"})
EXCHANGE = "cmdlog_exchange"
"""Request key of the request's `Exchange`, which `cmdlog.http_protocol`
sets on every request."""
COMMAND_FIELDS = ("type", "payload")
BATCH_ITEM_FIELDS = ("id", "type", "payload")


@dataclass(slots=True)
class Exchange:
    """The state the node keeps about one request while it handles it.

    The fields live on one object because aiohttp's request is a Mapping
    whose `in` and `get` raise and catch KeyError for a missing key, which
    costs about 350 ns each time.
    """

    requested_version: tuple[int, int] | None = None
    """The version a request line named, when it was not HTTP/1.0 or 1.1. The
    request's own `version` is HTTP/1.1 then (see `cmdlog.http_protocol`)."""
    expectation: str | None = None
    """The value of the Expect header, which `cmdlog.http_protocol` takes out
    of the request's headers."""
    continue_sent: bool = False
    close_after_response: bool = False
    """Set when the rest of the body will not be read: the response went out
    before 100 Continue, the body timed out, or it failed to decode. The
    connection closes as soon as the response is sent (see
    `cmdlog.http_protocol`), where aiohttp would wait up to 10 s (its default
    lingering time) for the body.

    NOTE: a client that sends its body without waiting for 100 Continue can
    get a connection reset, because the node closes with body bytes unread.
    With a 4 MB body, a client that read while it sent still got the
    response first."""
    principal: str | None = None
    """The client's principal, when the node has several."""
    command_id: str | None = None
    """The ID of the command the request writes or reads, for the log line."""


def exchange(request: web.Request) -> Exchange:
    found: Exchange = request[EXCHANGE]
    return found


def error_body(error: CmdlogError) -> dict[str, Any]:
    detail: dict[str, Any] = {"code": error.code, "message": error.message}
    if isinstance(error, ValidationError):
        detail["field"] = error.field
        detail["rule"] = error.rule
    if isinstance(error, UnknownCommandType):
        detail["known_types"] = error.known
    return {"error": detail}


def respond(
    request: web.Request,
    body: Any,
    status: int = 200,
    headers: dict[str, str] | None = None,
) -> web.Response:
    fmt = wire.response_format(request.headers.get("Accept"))
    return web.Response(
        body=wire.encode(body, fmt), status=status, content_type=fmt, headers=headers
    )


def respond_error(request: web.Request, error: CmdlogError) -> web.Response:
    headers = {}
    if error.status in (503, 507):
        headers["Retry-After"] = str(getattr(error, "retry_after_s", 1))
    if error.status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="cmdlog"'
    response = respond(request, error_body(error), error.status, headers)
    if getattr(error, "close_connection", False):
        response.force_close()
    return response


# middlewares


def make_middleware(limits: Limits, metrics: Metrics, credentials: Credentials) -> Any:
    """Return the one middleware that every request passes through.

    It checks the request line and the Expect header, admits the request
    under the connection and in-flight bounds, checks the token, runs the
    handler, renders every error as JSON or msgpack, and logs one line per
    request. One middleware with plain checks costs each request less than
    a middleware per concern, each a coroutine around the next.
    """
    authenticate = make_auth(credentials)

    @web.middleware
    async def handle_errors(
        request: web.Request, handler: Handler
    ) -> web.StreamResponse:
        started = time.monotonic()
        state = exchange(request)
        path = request.path
        admitted = False
        response: web.StreamResponse
        try:
            if state.requested_version is not None:
                raise _version_error(state.requested_version)
            if state.expectation is not None:
                _check_expectation(request, state.expectation)
            admitted = limits.admit(path)
            authenticate(request, path)
            response = await handler(request)
        except CmdlogError as error:
            if not isinstance(error, ClientError):
                log.warning("request_failed", code=error.code, error=error.message)
            if isinstance(error, BodyTimeout):
                state.close_after_response = True
            response = respond_error(request, error)
        except web.HTTPRequestEntityTooLarge:
            limit = limits.config.body_bytes_max
            response = respond_error(
                request,
                PayloadTooLarge(
                    f"body is larger than the limit of {limit} bytes; split it "
                    "into smaller requests"
                ),
            )
        except web.HTTPException as exc:
            if exc.status < 400:
                # A redirect goes out as aiohttp renders it, counted and logged here.
                _account(request, metrics, path, exc.status, started, state)
                raise
            http_error = ClientError(_http_error_message(request, exc))
            http_error.status = exc.status
            http_error.code = exc.reason.lower().replace(" ", "_")
            response = respond_error(request, http_error)
            if "Allow" in exc.headers:
                response.headers["Allow"] = exc.headers["Allow"]
        except Exception as exc:
            log.error("request_crashed", path=path, exc_info=exc)
            internal = CmdlogError(
                "internal error; retry the request with the same key"
            )
            internal.code = "internal_error"
            response = respond_error(request, internal)
        finally:
            if admitted:
                limits.release()

        if (
            state.expectation is not None
            and request.body_exists
            and _awaits_continue(request, state)
        ):
            # The client may never send its body, and that includes a 417 for
            # a list with 100-continue in it. On a connection kept open, the
            # node would read the client's next request as that body.
            state.close_after_response = True
        if state.close_after_response:
            response.force_close()
        _account(request, metrics, path, response.status, started, state)
        return response

    return handle_errors


def _account(
    request: web.Request,
    metrics: Metrics,
    path: str,
    status: int,
    started: float,
    state: Exchange,
) -> None:
    """Count the request in /metrics and write its access log line."""
    duration_s = time.monotonic() - started
    metrics.observe_request(request.method, _route_name(request), status, duration_s)
    if path != "/replicate":
        log_request(
            request.method, path, status, round(duration_s * 1000, 2), state.command_id
        )


def _awaits_continue(request: web.Request, state: Exchange) -> bool:
    """Return whether the client may wait for a 100 Continue not sent yet:
    its HTTP/1.1 request has 100-continue among its expectations.

    A client whose expectations leave out 100-continue sends its body at
    once, and aiohttp reads and discards the body after the response.
    """
    # An HTTP/1.0 client may send the header, but cannot read a 100 response.
    return (
        state.expectation is not None
        and not state.continue_sent
        and request.version == HttpVersion11
        and _names_continue(state.expectation)
    )


def _names_continue(expectation: str) -> bool:
    """Return whether 100-continue is among the comma-separated expectations,
    with any parameters after ';' or '=' ignored."""
    for member in expectation.split(","):
        name = member.split(";", 1)[0].split("=", 1)[0]
        if name.strip().lower() == "100-continue":
            return True
    return False


def _check_expectation(request: web.Request, expectation: str) -> None:
    if request.version != HttpVersion11:
        return
    if expectation.strip().lower() == "100-continue":
        return
    raise ExpectationFailed(
        f"Expect: {expectation[:40]!r} is not an expectation this node "
        "can meet; send Expect: 100-continue or no Expect header"
    )


async def _send_continue(request: web.Request) -> None:
    """Send 100 Continue if the client waits for it before sending the body.

    By then the error middleware has responded 417 to any other expectation.
    """
    state = exchange(request)
    if _awaits_continue(request, state):
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        # The response's byte count starts after the interim response.
        request.writer.output_size = 0
        state.continue_sent = True


def _version_error(version: tuple[int, int]) -> MalformedRequest:
    if version < (1, 0):
        version_text = "no HTTP version"
    else:
        version_text = f"HTTP/{version[0]}.{version[1]}"
    error = MalformedRequest(
        f"the request line names {version_text}, and this node speaks HTTP/1.1 and "
        "HTTP/1.0 only, so nothing was recorded; start the request with a line "
        "such as 'POST /commands HTTP/1.1'"
    )
    error.code = "malformed_request_line"
    return error


def _http_error_message(request: web.Request, exc: web.HTTPException) -> str:
    """Name the problem and the fix for an error that routing raised."""
    where = f"{request.method} {request.path[:200]}"
    if exc.status == 404:
        return (
            f"no endpoint for {where}; the API has POST /commands, POST "
            "/commands/batch, GET /commands/{id}, GET /queries/{name}, GET "
            "/status, GET /healthz, GET /metrics and GET /replicate"
        )
    if exc.status == 405:
        allowed = exc.headers.get("Allow", "")
        return f"{request.method} is not allowed on {request.path}; use {allowed}"
    return f"{exc.reason} for {where}"


def _route_name(request: web.Request) -> str:
    info = request.match_info.route.resource
    return info.canonical if info is not None else "unmatched"


class Limits:
    """Counts open connections and in-flight requests against their bounds."""

    def __init__(self, node: Node) -> None:
        self.config = node.config.http
        self.in_flight = 0
        self.connections: Callable[[], int] = lambda: 0
        self.close_idle: Callable[[int], int] = lambda count: 0
        """Close up to `count` connections that wait for a request, oldest
        first; return how many were closed."""
        self.draining = False
        """Set on shutdown: requests that start from now on get 503."""
        self._idle = asyncio.Event()
        self._idle.set()
        self._body_readers: dict[asyncio.Task[Any], list[Any]] = {}
        """The request tasks waiting in `read` for a body, each with its
        `[body stream, bytes it had received, when that count last grew]`."""
        self._ended_reads: dict[asyncio.Task[Any], CmdlogError] = {}
        """The tasks among them that were cancelled, with the error they raise."""

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no request is in flight; return False on timeout."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    async def read(self, request: web.Request) -> bytes:
        """Read the request's body, unless `end_body_reads` (ShuttingDown) or
        `end_stalled_reads` (BodyTimeout) ends the wait."""
        if request.content.is_eof():
            # The whole body has arrived, so the read cannot stall.
            return await request.read()
        task = asyncio.current_task()
        assert task is not None, "a request body is read outside a task"
        self._body_readers[task] = [request.content, -1, 0.0]
        try:
            return await request.read()
        except ConnectionResetError as exc:
            # The client closed the connection partway through the body. No
            # one reads this response, but the request log line and /metrics
            # count it as a 400.
            raise MalformedBody(
                "the connection closed before the whole body arrived, so nothing "
                "was recorded; send the request again"
            ) from exc
        except asyncio.CancelledError:
            # uncancel() leaves a count above 0 when something else cancelled
            # the task too, and that cancellation must go on.
            error = self._ended_reads.get(task)
            if error is None or task.uncancel() > 0:
                raise
            raise error from None
        finally:
            del self._body_readers[task]
            self._ended_reads.pop(task, None)

    def end_body_reads(self) -> int:
        """End every body read in progress with ShuttingDown (503), and return
        how many there were.

        A request still waiting for its body has nothing to commit, so
        shutdown need not wait for it.
        """
        for task in self._body_readers:
            self._end_read(
                task,
                ShuttingDown(
                    "the node shut down before the request body arrived, so "
                    "nothing was recorded; send the request again, to another node"
                ),
            )
        return len(self._body_readers)

    def end_stalled_reads(self, now: float) -> int:
        """End with BodyTimeout (408) the body reads that received no bytes
        for `body_timeout_s` before `now`, and return how many there were.

        Called periodically. A read's clock restarts at the first call that
        finds new bytes, so a read ends at most two periods after the timeout.
        """
        timeout_s = self.config.body_timeout_s
        ended = 0
        for task, waiting in self._body_readers.items():
            received = waiting[0].total_bytes
            if received != waiting[1]:
                waiting[1], waiting[2] = received, now
            elif now - waiting[2] >= timeout_s:
                ended += self._end_read(
                    task,
                    BodyTimeout(
                        f"the request body stopped arriving for {timeout_s:g} s "
                        f"after {received} bytes, so nothing was recorded; send "
                        "the whole body without pausing, then retry with the "
                        "same key"
                    ),
                )
        return ended

    def _end_read(self, task: asyncio.Task[Any], error: CmdlogError) -> bool:
        """Cancel the read so that it raises `error`; return False if it was
        ended already."""
        if task in self._ended_reads:
            return False
        self._ended_reads[task] = error
        task.cancel()
        return True

    def admit(self, path: str) -> bool:
        """Count a request to `path` in flight, or raise ShuttingDown or
        Overloaded (503). Return False for /healthz, which is not counted.

        A caller that got True calls `release` when the request ends.
        """
        if path == "/healthz":
            return False
        if self.draining:
            raise ShuttingDown(
                "the node is shutting down; retry the request on another node"
            )
        excess = self.connections() - self.config.connections_max
        if excess > 0 and self.close_idle(excess) < excess:
            overloaded = Overloaded(
                f"the node has more than {self.config.connections_max} open "
                "connections; retry after a short wait or use another node"
            )
            # Closing this connection after the response frees its slot.
            overloaded.close_connection = True
            raise overloaded
        if self.in_flight >= self.config.requests_in_flight_max:
            raise Overloaded(
                f"the node is handling {self.in_flight} requests, its limit; "
                "retry after a short wait or use another node"
            )
        self.in_flight += 1
        self._idle.clear()
        return True

    def release(self) -> None:
        """End a request that `admit` counted."""
        self.in_flight -= 1
        if not self.in_flight:
            self._idle.set()


LIMITS = web.AppKey("limits", Limits)


def make_auth(credentials: Credentials) -> Callable[[web.Request, str], None]:
    """Return the token check of a request to a path; it raises Unauthorized."""

    def authenticate(request: web.Request, path: str) -> None:
        if not credentials.enabled or path in UNAUTHENTICATED_PATHS:
            return
        header = request.headers.get("Authorization")
        if path == "/replicate":
            if credentials.scoped and credentials.peer_token is None:
                raise Unauthorized(
                    "/replicate needs the peer token, and this node has none: a "
                    "node with several principals serves streams only to peers; "
                    "start every node with the same --peer-token-file"
                )
            if not credentials.is_peer(header):
                raise Unauthorized(
                    "missing or wrong peer token on /replicate; a node sends the "
                    "cluster's peer token as 'Authorization: Bearer <token>'"
                )
        elif credentials.principals:
            principal = credentials.principal(header)
            if principal is None:
                raise Unauthorized(
                    "missing or wrong bearer token; send the header "
                    "'Authorization: Bearer <token>' with your token"
                )
            exchange(request).principal = principal

    return authenticate


def _scoped(request: web.Request, key: str) -> str:
    credentials = request.app[NODE].config.credentials
    return scope_key(key, exchange(request).principal, credentials)


# handlers


_CONTENT_ENCODINGS = ("identity", "gzip", "deflate")
"""The body encodings accepted. aiohttp decodes br and zstd only when
optional modules are installed, which this project does not require."""


def unsupported_encoding(encoding: str) -> UnsupportedMediaType:
    return UnsupportedMediaType(
        f"Content-Encoding {encoding[:40]!r} is not supported, so nothing was "
        f"recorded; send the body as {', '.join(_CONTENT_ENCODINGS)}"
    )


async def read_body(request: web.Request) -> Any:
    """Read and decode the body: 413 over the limit, 415, then 400.

    The checks that need no body come first, and a client that sent
    `Expect: 100-continue` gets 100 Continue only once they pass.
    """
    limit = request.app[NODE].config.http.body_bytes_max
    length = request.content_length
    if length is not None and length > limit:
        raise PayloadTooLarge(
            f"body of {length} bytes is over the limit of {limit} bytes; split "
            "it into smaller requests"
        )
    headers = request.headers
    if "Content-Encoding" in headers:
        # Two Content-Encoding headers make one list, and aiohttp's parser
        # decodes by the last header alone, so a list of two or more is rejected.
        encoding = ", ".join(headers.getall("Content-Encoding")).strip().lower()
        if encoding not in _CONTENT_ENCODINGS:
            raise unsupported_encoding(encoding)
    if "Transfer-Encoding" in headers:
        _check_transfer_coding(headers.getall("Transfer-Encoding"))
    fmt = wire.body_format(headers.get("Content-Type"))
    if exchange(request).expectation is not None:
        await _send_continue(request)
    try:
        data = await request.app[LIMITS].read(request)
    except web_protocol.RequestPayloadError as exc:
        # aiohttp would raise the same error again, and log it as unhandled,
        # if it read the rest of the body after the response.
        exchange(request).close_after_response = True
        raise MalformedBody(
            f"body could not be read: {exc}; check its Content-Encoding and "
            "Transfer-Encoding"
        ) from exc
    if not data:
        raise MalformedBody("body is empty; send a command as JSON or msgpack")
    return wire.decode(data, fmt)


def _check_transfer_coding(values: list[str]) -> None:
    """Raise 501 unless chunked is the body's only transfer coding.

    aiohttp's parser decodes chunked and ignores any coding listed before
    it, so the node would read such a body without undoing that coding.
    """
    codings = [part.strip().lower() for value in values for part in value.split(",")]
    if codings != ["chunked"]:
        raise UnsupportedTransferCoding(
            f"Transfer-Encoding {', '.join(codings)[:80]!r} is not supported, so "
            "nothing was recorded; send the body with Transfer-Encoding: chunked "
            "alone, or with a Content-Length, and compress it with "
            "Content-Encoding: gzip if needed"
        )


def _require_map(value: Any, what: str, fields: tuple[str, ...]) -> dict[str, Any]:
    if type(value) is not dict:
        raise MalformedBody(
            f"{what} must be a map with {', '.join(fields)}, found "
            f"{type(value).__name__}"
        )
    for name in value:
        if name not in fields:
            raise MalformedBody(
                f"{what} has an unexpected field {name!r}; it takes only "
                f"{', '.join(fields)}"
            )
    if "type" not in value:
        raise MalformedBody(f"{what} is missing the field 'type'")
    if "payload" not in value:
        raise MalformedBody(f"{what} is missing the field 'payload'")
    return value


async def post_command(request: web.Request) -> web.Response:
    node = request.app[NODE]
    metrics = request.app[METRICS]
    body = await read_body(request)
    keys = request.headers.getall("Idempotency-Key", [])
    if len(keys) > 1:
        raise InvalidKey(
            f"the request has {len(keys)} Idempotency-Key headers; send one, the "
            "same on every retry"
        )
    key = _scoped(request, parse_key(keys[0] if keys else None))
    exchange(request).command_id = key
    command = _require_map(body, "body", COMMAND_FIELDS)
    try:
        # read_body checked the whole body with codec.check_value already.
        submission = prepare_submission(
            node.app, key, command["type"], command["payload"], payload_checked=True
        )
    except UnknownCommandType as error:
        peer_url = _peer_serving(node, error.type_name)
        if peer_url is None:
            metrics.count_commands("invalid")
            raise
        metrics.count_commands("redirected")
        raise web.HTTPTemporaryRedirect(peer_url + "/commands") from error
    except ClientError:
        metrics.count_commands("invalid")
        raise
    exchange(request).command_id = submission.id

    result = (await node.submit([submission]))[0]
    if isinstance(result, KeyReused):
        metrics.count_commands("key_reused")
        raise result
    return _accepted_response(request, result, metrics)


def _peer_serving(node: Node, type_name: str) -> str | None:
    """Return the URL of a connected peer whose hello listed `type_name`."""
    for peer in node.peers.states():
        if peer.connected and type_name in peer.types:
            return peer.url
    return None


_URL_SAFE = re.compile(r"[A-Za-z0-9_.~-]+")
"""Pattern of an ID that a URL path segment takes as it is (RFC 3986's
unreserved characters), so it skips `urllib.parse.quote`."""


def _path_segment(command_id: str) -> str:
    """Return `command_id` as one URL path segment.

    The IDs `.` and `..` are percent-encoded, because a client resolving
    the URL would remove them as dot segments (RFC 3986, section 5.2.4).
    """
    if command_id in (".", ".."):
        return "%2E" * len(command_id)
    if _URL_SAFE.fullmatch(command_id):
        return command_id
    return urllib.parse.quote(command_id, safe="")


def _accepted_response(
    request: web.Request, result: Accepted, metrics: Metrics
) -> web.Response:
    view = command_view(result.command, result.outcome)
    if result.created:
        metrics.count_commands("created")
        location = "/commands/" + _path_segment(result.command.id)
        return respond(request, view, 201, {"Location": location})
    metrics.count_commands("replayed")
    return respond(request, view, 200, {"Idempotent-Replayed": "true"})


async def post_batch(request: web.Request) -> web.Response:
    node = request.app[NODE]
    metrics = request.app[METRICS]
    items_max = node.config.http.batch_items_max
    body = await read_body(request)
    if type(body) is not list:
        raise MalformedBody(
            f"batch body must be an array of {{id, type, payload}} maps, found "
            f"{type(body).__name__}"
        )
    if len(body) > items_max:
        raise PayloadTooLarge(
            f"batch has {len(body)} items; the limit is {items_max}, so split it"
        )
    for index, item in enumerate(body):
        if type(item) is not dict:
            raise MalformedBody(
                f"batch item {index} must be a map with id, type and payload, "
                f"found {type(item).__name__}"
            )

    results: list[tuple[int, Any] | None] = []
    submissions = []
    for index, item in enumerate(body):
        try:
            _require_map(item, f"batch item {index}", BATCH_ITEM_FIELDS)
            raw_id = item.get("id")
            if raw_id is not None and type(raw_id) is not str:
                raise InvalidKey(f"batch item {index}: id must be a string")
            key = _scoped(request, parse_key(raw_id, field=f"batch item {index} id"))
            submissions.append(
                prepare_submission(
                    node.app,
                    key,
                    item["type"],
                    item["payload"],
                    payload_checked=True,
                )
            )
            results.append(None)
        except ClientError as error:
            metrics.count_commands("invalid")
            results.append((error.status, error_body(error)))

    committed = iter(await node.submit(submissions)) if submissions else iter(())
    answers = []
    counts = collections.Counter[str]()
    for slot in results:
        if slot is not None:
            answers.append({"status": slot[0], "body": slot[1]})
            continue
        result = next(committed)
        if isinstance(result, KeyReused):
            counts["key_reused"] += 1
            answers.append({"status": result.status, "body": error_body(result)})
            continue
        created = result.created
        counts["created" if created else "replayed"] += 1
        answers.append(
            {
                "status": 201 if created else 200,
                "body": command_view(result.command, result.outcome),
            }
        )
    for name, count in counts.items():
        metrics.count_commands(name, count)
    return respond(request, {"results": answers})


async def get_command(request: web.Request) -> web.Response:
    requested = request.match_info["id"]
    if not ID_PATTERN.fullmatch(requested):
        raise InvalidArgument(
            f"{requested[:80]!r} cannot be a command ID: IDs are 1 to "
            f"{ID_CHARS_MAX} printable ASCII characters (0x21-0x7E); send the "
            "Idempotency-Key the command was written with"
        )
    command_id = _scoped(request, requested)
    exchange(request).command_id = command_id
    viewed = request.app[NODE].view(command_id)
    if viewed is None and command_id != requested and NATURAL_ID.fullmatch(requested):
        # IDs derived from a natural key are shared by every principal.
        viewed = request.app[NODE].view(requested)
    if viewed is None:
        raise NotFound(f"no command with ID {requested!r} is stored on this node")
    return respond(request, command_view(*viewed))


async def get_query(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    args = wire.query_args(request.query)
    result = request.app[NODE].query(name, args)
    return respond(request, {"result": result})


async def get_status(request: web.Request) -> web.Response:
    node = request.app[NODE]
    status = node.status()
    return respond(
        request,
        {
            "node": node.node_id,
            "log_instance": node.database.log_instance,
            "commands": status.commands,
            "applied": status.applied,
            "pending": status.pending,
            "log_entries": status.log_entries,
            "digest": {"state": status.state_digest, "log": status.log_digest},
            "peers": [peer.to_json() for peer in node.peers.states()],
            "conflicts": status.conflicts,
            "pending_types": status.pending_types,
            "types": node.app.type_names(),
        },
    )


async def get_replicate(request: web.Request) -> web.StreamResponse:
    node = request.app[NODE]
    return await serve_stream(request, node, node.peers.config, request.app[METRICS])


async def get_health(request: web.Request) -> web.Response:
    return respond(request, {"status": "ok", "node": request.app[NODE].node_id})


async def get_metrics(request: web.Request) -> web.Response:
    data = generate_latest(request.app[METRICS].registry)
    response = web.Response(body=data)
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


def create_app(node: Node, metrics: Metrics | None = None) -> web.Application:
    """Build the aiohttp application serving `node`."""
    metrics = metrics or Metrics()
    limits = Limits(node)
    app = web.Application(
        middlewares=[make_middleware(limits, metrics, node.config.credentials)],
        client_max_size=node.config.http.body_bytes_max,
    )
    app[NODE] = node
    app[METRICS] = metrics
    app[LIMITS] = limits
    app.router.add_post("/commands", post_command)
    app.router.add_post("/commands/batch", post_batch)
    app.router.add_get("/commands/{id:.+}", get_command)
    app.router.add_get("/queries/{name}", get_query)
    app.router.add_get("/status", get_status)
    app.router.add_get("/healthz", get_health)
    app.router.add_get("/metrics", get_metrics)
    app.router.add_get("/replicate", get_replicate)
    return app
