"""Replay: rebuild a stopped node's state from its log alone.

Replay reads nothing but the log: not the node's indexes, outcomes or
state. It folds the log into fresh state databases in a scratch LMDB
environment beside the data directory, deleted afterwards, in one of two
ways:

- One pass. A log in canonical order with one copy of each ID, which is
  what a node that never received a peer's command has, is folded as it is
  read. A second process (below) checks that no ID has two copies.
- Two passes, for any other log:
  1. Winners. Read the log in append order, compute each command's order
     key, and keep, per ID, the copy that sorts first by `(order key,
     fingerprint)`, as the engine does. The scratch contains `ID -> seq +
     order key` and `order key -> seq + record`, so the second pass reads
     the winners in order from one cursor.
  2. Fold. Walk the winners in canonical order.

Either way the fold takes every command the node could fold (a known type,
a stamp within the skew horizon) and sums outcome and state digests as the
engine does.

The log digest needs every command's fingerprint, the costliest part of a
command to recompute. It is computed as the sum over every log entry, less
the copies that lost. For a long log, a second process sums the entries
and checks the IDs for a second copy while this one folds, and the first
pass, when one runs, subtracts each copy that loses.

The passes are an implementation of the engine's rules separate from the
engine, so equal digests show that the live state is exactly the fold of
the log. No pass keeps more than one chunk of commands in memory, whatever
the log's size.
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
from typing import Any

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
"""Logs with at least this many entries have their log items summed, and
their IDs checked, by a second process, and may be folded in one pass.
Starting one takes about 0.15 s, more than a shorter log saves."""
_SCRATCH_MAP_BYTES_MIN = 64 * 1024 * 1024
_SCRATCH_PREFIX = ".replay-"
_CHECK_DIR = "ids-check"
"""Where, inside the scratch directory, the second process keeps the IDs it saw."""
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
    passes: int = 2
    """1 when the log was in canonical order with one copy per ID and was
    folded as it was read, else 2."""

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
            checker = None
            if log_length >= worker_entries_min:
                checker = stack.enter_context(
                    _Checker(path, domains, scratch_dir / _CHECK_DIR)
                )
            scratch = _Scratch(scratch_dir, app, map_bytes=2 * source.map_bytes())
            stack.callback(scratch.close)
            folded = None
            if checker is not None:
                folded = _fold_in_log_order(source, scratch, app, horizon=horizon)
            # A one-pass fold counts only if the second process found no ID twice.
            check = None
            if checker is not None and folded is not None:
                check = checker.result()
            if folded is not None and check is not None and check.unique:
                entries, passes = log_length, 1
                folded.log_digest = check.items
            else:
                scratch.clear_state()  # of a one-pass fold that stopped
                entries, lost_items = _find_winners(source, scratch)
                folded = _fold_winners(scratch, app, horizon=horizon)
                check = checker.result() if checker is not None else None
                all_items = sum_log_items(source) if check is None else check.items
                folded.log_digest = all_items - lost_items
                passes = 2
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
        passes=passes,
    )
    log.info(
        "replay_completed",
        log_entries=entries,
        passes=passes,
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

    def clear_state(self) -> None:
        with self.env.begin(write=True) as txn:
            for db in self.state.values():
                txn.drop(db, delete=False)

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


@dataclass(frozen=True, slots=True)
class _LogCheck:
    items: int
    """The sum of `fold.log_item_hash` over every log entry."""
    unique: bool
    """Whether every ID has one copy in the log."""


class _Checker:
    """`check_log` in a second process (`python -m cmdlog.replay`), so it
    runs beside the fold on another core. A new interpreter, not a fork: the
    caller may have threads, and `multiprocessing`'s spawn would run the
    caller's main module again.

    The second process imports cmdlog from where this one did, never from
    its working directory (`-P`), so both run the same code. It only saves
    time, so when it cannot start or fails, `result` logs why and returns
    None, and the caller works without it.
    """

    def __init__(self, path: Path, domains: list[str], ids_dir: Path) -> None:
        self._process: subprocess.Popen[str] | None = None
        self._result: _LogCheck | None = None
        self._done = False
        package_root = str(Path(__file__).resolve().parent.parent)
        search_path = os.environ.get("PYTHONPATH")
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [package_root, search_path])),
        }
        argv = [
            sys.executable, "-P", "-m", "cmdlog.replay", str(path), str(ids_dir),
            *domains,
        ]  # fmt: skip
        try:
            self._process = subprocess.Popen(
                argv,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
        except OSError as exc:
            log.warning("replay_checker_not_started", error=str(exc))

    def __enter__(self) -> _Checker:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.kill()
        self._process.communicate()

    def result(self) -> _LogCheck | None:
        """Wait for the second process and return its check, or None if it failed."""
        if self._process is None or self._done:
            return self._result
        self._done = True
        out, err = self._process.communicate()
        fields = out.split()
        if self._process.returncode == 0 and len(fields) == 2:
            items, unique = fields
            with contextlib.suppress(ValueError):
                if unique in ("0", "1"):
                    self._result = _LogCheck(int(items, 16), unique == "1")
                    return self._result
        log.warning(
            "replay_checker_failed",
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
            total += _log_item(codec.unpack(record))
    return total


def _log_item(fields: list[Any]) -> int:
    command_id, type_name, payload, _stamp, _origin = fields
    return fold.log_item_hash(command_id, codec.fingerprint(type_name, payload))


def check_log(source: Store, ids_dir: Path) -> _LogCheck:
    """Sum the log's items, and find whether any ID has two copies, keeping
    the IDs seen in an LMDB environment in `ids_dir`."""
    total = 0
    unique = True
    env = lmdb.open(
        str(ids_dir),
        map_size=max(source.map_bytes(), _SCRATCH_MAP_BYTES_MIN),
        sync=False,
        metasync=False,
    )
    try:
        for chunk in _log_chunks(source):
            with env.begin(write=unique) as txn:
                for _seq, record in chunk:
                    fields = codec.unpack(record)
                    total += _log_item(fields)
                    if unique and not txn.put(fields[0].encode(), b"", overwrite=False):
                        unique = False
    finally:
        env.close()
    return _LogCheck(total, unique)


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


def _fold_in_log_order(
    source: Store, scratch: _Scratch, app: App, *, horizon: int
) -> _Folded | None:
    """Fold the log as it is read, if append order is canonical order (one pass).

    Return the totals, or None at the first entry that sorts before the
    entry ahead of it. After None, the scratch state contains part of the
    log. A second copy of an ID is not detected here.
    """
    totals = _Folded()
    previous: tuple[int, str, str] = (-1, "", "")
    unpack = codec.unpack
    for chunk in _log_chunks(source):
        commands = []
        for _seq, record in chunk:
            command = Command.from_record(unpack(record))
            # The tuple sorts as the order key does (see cmdlog.model).
            position = (command.stamp, command.origin, command.id)
            if position <= previous:
                return None
            previous = position
            commands.append(command)
        with scratch.env.begin(write=True) as txn:
            _fold_chunk(commands, txn, scratch, app, horizon, totals)
    return totals


def _fold_winners(scratch: _Scratch, app: App, *, horizon: int) -> _Folded:
    """Fold the winners in canonical order into fresh state (pass 2)."""
    totals = _Folded()
    unpack = codec.unpack
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
        commands = [
            Command.from_record(unpack(value[SEQ_BYTES:])) for _key, value in chunk
        ]
        with scratch.env.begin(write=True) as txn:
            _fold_chunk(commands, txn, scratch, app, horizon, totals)
        after = chunk[-1][0]


def _fold_chunk(
    commands: list[Command],
    txn: lmdb.Transaction,
    scratch: _Scratch,
    app: App,
    horizon: int,
    totals: _Folded,
) -> None:
    state_dbs = scratch.state

    def state_get(domain: str, key: bytes) -> bytes | None:
        # Positional arguments, because py-lmdb parses keywords on every call.
        return txn.get(key, None, state_dbs[domain])  # type: ignore[return-value]

    overlay = StateOverlay(state_get)
    types = app.types
    apply_command, pack_outcome = fold.apply_command, fold.pack_outcome
    outcome_item_hash = fold.outcome_item_hash
    outcomes_sum = 0
    applied = 0
    for command in commands:
        if command.type not in types or command.stamp > horizon:
            continue  # held pending on the node as well
        outcome, _undo = apply_command(app, overlay, command)
        outcomes_sum += outcome_item_hash(command.id, pack_outcome(outcome))
        applied += 1
    totals.commands += len(commands)
    totals.applied += applied
    totals.state_digest += outcomes_sum

    for domain, state_key, base, current in overlay.changes():
        db = state_dbs[domain]
        if base is not None:
            totals.state_digest -= fold.state_item_hash(domain, state_key, base)
        if current is None:
            txn.delete(state_key, b"", db)
        else:
            totals.state_digest += fold.state_item_hash(domain, state_key, current)
            txn.put(state_key, current, True, True, False, db)


def _checker_main(path: str, ids_dir: str, domains: list[str]) -> None:
    """Print `check_log`'s sum in hexadecimal and 1 or 0 for unique IDs (the
    second process of `_Checker`). Anything else it prints goes to stderr,
    and it exits if the replay that started it dies."""
    result, sys.stdout = sys.stdout, sys.stderr
    parent = os.getppid()
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    source = Store(path, domains, readonly=True)
    try:
        check = check_log(source, Path(ids_dir))
        print(f"{check.items:x} {int(check.unique)}", file=result)
    finally:
        source.close()


def _exit_with_parent(parent: int) -> None:
    # An orphan is adopted by another process, so its parent ID changes.
    while os.getppid() == parent:
        time.sleep(_PARENT_CHECK_S)
    os._exit(1)


if __name__ == "__main__":
    _checker_main(sys.argv[1], sys.argv[2], sys.argv[3:])
