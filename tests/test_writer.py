"""Tests of the writer thread's group commit, on a real LMDB store."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cmdlog.app import App
from cmdlog.apps.ledger import ledger
from cmdlog.config import WriterConfig
from cmdlog.database import Database
from cmdlog.engine import Accepted, Submission, prepare_submission
from cmdlog.errors import KeyReused, Overloaded
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
        gathered = asyncio.gather(*tasks, return_exceptions=True)
        return await asyncio.wait_for(gathered, timeout=10)
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


async def test_writer_splits_large_groups(database: Database) -> None:
    writer = Writer(database, WriterConfig(batch_commands_max=3))
    calls = [writer.submit([opening(f"k{n}", f"a{n}")]) for n in range(7)]

    results = await one_group(writer, calls)

    # 7 one-command jobs handed over together make groups of 3, 3 and 1.
    assert writer.commits == 3
    assert [result[0].command.id for result in results] == [f"k{n}" for n in range(7)]
    assert all(result[0].created for result in results)
    assert database.status().commands == 7


async def test_writer_stop_commits_gathered_jobs(database: Database) -> None:
    writer = Writer(database)
    writer.start()
    # The job is gathered for this loop iteration, and stop() runs before the
    # iteration's hand-over.
    pending = asyncio.ensure_future(writer.submit([opening("k1", "a1")]))
    await asyncio.sleep(0)
    await writer.stop()

    [accepted] = await asyncio.wait_for(pending, timeout=5)
    assert isinstance(accepted, Accepted) and accepted.created
    assert database.view("k1") is not None


async def test_writer_rejects_over_queue_bound(database: Database) -> None:
    writer = Writer(database, WriterConfig(queue_requests_max=2))
    calls = [writer.submit([opening(f"k{n}", f"a{n}")]) for n in range(3)]

    results = await one_group(writer, calls)

    assert [type(result) for result in results[:2]] == [list, list]
    assert isinstance(results[2], Overloaded)
    assert writer.queued() == 0
    assert database.status().commands == 2
