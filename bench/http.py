"""HTTP benchmark: cmdlog serve against a PostgreSQL service and a bare aiohttp one.

The same load generator, wrk, drives every system with the same requests:
`POST /commands` with a new Idempotency-Key and a `ledger.deposit` body per
request over 64 connections, then `POST /commands/batch` with 1,000 items
per request over 4 connections. Two more workloads follow. The connection
sweep repeats the single commands at 1, 16 and 256 connections, and its
64-connection point is the single-command measurement. The retries send
single commands over 64 connections where a share of the requests (0%,
10%, 50%) resends an earlier request with the same key and body, as a
client retry does. Each system is one fresh process per measurement (see
`bench.systems`), warmed up for a moment, then measured. Systems run in a
rotated order in every round, and ratios are taken between measurements
of the same round.

Run `python -m bench.http [--quick] [--profile]` from the repository root,
as a module: run as a script, this file would shadow the standard
library's `http`. `--profile` samples `cmdlog serve` with py-spy, which
must be on PATH.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
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
    settled_count,
    started_system,
)
from bench.tools import apt_install, ensure_module
from bench.workload import ACCOUNTS, FULL_LOAD, QUICK_LOAD, LoadScale

SINGLE_SCRIPT = "bench/wrk/single.lua"
BATCH_SCRIPT = "bench/wrk/batch.lua"
GET_SCRIPT = "bench/wrk/get.lua"
RETRY_SCRIPT = "bench/wrk/retry.lua"
SINGLE_CONNECTIONS = 64
BATCH_CONNECTIONS = 4
WRK_THREADS = 2
"""wrk threads, or fewer when a run has fewer connections."""
BATCH_ITEMS = 1_000
WRK_TIMEOUT_S = 10
"""wrk counts a response slower than this as a timeout error."""
WRK_GRACE_S = 60.0
"""How much longer than its duration a wrk run may take before it is killed."""

SINGLE_SYSTEMS = (CMDLOG, CMDLOG_QUIET, PG, BARE, CMDLOG_HEALTHZ)
BATCH_SYSTEMS = (CMDLOG, PG, BARE)
SWEEP_SYSTEMS = (CMDLOG, PG, BARE)
SWEEP_CONNECTIONS = (1, 16, SINGLE_CONNECTIONS, 256)
RETRY_SYSTEMS = (CMDLOG, PG)
"""The systems that deduplicate by key, so their stored count can be checked."""
DUPLICATE_SHARES = (0.0, 0.1, 0.5)
RETRY_SEED = 1
"""Thread i of a retry run seeds its random generator with RETRY_SEED + i."""
RETRY_WINDOW = 1_000
"""A retry resends one of its thread's last RETRY_WINDOW new requests."""


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
    new_keys: int | None = None
    """Requests sent with a new key, those in flight at the end too (retry.lua only)."""
    duplicates: int | None = None
    """Requests that resent an earlier request of their wrk thread (retry.lua only)."""

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
    """"single", "batch" or "retry" (single commands, some of them resent)."""
    connections: int
    duplicate_share: float
    """The probability that a request resends an earlier one (0 unless "retry")."""
    round_index: int
    wrk: WrkResult
    items_per_request: int
    stored: int | None
    """Commands the system stored during the measured run, by its own count.

    Read after the count stops changing, so it includes the requests that
    wrk still had in flight when it stopped.
    """
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

    scale: LoadScale
    scratch: Path
    cluster: Cluster
    commands: dict[str, str]
    """Command lines used, by role, with temporary paths and ports as $NAMES."""


# tools


def ensure_wrk() -> None:
    """Install Debian's wrk package when wrk is not on PATH."""
    if shutil.which("wrk") is None:
        apt_install("wrk")
    if shutil.which("wrk") is None:
        raise RuntimeError("apt-get installed wrk but it is not on PATH")


# wrk


def wrk_argv(
    *,
    mode: str,
    system: str,
    url: str,
    duration_s: int,
    prefix: str,
    connections: int,
    duplicate_share: float,
) -> list[str]:
    if system == CMDLOG_HEALTHZ:
        script, args = GET_SCRIPT, []
        url += "/healthz"
    elif mode == "single":
        script, args = SINGLE_SCRIPT, ["/commands"]
    elif mode == "retry":
        script = RETRY_SCRIPT
        args = ["/commands", str(duplicate_share), str(RETRY_SEED), str(RETRY_WINDOW)]
    elif mode == "batch":
        script, args = BATCH_SCRIPT, ["/commands/batch", str(BATCH_ITEMS)]
    else:
        raise ValueError(f"wrk mode {mode!r} is not single, retry or batch")
    # wrk rejects more threads than connections.
    threads = min(WRK_THREADS, connections)
    return [
        *("wrk", f"-t{threads}", f"-c{connections}", f"-d{duration_s}s"),
        *(f"--timeout={WRK_TIMEOUT_S}s", "--latency", "-s", script, url),
        *("--", prefix, str(ACCOUNTS), *args),
    ]


def _connections_text(connections: int) -> str:
    return f"{connections} connection{'' if connections == 1 else 's'}"


def _role(system: str, mode: str, connections: int, duplicate_share: float) -> str:
    """Name a wrk command line in the report, one name per distinct command."""
    if system == CMDLOG_HEALTHZ:
        return "wrk GET /healthz"
    if mode == "retry":
        return f"wrk retry, {duplicate_share:.0%} duplicates"
    if mode == "single" and connections != SINGLE_CONNECTIONS:
        return f"wrk single, {_connections_text(connections)}"
    return f"wrk {mode}"


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
    connections: int,
    duplicate_share: float = 0.0,
    profiler: PySpy | None = None,
) -> Measurement:
    """Start `system`, warm it up, measure one wrk run, and stop it."""
    scale = context.scale
    prefix = f"{mode}-{connections}-{duplicate_share}-{round_index}-"
    prefix += system.split(",")[0]
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
            connections=connections,
            duplicate_share=duplicate_share,
        )
        run_wrk(warm, scale.warmup_s)

        argv = wrk_argv(
            mode=mode,
            system=system,
            url=target.base_url,
            duration_s=scale.duration_s,
            prefix=f"run-{prefix}",
            connections=connections,
            duplicate_share=duplicate_share,
        )
        role = _role(system, mode, connections, duplicate_share)
        shown = " ".join(argv).replace(target.base_url, "http://127.0.0.1:$PORT")
        context.commands[role] = shown

        # Both reads wait until the count stops changing, so the requests that the
        # warm-up left in flight are not counted in the measured run.
        stored_before = settled_count(target.stored) if target.stored else None
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
        stored_after = settled_count(target.stored) if target.stored else None
        commits_after = target.commits() if target.commits else None

    cpu_s = cpu_after.tree_s - cpu_before.tree_s
    other_s = max(busy_s - cpu_s - wrk_cpu_s, 0.0)
    stored = None
    if stored_before is not None and stored_after is not None:
        stored = stored_after - stored_before
    return Measurement(
        system=system,
        mode=mode,
        connections=connections,
        duplicate_share=duplicate_share,
        round_index=round_index,
        wrk=result,
        items_per_request=BATCH_ITEMS if mode == "batch" else 1,
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
    if found.wrk.new_keys is not None:
        checked += f", new keys sent {found.wrk.new_keys:,}"
        if found.stored is not None and found.stored != found.wrk.new_keys:
            checked += " (MISMATCH: stored differs from the new keys sent)"
    p50_ms = found.wrk.p50_us / 1000
    p99_ms = found.wrk.p99_us / 1000
    return (
        f"  {found.commands_per_s:,.0f} commands/s, p50 {p50_ms:.1f} ms, "
        f"p99 {p99_ms:.1f} ms, errors {found.wrk.errors}{checked}"
    )


def _measure_rounds(
    context: Context,
    *,
    mode: str,
    systems: tuple[str, ...],
    connections: int,
    duplicate_share: float = 0.0,
) -> list[Measurement]:
    """Measure every system once per round, in an order rotated by the round."""
    scale = context.scale
    label = f"{mode}, {_connections_text(connections)}"
    if mode == "retry":
        label += f", {duplicate_share:.0%} duplicates"
    measurements = []
    for round_index in range(scale.rounds):
        for system in _rotated(systems, round_index):
            step = f"round {round_index + 1}/{scale.rounds}"
            progress(f"http {label} {step}: {system}, {scale.duration_s} s")
            found = measure(
                context,
                system=system,
                mode=mode,
                round_index=round_index,
                connections=connections,
                duplicate_share=duplicate_share,
            )
            measurements.append(found)
            progress(_describe(found))
    return measurements


def sweep_row(found: Measurement) -> dict[str, Any]:
    """Return one connection-sweep measurement as plain values (round from 0)."""
    return {
        "system": found.system,
        "connections": found.connections,
        "round": found.round_index,
        "requests": found.wrk.requests,
        "requests_per_s": found.wrk.requests_per_s,
        "p50_us": found.wrk.p50_us,
        "p90_us": found.wrk.p90_us,
        "p99_us": found.wrk.p99_us,
        "max_us": found.wrk.max_us,
        "errors": found.wrk.errors,
        "cpu_us_per_request": found.cpu_us_per_command,
        "other_cores": found.other_cores,
    }


def retry_row(found: Measurement) -> dict[str, Any]:
    """Return one retry measurement as plain values (round from 0).

    `unique_keys` is the number of new keys wrk sent and `stored` the
    commands the system stored by its own count. The two are equal when
    every retry was deduplicated and no new key was lost.
    """
    duration_s = found.wrk.duration_us / 1e6
    stored = found.stored
    return {
        "system": found.system,
        "connections": found.connections,
        "duplicate_share": found.duplicate_share,
        "round": found.round_index,
        "requests": found.wrk.requests,
        "requests_per_s": found.wrk.requests_per_s,
        "duplicates_sent": found.wrk.duplicates,
        "unique_keys": found.wrk.new_keys,
        "stored": stored,
        "stored_per_s": None if stored is None else stored / duration_s,
        "p50_us": found.wrk.p50_us,
        "p90_us": found.wrk.p90_us,
        "p99_us": found.wrk.p99_us,
        "max_us": found.wrk.max_us,
        "errors": found.wrk.errors,
        "other_cores": found.other_cores,
    }


def _sweep(context: Context, at_default: list[Measurement]) -> list[dict[str, Any]]:
    """Measure the sweep's connection counts, reusing the 64-connection runs."""
    found = [m for m in at_default if m.mode == "single" and m.system in SWEEP_SYSTEMS]
    for connections in SWEEP_CONNECTIONS:
        if connections != SINGLE_CONNECTIONS:
            found += _measure_rounds(
                context, mode="single", systems=SWEEP_SYSTEMS, connections=connections
            )
    found.sort(key=lambda m: (m.connections, m.round_index))
    return [sweep_row(m) for m in found]


def _retries(context: Context) -> list[dict[str, Any]]:
    found = []
    for share in DUPLICATE_SHARES:
        found += _measure_rounds(
            context,
            mode="retry",
            systems=RETRY_SYSTEMS,
            connections=SINGLE_CONNECTIONS,
            duplicate_share=share,
        )
    return [retry_row(m) for m in found]


def run(*, quick: bool, profile: bool) -> dict[str, Any]:
    """Run every HTTP round (and the profiles) and return the measurements.

    The result's "measurements" are the 64-connection single commands and
    the batches. "sweep" and "retries" are lists of `sweep_row` and
    `retry_row` dicts.
    """
    scale = QUICK_LOAD if quick else FULL_LOAD
    ensure_wrk()
    ensure_module("asyncpg", "asyncpg")
    py_spy = shutil.which("py-spy") if profile else None
    if profile and py_spy is None:
        progress("py-spy is not on PATH; skipping the server profiles")
    measurements: list[Measurement] = []
    profiles: dict[str, str] = {}
    scratch = Path(tempfile.mkdtemp(prefix="cmdlog-bench-http-"))
    try:
        with temporary_cluster() as cluster:
            context = Context(scale, scratch, cluster, {})
            for mode, systems, connections in (
                ("single", SINGLE_SYSTEMS, SINGLE_CONNECTIONS),
                ("batch", BATCH_SYSTEMS, BATCH_CONNECTIONS),
            ):
                measurements += _measure_rounds(
                    context, mode=mode, systems=systems, connections=connections
                )
                if py_spy is not None:
                    progress(f"http {mode} profile: cmdlog under py-spy")
                    profiler = PySpy(py_spy, scratch)
                    measure(
                        context,
                        system=CMDLOG,
                        mode=mode,
                        round_index=scale.rounds,
                        connections=connections,
                        profiler=profiler,
                    )
                    profiles[mode] = profiler.summary()
            sweep = _sweep(context, measurements)
            retries = _retries(context)
            commands = dict(context.commands)
            commands["postgres"] = "\n".join(cluster.commands)
            postgres_version = cluster.version
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {
        "scale": asdict(scale),
        "measurements": measurements,
        "sweep": sweep,
        "retries": retries,
        "profiles": profiles,
        "commands": commands,
        "postgres_version": postgres_version,
    }


def main() -> None:
    from bench import http_report

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="1 round of 3 s runs (default: 3 of 10 s)"
    )
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
