"""Scale benchmark: the append rate with millions of commands stored.

The target: with 10,000,000 commands stored, appends run at no less than
80% of the empty-store rate. The dedupe lookup of each Idempotency-Key
must not slow down as the ID index (`id_gens`) grows.

1. Fill: one data directory gets N commands through `Database.submit`, the
   workload of `bench.core` (1,000 `ledger.open`, then deposits and charges
   under random UUID4 keys, 1,000 per commit). The fill opens the store
   with `StoreConfig(durable=False)`, so its commits are not synced, and
   then syncs the whole file once. It is a real cmdlog store all the same.
2. Measure: each round appends M more commands under new random keys,
   1,000 per commit, with the default (durable) `StoreConfig`, (a) to a new
   empty store and (b) to the filled store, alternating which goes first.
   Only the `Database.submit` calls are timed. Around them, the run counts
   the time inside the write transaction, the pages each of the last
   commits dirtied (`bench.pages`) and the device's write requests. After
   each run it reads the tree shape of each named database and times ID
   lookups, so a slower (b) can be traced to its cause.
3. Diagnose: one more append per store with `durable=False` separates the
   sync from the rest of the commit, and a 4 KiB write + fdatasync loop
   gives the disk's sync rate.

Run `python -m bench.scale [--quick] [--commands N]` from the repository
root. The store is made under the temp directory (set TMPDIR to move it).
After the first 100,000 commands the fill estimates the disk the whole
store needs, with a margin, and raises DiskSpaceError when the free space
is short. On the 2-core machine measured (shared with other work), the
10,000,000-command store took 4.1 GB and the full run 15 minutes. A quick
run (300,000 stored) is a smoke test of the code, not of the target.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.core import TimedEngine, quiet_logging, temp_dir
from bench.cpu_time import machine_busy_seconds
from bench.lmdb_ceiling import (
    DATABASES,
    distinct_leaves_expected,
    measure_fsync,
    measure_raw,
    measure_raw_filled,
    newest_generation_leaves,
    store_flags,
    tree_stats,
)
from bench.pages import TAIL_COMMITS, PageMeter, ensure_mdb_stat
from bench.report import median, progress, spread, table
from bench.workload import (
    ACCOUNTS,
    BATCH_COMMANDS,
    DEPOSIT_SHARE,
    account_opens,
    generate_batch,
    ledger_app,
)
from cmdlog.app import App
from cmdlog.config import StoreConfig
from cmdlog.database import Database
from cmdlog.engine import Accepted, prepare_submission
from cmdlog.model import APPLIED
from cmdlog.store import Txn


@dataclass(frozen=True, slots=True)
class Scale:
    stored: int
    """Commands in the filled store, the 1,000 `ledger.open` included."""
    appended: int
    """Commands each measured append writes."""
    rounds: int


FULL = Scale(stored=10_000_000, appended=200_000, rounds=3)
QUICK = Scale(stored=300_000, appended=30_000, rounds=1)
TARGET_RATIO = 0.8
"""Lowest accepted rate with the store filled, as a share of the empty-store rate."""

FILL_SEED = 7_000_000
SEED = 20_250_101
"""Seed of the first round's empty store. Every run gets its own seed, so no
key repeats one stored earlier and every measured command is a new one."""

PROGRESS_STEPS = 10
SPACE_CHECK_COMMANDS = 100_000
"""Commands filled before the bytes per command are estimated from the store."""
SPACE_MARGIN = 1.5
"""Factor on the estimated bytes, because the estimate comes from the first
commands and the share of each tree changes as the store grows. For the
10,000,000-command store, the estimate was 741 bytes per command and the
final file 473."""
FILL_RATE_FLOOR = 2_000
APPEND_RATE_FLOOR = 1_000
"""Slowest accepted rates in commands/s. A fill or an append that falls below
its floor is cut off with an error, after at least `TIMEOUT_MIN_S`."""
TIMEOUT_MIN_S = 120.0
LOOKUPS = 100_000
"""ID index lookups per store and run, half of stored keys and half of new ones."""
LOOKUP_SECONDS_MAX = 30.0
FINCORE_TIMEOUT_S = 30.0
FILLED = "filled"
EMPTY = "empty"
STORES = (EMPTY, FILLED)
CHARGES = round(BATCH_COMMANDS * (1 - DEPOSIT_SHARE))
"""Charges per batch on average, each with a `state_gens.ledger` put under a
random key."""


class DiskSpaceError(RuntimeError):
    """Error raised when the free disk is too small for the filled store."""


def device_write_requests(device: str | None) -> int:
    """Return the write requests `device` completed since boot, or 0 when unknown.

    Read from /proc/diskstats, so requests of other processes count too.
    Adjacent dirty pages merged into one request count once.
    """
    if device is None:
        return 0
    with open("/proc/diskstats", encoding="ascii") as handle:
        for line in handle:
            fields = line.split()
            if fields[2] == device:
                return int(fields[7])
    return 0


def _deadline(commands: int, rate_floor: int) -> float:
    return time.perf_counter() + max(TIMEOUT_MIN_S, commands / rate_floor)


def _file_facts(data_dir: Path) -> dict[str, int]:
    """Return the size and the allocated bytes of a store's data file."""
    facts = (data_dir / "data.mdb").stat()
    return {"file_bytes": facts.st_size, "allocated_bytes": facts.st_blocks * 512}


def page_cache_share(data_dir: Path) -> float | None:
    """Return the share of the data file in the page cache, from util-linux fincore.

    Returns None when fincore is missing or fails.
    """
    fincore = shutil.which("fincore")
    if fincore is None:
        return None
    path = data_dir / "data.mdb"
    argv = [fincore, "--bytes", "--noheadings", "--raw", "--output", "RES,SIZE"]
    try:
        done = subprocess.run(
            [*argv, str(path)],
            capture_output=True,
            text=True,
            timeout=FINCORE_TIMEOUT_S,
            check=True,
        )
        resident, size = (int(field) for field in done.stdout.split())
    except (OSError, ValueError, subprocess.SubprocessError):
        return None
    return resident / size if size else None


# Filling


def _check_disk_space(database: Database, stored: int, scale: Scale) -> None:
    """Raise DiskSpaceError unless the rest of the run fits on the disk.

    The bytes per command come from the store so far, which the fill has
    written to `stored` commands.
    """
    bytes_per_command = database.store.used_bytes() / stored
    # The filled store gets every round's append and one no-sync append more.
    total = scale.stored + (scale.rounds + 1) * scale.appended
    needed = (total - stored) * bytes_per_command * SPACE_MARGIN
    free = shutil.disk_usage(database.store.path).free
    progress(
        f"fill: {bytes_per_command:,.0f} bytes per command so far, so about "
        f"{needed / 1e9:,.1f} GB more needed, {free / 1e9:,.1f} GB free"
    )
    if needed > free:
        raise DiskSpaceError(
            f"not enough disk under {database.store.path}: a store of "
            f"{total:,} commands needs about {needed / 1e9:,.1f} GB more "
            f"({bytes_per_command:,.0f} bytes per command so far, times "
            f"{SPACE_MARGIN}), and {free / 1e9:,.1f} GB are free; free space, "
            "set TMPDIR to a larger disk, or pass a smaller --commands"
        )


def fill(data_dir: Path, scale: Scale, *, seed: int) -> dict[str, Any]:
    """Write `scale.stored` commands with `durable=False`, sync once, and report.

    Raises DiskSpaceError after the first `SPACE_CHECK_COMMANDS` commands when
    the full store would not fit, and RuntimeError when the fill falls below
    `FILL_RATE_FLOOR`.
    """
    app = ledger_app()
    rng = random.Random(seed)
    total = scale.stored
    step = max(BATCH_COMMANDS, math.ceil(total / PROGRESS_STEPS))
    next_report = step
    deadline = _deadline(total, FILL_RATE_FLOOR)
    started = time.perf_counter()
    database = Database(data_dir, app, store_config=StoreConfig(durable=False))
    try:
        database.submit(account_opens(app))
        stored = ACCOUNTS
        checked = False
        while stored < total:
            size = min(BATCH_COMMANDS, total - stored)
            batch = generate_batch(rng, size)
            database.submit([prepare_submission(app, *command) for command in batch])
            stored += size
            now = time.perf_counter()
            if not checked and stored >= min(total, SPACE_CHECK_COMMANDS):
                _check_disk_space(database, stored, scale)
                checked = True
            if stored >= next_report or stored == total:
                elapsed = now - started
                progress(
                    f"fill: {stored:,}/{total:,} commands in {elapsed:,.0f} s, "
                    f"{stored / elapsed:,.0f}/s so far"
                )
                next_report += step
            if now > deadline:
                raise RuntimeError(
                    f"the fill timed out with {stored:,} of {total:,} commands "
                    f"stored, below {FILL_RATE_FLOOR:,} commands/s"
                )
        fill_s = time.perf_counter() - started
        count = database.status().commands
        sync_started = time.perf_counter()
        database.store.sync()
        sync_s = time.perf_counter() - sync_started
        used_bytes = database.store.used_bytes()
    finally:
        database.close()
    if count != total:
        raise RuntimeError(f"the fill stored {count:,} commands, expected {total:,}")
    return {
        "commands": total,
        "seconds": fill_s,
        "rate": total / fill_s,
        "sync_s": sync_s,
        "used_bytes": used_bytes,
        **_file_facts(data_dir),
        "trees": tree_stats(data_dir),
    }


# Measuring


def _stored_keys(seed: int, count: int) -> list[str]:
    """Return the first `count` keys that `generate_batch` makes from `seed`.

    A fill or an append with that seed stored exactly these keys first.
    """
    rng = random.Random(seed)
    keys: list[str] = []
    while len(keys) < count:
        size = min(BATCH_COMMANDS, count - len(keys))
        keys += [key for key, _type, _payload in generate_batch(rng, size)]
    return keys


def measure_lookups(
    database: Database, stored_keys: list[str], *, seed: int
) -> dict[str, float]:
    """Time `Txn.id_get`, the dedupe lookup, for stored keys and for new ones.

    Returns microseconds per lookup. The lookups run in one read
    transaction, in random order, so each one lands on a random leaf.
    """
    rng = random.Random(seed)
    new_keys = [
        str(uuid.UUID(int=rng.getrandbits(128), version=4))
        for _ in range(len(stored_keys))
    ]
    found = {}
    deadline = time.perf_counter() + LOOKUP_SECONDS_MAX
    with database.store.read() as txn:
        for name, keys, expected_found in (
            ("stored_us", stored_keys, True),
            ("new_us", new_keys, False),
        ):
            started = time.perf_counter()
            for key in keys:
                entry = txn.id_get(key)
                if (entry is not None) != expected_found:
                    raise RuntimeError(
                        f"ID lookup of {key!r} returned {entry!r}, expected "
                        f"{'an entry' if expected_found else 'none'}"
                    )
            found[name] = (time.perf_counter() - started) / len(keys) * 1e6
            if time.perf_counter() > deadline:
                raise RuntimeError(
                    f"{len(keys):,} ID lookups took over {LOOKUP_SECONDS_MAX} s"
                )
    return found


@dataclass(slots=True)
class AppendRun:
    store: str
    durable: bool
    stored_before: int
    commands: int = 0
    commits: int = 0
    submit_s: float = 0.0
    engine_s: float = 0.0
    """Time inside write transactions. The rest of `submit_s` is commit and sync."""
    trimming_commands: int = 0
    """Commands appended while every commit also trimmed old undo records."""
    trimming_s: float = 0.0
    undo_trim_s: float = 0.0
    """Time inside `Txn.undo_trim`, part of `engine_s`."""
    rejected: int = 0
    pages_dirtied: list[int] | None = None
    """Pages each of the last `TAIL_COMMITS` commits copied or added."""
    device_mb_per_commit: float = 0.0
    file_end_pages_per_commit: float = 0.0
    """Pages per commit taken from the end of the file (last_pgno growth) rather
    than from LMDB's free list."""
    device_write_requests: int = 0
    """Write requests the device completed during the timed commits."""
    lookups: dict[str, float] | None = None
    trees: list[dict[str, Any]] | None = None
    page_cache_share: float | None = None
    """Share of the data file in the page cache before the run, from fincore."""
    open_s: float = 0.0
    """Time to open the store, key filters built from every stored key."""
    filter_bytes: int = 0
    """Memory of the key filters after the run."""
    runs: int = 0
    """Runs of the ID index and state a read may look in, after the run."""


def measure_append(
    data_dir: Path,
    store: str,
    *,
    commands: int,
    seed: int,
    durable: bool,
    mdb_stat: str | None,
    lookup_keys: list[str] | None = None,
) -> dict[str, Any]:
    """Append `commands` commands, 1,000 per commit, and time `Database.submit`.

    On a new store, the 1,000 `ledger.open` go first. On a filled one they
    are retries, which the engine deduplicates. Either way their commit is
    not timed. With `lookup_keys`, the run also times ID lookups of those
    (stored) keys and of as many new ones after the append.
    """
    app = ledger_app()
    config = StoreConfig(durable=durable)
    run = AppendRun(store, durable, stored_before=0)
    run.page_cache_share = (
        page_cache_share(data_dir) if (data_dir / "data.mdb").exists() else None
    )
    started = time.perf_counter()
    database = Database(data_dir, app, store_config=config)
    run.open_s = time.perf_counter() - started
    try:
        database.submit(account_opens(app))
        run.stored_before = database.status().commands
        env = database.store.env
        meter = PageMeter(
            data_dir,
            env,
            [env.open_db(name.encode(), create=False) for name in DATABASES],
            commits_total=-(-commands // BATCH_COMMANDS),
            mdb_stat=mdb_stat,
        )
        with _timing_undo_trim(run):
            _append_batches(database, app, run, meter, commands=commands, seed=seed)
        run.pages_dirtied = meter.result.tail_dirtied or None
        run.device_mb_per_commit = meter.result.device_mb_per_commit
        run.file_end_pages_per_commit = meter.result.last_pgno_growth_per_commit
        if lookup_keys:
            run.lookups = measure_lookups(database, lookup_keys, seed=seed + 1)
        run.filter_bytes = database.store.filter_bytes()
        run.runs = len(database.store.runs_read())
    finally:
        database.close()
    run.trees = tree_stats(data_dir)
    return asdict(run)


@contextmanager
def _timing_undo_trim(run: AppendRun) -> Iterator[None]:
    """Add the time of every `Txn.undo_trim` call to `run.undo_trim_s`.

    The engine trims old undo records inside its transaction once the store
    contains more commands than the undo horizon, which only the filled store
    does in a quick run. Timing the trim separates its cost from the cost of
    a larger store. The method is restored on exit.
    """
    original = Txn.undo_trim

    def timed(txn: Txn, keep: int) -> int:
        started = time.perf_counter()
        try:
            return original(txn, keep)
        finally:
            run.undo_trim_s += time.perf_counter() - started

    Txn.undo_trim = timed  # type: ignore[method-assign, assignment]
    try:
        yield
    finally:
        Txn.undo_trim = original  # type: ignore[method-assign]


def _append_batches(
    database: Database,
    app: App,
    run: AppendRun,
    meter: PageMeter,
    *,
    commands: int,
    seed: int,
) -> None:
    """Submit the batches of one run and add up their times in `run`."""
    timed = TimedEngine(database.engine)
    database.engine = timed  # type: ignore[assignment]
    horizon = database.store.config.undo_horizon_commands
    rng = random.Random(seed)
    deadline = _deadline(commands, APPEND_RATE_FLOOR)
    for start in range(0, commands, BATCH_COMMANDS):
        batch = generate_batch(rng, min(BATCH_COMMANDS, commands - start))
        submissions = [prepare_submission(app, *command) for command in batch]

        meter.before()
        requests_before = device_write_requests(meter.device)
        started = time.perf_counter()
        answers = database.submit(submissions)
        seconds = time.perf_counter() - started
        run.device_write_requests += (
            device_write_requests(meter.device) - requests_before
        )
        meter.after()

        run.commands += len(batch)
        run.commits += 1
        run.submit_s += seconds
        # Once the store contains more commands than the undo horizon, every
        # commit also deletes one old undo record per command it folds.
        if run.stored_before + start + len(batch) > horizon:
            run.trimming_commands += len(batch)
            run.trimming_s += seconds
        accepted = [answer for answer in answers if isinstance(answer, Accepted)]
        run.rejected += sum(1 for one in accepted if one.outcome.status != APPLIED)
        created = sum(1 for one in accepted if one.created)
        if created != len(batch):
            raise RuntimeError(
                f"{len(batch) - created} of {len(batch)} new keys in a batch were "
                "not stored as new commands, expected all of them"
            )
        if time.perf_counter() > deadline:
            raise RuntimeError(
                f"the append to the {run.store} store timed out after "
                f"{run.commands:,} of {commands:,} commands, below "
                f"{APPEND_RATE_FLOOR:,} commands/s"
            )
    run.engine_s = timed.seconds


def _lookup_sample(seed: int, stored: int) -> list[str]:
    """Return up to `LOOKUPS // 2` of the `stored` keys that `seed` generated."""
    return _stored_keys(seed, min(LOOKUPS // 2, stored))


def _append_in_round(
    root: Path,
    filled_dir: Path,
    scale: Scale,
    index: int,
    store: str,
    *,
    mdb_stat: str | None,
) -> dict[str, Any]:
    """Append one round's commands to a new empty store or to the filled one."""
    seed = SEED + 10 * index
    if store == EMPTY:
        data_dir = root / f"empty-{index}"
        lookup_keys = _lookup_sample(seed, scale.appended)
    else:
        data_dir = filled_dir
        lookup_keys = _lookup_sample(FILL_SEED, scale.stored - ACCOUNTS)
        seed += 5
    found = measure_append(
        data_dir,
        store,
        commands=scale.appended,
        seed=seed,
        durable=True,
        mdb_stat=mdb_stat,
        lookup_keys=lookup_keys,
    )
    if store == EMPTY:
        shutil.rmtree(data_dir)
    return found


def run_round(
    root: Path, filled_dir: Path, scale: Scale, index: int, *, mdb_stat: str | None
) -> dict[str, Any]:
    """Append to a new empty store and to the filled store, in alternating order."""
    label = f"scale round {index + 1}/{scale.rounds}"
    order = [EMPTY, FILLED] if index % 2 == 0 else [FILLED, EMPTY]
    fsync_per_s = measure_fsync(root)

    busy_before = machine_busy_seconds()
    own_before = time.process_time()
    started = time.perf_counter()
    runs: dict[str, dict[str, Any]] = {}
    for store in order:
        progress(f"{label}: append {scale.appended:,} commands to the {store} store")
        runs[store] = _append_in_round(
            root, filled_dir, scale, index, store, mdb_stat=mdb_stat
        )
        progress(f"{label}: {store} store {_rate(runs[store]):,.0f} commands/s")
    other_s = machine_busy_seconds() - busy_before - (time.process_time() - own_before)

    ratio = _rate(runs[FILLED]) / _rate(runs[EMPTY])
    progress(f"{label}: filled / empty = {ratio:.2f}")
    return {
        "order": order,
        EMPTY: runs[EMPTY],
        FILLED: runs[FILLED],
        "ratio": ratio,
        "fsync_per_s": fsync_per_s,
        "other_cores": max(other_s, 0.0) / (time.perf_counter() - started),
    }


def measure_no_sync(
    root: Path, filled_dir: Path, scale: Scale, *, mdb_stat: str | None
) -> dict[str, Any]:
    """Append once more to each store with `durable=False`, so nothing is synced."""
    found = {}
    for offset, (store, data_dir) in enumerate(
        ((EMPTY, root / "empty-no-sync"), (FILLED, filled_dir))
    ):
        progress(f"no-sync: append {scale.appended:,} commands to the {store} store")
        found[store] = measure_append(
            data_dir,
            store,
            commands=scale.appended,
            seed=SEED + 1_000 + offset,
            durable=False,
            mdb_stat=mdb_stat,
        )
        progress(f"no-sync: {store} store {_rate(found[store]):,.0f} commands/s")
    shutil.rmtree(root / "empty-no-sync")
    return found


def measure_raw_ceiling(root: Path, scale: Scale) -> dict[str, Any]:
    """Time the same puts with py-lmdb alone, on an empty and a filled environment.

    The puts are those cmdlog makes per command (see `bench.lmdb_ceiling`),
    with no fold, digests or engine around them, so the runs show the time
    per command that the stored commands add in LMDB and the disk alone.
    One run of each, because the raw fill takes minutes.
    """
    progress(f"raw LMDB: append {scale.appended:,} commands to an empty environment")
    empty = measure_raw(root / "raw-empty", commands=scale.appended, seed=SEED + 2_000)
    shutil.rmtree(root / "raw-empty")
    progress(
        f"raw LMDB: fill {scale.stored:,} commands unsynced, then append "
        f"{scale.appended:,}"
    )
    fill_s, filled = measure_raw_filled(
        root / "raw-filled",
        stored=scale.stored,
        commands=scale.appended,
        seed=SEED + 3_000,
    )
    file_bytes = (root / "raw-filled" / "data.mdb").stat().st_size
    shutil.rmtree(root / "raw-filled")
    progress(f"raw LMDB: empty {empty.rate:,.0f}, filled {filled.rate:,.0f} commands/s")
    return {
        "empty_rate": empty.rate,
        "filled_rate": filled.rate,
        "ratio": filled.rate / empty.rate,
        "fill_s": fill_s,
        "file_bytes": file_bytes,
    }


def run(*, quick: bool, stored: int | None = None) -> dict[str, Any]:
    """Fill a store, then measure the append rate on it and on empty stores.

    `stored` replaces the fill size of the chosen mode. Every directory is
    made under the temp directory and removed at the end, also on errors.
    """
    quiet_logging()
    scale = QUICK if quick else FULL
    if stored is not None:
        scale = Scale(stored=stored, appended=scale.appended, rounds=scale.rounds)
    if scale.stored < ACCOUNTS + BATCH_COMMANDS:
        raise ValueError(
            f"the filled store needs at least {ACCOUNTS + BATCH_COMMANDS:,} "
            f"commands, got {scale.stored:,}"
        )
    mdb_stat = ensure_mdb_stat()
    if mdb_stat is None:
        progress("mdb_stat is missing and cannot be installed; pages are not counted")
    started = time.perf_counter()
    with temp_dir("cmdlog-bench-scale-") as root:
        filled_dir = root / FILLED
        progress(f"fill: {scale.stored:,} commands with durable=False")
        filled = fill(filled_dir, scale, seed=FILL_SEED)
        progress(
            f"fill: {filled['seconds']:,.1f} s, {filled['rate']:,.0f} commands/s, "
            f"then {filled['sync_s']:,.1f} s to sync, "
            f"{filled['file_bytes'] / 1e9:,.2f} GB data file"
        )
        rounds = [
            run_round(root, filled_dir, scale, index, mdb_stat=mdb_stat)
            for index in range(scale.rounds)
        ]
        no_sync = measure_no_sync(root, filled_dir, scale, mdb_stat=mdb_stat)
        shutil.rmtree(filled_dir)
        raw = measure_raw_ceiling(root, scale)
        progress("fdatasync loop")
        fsync_per_s = measure_fsync(root)
    ratios = [found["ratio"] for found in rounds]
    return {
        "scale": asdict(scale),
        "target_ratio": TARGET_RATIO,
        "writemap": store_flags()["writemap"],
        "tail_commits": TAIL_COMMITS,
        "fill": filled,
        "rounds": rounds,
        "no_sync": no_sync,
        "raw": raw,
        "fsync_per_s": fsync_per_s,
        "ratio_median": median(ratios),
        "met": median(ratios) >= TARGET_RATIO,
        "minutes": (time.perf_counter() - started) / 60,
    }


def target_rows(results: dict[str, Any]) -> list[list[str]]:
    """Return the `[target, measured median, verdict]` row for the suite."""
    stored = results["scale"]["stored"]
    return [
        [
            f"append with {stored:,} stored / empty store ≥ "
            f"{results['target_ratio']:.2f} (within 20%)",
            f"{results['ratio_median']:.2f}",
            "met" if results["met"] else "not met",
        ]
    ]


# Reporting

Getter = Callable[[dict[str, Any]], float | None]


def _runs(results: dict[str, Any], store: str) -> list[dict[str, Any]]:
    return [found[store] for found in results["rounds"]]


def _tree(run: dict[str, Any], name: str) -> dict[str, Any]:
    return next(row for row in run["trees"] if row["db"] == name)


def _tree_field(name: str, field: str) -> Getter:
    return lambda run: float(_tree(run, name)[field])


def _expected_pages(name: str, random_puts: int) -> Getter:
    """Return a getter of the leaf and lowest branch pages `random_puts` keys
    touch in the newest generation, where every put lands.

    It counts every branch page as if it sat just above the leaves, as
    nearly all of them do, gives the newest generation its share of the
    tree's pages by entries, and leaves out the few pages above those.
    """

    def expected(run: dict[str, Any]) -> float:
        tree = _tree(run, name)
        leaves = newest_generation_leaves(tree)
        branches = tree["branch_pages"] * leaves / max(tree["leaf_pages"], 1)
        return distinct_leaves_expected(leaves, random_puts) + distinct_leaves_expected(
            branches, random_puts
        )

    return expected


def _runs_read(run: dict[str, Any]) -> float | None:
    found = run.get("runs")
    return None if found is None else float(found)


def _lookup_us(kind: str) -> Getter:
    return lambda run: float(run["lookups"][kind])


def _rate(run: dict[str, Any]) -> float:
    return float(run["commands"] / run["submit_s"])


def _engine_us(run: dict[str, Any]) -> float:
    return float(run["engine_s"] / run["commands"] * 1e6)


def _undo_trim_us(run: dict[str, Any]) -> float:
    return float(run["undo_trim_s"] / run["commands"] * 1e6)


def _engine_without_trim_us(run: dict[str, Any]) -> float:
    return float((run["engine_s"] - run["undo_trim_s"]) / run["commands"] * 1e6)


def _commit_ms(run: dict[str, Any]) -> float:
    return float((run["submit_s"] - run["engine_s"]) / run["commits"] * 1e3)


def _pages(run: dict[str, Any]) -> float | None:
    dirtied = run["pages_dirtied"]
    return median(dirtied) if dirtied else None


def _trimming_rate(run: dict[str, Any]) -> float | None:
    if not run["trimming_commands"]:
        return None
    return float(run["trimming_commands"] / run["trimming_s"])


def _kib_per_request(run: dict[str, Any]) -> float | None:
    if not run["device_write_requests"]:
        return None
    total_bytes = run["device_mb_per_commit"] * 1e6 * run["commits"]
    return float(total_bytes / run["device_write_requests"] / 1024)


def _trimming_ratio(found: dict[str, Any]) -> str:
    """Format (b) / (a) over the commits of each run that also trimmed undo."""
    empty, filled = _trimming_rate(found[EMPTY]), _trimming_rate(found[FILLED])
    if empty is None or filled is None:
        return "n/a"
    return f"{filled / empty:.2f}"


def _cell(runs: list[dict[str, Any]], get: Getter, fmt: str = "{:,.0f}") -> str:
    """Format the median (min–max) of `get` over `runs`, skipping None values."""
    values = [value for value in map(get, runs) if value is not None]
    return spread(values, fmt)


def _row(
    results: dict[str, Any], label: str, get: Getter, fmt: str = "{:,.0f}"
) -> list[str]:
    """Return `[label, cell of the empty runs, cell of the filled runs]`."""
    return [label, *(_cell(_runs(results, store), get, fmt) for store in STORES)]


def render_summary(results: dict[str, Any]) -> str:
    """Tabulate the rates per store, the ratio per round and the verdict."""
    rows = [
        _row(results, "commands stored before", lambda run: run["stored_before"]),
        _row(results, "**commands/s**", _rate),
        _row(results, "µs per command inside the transaction", _engine_us, "{:.1f}"),
        _row(results, "commit and sync, ms per commit", _commit_ms, "{:.1f}"),
        _row(results, "pages dirtied per commit", _pages),
        _row(
            results,
            "`id_gens` depth after the run",
            _tree_field("id_gens", "depth"),
        ),
        _row(results, "µs per ID lookup of a new key", _lookup_us("new_us"), "{:.2f}"),
        _row(
            results,
            "store open, s (key filters built from every stored key)",
            lambda run: run["open_s"],
            "{:.1f}",
        ),
        _row(
            results,
            "key filters after the run, MB",
            lambda run: run["filter_bytes"] / 1e6,
            "{:.1f}",
        ),
        _row(results, "runs a read may look in, after the run", _runs_read),
    ]
    round_rows = [
        [
            index + 1,
            " then ".join(found["order"]),
            f"{_rate(found[EMPTY]):,.0f}",
            f"{_rate(found[FILLED]):,.0f}",
            f"{found['ratio']:.2f}",
            _trimming_ratio(found),
            f"{found['fsync_per_s']:,.0f}",
            f"{found['other_cores']:.2f}",
        ]
        for index, found in enumerate(results["rounds"])
    ]
    round_headers = [
        "round",
        "order",
        "(a) commands/s",
        "(b) commands/s",
        "(b) / (a)",
        "(b) / (a), commits that trimmed undo",
        "fdatasync/s before the round",
        "other processes, cores",
    ]
    verdict = "met" if results["met"] else "not met"
    return "\n".join(
        [
            table(["measure", "(a) empty store", "(b) filled store"], rows),
            "",
            table(round_headers, round_rows),
            "",
            f"(b) / (a), median over {len(results['rounds'])} rounds: "
            f"{results['ratio_median']:.2f}, target ≥ {results['target_ratio']:.2f} "
            f"with {results['scale']['stored']:,} commands stored: **{verdict}**.",
        ]
    )


def render_diagnosis(results: dict[str, Any]) -> str:
    """Tabulate where the two stores differ: trees, pages, sync, lookups."""
    rows = []
    for name, random_puts in (
        ("id_gens", BATCH_COMMANDS),
        ("state_gens.ledger", CHARGES),
    ):
        rows += [
            _row(results, f"`{name}` depth", _tree_field(name, "depth")),
            _row(results, f"`{name}` branch pages", _tree_field(name, "branch_pages")),
            _row(results, f"`{name}` leaf pages", _tree_field(name, "leaf_pages")),
            _row(
                results,
                f"`{name}` pages {random_puts:,} random keys are expected to touch",
                _expected_pages(name, random_puts),
            ),
        ]
    no_sync = results["no_sync"]
    rows += [
        _row(results, "pages dirtied per commit (measured)", _pages),
        _row(
            results,
            "device MB written per commit",
            lambda run: run["device_mb_per_commit"],
            "{:.1f}",
        ),
        _row(
            results,
            "pages per commit from the end of the file, not the free list",
            lambda run: run["file_end_pages_per_commit"],
        ),
        _row(
            results,
            "device write requests per commit",
            lambda run: run["device_write_requests"] / run["commits"],
        ),
        _row(
            results,
            "KiB per device write request",
            _kib_per_request,
            "{:.1f}",
        ),
        _row(results, "µs per command inside the transaction", _engine_us, "{:.1f}"),
        _row(results, "of which in `Txn.undo_trim`", _undo_trim_us, "{:.1f}"),
        _row(
            results,
            "µs per command inside the transaction, undo trim excluded",
            _engine_without_trim_us,
            "{:.1f}",
        ),
        _row(results, "commit and sync, ms per commit", _commit_ms, "{:.1f}"),
        [
            "commit without sync (one `durable=False` run), ms per commit",
            *(f"{_commit_ms(no_sync[store]):.1f}" for store in STORES),
        ],
        [
            "commands/s without sync (one `durable=False` run)",
            *(f"{_rate(no_sync[store]):,.0f}" for store in STORES),
        ],
        _row(
            results, "commands/s of the commits that also trimmed undo", _trimming_rate
        ),
        _row(
            results,
            "µs per ID lookup, stored key",
            _lookup_us("stored_us"),
            "{:.2f}",
        ),
        _row(results, "µs per ID lookup, new key", _lookup_us("new_us"), "{:.2f}"),
        _row(
            results,
            "share of data.mdb in the page cache before the run",
            lambda run: run["page_cache_share"],
            "{:.0%}",
        ),
        _row(
            results,
            "charges rejected (insufficient funds)",
            lambda run: run["rejected"],
        ),
    ]
    return "\n".join(
        [
            table(["measure", "(a) empty store", "(b) filled store"], rows),
            "",
            "4 KiB write + fdatasync loop on the same disk after the rounds: "
            f"{results['fsync_per_s']:,.0f}/s.",
        ]
    )


def render_fill(results: dict[str, Any]) -> str:
    """Tabulate the fill: its rate, the disk it took and its trees."""
    filled = results["fill"]
    commands = filled["commands"]
    rows = [
        ["commands", f"{commands:,}"],
        ["fill time, s (`durable=False`)", f"{filled['seconds']:,.1f}"],
        ["fill rate, commands/s", f"{filled['rate']:,.0f}"],
        ["sync of the whole file after the fill, s", f"{filled['sync_s']:,.1f}"],
        ["data.mdb size, GB", f"{filled['file_bytes'] / 1e9:,.2f}"],
        ["data.mdb allocated on disk, GB", f"{filled['allocated_bytes'] / 1e9:,.2f}"],
        ["pages up to last_pgno, GB", f"{filled['used_bytes'] / 1e9:,.2f}"],
        ["bytes allocated per command", f"{filled['allocated_bytes'] / commands:,.0f}"],
    ]
    tree_rows = [
        [
            row["db"],
            f"{row['entries']:,}",
            row["depth"],
            f"{row['branch_pages']:,}",
            f"{row['leaf_pages']:,}",
            f"{row['overflow_pages']:,}",
        ]
        for row in filled["trees"]
    ]
    tree_headers = ["database", "entries", "depth", "branch", "leaf", "overflow"]
    return "\n".join(
        [
            table(["fill", "value"], rows),
            "",
            "Tree shape of the filled store after the fill:",
            "",
            table(tree_headers, tree_rows),
        ]
    )


def render_raw(results: dict[str, Any]) -> str:
    """Tabulate the raw LMDB runs at both sizes, or nothing for older results."""
    raw = results.get("raw")
    if raw is None:
        return ""
    stored = results["scale"]["stored"]
    target = results["target_ratio"]
    cmdlog_empty = median([_rate(run) for run in _runs(results, EMPTY)])
    cmdlog_filled = median([_rate(run) for run in _runs(results, FILLED)])
    raw_added_us = 1e6 / raw["filled_rate"] - 1e6 / raw["empty_rate"]

    rows = [
        [
            "cmdlog, `Database.submit` (medians of the rounds)",
            f"{cmdlog_empty:,.0f}",
            f"{cmdlog_filled:,.0f}",
            f"{cmdlog_filled / cmdlog_empty:.2f}",
            f"{1e6 / cmdlog_filled - 1e6 / cmdlog_empty:,.1f}",
        ],
        [
            "raw LMDB, the same puts (one run each)",
            f"{raw['empty_rate']:,.0f}",
            f"{raw['filled_rate']:,.0f}",
            f"{raw['ratio']:.2f}",
            f"{raw_added_us:,.1f}",
        ],
    ]
    # With a fixed cost of `added` µs per command from the stored commands,
    # filled / empty = t / (t + added) for an empty-store time of t µs, which
    # reaches the target only when t >= added * target / (1 - target).
    slowest_rate = 1e6 / (raw_added_us * target / (1 - target))

    intro = (
        "The same comparison for LMDB alone: the puts cmdlog makes per command "
        "(see `bench/lmdb_ceiling.py`) written with py-lmdb, 1,000 commands per "
        "synced commit, to an empty environment and to one filled with "
        f"{stored:,} commands the same way (unsynced, then one sync: "
        f"{raw['fill_s']:,.0f} s, {raw['file_bytes'] / 1e9:,.2f} GB). No fold, "
        "digests or engine run, so the time the stored commands add to each "
        "command there comes from LMDB and the disk alone."
    )
    outro = (
        f"If any code on this store layout pays at least the raw "
        f"{raw_added_us:,.1f} µs more per command once {stored:,} commands are "
        f"stored, its filled / empty ratio reaches {target:.2f} only if it "
        f"appends to an empty store at {slowest_rate:,.0f} commands/s or less."
    )
    headers = [
        "commands/s",
        "empty",
        f"{stored:,} stored",
        "stored / empty",
        "µs added per command",
    ]
    return "\n".join([intro, "", table(headers, rows), "", outro, ""])


def _us_per_command(run: dict[str, Any], seconds: float) -> float:
    return float(seconds / run["commands"] * 1e6)


def render_gap(results: dict[str, Any]) -> str:
    """Split the time per command into transaction, commit and sync, per store.

    The sync share is derived, as the durable runs' commit time minus the
    commit time of the one `durable=False` run on the same store.
    """
    rows = []
    parts: dict[str, list[float]] = {}
    for store in STORES:
        runs = _runs(results, store)
        no_sync = results["no_sync"][store]
        inside = median(_us_per_command(r, r["engine_s"]) for r in runs)
        commit = median(_us_per_command(r, r["submit_s"] - r["engine_s"]) for r in runs)
        unsynced = _us_per_command(no_sync, no_sync["submit_s"] - no_sync["engine_s"])
        parts[store] = [inside, unsynced, commit - unsynced]
    gap_total = sum(parts[FILLED]) - sum(parts[EMPTY])
    labels = [
        "inside the write transaction",
        "commit without sync",
        "sync (commit and sync minus the line above)",
    ]
    for index, label in enumerate(labels):
        empty, filled = parts[EMPTY][index], parts[FILLED][index]
        share = (filled - empty) / gap_total if gap_total else 0.0
        rows.append(
            [
                label,
                f"{empty:.1f}",
                f"{filled:.1f}",
                f"{filled - empty:+.1f}",
                f"{share:.0%}",
            ]
        )
    empty_total, filled_total = sum(parts[EMPTY]), sum(parts[FILLED])
    rows.append(
        [
            "all",
            f"{empty_total:.1f}",
            f"{filled_total:.1f}",
            f"{gap_total:+.1f}",
            "100%",
        ]
    )
    headers = [
        "µs per command (medians)",
        "(a) empty store",
        "(b) filled store",
        "(b) − (a)",
        "share of the difference",
    ]
    return table(headers, rows)


def render(results: dict[str, Any]) -> str:
    """Render the scale results as Markdown: what was measured, then tables."""
    scale = results["scale"]
    intro = (
        f"Append rate with {scale['stored']:,} commands stored against an empty "
        f"store. Each of {scale['rounds']} rounds appended {scale['appended']:,} "
        f"commands ({BATCH_COMMANDS:,} per commit, deposits and charges under new "
        "random UUID4 keys) with the default durable `StoreConfig`, (a) to a new "
        f"store holding only the {ACCOUNTS:,} opened accounts and (b) to the "
        "filled store, in alternating order. Only the `Database.submit` calls "
        "are timed, not `prepare_submission`. The fill wrote the filled store "
        "through the same `Database.submit` path with "
        "`StoreConfig(durable=False)` and synced it once at the end, and each "
        "round's append to it stays in it. LMDB runs with "
        f"`writemap={results['writemap']}`. Cells are median (min–max) over the "
        "rounds. Pages dirtied are the median over the last "
        f"{results['tail_commits']} commits of each run (see `bench/pages.py`). "
        f"The whole run took {results['minutes']:,.1f} minutes."
    )
    return "\n".join(
        [
            intro,
            "",
            render_summary(results),
            "",
            render_raw(results),
            "Where the time per command goes:",
            "",
            render_gap(results),
            "",
            "Where the two stores differ (trees as of the end of each run):",
            "",
            render_diagnosis(results),
            "",
            render_fill(results),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help=(
            f"fill {QUICK.stored:,} commands and append {QUICK.appended:,} per "
            f"run, {QUICK.rounds} rounds (default: {FULL.stored:,}, "
            f"{FULL.appended:,}, {FULL.rounds})"
        ),
    )
    parser.add_argument(
        "--commands",
        type=int,
        help="commands in the filled store, replacing the mode's fill size",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.commands is not None and args.commands < ACCOUNTS + BATCH_COMMANDS:
        parser.error(f"--commands must be at least {ACCOUNTS + BATCH_COMMANDS:,}")
    try:
        results = run(quick=args.quick, stored=args.commands)
    except DiskSpaceError as exc:
        parser.exit(1, f"error: {exc}\n")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print(render(results))


if __name__ == "__main__":
    main()
