"""The serving end of GET /replicate: hand-off, slow and dead readers."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable

import aiohttp
import lmdb
import pytest

from cmdlog.frames import FrameReader
from tests.cluster import post_batch, post_command, status
from tests.nodes import NodeProcess

Factory = Callable[..., NodeProcess]
DISPLAY_NAME = "x" * 120


async def fill(session: aiohttp.ClientSession, url: str, batches: int) -> None:
    for batch in range(batches):
        items = [
            {"id": f"u{batch}-{i}", "type": "users.register",
             "payload": {"username": f"user{batch}x{i}", "display_name": DISPLAY_NAME}}
            for i in range(1000)
        ]  # fmt: skip
        results = await post_batch(session, url, items)
        assert all(result["status"] == 201 for result in results)


async def read_stream(
    session: aiohttp.ClientSession, url: str, *, until_seq: int, pause_s: float
) -> list[int]:
    """Read /replicate slowly until `until_seq`; return the sequence numbers."""
    reader = FrameReader(frame_bytes_max=8 << 20)
    seqs: list[int] = []
    async with session.get(f"{url}/replicate?after=0") as response:
        assert response.status == 200
        async for chunk in response.content.iter_chunked(16 * 1024):
            for frame in reader.feed(chunk):
                seqs += [entry[0] for entry in frame.get("entries", [])]
            if seqs and seqs[-1] >= until_seq:
                return seqs
            await asyncio.sleep(pause_s)
    return seqs


def gauge(metrics_text: str, name: str) -> float:
    for line in metrics_text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def test_live_tail_has_no_gap(node: NodeProcess) -> None:
    """A reader that catches up during a write burst sees every entry once, in order."""
    async with aiohttp.ClientSession() as session:
        await post_command(session, node.url, "open", "ledger.open",
                           {"account": "a", "currency": "EUR"})  # fmt: skip

        async def burst() -> None:
            for i in range(300):
                await post_command(session, node.url, f"d{i}", "ledger.deposit",
                                   {"account": "a", "amount": 1})  # fmt: skip

        reading = asyncio.create_task(
            read_stream(session, node.url, until_seq=301, pause_s=0.0)
        )
        await burst()
        seqs = await asyncio.wait_for(reading, timeout=30)
    assert seqs == list(range(1, 302))


@pytest.mark.slow
async def test_slow_reader_served_in_full(node: NodeProcess) -> None:
    """A reader slower than the log gets every entry in order, from the store."""
    async with aiohttp.ClientSession() as session:
        await fill(session, node.url, 5)
        seqs = await read_stream(session, node.url, until_seq=5000, pause_s=0.005)
    assert seqs == list(range(1, 5001))


@pytest.mark.slow
async def test_dead_reader_dropped(node: NodeProcess) -> None:
    """A reader that stops reading is dropped within two heartbeats, holds no
    read transaction, and costs bounded memory."""
    async with aiohttp.ClientSession() as session:
        await fill(session, node.url, 25)
        rss_before = rss_bytes(node.pid)

        stalled = socket.socket()
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.connect(("127.0.0.1", node.port))
        stalled.sendall(b"GET /replicate?after=0 HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            # The node may take a moment to start serving the request.
            opened = 0.0
            waited = time.monotonic()
            while not opened and time.monotonic() - waited < 5:
                async with session.get(node.url + "/metrics") as response:
                    opened = gauge(await response.text(), "cmdlog_replication_streams")
            started = time.monotonic()
            streams = opened
            while streams and time.monotonic() - started < 10:
                await asyncio.sleep(0.1)
                async with session.get(node.url + "/metrics") as response:
                    streams = gauge(await response.text(), "cmdlog_replication_streams")
            dropped_after_s = time.monotonic() - started
            rss_after = rss_bytes(node.pid)
        finally:
            stalled.close()
        still_serving = (await status(session, node.url))["commands"]

    env = lmdb.open(str(node.data_dir), max_dbs=64, readonly=True, lock=True)
    try:
        readers = env.readers().splitlines()[1:]
    finally:
        env.close()
    active = [
        line for line in readers if str(node.pid) in line and line.split()[-1] != "-"
    ]

    assert opened == 1
    assert streams == 0
    assert dropped_after_s < 2 * 1.0 + 1.5
    assert active == []
    assert rss_after - rss_before < 64 << 20
    assert still_serving == 25_000


async def open_raw_stream(port: int, query: str) -> tuple[socket.socket, bytes]:
    """Send a /replicate request on a raw socket; return it and the status line."""
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.connect(("127.0.0.1", port))
    raw.sendall(f"GET /replicate?{query} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    raw.settimeout(10)
    head = raw.recv(4096).split(b"\r\n", 1)[0]
    return raw, head


def closed_by_node(raw: socket.socket) -> bool:
    """Read until the node closes the socket; False if it stays open for 5 s."""
    raw.settimeout(5)
    try:
        while raw.recv(65536):
            pass
    except TimeoutError:
        return False
    return True


async def test_stream_slots_go_to_named_readers(node: NodeProcess) -> None:
    """Readers that never read cannot keep peers out: with every slot taken
    by readers that did not name a node, a reader that names one ends the
    oldest of them and is served, while another unnamed reader gets 503. A
    node that opens a second stream ends its first."""
    reader = "node=abc123&boot=def456"
    sockets = []
    try:
        for _ in range(64):
            sockets.append((await open_raw_stream(node.port, "after=0"))[0])
        unnamed_raw, unnamed_head = await open_raw_stream(node.port, "after=0")
        sockets.append(unnamed_raw)
        first_raw, first_head = await open_raw_stream(node.port, f"after=0&{reader}")
        sockets.append(first_raw)
        oldest_closed = await asyncio.to_thread(closed_by_node, sockets[0])
        second_raw, second_head = await open_raw_stream(node.port, f"after=0&{reader}")
        sockets.append(second_raw)
        first_closed = await asyncio.to_thread(closed_by_node, first_raw)
    finally:
        for raw in sockets:
            raw.close()

    assert unnamed_head == b"HTTP/1.1 503 Service Unavailable"
    assert first_head == b"HTTP/1.1 200 OK"
    assert oldest_closed
    assert second_head == b"HTTP/1.1 200 OK"
    assert first_closed


@pytest.mark.slow
async def test_heartbeats_while_commits_append_nothing(node: NodeProcess) -> None:
    """A stream sends a heartbeat every second while commits that append
    nothing, here retried writes, keep waking it."""
    command = ("open", "ledger.open", {"account": "a", "currency": "EUR"})
    reader = FrameReader(frame_bytes_max=8 << 20)
    kinds: list[str] = []
    async with aiohttp.ClientSession() as session:
        code, _ = await post_command(session, node.url, *command)
        assert code == 201

        async def retry_for(duration_s: float) -> None:
            deadline = time.monotonic() + duration_s
            while time.monotonic() < deadline:
                code, _ = await post_command(session, node.url, *command)
                assert code == 200
                await asyncio.sleep(0.05)

        async with session.get(f"{node.url}/replicate?after=1") as response:
            retrying = asyncio.create_task(retry_for(3.5))
            deadline = time.monotonic() + 3.5
            while (remaining_s := deadline - time.monotonic()) > 0:
                try:
                    async with asyncio.timeout(remaining_s):
                        chunk = await response.content.readany()
                except TimeoutError:
                    break
                kinds += [frame["t"] for frame in reader.feed(chunk)]
            await retrying

    assert kinds[0] == "hello"
    assert kinds.count("heartbeat") >= 2
