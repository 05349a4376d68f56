"""The server: runs one node behind aiohttp until SIGTERM or SIGINT.

Shutdown drains in order: stop accepting connections, let in-flight
requests finish (up to `shutdown_timeout_s`), commit everything the writer
has queued, close the store. A request that had not reached the writer by
then gets 503, so its client retries elsewhere and nothing half-done is
ever acknowledged. After the timeout, shutdown waits at most three times
`shutdown_close_timeout_s` for requests still running, then cancels them.
"""

from __future__ import annotations

import asyncio
import ipaddress
import signal
import ssl
import time

import structlog
from aiohttp import web

from cmdlog.app import App
from cmdlog.errors import StartupError
from cmdlog.http_api import LIMITS, Limits, create_app
from cmdlog.http_protocol import handler_factory
from cmdlog.logs import ACCESS_FLUSH_INTERVAL_S, flush_logs
from cmdlog.metrics import GaugeValue, Metrics
from cmdlog.node import Node, NodeConfig

log = structlog.get_logger(__name__)

UNPARSED_ROUTE = "unparsed"
"""The route label in /metrics of requests that aiohttp's parser rejected."""


def parse_listen(listen: str) -> tuple[str, int]:
    """Split `HOST:PORT` (IPv6 hosts in brackets); raise StartupError if malformed."""
    host, sep, port_text = listen.rpartition(":")
    if not sep or not port_text.isdigit() or not host:
        raise StartupError(
            f"--listen must be HOST:PORT, for example 127.0.0.1:7001; found {listen!r}"
        )
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise StartupError(f"--listen port {port} is outside 0-65535")
    return host.strip("[]"), port


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Server:
    """One node served over HTTP, with an orderly start and stop."""

    def __init__(self, config: NodeConfig, app: App, listen: str) -> None:
        self.host, self.port = parse_listen(listen)
        if not is_loopback(self.host) and not config.credentials.principals:
            raise StartupError(
                f"listening on {self.host}, which is not a loopback address, needs "
                "a token; pass --token-file FILE, --tokens-file FILE or set "
                "CMDLOG_TOKEN"
            )
        self.scheme = "https" if config.tls_cert else "http"
        if self.host in ("0.0.0.0", "::", "") and not config.advertise_url:
            raise StartupError(
                f"listening on {self.host} (every interface) needs --advertise URL, "
                "the address peers should use to reach this node; otherwise peers "
                f"would be told to pull from {self.host}"
            )
        self.config = config
        self.node = Node(config, app)
        self.metrics = Metrics()
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.Server | None = None
        self._limits: Limits | None = None
        self._log_flusher: asyncio.Task[None] | None = None
        self._body_sweeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.node.start()
        self._log_flusher = asyncio.create_task(_flush_access_logs())
        web_app = create_app(self.node, self.metrics)
        runner = web.AppRunner(
            web_app,
            handle_signals=False,
            # stop() has waited shutdown_timeout_s for requests already, so
            # aiohttp's cleanup waits only briefly before and after it cancels
            # those still running.
            shutdown_timeout=self.config.http.shutdown_close_timeout_s,
        )
        await runner.setup()
        limits = web_app[LIMITS]
        server = runner.server
        assert server is not None
        limits.connections = lambda: len(server.connections)
        limits.close_idle = lambda count: _close_idle(server.connections, count)
        self._body_sweeper = asyncio.create_task(_end_stalled_reads(limits))
        self.node.writer.on_commit.append(self.metrics.commits.inc)
        self.metrics.add_gauges(lambda: self._gauges(limits))
        # The listener is created here instead of by a web.TCPSite, because a
        # TCPSite makes each connection's handler with aiohttp's own class.
        make_handler = handler_factory(
            server,
            idle_timeout_s=self.config.http.idle_timeout_s,
            on_rejected=self._count_rejected,
        )
        try:
            listener = await asyncio.get_running_loop().create_server(
                make_handler,
                self.host,
                self.port,
                reuse_address=True,
                ssl=self._server_ssl(),
            )
        except OSError as exc:
            raise StartupError(
                f"cannot listen on {self.host}:{self.port}: "
                f"{exc.strerror or exc}; stop the process that uses the "
                "address, or pass another --listen"
            ) from exc
        self._runner = runner
        self._listener = listener
        self._limits = limits
        self.port = listener.sockets[0].getsockname()[1]
        if self.node.advertise_url is None:
            self.node.advertise_url = f"{self.scheme}://{self.host}:{self.port}"
        await self.node.start_peers()
        log.info(
            "server_started",
            node=self.node.node_id,
            host=self.host,
            port=self.port,
            auth=self.config.credentials.enabled,
            principals=len(set(self.config.credentials.principals.values())),
            tls=self.scheme == "https",
        )

    def _server_ssl(self) -> ssl.SSLContext | None:
        if not self.config.tls_cert:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(self.config.tls_cert, self.config.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise StartupError(
                f"cannot load the TLS certificate {self.config.tls_cert} and key "
                f"{self.config.tls_key}: {exc.strerror or exc}; pass a PEM "
                "certificate chain to --tls-cert and its key to --tls-key"
            ) from exc
        return context

    def _gauges(self, limits: Limits) -> dict[str, tuple[str, GaugeValue]]:
        status = self.node.status()
        store = self.node.database.store
        writer = self.node.writer
        http = self.config.http
        peers = self.node.peers.states()
        return {
            "cmdlog_peer_cursor": (
                "Last sequence of the peer's log stored here",
                [({"peer": p.url}, p.cursor) for p in peers],
            ),
            "cmdlog_peer_lag": (
                "Commands of the peer's log not yet stored here",
                [({"peer": p.url}, p.lag) for p in peers],
            ),
            "cmdlog_peer_connected": (
                "1 while the stream from the peer is open",
                [({"peer": p.url}, float(p.connected)) for p in peers],
            ),
            "cmdlog_replication_streams": (
                "Replication streams this node serves",
                self.node.peers.streams,
            ),
            "cmdlog_replication_streams_max": (
                "Limit of replication streams served",
                self.config.replication.streams_max,
            ),
            "cmdlog_conflicts": ("Conflicting copies recorded", status.conflicts),
            "cmdlog_commands": ("Distinct command IDs stored", status.commands),
            "cmdlog_applied": ("Commands folded, rejections included", status.applied),
            "cmdlog_pending": ("Commands stored but not folded yet", status.pending),
            "cmdlog_log_entries": ("Entries in the local log", status.log_entries),
            "cmdlog_map_bytes": ("Size of the LMDB map", store.map_bytes()),
            "cmdlog_map_used_bytes": (
                "Bytes of the LMDB map in use",
                store.used_bytes(),
            ),
            "cmdlog_store_runs": (
                "Runs of the ID index and state a read may look in",
                len(store.runs_read()),
            ),
            "cmdlog_key_filter_bytes": (
                "Memory of the key filters of the ID index and state",
                store.filter_bytes(),
            ),
            "cmdlog_writer_queue_requests": (
                "Jobs waiting for the writer",
                writer.queued(),
            ),
            "cmdlog_writer_queue_requests_max": (
                "Limit of jobs waiting for the writer",
                writer.config.queue_requests_max,
            ),
            "cmdlog_http_connections": (
                "Open client connections",
                limits.connections(),
            ),
            "cmdlog_http_connections_max": (
                "Limit of open connections",
                http.connections_max,
            ),
            "cmdlog_http_requests_in_flight": (
                "Requests being handled",
                limits.in_flight,
            ),
            "cmdlog_http_requests_in_flight_max": (
                "Limit of requests handled at once",
                http.requests_in_flight_max,
            ),
        }

    def _count_rejected(self, status: int) -> None:
        # The parser rejected the request before its method and route were
        # known, so the labels are "other" and "unparsed".
        self.metrics.observe_request("other", UNPARSED_ROUTE, status, 0.0)

    async def stop(self) -> None:
        log.info("server_stopping", node=self.node.node_id)
        await self.node.close_streams()
        if self._listener is not None and self._limits is not None:
            # aiohttp's own cleanup discards request bodies still arriving, so
            # first refuse new connections and requests, then let the requests
            # already running finish (their bodies included) before cleanup.
            self._limits.draining = True
            self._listener.close()
            await self._drain(self._limits)
        if self._runner is not None:
            await self._runner.cleanup()
        await self.node.stop()
        for task in (self._log_flusher, self._body_sweeper):
            if task is not None:
                task.cancel()
        log.info("server_stopped")

    async def _drain(self, limits: Limits) -> None:
        """Wait for in-flight requests, up to the shutdown timeout.

        Requests still waiting for their bodies then get 503, because they
        have nothing to commit.
        """
        http = self.config.http
        if await limits.wait_idle(http.shutdown_timeout_s):
            return
        in_flight = limits.in_flight
        waiting_for_body = limits.end_body_reads()
        await limits.wait_idle(http.shutdown_close_timeout_s)
        log.warning(
            "drain_timed_out",
            in_flight=in_flight,
            waiting_for_body=waiting_for_body,
            still_running=limits.in_flight,
        )

    async def serve_until_signalled(self) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        try:
            await self.start()
        except BaseException:
            # The writer thread is already running and would keep the
            # process alive (and the data directory locked) after the error.
            await self.stop()
            raise
        print(
            f"cmdlog listening on {self.scheme}://{self.host}:{self.port}", flush=True
        )
        await stop.wait()
        log.info("shutdown_signalled")
        await self.stop()


async def _end_stalled_reads(limits: Limits) -> None:
    """End request bodies that stopped arriving, checking a few times per
    body timeout and at least once a second."""
    period_s = min(1.0, limits.config.body_timeout_s / 4)
    while True:
        await asyncio.sleep(period_s)
        # Each request ended here is logged and counted with status 408.
        limits.end_stalled_reads(time.monotonic())


async def _flush_access_logs() -> None:
    while True:
        await asyncio.sleep(ACCESS_FLUSH_INTERVAL_S)
        flush_logs()


def _close_idle(connections: list[web.RequestHandler], count: int) -> int:
    """Close up to `count` of `connections` that wait for a request, oldest
    first, and return how many were closed.

    A connection waits for a request when aiohttp's handler waits on its
    `_waiter`, the state its own keep-alive timeout closes connections in.
    The connection of the request being handled is never in that state.

    NOTE: `_waiter` is private to aiohttp (read in 3.14). If a release
    renames it, no connection counts as idle, and requests over the limit
    get 503 as before; `test_idle_connections_make_room` would fail then.
    """
    closed = 0
    for handler in list(connections):
        if closed >= count:
            break
        waiter = getattr(handler, "_waiter", None)
        if waiter is not None and not waiter.done():
            handler.force_close()
            closed += 1
    return closed
