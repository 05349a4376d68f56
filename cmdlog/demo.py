"""`cmdlog demo`: a payments workload against a local cluster, through a
deliberately flaky network, with a report of what held.

Three nodes start on 127.0.0.1 in a temporary directory. Clients of the
project's client library open accounts and send deposits, charges with
merchant references and transfers, each through a proxy that cuts some
connections before the request reaches the node and drops some responses
after the node committed. Clients retry with the same key, often through
another node; some terminals "reboot" and resend a charge under a new key
with the same reference. Midway a fourth node joins from one peer and
bootstraps. At the end the demo checks the promises: every node holds the
same commands and digests, no balance is negative, balances equal what the
final outcomes say, and each reference was charged at most once.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from cmdlog.client import Client, Submitted, new_key
from cmdlog.cluster import LocalCluster

ACCOUNTS = [f"acct-{i:02d}" for i in range(24)]
USD_ACCOUNTS = frozenset(ACCOUNTS[::6])
WORKERS = 16
OPERATIONS_PER_WORKER = 250
CUT_REQUEST_P = 0.03
DROP_RESPONSE_P = 0.07
REBOOT_P = 0.1
CONVERGE_TIMEOUT_S = 90.0


class FlakyProxy:
    """A loopback TCP proxy that loses some requests and some responses."""

    def __init__(self, target_url: str, rng: random.Random) -> None:
        self.target_host, port = target_url.removeprefix("http://").split(":")
        self.target_port = int(port)
        self.rng = rng
        self.cut_requests = 0
        self.dropped_responses = 0
        self._server: asyncio.Server | None = None
        self.url = ""

    async def start(self) -> FlakyProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _serve(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        try:
            node_reader, node_writer = await asyncio.open_connection(
                self.target_host, self.target_port
            )
        except OSError:
            client_writer.transport.abort()
            return
        drop_next_response = asyncio.Event()

        async def upstream() -> None:
            while data := await client_reader.read(65536):
                roll = self.rng.random()
                if roll < CUT_REQUEST_P:
                    self.cut_requests += 1
                    return
                if roll < CUT_REQUEST_P + DROP_RESPONSE_P:
                    drop_next_response.set()
                node_writer.write(data)
                await node_writer.drain()

        async def downstream() -> None:
            while data := await node_reader.read(65536):
                if drop_next_response.is_set():
                    self.dropped_responses += 1
                    return
                client_writer.write(data)
                await client_writer.drain()

        tasks = [asyncio.ensure_future(upstream()), asyncio.ensure_future(downstream())]
        with contextlib.suppress(ConnectionError, OSError):
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
        client_writer.transport.abort()
        node_writer.transport.abort()


@dataclass
class Tally:
    """What the clients sent and what they were told."""

    operations: int = 0
    replayed: int = 0
    client_retries: int = 0
    reboots: int = 0
    sent: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)
    references: set[str] = field(default_factory=set)

    def record(
        self,
        submitted: Submitted,
        type_name: str,
        payload: dict[str, Any],
        *,
        resent: bool = False,
    ) -> None:
        self.operations += not resent
        self.replayed += submitted.replayed
        self.sent[submitted.id] = (type_name, payload)


def currency(account: str) -> str:
    return "USD" if account in USD_ACCOUNTS else "EUR"


async def worker(client: Client, rng: random.Random, tally: Tally, index: int) -> None:
    for i in range(OPERATIONS_PER_WORKER):
        roll = rng.random()
        if roll < 0.55:
            account = rng.choice(ACCOUNTS)
            reference = f"order-{index}-{i}"
            payload = {"account": account, "amount": rng.randint(100, 3000),
                       "reference": reference}  # fmt: skip
            submitted = await client.submit("ledger.charge", payload)
            tally.references.add(reference)
            if rng.random() < REBOOT_P:
                # The terminal lost its key and resends the same charge.
                tally.reboots += 1
                again = await client.submit("ledger.charge", payload, key=new_key())
                assert again.id == submitted.id
                tally.record(again, "ledger.charge", payload, resent=True)
            tally.record(submitted, "ledger.charge", payload)
        elif roll < 0.75:
            payload = {
                "account": rng.choice(ACCOUNTS),
                "amount": rng.randint(100, 5000),
            }
            tally.record(
                await client.submit("ledger.deposit", payload),
                "ledger.deposit",
                payload,
            )
        else:
            source, target = rng.sample(ACCOUNTS, 2)
            payload = {"from": source, "to": target, "amount": rng.randint(100, 4000)}
            tally.record(
                await client.submit("ledger.transfer", payload),
                "ledger.transfer",
                payload,
            )


async def progress(
    tally: Tally, total: int, started: float, done: asyncio.Event
) -> None:
    while not done.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), 2.0)
        elapsed = time.monotonic() - started
        print(
            f"  [{elapsed:5.1f}s] {tally.operations:5d}/{total} operations, "
            f"{tally.replayed} replayed answers",
            flush=True,
        )


async def fetch(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url) as response:
        response.raise_for_status()
        return await response.json()


async def wait_converged(
    session: aiohttp.ClientSession, urls: list[str]
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + CONVERGE_TIMEOUT_S
    states: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        states = [await fetch(session, f"{url}/status") for url in urls]
        keys = {(s["commands"], s["applied"], s["digest"]["state"], s["digest"]["log"])
                for s in states}  # fmt: skip
        lagging = any(peer["lag"] for s in states for peer in s["peers"])
        if len(keys) == 1 and not lagging:
            return states
        await asyncio.sleep(0.25)
    return states


async def run_demo(root: Path) -> bool:
    rng = random.Random(2026)
    cluster = LocalCluster(root)
    proxies: list[FlakyProxy] = []
    clients: list[Client] = []
    try:
        print("starting three nodes on 127.0.0.1 ...", flush=True)
        first = await cluster.start_node("node1")
        second = await cluster.start_node("node2", peers=(first.url,))
        third = await cluster.start_node("node3", peers=(first.url, second.url))
        nodes = [first, second, third]
        for node in nodes:
            proxies.append(
                await FlakyProxy(node.url, random.Random(rng.random())).start()
            )
            print(f"  {node.name} at {node.url}, clients go through {proxies[-1].url}")

        tally = Tally()
        clients += [Client([p.url for p in proxies], timeout_s=5, attempts_max=30)
                   for _ in range(WORKERS)]  # fmt: skip
        print("opening accounts ...", flush=True)
        for account in ACCOUNTS:
            opening: dict[str, Any] = {
                "account": account,
                "currency": currency(account),
            }
            tally.record(
                await clients[0].submit("ledger.open", opening), "ledger.open", opening
            )
            funding: dict[str, Any] = {"account": account, "amount": 20_000}
            tally.record(
                await clients[0].submit("ledger.deposit", funding),
                "ledger.deposit",
                funding,
            )

        total = WORKERS * OPERATIONS_PER_WORKER
        print(f"running {WORKERS} clients, {total} payment operations ...", flush=True)
        started = time.monotonic()
        done = asyncio.Event()
        ticker = asyncio.create_task(
            progress(tally, total + 2 * len(ACCOUNTS), started, done)
        )
        workers = [
            asyncio.create_task(worker(client, random.Random(rng.random()), tally, i))
            for i, client in enumerate(clients)
        ]
        while tally.operations < (total + 2 * len(ACCOUNTS)) // 2:
            await asyncio.sleep(0.1)
            failed = [task for task in workers if task.done() and task.exception()]
            if failed:
                await failed[0]  # raises the worker's error
        print("adding node4, which bootstraps from node1 ...", flush=True)
        fourth = await cluster.start_node("node4", peers=(first.url,))
        nodes.append(fourth)
        await asyncio.gather(*workers)
        elapsed = time.monotonic() - started
        done.set()
        await ticker
        tally.client_retries = sum(client.retries for client in clients)

        print("waiting for every node to converge ...", flush=True)
        async with aiohttp.ClientSession() as session:
            states = await wait_converged(session, [node.url for node in nodes])
            return await report(session, nodes, states, tally, proxies, elapsed)
    finally:
        for client in clients:
            await client.close()
        for proxy in proxies:
            await proxy.stop()
        await cluster.stop()


async def report(
    session: aiohttp.ClientSession,
    nodes: list[Any],
    states: list[dict[str, Any]],
    tally: Tally,
    proxies: list[FlakyProxy],
    elapsed_s: float,
) -> bool:
    reader = nodes[-1].url  # the node that joined midway
    reasons: Counter[str] = Counter()
    expected: dict[str, int] = dict.fromkeys(ACCOUNTS, 0)
    for command_id, (type_name, payload) in tally.sent.items():
        view = await fetch(session, f"{reader}/commands/{command_id}")
        outcome = view["outcome"]
        if outcome["status"] != "applied":
            reasons[outcome["reason"]] += 1
            continue
        amount = payload.get("amount", 0)
        if type_name == "ledger.deposit":
            expected[payload["account"]] += amount
        elif type_name == "ledger.charge":
            expected[payload["account"]] -= amount
        elif type_name == "ledger.transfer":
            expected[payload["from"]] -= amount
            expected[payload["to"]] += amount
    balances = {}
    for account in ACCOUNTS:
        body = await fetch(
            session, f"{reader}/queries/ledger.balance?account={account}"
        )
        balances[account] = body["result"]["balance"]

    digests_agree = (
        len({(s["digest"]["state"], s["digest"]["log"]) for s in states}) == 1
    )
    counts_agree = len({s["commands"] for s in states}) == 1
    negative = [account for account, balance in balances.items() if balance < 0]
    conserved = balances == expected
    charges = [cid for cid, (t, p) in tally.sent.items() if t == "ledger.charge"]
    once_per_reference = len(set(charges)) == len(tally.references)

    print()
    print("cmdlog demo report")
    print(
        f"  commands stored          {states[0]['commands']} (distinct IDs, every node)"
    )
    print(f"  client operations        {tally.operations}")
    rate = tally.operations / elapsed_s
    print(f"  throughput               {rate:,.0f} operations/s over {elapsed_s:.1f} s")
    print(f"  requests cut by network  {sum(p.cut_requests for p in proxies)}")
    print(f"  responses lost           {sum(p.dropped_responses for p in proxies)}")
    print(f"  retries absorbed         {tally.client_retries} client retries, "
          f"{tally.replayed} answered as replays")  # fmt: skip
    print(f"  terminal reboots         {tally.reboots} charges resent under a new key")
    print(
        "  rejections by reason     "
        + (", ".join(f"{r} {n}" for r, n in sorted(reasons.items())) or "none")
    )
    for node, state in zip(nodes, states, strict=True):
        print(
            f"  {node.name:6s} commands={state['commands']} "
            f"state={state['digest']['state'][:16]} log={state['digest']['log'][:16]}"
        )
    checks = {
        "every node holds the same commands and digests": digests_agree
        and counts_agree,
        "no balance is negative": not negative,
        "balances equal the applied outcomes (conservation)": conserved,
        "each reference charged at most once": once_per_reference,
    }
    for name, passed in checks.items():
        print(f"  {'ok  ' if passed else 'FAIL'} {name}")
    return all(checks.values())


def main() -> int:
    root = Path(tempfile.mkdtemp(prefix="cmdlog-demo-"))
    try:
        passed = asyncio.run(run_demo(root))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print("demo passed" if passed else "demo FAILED: an invariant does not hold")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
