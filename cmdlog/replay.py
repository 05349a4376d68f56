"""Replay: rebuild a stopped node's state from its log alone.

Replay reads nothing but the log: not the node's indexes, outcomes or
state. It works in two passes over a scratch LMDB environment beside the
data directory, deleted afterwards:

1. Winners. Read the log in append order, compute each command's order
   key, and keep, per ID, the copy that sorts first by `(order key,
   fingerprint)`, as the engine does. The scratch contains `ID -> seq +
   order key` and `order key -> seq + record`, so the second pass reads the
   winners in order from one cursor.
2. Fold. Walk the winners in canonical order and fold every one the node
   could fold (a known type, a stamp within the skew horizon) into fresh
   state databases, summing outcome and state digests as the engine does.

The log digest needs every command's fingerprint, the costliest part of a
command to recompute. It is computed as the sum over every log entry, less
the copies that lost. For a long log, a second process sums the entries
while this one runs both passes, and the first pass subtracts each copy
that loses.

The two passes are an implementation of the engine's rules separate from
the engine, so equal digests show that the live state is exactly the fold
of the log. Neither pass keeps more than one chunk of commands in memory,
whatever the log's size.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import lmdb
import structlog

from cmdlog import codec, fold
from cmdlog.app import App
from cmdlog.config import ClockConfig
from cmdlog.fold import StateOverlay
from cmdlog.hlc import HybridClock, wall_ms
from cmdlog.model import Command, order_key
from cmdlog.store import SEQ_BYTES, DirectoryLock, Store, require_store

log = structlog.get_logger(__name__)

CHUNK_COMMANDS = 20_000
"""Commands per scratch write transaction, and per flush of folded state."""
WORKER_ENTRIES_MIN = 50_000
"""Logs with at least this many entries have their log items summed by a
second process. Starting one takes about 0.15 s, more than a shorter log
saves."""
_SCRATCH_MAP_BYTES_MIN = 64 * 1024 * 1024
_SCRATCH_PREFIX = ".replay-"
_PARENT_CHECK_S = 0.2
"""How often the second process checks that the replay that started it runs."""


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


def replay(
    path: Path | str, app: App, *, worker_entries_min: int = WORKER_ENTRIES_MIN
) -> ReplayReport:
    """Fold the log in `path` into scratch state and compare digests.

    The node must be stopped. Raises `StartupError` when `path` contains no
    store or a running node has its lock, and `VersionMismatch` for a store
    of another format. A log of `worker_entries_min` entries or more has
    its log items summed in a second process.
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
    _remove_stale_scratch(path)
    scratch_dir = Path(tempfile.mkdtemp(prefix=_SCRATCH_PREFIX, dir=path))
    try:
        with source.read() as txn:
            recorded_state = txn.meta_get("state_digest", bytes(32)).hex()
            recorded_log = txn.meta_get("log_digest", bytes(32)).hex()
            recorded_horizon = txn.meta_get("horizon")
            recorded_wall_ms = txn.meta_get("wall_ms")
            log_length = txn.log_last_seq()
        # The node decided which commands to hold for clock skew by its
        # horizon, so the replay holds exactly the commands beyond the horizon
        # of the node's last commit, not today's. A store written before
        # horizons were recorded gives the wall time of its last commit.
        if recorded_horizon is not None:
            horizon = recorded_horizon
        else:
            clock_ms = recorded_wall_ms if recorded_wall_ms is not None else wall_ms()
            skew_ms_max = ClockConfig().skew_ms_max
            horizon = HybridClock(skew_ms_max=skew_ms_max).horizon_at(clock_ms)
        domains = list(app.domains)
        with contextlib.ExitStack() as stack:
            worker = None
            if log_length >= worker_entries_min:
                worker = stack.enter_context(_Summer(path, domains))
            scratch = _Scratch(scratch_dir, app, map_bytes=2 * source.map_bytes())
            stack.callback(scratch.close)
            entries, lost_items = _find_winners(source, scratch)
            folded = _fold_winners(scratch, app, horizon=horizon)
            all_items = None if worker is None else worker.result()
            if all_items is None:
                all_items = sum_log_items(source)
            folded.log_digest = all_items - lost_items
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


def _log_chunks(source: Store) -> Iterator[list[tuple[bytes, bytes]]]:
    """Yield the source log in append order, a chunk of `(seq key, record)`
    entries at a time."""
    after = 0
    while True:
        with source.read() as txn:
            chunk = list(itertools.islice(txn.log_records(after), CHUNK_COMMANDS))
        if not chunk:
            return
        yield chunk
        after = int.from_bytes(chunk[-1][0], "big")


class _Summer:
    """`sum_log_items` in a second process (`python -m cmdlog.replay`), so
    it runs beside the passes on another core. A new interpreter, not a
    fork: the caller may have threads, and `multiprocessing`'s spawn would
    run the caller's main module again.

    The second process imports cmdlog from where this one did, never from
    its working directory (`-P`), so both run the same code. It only saves
    time, so when it cannot start or fails, `result` logs why and returns
    None, and the caller sums the items itself.
    """

    def __init__(self, path: Path, domains: list[str]) -> None:
        self._process: subprocess.Popen[str] | None = None
        package_root = str(Path(__file__).resolve().parent.parent)
        search_path = os.environ.get("PYTHONPATH")
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [package_root, search_path])),
        }
        argv = [sys.executable, "-P", "-m", "cmdlog.replay", str(path), *domains]
        try:
            self._process = subprocess.Popen(
                argv,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
        except OSError as exc:
            log.warning("replay_summer_not_started", error=str(exc))

    def __enter__(self) -> _Summer:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.kill()
        self._process.communicate()

    def result(self) -> int | None:
        if self._process is None:
            return None
        out, err = self._process.communicate()
        lines = out.split()
        try:
            if self._process.returncode == 0 and lines:
                return int(lines[-1], 16)
        except ValueError:
            pass
        log.warning(
            "replay_summer_failed",
            exit_code=self._process.returncode,
            stderr=err.strip()[-500:],
        )
        return None


def _remove_stale_scratch(path: Path) -> None:
    """Delete scratch left by a replay that was killed. The caller holds the
    directory's lock, so no other replay is using one."""
    for stale in path.glob(_SCRATCH_PREFIX + "*"):
        shutil.rmtree(stale, ignore_errors=True)
        log.info("replay_scratch_removed", path=str(stale))


def sum_log_items(source: Store) -> int:
    """Return the sum of `fold.log_item_hash` over every entry of the log,
    each copy of an ID counted."""
    total = 0
    for chunk in _log_chunks(source):
        for _seq, record in chunk:
            command_id, type_name, payload, _stamp, _origin = codec.unpack(record)
            fingerprint = codec.fingerprint(type_name, payload)
            total += fold.log_item_hash(command_id, fingerprint)
    return total


def _find_winners(source: Store, scratch: _Scratch) -> tuple[int, int]:
    """Index the winning copy of every ID (pass 1).

    Returns the log's length and the sum of `fold.log_item_hash` over the
    copies that lost, which the log digest leaves out.
    """
    ids, order = scratch.ids, scratch.order
    unpack = codec.unpack
    last_seq = 0
    lost = 0
    for chunk in _log_chunks(source):
        with scratch.env.begin(write=True) as txn:
            for seq, record in chunk:
                command_id, type_name, payload, stamp, origin = unpack(record)
                key = order_key(stamp, origin, command_id)
                raw_id = command_id.encode()
                if txn.put(raw_id, seq + key, db=ids, overwrite=False):
                    txn.put(key, seq + record, db=order)
                    continue
                # A second copy of the ID: the one that sorts first keeps it.
                # On a tie of order keys the smaller fingerprint wins, as in
                # the engine. Only here are fingerprints needed in this pass.
                stored = txn.get(raw_id, db=ids)
                assert stored is not None, "put found the ID, get did not"
                stored_key = stored[SEQ_BYTES:]
                stored_entry = txn.get(stored_key, db=order)
                assert stored_entry is not None, "an ID's winning copy is missing"
                _id, stored_type, stored_payload, _stamp, _origin = unpack(
                    stored_entry[SEQ_BYTES:]
                )
                stored_fp = codec.fingerprint(stored_type, stored_payload)
                fp = codec.fingerprint(type_name, payload)
                if (key, fp) >= (stored_key, stored_fp):
                    lost += fold.log_item_hash(command_id, fp)
                    continue
                lost += fold.log_item_hash(command_id, stored_fp)
                txn.put(raw_id, seq + key, db=ids)
                txn.delete(stored_key, db=order)
                txn.put(key, seq + record, db=order)
            last_seq = int.from_bytes(chunk[-1][0], "big")
    return last_seq, lost


@dataclass(slots=True)
class _Folded:
    commands: int = 0
    applied: int = 0
    state_digest: int = 0
    log_digest: int = 0


def _fold_winners(scratch: _Scratch, app: App, *, horizon: int) -> _Folded:
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
        with scratch.env.begin(write=True) as txn:
            _fold_chunk(chunk, txn, scratch, app, horizon, totals)
        after = chunk[-1][0]


def _fold_chunk(
    chunk: list[tuple[bytes, bytes]],
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
    unpack = codec.unpack
    for _key, value in chunk:
        command = Command.from_record(unpack(value[SEQ_BYTES:]))
        totals.commands += 1
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


def _summer_main(path: str, domains: list[str]) -> None:
    """Print the sum of the log's items in hexadecimal (the second process
    of `_Summer`). Anything else it prints goes to stderr, and it exits if
    the replay that started it dies."""
    result, sys.stdout = sys.stdout, sys.stderr
    parent = os.getppid()
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    source = Store(path, domains, readonly=True)
    try:
        print(f"{sum_log_items(source):x}", file=result)
    finally:
        source.close()


def _exit_with_parent(parent: int) -> None:
    # An orphan is adopted by another process, so its parent ID changes.
    while os.getppid() == parent:
        time.sleep(_PARENT_CHECK_S)
    os._exit(1)


if __name__ == "__main__":
    _summer_main(sys.argv[1], sys.argv[2:])
