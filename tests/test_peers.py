"""Copies of one data directory running at once, as real nodes see them."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from cmdlog.cli import main
from tests.cluster import get_json, post_command, status, wait_converged
from tests.fake_peer import FakePeer, hello
from tests.nodes import NodeProcess

Factory = Callable[..., NodeProcess]
Peers = dict[str, dict[str, Any]]
FIX = "'cmdlog identity --data DIR --regenerate'"
SETTLE_TIMEOUT_S = 15.0


async def open_account(session: aiohttp.ClientSession, url: str, account: str) -> None:
    code, _ = await post_command(
        session, url, f"open-{account}", "ledger.open",
        {"account": account, "currency": "EUR"},
    )  # fmt: skip
    assert code == 201


def restart_safe_session() -> aiohttp.ClientSession:
    """Return a session without kept-alive connections, which a node's
    restart would break."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))


def start_copy(
    node_factory: Factory, tmp_path: Path, original: NodeProcess, **kwargs: Any
) -> NodeProcess:
    """Stop `original`, copy its data directory, start it again, then start
    the copy with `kwargs`."""
    original.terminate()
    shutil.copytree(original.data_dir, tmp_path / "copy")
    original.start()
    return node_factory("copy", **kwargs)


async def start_copies(
    session: aiohttp.ClientSession,
    node_factory: Factory,
    tmp_path: Path,
    *,
    copy_pulls_original: bool,
) -> tuple[NodeProcess, NodeProcess, str]:
    """Start a node with account `shared` and a copy of its data directory,
    open account `on-original` on the node and `on-copy` on the copy, and
    return both and their node ID."""
    original = node_factory("original")
    await open_account(session, original.url, "shared")
    node_id = (await status(session, original.url))["node"]
    peers = (original.url,) if copy_pulls_original else ()
    copy = start_copy(node_factory, tmp_path, original, peers=peers)
    await open_account(session, original.url, "on-original")
    await open_account(session, copy.url, "on-copy")
    return original, copy, node_id


async def wait_for_peers(
    session: aiohttp.ClientSession, url: str, settled: Callable[[Peers], bool]
) -> Peers:
    """Poll the node's /status until `settled` holds for its peers, by URL,
    and return them."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    peers: Peers = {}
    while time.monotonic() < deadline:
        peers = {peer["url"]: peer for peer in (await status(session, url))["peers"]}
        if settled(peers):
            return peers
        await asyncio.sleep(0.1)
    raise AssertionError(f"the peers of {url} did not settle: {peers}")


def has_error(url: str) -> Callable[[Peers], bool]:
    return lambda peers: bool(peers.get(url, {}).get("error"))


async def test_copy_and_original_reject_each_other(
    node_factory: Factory, tmp_path: Path
) -> None:
    """A copy started beside its original and pointed at it is rejected by
    both, with an error naming the other's URL, the node ID and the fix."""
    async with restart_safe_session() as session:
        original, copy, node_id = await start_copies(
            session, node_factory, tmp_path, copy_pulls_original=True
        )
        on_copy = await wait_for_peers(session, copy.url, has_error(original.url))
        on_original = await wait_for_peers(session, original.url, has_error(copy.url))
        code_on_original, _ = await get_json(
            session, f"{original.url}/commands/open-on-copy"
        )
        code_on_copy, _ = await get_json(
            session, f"{copy.url}/commands/open-on-original"
        )

    copy_error = on_copy[original.url]["error"]
    assert copy_error.startswith(f"{original.url} runs with this node's ID {node_id}")
    assert "is a copy of the other" in copy_error
    assert FIX in copy_error
    original_error = on_original[copy.url]["error"]
    assert original_error.startswith(f"{copy.url} runs with this node's ID {node_id}")
    assert FIX in original_error
    assert code_on_original == 404
    assert code_on_copy == 404
    assert "duplicate_node_detected" in original.log_text()
    assert "duplicate_node_detected" in copy.log_text()


@pytest.mark.slow
async def test_third_node_rejects_second_copy(
    node_factory: Factory, tmp_path: Path
) -> None:
    """A node that pulls from a node and from a copy of it rejects the one
    it reached second, naming both URLs, and ingests nothing from it."""
    async with restart_safe_session() as session:
        original, copy, node_id = await start_copies(
            session, node_factory, tmp_path, copy_pulls_original=False
        )
        third = node_factory("third", peers=(original.url, copy.url))

        def settled(peers: Peers) -> bool:
            states = [peers.get(url, {}) for url in (original.url, copy.url)]
            rejected = [state for state in states if state.get("error")]
            pulled = [state for state in states if state.get("connected")]
            return len(rejected) == 1 and len(pulled) == 1 and pulled[0]["lag"] == 0

        peers = await wait_for_peers(session, third.url, settled)
        codes = {}
        for account in ("on-original", "on-copy"):
            codes[account], _ = await get_json(
                session, f"{third.url}/commands/open-{account}"
            )

    [rejected] = [url for url in (original.url, copy.url) if peers[url]["error"]]
    [pulled] = [url for url in (original.url, copy.url) if url != rejected]
    error = peers[rejected]["error"]
    assert error.startswith(f"{rejected} and {pulled} both report node ID {node_id}")
    assert "from two processes" in error
    assert FIX in error
    assert error.endswith(f"Until then this node pulls from {pulled} only")
    assert peers[rejected]["connected"] is False
    assert codes["on-original"] == (404 if rejected == original.url else 200)
    assert codes["on-copy"] == (404 if rejected == copy.url else 200)
    assert "duplicate_node_detected" in third.log_text()


@pytest.mark.slow
async def test_node_serving_two_copies_rejects_one(
    node_factory: Factory, tmp_path: Path
) -> None:
    """A node that two copies pull from rejects the stream of the one it
    served first when that one comes back, with a 409 naming both processes."""
    hub = node_factory("hub")
    original = node_factory("original")
    async with restart_safe_session() as session:
        await open_account(session, original.url, "shared")
        original.peers = (hub.url,)
        copy = start_copy(node_factory, tmp_path, original, peers=(hub.url,))
        hub_id = (await status(session, hub.url))["node"]
        node_id = (await status(session, original.url))["node"]

        expected = (
            f"refused the stream with 409: another process with node ID {node_id}"
        )
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        errors: list[str] = []
        while time.monotonic() < deadline and not errors:
            for url in (original.url, copy.url):
                peers = {p["url"]: p for p in (await status(session, url))["peers"]}
                error = peers.get(hub.url, {}).get("error") or ""
                if expected in error:
                    errors.append(error)
            await asyncio.sleep(0.1)

    assert errors
    for error in errors:
        assert f"already reads the log of node {hub_id}" in error
        assert FIX in error


@pytest.mark.slow
async def test_regenerated_copy_rejoins(node_factory: Factory, tmp_path: Path) -> None:
    """A copy given a new identity with `cmdlog identity --regenerate` and
    started again is pulled from again, and every command reaches both nodes."""
    async with restart_safe_session() as session:
        original, copy, node_id = await start_copies(
            session, node_factory, tmp_path, copy_pulls_original=True
        )
        await wait_for_peers(session, original.url, has_error(copy.url))

        copy.terminate()
        assert main(["identity", "--data", str(copy.data_dir), "--regenerate"]) == 0
        copy.start()
        states = await wait_converged(session, [original.url, copy.url])
        views = {}
        for url in (original.url, copy.url):
            for account in ("shared", "on-original", "on-copy"):
                code, view = await get_json(session, f"{url}/commands/open-{account}")
                assert code == 200
                views[url, account] = view

    assert states[0]["commands"] == 3
    assert states[1]["node"] != node_id
    assert states[0]["node"] == node_id
    assert views[original.url, "on-copy"]["origin"] == node_id
    assert views[copy.url, "on-copy"]["origin"] == node_id


@pytest.mark.slow
async def test_silent_stream_not_taken_for_copy(node_factory: Factory) -> None:
    """Two URLs that report one node ID from two processes are both pulled
    from while the first one's stream sends nothing more, as a stream to a
    process that stopped."""
    first = await FakePeer(hello(head=0, boot="b1")).start()
    second = await FakePeer(hello(head=0, boot="b2")).start()
    try:
        node = node_factory(peers=(first.url, second.url))
        # The check waits up to 5 s (the read idle timeout) for the next
        # frame of the URL connected first, whose stream is dropped by then.
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while time.monotonic() < deadline:
            if connected_urls(node) == {first.url, second.url}:
                break
            await asyncio.sleep(0.1)
        async with aiohttp.ClientSession() as session:
            peers = (await status(session, node.url))["peers"]
    finally:
        await first.stop()
        await second.stop()
    assert connected_urls(node) == {first.url, second.url}
    assert all("two processes" not in (peer["error"] or "") for peer in peers)
    assert "duplicate_node_detected" not in node.log_text()


def connected_urls(node: NodeProcess) -> set[str]:
    """Return the peer URLs the node's log reports a `peer_connected` for."""
    urls = set()
    for line in node.log_text().splitlines():
        if '"peer_connected"' in line:
            urls.add(json.loads(line)["peer"])
    return urls
