"""A rolling upgrade of a three-node cluster while clients keep writing."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from cmdlog.client import Client, ClientFailure
from tests.cluster import get_json, status, wait_converged
from tests.nodes import NodeProcess

Factory = Callable[..., NodeProcess]
UPGRADED = "cmdlog.apps.upgraded:app"
ACCOUNTS = ["u-0", "u-1", "u-2"]


async def wait_connected(session: aiohttp.ClientSession, urls: list[str]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        states = [await status(session, url) for url in urls]
        if all(len(s["peers"]) == 2 and all(p["connected"] for p in s["peers"])
               for s in states):  # fmt: skip
            return
        await asyncio.sleep(0.1)
    raise AssertionError("peers did not reconnect")


@pytest.mark.slow
async def test_rolling_upgrade_adds_refunds(node_factory: Factory) -> None:
    """Nodes restart one by one with ledger.refund; no client operation fails,
    every refund applies once, and the digests agree."""
    first = node_factory("n1")
    second = node_factory("n2", peers=(first.url,))
    third = node_factory("n3", peers=(first.url, second.url))
    nodes = [first, second, third]
    urls = [node.url for node in nodes]
    failures: list[str] = []
    charges: list[tuple[str, str, int]] = []
    stop = asyncio.Event()

    async with Client(urls, timeout_s=5, attempts_max=60, backoff_max_s=0.5) as client:
        for account in ACCOUNTS:
            await client.submit("ledger.open", {"account": account, "currency": "EUR"})
            await client.submit(
                "ledger.deposit", {"account": account, "amount": 100_000}
            )

        async def writer(worker: int) -> None:
            rng = random.Random(worker)
            count = 0
            while not stop.is_set():
                account = rng.choice(ACCOUNTS)
                amount = rng.randint(10, 200)
                try:
                    if rng.random() < 0.5:
                        submitted = await client.submit(
                            "ledger.charge",
                            {"account": account, "amount": amount,
                             "reference": f"w{worker}-{count}"},
                        )  # fmt: skip
                        if submitted.outcome.status == "applied":
                            charges.append((submitted.id, account, amount))
                    else:
                        await client.submit(
                            "ledger.deposit", {"account": account, "amount": amount}
                        )
                except ClientFailure as exc:
                    failures.append(f"worker {worker}: {exc}")
                count += 1
                await asyncio.sleep(0.01)

        writers = [asyncio.create_task(writer(i)) for i in range(4)]
        refunds: list[tuple[str, str, int]] = []
        redirected: list[str] = []
        redirects_counted: list[str] = []
        async with aiohttp.ClientSession() as session:
            for index, node in enumerate(nodes):
                await asyncio.sleep(0.5)
                assert node.terminate() == 0
                node.app = UPGRADED
                node.start()
                await wait_connected(session, urls)
                # Refunds go to every node, the old ones redirect them.
                for charge_id, _account, amount in charges[index * 5 : index * 5 + 5]:
                    try:
                        submitted = await client.submit(
                            "ledger.refund", {"charge": charge_id, "amount": amount},
                            node_url=urls[(index + 1) % 3],
                        )  # fmt: skip
                        refunds.append((submitted.id, charge_id, amount))
                    except ClientFailure as exc:
                        failures.append(f"refund: {exc}")
                if index == 0:
                    async with session.get(f"{urls[1]}/metrics") as response:
                        metrics_text = await response.text()
                    series = 'cmdlog_client_commands_total{result="redirected"}'
                    redirected = [
                        line for line in metrics_text.splitlines()
                        if line.startswith(series)
                    ]  # fmt: skip
                    series = (
                        'cmdlog_http_requests_total{method="POST",'
                        'route="/commands",status="307"}'
                    )
                    redirects_counted = [
                        line for line in metrics_text.splitlines()
                        if line.startswith(series)
                    ]  # fmt: skip
            stop.set()
            await asyncio.gather(*writers)

            states = await wait_converged(session, urls)
            refund_views: list[dict[str, Any]] = []
            for refund_id, _charge_id, _amount in refunds:
                code, view = await get_json(session, f"{urls[0]}/commands/{refund_id}")
                assert code == 200
                refund_views.append(view)

    assert failures == []
    assert redirected
    assert float(redirected[0].split()[-1]) == 5
    # Each redirect is a request in /metrics and a line in the log.
    assert redirects_counted
    assert float(redirects_counted[0].split()[-1]) == 5
    redirect_lines = [
        line for line in nodes[1].log_text().splitlines()
        if '"request_handled"' in line and '"status":307' in line
    ]  # fmt: skip
    assert len(redirect_lines) == 5
    assert len(refunds) == 15
    assert all(view["outcome"]["status"] == "applied" for view in refund_views)
    assert all(state["pending"] == 0 for state in states)
    assert len({state["digest"]["state"] for state in states}) == 1
    assert "ledger.refund" in states[0]["types"]
