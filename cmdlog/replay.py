"""Replay: rebuild a stopped node's state from its log alone.

The log is read in local append order and fed, in chunks, through the same
ingest path that peer commands take, into a scratch store beside the data
directory. That scratch node derives the winning copy of every ID, the
canonical order, the fold and both digests without looking at any index
of the original, so equal digests show that the live state is exactly the
fold of the log. The scratch store is deleted afterwards.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

from cmdlog import codec
from cmdlog.app import App
from cmdlog.config import StoreConfig
from cmdlog.database import Database
from cmdlog.hlc import wall_ms
from cmdlog.model import Command
from cmdlog.store import Store

log = structlog.get_logger(__name__)

CHUNK_COMMANDS = 5_000


@dataclass(frozen=True, slots=True)
class ReplayReport:
    """Digests the replay produced next to those the node recorded."""

    log_entries: int
    commands: int
    applied: int
    state_digest: str
    log_digest: str
    recorded_state_digest: str
    recorded_log_digest: str
    seconds: float

    @property
    def matches(self) -> bool:
        return (
            self.state_digest == self.recorded_state_digest
            and self.log_digest == self.recorded_log_digest
        )


def replay(path: Path | str, app: App) -> ReplayReport:
    """Fold the log in `path` into scratch state and compare digests.

    The node must be stopped. Raises `StartupError` when `path` holds no
    store and `VersionMismatch` for a store of another format.
    """
    path = Path(path)
    started = time.monotonic()
    source = Store(path, list(app.domains), readonly=True)
    scratch_dir = Path(tempfile.mkdtemp(prefix=".replay-", dir=path))
    try:
        with source.read() as txn:
            recorded_state = txn.meta_get("state_digest", bytes(32)).hex()
            recorded_log = txn.meta_get("log_digest", bytes(32)).hex()
            recorded_wall_ms = txn.meta_get("wall_ms")
        # The node decided which commands to hold for clock skew by its wall
        # clock, so the replay judges them by the time of the node's last
        # commit, not by today's: a command held then is held in the replay.
        clock_ms = recorded_wall_ms if recorded_wall_ms is not None else wall_ms()
        scratch = Database(
            scratch_dir,
            app,
            store_config=StoreConfig(
                durable=False, map_bytes_initial=source.map_bytes()
            ),
            now_ms=lambda: clock_ms,
        )
        entries = _feed(source, scratch)
        status = scratch.status()
        scratch.close()
    finally:
        source.close()
        shutil.rmtree(scratch_dir, ignore_errors=True)

    report = ReplayReport(
        log_entries=entries,
        commands=status.commands,
        applied=status.applied,
        state_digest=status.state_digest,
        log_digest=status.log_digest,
        recorded_state_digest=recorded_state,
        recorded_log_digest=recorded_log,
        seconds=time.monotonic() - started,
    )
    log.info(
        "replay_completed",
        log_entries=entries,
        matches=report.matches,
        duration_s=round(report.seconds, 3),
    )
    return report


def _feed(source: Store, scratch: Database) -> int:
    """Ingest every log entry of `source` into `scratch`; return how many."""
    after = 0
    while True:
        with source.read() as txn:
            chunk = []
            for seq, record in txn.log_iter(after):
                chunk.append(Command.from_record(codec.unpack(record)))
                after = seq
                if len(chunk) >= CHUNK_COMMANDS:
                    break
        if not chunk:
            return after
        scratch.ingest(chunk)
