"""Tests that a write acknowledged over HTTP survives SIGKILL and SIGTERM.

These run real `cmdlog serve` processes and restart them on the same data
directory, so each takes a few seconds and is marked slow.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import signal
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from tests.nodes import NodeProcess
from tests.raw_http import command_head, raw_request
from tests.slow_app import APPLY_S

JSON = "application/json"
KILL_ROUNDS = 20
IN_FLIGHT_REQUESTS = 50
POLL_ATTEMPTS_MAX = 250
POLL_INTERVAL_S = 0.02
RESPONSE_TIMEOUT_S = 20.0
SHUTDOWN_TIMEOUT_S = 2.0
EXIT_MARGIN_S = 1.5
"""Time a node may take past its shutdown timeout to exit, for aiohttp's last
wait on the stalled connection, the writer's last commit and closing LMDB."""
_STATUS_LINE = re.compile(rb"HTTP/1\.1 (\d{3}) ")


def request(
    node: NodeProcess,
    method: str,
    path: str,
    body: Any = None,
    key: str | None = None,
) -> tuple[int, Any]:
    """Send one JSON request on a fresh connection and return status and body."""
    headers = {"Content-Type": JSON}
    if key is not None:
        headers["Idempotency-Key"] = key
    connection = http.client.HTTPConnection("127.0.0.1", node.port, timeout=10)
    try:
        data = None if body is None else json.dumps(body).encode()
        connection.request(method, path, body=data, headers=headers)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def deposit(account: str, amount: int = 1) -> dict[str, Any]:
    return {"type": "ledger.deposit", "payload": {"account": account, "amount": amount}}


def open_account(node: NodeProcess, account: str) -> None:
    status, body = request(
        node,
        "POST",
        "/commands",
        {"type": "ledger.open", "payload": {"account": account, "currency": "EUR"}},
        key=f"open-{account}",
    )
    assert status == 201, body


def balance(node: NodeProcess, account: str) -> int:
    status, body = request(node, "GET", f"/queries/ledger.balance?account={account}")
    assert status == 200, body
    amount: int = body["result"]["balance"]
    return amount


def path_of(command_id: str) -> str:
    return "/commands/" + urllib.parse.quote(command_id, safe="")


@pytest.mark.slow
def test_sigkill_after_201_keeps_command(
    node_factory: Callable[..., NodeProcess],
) -> None:
    """A command acknowledged with 201 survives an immediate SIGKILL unchanged."""
    node = node_factory()
    open_account(node, "kill")
    created: dict[str, dict[str, Any]] = {}

    for round_number in range(KILL_ROUNDS):
        key = f"kill-{round_number}"
        status, view = request(node, "POST", "/commands", deposit("kill"), key=key)
        node.kill()
        assert status == 201, f"round {round_number}: {view}"
        created[key] = view
        node.start()

        found_status, found = request(node, "GET", path_of(key))
        assert found_status == 200, f"round {round_number}: {found}"
        assert found["stamp"] == view["stamp"], f"round {round_number}"
        assert found == view, f"round {round_number}"

    stamps = [view["stamp"] for view in created.values()]
    assert stamps == sorted(stamps), "stamps went backwards across restarts"
    assert len(set(stamps)) == len(stamps), "two commands share a stamp"
    assert balance(node, "kill") == KILL_ROUNDS


async def hold_deposit(
    node: NodeProcess, key: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """Send a deposit's headers and part of its body, and return the rest."""
    body = json.dumps(deposit("drain")).encode()
    head = command_head(node.port, key, len(body))
    reader, writer = await raw_request("127.0.0.1", node.port, head + body[:10])
    return reader, writer, body[10:]


async def in_flight(session: aiohttp.ClientSession, node: NodeProcess) -> int:
    """Read the in-flight gauge, leaving out the /metrics request itself."""
    async with session.get(node.url + "/metrics") as response:
        text = await response.text()
    match = re.search(r"^cmdlog_http_requests_in_flight (\S+)$", text, re.M)
    assert match is not None, text[:500]
    return int(float(match.group(1))) - 1


async def wait_for_in_flight(node: NodeProcess, expected: int) -> int:
    async with aiohttp.ClientSession() as session:
        count = await in_flight(session, node)
        for _ in range(POLL_ATTEMPTS_MAX):
            if count >= expected:
                break
            await asyncio.sleep(POLL_INTERVAL_S)
            count = await in_flight(session, node)
    return count


async def wait_until_not_listening(node: NodeProcess) -> bool:
    """Return True once the node refuses new connections, its first drain step."""
    for _ in range(POLL_ATTEMPTS_MAX):
        try:
            _reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
        except ConnectionRefusedError:
            return True
        writer.close()
        await writer.wait_closed()
        await asyncio.sleep(POLL_INTERVAL_S)
    return False


async def finish_request(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, rest: bytes
) -> int | None:
    """Send the rest of a held body and return the response status.

    None means the connection closed without a response.
    """
    try:
        writer.write(rest)
        await writer.drain()
        response = await asyncio.wait_for(reader.read(), timeout=RESPONSE_TIMEOUT_S)
    except (ConnectionError, TimeoutError):
        return None
    finally:
        writer.close()
    match = _STATUS_LINE.match(response)
    return int(match.group(1)) if match else None


@pytest.mark.slow
async def test_sigterm_drains_in_flight(
    node_factory: Callable[..., NodeProcess],
) -> None:
    """SIGTERM with 50 requests in flight exits 0, keeps every 2xx, responds to all."""
    node = node_factory()
    open_account(node, "drain")
    keys = [f"drain-{index}" for index in range(IN_FLIGHT_REQUESTS)]
    held_requests = [await hold_deposit(node, key) for key in keys]
    count_in_flight = await wait_for_in_flight(node, IN_FLIGHT_REQUESTS)

    node.signal(signal.SIGTERM)
    stopped_listening = await wait_until_not_listening(node)
    statuses = await asyncio.gather(
        *(
            finish_request(reader, writer, rest)
            for reader, writer, rest in held_requests
        )
    )
    exit_code = await asyncio.to_thread(node.wait)

    assert count_in_flight == IN_FLIGHT_REQUESTS
    assert stopped_listening
    assert exit_code == 0, node.log_text()[-3000:]
    unexpected = [status for status in statuses if status not in (201, 503, None)]
    assert unexpected == [], statuses
    acknowledged = [
        key for key, status in zip(keys, statuses, strict=True) if status == 201
    ]
    node.start()
    for key in acknowledged:
        found_status, found = request(node, "GET", path_of(key))
        assert found_status == 200, f"{key}: {found}"
    assert balance(node, "drain") == len(acknowledged)
    # Draining means each request in flight at SIGTERM gets a response (201 or
    # 503) instead of a connection closed at the shutdown timeout.
    unanswered = [key for key, status in zip(keys, statuses, strict=True) if not status]
    assert unanswered == [], f"{len(unanswered)} requests got no response"


@pytest.mark.slow
async def test_sigterm_during_burst(
    node_factory: Callable[..., NodeProcess],
) -> None:
    """SIGTERM amid a burst of 50 requests exits 0 and keeps every 2xx write."""
    node = node_factory()
    open_account(node, "burst")
    keys = [f"burst-{index}" for index in range(IN_FLIGHT_REQUESTS)]
    connector = aiohttp.TCPConnector(limit=IN_FLIGHT_REQUESTS)
    timeout = aiohttp.ClientTimeout(total=RESPONSE_TIMEOUT_S)

    async def post(session: aiohttp.ClientSession, key: str) -> int | None:
        try:
            async with session.post(
                node.url + "/commands",
                data=json.dumps(deposit("burst")).encode(),
                headers={"Content-Type": JSON, "Idempotency-Key": key},
            ) as response:
                await response.read()
                return response.status
        except aiohttp.ClientError:
            return None

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks = [asyncio.create_task(post(session, key)) for key in keys]
        done, _pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        node.signal(signal.SIGTERM)
        started_at = time.monotonic()
        statuses = await asyncio.gather(*tasks)
    exit_code = await asyncio.to_thread(node.wait)

    assert done, "no request finished before SIGTERM"
    assert time.monotonic() - started_at < RESPONSE_TIMEOUT_S
    assert exit_code == 0, node.log_text()[-3000:]
    unexpected = [status for status in statuses if status not in (201, 503, None)]
    assert unexpected == [], statuses
    acknowledged = [
        key for key, status in zip(keys, statuses, strict=True) if status == 201
    ]
    node.start()
    for key in acknowledged:
        found_status, found = request(node, "GET", path_of(key))
        assert found_status == 200, f"{key}: {found}"
    assert balance(node, "burst") == len(acknowledged)


@pytest.mark.slow
async def test_sigterm_ends_stalled_upload(
    node_factory: Callable[..., NodeProcess],
) -> None:
    """SIGTERM with an upload stalled mid-body exits 0 within the shutdown
    timeout, sends the upload 503, and keeps a command that was committing."""
    assert APPLY_S < SHUTDOWN_TIMEOUT_S
    node = node_factory(
        app="tests.slow_app:app",
        extra_args=("--shutdown-timeout-s", str(SHUTDOWN_TIMEOUT_S)),
    )
    stalled_reader, stalled_writer = await raw_request(
        "127.0.0.1", node.port, command_head(node.port, "stalled", 1000) + b'{"type"'
    )
    note = json.dumps({"type": "slow.note", "payload": {}}).encode()
    committing_reader, committing_writer = await raw_request(
        "127.0.0.1", node.port, command_head(node.port, "committing", len(note)) + note
    )
    count_in_flight = await wait_for_in_flight(node, 2)

    node.signal(signal.SIGTERM)
    signalled_at = time.monotonic()
    exit_code = await asyncio.to_thread(node.wait)
    exit_s = time.monotonic() - signalled_at
    try:
        committing = await asyncio.wait_for(committing_reader.read(), timeout=10)
        stalled = await asyncio.wait_for(stalled_reader.read(), timeout=10)
    finally:
        committing_writer.close()
        stalled_writer.close()
    node.start()
    committed_status, committed = request(node, "GET", path_of("committing"))
    stalled_status, _ = request(node, "GET", path_of("stalled"))

    assert count_in_flight == 2
    assert exit_code == 0, node.log_text()[-3000:]
    assert exit_s < SHUTDOWN_TIMEOUT_S + EXIT_MARGIN_S
    assert committing.startswith(b"HTTP/1.1 201 "), committing[:300]
    assert stalled.startswith(b"HTTP/1.1 503 "), stalled[:300]
    assert b'"code":"shutting_down"' in stalled, stalled[:300]
    assert committed_status == 200, committed
    assert committed["outcome"]["status"] == "applied", committed
    assert stalled_status == 404
