"""Tests of the LMDB store: crash safety, map growth, stale readers, versions."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from cmdlog.app import App
from cmdlog.apps.ledger import ledger
from cmdlog.cli import main
from cmdlog.config import FORMAT_VERSION, StoreConfig
from cmdlog.database import Database
from cmdlog.engine import prepare_submission
from cmdlog.errors import StartupError, VersionMismatch
from cmdlog.replay import replay
from cmdlog.store import Store

APP = App([ledger])
ROOT = Path(__file__).resolve().parent.parent


def run_and_kill(path: Path, *, run_s: float) -> list[str]:
    """Start the crash child, let it commit for `run_s`, SIGKILL it, and return
    the IDs it reported as committed."""
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.crash_child", str(path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == b"ready"
    os.set_blocking(child.stdout.fileno(), False)
    output = b""
    deadline = time.monotonic() + run_s
    while time.monotonic() < deadline:
        time.sleep(0.01)
        output += child.stdout.read() or b""
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=10)
    output += child.stdout.read() or b""
    child.stdout.close()
    # The last line may be cut short by the kill; only complete lines count.
    lines = output.decode().split("\n")
    return [line for line in lines[:-1] if line]


def assert_consistent(path: Path, reported: list[str]) -> None:
    db = Database(path, APP)
    try:
        missing = [command_id for command_id in reported if db.view(command_id) is None]
        assert missing == []
        status = db.status()
        assert status.applied == status.commands
        assert status.log_entries == status.commands
    finally:
        db.close()
    report = replay(path, APP)
    assert report.matches


def test_sigkill_keeps_reported_commands(tmp_path: Path) -> None:
    """A writer killed with SIGKILL mid-stream keeps every command it reported
    and no half-applied one."""
    reported = run_and_kill(tmp_path, run_s=1.5)
    assert len(reported) > 100
    assert_consistent(tmp_path, reported)


@pytest.mark.slow
def test_sigkill_repeated(tmp_path: Path) -> None:
    """Ten kill-and-reopen cycles on one store lose nothing that was reported."""
    reported: list[str] = []
    for cycle in range(10):
        reported += run_and_kill(tmp_path, run_s=0.5 + 0.1 * cycle)
        assert_consistent(tmp_path, reported)


def test_map_grows_from_tiny(tmp_path: Path) -> None:
    """Appends into a 64 KiB map grow it without an error reaching the caller."""
    config = StoreConfig(map_bytes_initial=64 * 1024, durable=False)
    db = Database(tmp_path, APP, store_config=config)
    opened = prepare_submission(
        APP, "open", "ledger.open", {"account": "a", "currency": "EUR"}
    )
    db.submit([opened])
    ids = []
    with capture_logs() as events:
        for _ in range(40):
            batch = [
                prepare_submission(
                    APP,
                    str(uuid.uuid4()),
                    "ledger.deposit",
                    {"account": "a", "amount": 1},
                )
                for _ in range(100)
            ]
            db.submit(batch)
            ids += [submission.id for submission in batch]
    assert db.store.map_bytes() > 64 * 1024
    assert any(event["event"] == "map_grown" for event in events)
    assert db.status().commands == len(ids) + 1
    assert db.query("ledger.balance", {"account": "a"})["balance"] == len(ids)
    assert all(db.view(command_id) is not None for command_id in ids[::97])
    db.close()


def start_lmdb_child(path: Path, *, read: bool) -> subprocess.Popen[str]:
    """Start a process that opens the store (and a read transaction) and waits."""
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import lmdb, sys, time\n"
            "env = lmdb.open(sys.argv[1], max_dbs=64)\n"
            "txn = env.begin() if sys.argv[2] == 'read' else None\n"
            "print('open', flush=True)\n"
            "time.sleep(60)\n",
            str(path),
            "read" if read else "idle",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "open"
    return child


def stop_child(child: subprocess.Popen[str]) -> None:
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=10)
    if child.stdout is not None:
        child.stdout.close()


def test_stale_reader_cleared_at_open(tmp_path: Path) -> None:
    """A reader slot left by a process killed inside a read is cleared at open."""
    Database(tmp_path, APP).close()
    # LMDB resets the reader table when the first process opens the lock
    # file, so a second process keeps the environment open meanwhile.
    keeper = start_lmdb_child(tmp_path, read=False)
    reader = start_lmdb_child(tmp_path, read=True)
    stop_child(reader)
    try:
        with capture_logs() as events:
            store = Store(tmp_path, ["ledger"])
        store.close()
    finally:
        stop_child(keeper)
    cleared = [event for event in events if event["event"] == "stale_readers_cleared"]
    assert cleared
    assert cleared[0]["count"] >= 1


def test_unknown_format_version_refused(tmp_path: Path) -> None:
    """A data directory written by another format version is refused, naming both."""
    store = Store(tmp_path, ["ledger"])
    store.write(lambda txn: txn.meta_put("format_version", 99))
    store.close()
    with pytest.raises(VersionMismatch) as raised:
        Store(tmp_path, ["ledger"])
    assert "99" in raised.value.message
    assert f"version {FORMAT_VERSION}" in raised.value.message


LOCK_HOLDER = """
import sys, time
from cmdlog.store import Store
store = Store(sys.argv[1], ["ledger"])
print("ready", flush=True)
time.sleep(60)
"""


def test_second_store_on_directory_rejected(tmp_path: Path) -> None:
    """A second writable store on one directory is rejected, and the directory
    is free again once the first is closed."""
    first = Store(tmp_path, ["ledger"])
    with pytest.raises(StartupError) as raised:
        Store(tmp_path, ["ledger"])
    assert "in use by another process" in raised.value.message
    assert f"pid {os.getpid()}" in raised.value.message
    first.close()
    Store(tmp_path, ["ledger"]).close()


def test_killed_holder_leaves_no_stale_lock(tmp_path: Path) -> None:
    """A node killed with SIGKILL leaves a directory the next node can open."""
    child = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(tmp_path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == b"ready"
        with pytest.raises(StartupError) as raised:
            Store(tmp_path, ["ledger"])
        assert f"pid {child.pid}" in raised.value.message
    finally:
        child.kill()
        child.wait(timeout=10)
        if child.stdout is not None:
            child.stdout.close()
    Store(tmp_path, ["ledger"]).close()


def test_replay_rejected_while_node_open(tmp_path: Path) -> None:
    """Replay rejects a directory locked by a live node, and runs once it closes."""
    db = Database(tmp_path, APP, store_config=StoreConfig(durable=False))
    db.submit(
        [
            prepare_submission(
                APP, "k", "ledger.open", {"account": "a", "currency": "EUR"}
            )
        ]
    )
    with pytest.raises(StartupError) as raised:
        replay(tmp_path, APP)
    assert "stop that process first" in raised.value.message
    db.close()
    assert replay(tmp_path, APP).matches


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("nosuch:app", "cmdlog: --app nosuch:app: cannot import nosuch"),
        (
            "cmdlog.apps.example:nope",
            "cmdlog: --app cmdlog.apps.example:nope: cmdlog.apps.example has no "
            "attribute 'nope'",
        ),
        ("cmdlog.apps.example", "cmdlog: --app must look like MODULE:ATTR"),
    ],
)
def test_replay_bad_app_exits_2(
    tmp_path: Path, spec: str, expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """An --app that cannot be loaded exits 2 with one `cmdlog:` line, never 1,
    which replay keeps for digests that differ."""
    Store(tmp_path, ["ledger"]).close()
    assert main(["replay", "--data", str(tmp_path), "--app", spec]) == 2
    assert capsys.readouterr().err.startswith(expected)


def test_failed_open_releases_lock(tmp_path: Path) -> None:
    """A store that fails to open (another format version) gives the lock back."""
    store = Store(tmp_path, ["ledger"])
    store.write(lambda txn: txn.meta_put("format_version", 99))
    store.close()
    with pytest.raises(VersionMismatch):
        Store(tmp_path, ["ledger"])
    with pytest.raises(VersionMismatch):
        Store(tmp_path, ["ledger"])
