"""A real node pulling from scripted peers: skew, bad frames, versions."""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from cmdlog.config import ReplicationConfig
from cmdlog.peering import Puller
from cmdlog.replication import PeerState
from tests.cluster import get_json, post_command, status
from tests.fake_peer import FakePeer, commands, hello
from tests.nodes import NodeProcess

Factory = Callable[..., NodeProcess]
OPEN = ["ledger.open", {"account": "far", "currency": "EUR"}]


async def peer_state(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    """Wait until the node reports its one peer with an error or a cursor."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        peers = (await status(session, url))["peers"]
        if peers and (peers[0]["error"] or peers[0]["cursor"]):
            result: dict[str, Any] = peers[0]
            return result
        await asyncio.sleep(0.05)
    raise AssertionError("the node never reported its peer")


async def test_far_future_stamp_held(node_factory: Factory) -> None:
    """A command stamped beyond the skew is stored pending and leaves the clock."""
    ahead_stamp = (time.time_ns() // 1_000_000 + 3_600_000) << 16
    record = ["far-1", *OPEN, ahead_stamp, "fa4e"]
    peer = await FakePeer(hello(head=1) + commands([(1, record)], head=1)).start()
    try:
        node = node_factory(peers=(peer.url,))
        async with aiohttp.ClientSession() as session:
            assert (await peer_state(session, node.url))["cursor"] == 1
            state = await status(session, node.url)
            code, view = await get_json(session, f"{node.url}/commands/far-1")
            _, local = await post_command(
                session, node.url, "local", "ledger.open",
                {"account": "near", "currency": "EUR"},
            )  # fmt: skip
    finally:
        await peer.stop()
    assert state["commands"] == 1
    assert state["applied"] == 0
    assert state["pending_types"] == {"ledger.open": 1}
    assert code == 200
    assert view["outcome"] == {
        "status": "pending",
        "result": None,
        "reason": "clock_skew",
    }
    assert local["stamp"] < ahead_stamp


async def test_oversized_frame_stops_puller(node_factory: Factory) -> None:
    """A frame over the limit stops the puller with its cursor unmoved."""
    oversized = struct.pack(">II", 512 * 1024 * 1024, 0)
    peer = await FakePeer(hello(head=5) + oversized).start()
    try:
        node = node_factory(peers=(peer.url,))
        async with aiohttp.ClientSession() as session:
            state = await peer_state(session, node.url)
            await asyncio.sleep(0.5)
            requests = len(peer.requests)
    finally:
        await peer.stop()
    assert "over the limit" in state["error"]
    assert state["cursor"] == 0
    assert requests == 1
    assert "puller_stopped" in node.log_text()


async def test_corrupt_frame_stops_puller(node_factory: Factory) -> None:
    """A frame whose checksum does not match stops the puller, cursor unmoved."""
    good = commands([(1, ["c-1", *OPEN, 1 << 16, "fa4e"])], head=1)
    corrupt = good[:-1] + bytes([good[-1] ^ 0xFF])
    peer = await FakePeer(hello(head=1) + corrupt).start()
    try:
        node = node_factory(peers=(peer.url,))
        async with aiohttp.ClientSession() as session:
            state = await peer_state(session, node.url)
            commands_stored = (await status(session, node.url))["commands"]
    finally:
        await peer.stop()
    assert "checksum" in state["error"]
    assert state["cursor"] == 0
    assert commands_stored == 0


async def test_peer_version_refused(node_factory: Factory) -> None:
    """A peer speaking another protocol version is refused, naming both."""
    peer = await FakePeer(hello(head=0, version=99)).start()
    try:
        node = node_factory(peers=(peer.url,))
        async with aiohttp.ClientSession() as session:
            state = await peer_state(session, node.url)
    finally:
        await peer.stop()
    assert "99" in state["error"]
    assert "version 1" in state["error"]


async def test_truncated_stream_retried(node_factory: Factory) -> None:
    """A stream cut inside a frame keeps what came before and reconnects."""
    first = commands([(1, ["t-1", *OPEN, 1 << 16, "fa4e"])], head=2)
    second = commands([(2, ["t-2", "ledger.deposit", {"account": "far", "amount": 5},
                            2 << 16, "fa4e"])], head=2)  # fmt: skip
    peer = await FakePeer(hello(head=2) + first + second[:7], hold_open=False).start()
    try:
        node = node_factory(peers=(peer.url,))
        async with aiohttp.ClientSession() as session:
            deadline = time.monotonic() + 10
            while len(peer.requests) < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            state = (await status(session, node.url))["peers"][0]
    finally:
        await peer.stop()
    assert state["cursor"] == 1
    assert len(peer.requests) >= 2
    assert peer.requests[1]["after"] == "1"


@pytest.mark.slow
async def test_silent_peer_reconnected(node_factory: Factory) -> None:
    """A peer that stops sending, heartbeats included, is dropped and redialled."""
    peer = await FakePeer(hello(head=0)).start()
    try:
        node = node_factory(peers=(peer.url,))
        started = time.monotonic()
        while len(peer.requests) < 2 and time.monotonic() - started < 20:
            await asyncio.sleep(0.1)
        redialled_after_s = time.monotonic() - started
    finally:
        await peer.stop()
    assert len(peer.requests) >= 2
    assert redialled_after_s < 5.0 + 5.0 + 2.0
    assert "peer_disconnected" in node.log_text()


@pytest.mark.slow
async def test_sigterm_with_open_streams(node_factory: Factory) -> None:
    """SIGTERM of a node serving and pulling streams exits 0 within seconds and
    loses nothing."""
    first = node_factory("first")
    second = node_factory("second", peers=(first.url,))
    async with aiohttp.ClientSession() as session:
        for i in range(50):
            await post_command(session, first.url, f"k{i}", "ledger.open",
                               {"account": f"a{i}", "currency": "EUR"})  # fmt: skip
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            states = [await status(session, url) for url in (first.url, second.url)]
            if states[1]["commands"] == 50 and states[0]["peers"]:
                break
            await asyncio.sleep(0.1)
    stopping = time.monotonic()
    code = first.terminate(timeout_s=10)
    stop_s = time.monotonic() - stopping
    first.start()
    async with aiohttp.ClientSession() as session:
        after = await status(session, first.url)
    assert code == 0
    assert stop_s < 3.0
    assert after["commands"] == 50


async def open_stream(
    session: aiohttp.ClientSession, url: str, announce: str
) -> tuple[int, str]:
    """Open /replicate announcing `announce`, read its start, and close it.

    A node notices a closed stream at its next heartbeat (1 s), so a 503 for
    all stream slots taken is retried for up to 5 s.
    """
    params = {"after": "0", "announce": announce}
    deadline = time.monotonic() + 5
    while True:
        async with session.get(f"{url}/replicate", params=params) as response:
            if response.status == 200:
                await response.content.readany()
                return response.status, ""
            text = await response.text()
        if response.status != 503 or time.monotonic() > deadline:
            return response.status, text
        await asyncio.sleep(0.2)


async def test_announce_credentials_rejected(node_factory: Factory) -> None:
    """An announced URL with a user name and password is rejected with 400
    and not stored, since it would show in /status and the logs."""
    node = node_factory()
    async with aiohttp.ClientSession() as session:
        code, text = await open_stream(
            session, node.url, "http://user:secret@127.0.0.1:9"
        )
        peers = (await status(session, node.url))["peers"]
    assert code == 400
    assert "--peer-token-file" in text
    assert "secret" not in text
    assert peers == []


async def test_learned_peers_bounded(node_factory: Factory) -> None:
    """Announces past `learned_peers_max` (64) are not learned."""
    node = node_factory()
    async with aiohttp.ClientSession() as session:
        for port in range(20_001, 20_066):
            code, _text = await open_stream(
                session, node.url, f"http://127.0.0.1:{port}"
            )
            assert code == 200
        peers = (await status(session, node.url))["peers"]
    assert len(peers) == 64
    assert "http://127.0.0.1:20065" not in {peer["url"] for peer in peers}


async def test_second_url_of_pulled_node_stops(node_factory: Factory) -> None:
    """A learned URL that reaches a node this node already pulls from under
    its configured URL stops with an error naming both."""
    source = node_factory("source")
    node = node_factory("node", peers=(source.url,))
    alias = source.url.replace("127.0.0.1", "localhost")
    async with aiohttp.ClientSession() as session:
        await post_command(session, source.url, "o1", *OPEN)
        code, _text = await open_stream(session, node.url, alias)
        deadline = time.monotonic() + 10
        errors: dict[str, Any] = {}
        while time.monotonic() < deadline:
            peers = (await status(session, node.url))["peers"]
            errors = {peer["url"]: peer["error"] for peer in peers}
            # The alias's stream ends the configured URL's stream once (one
            # reader node, one stream), which then reconnects.
            if errors.get(alias) and errors.get(source.url) is None:
                break
            await asyncio.sleep(0.05)
    assert code == 200
    assert errors[source.url] is None
    assert source.url in errors[alias]
    assert "already pulls from" in errors[alias]


async def test_puller_error_stops_only_puller() -> None:
    """An unexpected error in a puller is logged and shown as the peer's
    error; it neither escapes to the node nor leaves stop() hanging."""

    class BrokenNode:
        def client_ssl(self) -> None:
            raise RuntimeError("CA bundle unreadable")

    peer = PeerState("http://127.0.0.1:9")
    puller = Puller(BrokenNode(), peer, ReplicationConfig())
    puller.start()
    for _ in range(500):
        if puller.stopped_by_error:
            break
        await asyncio.sleep(0.01)
    await asyncio.wait_for(puller.stop(), timeout=5)

    assert puller.stopped_by_error
    assert peer.error == "RuntimeError: CA bundle unreadable"
