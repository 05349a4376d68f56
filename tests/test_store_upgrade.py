"""Upgrading a store of format 1 or 2, written by an older release, to the
current format.

The fixtures in tests/data were written by the last release of each format
(see tests/data/make_store.py), and each JSON contains what that release
read back.
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
from cmdlog.config import FORMAT_VERSION, StoreConfig
from cmdlog.database import Database
from cmdlog.engine import prepare_submission
from cmdlog.errors import VersionMismatch
from cmdlog.generations import generation_prefix
from cmdlog.replay import replay
from cmdlog.store import Store

DATA = Path(__file__).resolve().parent / "data"
PROGRESS = {1: "upgrade_ids_after", 2: "upgrade_generations_after"}
"""The meta entry recording how far the first upgrade step from each format got."""


@pytest.fixture(params=[1, 2], ids=["v1", "v2"])
def version(request: pytest.FixtureRequest) -> int:
    return int(request.param)


@pytest.fixture
def old_dir(tmp_path: Path, version: int) -> Path:
    with tarfile.open(DATA / f"store-v{version}.tar.gz") as archive:
        archive.extractall(tmp_path / "old", filter="data")
    return tmp_path / "old"


def _expected(version: int) -> dict[str, Any]:
    return json.loads((DATA / f"store-v{version}.json").read_text())  # type: ignore[no-any-return]


def _raw_meta(path: Path, name: str) -> Any:
    env = lmdb.open(str(path), max_dbs=64, readonly=True, lock=False)
    try:
        with env.begin() as txn:
            data = txn.get(name.encode(), db=env.open_db(b"meta", txn=txn))
            names = {key for key, _value in txn.cursor()}
    finally:
        env.close()
    return (None if data is None else codec.unpack(data)), names


def _assert_reads_as_old_release_did(
    path: Path, version: int, config: StoreConfig | None = None
) -> None:
    expected = _expected(version)
    db = Database(path, app, store_config=config)
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


def test_old_store_upgrades_in_place(
    old_dir: Path, version: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every ID reads as the old release read it, the digests stay, the old
    databases are gone, and replay agrees with the upgraded store."""
    assert _raw_meta(old_dir, "format_version")[0] == version
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
    _assert_reads_as_old_release_did(old_dir, version)
    upgraded = [e for e in capture.entries if e["event"] == "store_upgraded"]
    assert [e["version"] for e in upgraded] == [FORMAT_VERSION] == [3]

    found_version, names = _raw_meta(old_dir, "format_version")
    assert found_version == FORMAT_VERSION
    assert not names & {b"ids", b"id_seqs", b"state.ledger", b"state.users"}
    assert {b"id_gens", b"state_gens.ledger", b"state_gens.users"} <= names
    assert replay(old_dir, app).matches


def test_upgrade_of_more_than_a_generation(
    old_dir: Path, version: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store with more commands than one generation takes upgrades, in
    several commits, into generation 0. Its next writes go to a newer one,
    which reads find too, also after a reopen."""
    monkeypatch.setattr(store, "_UPGRADE_CHUNK_ENTRIES", 2)
    config = StoreConfig(generation_commands=2)
    _assert_reads_as_old_release_did(old_dir, version, config)
    deposit = ("after-upgrade", "ledger.deposit", {"account": "a", "amount": 1})
    db = Database(old_dir, app, store_config=config)
    try:
        assert db.submit([prepare_submission(app, *deposit)])[0].created
    finally:
        db.close()
    db = Database(old_dir, app, store_config=config)
    try:
        assert not db.submit([prepare_submission(app, *deposit)])[0].created
        assert db.view("after-upgrade") is not None
        assert db.view("k-open-a") is not None
        with db.store.read() as txn:
            assert txn.generation()[0] >= 1
    finally:
        db.close()
    assert replay(old_dir, app).matches


def _cut_upgrade_short(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Open the store of `path` for an upgrade that stops, as after a crash,
    once two commits of two entries each have moved."""
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
    old_dir: Path, version: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upgrade that stops between its commits, as after a crash, leaves
    the old format with its progress recorded; the next open finishes it."""
    _cut_upgrade_short(old_dir, monkeypatch)

    found_version, _names = _raw_meta(old_dir, "format_version")
    progress, _names = _raw_meta(old_dir, PROGRESS[version])
    assert found_version == version
    assert progress is not None  # two chunks of two entries moved, more to go

    _assert_reads_as_old_release_did(old_dir, version)
    assert _raw_meta(old_dir, PROGRESS[version])[0] is None


def _as_old_release(patch: pytest.MonkeyPatch, version: int) -> None:
    """Make the store skip its upgrade and read and write the ID index and
    state as the release of format `version` did. The upgrade reads only
    the seq of each ID entry."""
    ids_name = b"ids" if version == 1 else b"id_seqs"

    def open_old(txn: store.Txn, name: bytes) -> Any:
        return txn._store.env.open_db(name, txn=txn.raw, create=False)

    def id_get(txn: store.Txn, command_id: str) -> int | None:
        data = txn.raw.get(command_id.encode(), db=open_old(txn, ids_name))
        if data is None:
            return None
        return int(codec.unpack(data)[0]) if version == 1 else int.from_bytes(data)

    def id_put(txn: store.Txn, command_id: str, seq: int) -> None:
        value = codec.pack([seq, b"", 0, ""]) if version == 1 else store.seq_key(seq)
        txn.raw.put(command_id.encode(), value, db=open_old(txn, ids_name))

    def state_get(txn: store.Txn, domain: str, key: bytes) -> bytes | None:
        return txn.raw.get(key, db=open_old(txn, b"state." + domain.encode()))  # type: ignore[no-any-return]

    def state_put(
        txn: store.Txn, domain: str, key: bytes, value: bytes | None, **_hint: bool
    ) -> None:
        db = open_old(txn, b"state." + domain.encode())
        if value is None:
            txn.raw.delete(key, db=db)
        else:
            txn.raw.put(key, value, db=db)

    patch.setattr(Store, "_check_format", lambda self, **_flags: None)
    patch.setattr(store.Txn, "id_get", id_get)
    patch.setattr(store.Txn, "id_put", id_put)
    patch.setattr(store.Txn, "state_get", state_get)
    patch.setattr(store.Txn, "state_put", state_put)


def test_upgrade_restarts_after_old_release_writes(
    old_dir: Path, version: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store whose upgrade was cut short is still of the old format, so
    the older release runs on it after a rollback and writes its old
    databases behind the point the upgrade reached. The next upgrade moves
    those too: the command and its effect are found, and its retry takes no
    effect a second time."""
    _cut_upgrade_short(old_dir, monkeypatch)
    deposit = ("a-old", "ledger.deposit", {"account": "a", "amount": 1})
    with monkeypatch.context() as old_release:
        _as_old_release(old_release, version)
        db = Database(old_dir, app)
        try:
            assert db.submit([prepare_submission(app, *deposit)])[0].created
            balance = db.query("ledger.balance", {"account": "a"})["balance"]
        finally:
            db.close()
    assert _raw_meta(old_dir, "format_version")[0] == version

    db = Database(old_dir, app)
    try:
        assert db.view("a-old") is not None
        assert not db.submit([prepare_submission(app, *deposit)])[0].created
        assert db.query("ledger.balance", {"account": "a"})["balance"] == balance
        assert db.status().commands == _expected(version)["status"]["commands"] + 1
    finally:
        db.close()
    assert replay(old_dir, app).matches


def test_read_only_open_names_the_fix(old_dir: Path, version: int) -> None:
    """A read-only open (replay, status of a stopped node) cannot upgrade, so
    its error names the command that does."""
    with pytest.raises(VersionMismatch) as raised:
        Store(old_dir, list(app.domains), readonly=True)
    assert f"version {version}" in raised.value.message
    assert "cmdlog serve" in raised.value.message


@pytest.mark.parametrize("command", ["identity", "peers"])
def test_cli_leaves_old_store_as_is(
    old_dir: Path, version: int, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Commands on a stopped node's directory do not upgrade it, because the
    upgrade cannot be undone; they exit 2 and name `cmdlog serve`."""
    assert main([command, "--data", str(old_dir)]) == 2
    assert "cmdlog serve" in capsys.readouterr().err
    assert _raw_meta(old_dir, "format_version")[0] == version


def test_index_maps_ids_to_seqs(tmp_path: Path) -> None:
    """The ID index maps each ID, as UTF-8 after the generation number, to
    its 8-byte sequence number and nothing else, whatever the ID's length."""
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
            cursor = txn.raw.cursor(db=db.store._dbs["id_gens"])
            entries = dict(cursor.iternext())
    finally:
        db.close()
    first = generation_prefix(0)
    assert set(entries) == {first + b"short", first + long_id.encode()}
    assert {len(value) for value in entries.values()} == {8}
    assert sorted(int.from_bytes(v, "big") for v in entries.values()) == [1, 2]
