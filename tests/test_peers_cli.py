"""Tests of `cmdlog peers`: listing and forgetting a stopped node's peers."""

from __future__ import annotations

from pathlib import Path

import pytest

from cmdlog.cli import main
from cmdlog.store import Store, Txn

LEARNED = "http://127.0.0.1:7102"
CONFIGURED = "http://127.0.0.1:7101"


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A stopped node's directory with two stored peers."""
    store = Store(tmp_path, ["ledger"])

    def put(txn: Txn) -> None:
        txn.peer_put(CONFIGURED, {"node": "aa01", "instance": "i1", "cursor": 40})
        txn.peer_put(LEARNED, {"node": None, "instance": None, "cursor": 0})

    store.write(put)
    store.close()
    return tmp_path


def stored_peers(path: Path) -> dict[str, dict[str, object]]:
    store = Store(path, ["ledger"], readonly=True)
    with store.read() as txn:
        peers = txn.peers()
    store.close()
    return peers


def test_peers_lists_stored(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["peers", "--data", str(data_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        f"{CONFIGURED}  node=aa01  cursor=40",
        f"{LEARNED}  node=-  cursor=0",
    ]


def test_peers_forget_removes_one(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["peers", "--data", str(data_dir), "--forget", LEARNED + "/"]) == 0
    assert capsys.readouterr().out == f"forgot {LEARNED}\n"
    assert list(stored_peers(data_dir)) == [CONFIGURED]


def test_peers_forget_unknown_url(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["peers", "--data", str(data_dir), "--forget", "http://127.0.0.1:9"])
    assert code == 1
    message = capsys.readouterr().err
    assert "is not a stored peer" in message
    assert CONFIGURED in message
    assert len(stored_peers(data_dir)) == 2


def test_peers_rejected_while_node_runs(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    live = Store(data_dir, ["ledger"])
    try:
        code = main(["peers", "--data", str(data_dir), "--forget", LEARNED])
    finally:
        live.close()
    assert code == 2
    assert "in use by another process" in capsys.readouterr().err
    assert len(stored_peers(data_dir)) == 2


def test_peers_missing_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["peers", "--data", str(tmp_path / "none")]) == 2
    assert "no cmdlog data" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


def test_peers_none_stored(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """With no peers stored, listing prints that none are stored, and
    forgetting reports that there is nothing to forget."""
    Store(tmp_path, ["ledger"]).close()
    assert main(["peers", "--data", str(tmp_path)]) == 0
    assert capsys.readouterr().out == f"no peers stored in {tmp_path}\n"
    assert main(["peers", "--data", str(tmp_path), "--forget", LEARNED]) == 1
    assert "(it stores none); there is nothing to forget" in capsys.readouterr().err
