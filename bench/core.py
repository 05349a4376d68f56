"""In-process benchmark: durable append, replay, and the raw LMDB ceiling.

Each round measures, side by side on fresh temporary directories:

- (a) append: `Database.submit` of ledger deposits and charges in batches
  of 1,000 under random UUID4 keys, on a durable store with the default
  `StoreConfig`, timed with and without `prepare_submission`;
- (b) replay: `cmdlog.replay.replay` of the directory the append wrote;
- (c) raw: the same puts per command written with py-lmdb directly (see
  `bench.lmdb_ceiling`), committing every 1,000 commands as cmdlog does and
  every 1,000 puts, plus one run per named database to count its pages;
- the disk: a 4 KiB write + `fdatasync` loop.

Run `python -m bench.core [--quick] [--profile]` from the repository root.
"""

from __future__ import annotations

import argparse
import cProfile
import logging
import pstats
import random
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import structlog

from bench import profiles
from bench.cpu_time import machine_busy_seconds
from bench.lmdb_ceiling import (
    ABLATIONS,
    DATABASES,
    RawResult,
    measure_fsync,
    measure_raw,
    store_flags,
    tree_stats,
)
from bench.pages import CommitPages, PageMeter, ensure_mdb_stat
from bench.report import progress
from bench.workload import (
    ACCOUNTS,
    BATCH_COMMANDS,
    account_opens,
    generate_batch,
    ledger_app,
)
from cmdlog.database import Database
from cmdlog.engine import Engine, prepare_submission
from cmdlog.model import APPLIED
from cmdlog.replay import replay


@dataclass(frozen=True, slots=True)
class Scale:
    commands: int
    rounds: int


# 200,000 commands pass the default undo horizon (100,000), so the second
# half of a full run also pays for the undo trim that every commit then does.
FULL = Scale(commands=200_000, rounds=3)
QUICK = Scale(commands=20_000, rounds=3)
SEED = 20_240_601


def quiet_logging() -> None:
    """Drop cmdlog's info events, which would otherwise print per batch."""
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING)
    )


@contextmanager
def temp_dir(prefix: str) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# (a) durable append through Database.submit


class TimedEngine:
    """An engine wrapper that adds up the time spent inside write transactions."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self.seconds = 0.0

    def submit(self, txn: Any, submissions: Any) -> Any:
        started = time.perf_counter()
        try:
            return self._engine.submit(txn, submissions)
        finally:
            self.seconds += time.perf_counter() - started

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


@dataclass(slots=True)
class AppendResult:
    commands: int = 0
    commits: int = 0
    prepare_s: float = 0.0
    submit_s: float = 0.0
    engine_s: float = 0.0
    """Time inside write transactions. The rest of `submit_s` is commit and sync."""
    before_trim_commands: int = 0
    before_trim_s: float = 0.0
    after_trim_commands: int = 0
    after_trim_s: float = 0.0
    pages: CommitPages = field(default_factory=CommitPages)
    rejected: int = 0

    @property
    def rate_excluding_prepare(self) -> float:
        return self.commands / self.submit_s

    @property
    def rate_including_prepare(self) -> float:
        return self.commands / (self.submit_s + self.prepare_s)


def measure_append(
    data_dir: Path,
    *,
    commands: int,
    seed: int,
    profiler: cProfile.Profile | None = None,
    mdb_stat: str | None = None,
) -> AppendResult:
    """Submit `commands` deposits and charges durably, 1,000 per commit.

    Pages are counted outside the timed calls, with `mdb_stat` when given.
    """
    app = ledger_app()
    database = Database(data_dir, app)
    result = AppendResult()
    try:
        database.submit(account_opens(app))
        env = database.store.env
        meter = PageMeter(
            data_dir,
            env,
            [env.open_db(name.encode(), create=False) for name in DATABASES],
            commits_total=-(-commands // BATCH_COMMANDS),
            mdb_stat=mdb_stat,
        )
        timed = TimedEngine(database.engine)
        database.engine = timed  # type: ignore[assignment]
        horizon = database.store.config.undo_horizon_commands
        rng = random.Random(seed)

        for start in range(0, commands, BATCH_COMMANDS):
            batch = generate_batch(rng, min(BATCH_COMMANDS, commands - start))
            started = time.perf_counter()
            submissions = [prepare_submission(app, *command) for command in batch]
            prepared = time.perf_counter()

            meter.before()
            if profiler is not None:
                profiler.enable()
            answers = database.submit(submissions)
            if profiler is not None:
                profiler.disable()
            submitted = time.perf_counter()
            meter.after()

            result.commands += len(batch)
            result.commits += 1
            result.prepare_s += prepared - started
            result.submit_s += submitted - prepared
            # Once the opened accounts and the commands so far fill the undo
            # horizon, every commit deletes one old undo record per command.
            if ACCOUNTS + start + len(batch) <= horizon:
                result.before_trim_commands += len(batch)
                result.before_trim_s += submitted - prepared
            else:
                result.after_trim_commands += len(batch)
                result.after_trim_s += submitted - prepared
            result.rejected += sum(
                1 for answer in answers if answer.outcome.status != APPLIED
            )
        result.engine_s = timed.seconds
        result.pages = meter.result
    finally:
        database.close()
    return result


# (b) replay


@dataclass(slots=True)
class ReplayResult:
    log_entries: int
    seconds: float
    matches: bool
    passes: int = 2
    """1 when replay folded the log as it read it (a log in canonical order)."""

    @property
    def rate(self) -> float:
        return self.log_entries / self.seconds


def measure_replay(data_dir: Path) -> ReplayResult:
    started = time.perf_counter()
    report = replay(data_dir, ledger_app())
    seconds = time.perf_counter() - started
    return ReplayResult(report.log_entries, seconds, report.matches, report.passes)


# rounds


@dataclass(slots=True)
class Round:
    append: AppendResult
    replay: ReplayResult
    raw: dict[str, RawResult]
    """The raw variants by name, `RAW_BATCH` first, then the page-count runs."""
    fsync_per_s: float
    trees: list[dict[str, Any]]
    other_cores: float
    """CPU that other processes used during the round, in cores (other users)."""


RAW_BATCH = "raw, commit per 1,000 commands"
RAW_PUTS = "raw, commit per 1,000 puts"
RAW_OTHER_WRITEMAP = "raw, commit per 1,000 commands, the other writemap setting"


def _raw_variants() -> dict[str, dict[str, Any]]:
    """Return the keyword arguments of `measure_raw` for each raw run."""
    writemap = store_flags()["writemap"]
    variants: dict[str, dict[str, Any]] = {
        RAW_BATCH: {},
        RAW_PUTS: {"puts_per_commit": 1_000},
        RAW_OTHER_WRITEMAP: {"writemap": not writemap},
    }
    for name, databases in ABLATIONS.items():
        variants[f"raw, {name}"] = {"databases": databases}
    return variants


def run_round(scale: Scale, index: int, *, seed: int, mdb_stat: str | None) -> Round:
    """Measure append, replay, the raw ceiling and the disk on fresh directories."""
    label = f"core round {index + 1}/{scale.rounds}"
    started = time.perf_counter()
    busy_before = machine_busy_seconds()
    own_before = time.process_time()
    with temp_dir("cmdlog-bench-core-") as root:
        progress(f"{label}: append {scale.commands:,} commands via Database.submit")
        append = measure_append(
            root / "node", commands=scale.commands, seed=seed, mdb_stat=mdb_stat
        )
        progress(
            f"{label}: append {append.rate_excluding_prepare:,.0f}/s, "
            f"{append.rate_including_prepare:,.0f}/s with prepare_submission"
        )
        trees = tree_stats(root / "node")
        progress(f"{label}: replay the log")
        replayed = measure_replay(root / "node")
        progress(
            f"{label}: replay {replayed.rate:,.0f}/s, digests match {replayed.matches}"
        )
        shutil.rmtree(root / "node")

        raw = {}
        for name, options in _raw_variants().items():
            progress(f"{label}: {name}")
            directory = root / f"raw-{len(raw)}"
            raw[name] = measure_raw(
                directory,
                commands=scale.commands,
                seed=seed,
                mdb_stat=mdb_stat,
                **options,
            )
            shutil.rmtree(directory)
        progress(f"{label}: fdatasync loop")
        fsync_per_s = measure_fsync(root)
    other_s = machine_busy_seconds() - busy_before - (time.process_time() - own_before)
    other_cores = max(other_s, 0.0) / (time.perf_counter() - started)
    return Round(append, replayed, raw, fsync_per_s, trees, other_cores)


@dataclass(frozen=True, slots=True)
class Profile:
    groups: list[tuple[str, float, float]]
    top: str


def profile_runs(scale: Scale, *, seed: int) -> dict[str, Profile]:
    """Profile one append (the submit calls only) and one replay with cProfile."""
    found = {}
    with temp_dir("cmdlog-bench-profile-") as root:
        progress("core profile: append under cProfile")
        profiler = cProfile.Profile()
        measure_append(
            root / "node", commands=scale.commands, seed=seed, profiler=profiler
        )
        stats = pstats.Stats(profiler)
        found["append"] = Profile(
            profiles.group_shares(stats, profiles.APPEND_GROUPS),
            profiles.top_functions(stats),
        )

        progress("core profile: replay under cProfile")
        profiler = cProfile.Profile()
        profiler.runcall(replay, root / "node", ledger_app())
        stats = pstats.Stats(profiler)
        found["replay"] = Profile(
            profiles.group_shares(stats, profiles.REPLAY_GROUPS),
            profiles.top_functions(stats),
        )
    return found


def run(*, quick: bool, profile: bool) -> dict[str, Any]:
    """Run every core round (and the profiles) and return the results."""
    quiet_logging()
    scale = QUICK if quick else FULL
    mdb_stat = ensure_mdb_stat()
    if mdb_stat is None:
        progress("mdb_stat is missing and cannot be installed; pages are not counted")
    rounds = [
        run_round(scale, index, seed=SEED + index, mdb_stat=mdb_stat)
        for index in range(scale.rounds)
    ]
    return {
        "scale": asdict(scale),
        "writemap": store_flags()["writemap"],
        "rounds": rounds,
        "profiles": profile_runs(scale, seed=SEED) if profile else {},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="20,000 commands per round, not 200,000"
    )
    parser.add_argument(
        "--profile", action="store_true", help="also profile one append and one replay"
    )
    args = parser.parse_args()
    from bench import core_report

    print(core_report.render(run(quick=args.quick, profile=args.profile)))


if __name__ == "__main__":
    main()
