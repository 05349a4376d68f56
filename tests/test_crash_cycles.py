"""Repeated SIGKILL of a node under concurrent writes, then replay."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
import pytest

from cmdlog.apps.example import app as example_app
from cmdlog.replay import replay
from tests.nodes import NodeProcess

Factory = Callable[..., NodeProcess]
CYCLES = 100


@dataclass
class CycleStats:
    cycles: int = 0
    acknowledged: int = 0
    lost: int = 0
    double_applied: int = 0
    in_flight_at_kill: int = 0


async def writer(
    session: aiohttp.ClientSession,
    url: str,
    keys: itertools.count[int],
    acknowledged: list[str],
    stop: asyncio.Event,
) -> None:
    while not stop.is_set():
        key = f"k{next(keys)}"
        try:
            async with session.post(
                url + "/commands",
                json={
                    "type": "ledger.deposit",
                    "payload": {"account": "a", "amount": 1},
                },
                headers={"Idempotency-Key": key},
            ) as response:
                if response.status == 201:
                    acknowledged.append(key)
        except (TimeoutError, aiohttp.ClientError):
            return


async def run_cycles(node: NodeProcess, cycles: int, seed: int) -> CycleStats:
    rng = random.Random(seed)
    stats = CycleStats()
    keys = itertools.count()
    acknowledged: list[str] = []
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.post(
            node.url + "/commands",
            json={
                "type": "ledger.open",
                "payload": {"account": "a", "currency": "EUR"},
            },
            headers={"Idempotency-Key": "open"},
        ) as response:
            assert response.status == 201
        for _cycle in range(cycles):
            stop = asyncio.Event()
            writers = [
                asyncio.create_task(writer(session, node.url, keys, acknowledged, stop))
                for _ in range(8)
            ]
            await asyncio.sleep(rng.uniform(0.05, 0.3))
            node.kill()
            stop.set()
            await asyncio.gather(*writers)
            stats.cycles += 1
            node.start()
            # Every acknowledged key of this cycle must have survived the kill.
            for key in acknowledged[stats.acknowledged :]:
                async with session.get(f"{node.url}/commands/{key}") as response:
                    stats.lost += response.status != 200
            stats.acknowledged = len(acknowledged)
        async with session.get(
            node.url + "/queries/ledger.balance?account=a"
        ) as response:
            balance = (await response.json())["result"]["balance"]
        async with session.get(node.url + "/status") as response:
            live = await response.json()
    # Every stored deposit adds exactly 1, so a balance above the number of
    # stored deposits would mean a command applied twice.
    stats.double_applied = max(0, balance - (live["commands"] - 1))
    assert balance >= len(acknowledged)
    node.terminate()
    report = replay(node.data_dir, example_app)
    assert report.state_digest == live["digest"]["state"]
    assert report.log_digest == live["digest"]["log"]
    assert report.matches
    return stats


@pytest.mark.slow
async def test_kill_cycles_quick(node: NodeProcess) -> None:
    """Five SIGKILLs under eight concurrent writers lose no acknowledged command."""
    stats = await run_cycles(node, 5, seed=1)
    assert stats.acknowledged > 0
    assert stats.lost == 0
    assert stats.double_applied == 0


@pytest.mark.slow
async def test_kill_cycles_hundred(node: NodeProcess) -> None:
    """A hundred SIGKILLs under concurrent writes lose nothing acknowledged, apply
    nothing twice, and replay matches the live digests."""
    stats = await run_cycles(node, CYCLES, seed=7)
    print(
        f"\nkill cycles: {stats.cycles}, acknowledged: {stats.acknowledged}, "
        f"lost: {stats.lost}, applied twice: {stats.double_applied}"
    )
    assert stats.cycles == CYCLES
    assert stats.acknowledged > CYCLES
    assert stats.lost == 0
    assert stats.double_applied == 0
