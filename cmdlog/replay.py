"""Replay: rebuild a stopped node's state from its log alone.

Replay reads nothing but the log: not the node's indexes, outcomes or
state. It works in two passes over a scratch LMDB environment beside the
data directory, deleted afterwards:

1. Winners. Read the log in append order, recompute each command's
   fingerprint and order key, and keep, per ID, the copy that sorts first
   by `(order key, fingerprint)`, as the engine does. The scratch holds
   `ID -> fingerprint + order key` and `order key -> seq + fingerprint`.
2. Fold. Walk the winners in canonical order and fold every one the node
   could fold (a known type, a stamp within the skew horizon) into fresh
   state databases, summing outcome and state digests as the engine does.

The two passes are an implementation of the engine's rules separate from
the engine, so equal digests show that the live state is exactly the fold
of the log. Neither pass keeps more than one chunk of commands in memory,
whatever the log's size.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lmdb
import structlog

from cmdlog import codec, fold
from cmdlog.app import App
from cmdlog.config import ClockConfig
from cmdlog.fold import StateOverlay
from cmdlog.hlc import HybridClock, wall_ms
from cmdlog.model import Command, order_key
from cmdlog.store import DirectoryLock, Store, require_store, seq_key

log = structlog.get_logger(__name__)

CHUNK_COMMANDS = 20_000
"""Commands per scratch write transaction, and per flush of folded state."""
_FP = codec.FINGERPRINT_BYTES
_SCRATCH_MAP_BYTES_MIN = 64 * 1024 * 1024


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

    The node must be stopped. Raises `StartupError` when `path` contains no
    store or a running node has its lock, and `VersionMismatch` for a store
    of another format.
    """
    path = Path(path)
    started = time.monotonic()
    require_store(path)
    # Holding the node's lock makes sure the node is stopped: a live node
    # would append to the log while it is read.
    lock = DirectoryLock(path)
    try:
        source = Store(path, list(app.domains), readonly=True)
    except BaseException:
        lock.release()
        raise
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
        clock = HybridClock(
            now_ms=lambda: clock_ms, skew_ms_max=ClockConfig().skew_ms_max
        )
        scratch = _Scratch(scratch_dir, app, map_bytes=2 * source.map_bytes())
        try:
            entries = _find_winners(source, scratch)
            folded = _fold_winners(source, scratch, app, horizon=clock.horizon())
        finally:
            scratch.close()
    finally:
        source.close()
        lock.release()
        shutil.rmtree(scratch_dir, ignore_errors=True)

    report = ReplayReport(
        log_entries=entries,
        commands=folded.commands,
        applied=folded.applied,
        state_digest=fold.digest_to_bytes(folded.state_digest).hex(),
        log_digest=fold.digest_to_bytes(folded.log_digest).hex(),
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


class _Scratch:
    """The scratch environment: the winners' indexes and the new state."""

    def __init__(self, directory: Path, app: App, *, map_bytes: int) -> None:
        # Nothing here outlives the replay, so nothing is synced.
        self.env = lmdb.open(
            str(directory),
            map_size=max(map_bytes, _SCRATCH_MAP_BYTES_MIN),
            max_dbs=2 + len(app.domains),
            sync=False,
            metasync=False,
        )
        self.ids = self.env.open_db(b"ids")
        self.order = self.env.open_db(b"order")
        self.state = {
            domain: self.env.open_db(b"state." + domain.encode())
            for domain in app.domains
        }

    def close(self) -> None:
        self.env.close()


def _log_chunks(source: Store) -> Iterator[list[tuple[int, bytes]]]:
    """Yield the source log in append order, a chunk of entries at a time."""
    after = 0
    while True:
        with source.read() as txn:
            chunk = []
            for entry in txn.log_iter(after):
                chunk.append(entry)
                if len(chunk) >= CHUNK_COMMANDS:
                    break
        if not chunk:
            return
        yield chunk
        after = chunk[-1][0]


def _find_winners(source: Store, scratch: _Scratch) -> int:
    """Index the winning copy of every ID (pass 1) and return the log's length."""
    ids, order = scratch.ids, scratch.order
    unpack, fingerprint = codec.unpack, codec.fingerprint
    last_seq = 0
    for chunk in _log_chunks(source):
        with scratch.env.begin(write=True) as txn:
            for seq, record in chunk:
                command_id, type_name, payload, stamp, origin = unpack(record)
                fp = fingerprint(type_name, payload)
                key = order_key(stamp, origin, command_id)
                raw_id = command_id.encode()
                if not txn.put(raw_id, fp + key, db=ids, overwrite=False):
                    stored = txn.get(raw_id, db=ids)
                    assert stored is not None, "put found the ID, get did not"
                    stored_fp, stored_key = stored[:_FP], stored[_FP:]
                    # The copy that sorts first keeps the ID. On a tie of
                    # order keys the smaller fingerprint wins, as in the engine.
                    if (key, fp) >= (stored_key, stored_fp):
                        continue
                    txn.put(raw_id, fp + key, db=ids)
                    txn.delete(stored_key, db=order)
                txn.put(key, seq_key(seq) + fp, db=order)
            last_seq = chunk[-1][0]
    return last_seq


@dataclass(slots=True)
class _Folded:
    commands: int = 0
    applied: int = 0
    state_digest: int = 0
    log_digest: int = 0


def _fold_winners(
    source: Store, scratch: _Scratch, app: App, *, horizon: int
) -> _Folded:
    """Fold the winners in canonical order into fresh state (pass 2)."""
    totals = _Folded()
    after = b""
    while True:
        with scratch.env.begin() as read:
            chunk = []
            cursor = read.cursor(db=scratch.order)
            if cursor.set_range(after):
                for key, value in cursor:
                    if key != after:
                        chunk.append((key, value))
                        if len(chunk) >= CHUNK_COMMANDS:
                            break
        if not chunk:
            return totals
        with source.read() as log_txn, scratch.env.begin(write=True) as txn:
            _fold_chunk(chunk, log_txn.log_get, txn, scratch, app, horizon, totals)
        after = chunk[-1][0]


def _fold_chunk(
    chunk: list[tuple[bytes, bytes]],
    log_get: Callable[[int], list[Any]],
    txn: lmdb.Transaction,
    scratch: _Scratch,
    app: App,
    horizon: int,
    totals: _Folded,
) -> None:
    state_dbs = scratch.state

    def state_get(domain: str, key: bytes) -> bytes | None:
        return txn.get(key, db=state_dbs[domain])  # type: ignore[return-value]

    overlay = StateOverlay(state_get)
    types = app.types
    for _key, value in chunk:
        seq = int.from_bytes(value[:-_FP], "big")
        fp = value[-_FP:]
        command = Command.from_record(log_get(seq))
        totals.commands += 1
        totals.log_digest += fold.log_item_hash(command.id, fp)
        if command.type not in types or command.stamp > horizon:
            continue  # held pending on the node as well
        outcome, _undo = fold.apply_command(app, overlay, command)
        packed = fold.pack_outcome(outcome)
        totals.state_digest += fold.outcome_item_hash(command.id, packed)
        totals.applied += 1

    for domain, state_key, base, current in overlay.changes():
        db = state_dbs[domain]
        if base is not None:
            totals.state_digest -= fold.state_item_hash(domain, state_key, base)
        if current is None:
            txn.delete(state_key, db=db)
        else:
            totals.state_digest += fold.state_item_hash(domain, state_key, current)
            txn.put(state_key, current, db=db)
