"""Real `cmdlog serve` processes on 127.0.0.1 for tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

STARTUP_TIMEOUT_S = 20.0
_LISTENING = re.compile(r"cmdlog listening on (https?://\S+)")


class NodeProcess:
    """One `cmdlog serve` child process with its own data directory."""

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int = 0,
        peers: tuple[str, ...] = (),
        token: str | None = None,
        extra_args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        app: str | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.port = port
        self.peers = peers
        self.token = token
        self.extra_args = extra_args
        self.env = env or {}
        self.app = app
        self.url = ""
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir.parent / f"{data_dir.name}.log"
        self._log: IO[bytes] | None = None

    def start(self) -> NodeProcess:
        args = [
            sys.executable,
            "-m",
            "cmdlog.cli",
            "serve",
            "--data",
            str(self.data_dir),
            "--listen",
            f"127.0.0.1:{self.port}",
            *self.extra_args,
        ]
        for peer in self.peers:
            args += ["--peer", peer]
        if self.app:
            args += ["--app", self.app]
        env = {**os.environ, **self.env}
        env.pop("CMDLOG_TOKEN", None)
        if self.token:
            env["CMDLOG_TOKEN"] = self.token
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in wait()
        self.process = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=self._log, env=env
        )
        self.url = self._await_listening()
        self.port = int(self.url.rsplit(":", 1)[1])
        return self

    def _await_listening(self) -> str:
        assert self.process is not None and self.process.stdout is not None
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            line = self.process.stdout.readline().decode()
            if not line:
                break
            match = _LISTENING.search(line)
            if match:
                return match.group(1)
        self.process.kill()
        self.process.wait()
        raise RuntimeError(
            f"node did not start; its log:\n{self.log_path.read_text()[-3000:]}"
        )

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def kill(self) -> int:
        """SIGKILL the process and return its exit code."""
        self.signal(signal.SIGKILL)
        return self.wait()

    def terminate(self, timeout_s: float = 30.0) -> int:
        """SIGTERM the process and return its exit code."""
        self.signal(signal.SIGTERM)
        return self.wait(timeout_s)

    def wait(self, timeout_s: float = 30.0) -> int:
        assert self.process is not None
        code = self.process.wait(timeout=timeout_s)
        if self.process.stdout is not None:
            self.process.stdout.close()
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")
