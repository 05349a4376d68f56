"""Replication lag benchmark: how long a write to one node takes to reach another.

Each run starts two `cmdlog serve` nodes on 127.0.0.1: A, and B with
`--peer A` (B announces itself, so A pulls from B too). 300 accounts are
opened on A in one batch and awaited on B. Then a client sends single
`POST /commands` deposits to A at a steady rate, each at an absolute
deadline `start + i / rate` and each on its own task, with at most 512 in
flight. Meanwhile a child process (or, with `--observer loop`, the writer's
own event loop) reads B's `GET /replicate` stream and timestamps each
arriving log entry whose origin is A's node ID. A command's lag is the time
from A's 201 response reaching the client to its entry arriving from B,
both read on CLOCK_MONOTONIC.

The client and the two nodes share the machine's cores, so the lag
includes time the nodes waited for a core, and the 201 timestamps are late
by however long the writer's own loop was busy. That can make a lag
negative: the entry arrived from B before the writer read A's response.

Run `python -m bench.lag [--runs R] [--seconds S] [--rate N] [--observer
process|loop]` from the repository root.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event as EventType
from pathlib import Path
from typing import Any

import aiohttp

from bench.bootstrap import LISTENING, START_TIMEOUT_S, serve_argv, status
from bench.core import quiet_logging, temp_dir
from bench.cpu_time import (
    children_cpu_seconds,
    machine_busy_seconds,
    tree_cpu_seconds,
)
from bench.processes import Service, running
from bench.report import median, progress, spread, table
from cmdlog import codec, frames
from cmdlog.config import ReplicationConfig
from cmdlog.frames import FrameReader

ACCOUNTS = 300
IN_FLIGHT_MAX = 512
SETTLE_TIMEOUT_S = 30.0
POLL_INTERVAL_S = 0.1
STREAM_GRACE_S = 0.5
"""Time B's stream gets, after B stores A's last command, before the observer stops."""
DRAIN_TIMEOUT_S = 15.0
"""Time the stream may take, after the last response, to deliver the rest."""
READ_CHUNK_BYTES = 64 * 1024
RATE_DEFAULT = 1_000.0
P99_TARGET_MS = 50.0


@dataclass(slots=True)
class LagRun:
    rate_target: float
    seconds_target: float
    sent: int = 0
    created: int = 0
    """Commands whose response was 201 Created."""
    failed: int = 0
    send_s: float = 0.0
    """From the first deadline to the last response."""
    behind_s_max: float = 0.0
    """Largest delay of a send after its deadline."""
    behind_count: int = 0
    """Sends that started more than 1 ms after their deadline."""
    lags_ms: list[float] = field(default_factory=list)
    """Per command, from A's 201 reaching the client to the entry arriving from B."""
    send_lags_ms: list[float] = field(default_factory=list)
    """Per command, from the client sending it to A to the entry arriving from B."""
    missing: int = 0
    """Commands created on A that never arrived on B's stream."""
    other_cores: float = 0.0
    a_cores: float = 0.0
    b_cores: float = 0.0
    client_cores: float = 0.0
    """Cores used by this script and its observer child."""
    observer: str = "process"
    """Reader of B's stream: "process" (a child) or "loop" (the writer's own loop)."""
    sends: list[Sent] = field(default_factory=list, repr=False)

    @property
    def rate(self) -> float:
        return self.created / self.send_s

    def lag_ms(self, quantile: float, *, from_send: bool = False) -> float:
        lags_ms = self.send_lags_ms if from_send else self.lags_ms
        if not lags_ms:
            return float("nan")
        ordered = sorted(lags_ms)
        return ordered[min(len(ordered) - 1, int(quantile * len(ordered)))]


# Observing B


class StreamObserver:
    """Reader of B's replication stream, recording when each entry from A arrives."""

    def __init__(self, origin: str) -> None:
        self.origin = origin
        self.arrived_at: dict[str, float] = {}
        self.changed = asyncio.Event()
        self.connected = asyncio.Event()
        """Set once the stream's hello frame has arrived."""

    async def read(self, session: aiohttp.ClientSession, url: str) -> None:
        """Read the stream until cancelled, raising FrameError on a bad frame."""
        reader = FrameReader(frame_bytes_max=ReplicationConfig().frame_bytes_max)
        async with session.get(url) as response:
            response.raise_for_status()
            async for chunk in response.content.iter_chunked(READ_CHUNK_BYTES):
                now = time.monotonic()
                for frame in reader.feed(chunk):
                    self.connected.set()
                    if frame["t"] == frames.COMMANDS:
                        self._record(frame["entries"], now)

    def _record(self, entries: list[list[Any]], now: float) -> None:
        for _seq, record in entries:
            command_id, _type, _payload, _stamp, origin = codec.unpack(record)
            if origin == self.origin:
                self.arrived_at.setdefault(command_id, now)
        self.changed.set()


def observe_in_child(
    url: str,
    origin: str,
    ready: EventType,
    stop: EventType,
    results: Connection,
    seconds_max: float,
) -> None:
    """Read B's stream in this child process until `stop`, then send the arrivals.

    A child of its own keeps the arrival timestamps free of the delays of the
    writer's busy event loop. CLOCK_MONOTONIC is one clock for all processes
    on Linux, so its readings compare with the parent's.
    """

    async def observe() -> dict[str, float]:
        observer = StreamObserver(origin)
        timeout = aiohttp.ClientTimeout(total=None, sock_read=10)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            reading = asyncio.create_task(observer.read(session, url))
            deadline = time.monotonic() + seconds_max
            while not (stop.is_set() or reading.done()) and time.monotonic() < deadline:
                if observer.connected.is_set():
                    ready.set()
                await asyncio.sleep(0.02)
            reading.cancel()
            with suppress(asyncio.CancelledError):
                await reading
        return observer.arrived_at

    results.send(asyncio.run(observe()))


# Writing to A


@dataclass(slots=True)
class Sent:
    key: str
    account: str
    sent_at: float
    response_at: float | None = None


async def _post(
    session: aiohttp.ClientSession,
    url: str,
    sent: Sent,
    limit: asyncio.Semaphore,
    run: LagRun,
) -> None:
    payload = {"account": sent.account, "amount": 1}
    try:
        async with session.post(
            f"{url}/commands",
            json={"type": "ledger.deposit", "payload": payload},
            headers={"Idempotency-Key": sent.key},
        ) as response:
            await response.read()
            if response.status == 201:
                sent.response_at = time.monotonic()
                run.created += 1
            else:
                run.failed += 1
    except (aiohttp.ClientError, TimeoutError):
        run.failed += 1
    finally:
        limit.release()


async def write_paced(
    session: aiohttp.ClientSession, url: str, run: LagRun, prefix: str
) -> list[Sent]:
    """Send `rate * seconds` deposits to A, each at its own absolute deadline."""
    total = int(run.rate_target * run.seconds_target)
    limit = asyncio.Semaphore(IN_FLIGHT_MAX)
    sends: list[Sent] = []
    tasks = []
    started_at = time.monotonic()
    for index in range(total):
        deadline = started_at + index / run.rate_target
        delay_s = deadline - time.monotonic()
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        await limit.acquire()
        behind_s = time.monotonic() - deadline
        run.behind_s_max = max(run.behind_s_max, behind_s)
        if behind_s > 0.001:
            run.behind_count += 1
        sent = Sent(f"{prefix}-{index}", f"acct-{index % ACCOUNTS}", time.monotonic())
        sends.append(sent)
        tasks.append(asyncio.create_task(_post(session, url, sent, limit, run)))
    await asyncio.gather(*tasks)
    run.sent = total
    run.send_s = time.monotonic() - started_at
    return sends


# One run


async def _settle(a_url: str, b_url: str) -> None:
    """Wait until A pulls from B and B stores everything A stores."""
    for _ in range(int(SETTLE_TIMEOUT_S / POLL_INTERVAL_S)):
        a = await asyncio.to_thread(status, a_url)
        b = await asyncio.to_thread(status, b_url)
        a_pulls = any(peer["connected"] for peer in a["peers"])
        if a_pulls and a["commands"] == b["commands"] and a["digest"] == b["digest"]:
            return
        await asyncio.sleep(POLL_INTERVAL_S)
    raise RuntimeError(
        f"settling timed out after {SETTLE_TIMEOUT_S} s: A has {a['commands']} "
        f"commands, B {b['commands']}, A's peers are {a['peers']}; expected equal "
        "counts and digests and a connected peer on A"
    )


async def _open_accounts(session: aiohttp.ClientSession, a_url: str) -> None:
    items = [
        {
            "id": f"open-{index}",
            "type": "ledger.open",
            "payload": {"account": f"acct-{index}", "currency": "EUR"},
        }
        for index in range(ACCOUNTS)
    ]
    async with session.post(f"{a_url}/commands/batch", json=items) as response:
        response.raise_for_status()


async def measure(a_url: str, b_url: str, run: LagRun) -> None:
    """Open the accounts, write to A at the target rate and tally the lags."""
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=IN_FLIGHT_MAX + 4),
        timeout=aiohttp.ClientTimeout(total=60),
    ) as session:
        await _open_accounts(session, a_url)
        await _settle(a_url, b_url)
        a, b = status(a_url), status(b_url)

        query = {"after": b["log_entries"], "version": frames.PROTOCOL_VERSION}
        stream_url = f"{b_url}/replicate?{urllib.parse.urlencode(query)}"
        if run.observer == "process":
            arrived_at = await _measure_with_child(
                session, a_url, b_url, stream_url, a["node"], run
            )
        else:
            arrived_at = await _measure_in_loop(
                session, a_url, stream_url, a["node"], run
            )
    _tally(run, arrived_at)


async def _measure_in_loop(
    session: aiohttp.ClientSession,
    a_url: str,
    stream_url: str,
    origin: str,
    run: LagRun,
) -> dict[str, float]:
    observer = StreamObserver(origin)
    stream_session = aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=None, sock_read=10)
    )
    reading = asyncio.create_task(observer.read(stream_session, stream_url))
    try:
        with suppress(TimeoutError):
            await asyncio.wait_for(observer.connected.wait(), SETTLE_TIMEOUT_S)
        run.sends = await write_paced(
            session, a_url, run, prefix=f"lag-{time.time_ns()}"
        )
        await _drain(observer, run.sends, reading)
    finally:
        reading.cancel()
        with suppress(asyncio.CancelledError):
            await reading
        await stream_session.close()
    return observer.arrived_at


async def _measure_with_child(
    session: aiohttp.ClientSession,
    a_url: str,
    b_url: str,
    stream_url: str,
    origin: str,
    run: LagRun,
) -> dict[str, float]:
    context = multiprocessing.get_context("spawn")
    ready, stop = context.Event(), context.Event()
    receiver, sender = context.Pipe(duplex=False)
    seconds_max = run.seconds_target + DRAIN_TIMEOUT_S + SETTLE_TIMEOUT_S
    child = context.Process(
        target=observe_in_child,
        args=(stream_url, origin, ready, stop, sender, seconds_max),
        daemon=True,
    )
    child.start()
    try:
        if not await asyncio.to_thread(ready.wait, SETTLE_TIMEOUT_S):
            raise RuntimeError(
                f"the observer timed out after {SETTLE_TIMEOUT_S} s waiting for a "
                f"hello frame from {stream_url}"
            )
        run.sends = await write_paced(
            session, a_url, run, prefix=f"lag-{time.time_ns()}"
        )
        await _await_stored(a_url, b_url)
        stop.set()
        if not await asyncio.to_thread(receiver.poll, DRAIN_TIMEOUT_S):
            raise RuntimeError("the observer sent no arrivals after it was stopped")
        arrived_at: dict[str, float] = receiver.recv()
        return arrived_at
    finally:
        stop.set()
        child.join(timeout=DRAIN_TIMEOUT_S)
        if child.is_alive():
            child.kill()
            child.join()


async def _await_stored(a_url: str, b_url: str) -> None:
    """Wait until B stores as many commands as A, then a little for its stream."""
    for _ in range(int(DRAIN_TIMEOUT_S / POLL_INTERVAL_S)):
        a = await asyncio.to_thread(status, a_url)
        b = await asyncio.to_thread(status, b_url)
        if b["commands"] >= a["commands"]:
            break
        await asyncio.sleep(POLL_INTERVAL_S)
    await asyncio.sleep(STREAM_GRACE_S)


def _tally(run: LagRun, arrived_at: dict[str, float]) -> None:
    for sent in run.sends:
        if sent.response_at is None:
            continue
        arrival_at = arrived_at.get(sent.key)
        if arrival_at is None:
            run.missing += 1
        else:
            run.lags_ms.append((arrival_at - sent.response_at) * 1000)
            run.send_lags_ms.append((arrival_at - sent.sent_at) * 1000)


async def _drain(
    observer: StreamObserver, sends: list[Sent], reading: asyncio.Task[None]
) -> None:
    """Wait until every created command arrived on B, or until the drain timeout."""
    expected = {sent.key for sent in sends if sent.response_at is not None}
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while not expected.issubset(observer.arrived_at):
        if reading.done():
            reading.result()  # raises the reader's error
            return
        remaining_s = deadline - time.monotonic()
        if remaining_s <= 0:
            return
        observer.changed.clear()
        with suppress(TimeoutError):
            await asyncio.wait_for(observer.changed.wait(), min(remaining_s, 1.0))


@contextmanager
def two_nodes(scratch: Path) -> Iterator[tuple[Service, str, Service, str]]:
    with ExitStack() as stack:
        a, a_match = stack.enter_context(
            running(
                serve_argv(scratch / "a"),
                name="a",
                log_dir=scratch,
                ready=LISTENING,
                timeout_s=START_TIMEOUT_S,
            )
        )
        b, b_match = stack.enter_context(
            running(
                serve_argv(scratch / "b", (a_match.group(1),)),
                name="b",
                log_dir=scratch,
                ready=LISTENING,
                timeout_s=START_TIMEOUT_S,
            )
        )
        yield a, a_match.group(1), b, b_match.group(1)


def run_once(rate: float, seconds: float, observer: str) -> LagRun:
    run = LagRun(rate_target=rate, seconds_target=seconds, observer=observer)
    with temp_dir("cmdlog-lag-") as scratch, two_nodes(scratch) as (a, a_url, b, b_url):
        busy_before = machine_busy_seconds()
        before = _cpu_seconds(a, b)
        wall_before = time.monotonic()
        asyncio.run(measure(a_url, b_url, run))
        wall_s = time.monotonic() - wall_before
        used = [
            now - then for now, then in zip(_cpu_seconds(a, b), before, strict=True)
        ]
        run.a_cores, run.b_cores, run.client_cores = (cpu_s / wall_s for cpu_s in used)
        run.other_cores = max(
            0.0, (machine_busy_seconds() - busy_before - sum(used)) / wall_s
        )
    return run


def _cpu_seconds(a: Service, b: Service) -> tuple[float, float, float]:
    """Return the CPU seconds so far of A, of B, and of this script with its
    observer child (counted once the child has been joined)."""
    return (
        tree_cpu_seconds(a.process.pid),
        tree_cpu_seconds(b.process.pid),
        time.process_time() + children_cpu_seconds(),
    )


def render(runs: list[LagRun]) -> str:
    rows = [
        [
            index + 1,
            f"{run.sent:,}",
            f"{run.created:,}",
            run.failed,
            f"{run.rate:,.0f}",
            f"{run.behind_s_max * 1000:,.1f}",
            f"{run.behind_count:,}",
            f"{run.lag_ms(0.5):.1f}",
            f"{run.lag_ms(0.99):.1f}",
            f"{max(run.lags_ms, default=float('nan')):.1f}",
            f"{min(run.lags_ms, default=float('nan')):.1f}",
            f"{run.lag_ms(0.5, from_send=True):.1f}",
            f"{run.lag_ms(0.99, from_send=True):.1f}",
            run.missing,
            f"{run.other_cores:.2f}",
        ]
        for index, run in enumerate(runs)
    ]
    headers = [
        "run",
        "sent",
        "201",
        "failed",
        "achieved/s",
        "pacing behind max ms",
        "sends > 1 ms late",
        "lag p50 ms",
        "lag p99 ms",
        "lag max ms",
        "lag min ms",
        "from send p50 ms",
        "from send p99 ms",
        "missing on B",
        "other cores",
    ]
    summary = [
        ["achieved write rate, commands/s", spread([r.rate for r in runs])],
        ["lag p50, ms", spread([r.lag_ms(0.5) for r in runs], "{:.1f}")],
        ["lag p99, ms", spread([r.lag_ms(0.99) for r in runs], "{:.1f}")],
        [
            "lag max, ms",
            spread([max(r.lags_ms, default=float("nan")) for r in runs], "{:.1f}"),
        ],
        [
            "lag from send p50, ms",
            spread([r.lag_ms(0.5, from_send=True) for r in runs], "{:.1f}"),
        ],
        [
            "lag from send p99, ms",
            spread([r.lag_ms(0.99, from_send=True) for r in runs], "{:.1f}"),
        ],
        [
            "pacing behind max, ms",
            spread([r.behind_s_max * 1000 for r in runs], "{:.1f}"),
        ],
        ["cores used by A", spread([r.a_cores for r in runs], "{:.2f}")],
        ["cores used by B", spread([r.b_cores for r in runs], "{:.2f}")],
        ["cores used by the client", spread([r.client_cores for r in runs], "{:.2f}")],
        [
            "cores used by other processes",
            spread([r.other_cores for r in runs], "{:.2f}"),
        ],
    ]
    p99_ms = median(run.lag_ms(0.99) for run in runs)
    verdict = "met" if p99_ms < P99_TARGET_MS else "not met"
    return "\n".join(
        [
            table(headers, rows),
            "",
            table(["measure", "median (min–max)"], summary),
            "",
            f"target p99 < {P99_TARGET_MS:g} ms: {verdict}",
        ]
    )


def run(*, quick: bool) -> dict[str, Any]:
    """Run the full or quick scale at 1,000 commands/s; return the suite's record."""
    quiet_logging()
    count, seconds = (1, 8.0) if quick else (3, 20.0)
    runs = []
    for index in range(count):
        found = run_once(RATE_DEFAULT, seconds, "process")
        progress(
            f"lag run {index + 1}/{count}: {found.rate:,.0f} commands/s, "
            f"p99 {found.lag_ms(0.99):.1f} ms"
        )
        runs.append(found)
    p99_ms = median(found.lag_ms(0.99) for found in runs)
    return {
        "markdown": render(runs),
        "targets": [
            [
                f"replication lag p99 at {RATE_DEFAULT:,.0f} commands/s < "
                f"{P99_TARGET_MS:g} ms",
                f"{p99_ms:.1f} ms",
                "met" if p99_ms < P99_TARGET_MS else "not met",
            ]
        ],
        "data": [
            {**asdict(found), "sends": None, "lags_ms": None, "send_lags_ms": None}
            for found in runs
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs, each on new nodes")
    parser.add_argument(
        "--seconds", type=float, default=20.0, help="seconds of writing per run"
    )
    parser.add_argument(
        "--rate", type=float, default=RATE_DEFAULT, help="commands per second sent to A"
    )
    parser.add_argument(
        "--observer",
        choices=["process", "loop"],
        default="process",
        help="read B's stream in a child process (default) or in the writer's loop",
    )
    parser.add_argument("--json", type=Path, help="also write the raw runs here")
    args = parser.parse_args()
    quiet_logging()

    runs = []
    for index in range(args.runs):
        run = run_once(args.rate, args.seconds, args.observer)
        progress(
            f"run {index + 1}: {run.rate:,.0f} commands/s, lag p50 "
            f"{run.lag_ms(0.5):.1f} ms, p99 {run.lag_ms(0.99):.1f} ms"
        )
        runs.append(run)
    if args.json:
        raw = [{**asdict(run), "sends": None} for run in runs]
        args.json.write_text(json.dumps(raw))
    print(render(runs))


if __name__ == "__main__":
    main()
