"""Upgrading a store of format 1, written by an older release, to format 2.

The fixture in tests/data was written by the release before format 2 (see
tests/data/make_store_v1.py), and its JSON contains what that release read
back.
"""

from __future__ import annotations

import json
import logging
import tarfile
from pathlib import Path
from typing import Any

import lmdb
import pytest
import structlog
from structlog.testing import LogCapture

from cmdlog import codec, store
from cmdlog.apps.example import app
from cmdlog.cli import main
from cmdlog.config import FORMAT_VERSION
from cmdlog.database import Database
from cmdlog.engine import prepare_submission
from cmdlog.errors import VersionMismatch
from cmdlog.replay import replay
from cmdlog.store import Store

DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture
def v1_dir(tmp_path: Path) -> Path:
    with tarfile.open(DATA / "store-v1.tar.gz") as archive:
        archive.extractall(tmp_path / "v1", filter="data")
    return tmp_path / "v1"


def _expected() -> dict[str, Any]:
    return json.loads((DATA / "store-v1.json").read_text())  # type: ignore[no-any-return]


def _raw_meta(path: Path, name: str) -> Any:
    env = lmdb.open(str(path), max_dbs=64, readonly=True, lock=False)
    try:
        with env.begin() as txn:
            data = txn.get(name.encode(), db=env.open_db(b"meta", txn=txn))
            names = {key for key, _value in txn.cursor()}
    finally:
        env.close()
    return (None if data is None else codec.unpack(data)), names


def _assert_reads_as_v1_did(path: Path) -> None:
    expected = _expected()
    db = Database(path, app)
    try:
        for command_id, view in expected["views"].items():
            found = db.view(command_id)
            if view is None:
                assert found is None, command_id
            else:
                assert found is not None, command_id
                assert [list(found[0]), list(found[1])] == [
                    view["command"],
                    view["outcome"],
                ], command_id
        status = db.status()
        for name, value in expected["status"].items():
            assert getattr(status, name) == value, name
    finally:
        db.close()


def test_v1_store_upgrades_in_place(
    v1_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every ID reads as the old release read it, the digests stay, the old
    index is gone, and replay agrees with the upgraded store."""
    assert _raw_meta(v1_dir, "format_version")[0] == 1
    # A logger of its own: in-process CLI tests may have set a level above info.
    capture = LogCapture()
    monkeypatch.setattr(
        store,
        "log",
        structlog.wrap_logger(
            None,
            processors=[capture],
            wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        ),
    )
    _assert_reads_as_v1_did(v1_dir)
    upgraded = [e for e in capture.entries if e["event"] == "store_upgraded"]
    assert [e["version"] for e in upgraded] == [2]

    version, names = _raw_meta(v1_dir, "format_version")
    assert version == FORMAT_VERSION == 2
    assert b"ids" not in names
    assert b"id_seqs" in names
    assert replay(v1_dir, app).matches


def _cut_upgrade_short(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Open the store of `path` for an upgrade that stops, as after a crash,
    once two commits of two IDs each have moved."""
    monkeypatch.setattr(store, "_UPGRADE_CHUNK_ENTRIES", 2)
    real_write = Store.write
    commits = 0

    def failing_write(self: Store, work: Any) -> Any:
        nonlocal commits
        if commits == 2:
            raise OSError("simulated crash")
        commits += 1
        return real_write(self, work)

    monkeypatch.setattr(Store, "write", failing_write)
    with pytest.raises(OSError, match="simulated crash"):
        Store(path, list(app.domains))
    monkeypatch.setattr(Store, "write", real_write)


def test_upgrade_cut_short_goes_on(
    v1_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upgrade that stops between its commits, as after a crash, leaves
    format 1 with its progress recorded; the next open finishes it."""
    _cut_upgrade_short(v1_dir, monkeypatch)

    version, _names = _raw_meta(v1_dir, "format_version")
    after, _names = _raw_meta(v1_dir, "upgrade_ids_after")
    assert version == 1
    assert after is not None  # two chunks of two IDs moved, more to go

    _assert_reads_as_v1_did(v1_dir)
    assert _raw_meta(v1_dir, "upgrade_ids_after")[0] is None


def test_upgrade_restarts_after_v1_writes(
    v1_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store whose upgrade was cut short is still format 1, so the older
    release runs on it after a rollback, and puts new IDs into `ids` behind
    the point the upgrade reached. The next upgrade moves those too: the
    command is found, and its retry takes no effect a second time."""
    _cut_upgrade_short(v1_dir, monkeypatch)
    deposit = ("a-v1", "ledger.deposit", {"account": "a", "amount": 1})

    # Emulate the older release: it skips the upgrade and writes the format-1
    # ID index. The upgrade reads only the seq of each entry.
    def v1_ids(txn: store.Txn) -> Any:
        return txn._store.env.open_db(b"ids", txn=txn.raw, create=False)

    def v1_id_get(txn: store.Txn, command_id: str) -> int | None:
        data = txn.raw.get(command_id.encode(), db=v1_ids(txn))
        return None if data is None else int(codec.unpack(data)[0])

    def v1_id_put(
        txn: store.Txn, command_id: str, seq: int, *, overwrite: bool = True
    ) -> bool:
        value = codec.pack([seq, b"", 0, ""])
        stored: bool = txn.raw.put(
            command_id.encode(), value, db=v1_ids(txn), overwrite=overwrite
        )
        return stored

    with monkeypatch.context() as v1:
        v1.setattr(Store, "_check_format", lambda self, **_flags: None)
        v1.setattr(store.Txn, "id_get", v1_id_get)
        v1.setattr(store.Txn, "id_put", v1_id_put)
        db = Database(v1_dir, app)
        try:
            assert db.submit([prepare_submission(app, *deposit)])[0].created
        finally:
            db.close()
    assert _raw_meta(v1_dir, "format_version")[0] == 1

    db = Database(v1_dir, app)
    try:
        assert db.view("a-v1") is not None
        assert not db.submit([prepare_submission(app, *deposit)])[0].created
        assert db.status().commands == _expected()["status"]["commands"] + 1
    finally:
        db.close()
    assert replay(v1_dir, app).matches


def test_read_only_open_of_v1_names_the_fix(v1_dir: Path) -> None:
    """A read-only open (replay, status of a stopped node) cannot upgrade, so
    its error names the command that does."""
    with pytest.raises(VersionMismatch) as raised:
        Store(v1_dir, list(app.domains), readonly=True)
    assert "version 1" in raised.value.message
    assert "cmdlog serve" in raised.value.message


@pytest.mark.parametrize("command", ["identity", "peers"])
def test_cli_leaves_v1_store_as_is(
    v1_dir: Path, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Commands on a stopped node's directory do not upgrade it, because the
    upgrade cannot be undone; they exit 2 and name `cmdlog serve`."""
    assert main([command, "--data", str(v1_dir)]) == 2
    assert "cmdlog serve" in capsys.readouterr().err
    assert _raw_meta(v1_dir, "format_version")[0] == 1


def test_index_maps_ids_to_seqs(tmp_path: Path) -> None:
    """The ID index maps each ID, as UTF-8, to its 8-byte sequence number
    and nothing else, whatever the ID's length."""
    long_id = "k" * 200
    db = Database(tmp_path, app)
    try:
        db.submit(
            [
                prepare_submission(
                    app, key, "ledger.open", {"account": key[:40], "currency": "EUR"}
                )
                for key in ("short", long_id)
            ]
        )
        with db.store.read() as txn:
            cursor = txn.raw.cursor(db=db.store._dbs["id_seqs"])
            entries = dict(cursor.iternext())
    finally:
        db.close()
    assert set(entries) == {b"short", long_id.encode()}
    assert {len(value) for value in entries.values()} == {8}
    assert sorted(int.from_bytes(v, "big") for v in entries.values()) == [1, 2]
