"""The raw LMDB ceiling: cmdlog's puts written with py-lmdb and nothing else.

`RawWorkload` turns the benchmark's commands into the puts the engine makes
for them (read from `cmdlog/engine.py` and `cmdlog/store.py`), per command:

- `log`: one append under the next sequence number (8 bytes, big-endian);
- `id_gens`: one put under the generation number and the command's UUID
  key, which lands on a random leaf of the newest generation;
- `folded` and `undo`: one put each under the order key (stamp, origin,
  ID), which grows with the stamp, so both are appends in effect;
- `state_gens.ledger`: one put under the generation and `charge/<UUID>`
  (random) for a charge, and one put per account the batch touched,
  because the engine's state overlay writes each key once per transaction;
- per transaction: three `meta` puts (two digests and the clock), one
  more when a new generation starts, and, once the undo horizon is full,
  one `undo` delete per command at the old end.

A new generation starts after a commit that brings the commands since the
last one to `StoreConfig.generation_commands`, as in the store. The store
also merges old generations (see `cmdlog/generations.py`); those copies
and deletes are not among these puts. Values are
packed with cmdlog's codec in the engine's shapes, so key and value sizes
match. Every charge is written as applied, while cmdlog rejects a few for
insufficient funds and writes no state for those, so the ceiling does
slightly more work than cmdlog. The environment is opened with the flags
cmdlog's store uses (read from a `Store` at run time, see `store_flags`)
and the default map size, unless a run overrides `writemap`.
"""

from __future__ import annotations

import os
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lmdb

from bench.pages import CommitPages, PageMeter
from bench.workload import (
    ACCOUNTS,
    BATCH_COMMANDS,
    RawCommand,
    generate_batch,
)
from cmdlog import codec
from cmdlog.config import StoreConfig
from cmdlog.generations import GENERATION_BYTES, generation_prefix
from cmdlog.hlc import LOGICAL_BITS, wall_ms
from cmdlog.model import APPLIED, order_key
from cmdlog.store import Store, seq_key

PAGE_BYTES = 4096
RAW_ORIGIN = "0123456789abcdef"
"""A node ID of the same shape as cmdlog's: 16 hex digits."""
DATABASES = ("log", "id_gens", "folded", "undo", "state_gens.ledger")
GENERATIONAL = frozenset({"id_gens", "state_gens.ledger"})
FSYNC_WRITES_MAX = 2_000
FSYNC_SECONDS_MAX = 3.0

# The databases each page-count run writes. `meta` alone is the cost of a
# commit that changes almost nothing, and each other run adds one database.
ABLATIONS: dict[str, tuple[str, ...]] = {
    "meta only": ("meta",),
    **{f"meta + {name}": ("meta", name) for name in DATABASES},
}


class RawWorkload:
    """A generator of the puts the engine makes for each batch of commands."""

    def __init__(self) -> None:
        self.seq = ACCOUNTS
        self.stamp = wall_ms() << LOGICAL_BITS
        self.balances = dict.fromkeys(range(ACCOUNTS), 0)
        self.generation = 0
        self.generation_before = 0
        """Sequence number before the generation's first command."""
        self.generation_commands = StoreConfig().generation_commands

    def end_generation_if_full(self) -> bool:
        """Start a new generation after a commit, as `Txn.end_full_generation`
        does; return whether it started one."""
        if self.seq - self.generation_before < self.generation_commands:
            return False
        self.generation, self.generation_before = self.generation + 1, self.seq
        return True

    def batch_puts(self, batch: list[RawCommand]) -> list[tuple[str, bytes, bytes]]:
        """Return `(database, key, value)` puts in the order the engine makes them."""
        log_and_ids: list[tuple[str, bytes, bytes]] = []
        folded_and_undo: list[tuple[str, bytes, bytes]] = []
        state: dict[bytes, bytes] = {}
        prefix = generation_prefix(self.generation)
        for key, type_name, payload in batch:
            self.seq += 1
            self.stamp += 1
            record = codec.pack([key, type_name, payload, self.stamp, RAW_ORIGIN])
            log_and_ids.append(("log", seq_key(self.seq), record))
            log_and_ids.append(("id_gens", prefix + key.encode(), seq_key(self.seq)))

            account = payload["account"]
            index = int(account.removeprefix("acct-"))
            account_key = f"account/{account}".encode()
            before = {"currency": "EUR", "balance": self.balances[index]}
            undo = [["ledger", account_key, codec.pack(before)]]
            if type_name == "ledger.deposit":
                self.balances[index] += payload["amount"]
            else:
                self.balances[index] -= payload["amount"]
                charge_key = f"charge/{key}".encode()
                charge = {
                    "account": account,
                    "amount": payload["amount"],
                    "refunded": 0,
                }
                state[charge_key] = codec.pack(charge)
                undo.append(["ledger", charge_key, None])
            balance = self.balances[index]
            state[account_key] = codec.pack({"currency": "EUR", "balance": balance})

            outcome = [APPLIED, {"account": account, "balance": balance}, None]
            folded_key = order_key(self.stamp, RAW_ORIGIN, key)
            folded_value = seq_key(self.seq) + codec.pack(outcome)
            folded_and_undo.append(("folded", folded_key, folded_value))
            folded_and_undo.append(("undo", folded_key, codec.pack(undo)))
        state_puts = [
            ("state_gens.ledger", prefix + key, value) for key, value in state.items()
        ]
        return log_and_ids + folded_and_undo + state_puts


@dataclass(slots=True)
class RawResult:
    commands: int = 0
    puts: int = 0
    seconds: float = 0.0
    pages: CommitPages = field(default_factory=CommitPages)

    @property
    def rate(self) -> float:
        return self.commands / self.seconds


def store_flags() -> dict[str, bool]:
    """Return the LMDB flags of a new cmdlog store with the default config."""
    with tempfile.TemporaryDirectory(prefix="cmdlog-bench-flags-") as scratch:
        store = Store(Path(scratch), ["ledger"])
        try:
            flags: dict[str, bool] = store.env.flags()
        finally:
            store.close()
    return flags


def _open_env(
    path: Path, *, writemap: bool | None, durable: bool = True
) -> tuple[lmdb.Environment, dict[str, Any]]:
    flags = store_flags()
    data_file = path / "data.mdb"
    env = lmdb.open(
        str(path),
        map_size=max(
            StoreConfig().map_bytes_initial,
            data_file.stat().st_size * 2 if data_file.exists() else 0,
        ),
        max_dbs=64,
        sync=flags["sync"] and durable,
        metasync=flags["metasync"] and durable,
        map_async=flags["map_async"],
        writemap=flags["writemap"] if writemap is None else writemap,
    )
    names = ("meta", *DATABASES)
    return env, {name: env.open_db(name.encode()) for name in names}


def _commit(
    env: lmdb.Environment,
    dbs: dict[str, Any],
    puts: list[tuple[str, bytes, bytes]],
    *,
    workload: RawWorkload,
    undo_keep: int | None,
) -> None:
    """Write one transaction as the engine does: puts, meta puts, undo trim."""
    with env.begin(write=True) as txn:
        for name, key, value in puts:
            txn.put(key, value, db=dbs[name], append=name == "log")
        txn.put(b"state_digest", bytes(32), db=dbs["meta"])
        txn.put(b"log_digest", bytes(32), db=dbs["meta"])
        txn.put(b"clock", codec.pack(workload.stamp), db=dbs["meta"])
        if undo_keep is not None:
            excess = txn.stat(dbs["undo"])["entries"] - undo_keep
            if excess > 0:
                cursor = txn.cursor(db=dbs["undo"])
                cursor.first()
                for _ in range(excess):
                    cursor.delete()
        if workload.end_generation_if_full():
            generation = [workload.generation, workload.generation_before]
            txn.put(b"generation", codec.pack(generation), db=dbs["meta"])


def measure_raw(
    data_dir: Path,
    *,
    commands: int,
    seed: int,
    databases: tuple[str, ...] = ("meta", *DATABASES),
    puts_per_commit: int | None = None,
    writemap: bool | None = None,
    mdb_stat: str | None = None,
    workload: RawWorkload | None = None,
    rng: random.Random | None = None,
) -> RawResult:
    """Write the puts for `commands` commands and time the transactions only.

    Commits once per batch of 1,000 commands, as cmdlog does, or every
    `puts_per_commit` puts when given. `writemap` overrides the store's flag.
    Building the values is not timed, and neither is counting pages (with
    `mdb_stat`, when given). A `workload` and `rng` that wrote the
    environment before continue its sequence, stamps and keys.
    """
    env, dbs = _open_env(data_dir, writemap=writemap)
    commits_total = _commits_total(commands, seed, databases, puts_per_commit)
    workload = workload or RawWorkload()
    undo_keep = StoreConfig().undo_horizon_commands if "undo" in databases else None
    result = RawResult()
    meter = PageMeter(
        data_dir, env, dbs.values(), commits_total=commits_total, mdb_stat=mdb_stat
    )
    rng = rng or random.Random(seed)
    try:
        for start in range(0, commands, BATCH_COMMANDS):
            batch = generate_batch(rng, min(BATCH_COMMANDS, commands - start))
            puts = [put for put in workload.batch_puts(batch) if put[0] in databases]
            step = puts_per_commit or max(len(puts), 1)
            for offset in range(0, max(len(puts), 1), step):
                chunk = puts[offset : offset + step]
                meter.before()
                started = time.perf_counter()
                _commit(env, dbs, chunk, workload=workload, undo_keep=undo_keep)
                result.seconds += time.perf_counter() - started
                meter.after()
                result.puts += len(chunk)
            result.commands += len(batch)
    finally:
        env.close()
    result.pages = meter.result
    return result


def measure_raw_filled(
    data_dir: Path, *, stored: int, commands: int, seed: int
) -> tuple[float, RawResult]:
    """Fill a raw environment with `stored` commands, then time `commands` more.

    The fill commits every 1,000 commands without syncing and syncs the file
    once at the end, as the scale benchmark's cmdlog fill does, and is not
    timed. The timed part then commits and syncs every 1,000 commands like
    `measure_raw`, continuing the same sequence and stamps. Returns the fill
    time in seconds and the timed result.
    """
    workload = RawWorkload()
    undo_keep = StoreConfig().undo_horizon_commands
    rng = random.Random(seed)
    env, dbs = _open_env(data_dir, writemap=None, durable=False)
    started = time.perf_counter()
    try:
        for start in range(0, stored, BATCH_COMMANDS):
            batch = generate_batch(rng, min(BATCH_COMMANDS, stored - start))
            if env.info()["map_size"] - _used_bytes(env) < MAP_HEADROOM_BYTES:
                env.set_mapsize(env.info()["map_size"] * 2)
            puts = workload.batch_puts(batch)
            _commit(env, dbs, puts, workload=workload, undo_keep=undo_keep)
        env.sync(True)
    finally:
        env.close()
    fill_s = time.perf_counter() - started
    result = measure_raw(
        data_dir, commands=commands, seed=seed, workload=workload, rng=rng
    )
    return fill_s, result


MAP_HEADROOM_BYTES = 256 * 1024 * 1024
"""Free map space below which the raw fill doubles the map before a commit."""


def _used_bytes(env: lmdb.Environment) -> int:
    return (env.info()["last_pgno"] + 1) * PAGE_BYTES


def _commits_total(
    commands: int, seed: int, databases: tuple[str, ...], puts_per_commit: int | None
) -> int:
    """Return how many commits `measure_raw` will make, by a dry run of the puts."""
    batches = -(-commands // BATCH_COMMANDS)
    if puts_per_commit is None:
        return batches
    workload = RawWorkload()
    rng = random.Random(seed)
    total = 0
    for start in range(0, commands, BATCH_COMMANDS):
        batch = generate_batch(rng, min(BATCH_COMMANDS, commands - start))
        puts = sum(1 for put in workload.batch_puts(batch) if put[0] in databases)
        total += max(-(-puts // puts_per_commit), 1)
    return total


def measure_fsync(directory: Path) -> float:
    """Return 4 KiB write + fdatasync pairs per second, over a bounded loop."""
    block = os.urandom(PAGE_BYTES)
    fd = os.open(directory / "fsync.bin", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.pwrite(fd, block, 0)
        os.fsync(fd)
        writes = 0
        started = time.perf_counter()
        while writes < FSYNC_WRITES_MAX:
            if time.perf_counter() - started > FSYNC_SECONDS_MAX:
                break
            os.pwrite(fd, block, 0)
            os.fdatasync(fd)
            writes += 1
        return writes / (time.perf_counter() - started)
    finally:
        os.close(fd)


def tree_stats(data_dir: Path) -> list[dict[str, Any]]:
    """Return depth, page counts and entries of each named database of a
    store, and for those kept in generations the entries of the newest."""
    env = lmdb.open(str(data_dir), readonly=True, max_dbs=64, lock=False)
    try:
        rows = []
        for name in DATABASES:
            db = env.open_db(name.encode(), create=False)
            with env.begin() as txn:
                row = {"db": name, **txn.stat(db)}
                if name in GENERATIONAL:
                    row["newest_entries"] = _newest_generation_entries(txn, db)
                rows.append(row)
        return rows
    finally:
        env.close()


def _newest_generation_entries(txn: lmdb.Transaction, db: Any) -> int:
    cursor = txn.cursor(db=db)
    if not cursor.last():
        return 0
    cursor.set_range(bytes(cursor.key()[:GENERATION_BYTES]))
    return sum(1 for _key in cursor.iternext(values=False))


def newest_generation_leaves(tree: dict[str, Any]) -> float:
    """Return the leaf pages of a tree's newest generation, at the tree's
    mean entries per leaf: the leaves its random puts land on."""
    entries = max(tree["entries"], 1)
    return float(tree["leaf_pages"] * tree.get("newest_entries", entries) / entries)


def distinct_leaves_expected(leaf_pages: int, random_puts: int) -> float:
    """Return how many of `leaf_pages` leaves `random_puts` uniform keys hit."""
    if leaf_pages <= 0:
        return 0.0
    return leaf_pages * (1 - (1 - 1 / leaf_pages) ** random_puts)
