"""Smoke tests of `cmdlog serve` as a real process."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

from cmdlog.store import DirectoryLock
from tests.nodes import NodeProcess


def post(url: str, body: dict[str, object], key: str) -> tuple[int, dict[str, object]]:
    request = urllib.request.Request(
        url + "/commands",
        data=json.dumps(body).encode(),
        headers={"Idempotency-Key": key, "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, json.loads(response.read())


def test_serve_accepts_and_drains(node: NodeProcess) -> None:
    """A node accepts a command, and SIGTERM makes it exit 0 keeping it."""
    status, view = post(
        node.url,
        {"type": "ledger.open", "payload": {"account": "a", "currency": "EUR"}},
        "k",
    )
    assert status == 201
    assert view["id"] == "k"
    assert node.terminate() == 0
    assert "server_stopped" in node.log_text()


def serve_failing(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """Run `cmdlog serve` that is expected to fail at startup; it must exit."""
    argv = [sys.executable, "-m", "cmdlog.cli", "--log-level", "warning", "serve"]
    argv += ["--data", str(tmp_path / "data"), *extra]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30)


def test_serve_exits_when_address_in_use(node: NodeProcess, tmp_path: Path) -> None:
    """A node whose address is taken says so in one line and exits 2, leaving
    its data directory unlocked, instead of hanging on its writer thread."""
    address = node.url.removeprefix("http://")
    failed = serve_failing(tmp_path, "--listen", address)
    assert failed.returncode == 2
    assert f"cmdlog: cannot listen on {address}" in failed.stderr
    assert "--listen" in failed.stderr
    assert "Traceback" not in failed.stderr
    DirectoryLock(tmp_path / "data").release()


def test_serve_exits_on_bad_peer_url(tmp_path: Path) -> None:
    """A --peer that is not an http(s) URL stops the node at startup."""
    failed = serve_failing(tmp_path, "--listen", "127.0.0.1:0", "--peer", "127.0.0.1:9")
    assert failed.returncode == 2
    assert "cmdlog: peer URL '127.0.0.1:9'" in failed.stderr
