"""The systems under HTTP load: how each one starts, counts and spends CPU.

Every system runs as one fresh process on 127.0.0.1 with a free port and
prints the URL it listens on. cmdlog gets a new data directory, and its
1,000 accounts are opened in one batch before the load starts. The
PostgreSQL service gets new tables (`--reset`) in the shared temporary
cluster.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.cpu_time import CpuReading, thread_cpu_seconds, tree_cpu_seconds
from bench.postgres import Cluster
from bench.processes import running
from bench.workload import ACCOUNTS, account_name

REPO = Path(__file__).resolve().parent.parent
SERVICE_START_TIMEOUT_S = 60.0
HTTP_TIMEOUT_S = 30.0
SETTLE_INTERVAL_S = 0.2
SETTLE_TIMEOUT_S = 10.0

CMDLOG = "cmdlog"
CMDLOG_QUIET = "cmdlog, --log-level warning"
CMDLOG_HEALTHZ = "cmdlog, GET /healthz"
PG = "pg_service"
BARE = "bare_aiohttp"
CMDLOG_SYSTEMS = (CMDLOG, CMDLOG_QUIET, CMDLOG_HEALTHZ)
LISTENING = {
    CMDLOG: re.compile(r"cmdlog listening on (http://\S+)"),
    PG: re.compile(r"pg_service listening on (http://\S+)"),
    BARE: re.compile(r"bare_aiohttp listening on (http://\S+)"),
}


@dataclass(frozen=True, slots=True)
class RunningSystem:
    base_url: str
    pid: int
    stored: Callable[[], int] | None
    """A reader of the system's count of stored commands, or None if it stores none."""
    cpu: Callable[[], CpuReading]
    commits: Callable[[], int] | None
    """A reader of cmdlog's count of durable group commits, None for the peers."""


def http_json(url: str, body: Any = None) -> Any:
    """Send a GET to `url`, or POST `body` as JSON, and return the decoded response."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:
        return json.load(response)


def open_accounts(base_url: str) -> None:
    """Open every benchmark account on a cmdlog node in one batch, checking each."""
    items = [
        {
            "id": f"open-{index}",
            "type": "ledger.open",
            "payload": {"account": account_name(index), "currency": "EUR"},
        }
        for index in range(ACCOUNTS)
    ]
    answer = http_json(base_url + "/commands/batch", items)
    statuses = Counter(result["status"] for result in answer["results"])
    if statuses != Counter({201: ACCOUNTS}):
        raise RuntimeError(f"opening accounts returned statuses {dict(statuses)}")


def settled_count(read: Callable[[], int]) -> int:
    """Read a count until two reads `SETTLE_INTERVAL_S` apart agree, and return it.

    A server may still be committing the requests that wrk had in flight
    when it stopped. Raises RuntimeError when the count still changes
    after `SETTLE_TIMEOUT_S`.
    """
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    last = read()
    while time.monotonic() < deadline:
        time.sleep(SETTLE_INTERVAL_S)
        current = read()
        if current == last:
            return current
        last = current
    raise RuntimeError(
        f"the stored count still changed after {SETTLE_TIMEOUT_S} s (last {last})"
    )


def _stored_commands(base_url: str) -> int:
    return int(http_json(base_url + "/status")["commands"])


def _cmdlog_commits(base_url: str) -> int:
    """Return the `cmdlog_commits_total` counter from a node's /metrics."""
    url = base_url + "/metrics"
    with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as response:
        text = response.read().decode()
    for line in text.splitlines():
        if line.startswith("cmdlog_commits_total "):
            return int(float(line.split()[1]))
    raise RuntimeError(f"{url} has no cmdlog_commits_total line")


def service_argv(system: str, *, data_dir: Path, cluster: Cluster) -> list[str]:
    """Return the command line that starts `system`."""
    python = sys.executable
    if system in CMDLOG_SYSTEMS:
        level = ["--log-level", "warning"] if system == CMDLOG_QUIET else []
        return [
            *(python, "-m", "cmdlog.cli", *level, "serve"),
            *("--data", str(data_dir), "--listen", "127.0.0.1:0"),
        ]
    if system == PG:
        return [
            *(python, "-m", "bench.peers.pg_service", "--dsn", cluster.dsn),
            *("--listen", "127.0.0.1:0", "--reset"),
        ]
    return [python, "-m", "bench.peers.bare_aiohttp", "--listen", "127.0.0.1:0"]


def command_template(argv: list[str], *, scratch: Path, cluster: Cluster) -> str:
    """Return `argv` as a shell line with temporary paths and the DSN as $NAMES."""
    command = " ".join(argv).replace(sys.executable, "python")
    command = command.replace(cluster.dsn, "$PG_DSN")
    return re.sub(re.escape(str(scratch)) + r"/\S*", "$TMP/DIR", command)


@contextlib.contextmanager
def started_system(
    system: str,
    *,
    scratch: Path,
    cluster: Cluster,
    commands: dict[str, str],
) -> Iterator[RunningSystem]:
    """Run a fresh `system` for the duration of the `with` block.

    Records its command line in `commands` under the system's name.
    """
    prefix = re.sub(r"\W+", "-", system) + "-"
    run_dir = Path(tempfile.mkdtemp(prefix=prefix, dir=scratch))
    try:
        argv = service_argv(system, data_dir=run_dir / "data", cluster=cluster)
        commands[system] = command_template(argv, scratch=scratch, cluster=cluster)
        ready = LISTENING[CMDLOG if system in CMDLOG_SYSTEMS else system]
        with running(
            argv,
            name="service",
            log_dir=run_dir,
            ready=ready,
            timeout_s=SERVICE_START_TIMEOUT_S,
            cwd=REPO,
        ) as (service, match):
            base_url = match.group(1)
            pid = service.process.pid
            if system in CMDLOG_SYSTEMS:
                open_accounts(base_url)
            database_pid = cluster.postmaster_pid if system == PG else None

            def cpu() -> CpuReading:
                tree_s = tree_cpu_seconds(pid)
                if database_pid is not None:
                    tree_s += tree_cpu_seconds(database_pid)
                return CpuReading(
                    tree_s, thread_cpu_seconds(pid), thread_cpu_seconds(pid, pid)
                )

            counts = system in (CMDLOG, CMDLOG_QUIET, PG)
            stored = (lambda: _stored_commands(base_url)) if counts else None
            is_cmdlog = system in CMDLOG_SYSTEMS
            commits = (lambda: _cmdlog_commits(base_url)) if is_cmdlog else None
            yield RunningSystem(base_url, pid, stored, cpu, commits)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
