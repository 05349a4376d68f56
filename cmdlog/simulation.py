"""A seeded simulation of a cmdlog cluster: several nodes in one process.

Each node is a real `Database` on its own LMDB directory with a simulated
wall clock. Nodes pull each other's logs over simulated streams that run the
replication logic of the HTTP transport: `read_log_chunk`, the hello checks,
`parse_entries`, and the cursor stored in the transaction that ingests the
commands. The simulated network delays, drops, duplicates and reorders
frames, and partitions the cluster for a while. Clients submit ledger
commands to random nodes, retry through other nodes and reuse keys. Nodes
crash (the `Database` is closed between steps) and restart from their
directory, and now and then a node's directory is replaced by an empty one.
At the end the cluster is healed and settles, and every promise is checked:
at most once, no acknowledged loss, convergence, replay, the choice of each
ID's copy by canonical order, and the ledger's own rules. Two checks go
beyond the promises: replication must settle, and no log may contain the
same copy of a command twice.

Every random choice comes from one `random.Random(seed)`, node IDs
included, so a failing seed replays exactly with
`python -m cmdlog.simulation --seeds 1 --start SEED --verbose`.

Where this departs from the HTTP transport: a frame delivered twice within
one connection (which TCP never does) is caught by the cursor check of
`parse_entries`, and the simulated puller then reconnects from its stored
cursor where the real one stops. Sockets, backoff timers and the writer
thread's group commit are not modelled, so each delivery is one transaction.
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import random
import shutil
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from structlog.testing import capture_logs

from cmdlog import codec, fold, frames
from cmdlog.app import App
from cmdlog.apps.ledger import ledger
from cmdlog.config import MIB, ClockConfig, ReplicationConfig, StoreConfig
from cmdlog.database import Database
from cmdlog.engine import Accepted, Status, Submission, prepare_submission
from cmdlog.errors import KeyReused, NotFound
from cmdlog.frames import FrameError, FrameReader
from cmdlog.hlc import stamp_ms
from cmdlog.model import APPLIED, Command, Outcome, order_key, split_order_key
from cmdlog.replay import replay
from cmdlog.replication import (
    PeerState,
    accept_hello,
    hello_frame,
    parse_entries,
    read_log_chunk,
)
from cmdlog.store import Store, Txn

APP = App([ledger])
REPLICATION = ReplicationConfig()
Fault = Literal["skip_chunk", "cursor_apart"]
"""A deliberate bug in delivery, to show that the checks can fail.
`skip_chunk` commits a chunk's cursor without its commands. `cursor_apart`
stores the cursor in its own transaction before the commands, and now and
then the node crashes between the two."""

EPOCH_MS = 1_700_000_000_000
"""Simulated time starts in November 2023. `replay` folds with the real
clock, so simulated stamps must lie in the real past or it would hold them."""
STEPS_DEFAULT = 300
STEP_MS_MAX = 20
LATENCY_MS_MAX = 80
SKEW_MS_MAX = 2_000
CLOCK_OFFSET_MS_MAX = 400
FAST_CLOCK_AHEAD_MS_MAX = 6_000
"""How far beyond the allowed skew a fast node's clock runs."""
UNDO_HORIZONS_COMMANDS = (16, 100_000)
"""Undo horizons a seed picks from. The small one forces full re-folds."""
MAP_BYTES_INITIAL = 4 * MIB
FRAME_ENTRIES_MAX = 8
RECENT_FRAMES_MAX = 4
BATCH_ITEMS_MAX = 3
RESTART_STEPS_MAX = 20
PARTITION_STEPS_MAX = 80
SETTLE_ROUNDS_MAX = 10
SETTLE_ENTRIES_MAX = 50_000
"""Entries the settling cluster may move before the nodes converge."""
VIOLATIONS_PER_PROMISE_MAX = 5

# Chances per step, or per stream and step for the replication ones.
SUBMIT_P = 0.5
RETRY_ELSEWHERE_P = 0.15
CONNECT_P = 0.3
SEND_P = 0.4
COMMIT_P = 0.5
RELEASE_P = 0.05
CRASH_P = 0.012
DROP_P = 0.03
DUPLICATE_P = 0.03
REDELIVER_P = 0.02
PARTITION_P = 0.01
FAST_CLOCK_P = 0.3
"""Chance per seed that one node's clock runs beyond the allowed skew."""
CLOCK_FIX_P = 0.004
REPLACE_P = 0.002
SKIP_CHUNK_P = 0.2
CURSOR_APART_CRASH_P = 0.2

ACCOUNTS = {"acct-0": "EUR", "acct-1": "EUR", "acct-2": "EUR", "acct-3": "USD"}
HOT_ACCOUNT = "acct-0"
Item = tuple[str, str, dict[str, Any]]
"""A client request: Idempotency-Key, command type and payload."""


@dataclass(frozen=True, slots=True)
class SimReport:
    """The result of one simulated run: event counts and broken promises."""

    seed: int
    nodes: int
    steps: int
    commands: int
    """Distinct command IDs on the settled cluster."""
    conflicts: int
    """Stored copies whose payload differs from the kept copy's, on the
    node that recorded most."""
    rewinds: int
    full_refolds: int
    counts: dict[str, int]
    """How often each simulated event happened, from `_Counts`."""
    violations: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.violations


@dataclass(slots=True)
class _Counts:
    """How often each event happened in one run.

    `settle_rounds` is the round in which the healed cluster moved nothing,
    or 0 when it did not settle, and `settle_entries` counts the log entries
    pulled while it settled. `held` counts commands stored pending, as
    `IngestReport.held` does.
    """

    submissions: int = 0
    acknowledged: int = 0
    key_reused: int = 0
    crashes: int = 0
    drops: int = 0
    duplicates: int = 0
    partitions: int = 0
    clock_fixes: int = 0
    replacements: int = 0
    held: int = 0
    settle_rounds: int = 0
    settle_entries: int = 0


class _Violations:
    """Broken promises, the first few of each kind in full, the rest counted."""

    def __init__(self) -> None:
        self.items: list[str] = []
        self.per_promise: dict[str, int] = {}

    def add(self, promise: str, message: str) -> None:
        count = self.per_promise.get(promise, 0) + 1
        self.per_promise[promise] = count
        if count <= VIOLATIONS_PER_PROMISE_MAX:
            self.items.append(f"{promise}: {message}")

    def summary(self) -> tuple[str, ...]:
        more = [
            f"{promise}: {count - VIOLATIONS_PER_PROMISE_MAX} more violations"
            for promise, count in self.per_promise.items()
            if count > VIOLATIONS_PER_PROMISE_MAX
        ]
        return (*self.items, *more)


@dataclass(slots=True)
class _Node:
    index: int
    path: Path
    node_id: str
    offset_ms: int
    fast: bool
    """The clock ran beyond the allowed skew at some point of the run."""
    db: Database | None = None
    restart_step: int = 0
    peers: dict[str, PeerState] = field(default_factory=dict)
    acknowledged: list[str] = field(default_factory=list)
    stamp_last: int = 0
    """The newest stamp this node gave a client's command."""

    @property
    def url(self) -> str:
        return f"sim://node-{self.index}"

    def database(self) -> Database:
        assert self.db is not None, f"node {self.index} is down"
        return self.db


@dataclass(slots=True)
class _Stream:
    """One puller's stream from one peer. `connection` is 0 while closed."""

    puller: int
    peer: int
    connection: int = 0
    sent_seq: int = 0
    received_seq: int = 0
    deliver_at_ms_last: int = 0
    inbox: list[tuple[int, Command]] = field(default_factory=list)
    """Entries received but not yet committed, lost if the puller crashes."""
    recent: list[bytes] = field(default_factory=list)


@dataclass(order=True, slots=True)
class _Message:
    deliver_at_ms: int
    number: int
    stream: tuple[int, int] = field(compare=False)
    connection: int = field(compare=False)
    data: bytes = field(compare=False)
    duplicate: bool = field(compare=False)


@dataclass(slots=True)
class _Snapshot:
    """One settled node's log, index and fold, read for the checks."""

    node: int
    status: Status
    copies: list[Command]
    kept_keys: dict[str, bytes]
    """Order key of the copy each ID names."""
    folded: list[tuple[bytes, Outcome, Command]]
    balances: dict[str, Any]


class _Workload:
    """Client requests: new commands, retries and reused keys."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.sent: list[Item] = []
        self.referenced: list[dict[str, Any]] = []
        self.unopened = list(ACCOUNTS)
        self.keys = 0

    def next_batch(self) -> list[Item]:
        return [self._next_item() for _ in range(self.rng.randint(1, BATCH_ITEMS_MAX))]

    def _new_key(self) -> str:
        self.keys += 1
        return f"key-{self.keys}"

    def _next_item(self) -> Item:
        rng = self.rng
        roll = rng.random()
        if self.unopened:
            account = self.unopened.pop(0)
            opening = {"account": account, "currency": ACCOUNTS[account]}
            item: Item = (self._new_key(), "ledger.open", opening)
        elif roll < 0.12 and self.sent:
            return rng.choice(self.sent)
        elif roll < 0.17 and self.sent:
            key, type_name, payload = rng.choice(self.sent)
            return key, type_name, self._altered(type_name, payload)
        elif roll < 0.25 and self.referenced:
            # The natural key names the charge, so a new key is still a retry,
            # unless the amount differs, which reuses the charge's ID.
            payload = dict(rng.choice(self.referenced))
            if rng.random() < 0.3:
                payload["amount"] += 1
            return self._new_key(), "ledger.charge", payload
        else:
            item = (self._new_key(), *self._fresh())
        self.sent.append(item)
        return item

    def _fresh(self) -> tuple[str, dict[str, Any]]:
        rng = self.rng
        accounts = list(ACCOUNTS)
        roll = rng.random()
        if roll < 0.35:
            return "ledger.deposit", {
                "account": rng.choice(accounts),
                "amount": rng.randint(1, 100),
            }
        if roll < 0.6:
            return "ledger.charge", {
                "account": rng.choice(accounts),
                "amount": rng.randint(1, 150),
            }
        if roll < 0.7:
            # Large charges on one account: together they would overdraw it.
            return "ledger.charge", {
                "account": HOT_ACCOUNT,
                "amount": rng.randint(100, 400),
            }
        if roll < 0.82:
            payload = {
                "account": rng.choice(accounts),
                "amount": rng.randint(1, 80),
                "reference": f"ref-{len(self.referenced) + 1}",
            }
            self.referenced.append(payload)
            return "ledger.charge", payload
        source, target = rng.sample(accounts, 2)
        return "ledger.transfer", {
            "from": source,
            "to": target,
            "amount": rng.randint(1, 120),
        }

    def _altered(self, type_name: str, payload: dict[str, Any]) -> dict[str, Any]:
        if type_name == "ledger.open":
            return {**payload, "currency": "GBP"}
        return {**payload, "amount": payload["amount"] + self.rng.randint(1, 9)}


class _Cluster:
    """The simulated nodes, network and clients of one seed."""

    def __init__(
        self, seed: int, node_count: int, root: Path, fault: Fault | None
    ) -> None:
        self.rng = random.Random(seed)
        self.fault = fault
        self.time_ms = EPOCH_MS
        self.step = 0
        self.counts = _Counts()
        self.violations = _Violations()
        self.store_config = StoreConfig(
            durable=False,
            map_bytes_initial=MAP_BYTES_INITIAL,
            undo_horizon_commands=self.rng.choice(UNDO_HORIZONS_COMMANDS),
        )
        self.clock_config = ClockConfig(skew_ms_max=SKEW_MS_MAX)

        self.nodes = [self._create_node(root, index) for index in range(node_count)]
        if node_count > 1 and self.rng.random() < FAST_CLOCK_P:
            fast = self.rng.choice(self.nodes)
            fast.fast = True
            fast.offset_ms = SKEW_MS_MAX + self.rng.randint(1, FAST_CLOCK_AHEAD_MS_MAX)

        self.streams = {
            (puller.index, peer.index): _Stream(puller.index, peer.index)
            for puller in self.nodes
            for peer in self.nodes
            if puller is not peer
        }
        self.network: list[_Message] = []
        self.messages = 0
        self.connections = 0
        self.sides: list[int] | None = None
        self.partition_end_step = 0

        self.stamp_max = 0
        self.acknowledged: dict[str, int] = {}
        """Every acknowledged command ID, with the node that first took it."""
        self.workload = _Workload(self.rng)
        for node in self.nodes:
            self._open(node)

    # nodes

    def _create_node(self, root: Path, index: int) -> _Node:
        offset_ms = self.rng.randint(-CLOCK_OFFSET_MS_MAX, CLOCK_OFFSET_MS_MAX)
        node = _Node(index, root / f"node-{index}", "", offset_ms, fast=False)
        self._create_store(node)
        return node

    def _create_store(self, node: _Node) -> None:
        # Database would draw the node ID from `secrets`, and the ID is part of
        # the canonical order, so the simulation writes a seeded one first.
        node.node_id = f"{self.rng.getrandbits(64):016x}"
        instance = f"{self.rng.getrandbits(128):032x}"

        def write_identity(txn: Txn) -> None:
            txn.meta_put("node_id", node.node_id)
            txn.meta_put("log_instance", instance)

        store = Store(node.path, list(APP.domains), self.store_config)
        store.write(write_identity)
        store.close()

    def _open(self, node: _Node) -> None:
        db = Database(
            node.path,
            APP,
            store_config=self.store_config,
            clock_config=self.clock_config,
            now_ms=lambda: self.time_ms + node.offset_ms,
        )
        node.db = db
        with db.store.read() as txn:
            stored = txn.peers()
        node.peers = {}
        for other in self.nodes:
            if other is not node:
                record = stored.get(other.url) or {}
                node.peers[other.url] = PeerState(
                    other.url,
                    node=record.get("node"),
                    instance=record.get("instance"),
                    cursor=int(record.get("cursor", 0)),
                )

        for command_id in node.acknowledged:
            if db.view(command_id) is None:
                self.violations.add(
                    "durability",
                    f"node {node.index} lost acknowledged command {command_id} "
                    f"across a restart at step {self.step}",
                )
        if db.clock.last < node.stamp_last:
            self.violations.add(
                "clock",
                f"node {node.index} restarted at step {self.step} with clock "
                f"{db.clock.last}, behind its stamp {node.stamp_last}",
            )

    def _crash(self, node: _Node) -> None:
        db = node.database()
        node.db = None
        db.close()
        for stream in self.streams.values():
            if node.index in (stream.puller, stream.peer):
                puller_up = self.nodes[stream.puller].db is not None
                self._disconnect(stream, flush=puller_up)
        node.restart_step = self.step + self.rng.randint(1, RESTART_STEPS_MAX)
        self.counts.crashes += 1

    def _replace(self, node: _Node) -> None:
        """Crash a node and replace its data directory with an empty one."""
        self._crash(node)
        self.counts.replacements += 1
        # Commands that only this node stored are gone with its directory,
        # whichever node acknowledged them.
        others = [other.database() for other in self.nodes if other is not node]
        for command_id in list(self.acknowledged):
            if all(db.view(command_id) is None for db in others):
                del self.acknowledged[command_id]
        for other in self.nodes:
            other.acknowledged = [
                command_id
                for command_id in other.acknowledged
                if command_id in self.acknowledged
            ]
        node.acknowledged = []
        node.stamp_last = 0
        shutil.rmtree(node.path)
        self._create_store(node)

    def _up_nodes(self) -> list[_Node]:
        return [node for node in self.nodes if node.db is not None]

    def _check_clocks(self) -> None:
        # One fast clock must not drag the others forward: a node with a
        # correct clock never runs further ahead than the allowed skew.
        for node in self._up_nodes():
            now_ms = self.time_ms + node.offset_ms
            last_ms = stamp_ms(node.database().clock.last)
            if not node.fast and last_ms > now_ms + SKEW_MS_MAX + 1:
                self.violations.add(
                    "clock",
                    f"node {node.index} clock is {last_ms - now_ms} ms ahead at "
                    f"step {self.step}, beyond the allowed skew of {SKEW_MS_MAX} ms",
                )

    # clients

    def _submit(self) -> None:
        up = self._up_nodes()
        if not up:
            return
        items = self.workload.next_batch()
        node = self.rng.choice(up)
        self._submit_to(node, items)
        if len(up) > 1 and self.rng.random() < RETRY_ELSEWHERE_P:
            # The client times out and sends the same requests to another node.
            self._submit_to(self.rng.choice([n for n in up if n is not node]), items)

    def _submit_to(self, node: _Node, items: list[Item]) -> None:
        db = node.database()
        submissions = [prepare_submission(APP, *item) for item in items]
        expected = _expected_results(db, submissions)
        results = db.submit(submissions)
        self.counts.submissions += len(submissions)
        for submission, expectation, result in zip(
            submissions, expected, results, strict=True
        ):
            self._check_result(node, submission, expectation, result)

    def _check_result(
        self,
        node: _Node,
        submission: Submission,
        expectation: str,
        result: Accepted | KeyReused,
    ) -> None:
        where = f"node {node.index} at step {self.step}, command {submission.id}"
        if isinstance(result, KeyReused):
            self.counts.key_reused += 1
            if expectation != "reused":
                self.violations.add("submit", f"{where}: KeyReused for a {expectation}")
            return
        if expectation == "reused":
            self.violations.add("submit", f"{where}: accepted another payload")
        if result.created != (expectation == "new"):
            self.violations.add(
                "submit", f"{where}: created={result.created} for a {expectation}"
            )
        command = result.command
        if command.id != submission.id:
            self.violations.add("submit", f"{where}: answered for {command.id}")
        if result.created:
            if command.origin != node.node_id or command.stamp <= node.stamp_last:
                self.violations.add(
                    "clock",
                    f"{where}: stamp {command.stamp} from {command.origin} after "
                    f"stamp {node.stamp_last} from {node.node_id}",
                )
            node.stamp_last = max(node.stamp_last, command.stamp)
            self.stamp_max = max(self.stamp_max, command.stamp)
        node.acknowledged.append(command.id)
        self.acknowledged.setdefault(command.id, node.index)
        self.counts.acknowledged += 1

    # network

    def _reachable(self, stream: _Stream) -> bool:
        puller, peer = self.nodes[stream.puller], self.nodes[stream.peer]
        if puller.db is None or peer.db is None:
            return False
        return self.sides is None or self.sides[puller.index] == self.sides[peer.index]

    def _connect(self, stream: _Stream) -> None:
        """Open a stream as `serve_stream` and `Puller._accept_hello` do."""
        puller, peer = self.nodes[stream.puller], self.nodes[stream.peer]
        peer_db = peer.database()
        state = puller.peers[peer.url]
        after = state.cursor
        if state.instance and state.instance != peer_db.log_instance:
            after = 0
        _entries, head = read_log_chunk(peer_db, after, entries_max=0, bytes_max=0)
        accept_hello(
            state, hello_frame(peer_db, head, after=after), self_node=puller.node_id
        )
        record = state.to_record()
        puller.database().store.write(lambda txn: txn.peer_put(peer.url, record))

        assert not stream.inbox, "a closed stream still holds received entries"
        self.connections += 1
        stream.connection = self.connections
        stream.sent_seq = after
        stream.received_seq = state.cursor
        stream.recent = []

    def _disconnect(self, stream: _Stream, *, flush: bool) -> None:
        """Close a stream, after committing what arrived intact if `flush`."""
        if flush and stream.inbox:
            self._commit(stream, len(stream.inbox), crash_allowed=False)
        stream.inbox.clear()
        stream.recent.clear()
        stream.connection = 0

    def _send(self, stream: _Stream) -> None:
        peer_db = self.nodes[stream.peer].database()
        entries, head = read_log_chunk(
            peer_db,
            stream.sent_seq,
            entries_max=self.rng.randint(1, FRAME_ENTRIES_MAX),
            bytes_max=REPLICATION.frame_bytes_max // 2,
        )
        if not entries:
            return
        data = frames.encode_frame(
            {"t": frames.COMMANDS, "entries": entries, "head": head}
        )
        stream.sent_seq = entries[-1][0]
        stream.recent = [*stream.recent, data][-RECENT_FRAMES_MAX:]
        self._enqueue(stream, data, duplicate=False)

    def _enqueue(self, stream: _Stream, data: bytes, *, duplicate: bool) -> None:
        # Frames of one connection arrive in order, as over TCP. Frames of
        # different streams overtake each other.
        latency_ms = self.rng.randint(0, LATENCY_MS_MAX)
        deliver_at_ms = max(self.time_ms + latency_ms, stream.deliver_at_ms_last)
        stream.deliver_at_ms_last = deliver_at_ms
        self.messages += 1
        key = (stream.puller, stream.peer)
        message = _Message(
            deliver_at_ms, self.messages, key, stream.connection, data, duplicate
        )
        heapq.heappush(self.network, message)

    def _deliver_due(self) -> None:
        while self.network and self.network[0].deliver_at_ms <= self.time_ms:
            message = heapq.heappop(self.network)
            stream = self.streams[message.stream]
            if stream.connection == message.connection:
                self._receive(stream, message.data, duplicate=message.duplicate)

    def _receive(self, stream: _Stream, data: bytes, *, duplicate: bool) -> None:
        reader = FrameReader(frame_bytes_max=REPLICATION.frame_bytes_max)
        frame = next(reader.feed(data))
        reader.close()
        try:
            entries = parse_entries(frame, after_seq=stream.received_seq)
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
        if entries:
            stream.received_seq = entries[-1][0]
            stream.inbox.extend(entries)

    def _commit(
        self, stream: _Stream, entries_max: int, *, crash_allowed: bool
    ) -> None:
        """Ingest received entries and store the cursor, as `Puller._commit`."""
        puller, peer = self.nodes[stream.puller], self.nodes[stream.peer]
        db = puller.database()
        state = puller.peers[peer.url]
        batch = stream.inbox[:entries_max]
        del stream.inbox[:entries_max]
        commands = [command for _seq, command in batch]
        last_seq = batch[-1][0]
        record = {**state.to_record(), "cursor": last_seq}

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
                report = db.engine.ingest(txn, commands)
                txn.peer_put(peer.url, record)
                return report

            report = db.store.write(work)
        state.cursor = last_seq
        self.counts.held += report.held

    # faults

    def _inject_faults(self) -> None:
        rng = self.rng
        up = self._up_nodes()
        if up and rng.random() < CRASH_P:
            self._crash(rng.choice(up))
        elif len(up) == len(self.nodes) > 1 and rng.random() < REPLACE_P:
            self._replace(rng.choice(up))
        connected = [s for s in self.streams.values() if s.connection]
        if connected and rng.random() < DROP_P:
            self._disconnect(rng.choice(connected), flush=True)
            self.counts.drops += 1
        if rng.random() < DUPLICATE_P:
            self._duplicate()
        if rng.random() < REDELIVER_P:
            self._redeliver()
        if self.sides is None and rng.random() < PARTITION_P:
            self._partition()
        elif self.sides is not None and self.step >= self.partition_end_step:
            self.sides = None
        fast = [
            node for node in self.nodes if node.fast and node.offset_ms > SKEW_MS_MAX
        ]
        if fast and rng.random() < CLOCK_FIX_P:
            # The operator fixes the clock: it jumps back, the stamps must not.
            fast[0].offset_ms = rng.randint(-CLOCK_OFFSET_MS_MAX, CLOCK_OFFSET_MS_MAX)
            self.counts.clock_fixes += 1

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

    # the run

    def run(self, steps: int) -> None:
        rng = self.rng
        for step in range(steps):
            self.step = step
            self.time_ms += rng.randint(1, STEP_MS_MAX)
            for node in self.nodes:
                if node.db is None and node.restart_step <= step:
                    self._open(node)
            self._inject_faults()
            if rng.random() < SUBMIT_P:
                self._submit()
            self._move_frames()
            up = self._up_nodes()
            if up and rng.random() < RELEASE_P:
                rng.choice(up).database().release_pending()
            self._check_clocks()

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

    def settle(self) -> None:
        """Heal the cluster, let every clock pass every stamp, and pull until
        no stream has anything left to send."""
        self.sides = None
        for node in self.nodes:
            if node.db is None:
                self._open(node)
        for stream in self.streams.values():
            self._disconnect(stream, flush=True)
        self.network.clear()
        # Every clock passes the newest stamp, even one from a node whose
        # directory was replaced since, so no command stays held.
        newest_ms = stamp_ms(self.stamp_max)
        self.time_ms = max(self.time_ms, newest_ms) + CLOCK_OFFSET_MS_MAX + 1

        for node in self.nodes:
            node.database().release_pending()

        # A log contains each distinct copy once, so once the nodes store the
        # same commands, each stream moves each distinct copy at most once more.
        # A log that keeps growing runs past that budget.
        copies = self._count_distinct_copies()
        budget_entries = SETTLE_ENTRIES_MAX
        converged = False
        for round_number in range(1, SETTLE_ROUNDS_MAX + 1):
            moved = 0
            for stream in self.streams.values():
                moved += self._pull_all(stream, budget_entries - moved)
            self.counts.settle_entries += moved
            budget_entries -= moved
            if not moved:
                self.counts.settle_rounds = round_number
                return
            if budget_entries <= 0:
                break
            if not converged and self._is_converged():
                converged = True
                budget_entries = min(budget_entries, len(self.streams) * copies + 1)
        heads = [node.database().status().log_entries for node in self.nodes]
        self.violations.add(
            "quiescence",
            f"replication moved {self.counts.settle_entries} entries in "
            f"{round_number} rounds without settling, "
            f"{'after' if converged else 'before'} the nodes converged; the "
            f"cluster holds {copies} distinct copies, the logs {heads} entries",
        )

    def _count_distinct_copies(self) -> int:
        copies = set()
        for node in self.nodes:
            with node.database().store.read() as txn:
                for _seq, record in txn.log_iter(0):
                    copies.add(Command.from_record(codec.unpack(record)).order_key)
        return len(copies)

    def _is_converged(self) -> bool:
        statuses = [node.database().status() for node in self.nodes]
        return all(
            _status_summary(status) == _status_summary(statuses[0])
            and not status.pending
            for status in statuses
        )

    def _pull_all(self, stream: _Stream, entries_max: int) -> int:
        """Pull what follows the stream's cursor until about `entries_max`
        entries came, and return how many came."""
        moved = 0
        self._connect(stream)
        while moved < entries_max:
            entries, head = read_log_chunk(
                self.nodes[stream.peer].database(),
                stream.sent_seq,
                entries_max=REPLICATION.frame_entries_max,
                bytes_max=REPLICATION.frame_bytes_max // 2,
            )
            if not entries:
                break
            stream.sent_seq = entries[-1][0]
            frame = {"t": frames.COMMANDS, "entries": entries, "head": head}
            self._receive(stream, frames.encode_frame(frame), duplicate=False)
            self._commit(stream, len(stream.inbox), crash_allowed=False)
            moved += len(entries)
        self._disconnect(stream, flush=True)
        return moved

    def close(self) -> None:
        for node in self.nodes:
            if node.db is not None:
                node.db.close()
                node.db = None

    # checks

    def check(self) -> list[_Snapshot]:
        """Check every promise on the settled cluster, then replay each node."""
        snapshots = [_snapshot(node) for node in self.nodes]
        for snapshot in snapshots:
            self._check_node(snapshot)
            _check_ledger(snapshot, self.violations)
        _check_convergence(snapshots, self.violations)
        _check_canonical_copies(snapshots, self.violations)
        self.close()
        for node, snapshot in zip(self.nodes, snapshots, strict=True):
            _check_replay(node, snapshot, self.violations)
        return snapshots

    def _check_node(self, snapshot: _Snapshot) -> None:
        """Check one node: each ID folded once, every acknowledged ID stored,
        each copy logged once, and nothing left pending."""
        where = f"node {snapshot.node}"
        folded_ids = Counter(command.id for _key, _outcome, command in snapshot.folded)
        for command_id, count in folded_ids.items():
            if count > 1:
                self.violations.add(
                    "at_most_once", f"{where} folds command {command_id} {count} times"
                )
        for key, _outcome, command in snapshot.folded:
            if snapshot.kept_keys.get(command.id) != key:
                self.violations.add(
                    "at_most_once",
                    f"{where} folds a copy of {command.id} its index does not name",
                )
        for command_id in snapshot.kept_keys:
            if command_id not in folded_ids:
                self.violations.add(
                    "at_most_once", f"{where} stores {command_id} but never folds it"
                )
        for command_id, first_node in self.acknowledged.items():
            if command_id not in snapshot.kept_keys:
                self.violations.add(
                    "durability",
                    f"{where} lacks command {command_id}, acknowledged by node "
                    f"{first_node}",
                )
        for key, count in Counter(c.order_key for c in snapshot.copies).items():
            if count > 1:
                _stamp, origin, command_id = split_order_key(key)
                self.violations.add(
                    "log",
                    f"{where} appended the copy of {command_id} from {origin} "
                    f"{count} times",
                )
        status = snapshot.status
        if status.commands != len(snapshot.kept_keys) or status.pending:
            self.violations.add(
                "at_most_once",
                f"{where} status counts {status.commands} commands and "
                f"{status.pending} pending, but its log contains "
                f"{len(snapshot.kept_keys)} IDs",
            )

    def report(
        self,
        seed: int,
        steps: int,
        snapshots: list[_Snapshot],
        events: Sequence[MutableMapping[str, Any]],
    ) -> SimReport:
        kinds = Counter(str(event.get("event")) for event in events)
        return SimReport(
            seed=seed,
            nodes=len(self.nodes),
            steps=steps,
            commands=snapshots[0].status.commands if snapshots else 0,
            conflicts=max((s.status.conflicts for s in snapshots), default=0),
            rewinds=kinds["fold_rewound"],
            full_refolds=kinds["full_refold_started"],
            counts=dataclasses.asdict(self.counts),
            violations=self.violations.summary(),
        )


def _expected_results(db: Database, submissions: list[Submission]) -> list[str]:
    """Return "new", "retry" or "reused" for each submission, from what the
    node stores before the batch and the batch's own earlier items."""
    stored: dict[str, bytes] = {}
    expected = []
    for submission in submissions:
        if submission.id not in stored:
            viewed = db.view(submission.id)
            if viewed is not None:
                command = viewed[0]
                stored[submission.id] = codec.fingerprint(command.type, command.payload)
        fingerprint = stored.get(submission.id)
        if fingerprint is None:
            expected.append("new")
            stored[submission.id] = submission.fingerprint
        elif fingerprint == submission.fingerprint:
            expected.append("retry")
        else:
            expected.append("reused")
    return expected


def _snapshot(node: _Node) -> _Snapshot:
    db = node.database()
    status = db.status()
    with db.store.read() as txn:
        copies = [
            Command.from_record(codec.unpack(record))
            for _seq, record in txn.log_iter(0)
        ]
        kept_keys: dict[str, bytes] = {}
        for command in copies:
            entry = txn.id_get(command.id)
            if entry is not None and command.id not in kept_keys:
                kept_keys[command.id] = order_key(entry[2], entry[3], command.id)
        folded = [
            (key, fold.unpack_outcome(packed), Command.from_record(txn.log_get(seq)))
            for key, seq, packed in txn.folded_from(b"")
        ]
    balances: dict[str, Any] = {}
    for account in ACCOUNTS:
        try:
            balances[account] = db.query("ledger.balance", {"account": account})
        except NotFound:
            balances[account] = None
    return _Snapshot(node.index, status, copies, kept_keys, folded, balances)


def _status_summary(status: Status) -> tuple[int, int, str, str]:
    return status.commands, status.applied, status.state_digest, status.log_digest


def _check_convergence(snapshots: list[_Snapshot], violations: _Violations) -> None:
    first = _status_summary(snapshots[0].status)
    for snapshot in snapshots[1:]:
        summary = _status_summary(snapshot.status)
        if summary != first:
            violations.add(
                "convergence",
                f"node {snapshot.node} has (commands, applied, state, log) "
                f"{summary}, node {snapshots[0].node} has {first}",
            )


def _check_canonical_copies(
    snapshots: list[_Snapshot], violations: _Violations
) -> None:
    """Check that every node keeps the copy of each ID that sorts first."""
    first_copy: dict[str, bytes] = {}
    for snapshot in snapshots:
        for command in snapshot.copies:
            key = command.order_key
            if command.id not in first_copy or key < first_copy[command.id]:
                first_copy[command.id] = key
    for snapshot in snapshots:
        for command_id, key in snapshot.kept_keys.items():
            if first_copy[command_id] != key:
                stamp, origin, _id = split_order_key(key)
                violations.add(
                    "canonical_order",
                    f"node {snapshot.node} keeps the copy of {command_id} stamped "
                    f"{stamp} by {origin}, not the first in canonical order",
                )


def _check_ledger(snapshot: _Snapshot, violations: _Violations) -> None:
    """Fold the node's commands again with a plain model of the ledger rules
    and compare outcomes and balances."""
    where = f"node {snapshot.node}"
    accounts: dict[str, dict[str, Any]] = {}
    charged: Counter[tuple[str, str]] = Counter()
    for _key, outcome, command in snapshot.folded:
        status, reason = _model_apply(accounts, command)
        if (outcome.status, outcome.reason) != (status, reason):
            violations.add(
                "ledger",
                f"{where} has {command.id} {outcome.status} ({outcome.reason}), "
                f"the model {status} ({reason})",
            )
        elif status == APPLIED and outcome.result != _model_result(accounts, command):
            violations.add(
                "ledger",
                f"{where} has {command.id} with result {outcome.result}, the model "
                f"{_model_result(accounts, command)}",
            )
        reference = command.payload.get("reference")
        if command.type == "ledger.charge" and reference and status == APPLIED:
            charged[(command.payload["account"], reference)] += 1
    for (account, reference), count in charged.items():
        if count > 1:
            violations.add(
                "ledger", f"{where} charged {account} {count} times for {reference}"
            )
    for name, balance in snapshot.balances.items():
        model = accounts.get(name)
        expected = None if model is None else {"account": name, **model}
        if balance != expected:
            violations.add(
                "ledger", f"{where} has {name} as {balance}, the model {expected}"
            )
        if balance is not None and balance["balance"] < 0:
            violations.add("ledger", f"{where} has a negative balance on {name}")


def _model_apply(
    accounts: dict[str, dict[str, Any]], command: Command
) -> tuple[str, str | None]:
    """Apply one command to the model and return its status and reason."""
    payload = command.payload
    if command.type == "ledger.open":
        if payload["account"] in accounts:
            return "rejected", "account_exists"
        accounts[payload["account"]] = {"currency": payload["currency"], "balance": 0}
        return APPLIED, None
    names = (
        [payload["from"], payload["to"]]
        if command.type == "ledger.transfer"
        else [payload["account"]]
    )
    if any(name not in accounts for name in names):
        return "rejected", "no_such_account"
    amount = payload["amount"]
    if command.type == "ledger.deposit":
        accounts[names[0]]["balance"] += amount
        return APPLIED, None
    source = accounts[names[0]]
    target = accounts[names[-1]]
    if command.type == "ledger.transfer" and source["currency"] != target["currency"]:
        return "rejected", "currency_mismatch"
    if source["balance"] < amount:
        return "rejected", "insufficient_funds"
    source["balance"] -= amount
    if command.type == "ledger.transfer":
        target["balance"] += amount
    return APPLIED, None


def _model_result(accounts: dict[str, dict[str, Any]], command: Command) -> Any:
    """Return the result the ledger handler gives for an applied command,
    from the model's balances just after it."""
    payload = command.payload
    if command.type == "ledger.transfer":
        return {
            side: {
                "account": payload[side],
                "balance": accounts[payload[side]]["balance"],
            }
            for side in ("from", "to")
        }
    account = accounts[payload["account"]]
    if command.type == "ledger.open":
        return {"account": payload["account"], **account}
    return {"account": payload["account"], "balance": account["balance"]}


def _check_replay(node: _Node, snapshot: _Snapshot, violations: _Violations) -> None:
    replayed = replay(node.path, APP)
    status = snapshot.status
    if not replayed.matches or replayed.state_digest != status.state_digest:
        violations.add(
            "replay",
            f"node {node.index} replays to state {replayed.state_digest[:16]} and "
            f"log {replayed.log_digest[:16]}, live state {status.state_digest[:16]} "
            f"and log {status.log_digest[:16]}",
        )


def simulate(
    seed: int,
    *,
    nodes: int = 3,
    steps: int = STEPS_DEFAULT,
    root: Path,
    fault: Fault | None = None,
) -> SimReport:
    """Run one seeded simulation in `root`, which must be empty, and check it.

    The same seed, node count, step count and fault give the same report.
    Raises `ValueError` for bad arguments, and whatever the node code raises,
    for example an `AssertionError` from an engine invariant.
    """
    if nodes < 1 or steps < 0:
        raise ValueError(f"need at least 1 node and 0 steps, got {nodes} and {steps}")
    root = Path(root)
    if root.exists() and any(root.iterdir()):
        raise ValueError(f"the simulation root {root} is not empty")
    with capture_logs() as events:
        cluster = _Cluster(seed, nodes, root, fault)
        try:
            cluster.run(steps)
            cluster.settle()
            snapshots = cluster.check()
        finally:
            cluster.close()
    return cluster.report(seed, steps, snapshots, events)


def main(argv: Sequence[str] | None = None) -> int:
    """Run a range of seeds, print each failing one, and return 1 if any failed."""
    parser = argparse.ArgumentParser(
        prog="python -m cmdlog.simulation",
        description="Run the seeded cluster simulation for a range of seeds.",
    )
    parser.add_argument("--seeds", type=int, default=100, help="how many seeds to run")
    parser.add_argument("--start", type=int, default=0, help="the first seed")
    parser.add_argument("--nodes", type=int, default=3, help="nodes per run")
    parser.add_argument(
        "--steps", type=int, default=STEPS_DEFAULT, help="simulated steps per run"
    )
    parser.add_argument(
        "--fault",
        choices=["skip_chunk", "cursor_apart"],
        help="break delivery on purpose, to see the checks fail",
    )
    parser.add_argument(
        "--verbose", action="store_true", help="print every report in full"
    )
    args = parser.parse_args(argv)

    started = time.monotonic()
    failed = 0
    for seed in range(args.start, args.start + args.seeds):
        with tempfile.TemporaryDirectory(prefix="cmdlog-sim-") as tmp:
            try:
                report = simulate(
                    seed,
                    nodes=args.nodes,
                    steps=args.steps,
                    root=Path(tmp),
                    fault=args.fault,
                )
            except Exception as exc:
                failed += 1
                print(f"seed {seed}: raised {type(exc).__name__}: {exc}", flush=True)
                if args.verbose:
                    traceback.print_exc()
                continue
        if args.verbose:
            print(report, flush=True)
        if report.violations:
            failed += 1
            more = len(report.violations) - 1
            suffix = f" (and {more} more)" if more else ""
            print(f"seed {seed}: {report.violations[0]}{suffix}", flush=True)
    elapsed_s = time.monotonic() - started
    print(
        f"{args.seeds} seeds from {args.start}: {failed} failed, "
        f"{args.seeds - failed} passed in {elapsed_s:.1f} s"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
