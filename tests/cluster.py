"""Helpers for tests of several real nodes: HTTP calls and convergence."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import aiohttp

CONVERGE_TIMEOUT_S = 60.0


async def post_command(
    session: aiohttp.ClientSession,
    url: str,
    key: str,
    type_name: str,
    payload: dict[str, Any],
) -> tuple[int, dict[str, Any]]:
    async with session.post(
        url + "/commands",
        json={"type": type_name, "payload": payload},
        headers={"Idempotency-Key": key},
    ) as response:
        return response.status, await response.json()


async def post_batch(
    session: aiohttp.ClientSession, url: str, items: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    async with session.post(url + "/commands/batch", json=items) as response:
        assert response.status == 200, await response.text()
        body = await response.json()
        results: list[dict[str, Any]] = body["results"]
        return results


async def get_json(session: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with session.get(url) as response:
        return response.status, await response.json()


async def status(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    code, body = await get_json(session, url + "/status")
    assert code == 200
    result: dict[str, Any] = body
    return result


def summary(state: dict[str, Any]) -> tuple[Any, ...]:
    return (state["commands"], state["applied"], state["digest"]["state"],
            state["digest"]["log"])  # fmt: skip


async def wait_converged(
    session: aiohttp.ClientSession,
    urls: Sequence[str],
    *,
    timeout_s: float = CONVERGE_TIMEOUT_S,
) -> list[dict[str, Any]]:
    """Poll /status until every node reports the same counts and digests and
    no peer lags; return the final statuses, or fail with the last ones."""
    deadline = time.monotonic() + timeout_s
    states: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        states = [await status(session, url) for url in urls]
        same = len({summary(state) for state in states}) == 1
        caught_up = all(
            peer["lag"] == 0 and peer["connected"]
            for state in states
            for peer in state["peers"]
        )
        if same and caught_up:
            return states
        await asyncio.sleep(0.2)
    raise AssertionError(
        "nodes did not converge: "
        + "; ".join(
            f"{url}: {summary(s)} peers={s['peers']}"
            for url, s in zip(urls, states, strict=True)
        )
    )
