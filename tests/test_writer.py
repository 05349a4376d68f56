"""Tests of the writer thread's group commit, on a real LMDB store."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cmdlog.app import App
from cmdlog.apps.ledger import ledger
from cmdlog.database import Database
from cmdlog.engine import Accepted, Submission, prepare_submission
from cmdlog.errors import KeyReused
from cmdlog.store import Txn
from cmdlog.writer import Writer
from tests.conftest import fast_store

APP = App([ledger])


@pytest.fixture
def database(tmp_path: Path) -> Iterator[Database]:
    db = Database(tmp_path / "node", APP, store_config=fast_store())
    yield db
    db.close()


def opening(key: str, account: str) -> Submission:
    return prepare_submission(
        APP, key, "ledger.open", {"account": account, "currency": "EUR"}
    )


async def one_group(writer: Writer, calls: list[Any]) -> list[Any]:
    """Queue every call before the thread starts, so they share one commit."""
    tasks = [asyncio.ensure_future(call) for call in calls]
    await asyncio.sleep(0)
    writer.start()
    try:
        return await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        await writer.stop()


async def test_writer_groups_submissions_in_order(
    database: Database,
) -> None:
    writer = Writer(database)
    seen: dict[str, bool] = {}

    def look(txn: Txn) -> None:
        seen["k1 before"] = txn.id_get("k1") is not None
        seen["k3 before"] = txn.id_get("k3") is not None

    first, between, second, third = await one_group(
        writer,
        [
            writer.submit([opening("k1", "a1"), opening("k2", "a2")]),
            writer.run(look),
            writer.submit([opening("k3", "a3")]),
            writer.submit([opening("k1", "a1"), opening("k1", "other")]),
        ],
    )

    assert writer.commits == 1
    assert between is None
    # The job between the submissions ran after the first and before the second.
    assert seen == {"k1 before": True, "k3 before": False}
    assert [(r.command.id, r.created) for r in first] == [("k1", True), ("k2", True)]
    assert [(r.command.id, r.created) for r in second] == [("k3", True)]
    retry, reused = third
    assert isinstance(retry, Accepted)
    assert (retry.created, retry.command) == (False, first[0].command)
    assert isinstance(reused, KeyReused)
    assert database.status().commands == 3


async def test_writer_failure_fails_whole_group(database: Database) -> None:
    writer = Writer(database)

    def fail(txn: Txn) -> None:
        raise RuntimeError("handler bug")

    results = await one_group(
        writer,
        [
            writer.submit([opening("k1", "a1")]),
            writer.run(fail),
            writer.submit([opening("k2", "a2")]),
        ],
    )

    assert [type(result) for result in results] == [RuntimeError] * 3
    assert writer.commits == 0
    assert database.status().commands == 0
    assert database.view("k1") is None
