"""Local clusters: `cmdlog serve` child processes on 127.0.0.1.

Used by `cmdlog demo` and the benchmarks. Each node gets its own data
directory and an ephemeral port, read back from the line the server
prints once it listens. Every process started here is killed by `stop`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

STARTUP_TIMEOUT_S = 30.0
_LISTENING = re.compile(rb"cmdlog listening on (https?://\S+)")


@dataclass
class LocalNode:
    """One child `cmdlog serve` process."""

    name: str
    data_dir: Path
    process: asyncio.subprocess.Process
    url: str
    log_path: Path


@dataclass
class LocalCluster:
    """Starts and stops `cmdlog serve` processes under one directory."""

    root: Path
    app_spec: str | None = None
    nodes: list[LocalNode] = field(default_factory=list)

    async def start_node(
        self, name: str, *, peers: tuple[str, ...] = (), extra: tuple[str, ...] = ()
    ) -> LocalNode:
        data_dir = self.root / name
        log_path = self.root / f"{name}.log"
        args = [
            sys.executable, "-m", "cmdlog.cli", "--log-level", "warning", "serve",
            "--data", str(data_dir), "--listen", "127.0.0.1:0", *extra,
        ]  # fmt: skip
        for peer in peers:
            args += ["--peer", peer]
        if self.app_spec:
            args += ["--app", self.app_spec]
        env = {**os.environ}
        env.pop("CMDLOG_TOKEN", None)
        with open(log_path, "ab") as log_file:
            process = await asyncio.create_subprocess_exec(
                *args,
                stdout=asyncio.subprocess.PIPE,
                stderr=log_file,
                env=env,
                start_new_session=True,
            )
        url = await self._await_listening(process, log_path)
        node = LocalNode(name, data_dir, process, url, log_path)
        self.nodes.append(node)
        log.info("local_node_started", name=name, url=url)
        return node

    async def _await_listening(
        self, process: asyncio.subprocess.Process, log_path: Path
    ) -> str:
        assert process.stdout is not None
        try:
            async with asyncio.timeout(STARTUP_TIMEOUT_S):
                while line := await process.stdout.readline():
                    match = _LISTENING.search(line)
                    if match:
                        return match.group(1).decode()
        except TimeoutError:
            pass
        process.kill()
        await process.wait()
        tail = log_path.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"a cmdlog node did not start; its log ends:\n{tail}")

    async def stop(self) -> None:
        """SIGTERM every node, then SIGKILL whatever is still running."""
        for node in self.nodes:
            if node.process.returncode is None:
                node.process.send_signal(signal.SIGTERM)
        for node in self.nodes:
            try:
                async with asyncio.timeout(15):
                    await node.process.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(node.process.pid, signal.SIGKILL)
                await node.process.wait()
