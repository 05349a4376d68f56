"""Replication between real node processes on 127.0.0.1."""

from __future__ import annotations

import asyncio
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from cmdlog.app import App
from cmdlog.apps.example import app as example_app
from cmdlog.store import Store
from tests.cluster import (
    get_json,
    post_batch,
    post_command,
    status,
    wait_converged,
)
from tests.nodes import NodeProcess
from tests.proxy import TcpProxy

ACCOUNTS = [f"acct-{i}" for i in range(4)]
Factory = Callable[..., NodeProcess]


async def open_accounts(session: aiohttp.ClientSession, url: str) -> None:
    for account in ACCOUNTS:
        code, _ = await post_command(
            session, url, f"open-{account}", "ledger.open",
            {"account": account, "currency": "EUR"},
        )  # fmt: skip
        assert code == 201
        code, _ = await post_command(
            session, url, f"fund-{account}", "ledger.deposit",
            {"account": account, "amount": 500},
        )  # fmt: skip
        assert code == 201


async def client_workload(
    session: aiohttp.ClientSession,
    urls: list[str],
    worker: int,
    operations: int,
    sent: dict[str, tuple[str, dict[str, Any]]],
) -> None:
    """Deposits, charges, transfers; some keys sent to two nodes; charges that
    overdraw one hot account if all were applied."""
    rng = random.Random(worker)
    for i in range(operations):
        key = f"w{worker}-{i}"
        roll = rng.random()
        if roll < 0.3:
            type_name, payload = "ledger.charge", {"account": "acct-0", "amount": 40}
        elif roll < 0.55:
            type_name = "ledger.deposit"
            payload = {"account": rng.choice(ACCOUNTS), "amount": rng.randint(1, 50)}
        elif roll < 0.8:
            type_name = "ledger.charge"
            payload = {"account": rng.choice(ACCOUNTS), "amount": rng.randint(1, 80)}
        else:
            source, target = rng.sample(ACCOUNTS, 2)
            type_name = "ledger.transfer"
            payload = {"from": source, "to": target, "amount": rng.randint(1, 60)}
        sent[key] = (type_name, payload)
        targets = rng.sample(urls, 2) if rng.random() < 0.2 else [rng.choice(urls)]
        for url in targets:
            for _attempt in range(50):
                try:
                    code, _ = await post_command(session, url, key, type_name, payload)
                except aiohttp.ClientError:
                    await asyncio.sleep(0.05)
                    continue
                assert code in (200, 201), code
                break


async def check_ledger(
    session: aiohttp.ClientSession,
    urls: list[str],
    sent: dict[str, tuple[str, dict[str, Any]]],
) -> None:
    """Every node agrees; balances are never negative and equal the sum of the
    applied outcomes."""
    states = await wait_converged(session, urls)
    expected_commands = len(sent) + 2 * len(ACCOUNTS)
    assert states[0]["commands"] == expected_commands
    assert all(state["pending"] == 0 for state in states)

    expected = {account: 500 for account in ACCOUNTS}
    for key, (type_name, payload) in sent.items():
        code, view = await get_json(session, f"{urls[0]}/commands/{key}")
        assert code == 200
        if view["outcome"]["status"] != "applied":
            continue
        amount = payload["amount"]
        if type_name == "ledger.deposit":
            expected[payload["account"]] += amount
        elif type_name == "ledger.charge":
            expected[payload["account"]] -= amount
        else:
            expected[payload["from"]] -= amount
            expected[payload["to"]] += amount
    for url in urls:
        for account in ACCOUNTS:
            code, body = await get_json(
                session, f"{url}/queries/ledger.balance?account={account}"
            )
            assert code == 200
            balance = body["result"]["balance"]
            assert balance >= 0, (url, account)
            assert balance == expected[account], (url, account)


@pytest.mark.slow
async def test_three_node_mesh_converges(node_factory: Factory) -> None:
    """Three nodes written to at once end with equal digests and a consistent ledger."""
    first = node_factory("n1")
    second = node_factory("n2", peers=(first.url,))
    third = node_factory("n3", peers=(first.url, second.url))
    urls = [first.url, second.url, third.url]
    sent: dict[str, tuple[str, dict[str, Any]]] = {}
    async with aiohttp.ClientSession() as session:
        await open_accounts(session, first.url)
        await wait_converged(session, urls)
        await asyncio.gather(
            *(client_workload(session, urls, worker, 60, sent) for worker in range(8))
        )
        await check_ledger(session, urls, sent)
        for state in [await status(session, url) for url in urls]:
            assert len(state["peers"]) == 2


@pytest.mark.slow
async def test_mesh_converges_through_cut_links(node_factory: Factory) -> None:
    """Peer links cut and healed during the run do not stop convergence."""
    proxies = [await TcpProxy().start() for _ in range(3)]
    try:
        nodes = []
        for index, proxy in enumerate(proxies):
            peers = tuple(p.url for p in proxies[:index])
            nodes.append(
                node_factory(
                    f"n{index + 1}", peers=peers, extra_args=("--advertise", proxy.url)
                )
            )
            proxy.target_port = nodes[-1].port
        urls = [node.url for node in nodes]
        sent: dict[str, tuple[str, dict[str, Any]]] = {}

        async def chaos() -> None:
            rng = random.Random(7)
            for _ in range(12):
                await asyncio.sleep(rng.uniform(0.1, 0.4))
                victim = rng.choice(proxies)
                if rng.random() < 0.5:
                    victim.cut()
                else:
                    victim.block()
                    await asyncio.sleep(rng.uniform(0.2, 0.8))
                    victim.heal()

        async with aiohttp.ClientSession() as session:
            await open_accounts(session, urls[0])
            workload = asyncio.gather(
                *(
                    client_workload(session, urls, worker, 50, sent)
                    for worker in range(6)
                )
            )
            await asyncio.gather(workload, chaos())
            for proxy in proxies:
                proxy.heal()
            await check_ledger(session, urls, sent)
        assert sum(proxy.connections for proxy in proxies) > 6
    finally:
        for proxy in proxies:
            await proxy.stop()


def log_ids_by_seq(path: Path, app: App) -> dict[int, str]:
    store = Store(path, list(app.domains), readonly=True)
    try:
        with store.read() as txn:
            from cmdlog import codec

            return {seq: codec.unpack(record)[0] for seq, record in txn.log_iter(0)}
    finally:
        store.close()


@pytest.mark.slow
async def test_killed_puller_resumes_without_gap(node_factory: Factory) -> None:
    """A puller killed mid-stream stored no cursor past its commands, and
    resumes with no gap and no duplicate."""
    source = node_factory("source")
    async with aiohttp.ClientSession() as session:
        await open_accounts(session, source.url)
        for batch in range(30):
            items = [
                {"id": f"b{batch}-{i}", "type": "ledger.deposit",
                 "payload": {"account": ACCOUNTS[i % 4], "amount": 1}}
                for i in range(1000)
            ]  # fmt: skip
            results = await post_batch(session, source.url, items)
            assert all(result["status"] == 201 for result in results)
        total = (await status(session, source.url))["commands"]

        follower = node_factory("follower", peers=(source.url,))
        for _ in range(400):
            peers = (await status(session, follower.url))["peers"]
            if peers and peers[0]["cursor"] > 0:
                break
            await asyncio.sleep(0.01)
        follower.kill()

        source_ids = log_ids_by_seq(source.data_dir, example_app)
        store = Store(follower.data_dir, list(example_app.domains), readonly=True)
        try:
            with store.read() as txn:
                cursor = txn.peers()[source.url]["cursor"]
                missing = [
                    seq for seq, command_id in source_ids.items()
                    if seq <= cursor and txn.id_get(command_id) is None
                ]  # fmt: skip
                stored = txn.command_count()
        finally:
            store.close()
        assert 0 < cursor < total
        assert missing == []
        assert stored >= cursor

        follower.start()
        states = await wait_converged(session, [source.url, follower.url])
        assert states[1]["commands"] == total
        assert states[1]["log_entries"] == total


@pytest.mark.slow
async def test_replaced_peer_read_from_start(node_factory: Factory) -> None:
    """A peer whose data directory was replaced is read again from sequence 0."""
    source = node_factory("source")
    async with aiohttp.ClientSession() as session:
        await post_command(session, source.url, "old", "ledger.open",
                           {"account": "old", "currency": "EUR"})  # fmt: skip
        follower = node_factory("follower", peers=(source.url,))
        await wait_converged(session, [source.url, follower.url])

        port = source.port
        source.terminate()
    replacement = node_factory("replacement", port=port)
    async with aiohttp.ClientSession() as session:
        await post_command(session, replacement.url, "new", "ledger.open",
                           {"account": "new", "currency": "EUR"})  # fmt: skip
        states = await wait_converged(session, [replacement.url, follower.url])
        assert states[0]["commands"] == 2
        assert "peer_log_replaced" in follower.log_text()


async def test_replicate_refuses_unknown_version(node: NodeProcess) -> None:
    """A stream request for another protocol version is refused naming both."""
    async with aiohttp.ClientSession() as session:
        code, body = await get_json(session, f"{node.url}/replicate?version=9")
    assert code == 400
    assert "9" in body["error"]["message"]
    assert "version 1" in body["error"]["message"]


def stream_entries(metrics_text: str) -> dict[str, float]:
    """Read `cmdlog_replication_stream_entries_total` by result."""
    found = re.findall(
        r'^cmdlog_replication_stream_entries_total\{result="(\w+)"\} (\S+)$',
        metrics_text,
        re.M,
    )
    return {result: float(value) for result, value in found}


async def metrics_text(session: aiohttp.ClientSession, url: str) -> str:
    async with session.get(url + "/metrics") as response:
        assert response.status == 200
        return await response.text()


async def deposits(
    session: aiohttp.ClientSession, url: str, prefix: str, count: int
) -> None:
    items = [
        {"id": f"{prefix}-{i}", "type": "ledger.deposit",
         "payload": {"account": ACCOUNTS[i % 4], "amount": 1}}
        for i in range(count)
    ]  # fmt: skip
    results = await post_batch(session, url, items)
    assert [result["status"] for result in results] == [201] * count


async def test_copies_not_sent_back(node_factory: Factory) -> None:
    """A node does not stream back the copies it pulled from the reader, and
    the reader's cursor still reaches its head."""
    source = node_factory("source")
    async with aiohttp.ClientSession() as session:
        await open_accounts(session, source.url)
        await deposits(session, source.url, "before", 200)
        follower = node_factory("follower", peers=(source.url,))
        await wait_converged(session, [source.url, follower.url])
        await deposits(session, source.url, "after", 100)
        states = await wait_converged(session, [source.url, follower.url])
        echoed = stream_entries(await metrics_text(session, follower.url))

        await post_command(session, follower.url, "local", "ledger.deposit",
                           {"account": ACCOUNTS[0], "amount": 1})  # fmt: skip
        await wait_converged(session, [source.url, follower.url])
        after_local = stream_entries(await metrics_text(session, follower.url))

    total = states[0]["commands"]
    assert total == len(ACCOUNTS) * 2 + 300
    [peer_of_source] = states[0]["peers"]
    assert peer_of_source["cursor"] == states[1]["log_entries"]
    assert echoed == {"sent": 0, "skipped": total}
    assert after_local == {"sent": 1, "skipped": total}


@pytest.mark.slow
async def test_restored_node_gets_lost_copies_back(
    node_factory: Factory, tmp_path: Path
) -> None:
    """A node restored from an old backup gets back, from a peer, the commands
    it had sent that peer after the backup."""
    source = node_factory("source")
    # A restarted node drops its kept-alive connections, so use none.
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        await open_accounts(session, source.url)
        await deposits(session, source.url, "kept", 50)
        follower = node_factory("follower", peers=(source.url,))
        await wait_converged(session, [source.url, follower.url])
        source.terminate()
        backup = tmp_path / "backup"
        shutil.copytree(source.data_dir, backup)
        source.start()
        await deposits(session, source.url, "lost", 50)
        states = await wait_converged(session, [source.url, follower.url])

        source.terminate()
        shutil.rmtree(source.data_dir)
        shutil.copytree(backup, source.data_dir)
        source.start()
        final = await wait_converged(session, [source.url, follower.url])

    restored = len(log_ids_by_seq(backup, example_app))

    assert states[0]["commands"] == len(ACCOUNTS) * 2 + 100
    assert restored == len(ACCOUNTS) * 2 + 50
    assert final[0]["commands"] == states[0]["commands"]
    assert final[0]["digest"] == states[0]["digest"]
    # The restored process is the only one with its node ID.
    assert "duplicate_node" not in source.log_text()
    assert "duplicate_node" not in follower.log_text()


@pytest.mark.slow
async def test_restored_node_new_writes_reach_readers(
    node_factory: Factory, tmp_path: Path
) -> None:
    """A node restored from a backup appends new commands under sequence
    numbers that the lost commands had. A reader whose cursor was past the
    backup point still gets every new command, also when the restored log
    has grown past that cursor before the reader reconnects."""
    source = node_factory("source")
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        await open_accounts(session, source.url)
        await deposits(session, source.url, "kept", 30)
        source.terminate()
        backup = tmp_path / "backup"
        shutil.copytree(source.data_dir, backup)
        source.start()
        follower = node_factory("follower", peers=(source.url,))
        await deposits(session, source.url, "lost", 40)
        before = await wait_converged(session, [source.url, follower.url])

        follower.terminate()
        source.terminate()
        shutil.rmtree(source.data_dir)
        shutil.copytree(backup, source.data_dir)
        source.start()
        await deposits(session, source.url, "fresh", 60)
        follower.start()
        final = await wait_converged(session, [source.url, follower.url])
        fresh_on_follower = []
        for i in range(60):
            code, view = await get_json(session, f"{follower.url}/commands/fresh-{i}")
            fresh_on_follower.append((code, view["outcome"]["status"]))

    assert before[1]["peers"][0]["cursor"] == len(ACCOUNTS) * 2 + 70
    assert final[1]["commands"] == len(ACCOUNTS) * 2 + 130
    assert final[0]["digest"] == final[1]["digest"]
    assert fresh_on_follower == [(200, "applied")] * 60
    assert "duplicate_node" not in source.log_text()
    assert "duplicate_node" not in follower.log_text()
