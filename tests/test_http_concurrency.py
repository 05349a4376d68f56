"""Tests that concurrent retries through cmdlog.http_api take effect once."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tests.nodes import NodeProcess

JSON = "application/json"
CONCURRENT_REQUESTS = 100


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    # One connection per request, so all of them are on the wire at once.
    connector = aiohttp.TCPConnector(limit=CONCURRENT_REQUESTS)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as client:
        yield client


async def post(
    session: aiohttp.ClientSession, node: NodeProcess, key: str, command: Any
) -> tuple[int, str | None, Any]:
    """POST one command and return the status, the replay header and the body."""
    async with session.post(
        node.url + "/commands",
        data=json.dumps(command).encode(),
        headers={"Content-Type": JSON, "Idempotency-Key": key},
    ) as response:
        body = await response.json()
        return response.status, response.headers.get("Idempotent-Replayed"), body


async def balance(
    session: aiohttp.ClientSession, node: NodeProcess, account: str
) -> int:
    url = f"{node.url}/queries/ledger.balance?account={account}"
    async with session.get(url) as response:
        assert response.status == 200, await response.text()
        body = await response.json()
    amount: int = body["result"]["balance"]
    return amount


async def open_account(
    session: aiohttp.ClientSession, node: NodeProcess, account: str, funds: int
) -> None:
    opened = await post(
        session,
        node,
        f"open-{account}",
        {"type": "ledger.open", "payload": {"account": account, "currency": "EUR"}},
    )
    assert opened[0] == 201, opened
    if funds:
        funded = await post(
            session,
            node,
            f"fund-{account}",
            {
                "type": "ledger.deposit",
                "payload": {"account": account, "amount": funds},
            },
        )
        assert funded[0] == 201, funded


async def test_one_key_concurrently(
    node: NodeProcess, session: aiohttp.ClientSession
) -> None:
    """100 concurrent requests under one key record one deposit and replay it."""
    await open_account(session, node, "concurrent", funds=0)
    before = await balance(session, node, "concurrent")
    deposit = {
        "type": "ledger.deposit",
        "payload": {"account": "concurrent", "amount": 1},
    }

    replies = await asyncio.gather(
        *(
            post(session, node, "deposit-once", deposit)
            for _ in range(CONCURRENT_REQUESTS)
        )
    )
    after = await balance(session, node, "concurrent")

    statuses = [status for status, _replayed, _body in replies]
    assert statuses.count(201) == 1, statuses
    assert statuses.count(200) == CONCURRENT_REQUESTS - 1, statuses
    replay_headers = [replayed for status, replayed, _body in replies if status == 200]
    assert set(replay_headers) == {"true"}
    created = next(body for status, _replayed, body in replies if status == 201)
    assert all(body == created for _status, _replayed, body in replies)
    assert created["id"] == "deposit-once"
    assert after == before + 1


async def test_one_reference_concurrently(
    node: NodeProcess, session: aiohttp.ClientSession
) -> None:
    """100 concurrent charges with one reference under 100 keys charge once."""
    await open_account(session, node, "merchant", funds=1000)
    charge = {
        "type": "ledger.charge",
        "payload": {"account": "merchant", "amount": 7, "reference": "order-1"},
    }

    replies = await asyncio.gather(
        *(
            post(session, node, f"charge-{i}", charge)
            for i in range(CONCURRENT_REQUESTS)
        )
    )
    after = await balance(session, node, "merchant")

    statuses = [status for status, _replayed, _body in replies]
    assert statuses.count(201) == 1, statuses
    assert statuses.count(200) == CONCURRENT_REQUESTS - 1, statuses
    replay_headers = [replayed for status, replayed, _body in replies if status == 200]
    assert set(replay_headers) == {"true"}
    ids = {body["id"] for _status, _replayed, body in replies}
    assert len(ids) == 1, ids
    derived_id = ids.pop()
    assert not derived_id.startswith("charge-"), derived_id
    created = next(body for status, _replayed, body in replies if status == 201)
    assert created["outcome"]["status"] == "applied"
    assert all(body == created for _status, _replayed, body in replies)
    assert after == 1000 - 7
