"""The simulated network of a cluster: streams between nodes, frames in
flight, and each puller's side of replication."""

from __future__ import annotations

import heapq
import random
from abc import ABC, abstractmethod
from typing import Any

from cmdlog import frames
from cmdlog.frames import FrameError, FrameReader
from cmdlog.replication import (
    Reader,
    accept_hello,
    hello_frame,
    log_head,
    parse_entries,
    parse_through,
    read_log_chunk,
)
from cmdlog.simulation.records import Counts, Message, Node, Stream, Violations
from cmdlog.simulation.settings import (
    COMMIT_P,
    CONNECT_P,
    CURSOR_APART_CRASH_P,
    FRAME_ENTRIES_MAX,
    LATENCY_MS_MAX,
    PARTITION_STEPS_MAX,
    RECENT_FRAMES_MAX,
    REPLICATION,
    SEND_P,
    SKIP_CHUNK_P,
    Fault,
)
from cmdlog.store import Txn


class Network(ABC):
    """The streams of one seed's cluster and the frames moving on them.

    `Cluster` subclasses this and sets every attribute below in its
    constructor. Node lifecycle stays in `Cluster`, which provides `_crash`
    for the `cursor_apart` fault.
    """

    rng: random.Random
    fault: Fault | None
    time_ms: int
    step: int
    counts: Counts
    violations: Violations
    nodes: list[Node]
    streams: dict[tuple[int, int], Stream]
    network: list[Message]
    """Frames in flight, a heap ordered by delivery time."""
    messages: int
    connections: int
    sides: list[int] | None
    """The side of a partition each node is on, or None while healed."""
    partition_end_step: int

    @abstractmethod
    def _crash(self, node: Node) -> None:
        """Crash a node and close the streams it takes part in."""

    # streams

    def _reachable(self, stream: Stream) -> bool:
        puller, peer = self.nodes[stream.puller], self.nodes[stream.peer]
        if puller.db is None or peer.db is None:
            return False
        return self.sides is None or self.sides[puller.index] == self.sides[peer.index]

    def _connect(self, stream: Stream) -> None:
        """Open a stream as `serve_stream` and `Puller._accept_hello` do."""
        puller, peer = self.nodes[stream.puller], self.nodes[stream.peer]
        peer_db = peer.database()
        state = puller.peers[peer.url]
        after = state.cursor
        if state.instance and state.instance != peer_db.log_instance:
            after = 0
        accept_hello(
            state,
            hello_frame(peer_db, log_head(peer_db), after=after),
            self_node=puller.node_id,
            self_boot=puller.database().boot,
        )
        record = state.to_record()
        puller.database().store.write(lambda txn: txn.peer_put(peer.url, record))

        assert not stream.inbox, "a closed stream still holds received entries"
        self.connections += 1
        stream.connection = self.connections
        stream.sent_seq = after
        stream.received_seq = state.cursor
        stream.recent = []
        stream.reader = Reader(puller.node_id, puller.database().boot)

    def _disconnect(self, stream: Stream, *, flush: bool) -> None:
        """Close a stream, after committing what arrived intact if `flush`."""
        if flush and stream.inbox:
            self._commit(stream, len(stream.inbox), crash_allowed=False)
        stream.inbox.clear()
        stream.recent.clear()
        stream.connection = 0

    def _send(self, stream: Stream) -> None:
        data = self._next_frame(stream, self.rng.randint(1, FRAME_ENTRIES_MAX))
        if data is None:
            return
        stream.recent = [*stream.recent, data][-RECENT_FRAMES_MAX:]
        self._enqueue(stream, data, duplicate=False)

    def _next_frame(self, stream: Stream, entries_max: int) -> bytes | None:
        """Read the next commands frame as `serve_stream` does, or None."""
        entries, through, head = read_log_chunk(
            self.nodes[stream.peer].database(),
            stream.sent_seq,
            entries_max=entries_max,
            bytes_max=REPLICATION.frame_bytes_max // 2,
            reader=stream.reader,
        )
        if through <= stream.sent_seq:
            return None
        stream.sent_seq = through
        frame = {"t": frames.COMMANDS, "entries": entries, "head": head}
        frame["through"] = through
        return frames.encode_frame(frame)

    def _enqueue(self, stream: Stream, data: bytes, *, duplicate: bool) -> None:
        # Frames of one connection arrive in order, as over TCP. Frames of
        # different streams overtake each other.
        latency_ms = self.rng.randint(0, LATENCY_MS_MAX)
        deliver_at_ms = max(self.time_ms + latency_ms, stream.deliver_at_ms_last)
        stream.deliver_at_ms_last = deliver_at_ms
        self.messages += 1
        key = (stream.puller, stream.peer)
        message = Message(
            deliver_at_ms, self.messages, key, stream.connection, data, duplicate
        )
        heapq.heappush(self.network, message)

    def _deliver_due(self) -> None:
        while self.network and self.network[0].deliver_at_ms <= self.time_ms:
            message = heapq.heappop(self.network)
            stream = self.streams[message.stream]
            if stream.connection == message.connection:
                self._receive(stream, message.data, duplicate=message.duplicate)

    def _receive(self, stream: Stream, data: bytes, *, duplicate: bool) -> None:
        reader = FrameReader(frame_bytes_max=REPLICATION.frame_bytes_max)
        frame = next(reader.feed(data))
        reader.close()
        try:
            entries = parse_entries(frame, after_seq=stream.received_seq)
            through = parse_through(frame, entries, after_seq=stream.received_seq)
        except FrameError as exc:
            if not duplicate:
                self.violations.add(
                    "replication",
                    f"node {stream.puller} rejected a frame from node "
                    f"{stream.peer} at step {self.step}: {exc.message}",
                )
            self._disconnect(stream, flush=True)
            return
        if duplicate:
            self.violations.add(
                "replication",
                f"node {stream.puller} took a duplicated frame from node "
                f"{stream.peer} at step {self.step} past the cursor check",
            )
        stream.inbox.extend(entries)
        if through > stream.received_seq and (not entries or through > entries[-1][0]):
            stream.inbox.append((through, None))
        stream.received_seq = through

    def _commit(self, stream: Stream, entries_max: int, *, crash_allowed: bool) -> None:
        """Ingest received entries and store the cursor, as `Puller._commit`."""
        puller, peer = self.nodes[stream.puller], self.nodes[stream.peer]
        db = puller.database()
        state = puller.peers[peer.url]
        batch = stream.inbox[:entries_max]
        del stream.inbox[:entries_max]
        commands = [command for _seq, command in batch if command is not None]
        last_seq = batch[-1][0]
        record = {**state.to_record(), "cursor": last_seq}
        source = state.source()

        if self.fault == "skip_chunk" and self.rng.random() < SKIP_CHUNK_P:
            commands = []
        if self.fault == "cursor_apart":
            db.store.write(lambda txn: txn.peer_put(peer.url, record))
            state.cursor = last_seq
            if crash_allowed and self.rng.random() < CURSOR_APART_CRASH_P:
                self._crash(puller)
                return
            report = db.store.write(lambda txn: db.engine.ingest(txn, commands))
        else:

            def work(txn: Txn) -> Any:
                report = db.engine.ingest(txn, commands, source=source)
                txn.peer_put(peer.url, record)
                return report

            report = db.store.write(work)
        state.cursor = last_seq
        self.counts.held += report.held

    # network faults

    def _duplicate(self) -> None:
        """Deliver an old frame of a stream again, on the same connection."""
        streams = [s for s in self.streams.values() if s.connection and s.recent]
        if streams:
            stream = self.rng.choice(streams)
            self._enqueue(stream, self.rng.choice(stream.recent), duplicate=True)
            self.counts.duplicates += 1

    def _redeliver(self) -> None:
        """Ingest an old frame's commands again, as if another path brought them."""
        streams = [s for s in self.streams.values() if s.recent]
        if streams:
            stream = self.rng.choice(streams)
            frame = next(
                FrameReader(frame_bytes_max=REPLICATION.frame_bytes_max).feed(
                    self.rng.choice(stream.recent)
                )
            )
            commands = [command for _seq, command in parse_entries(frame, after_seq=0)]
            report = self.nodes[stream.puller].database().ingest(commands)
            self.counts.held += report.held
            self.counts.duplicates += 1

    def _partition(self) -> None:
        sides = [self.rng.randrange(2) for _ in self.nodes]
        if len(set(sides)) < 2:
            return
        self.sides = sides
        self.partition_end_step = self.step + self.rng.randint(10, PARTITION_STEPS_MAX)
        for stream in self.streams.values():
            if stream.connection and not self._reachable(stream):
                self._disconnect(stream, flush=True)
        self.counts.partitions += 1

    # moving frames

    def _move_frames(self) -> None:
        rng = self.rng
        for stream in self.streams.values():
            if not stream.connection:
                if self._reachable(stream) and rng.random() < CONNECT_P:
                    self._connect(stream)
            elif rng.random() < SEND_P:
                self._send(stream)
        self._deliver_due()
        for stream in self.streams.values():
            up = self.nodes[stream.puller].db is not None
            if stream.inbox and up and rng.random() < COMMIT_P:
                self._commit(
                    stream, rng.randint(1, len(stream.inbox)), crash_allowed=True
                )

    def _pull_all(self, stream: Stream, entries_max: int) -> int:
        """Pull what follows the stream's cursor until about `entries_max`
        entries came, and return how many came."""
        moved = 0
        self._connect(stream)
        while moved < entries_max:
            sent_before = stream.sent_seq
            data = self._next_frame(stream, REPLICATION.frame_entries_max)
            if data is None:
                break
            self._receive(stream, data, duplicate=False)
            self._commit(stream, len(stream.inbox), crash_allowed=False)
            moved += stream.sent_seq - sent_before
        self._disconnect(stream, flush=True)
        return moved
