"""Tests that malformed bodies get a 4xx from cmdlog.http_api and record nothing.

All cases of tests.malformed_corpus run against one node, which must keep
serving after each of them.
"""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import msgpack
import pytest

from tests.malformed_corpus import CASES, MalformedCase
from tests.nodes import NodeProcess

JSON = "application/json"
MSGPACK = "application/msgpack"


@pytest.fixture(scope="module")
def corpus_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """One node with default limits, shared by every case of the corpus."""
    node = NodeProcess(tmp_path_factory.mktemp("malformed") / "node").start()
    yield node
    if node.is_running():
        node.kill()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as client:
        yield client


def decode_body(content_type: str, raw: bytes) -> Any:
    if content_type == MSGPACK:
        return msgpack.unpackb(raw, raw=False)
    if content_type == JSON:
        return json.loads(raw)
    return raw.decode("utf-8", errors="replace")


async def command_count(session: aiohttp.ClientSession, node: NodeProcess) -> int:
    async with session.get(node.url + "/status") as response:
        assert response.status == 200
        status = await response.json()
    count: int = status["commands"]
    return count


def test_corpus_size() -> None:
    """The corpus has at least 50 cases, each with its own name."""
    names = [case.name for case in CASES]

    assert len(names) >= 50
    assert len(set(names)) == len(names)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
async def test_malformed_body_rejected(
    corpus_node: NodeProcess, session: aiohttp.ClientSession, case: MalformedCase
) -> None:
    """A malformed body gets a 4xx error, records nothing and leaves the node up."""
    headers = {"Idempotency-Key": f"corpus-{case.name}", **case.headers}
    if case.content_type is not None:
        headers["Content-Type"] = case.content_type
    count = await command_count(session, corpus_node)

    async with session.post(
        corpus_node.url + case.path,
        data=io.BytesIO(case.body),
        headers=headers,
        skip_auto_headers=("Content-Type",),
    ) as response:
        status = response.status
        body = decode_body(response.content_type, await response.read())
    async with session.get(corpus_node.url + "/healthz") as health:
        health_status = health.status

    assert 400 <= status < 500, body
    assert isinstance(body, dict), body
    assert isinstance(body["error"]["code"], str), body
    assert body["error"]["message"].strip(), body
    assert await command_count(session, corpus_node) == count
    assert health_status == 200
