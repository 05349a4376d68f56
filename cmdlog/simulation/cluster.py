"""The simulated cluster of one seed: its nodes, clients, faults and run."""

from __future__ import annotations

import dataclasses
import random
import shutil
from pathlib import Path

from cmdlog import codec
from cmdlog.config import ClockConfig, StoreConfig
from cmdlog.database import Database
from cmdlog.engine import Accepted, Engine, Submission, prepare_submission
from cmdlog.errors import KeyReused
from cmdlog.hlc import stamp_ms
from cmdlog.model import Command
from cmdlog.replication import PeerState
from cmdlog.simulation.checks import (
    check_canonical_copies,
    check_convergence,
    check_ledger,
    check_node,
    check_replay,
    read_snapshot,
    status_summary,
)
from cmdlog.simulation.network import Network
from cmdlog.simulation.records import (
    Counts,
    Message,
    Node,
    SimReport,
    Snapshot,
    Stream,
    Violations,
)
from cmdlog.simulation.settings import (
    APP,
    CLOCK_FIX_P,
    CLOCK_OFFSET_MS_MAX,
    CRASH_P,
    DROP_P,
    DUPLICATE_P,
    EPOCH_MS,
    FAST_CLOCK_AHEAD_MS_MAX,
    FAST_CLOCK_P,
    MAP_BYTES_INITIAL,
    PARTITION_P,
    REDELIVER_P,
    RELEASE_P,
    REPLACE_P,
    RESTART_STEPS_MAX,
    RETRY_ELSEWHERE_P,
    SETTLE_ENTRIES_MAX,
    SETTLE_ROUNDS_MAX,
    SKEW_MS_MAX,
    STEP_MS_MAX,
    SUBMIT_P,
    UNDO_HORIZONS_COMMANDS,
    Fault,
)
from cmdlog.simulation.workload import Item, Workload
from cmdlog.store import Store, Txn


class Cluster(Network):
    """The simulated nodes, network and clients of one seed."""

    def __init__(
        self, seed: int, node_count: int, root: Path, fault: Fault | None
    ) -> None:
        self.rng = random.Random(seed)
        self.fault = fault
        self.time_ms = EPOCH_MS
        self.step = 0
        self.counts = Counts()
        self.violations = Violations()
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
            (puller.index, peer.index): Stream(puller.index, peer.index)
            for puller in self.nodes
            for peer in self.nodes
            if puller is not peer
        }
        self.network: list[Message] = []
        self.messages = 0
        self.connections = 0
        self.sides: list[int] | None = None
        self.partition_end_step = 0

        self.stamp_max = 0
        self.acknowledged: dict[str, int] = {}
        """Every acknowledged command ID, with the node that first took it."""
        self.workload = Workload(self.rng)
        self.engines: list[Engine] = []
        """The engine of every opening of a node, for the rewind counts."""
        for node in self.nodes:
            self._open(node)

    # nodes

    def _create_node(self, root: Path, index: int) -> Node:
        offset_ms = self.rng.randint(-CLOCK_OFFSET_MS_MAX, CLOCK_OFFSET_MS_MAX)
        node = Node(index, root / f"node-{index}", "", offset_ms, fast=False)
        self._create_store(node)
        return node

    def _create_store(self, node: Node) -> None:
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

    def _open(self, node: Node) -> None:
        db = Database(
            node.path,
            APP,
            store_config=self.store_config,
            clock_config=self.clock_config,
            now_ms=lambda: self.time_ms + node.offset_ms,
        )
        db.boot = f"{self.rng.getrandbits(64):016x}"  # seeded, like the node ID
        node.db = db
        self.engines.append(db.engine)
        with db.store.read() as txn:
            stored = txn.peers()
        node.peers = {}
        for other in self.nodes:
            if other is not node:
                node.peers[other.url] = PeerState.from_record(
                    other.url, stored.get(other.url)
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

    def _crash(self, node: Node) -> None:
        db = node.database()
        node.db = None
        db.close()
        for stream in self.streams.values():
            if node.index in (stream.puller, stream.peer):
                puller_up = self.nodes[stream.puller].db is not None
                self._disconnect(stream, flush=puller_up)
        node.restart_step = self.step + self.rng.randint(1, RESTART_STEPS_MAX)
        self.counts.crashes += 1

    def _replace(self, node: Node) -> None:
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

    def _up_nodes(self) -> list[Node]:
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

    def _submit_to(self, node: Node, items: list[Item]) -> None:
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
        node: Node,
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
            status_summary(status) == status_summary(statuses[0]) and not status.pending
            for status in statuses
        )

    def close(self) -> None:
        for node in self.nodes:
            if node.db is not None:
                node.db.close()
                node.db = None

    # checks

    def check(self) -> list[Snapshot]:
        """Check every promise on the settled cluster, then replay each node."""
        snapshots = [read_snapshot(node) for node in self.nodes]
        for snapshot in snapshots:
            check_node(snapshot, self.acknowledged, self.violations)
            check_ledger(snapshot, self.violations)
        check_convergence(snapshots, self.violations)
        check_canonical_copies(snapshots, self.violations)
        self.close()
        for node, snapshot in zip(self.nodes, snapshots, strict=True):
            check_replay(node, snapshot, self.violations)
        return snapshots

    def report(self, seed: int, steps: int, snapshots: list[Snapshot]) -> SimReport:
        return SimReport(
            seed=seed,
            nodes=len(self.nodes),
            steps=steps,
            commands=snapshots[0].status.commands if snapshots else 0,
            conflicts=max((s.status.conflicts for s in snapshots), default=0),
            rewinds=sum(engine.rewinds for engine in self.engines),
            full_refolds=sum(engine.full_refolds for engine in self.engines),
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
