"""Peering: the HTTP transport of replication, both ends of `GET /replicate`.

The serving end streams the local log from a cursor: first what is stored,
then each commit as it lands, with heartbeats while idle. It reads LMDB in
bounded chunks and awaits the socket between chunks, so a slow reader costs
one chunk of memory and is served from the log at its own position, and a
reader that takes nothing for two heartbeat intervals is dropped.

The pulling end, one `Puller` per peer, reads frames into a small bounded
queue; an ingester takes them off, folds up to `ingest_commands_max`
commands per transaction and stores the cursor in that same transaction.
Connection failures are retried with capped exponential backoff and
jitter. A frame over the size limit, a corrupt frame, or a peer of another
protocol version stops the puller with the cursor where it was. A peer that
runs with a node ID another running process has (see `cmdlog.peers`) is
rejected and tried again at the longest backoff, since the fix is made on
the other side.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import structlog
from aiohttp import web

from cmdlog import epochs, frames, replication, wire
from cmdlog.config import ReplicationConfig
from cmdlog.engine import IngestReport
from cmdlog.errors import (
    DataError,
    DuplicateNodeId,
    InvalidArgument,
    Overloaded,
    VersionMismatch,
)
from cmdlog.frames import FrameError, FrameReader, encode_frame
from cmdlog.metrics import Metrics
from cmdlog.model import Command
from cmdlog.replication import PeerState
from cmdlog.store import Txn

log = structlog.get_logger(__name__)

STREAM_CONTENT_TYPE = "application/x-cmdlog-frames"
READ_CHUNK_BYTES = 64 * 1024

_Received = tuple[list[tuple[int, Command]], int, str | None]
"""A commands frame as the puller queues it: its entries, the sequence
number it covers through, and the peer's epoch of that number."""


class CommitSignal:
    """Wakes every stream waiting for the next commit.

    `current()` returns an event that the next commit sets; a stream takes
    it before reading the log, so a commit that lands between its read and
    its wait still wakes it and nothing is missed at the hand-off.
    """

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self._loop = asyncio.get_running_loop()

    def current(self) -> asyncio.Event:
        return self._event

    def fire(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    def fire_threadsafe(self) -> None:
        self._loop.call_soon_threadsafe(self.fire)


PEER_URL_BYTES_MAX = 511
"""Maximum UTF-8 length of a peer URL. The `peers` database is keyed by the
URL, and LMDB rejects a key over 511 bytes (`max_key_size()` in py-lmdb 3.0),
which fails the whole group commit, other clients' writes included."""


URL_SHOWN_CHARS = 80
"""Characters of an unusable URL that an error message repeats."""


def normalize_url(url: str) -> str:
    """Return a peer URL without trailing slash; raise InvalidArgument if unusable."""
    quoted_url = repr(
        url if len(url) <= URL_SHOWN_CHARS else url[:URL_SHOWN_CHARS] + "..."
    )
    try:
        parsed = urllib.parse.urlsplit(url.strip())
        hostname = parsed.hostname
        parsed.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError as exc:
        raise InvalidArgument(f"peer URL {quoted_url} is malformed: {exc}") from exc
    if parsed.scheme not in ("http", "https") or not hostname:
        raise InvalidArgument(
            f"peer URL {quoted_url} is not an http:// or https:// URL with a host"
        )
    if parsed.username is not None or parsed.password is not None:
        # It would be stored, shown in /status and logged.
        raise InvalidArgument(
            "peer URL carries a user name or password; remove it and give "
            "nodes the peer token with --peer-token-file"
        )
    normalized = urllib.parse.urlunsplit(
        (parsed.scheme, parsed.netloc, parsed.path.rstrip("/"), "", "")
    )
    if len(normalized.encode()) > PEER_URL_BYTES_MAX:
        raise InvalidArgument(
            f"peer URL {quoted_url} has {len(normalized.encode())} bytes, over the "
            f"limit of {PEER_URL_BYTES_MAX}; use a shorter host name or path"
        )
    return normalized


async def serve_stream(
    request: web.Request,
    node: Any,
    config: ReplicationConfig,
    metrics: Metrics,
) -> web.StreamResponse:
    """Stream the local log after `?after=SEQ` until the node stops or the
    reader goes away.

    A reader that names itself with `?node=ID&boot=BOOT` (its node ID and
    process) is not sent the copies this node received from that process, and
    frames then carry `through`, the last sequence number they cover.
    """
    wire.query_args(request.query)  # raises for an argument given twice
    try:
        replication.check_version(_int_arg(request, "version", default=1))
    except VersionMismatch as exc:
        raise InvalidArgument(exc.message) from exc
    after = _int_arg(request, "after", default=0)
    reader = _reader_arg(request)
    reader_epoch = _epoch_arg(request)
    database = node.database
    instance = request.query.get("instance")
    if instance and instance != database.log_instance:
        # The cursor counts in another log; this one is read from its start.
        after = 0
    announce = request.query.get("announce")
    announced = normalize_url(announce) if announce else None
    slot = node.peers.take_stream_slot(reader, remote=request.remote)
    if slot is None:
        raise Overloaded(
            f"this node already serves {config.streams_max} replication streams; "
            "retry later"
        )
    try:
        if announced:
            await node.peers.learn(announced)
        response = web.StreamResponse(headers={"Content-Type": STREAM_CONTENT_TYPE})
        response.force_close()  # an ended stream ends its connection too
        await response.prepare(request)
        log.info("stream_opened", after_seq=after, remote=request.remote)
        await _stream(
            response,
            node,
            config,
            metrics,
            slot,
            after=after,
            reader_epoch=reader_epoch,
            reader=reader,
            remote=request.remote,
        )
    finally:
        node.peers.release_stream_slot(slot)
    return response


async def _stream(
    response: web.StreamResponse,
    node: Any,
    config: ReplicationConfig,
    metrics: Metrics,
    slot: StreamSlot,
    *,
    after: int,
    reader_epoch: str | None,
    reader: replication.Reader | None,
    remote: str | None,
) -> None:
    """Write the hello and then the log to `response` until the node stops,
    the reader goes away, or `slot` is ended."""
    database = node.database
    write_timeout_s = 2 * config.heartbeat_interval_s
    loop = asyncio.get_running_loop()
    try:
        head = replication.log_head(database)
        start = epochs.resume_point(database.epochs, head, after, reader_epoch)
        if start < after:
            log.warning(
                "stream_rewound",
                requested_after=after,
                after_seq=start,
                remote=remote,
                hint="this log went back, as after a restore from a backup",
            )
        hello = replication.hello_frame(
            database, head, after=start, rewound=start < after
        )
        await _write(response, hello, write_timeout_s)
        written_at = loop.time()
        cursor = start
        while not node.closing.is_set() and not slot.ended.is_set():
            wake = node.commit_signal.current()
            entries, through, head = replication.read_log_chunk(
                database,
                cursor,
                entries_max=config.frame_entries_max,
                bytes_max=config.frame_bytes_max // 2,
                reader=reader,
            )
            if through > cursor:
                frame = {
                    "t": frames.COMMANDS,
                    "entries": entries,
                    "head": head,
                    "epoch": epochs.boot_at(database.epochs, through),
                }
                if reader is not None:
                    frame["through"] = through
                await _write(response, frame, write_timeout_s)
                written_at = loop.time()
                metrics.count_stream_entries(
                    sent=len(entries), skipped=through - cursor - len(entries)
                )
                cursor = through
                continue
            # A commit that appends nothing (a retried write, a peer's
            # cursor) wakes the stream too, so the next heartbeat is due one
            # interval after the last write, not after the last wake.
            ended = (wake, node.closing, slot.ended)
            wait_s = written_at + config.heartbeat_interval_s - loop.time()
            if wait_s > 0 and await _wait_any(ended, wait_s):
                continue
            await _write(
                response, {"t": frames.HEARTBEAT, "head": head}, write_timeout_s
            )
            written_at = loop.time()
        if slot.ended.is_set():
            log.info("stream_closed", reason="replaced", remote=remote)
    except (ConnectionError, TimeoutError) as exc:
        log.info("stream_closed", reason=type(exc).__name__, remote=remote)


async def _write(
    response: web.StreamResponse, frame: dict[str, Any], timeout_s: float
) -> None:
    # Awaiting the write is the backpressure: aiohttp waits for the socket to
    # drain. A reader that takes nothing for `timeout_s` is given up on.
    async with asyncio.timeout(timeout_s):
        await response.write(encode_frame(frame))


async def _wait_any(events: tuple[asyncio.Event, ...], timeout_s: float) -> bool:
    """Wait for any of `events`; return False on timeout."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        done, _pending = await asyncio.wait(
            waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        for waiter in waiters:
            waiter.cancel()
    return bool(done)


def _epoch_arg(request: web.Request) -> str | None:
    """Return the `?epoch=` a reader recorded for its cursor, or None without one."""
    epoch = request.query.get("epoch")
    if epoch is None:
        return None
    if not replication.BOOT_PATTERN.fullmatch(epoch):
        raise InvalidArgument(
            f"epoch {epoch[:80]!r} is not a boot name (1 to 64 hex digits); "
            "send the epoch of the last commands frame read, or none"
        )
    return epoch


def _reader_arg(request: web.Request) -> replication.Reader | None:
    """Return the reader named by `?node=` and `?boot=`, or None without them."""
    node, boot = request.query.get("node"), request.query.get("boot")
    if node is None and boot is None:
        return None
    for name, value in (("node", node), ("boot", boot)):
        if value is None or not replication.BOOT_PATTERN.fullmatch(value):
            raise InvalidArgument(
                f"?{name}= must be 1 to 64 lowercase hex digits, found {value!r}; "
                "a reader sends both ?node= and ?boot= or neither"
            )
    assert node is not None and boot is not None
    return replication.Reader(node, boot)


def _int_arg(request: web.Request, name: str, *, default: int) -> int:
    text = request.query.get(name)
    if text is None:
        return default
    if not (text.isascii() and text.isdigit() and len(text) <= 19):
        raise InvalidArgument(
            f"?{name}= must be a non-negative integer, found {text!r}"
        )
    return int(text)


class Puller:
    """Pulls one peer's log into the local node, for as long as the node runs."""

    def __init__(self, node: Any, peer: PeerState, config: ReplicationConfig) -> None:
        self.node = node
        self.peer = peer
        self.config = config
        self.stopped_by_error = False
        self.streams_opened = 0
        self._activity = asyncio.Event()
        """An event set and replaced when a frame arrives or the stream ends."""
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"puller {self.peer.url}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        try:
            await self._pull_forever()
        except Exception as exc:
            # Nothing may end a puller silently: the error shows in /status
            # and the log, and the node goes on serving and stops cleanly.
            self._stop_on_error(f"{type(exc).__name__}: {exc}", exc)

    async def _pull_forever(self) -> None:
        backoff_s = self.config.backoff_initial_s
        timeout = aiohttp.ClientTimeout(
            total=None,
            connect=self.config.connect_timeout_s,
            sock_read=self.config.read_idle_timeout_s,
        )
        connector = aiohttp.TCPConnector(ssl=self.node.client_ssl() or True)
        async with aiohttp.ClientSession(
            timeout=timeout, connector=connector
        ) as session:
            while True:
                try:
                    received = await self._pull(session)
                    if received:
                        backoff_s = self.config.backoff_initial_s
                    self.peer.error = "stream ended"
                except (FrameError, VersionMismatch) as exc:
                    self._stop_on_error(exc.message)
                    return
                except DuplicateNodeId as exc:
                    # The fix is made at the peer, which is tried again at
                    # the longest backoff.
                    backoff_s = self.config.backoff_max_s
                    self.peer.error = exc.message
                    log.error(
                        "duplicate_node_detected",
                        peer=self.peer.url,
                        error=self.peer.error,
                        retry_in_s=round(backoff_s, 2),
                    )
                except PeerRefused as exc:
                    self.peer.error = str(exc)
                    log.warning(
                        "peer_refused",
                        peer=self.peer.url,
                        error=self.peer.error,
                        retry_in_s=round(backoff_s, 2),
                    )
                except (aiohttp.ClientError, TimeoutError, OSError, DataError) as exc:
                    was_connected = self.peer.connected
                    self.peer.error = f"{type(exc).__name__}: {exc}"
                    log.info(
                        "peer_disconnected" if was_connected else "peer_unreachable",
                        peer=self.peer.url,
                        error=self.peer.error,
                        retry_in_s=round(backoff_s, 2),
                    )
                finally:
                    self.peer.connected = False
                    self._signal_activity()
                await asyncio.sleep(backoff_s * random.uniform(0.5, 1.0))
                backoff_s = min(backoff_s * 2, self.config.backoff_max_s)

    def _signal_activity(self) -> None:
        self._activity.set()
        self._activity = asyncio.Event()

    async def sends_again(self, timeout_s: float) -> bool:
        """Wait for the next frame of the current stream, and return True if one
        arrives within `timeout_s` and the stream is still open."""
        stream = self.streams_opened
        activity = self._activity
        try:
            async with asyncio.timeout(timeout_s):
                await activity.wait()
        except TimeoutError:
            return False
        return self.peer.connected and self.streams_opened == stream

    def _stop_on_error(self, error: str, unexpected: Exception | None = None) -> None:
        """Record why the puller stops; an `unexpected` error is logged with
        its traceback, as `puller_failed`."""
        self.stopped_by_error = True
        self.peer.error = error
        if unexpected is None:
            log.error("puller_stopped", peer=self.peer.url, error=error)
        else:
            log.error("puller_failed", peer=self.peer.url, exc_info=unexpected)

    async def _pull(self, session: aiohttp.ClientSession) -> bool:
        """Read one stream until it ends; return True if any frame arrived."""
        query = {
            "after": str(self.peer.cursor),
            "version": str(frames.PROTOCOL_VERSION),
        }
        if self.peer.instance:
            query["instance"] = self.peer.instance
        if self.peer.epoch and self.peer.cursor > 0:
            # Lets the peer notice that its log went back past the cursor.
            query["epoch"] = self.peer.epoch
        # Naming this node and process lets the peer skip the copies it
        # received from here.
        query["node"] = self.node.node_id
        query["boot"] = self.node.database.boot
        if self.node.advertise_url:
            query["announce"] = self.node.advertise_url
        url = f"{self.peer.url}/replicate?{urllib.parse.urlencode(query)}"
        async with session.get(url, headers=self.node.peer_headers()) as response:
            if response.status != 200:
                text = (await response.text())[:500]
                if response.status == 400 and "version" in text:
                    raise VersionMismatch(f"{self.peer.url} refused the stream: {text}")
                raise PeerRefused(self.peer.url, response.status, text)
            self.streams_opened += 1
            reader = FrameReader(frame_bytes_max=self.config.frame_bytes_max)
            queue: asyncio.Queue[_Received | None] = asyncio.Queue(
                self.config.queue_frames_max
            )
            ingester = asyncio.create_task(self._ingest(queue))
            try:
                await self._read_frames(response, reader, queue, ingester)
            finally:
                if not ingester.done():
                    ingester.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ingester
            return True

    async def _read_frames(
        self,
        response: aiohttp.ClientResponse,
        reader: FrameReader,
        queue: asyncio.Queue[_Received | None],
        ingester: asyncio.Task[None],
    ) -> None:
        try:
            await self._read_stream(response, reader, queue, ingester)
        except (aiohttp.ClientPayloadError, DataError, ConnectionError):
            # The connection broke or a frame is bad: fold the frames that
            # arrived intact before it, then retry or stop.
            await _put_or_fail(queue, None, ingester)
            await ingester
            raise
        await _put_or_fail(queue, None, ingester)
        await ingester

    async def _read_stream(
        self,
        response: aiohttp.ClientResponse,
        reader: FrameReader,
        queue: asyncio.Queue[_Received | None],
        ingester: asyncio.Task[None],
    ) -> None:
        hello_seen = False
        received_seq = self.peer.cursor
        async for chunk in response.content.iter_chunked(READ_CHUNK_BYTES):
            for frame in reader.feed(chunk):
                self._signal_activity()
                if not hello_seen:
                    await self._accept_hello(frame)
                    received_seq = self.peer.cursor
                    hello_seen = True
                    continue
                kind = frame["t"]
                head = frame.get("head")
                if type(head) is int:
                    self.peer.head = head
                if kind == frames.COMMANDS:
                    entries = replication.parse_entries(frame, after_seq=received_seq)
                    through = replication.parse_through(
                        frame, entries, after_seq=received_seq
                    )
                    if through > received_seq:
                        received_seq = through
                        epoch = replication.parse_boot(frame.get("epoch"))
                        await _put_or_fail(queue, (entries, through, epoch), ingester)
                elif kind != frames.HEARTBEAT:
                    raise FrameError(f"unknown replication frame kind {kind!r}")
        reader.close()

    async def _accept_hello(self, hello: dict[str, Any]) -> None:
        cursor_before = self.peer.cursor
        reset = replication.accept_hello(
            self.peer,
            hello,
            self_node=self.node.node_id,
            self_boot=self.node.database.boot,
        )
        await self.node.peers.check_pulled_once(self.peer)
        # Nothing may await between the check and this line, so that when
        # two hellos arrive together, the second check finds the first puller
        # connected.
        self.peer.connected = True
        self.peer.error = None
        record = self.peer.to_record()
        url = self.peer.url
        await self.node.writer.run(lambda txn: txn.peer_put(url, record))
        if reset and hello.get("rewound") is True:
            log.warning(
                "peer_log_rewound",
                peer=url,
                node=self.peer.node,
                cursor_before=cursor_before,
                cursor=self.peer.cursor,
                hint="the peer's log went back, as after a restore from a backup",
            )
        elif reset:
            log.warning("peer_log_replaced", peer=url, node=self.peer.node)
        log.info(
            "peer_connected",
            peer=url,
            node=self.peer.node,
            cursor=self.peer.cursor,
            head=self.peer.head,
        )

    async def _ingest(self, queue: asyncio.Queue[_Received | None]) -> None:
        """Fold queued entries, a sorted batch per transaction, with the cursor."""
        done = False
        while not done:
            received = await queue.get()
            if received is None:
                return
            batch, through, epoch = list(received[0]), received[1], received[2]
            while len(batch) < self.config.ingest_commands_max and not queue.empty():
                more = queue.get_nowait()
                if more is None:
                    done = True
                    break
                batch += more[0]
                through, epoch = more[1], more[2]
            await self._commit(batch, through, epoch)

    async def _commit(
        self, batch: list[tuple[int, Command]], through: int, epoch: str | None
    ) -> None:
        """Ingest `batch` and store the cursor `through` in one transaction."""
        commands = [command for _seq, command in batch]
        url = self.peer.url
        source = self.peer.source()
        record = {**self.peer.to_record(), "cursor": through, "epoch": epoch}
        engine = self.node.database.engine

        def work(txn: Txn) -> IngestReport:
            report = IngestReport()
            if commands:
                report = engine.ingest(txn, commands, source=source)
            txn.peer_put(url, record)
            return report

        report = await self.node.writer.run(work, size=len(commands))
        self.peer.cursor, self.peer.epoch = through, epoch
        if report.conflicts:
            self.node.conflicts_seen += len(report.conflicts)


class PeerRefused(Exception):
    """An error status from a peer's /replicate. The puller retries after it."""

    def __init__(self, url: str, status: int, text: str) -> None:
        try:
            message = json.loads(text)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = text
        fix = ""
        if status == 401:
            fix = (
                "; give this node the cluster's peer token with "
                "--peer-token-file FILE or CMDLOG_PEER_TOKEN"
            )
        super().__init__(f"{url} refused the stream with {status}: {message}{fix}")


async def _put_or_fail(
    queue: asyncio.Queue[_Received | None],
    item: _Received | None,
    ingester: asyncio.Task[None],
) -> None:
    """Queue `item`, or re-raise the ingester's error if it has stopped."""
    put = asyncio.ensure_future(queue.put(item))
    await asyncio.wait([put, ingester], return_when=asyncio.FIRST_COMPLETED)
    if not put.done():
        put.cancel()
        await ingester  # raises the ingester's error
        raise DataError("the ingester stopped without an error")


@dataclass(eq=False)
class StreamSlot:
    """One stream this node serves, and the reader it named, if any."""

    reader: replication.Reader | None
    remote: str | None = None
    """The reader's address, for messages."""
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    """Set to end the stream: its reader opened a new one, or another took it."""
