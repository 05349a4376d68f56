"""A throwaway PostgreSQL cluster in a temporary directory, on 127.0.0.1 only.

`initdb` refuses to run as root, so when the benchmark runs as root the
cluster's directory is given to the `postgres` user and both `initdb` and
the server run as that user. The server keeps every default setting except
where it listens: `listen_addresses=127.0.0.1`, a free port, and its Unix
socket in the temporary directory. When the binaries are missing, Debian's
`postgresql` package is installed with apt-get.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.processes import running
from bench.report import progress
from bench.tools import apt_install

READY = re.compile(r"database system is ready to accept connections")
START_TIMEOUT_S = 60.0
INITDB_TIMEOUT_S = 120.0
SUPERUSER = "bench"


@dataclass(frozen=True, slots=True)
class Cluster:
    dsn: str
    version: str
    postmaster_pid: int
    """The server's pid, which is also its process group's ID."""
    commands: list[str]
    """The initdb and postgres command lines, for the report."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free now (another process may take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def find_bin_dir() -> Path | None:
    """Return the directory holding `postgres` and `initdb`, or None."""
    postgres = shutil.which("postgres")
    if postgres and shutil.which("initdb"):
        return Path(os.path.realpath(postgres)).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), reverse=True)
    return Path(candidates[0]).parent if candidates else None


def ensure_installed() -> Path:
    """Return the PostgreSQL bin directory, installing Debian's package if needed."""
    bin_dir = find_bin_dir()
    if bin_dir is not None:
        return bin_dir
    apt_install("postgresql")
    bin_dir = find_bin_dir()
    if bin_dir is None:
        raise RuntimeError(
            "apt-get installed postgresql but no postgres binary was found"
        )
    return bin_dir


def _run_as(user: str | None, argv: list[str]) -> None:
    subprocess.run(
        argv,
        check=True,
        timeout=INITDB_TIMEOUT_S,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        user=user,
        group=user,
        extra_groups=[] if user else None,
    )


@contextlib.contextmanager
def temporary_cluster() -> Iterator[Cluster]:
    """Create, start and finally stop and delete a PostgreSQL cluster."""
    bin_dir = ensure_installed()
    user = "postgres" if os.geteuid() == 0 else None
    root = Path(tempfile.mkdtemp(prefix="cmdlog-bench-pg-"))
    try:
        if user is not None:
            entry = pwd.getpwnam(user)
            os.chown(root, entry.pw_uid, entry.pw_gid)
        data_dir = root / "data"
        initdb = [
            str(bin_dir / "initdb"),
            "-D",
            str(data_dir),
            "-U",
            SUPERUSER,
            "-A",
            "trust",
        ]
        progress("PostgreSQL: initdb")
        _run_as(user, initdb)

        port = free_port()
        server = [
            str(bin_dir / "postgres"),
            "-D",
            str(data_dir),
            "-p",
            str(port),
            "-c",
            "listen_addresses=127.0.0.1",
            "-k",
            str(root),
        ]
        version = subprocess.run(
            [str(bin_dir / "postgres"), "--version"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        progress(f"PostgreSQL: starting {version} on 127.0.0.1:{port}")
        with running(
            server,
            name="postgres",
            log_dir=root,
            ready=READY,
            timeout_s=START_TIMEOUT_S,
            user=user,
            stop_signal=signal.SIGINT,
        ) as (service, _match):
            commands = [
                " ".join(initdb).replace(str(root), "$PGTMP"),
                " ".join(server)
                .replace(str(root), "$PGTMP")
                .replace(str(port), "$PGPORT"),
            ]
            dsn = f"postgresql://{SUPERUSER}@127.0.0.1:{port}/postgres"
            yield Cluster(
                dsn=dsn,
                version=version,
                postmaster_pid=service.process.pid,
                commands=commands,
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)
