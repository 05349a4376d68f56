"""The store: one LMDB environment per data directory, behind typed accessors.

Named databases, each with its key and value layout:

- `meta`: setting name -> msgpack value (node ID, format version, clock,
  next sequence number, digests).
- `log`: local sequence number (8 bytes, big-endian) -> command record, in
  local append order. Append-only.
- `id_gens`: generation + command ID -> seq (8 bytes, big-endian) of the
  copy the node folds (the one that sorts first in canonical order). The
  command itself is in the log entry at seq. Keys are kept in generations
  (see `cmdlog/generations.py`), so random IDs land on the leaves of the
  newest generation only, and small entries keep those few.
- `folded`: order key -> seq (8 bytes) followed by the packed outcome
  `[status, result, reason]`, for every command in the fold; iterating it
  is iterating the fold order.
- `pending`: order key -> `[seq, reason]` for stored commands not folded yet.
- `undo`: order key -> previous values of the state keys that command wrote,
  kept for the most recent folded commands only.
- `conflicts`: `copy_key` (command ID, NUL, order key, fingerprint) ->
  `[seq, fingerprint]` of a copy whose fingerprint differs from the folded
  one.
- `superseded`: `copy_key` -> empty, for every copy of an ID that lost to
  another copy, so a copy that comes round again is recognised and not
  stored or forwarded twice.
- `peers`: peer URL -> replication cursor and identity.
- `sources`: last sequence number of a run of log entries (8 bytes,
  big-endian) -> `[first seq, node, boot]`: the run holds copies received
  from that node while it ran as process `boot`. A stream to that node
  skips them while it still runs as that process.
- `catalog`: command type -> fingerprint of its handler code, recorded the
  first time the node folded a command of that type.
- `state_gens.DOMAIN`: one per domain, generation + handler key -> msgpack
  value, or empty for a key deleted while an older generation has a value
  for it.
- In `meta`, for the generations: `generation`, `[number, last seq before
  it]` of the one being written; `runs`, `[number, level]` of each run,
  newest first; `merge`, how far a running merge got; `merge_counter`, the
  merged runs made so far.

Only the writer thread opens write transactions. Reads from other threads
go through `read()`, which also lets the writer grow the map: LMDB allows
`set_mapsize` only while this process has no transaction open.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import lmdb
import structlog

from cmdlog import codec
from cmdlog.config import FORMAT_VERSION, StoreConfig
from cmdlog.errors import (
    DataError,
    StartupError,
    StorageFailed,
    StorageFull,
    VersionMismatch,
)
from cmdlog.generations import (
    MERGED_PREFIX_BASE,
    GenerationTree,
    Runs,
    generation_prefix,
    move_step,
    pick_merge,
    run_prefixes,
)

log = structlog.get_logger(__name__)

SEQ_BYTES = 8
_CORE_DBS = (
    "meta", "log", "id_gens", "folded", "pending", "undo", "conflicts", "superseded",
    "peers", "catalog", "sources",
)  # fmt: skip
_ADDED_DBS = frozenset({"sources", "id_gens"})
"""Databases that a store written by an older release may lack."""
KEY_BYTES_MAX = 511
"""LMDB's limit on a key (`max_key_size()` in py-lmdb 3.0)."""
_UPGRADE_CHUNK_ENTRIES = 50_000
"""Entries an upgrade moves per write transaction."""
_STATE_PREFIX = "state_gens."
_STATE_PREFIX_V2 = b"state."
_DBS_MAX = 64
DISK_FREE_BYTES_MIN = 16 * 1024 * 1024
"""Below this much free space, a failed write is reported as a full disk."""
_EMPTY_LIST = codec.pack([])
LOCK_FILE = "node.lock"
T = TypeVar("T")


def make_data_dir(path: Path) -> None:
    """Create the data directory if it is missing; raise `StartupError` if it
    cannot be created."""
    fix = "pass a directory, or a path where one can be created"
    if path.exists() and not path.is_dir():
        raise StartupError(f"--data {path} is not a directory; {fix}")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StartupError(
            f"cannot create the --data directory {path}: {exc.strerror or exc}; {fix}"
        ) from exc


def require_store(path: Path) -> None:
    """Raise `StartupError` unless `path` contains a store."""
    if not (path / "data.mdb").exists():
        raise StartupError(
            f"no cmdlog data in {path}; pass the --data directory of a node"
        )


def seq_key(seq: int) -> bytes:
    return seq.to_bytes(SEQ_BYTES, "big")


def copy_key(command_id: str, key: bytes, fingerprint: bytes) -> bytes:
    """Return the `conflicts` and `superseded` key of one copy of a command.

    The key is the ID, NUL, the order key (which repeats the ID) and the
    fingerprint. When that is over LMDB's key size limit (an ID of 235
    characters from an origin of 16 digits makes 512 bytes), the key is NUL
    and 32 bytes of BLAKE2b of it instead. IDs start with a printable
    character, so the two forms never meet, and no store contains a key
    over the limit from before.
    """
    copy = command_id.encode() + b"\x00" + key + fingerprint
    if len(copy) <= KEY_BYTES_MAX:
        return copy
    return b"\x00" + hashlib.blake2b(copy, digest_size=32).digest()


class _ReadGate:
    """Shared/exclusive gate: many readers, or one map resize, never both."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._resizing = False

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._resizing:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._resizing = True
            try:
                while self._readers:
                    self._cond.wait()
                yield
            finally:
                self._resizing = False
                self._cond.notify_all()


class Txn:
    """Typed access to the named databases inside one LMDB transaction.

    The methods that run for every command call py-lmdb with positional
    arguments, in its order put(key, value, dupdata, overwrite, append, db),
    get(key, default, db) and delete(key, value, db). py-lmdb parses keyword
    arguments on every call, which took 180 ns of a 360 ns put.
    """

    def __init__(
        self,
        store: Store,
        txn: lmdb.Transaction,
        prefixes: tuple[bytes, ...],
        *,
        write: bool = False,
    ) -> None:
        self._store = store
        # lmdb's stubs type every read as bytes | memoryview; every transaction
        # here is opened with buffers=False, so reads are bytes.
        self.raw: Any = txn
        self._dbs = store._dbs
        self._ids = store._ids
        self._state = store._state
        self._prefixes = prefixes
        """Runs to read, newest first (see `Store.read`)."""
        if store.readonly:
            # Another process may be writing: read its runs in this snapshot.
            self._prefixes = self.runs_to_read()
        self._prefix = b""
        """The generation this transaction writes."""
        self._generation = [0, 0]
        self._first_seq = 0
        self.after_commit: list[Callable[[], None]] = []
        """Steps the store takes once this transaction has committed."""
        if write:
            self._generation = self.generation()
            self._prefix = generation_prefix(self._generation[0])
            self._first_seq = self.log_last_seq()

    def generation(self) -> list[int]:
        """Return `[number, last seq before it]` of the generation being written."""
        found = self.meta_get("generation")
        return [0, 0] if found is None else found

    def runs(self) -> Runs:
        """Return the runs of the ID index and state, newest first."""
        found = self.meta_get("runs")
        if found is not None:
            return found  # type: ignore[no-any-return]
        return [[g, 0] for g in range(self.generation()[0], -1, -1)]

    def runs_to_read(self) -> tuple[bytes, ...]:
        """Return the prefixes of the runs to read, newest first."""
        return run_prefixes(self.runs())

    def maintain(self) -> None:
        """Start a new generation if the one this transaction wrote is full,
        and move a merge on by a share of the commands it appended.

        Reads look in a new generation or a merged run from before the
        transaction commits (a run with nothing in it yet costs a lookup),
        and in the sources of a merge until after the commit that ends it.
        """
        number, before = self._generation
        last_seq = self.log_last_seq()
        if last_seq - before >= self._store.config.generation_commands:
            runs = [[number + 1, 0], *self.runs()]
            self.meta_put("generation", [number + 1, last_seq])
            self.meta_put("runs", runs)
            self._store.publish_runs(run_prefixes(runs))
        budget = (
            last_seq - self._first_seq
        ) * self._store.config.merge_keys_per_command
        if budget > 0:
            self._merge(budget)

    def _merge(self, budget: int) -> None:
        """Move up to `budget` keys for the running merge, or for a new one
        if a level has enough runs. A merge that another one waits behind
        moves twice as many."""
        merge = self.meta_get("merge") or self._start_merge()
        if merge is None:
            return

        runs = self.runs()
        waiting = [run for run in runs if run[0] not in merge["sources"]]
        if pick_merge(waiting, self._store.config.merge_fan_in) is not None:
            budget *= 2

        trees = self._store.merge_trees()
        sources = [generation_prefix(number) for number in merge["sources"]]
        target = generation_prefix(merge["target"])
        while budget > 0:
            names = [n for n in sorted(trees) if n >= merge["tree"]]
            if not names:
                self._finish_merge(merge, runs)
                return
            done, moved = move_step(
                self.raw,
                trees[names[0]].db,
                sources,
                target,
                budget,
                keep_tombstones=merge["keep_tombstones"],
            )
            budget -= max(moved, 1)
            # A name followed by NUL is the first name after it.
            merge["tree"] = names[0] + "\x00" if done else names[0]
        self.meta_put("merge", merge)

    def _start_merge(self) -> dict[str, Any] | None:
        """Pick runs to merge and put the merged run before them, to be read
        from now on."""
        runs = self.runs()
        picked = pick_merge(runs, self._store.config.merge_fan_in)
        if picked is None:
            return None
        start, end = picked
        counter = self.meta_get("merge_counter", 0)
        self.meta_put("merge_counter", counter + 1)
        target, level = MERGED_PREFIX_BASE + counter, runs[start][1] + 1
        merge = {
            "sources": [number for number, _level in runs[start:end]],
            "target": target,
            "level": level,
            # Older runs may hold a value that a tombstone hides.
            "keep_tombstones": end < len(runs),
            "tree": "",
        }
        runs.insert(start, [target, level])
        self.meta_put("runs", runs)
        self._store.publish_runs(run_prefixes(runs))
        return merge

    def _finish_merge(self, merge: dict[str, Any], runs: Runs) -> None:
        """Drop the sources, all empty now, from the runs; reads stop looking
        in them once this transaction has committed."""
        runs = [run for run in runs if run[0] not in merge["sources"]]
        self.meta_put("runs", runs)
        self.raw.delete(b"merge", b"", self._dbs["meta"])
        store, final = self._store, run_prefixes(runs)
        self.after_commit.append(lambda: store.publish_runs(final))
        log.info("runs_merged", runs=len(merge["sources"]), run_level=merge["level"])

    # meta

    def meta_get(self, name: str, default: Any = None) -> Any:
        data = self.raw.get(name.encode(), db=self._dbs["meta"])
        return default if data is None else codec.unpack(data)

    def meta_put(self, name: str, value: Any) -> None:
        self.raw.put(name.encode(), codec.pack(value), db=self._dbs["meta"])

    # log

    def log_append(self, seq: int, record: Sequence[Any]) -> None:
        """Store `record` (a `Command` packs as its record) as entry `seq`."""
        stored = self.raw.put(
            seq.to_bytes(SEQ_BYTES, "big"),
            codec.pack(record),
            True,
            True,
            True,  # append
            self._dbs["log"],
        )
        assert stored, f"log sequence {seq} is not after the last one"

    def log_get(self, seq: int) -> list[Any]:
        data = self.raw.get(seq_key(seq), None, self._dbs["log"])
        if data is None:
            raise DataError(f"log entry {seq} is missing; the store is damaged")
        return codec.unpack(data)  # type: ignore[no-any-return]

    def log_iter(self, after_seq: int) -> Iterator[tuple[int, bytes]]:
        """Yield `(seq, packed record)` for every log entry after `after_seq`."""
        cursor = self.raw.cursor(db=self._dbs["log"])
        if not cursor.set_range(seq_key(after_seq + 1)):
            return
        for key, value in cursor:
            yield int.from_bytes(key, "big"), value

    def log_records(self, after_seq: int) -> Iterator[tuple[bytes, bytes]]:
        """Yield `(seq key, packed record)` for every log entry after
        `after_seq`, the key as stored: 8 bytes, big-endian."""
        cursor = self.raw.cursor(db=self._dbs["log"])
        if not cursor.set_range(seq_key(after_seq + 1)):
            return iter(())
        return cursor.iternext()  # type: ignore[no-any-return]

    def log_last_seq(self) -> int:
        cursor = self.raw.cursor(db=self._dbs["log"])
        return int.from_bytes(cursor.key(), "big") if cursor.last() else 0

    # ids

    def id_get(self, command_id: str) -> int | None:
        """Return the log sequence number of the ID's folded copy, or None."""
        data = self._ids.get(self.raw, self._prefixes, command_id.encode())
        return None if data is None else int.from_bytes(data, "big")

    def id_put(self, command_id: str, seq: int) -> None:
        """Point the ID at log entry `seq`, whatever it pointed at before."""
        key = command_id.encode()
        self._ids.put(self.raw, self._prefix, key, seq.to_bytes(SEQ_BYTES, "big"))

    # folded commands and their outcomes

    def folded_get(self, key: bytes) -> tuple[int, bytes] | None:
        """Return `(seq, packed outcome)` of a folded command, or None."""
        data = self.raw.get(key, None, self._dbs["folded"])
        if data is None:
            return None
        return int.from_bytes(data[:SEQ_BYTES], "big"), data[SEQ_BYTES:]

    def folded_put(
        self, key: bytes, seq: int, outcome: bytes, undo: list[Any] | None = None
    ) -> None:
        """Record a folded command and, unless `undo` is None, its undo record."""
        dbs = self._dbs
        packed = seq.to_bytes(SEQ_BYTES, "big") + outcome
        self.raw.put(key, packed, True, True, False, dbs["folded"])
        if undo is not None:
            data = codec.pack(undo) if undo else _EMPTY_LIST
            self.raw.put(key, data, True, True, False, dbs["undo"])

    def folded_delete(self, key: bytes) -> None:
        self.raw.delete(key, db=self._dbs["folded"])

    def folded_last_key(self) -> bytes | None:
        cursor = self.raw.cursor(db=self._dbs["folded"])
        return cursor.key() if cursor.last() else None

    def folded_from(self, key: bytes) -> Iterator[tuple[bytes, int, bytes]]:
        """Yield `(order key, seq, packed outcome)` from `key` on, in fold order."""
        cursor = self.raw.cursor(db=self._dbs["folded"])
        if not cursor.set_range(key):
            return
        for found, data in cursor:
            yield found, int.from_bytes(data[:SEQ_BYTES], "big"), data[SEQ_BYTES:]

    # pending commands

    def pending_put(self, key: bytes, seq: int, reason: str) -> None:
        self.raw.put(key, codec.pack([seq, reason]), db=self._dbs["pending"])

    def pending_get(self, key: bytes) -> list[Any] | None:
        data = self.raw.get(key, db=self._dbs["pending"])
        return None if data is None else codec.unpack(data)

    def pending_delete(self, key: bytes) -> None:
        self.raw.delete(key, db=self._dbs["pending"])

    def pending_iter(self) -> Iterator[tuple[bytes, list[Any]]]:
        cursor = self.raw.cursor(db=self._dbs["pending"])
        for key, data in cursor:
            yield key, codec.unpack(data)

    # undo records

    def undo_pop(self, key: bytes) -> list[Any] | None:
        data = self.raw.pop(key, db=self._dbs["undo"])
        return None if data is None else codec.unpack(data)

    def undo_trim(self, keep: int) -> int:
        """Delete the oldest undo records until at most `keep` remain."""
        excess: int = self.raw.stat(self._dbs["undo"])["entries"] - keep
        if excess <= 0:
            return 0
        cursor = self.raw.cursor(db=self._dbs["undo"])
        cursor.first()
        for _ in range(excess):
            cursor.delete()
        return excess

    def undo_drop_all(self) -> None:
        self.raw.drop(self._dbs["undo"], delete=False)

    # conflicts

    def conflict_put(
        self, command_id: str, key: bytes, seq: int, fingerprint: bytes
    ) -> bool:
        """Record a conflicting copy; return False when it was already recorded."""
        return bool(
            self.raw.put(
                copy_key(command_id, key, fingerprint),
                codec.pack([seq, fingerprint]),
                db=self._dbs["conflicts"],
                overwrite=False,
            )
        )

    def superseded_put(self, command_id: str, key: bytes, fingerprint: bytes) -> None:
        copy = copy_key(command_id, key, fingerprint)
        self.raw.put(copy, b"", db=self._dbs["superseded"])

    def superseded_has(self, command_id: str, key: bytes, fingerprint: bytes) -> bool:
        copy = copy_key(command_id, key, fingerprint)
        return self.raw.get(copy, db=self._dbs["superseded"]) is not None

    # peers

    def peer_get(self, url: str) -> dict[str, Any] | None:
        data = self.raw.get(url.encode(), db=self._dbs["peers"])
        return None if data is None else codec.unpack(data)

    def peer_put(self, url: str, info: dict[str, Any]) -> None:
        self.raw.put(url.encode(), codec.pack(info), db=self._dbs["peers"])

    def peer_delete(self, url: str) -> bool:
        """Forget a peer; return False if it was not stored."""
        return bool(self.raw.delete(url.encode(), db=self._dbs["peers"]))

    # runs of copies received from peers

    def source_put(self, first_seq: int, last_seq: int, node: str, boot: str) -> None:
        """Record log entries `first_seq..last_seq` as copies received from
        `node` while it ran as process `boot`.

        A run that directly follows the last one from the same process
        extends it, so a steady stream from one peer keeps one record.
        """
        db = self._dbs["sources"]
        cursor = self.raw.cursor(db=db)
        if cursor.last():
            previous_first, previous_node, previous_boot = codec.unpack(cursor.value())
            follows = int.from_bytes(cursor.key(), "big") == first_seq - 1
            if follows and (previous_node, previous_boot) == (node, boot):
                cursor.delete()
                first_seq = previous_first
        stored = self.raw.put(
            seq_key(last_seq), codec.pack([first_seq, node, boot]), db=db, append=True
        )
        assert stored, f"source run ending at {last_seq} is not after the last one"

    def sources_from(self, seq: int) -> Iterator[tuple[int, int, str, str]]:
        """Yield `(first seq, last seq, node, boot)` for each run that ends at
        or after `seq`, in log order."""
        if self._dbs["sources"] is None:
            return
        cursor = self.raw.cursor(db=self._dbs["sources"])
        if not cursor.set_range(seq_key(seq)):
            return
        for key, value in cursor:
            first_seq, node, boot = codec.unpack(value)
            yield first_seq, int.from_bytes(key, "big"), node, boot

    def peers(self) -> dict[str, dict[str, Any]]:
        cursor = self.raw.cursor(db=self._dbs["peers"])
        return {key.decode(): codec.unpack(value) for key, value in cursor}

    # handler catalog

    def catalog_get(self, type_name: str) -> str | None:
        data = self.raw.get(type_name.encode(), db=self._dbs["catalog"])
        return None if data is None else str(codec.unpack(data))

    def catalog_put(self, type_name: str, fingerprint: str) -> None:
        self.raw.put(
            type_name.encode(), codec.pack(fingerprint), db=self._dbs["catalog"]
        )

    def catalog(self) -> dict[str, str]:
        cursor = self.raw.cursor(db=self._dbs["catalog"])
        return {key.decode(): str(codec.unpack(value)) for key, value in cursor}

    # domain state

    def state_get(self, domain: str, key: bytes) -> bytes | None:
        return self._state[domain].get(self.raw, self._prefixes, key)

    def state_put(
        self, domain: str, key: bytes, value: bytes | None, *, stored: bool = False
    ) -> None:
        """Write a state key, or delete it when `value` is None. With
        `stored`, the key has a value already, so the key filter has it."""
        tree = self._state[domain]
        if value is None:
            tree.delete(self.raw, self._prefixes, self._prefix, key)
        else:
            tree.put(self.raw, self._prefix, key, value, stored=stored)

    def state_drop_all(self) -> None:
        for tree in self._state.values():
            self.raw.drop(tree.db, delete=False)

    # counts

    def count(self, db_name: str) -> int:
        return int(self.raw.stat(self._dbs[db_name])["entries"])

    def command_count(self) -> int:
        """Return how many IDs are stored. Each has one copy, either folded
        or held."""
        return self.count("folded") + self.count("pending")


class DirectoryLock:
    """An exclusive lock on a data directory, held by the one process using it.

    LMDB lets several processes write one environment in turn, but two nodes
    on one directory would each keep their own clock and caches and corrupt
    the fold. The lock is a `flock`, so the kernel drops it when its process
    exits, SIGKILL included: no stale lock survives a crash.
    """

    def __init__(self, directory: Path) -> None:
        self.path = directory / LOCK_FILE
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip()
            self.release()
            raise StartupError(
                f"the data directory {directory} is in use by another process "
                f"(pid {holder or 'unknown'}); stop that process first (a second "
                "node needs its own --data directory)"
            ) from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        """Give the directory up; closing the file drops the lock."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@dataclass(frozen=True, slots=True)
class _Move:
    """One database an upgrade copies into another, entry by entry."""

    old: Any
    new: Any
    convert: Callable[[bytes, bytes], tuple[bytes, bytes]]
    """Converts an old entry to the new one, keeping the keys' order."""


class Store:
    """An LMDB environment holding one node's log, indexes and state.

    A writable store holds the data directory's `DirectoryLock` until
    `close`; a read-only one takes no lock. A writable store upgrades a store
    of an older format in place, unless `upgrade` is False.
    """

    def __init__(
        self,
        path: Path | str,
        domains: list[str],
        config: StoreConfig | None = None,
        *,
        readonly: bool = False,
        upgrade: bool = True,
    ) -> None:
        self.path = Path(path)
        self.config = config or StoreConfig()
        self.domains = list(domains)
        self.readonly = readonly
        self._runs_read: tuple[int, tuple[bytes, ...]] = (0, run_prefixes([[0, 0]]))
        """A version number and the runs that reads look in, newest first:
        replaced whole, so a reader gets both with one attribute read."""
        self._gate = _ReadGate()
        self._write_lock = threading.Lock()
        self._lock: DirectoryLock | None = None
        if not readonly:
            make_data_dir(self.path)
            self._lock = DirectoryLock(self.path)
        else:
            require_store(self.path)
        try:
            self._open(readonly=readonly, upgrade=upgrade)
        except BaseException:
            if self._lock is not None:
                self._lock.release()
            raise

    def _open(self, *, readonly: bool, upgrade: bool) -> None:
        map_bytes = self.config.map_bytes_initial
        data_file = self.path / "data.mdb"
        if data_file.exists():
            map_bytes = max(map_bytes, data_file.stat().st_size)
        try:
            self.env = lmdb.open(
                str(self.path),
                map_size=map_bytes,
                max_dbs=_DBS_MAX,
                max_readers=self.config.readers_max,
                sync=self.config.durable,
                metasync=self.config.durable,
                readonly=readonly,
                lock=True,
            )
        except lmdb.Error as exc:
            raise StartupError(f"cannot open the store at {self.path}: {exc}") from exc

        # A process killed while reading leaves its reader slot behind, which
        # would pin old pages forever; clearing them is safe at any time.
        stale_readers = self.env.reader_check()
        if stale_readers:
            log.info("stale_readers_cleared", count=stale_readers, path=str(self.path))

        self._dbs: dict[str, Any] = {}
        self._state: dict[str, GenerationTree] = {}
        for name in _CORE_DBS:
            try:
                self._dbs[name] = self.env.open_db(name.encode(), create=not readonly)
            except lmdb.NotFoundError:
                if name not in _ADDED_DBS:
                    raise
                self._dbs[name] = None  # read-only, and older than this database
        self._ids = GenerationTree(self._dbs["id_gens"], None)
        for domain in self.domains:
            self._open_state_db(domain, create=not readonly)
        self._merge_trees: dict[str, GenerationTree] = {}
        try:
            self._check_format(readonly=readonly, upgrade=upgrade)
            if not readonly:
                self._build_filters()
                self._merge_trees = self._find_merge_trees()
        except BaseException:
            self.env.close()
            raise

    def _open_state_db(self, domain: str, *, create: bool) -> None:
        name = (_STATE_PREFIX + domain).encode()
        try:
            db = self.env.open_db(name, create=create)
        except lmdb.NotFoundError:
            # A read-only store that never saw this domain: use an empty one.
            return
        self._state[domain] = GenerationTree(db, None)

    def _build_filters(self) -> None:
        """Build the key filters from every stored key, and read the runs."""
        started = time.monotonic()
        with self.read() as txn:
            self.publish_runs(txn.runs_to_read())
            for tree in (self._ids, *self._state.values()):
                tree.build_filter(txn.raw)
        seconds = time.monotonic() - started
        if seconds > 1.0:
            log.info("key_filters_built", seconds=round(seconds, 3))

    def runs_read(self) -> tuple[bytes, ...]:
        """Return the runs reads look in, newest first."""
        return self._runs_read[1]

    def filter_bytes(self) -> int:
        """Return the memory the key filters take."""
        trees = (self._ids, *self._state.values())
        return sum(t.filter.memory_bytes() for t in trees if t.filter is not None)

    def publish_runs(self, prefixes: tuple[bytes, ...]) -> None:
        """Make reads look in `prefixes`, newest first."""
        self._runs_read = (self._runs_read[0] + 1, prefixes)

    def merge_trees(self) -> dict[str, GenerationTree]:
        """Return the trees a merge moves keys in, by database name."""
        return self._merge_trees

    def _find_merge_trees(self) -> dict[str, GenerationTree]:
        """Return the ID index and every state database in the store: also
        those of domains the app no longer has, so that their keys stay in
        runs that reads look in if the domain comes back."""
        trees = {"id_gens": self._ids}
        for domain, tree in self._state.items():
            trees[_STATE_PREFIX + domain] = tree
        for name in self._database_names():
            text = name.decode()
            if text.startswith(_STATE_PREFIX) and text not in trees:
                trees[text] = GenerationTree(self.env.open_db(name), None)
        return trees

    def _database_names(self) -> list[bytes]:
        """Return the names of the named databases in the environment."""
        with self.read() as txn:
            return [key for key, _value in txn.raw.cursor()]

    def _check_format(self, *, readonly: bool, upgrade: bool) -> None:
        with self.read() as txn:
            version = txn.meta_get("format_version")
        if version is None and not readonly:
            self.write(lambda txn: txn.meta_put("format_version", FORMAT_VERSION))
            return
        if version in _UPGRADES and not readonly and upgrade:
            self._upgrade(version)
            return
        if version in _UPGRADES:
            raise VersionMismatch(
                f"the data directory {self.path} has format version {version}, "
                f"and this cmdlog reads version {FORMAT_VERSION}; start `cmdlog "
                "serve` on it once, which upgrades it in place, then retry"
            )
        if version != FORMAT_VERSION:
            raise VersionMismatch(
                f"the data directory {self.path} has format version {version}, "
                f"this cmdlog reads version {FORMAT_VERSION}; use the cmdlog "
                "release that wrote it, or replay its log into a new directory"
            )

    def _upgrade(self, version: int) -> None:
        """Bring a store of an older format up to `FORMAT_VERSION`.

        Each step commits in chunks and records how far it got, so an
        upgrade cut short by a crash goes on where it stopped, unless an
        older release wrote to the store meanwhile (then the step restarts).
        """
        started = time.monotonic()
        log.info("store_upgrading", path=str(self.path), version=version)
        while version != FORMAT_VERSION:
            _UPGRADES[version](self)
            version += 1
        log.info(
            "store_upgraded",
            path=str(self.path),
            version=version,
            seconds=round(time.monotonic() - started, 3),
        )

    def _upgrade_ids_to_seqs(self) -> None:
        """Format 1 to 2: move `ids` (command ID -> `[seq, fingerprint,
        stamp, origin]`) to `id_seqs` (command ID -> seq), then drop `ids`."""
        move = _Move(
            self.env.open_db(b"ids", create=False),
            self.env.open_db(b"id_seqs", create=True),
            lambda key, value: (key, seq_key(codec.unpack(value)[0])),
        )
        self._move_in_chunks([move], "upgrade_ids_after", 2)

    def _upgrade_to_generations(self) -> None:
        """Format 2 to 3: move `id_seqs` and each `state.DOMAIN` into
        generation 0 of `id_gens` and `state_gens.DOMAIN`, then drop them."""
        first = generation_prefix(0)

        def to_first_generation(key: bytes, value: bytes) -> tuple[bytes, bytes]:
            return first + key, value

        names = self._database_names()
        moves = [
            _Move(
                self.env.open_db(name, create=False),
                self.env.open_db(
                    _STATE_PREFIX.encode() + name[len(_STATE_PREFIX_V2) :]
                ),
                to_first_generation,
            )
            for name in names
            if name.startswith(_STATE_PREFIX_V2)
        ]
        if b"id_seqs" in names:
            ids = self.env.open_db(b"id_seqs", create=False)
            moves.insert(0, _Move(ids, self._dbs["id_gens"], to_first_generation))

        def first_run(txn: Txn) -> None:
            # Generation 0 contains everything stored, so give it the level a
            # run of its size would have, and merges do not copy it early.
            entries = txn.count("id_gens")
            level, size = 0, self.config.generation_commands
            while size * self.config.merge_fan_in <= entries:
                level, size = level + 1, size * self.config.merge_fan_in
            # Commits of the upgrade may have started generations after 0,
            # all empty: new writes go to the newest.
            newest = txn.generation()[0]
            txn.meta_put("runs", [[g, 0] for g in range(newest, 0, -1)] + [[0, level]])

        self._move_in_chunks(moves, "upgrade_generations_after", 3, first_run)

    def _move_in_chunks(
        self,
        moves: list[_Move],
        progress: str,
        version: int,
        finish: Callable[[Txn], None] | None = None,
    ) -> None:
        """Copy every entry of each move's old database to its new one, in
        commits of `_UPGRADE_CHUNK_ENTRIES`, then drop the old databases and
        record format `version` and run `finish`, all in the last commit.

        The progress recorded between commits contains the log's last seq too.
        An older release run on the store between two upgrade runs writes
        the old databases behind the point reached, and appends to the log
        whenever it does, so a changed last seq makes the moves start over.
        """

        def move_chunk(txn: Txn) -> bool:
            last_seq = txn.log_last_seq()
            index, after = 0, None
            found_progress = txn.meta_get(progress)
            if (
                isinstance(found_progress, list)
                and len(found_progress) == 3
                and found_progress[-1] == last_seq
            ):
                index, after = found_progress[0], found_progress[1]
            elif found_progress is not None:
                for move in moves:
                    txn.raw.drop(move.new, delete=False)

            moved = 0
            while index < len(moves) and moved < _UPGRADE_CHUNK_ENTRIES:
                move = moves[index]
                cursor = txn.raw.cursor(db=move.old)
                found = cursor.set_range(after) if after is not None else cursor.first()
                if found and cursor.key() == after:
                    found = cursor.next()
                while found and moved < _UPGRADE_CHUNK_ENTRIES:
                    key, value = cursor.item()
                    # The old database yields its keys in order and the new
                    # one contains only keys before them, so every put appends.
                    new_key, new_value = move.convert(key, value)
                    appended = txn.raw.put(new_key, new_value, db=move.new, append=True)
                    assert appended, f"upgrade met key {key!r} out of order"
                    after, moved = key, moved + 1
                    found = cursor.next()
                if found:
                    break
                index, after = index + 1, None

            if index < len(moves):
                txn.meta_put(progress, [index, after, last_seq])
                return False
            for move in moves:
                txn.raw.drop(move.old, delete=True)
            txn.raw.delete(progress.encode(), db=self._dbs["meta"])
            txn.meta_put("format_version", version)
            if finish is not None:
                finish(txn)
            return True

        while not self.write(move_chunk):
            pass

    @contextlib.contextmanager
    def read(self) -> Iterator[Txn]:
        """Open a read-only transaction for the duration of the `with` block.

        The runs it reads are those published while its snapshot was taken:
        the writer publishes a run that appears before the commit that
        writes it, and drops one only after the commit that empties it.
        """
        with self._gate.shared():
            while True:
                version, prefixes = self._runs_read
                raw = self.env.begin(buffers=False)
                if self._runs_read[0] == version:
                    break
                raw.abort()
            with raw:
                yield Txn(self, raw, prefixes)

    def write(self, work: Callable[[Txn], T]) -> T:
        """Run `work` in one write transaction and commit it durably.

        When the map fills up, the transaction is aborted, the map grows and
        `work` runs again from the start, so `work` must not have effects
        outside the transaction. Raises `StorageFull` when the map cannot
        grow any more or the disk has no room.
        """
        with self._write_lock:
            self._grow_if_needed()
            for _attempt in range(self.config.map_grow_attempts_max):
                try:
                    with self.env.begin(write=True, buffers=False) as raw:
                        txn = Txn(self, raw, self._runs_read[1], write=True)
                        result = work(txn)
                        txn.maintain()
                    for step in txn.after_commit:
                        step()
                    return result
                except lmdb.MapFullError:
                    self._grow(reason="map_full")
                except (lmdb.Error, OSError) as exc:
                    raise self._storage_error(exc) from exc
            raise StorageFull(
                f"the LMDB map at {self.path} is full after "
                f"{self.config.map_grow_attempts_max} growths; raise "
                "map_bytes_initial or free disk space"
            )

    def _storage_error(self, exc: BaseException) -> StorageFull | StorageFailed:
        # LMDB reports a write cut short by a full disk as EIO, not ENOSPC, so
        # the free space decides which condition it was.
        free_bytes = shutil.disk_usage(self.path).free
        if "No space" in str(exc) or free_bytes < DISK_FREE_BYTES_MIN:
            log.error("disk_full", path=str(self.path), free_bytes=free_bytes)
            return StorageFull(
                f"the disk under {self.path} is full ({free_bytes} bytes free; the "
                f"write failed with: {exc}); free space and retry"
            )
        log.error("write_failed", path=str(self.path), error=str(exc))
        return StorageFailed(
            f"writing to the store at {self.path} failed: {exc}; nothing of this "
            "write was stored, so it may be retried"
        )

    def used_bytes(self) -> int:
        info = self.env.info()
        return int((info["last_pgno"] + 1) * self.env.stat()["psize"])

    def map_bytes(self) -> int:
        return int(self.env.info()["map_size"])

    def _grow_if_needed(self) -> None:
        if self.used_bytes() > self.map_bytes() * self.config.map_fill_ratio_max:
            self._grow(reason="fill_ratio")

    def _grow(self, *, reason: str) -> None:
        old = self.map_bytes()
        new = int(old * self.config.map_growth_factor)
        with self._gate.exclusive():
            try:
                self.env.set_mapsize(new)
            except lmdb.Error as exc:
                raise StorageFull(
                    f"cannot grow the LMDB map at {self.path} from {old} to "
                    f"{new} bytes: {exc}"
                ) from exc
        log.info("map_grown", old_bytes=old, new_bytes=new, reason=reason)

    def sync(self) -> None:
        self.env.sync(True)

    def close(self) -> None:
        self.env.close()
        if self._lock is not None:
            self._lock.release()


def remove_store_files(path: Path) -> None:
    """Delete the LMDB files of a store directory (used for scratch stores)."""
    for name in ("data.mdb", "lock.mdb"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path / name)


_UPGRADES: dict[int, Callable[[Store], None]] = {
    1: Store._upgrade_ids_to_seqs,
    2: Store._upgrade_to_generations,
}
"""For each older format version, the step that writes the next version."""
