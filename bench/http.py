"""HTTP benchmark: cmdlog serve against a PostgreSQL service and a bare aiohttp one.

The same load generator, wrk, drives every system with the same requests:
`POST /commands` with a new Idempotency-Key and a `ledger.deposit` body per
request over 64 connections, then `POST /commands/batch` with 1,000 items
per request over 4 connections. Each system is one fresh process per
measurement (see `bench.systems`), warmed up for a moment, then measured.
Systems run in a rotated order in every round, and ratios are taken
between measurements of the same round.

Run `python -m bench.http [--quick] [--profile]` from the repository root,
as a module: run as a script, this file would shadow the standard
library's `http`. `--profile` samples `cmdlog serve` with py-spy, which
must be on PATH.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.cpu_time import children_cpu_seconds, machine_busy_seconds
from bench.postgres import Cluster, temporary_cluster
from bench.processes import run_bounded
from bench.profiles import PySpy
from bench.report import progress
from bench.systems import (
    BARE,
    CMDLOG,
    CMDLOG_HEALTHZ,
    CMDLOG_QUIET,
    PG,
    REPO,
    started_system,
)
from bench.workload import ACCOUNTS

SINGLE_SCRIPT = "bench/wrk/single.lua"
BATCH_SCRIPT = "bench/wrk/batch.lua"
GET_SCRIPT = "bench/wrk/get.lua"
SINGLE_CONNECTIONS = 64
BATCH_CONNECTIONS = 4
WRK_THREADS = 2
BATCH_ITEMS = 1_000
WRK_TIMEOUT_S = 10
"""wrk counts a response slower than this as a timeout error."""
WRK_GRACE_S = 60.0
"""How much longer than its duration a wrk run may take before it is killed."""
INSTALL_TIMEOUT_S = 600.0

SINGLE_SYSTEMS = (CMDLOG, CMDLOG_QUIET, PG, BARE, CMDLOG_HEALTHZ)
BATCH_SYSTEMS = (CMDLOG, PG, BARE)


@dataclass(frozen=True, slots=True)
class Scale:
    rounds: int
    duration_s: int
    warmup_s: int


FULL = Scale(rounds=3, duration_s=10, warmup_s=2)
QUICK = Scale(rounds=2, duration_s=3, warmup_s=1)


@dataclass(frozen=True, slots=True)
class WrkResult:
    """The numbers wrk's `done()` hook prints, with times in microseconds."""

    requests: int
    duration_us: int
    connect_errors: int
    read_errors: int
    write_errors: int
    status_errors: int
    timeouts: int
    p50_us: int
    p90_us: int
    p99_us: int
    max_us: int

    @property
    def requests_per_s(self) -> float:
        return self.requests / (self.duration_us / 1e6)

    @property
    def errors(self) -> int:
        return (
            self.connect_errors
            + self.read_errors
            + self.write_errors
            + self.status_errors
            + self.timeouts
        )


@dataclass(frozen=True, slots=True)
class Measurement:
    system: str
    mode: str
    round_index: int
    wrk: WrkResult
    items_per_request: int
    stored: int | None
    """Commands the system stored during the measured run, by its own count."""
    cpu_s: float
    """CPU seconds the system used during the measured run, its database too."""
    process_cpu_s: float
    """CPU seconds of the service process alone, all its threads."""
    main_thread_cpu_s: float
    """CPU seconds of the service's main thread, which runs the event loop."""
    other_cores: float
    """CPU that other processes used during the run, in cores (other users)."""
    commits: int | None
    """cmdlog's durable group commits during the measured run."""

    @property
    def commands(self) -> int:
        return self.wrk.requests * self.items_per_request

    @property
    def commands_per_s(self) -> float:
        return self.wrk.requests_per_s * self.items_per_request

    @property
    def cpu_us_per_command(self) -> float:
        return self.cpu_s / self.commands * 1e6


@dataclass(slots=True)
class Context:
    """The scale, scratch space and report notes shared by every measurement."""

    scale: Scale
    scratch: Path
    cluster: Cluster
    commands: dict[str, str]
    """Command lines used, by role, with temporary paths and ports as $NAMES."""


# tools


def _apt_install(package: str) -> None:
    progress(f"{package} not found; installing Debian's {package} package")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", package],
    ):
        subprocess.run(argv, check=True, env=env, timeout=INSTALL_TIMEOUT_S)


def ensure_wrk() -> None:
    """Install Debian's wrk package when wrk is not on PATH."""
    if shutil.which("wrk") is None:
        _apt_install("wrk")
    if shutil.which("wrk") is None:
        raise RuntimeError("apt-get installed wrk but it is not on PATH")


def ensure_asyncpg() -> None:
    """Install asyncpg into this interpreter's environment when it is missing."""
    if importlib.util.find_spec("asyncpg") is not None:
        return
    progress(f"asyncpg not found; installing it with {sys.executable} -m pip")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "asyncpg"],
        check=True,
        timeout=INSTALL_TIMEOUT_S,
    )


# wrk


def wrk_argv(
    *, mode: str, system: str, url: str, duration_s: int, prefix: str
) -> list[str]:
    if system == CMDLOG_HEALTHZ:
        connections, script, args = SINGLE_CONNECTIONS, GET_SCRIPT, []
        url += "/healthz"
    elif mode == "single":
        connections, script, args = SINGLE_CONNECTIONS, SINGLE_SCRIPT, ["/commands"]
    else:
        connections, script = BATCH_CONNECTIONS, BATCH_SCRIPT
        args = ["/commands/batch", str(BATCH_ITEMS)]
    return [
        *("wrk", f"-t{WRK_THREADS}", f"-c{connections}", f"-d{duration_s}s"),
        *(f"--timeout={WRK_TIMEOUT_S}s", "--latency", "-s", script, url),
        *("--", prefix, str(ACCOUNTS), *args),
    ]


def run_wrk(argv: list[str], duration_s: int) -> WrkResult:
    output = run_bounded(argv, timeout_s=duration_s + WRK_GRACE_S, cwd=REPO)
    for line in output.splitlines():
        if line.startswith("WRK_RESULT "):
            return WrkResult(**json.loads(line.removeprefix("WRK_RESULT ")))
    raise RuntimeError(f"wrk printed no WRK_RESULT line:\n{output[-2000:]}")


def measure(
    context: Context,
    *,
    system: str,
    mode: str,
    round_index: int,
    profiler: PySpy | None = None,
) -> Measurement:
    """Start `system`, warm it up, measure one wrk run, and stop it."""
    scale = context.scale
    prefix = f"{mode}-{round_index}-{system.split(',')[0]}"
    with started_system(
        system,
        scratch=context.scratch,
        cluster=context.cluster,
        commands=context.commands,
    ) as target:
        warm = wrk_argv(
            mode=mode,
            system=system,
            url=target.base_url,
            duration_s=scale.warmup_s,
            prefix=f"warm-{prefix}",
        )
        run_wrk(warm, scale.warmup_s)

        argv = wrk_argv(
            mode=mode,
            system=system,
            url=target.base_url,
            duration_s=scale.duration_s,
            prefix=f"run-{prefix}",
        )
        role = "wrk GET /healthz" if system == CMDLOG_HEALTHZ else f"wrk {mode}"
        shown = " ".join(argv).replace(target.base_url, "http://127.0.0.1:$PORT")
        context.commands[role] = shown

        stored_before = target.stored() if target.stored else None
        commits_before = target.commits() if target.commits else None
        cpu_before = target.cpu()
        busy_before = machine_busy_seconds()
        children_before = children_cpu_seconds()
        sampling = (
            profiler.sampling(target.pid, scale.duration_s)
            if profiler
            else contextlib.nullcontext()
        )
        with sampling:
            result = run_wrk(argv, scale.duration_s)
        cpu_after = target.cpu()
        wrk_cpu_s = children_cpu_seconds() - children_before
        busy_s = machine_busy_seconds() - busy_before
        stored_after = target.stored() if target.stored else None
        commits_after = target.commits() if target.commits else None

    cpu_s = cpu_after.tree_s - cpu_before.tree_s
    other_s = max(busy_s - cpu_s - wrk_cpu_s, 0.0)
    stored = None
    if stored_before is not None and stored_after is not None:
        stored = stored_after - stored_before
    return Measurement(
        system=system,
        mode=mode,
        round_index=round_index,
        wrk=result,
        items_per_request=1 if mode == "single" else BATCH_ITEMS,
        stored=stored,
        cpu_s=cpu_s,
        process_cpu_s=cpu_after.process_s - cpu_before.process_s,
        main_thread_cpu_s=cpu_after.main_thread_s - cpu_before.main_thread_s,
        other_cores=other_s / (result.duration_us / 1e6),
        commits=(
            None
            if commits_before is None or commits_after is None
            else commits_after - commits_before
        ),
    )


# rounds


def _rotated(systems: tuple[str, ...], round_index: int) -> list[str]:
    shift = round_index % len(systems)
    return list(systems[shift:] + systems[:shift])


def _describe(found: Measurement) -> str:
    checked = "" if found.stored is None else f", stored {found.stored:,}"
    p50_ms = found.wrk.p50_us / 1000
    p99_ms = found.wrk.p99_us / 1000
    return (
        f"  {found.commands_per_s:,.0f} commands/s, p50 {p50_ms:.1f} ms, "
        f"p99 {p99_ms:.1f} ms, errors {found.wrk.errors}{checked}"
    )


def run(*, quick: bool, profile: bool) -> dict[str, Any]:
    """Run every HTTP round (and the profiles) and return the measurements."""
    scale = QUICK if quick else FULL
    ensure_wrk()
    ensure_asyncpg()
    py_spy = shutil.which("py-spy") if profile else None
    if profile and py_spy is None:
        progress("py-spy is not on PATH; skipping the server profiles")
    measurements: list[Measurement] = []
    profiles: dict[str, str] = {}
    scratch = Path(tempfile.mkdtemp(prefix="cmdlog-bench-http-"))
    try:
        with temporary_cluster() as cluster:
            context = Context(scale, scratch, cluster, {})
            for mode, systems in (("single", SINGLE_SYSTEMS), ("batch", BATCH_SYSTEMS)):
                for round_index in range(scale.rounds):
                    for system in _rotated(systems, round_index):
                        step = f"round {round_index + 1}/{scale.rounds}"
                        progress(f"http {mode} {step}: {system}, {scale.duration_s} s")
                        found = measure(
                            context, system=system, mode=mode, round_index=round_index
                        )
                        measurements.append(found)
                        progress(_describe(found))
                if py_spy is not None:
                    progress(f"http {mode} profile: cmdlog under py-spy")
                    profiler = PySpy(py_spy, scratch)
                    measure(
                        context,
                        system=CMDLOG,
                        mode=mode,
                        round_index=scale.rounds,
                        profiler=profiler,
                    )
                    profiles[mode] = profiler.summary()
            commands = dict(context.commands)
            commands["postgres"] = "\n".join(cluster.commands)
            postgres_version = cluster.version
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {
        "scale": asdict(scale),
        "measurements": measurements,
        "profiles": profiles,
        "commands": commands,
        "postgres_version": postgres_version,
    }


def main() -> None:
    from bench import http_report

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds of 3 s runs")
    parser.add_argument(
        "--profile", action="store_true", help="sample cmdlog serve with py-spy"
    )
    args = parser.parse_args()
    results = run(quick=args.quick, profile=args.profile)
    print(http_report.render(results))
    print()
    print(http_report.render_commands(results))


if __name__ == "__main__":
    main()
