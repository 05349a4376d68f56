"""Records of one simulated run: the report, counts, violations, nodes,
streams, messages and snapshots."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cmdlog.database import Database
from cmdlog.engine import Status
from cmdlog.model import Command, Outcome
from cmdlog.replication import PeerState, Reader
from cmdlog.simulation.settings import VIOLATIONS_PER_PROMISE_MAX


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
    """How often each simulated event happened, from `Counts`."""
    violations: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.violations


@dataclass(slots=True)
class Counts:
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


class Violations:
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
class Node:
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
class Stream:
    """One puller's stream from one peer. `connection` is 0 while closed."""

    puller: int
    peer: int
    connection: int = 0
    sent_seq: int = 0
    received_seq: int = 0
    deliver_at_ms_last: int = 0
    inbox: list[tuple[int, Command | None]] = field(default_factory=list)
    """Entries received but not yet committed, lost if the puller crashes. An
    entry without a command only moves the cursor over skipped copies."""
    recent: list[bytes] = field(default_factory=list)
    reader: Reader | None = None
    """The puller as it names itself to the peer when the stream opens."""


@dataclass(order=True, slots=True)
class Message:
    deliver_at_ms: int
    number: int
    stream: tuple[int, int] = field(compare=False)
    connection: int = field(compare=False)
    data: bytes = field(compare=False)
    duplicate: bool = field(compare=False)


@dataclass(slots=True)
class Snapshot:
    """One settled node's log, index and fold, read for the checks."""

    node: int
    status: Status
    copies: list[Command]
    kept_keys: dict[str, bytes]
    """Order key of the copy each ID names."""
    folded: list[tuple[bytes, Outcome, Command]]
    balances: dict[str, Any]
