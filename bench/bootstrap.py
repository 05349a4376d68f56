"""Bootstrap benchmark: how fast an empty node streams a peer's whole log.

Each size N fills one source data directory in-process (`Database.submit`
of 300 `ledger.open` and then deposits, 1,000 per commit, under unique keys,
with `StoreConfig(durable=False)`), then serves it with `cmdlog serve`. Each
run starts an empty node with `--peer SOURCE_URL` and polls both nodes'
`/status` every 0.1 s until the new node stores as many commands as the
source and both digests match. The run's rate is N divided by the time from
spawning the new node to that moment. A thread samples the new node's
RssAnon in /proc/PID/status every 0.2 s: anonymous memory only, because
VmRSS also counts the LMDB data file's mapped pages.

The source keeps running across the runs of one size. Each new node
announces itself, so the source pulls back from it during the run (every
entry a duplicate) and keeps retrying its URL after the run ends.

Run `python -m bench.bootstrap [--commands N ...] [--runs R] [--py-spy PATH]`
from the repository root. With `--py-spy`, one more run per size is sampled
by py-spy and its summary printed; that run is not in the medians.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.core import quiet_logging, temp_dir
from bench.cpu_time import machine_busy_seconds, tree_cpu_seconds
from bench.processes import Service, running, start_service, stop_service
from bench.profiles import PySpy
from bench.report import median, progress, spread, table
from cmdlog.apps.example import app as example_app
from cmdlog.config import StoreConfig
from cmdlog.database import Database
from cmdlog.engine import Submission, prepare_submission

ACCOUNTS = 300
BATCH_COMMANDS = 1_000
DEPOSIT_AMOUNT = 100
COUNT_INTERVAL_S = 0.1
"""How often the new node is polled. A run ends at the first poll that finds
it caught up, so its time can exceed the bootstrap's by up to this much."""
RSS_INTERVAL_S = 0.2
START_TIMEOUT_S = 60.0
HTTP_TIMEOUT_S = 10.0
BOOTSTRAP_TIMEOUT_MIN_S = 120.0
BOOTSTRAP_RATE_FLOOR = 2_000
"""Slowest accepted rate in commands/s: a run times out after N divided by it."""
LISTENING = re.compile(r"cmdlog listening on (http://\S+)")
FULL_SIZES = (100_000, 1_000_000)
QUICK_SIZES = (20_000, 100_000)
RATE_TARGET = 40_000
MEMORY_TOLERANCE = 0.2
"""Largest accepted change of peak RssAnon between the smallest and largest size."""


@dataclass(slots=True)
class BootstrapRun:
    commands: int
    seconds: float = 0.0
    """From spawning the new node until its count and digests equal the source's."""
    ready_s: float = 0.0
    """From spawning the new node until it printed its listening line."""
    rss_anon_kib_max: int = 0
    vm_rss_kib_max: int = 0
    other_cores: float = 0.0
    """Cores used by processes other than the two nodes and this script."""
    samples: list[tuple[float, int]] = field(default_factory=list)
    """`(seconds since spawn, new node's commands)` every 0.1 s."""

    @property
    def rate(self) -> float:
        return self.commands / self.seconds


@dataclass(slots=True)
class SizeResult:
    commands: int
    fill_s: float
    runs: list[BootstrapRun]
    profile: str | None = None


def status(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/status", timeout=HTTP_TIMEOUT_S) as response:
        body: dict[str, Any] = json.loads(response.read())
        return body


def serve_argv(data_dir: Path, peers: tuple[str, ...] = ()) -> list[str]:
    argv = [
        sys.executable, "-m", "cmdlog.cli", "--log-level", "warning", "serve",
        "--data", str(data_dir), "--listen", "127.0.0.1:0",
    ]  # fmt: skip
    for peer in peers:
        argv += ["--peer", peer]
    return argv


# Filling the source


def _submissions(start: int, count: int) -> list[Submission]:
    batch = []
    for index in range(start, start + count):
        if index < ACCOUNTS:
            key, type_name = f"open-{index}", "ledger.open"
            payload: dict[str, Any] = {"account": f"acct-{index}", "currency": "EUR"}
        else:
            key, type_name = f"deposit-{index}", "ledger.deposit"
            account = f"acct-{index % ACCOUNTS}"
            payload = {"account": account, "amount": DEPOSIT_AMOUNT}
        batch.append(prepare_submission(example_app, key, type_name, payload))
    return batch


def fill_source(data_dir: Path, commands: int) -> float:
    """Write `commands` commands into a new data directory and return the seconds."""
    started = time.perf_counter()
    database = Database(data_dir, example_app, store_config=StoreConfig(durable=False))
    try:
        for start in range(0, commands, BATCH_COMMANDS):
            database.submit(_submissions(start, min(BATCH_COMMANDS, commands - start)))
        stored = database.status().commands
    finally:
        database.close()
    assert stored == commands, f"expected {commands} stored commands, found {stored}"
    return time.perf_counter() - started


# Sampling the new node


class MemorySampler:
    """Sampler of one process's RssAnon and VmRSS maxima, read until stopped."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.rss_anon_kib_max = 0
        self.vm_rss_kib_max = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(RSS_INTERVAL_S):
            try:
                fields = _status_fields(self.pid)
            except OSError:
                return
            self.rss_anon_kib_max = max(self.rss_anon_kib_max, fields["RssAnon"])
            self.vm_rss_kib_max = max(self.vm_rss_kib_max, fields["VmRSS"])


def _status_fields(pid: int) -> dict[str, int]:
    """Return the kB fields of /proc/PID/status that the sampler reads."""
    found = {"RssAnon": 0, "VmRSS": 0}
    with open(f"/proc/{pid}/status", encoding="ascii") as handle:
        for line in handle:
            name, _, value = line.partition(":")
            if name in found:
                found[name] = int(value.split()[0])
    return found


def _wait_caught_up(
    new_url: str, source: dict[str, Any], spawned_at: float, run: BootstrapRun
) -> None:
    """Poll the new node until it matches `source`, or raise RuntimeError."""
    timeout_s = max(BOOTSTRAP_TIMEOUT_MIN_S, run.commands / BOOTSTRAP_RATE_FLOOR)
    polls_max = math.ceil(timeout_s / COUNT_INTERVAL_S)
    for poll in range(1, polls_max + 1):
        now = status(new_url)
        elapsed_s = time.monotonic() - spawned_at
        run.samples.append((round(elapsed_s, 2), now["commands"]))
        if now["commands"] == source["commands"] and now["digest"] == source["digest"]:
            run.seconds = elapsed_s
            return
        deadline = spawned_at + run.ready_s + poll * COUNT_INTERVAL_S
        time.sleep(max(0.0, deadline - time.monotonic()))
    raise RuntimeError(
        f"bootstrap timed out after {timeout_s:.0f} s: the new node stored "
        f"{run.samples[-1][1]} of {source['commands']} commands, expected all of "
        "them and equal digests"
    )


def bootstrap_once(
    source: Service,
    source_url: str,
    scratch: Path,
    *,
    py_spy: PySpy | None = None,
    profile_s: int = 0,
) -> BootstrapRun:
    """Start an empty node peered with the source and time it until caught up.

    With `py_spy`, the new node is sampled for its first `profile_s` seconds.
    """
    expected = status(source_url)
    run = BootstrapRun(commands=expected["commands"])
    busy_before = machine_busy_seconds()
    source_cpu_before = tree_cpu_seconds(source.process.pid)
    self_cpu_before = time.process_time()
    spawned_at = time.monotonic()
    node, match = start_service(
        serve_argv(scratch / "new", (source_url,)),
        name=f"new-{int(spawned_at * 1000)}",
        log_dir=scratch,
        ready=LISTENING,
        timeout_s=START_TIMEOUT_S,
    )
    try:
        run.ready_s = time.monotonic() - spawned_at
        with MemorySampler(node.process.pid) as memory:
            if py_spy is None:
                _wait_caught_up(match.group(1), expected, spawned_at, run)
            else:
                with py_spy.sampling(node.process.pid, profile_s):
                    _wait_caught_up(match.group(1), expected, spawned_at, run)
        run.rss_anon_kib_max = memory.rss_anon_kib_max
        run.vm_rss_kib_max = memory.vm_rss_kib_max
        ours_s = (
            tree_cpu_seconds(node.process.pid)
            + tree_cpu_seconds(source.process.pid)
            - source_cpu_before
            + time.process_time()
            - self_cpu_before
        )
        run.other_cores = max(
            0.0, (machine_busy_seconds() - busy_before - ours_s) / run.seconds
        )
    finally:
        stop_service(node)
    return run


def measure_size(commands: int, runs: int, py_spy_path: str | None) -> SizeResult:
    with temp_dir("cmdlog-bootstrap-") as scratch:
        progress(f"filling a source with {commands:,} commands")
        fill_s = fill_source(scratch / "source", commands)
        progress(f"filled in {fill_s:.1f} s ({commands / fill_s:,.0f} commands/s)")
        result = SizeResult(commands, fill_s, [])
        with running(
            serve_argv(scratch / "source"),
            name="source",
            log_dir=scratch,
            ready=LISTENING,
            timeout_s=START_TIMEOUT_S,
        ) as (source, match):
            source_url = match.group(1)
            for index in range(runs):
                run_dir = scratch / f"run-{index}"
                run_dir.mkdir()
                run = bootstrap_once(source, source_url, run_dir)
                progress(
                    f"N={commands:,} run {index + 1}: {run.seconds:.1f} s, "
                    f"{run.rate:,.0f} commands/s, "
                    f"RssAnon max {run.rss_anon_kib_max / 1024:,.0f} MiB"
                )
                result.runs.append(run)
            if py_spy_path:
                run_dir = scratch / "profiled"
                run_dir.mkdir()
                sampler = PySpy(py_spy_path, run_dir)
                profile_s = max(1, int(median(run.seconds for run in result.runs)))
                bootstrap_once(
                    source, source_url, run_dir, py_spy=sampler, profile_s=profile_s
                )
                result.profile = sampler.summary()
    return result


# Reporting


def render(results: list[SizeResult]) -> str:
    rows = []
    for found in results:
        runs = found.runs
        rows.append(
            [
                f"{found.commands:,}",
                len(runs),
                f"{found.fill_s:.1f}",
                spread([run.seconds for run in runs], "{:,.1f}"),
                spread([run.rate for run in runs]),
                spread([run.rss_anon_kib_max / 1024 for run in runs], "{:,.1f}"),
                spread([run.vm_rss_kib_max / 1024 for run in runs], "{:,.0f}"),
                spread([run.other_cores for run in runs], "{:.2f}"),
            ]
        )
    headers = [
        "N",
        "runs",
        "fill s",
        "bootstrap s",
        "commands/s",
        "RssAnon max MiB",
        "VmRSS max MiB",
        "other cores",
    ]
    parts = [table(headers, rows)]
    if len(results) > 1:
        parts += [
            "",
            f"Peak RssAnon at {results[-1].commands:,} commands over that at "
            f"{results[0].commands:,}: {memory_ratio(results):.2f} (medians).",
        ]
    for found in results:
        parts += ["", f"N={found.commands:,}, first run:", "", render_series(found)]
        if found.profile:
            parts += ["", "py-spy:", "", "```", found.profile, "```"]
    return "\n".join(parts)


def render_series(found: SizeResult, rows_max: int = 24) -> str:
    """Tabulate the first run's count samples, thinned to at most `rows_max` rows."""
    samples = found.runs[0].samples
    step = max(1, math.ceil(len(samples) / rows_max))
    picked = samples[::step]
    if picked[-1] != samples[-1]:
        picked.append(samples[-1])
    rows = []
    previous = (0.0, 0)
    for elapsed_s, count in picked:
        interval_s = elapsed_s - previous[0]
        rate = (count - previous[1]) / interval_s if interval_s > 0 else 0.0
        rows.append([f"{elapsed_s:.1f}", f"{count:,}", f"{rate:,.0f}"])
        previous = (elapsed_s, count)
    return table(["s since spawn", "commands", "commands/s since previous row"], rows)


def memory_ratio(results: list[SizeResult]) -> float:
    """Return peak RssAnon at the largest size over that at the smallest (medians)."""
    return median(r.rss_anon_kib_max for r in results[-1].runs) / median(
        r.rss_anon_kib_max for r in results[0].runs
    )


def target_rows(results: list[SizeResult]) -> list[list[str]]:
    """Return `[target, measured median, verdict]` rows for the bootstrap targets."""
    largest = results[-1]
    rate = median(run.rate for run in largest.runs)
    rows = [
        [
            f"bootstrap of {largest.commands:,} commands ≥ {RATE_TARGET:,} commands/s",
            f"{rate:,.0f}",
            "met" if rate >= RATE_TARGET else "not met",
        ]
    ]
    if len(results) > 1:
        ratio = memory_ratio(results)
        rows.append(
            [
                f"bootstrap peak RssAnon, {largest.commands:,} / "
                f"{results[0].commands:,} commands, within 20%",
                f"{ratio:.2f}",
                "met" if abs(ratio - 1) <= MEMORY_TOLERANCE else "not met",
            ]
        )
    return rows


def run(*, quick: bool) -> dict[str, Any]:
    """Measure every size of the full or quick scale; return the suite's record."""
    quiet_logging()
    sizes, runs = (QUICK_SIZES, 1) if quick else (FULL_SIZES, 3)
    results = [measure_size(commands, runs, None) for commands in sizes]
    return {
        "markdown": render(results),
        "targets": target_rows(results),
        "series": {str(found.commands): found.runs[0].samples for found in results},
        "data": [asdict(found) for found in results],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--commands",
        type=int,
        nargs="+",
        default=[100_000, 1_000_000],
        help="source sizes in commands, one measurement each",
    )
    parser.add_argument("--runs", type=int, default=3, help="bootstraps per size")
    parser.add_argument("--py-spy", help="path of py-spy, for one profiled run")
    parser.add_argument("--json", type=Path, help="also write the raw runs here")
    args = parser.parse_args()
    quiet_logging()

    results = [measure_size(n, args.runs, args.py_spy) for n in args.commands]
    if args.json:
        args.json.write_text(json.dumps([asdict(found) for found in results]))
    print(render(results))
    if len(results) > 1:
        print(f"\nRssAnon max, largest N / smallest N: {memory_ratio(results):.2f}")


if __name__ == "__main__":
    main()
