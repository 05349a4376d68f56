"""Tests of `cmdlog identity`: showing and regenerating a stopped node's IDs."""

from __future__ import annotations

from pathlib import Path

import pytest

from cmdlog.app import App
from cmdlog.cli import main
from cmdlog.database import Database
from cmdlog.model import Command
from cmdlog.store import Store

COMMAND = Command(
    "open-1", "ledger.open", {"account": "a1", "currency": "EUR"}, 1 << 16, "0a1b"
)


@pytest.fixture
def data_dir(tmp_path: Path, ledger_app: App) -> Path:
    """A stopped node's directory with one command from a peer in its log."""
    path = tmp_path / "node"
    database = Database(path, ledger_app)
    database.ingest([COMMAND])
    database.close()
    return path


def identity_of(path: Path, app: App) -> tuple[str, str]:
    database = Database(path, app)
    try:
        return database.node_id, database.log_instance
    finally:
        database.close()


def test_identity_prints_stored(
    data_dir: Path, ledger_app: App, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --regenerate, the command prints the stored IDs and changes nothing."""
    node_id, log_instance = identity_of(data_dir, ledger_app)
    capsys.readouterr()  # the log lines of opening the database
    assert main(["identity", "--data", str(data_dir)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"node ID       {node_id}",
        f"log instance  {log_instance}",
    ]
    assert identity_of(data_dir, ledger_app) == (node_id, log_instance)


def test_identity_regenerate_keeps_commands(
    data_dir: Path, ledger_app: App, capsys: pytest.CaptureFixture[str]
) -> None:
    """--regenerate stores a new node ID and log instance and keeps the log,
    each command with its origin."""
    node_id, log_instance = identity_of(data_dir, ledger_app)
    capsys.readouterr()  # the log lines of opening the database
    assert main(["identity", "--data", str(data_dir), "--regenerate"]) == 0
    printed = capsys.readouterr().out.splitlines()
    new_node_id, new_log_instance = identity_of(data_dir, ledger_app)
    database = Database(data_dir, ledger_app)
    try:
        view = database.view(COMMAND.id)
    finally:
        database.close()

    assert printed == [
        f"node ID       {node_id} -> {new_node_id}",
        f"log instance  {log_instance} -> {new_log_instance}",
    ]
    assert new_node_id != node_id
    assert new_log_instance != log_instance
    assert len(new_node_id) == len(node_id)
    assert view is not None
    assert view[0] == COMMAND


def test_identity_rejected_while_node_runs(
    data_dir: Path, ledger_app: App, capsys: pytest.CaptureFixture[str]
) -> None:
    """A directory locked by a running process is left as it is, with exit 2."""
    node_id, _log_instance = identity_of(data_dir, ledger_app)
    live = Store(data_dir, ["ledger"])
    try:
        code = main(["identity", "--data", str(data_dir), "--regenerate"])
    finally:
        live.close()
    assert code == 2
    assert "in use by another process" in capsys.readouterr().err
    assert identity_of(data_dir, ledger_app)[0] == node_id


def test_identity_missing_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A directory without cmdlog data is an error, and is not created."""
    missing = tmp_path / "none"
    assert main(["identity", "--data", str(missing), "--regenerate"]) == 2
    assert "no cmdlog data" in capsys.readouterr().err
    assert not missing.exists()
