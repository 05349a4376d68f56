"""Child processes of the benchmarks, each in its own process group.

Every service starts in a new session, so stopping it signals every
process still in its group, and a service that ignores the signal is
killed. PostgreSQL backends leave the group (they call setsid()), and the
postmaster stops them itself when it is signalled. A service's stdout and
stderr go to files in a temporary directory, and a service is
ready when a line matching its pattern appears in one of them.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

STOP_TIMEOUT_S = 20.0
POLL_INTERVAL_S = 0.05
LOG_TAIL_BYTES = 2_000


@dataclass(slots=True)
class Service:
    name: str
    process: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path

    def output(self) -> str:
        return self.stdout_path.read_text(
            errors="replace"
        ) + self.stderr_path.read_text(errors="replace")

    def tail(self) -> str:
        text = self.stderr_path.read_text(errors="replace")
        return text[-LOG_TAIL_BYTES:]


def start_service(
    argv: Sequence[str],
    *,
    name: str,
    log_dir: Path,
    ready: re.Pattern[str],
    timeout_s: float,
    cwd: Path | None = None,
    user: str | None = None,
) -> tuple[Service, re.Match[str]]:
    """Start `argv` in a new session and wait until its output matches `ready`.

    Raises RuntimeError, after stopping it, when the process exits or the
    pattern does not appear within `timeout_s`.
    """
    stdout_path = log_dir / f"{name}.stdout"
    stderr_path = log_dir / f"{name}.stderr"
    with open(stdout_path, "wb") as stdout, open(stderr_path, "wb") as stderr:
        process = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            cwd=cwd,
            start_new_session=True,
            user=user,
            group=user,
            extra_groups=[] if user else None,
        )
    service = Service(name, process, stdout_path, stderr_path)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            match = ready.search(service.output())
            if match:
                return service, match
            if process.poll() is not None:
                raise RuntimeError(
                    f"{name} exited with status {process.returncode} before it was "
                    f"ready; its stderr ends with:\n{service.tail()}"
                )
            time.sleep(POLL_INTERVAL_S)
        raise RuntimeError(
            f"{name} printed no line matching {ready.pattern!r} within {timeout_s} s; "
            f"its stderr ends with:\n{service.tail()}"
        )
    except BaseException:
        stop_service(service)
        raise


def stop_service(service: Service, *, signum: int = signal.SIGTERM) -> int | None:
    """Signal the service's process group, wait, and kill the group if it lingers."""
    process = service.process
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signum)
    try:
        return process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=STOP_TIMEOUT_S)
        return None


@contextlib.contextmanager
def running(
    argv: Sequence[str],
    *,
    name: str,
    log_dir: Path,
    ready: re.Pattern[str],
    timeout_s: float,
    cwd: Path | None = None,
    user: str | None = None,
    stop_signal: int = signal.SIGTERM,
) -> Iterator[tuple[Service, re.Match[str]]]:
    """Run a service for the duration of the `with` block."""
    service, match = start_service(
        argv,
        name=name,
        log_dir=log_dir,
        ready=ready,
        timeout_s=timeout_s,
        cwd=cwd,
        user=user,
    )
    try:
        yield service, match
    finally:
        stop_service(service, signum=stop_signal)


def run_bounded(
    argv: Sequence[str], *, timeout_s: float, cwd: Path | None = None
) -> str:
    """Run a command in its own process group; return its stdout.

    Raises RuntimeError when it fails or outlives `timeout_s` (after killing
    its group).
    """
    process = subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=cwd,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise RuntimeError(
            f"{argv[0]} ran longer than {timeout_s} s and was killed"
        ) from None
    if process.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} exited with status {process.returncode}: "
            f"{stderr.decode(errors='replace')[-LOG_TAIL_BYTES:]}"
        )
    return stdout.decode(errors="replace")
