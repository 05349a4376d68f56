"""The client library against a real node, through a proxy that loses replies."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest

from cmdlog.client import Client, RequestError, Unreachable
from tests.lossy_proxy import CannedReply, LossyProxy
from tests.nodes import NodeProcess

# Short backoff keeps each test well under a second of retry sleeps.
FAST_RETRIES = {"backoff_initial_s": 0.01, "backoff_max_s": 0.05}
POLL_ATTEMPTS_MAX = 200
POLL_INTERVAL_S = 0.01
HELD_REPLY_TIMEOUT_S = 10.0


@pytest.fixture
async def proxy(node: NodeProcess) -> AsyncIterator[LossyProxy]:
    """A lossy proxy in front of the `node` fixture's node."""
    lossy = await LossyProxy(node.port).start()
    yield lossy
    await lossy.stop()


def dead_url() -> str:
    """Return the URL of a 127.0.0.1 port where nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


async def open_account(url: str, account: str, amount: int) -> None:
    """Open `account` on the node at `url` and deposit `amount` into it."""
    async with Client([url]) as client:
        await client.submit("ledger.open", {"account": account, "currency": "EUR"})
        await client.submit("ledger.deposit", {"account": account, "amount": amount})


async def balance(url: str, account: str) -> int:
    """Read an account's balance from the node itself, bypassing any proxy."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            f"{url}/queries/ledger.balance", params={"account": account}
        ) as response,
    ):
        assert response.status == 200, await response.text()
        body = await response.json()
    value: int = body["result"]["balance"]
    return value


async def stored_commands(url: str) -> int:
    """Return the count of distinct command IDs the node has stored."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{url}/status") as response,
    ):
        assert response.status == 200, await response.text()
        body = await response.json()
    count: int = body["commands"]
    return count


async def test_lost_reply_charged_once(node: NodeProcess, proxy: LossyProxy) -> None:
    """A charge whose first two replies are lost is charged once and replayed."""
    await open_account(node.url, "acct-1", 100)
    proxy.drop_replies = 2

    async with Client([proxy.url], **FAST_RETRIES) as client:
        submitted = await client.submit(
            "ledger.charge", {"account": "acct-1", "amount": 30}
        )

    assert submitted.replayed is True
    assert submitted.outcome.status == "applied"
    assert client.retries == 2
    assert proxy.upstream_statuses == [201, 200, 200]
    assert await balance(node.url, "acct-1") == 70


async def test_timeout_retry_charged_once(node: NodeProcess, proxy: LossyProxy) -> None:
    """A charge whose reply stalls past the client timeout is charged once."""
    await open_account(node.url, "acct-1", 100)
    proxy.stall_replies = 1

    async with Client([proxy.url], timeout_s=0.3, **FAST_RETRIES) as client:
        submitted = await client.submit(
            "ledger.charge", {"account": "acct-1", "amount": 30}
        )

    assert submitted.replayed is True
    assert client.retries == 1
    assert await balance(node.url, "acct-1") == 70


async def test_retries_keep_key(node: NodeProcess, proxy: LossyProxy) -> None:
    """Every retry sends the same key, so four requests store one command."""
    await open_account(node.url, "acct-1", 100)
    commands_before = await stored_commands(node.url)
    proxy.drop_replies = 3

    async with Client([proxy.url], **FAST_RETRIES) as client:
        submitted = await client.submit(
            "ledger.charge", {"account": "acct-1", "amount": 30}
        )

    posts = proxy.requests_to("POST", "/commands")
    keys = {request.headers["idempotency-key"] for request in posts}
    assert len(posts) == 4
    assert keys == {submitted.id}
    assert await stored_commands(node.url) == commands_before + 1
    assert await balance(node.url, "acct-1") == 70


async def test_caller_key_sent_unchanged(node: NodeProcess, proxy: LossyProxy) -> None:
    """A key the caller passes is the key on every attempt and the command ID."""
    proxy.drop_replies = 1

    async with Client([proxy.url], **FAST_RETRIES) as client:
        submitted = await client.submit(
            "ledger.open", {"account": "acct-1", "currency": "EUR"}, key="open-acct-1"
        )

    keys = [
        r.headers["idempotency-key"] for r in proxy.requests_to("POST", "/commands")
    ]
    assert keys == ["open-acct-1", "open-acct-1"]
    assert submitted.id == "open-acct-1"
    assert submitted.replayed is True


async def test_failover_to_live_node(node: NodeProcess) -> None:
    """A client listing a dead node first still succeeds on the live one."""
    urls = [dead_url(), node.url]

    async with Client(urls, **FAST_RETRIES) as client:
        # The client moves round-robin from a random start, so at least one
        # of two submits tries the dead URL first.
        first = await client.submit("ledger.open", {"account": "a", "currency": "EUR"})
        second = await client.submit("ledger.open", {"account": "b", "currency": "EUR"})

    assert first.node_url == node.url
    assert second.node_url == node.url
    assert client.retries in (1, 2)
    assert await stored_commands(node.url) == 2


async def test_unreachable_after_attempts() -> None:
    """A client whose every node is dead raises Unreachable after attempts_max."""
    async with Client([dead_url()], attempts_max=3, **FAST_RETRIES) as client:
        with pytest.raises(Unreachable, match="3 attempts failed"):
            await client.submit("ledger.open", {"account": "a", "currency": "EUR"})

    assert client.retries == 3


@pytest.mark.parametrize(
    ("type_name", "payload", "key", "status", "code"),
    [
        ("ledger.nope", {"account": "a"}, "k-1", 422, "unknown_command_type"),
        (
            "ledger.deposit",
            {"account": "a", "amount": 0},
            "k-2",
            422,
            "invalid_payload",
        ),
        (
            "ledger.open",
            {"account": "a", "currency": "EUR"},
            "bad key",
            400,
            "invalid_idempotency_key",
        ),
    ],
    ids=["unknown_type", "invalid_amount", "invalid_key"],
)
async def test_client_error_not_retried(
    node: NodeProcess,
    proxy: LossyProxy,
    type_name: str,
    payload: dict[str, object],
    key: str,
    status: int,
    code: str,
) -> None:
    """A 4xx response raises RequestError after one request and stores nothing."""
    async with Client([proxy.url], **FAST_RETRIES) as client:
        with pytest.raises(RequestError) as caught:
            await client.submit(type_name, payload, key=key)

    assert caught.value.status == status
    assert caught.value.code == code
    assert caught.value.message
    assert client.retries == 0
    assert len(proxy.requests) == 1
    assert await stored_commands(node.url) == 0


async def test_key_reuse_not_retried(node: NodeProcess, proxy: LossyProxy) -> None:
    """A key reused with another payload raises 422 at once, naming the key."""
    async with Client([proxy.url], **FAST_RETRIES) as client:
        await client.submit("ledger.open", {"account": "a", "currency": "EUR"}, key="k")
        with pytest.raises(RequestError) as caught:
            await client.submit(
                "ledger.open", {"account": "b", "currency": "EUR"}, key="k"
            )

    assert caught.value.status == 422
    assert "k" in caught.value.message
    assert client.retries == 0
    assert len(proxy.requests) == 2
    assert await stored_commands(node.url) == 1


class HeldRequest:
    """A POST /commands that takes the node's only request slot until `finish`.

    The request asks for `100 Continue` and sends no body until `finish`.
    The node sends the interim response when the handler is about to read
    the body, after the middleware that counts requests in flight, so once
    it arrives the slot is taken.
    """

    BODY = b'{"type": "ledger.open", "payload": {"account": "held", "currency": "EUR"}}'

    def __init__(self, port: int) -> None:
        self.port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def start(self) -> HeldRequest:
        self._reader, self._writer = await asyncio.open_connection(
            "127.0.0.1", self.port
        )
        head = (
            "POST /commands HTTP/1.1\r\n"
            "Host: 127.0.0.1\r\n"
            "Content-Type: application/json\r\n"
            "Idempotency-Key: held\r\n"
            "Expect: 100-continue\r\n"
            "Connection: close\r\n"
            f"Content-Length: {len(self.BODY)}\r\n\r\n"
        )
        self._writer.write(head.encode())
        await self._writer.drain()
        async with asyncio.timeout(HELD_REPLY_TIMEOUT_S):
            interim = await self._reader.readuntil(b"\r\n\r\n")
        assert interim.startswith(b"HTTP/1.1 100"), interim
        return self

    async def finish(self) -> bytes:
        """Send the body and return the status line of the node's response."""
        assert self._reader is not None and self._writer is not None
        self._writer.write(self.BODY)
        await self._writer.drain()
        async with asyncio.timeout(HELD_REPLY_TIMEOUT_S):
            status_line = await self._reader.readline()
        self._writer.close()
        await self._writer.wait_closed()
        return status_line


async def test_overloaded_node_retried(
    node_factory: Callable[..., NodeProcess],
) -> None:
    """A 503 from a node at its request limit is retried until the node has room."""
    busy = node_factory(extra_args=("--requests-max", "1"))
    proxy = await LossyProxy(busy.port).start()
    try:
        held_request = await HeldRequest(busy.port).start()
        async with Client([proxy.url], **FAST_RETRIES) as client:
            submit = asyncio.create_task(
                client.submit("ledger.open", {"account": "a", "currency": "EUR"})
            )
            for _attempt in range(POLL_ATTEMPTS_MAX):
                if 503 in proxy.upstream_statuses or submit.done():
                    break
                await asyncio.sleep(POLL_INTERVAL_S)
            held_status = await held_request.finish()
            submitted = await submit
    finally:
        await proxy.stop()

    assert held_status.startswith(b"HTTP/1.1 201")
    first_503 = proxy.upstream_statuses.index(503)
    assert proxy.upstream_headers[first_503].get("retry-after")
    assert proxy.upstream_statuses[-1] == 201
    assert client.retries == len(proxy.upstream_statuses) - 1
    assert submitted.replayed is False
    assert await stored_commands(busy.url) == 2


@pytest.mark.parametrize(
    "canned",
    [
        CannedReply(409, {"Content-Type": "application/json"}, b"{}"),
        CannedReply(429, {"Retry-After": "0"}),
        CannedReply(
            500,
            {"Content-Type": "application/json"},
            b'{"error": {"code": "internal_error", "message": "retry"}}',
        ),
        CannedReply(502, {"Content-Type": "text/html"}, b"<html>Bad Gateway</html>"),
    ],
    ids=["409", "429", "500_json", "502_html"],
)
async def test_retryable_status_retried(
    node: NodeProcess, proxy: LossyProxy, canned: CannedReply
) -> None:
    """A retryable status that never reached the node is retried to a 201."""
    proxy.canned.append(canned)

    async with Client([proxy.url], **FAST_RETRIES) as client:
        submitted = await client.submit(
            "ledger.open", {"account": "a", "currency": "EUR"}
        )

    assert submitted.replayed is False
    assert client.retries == 1
    assert proxy.upstream_statuses == [201]
    assert await stored_commands(node.url) == 1


@pytest.mark.parametrize("absolute", [True, False], ids=["absolute", "relative"])
async def test_redirect_followed(
    node: NodeProcess, proxy: LossyProxy, absolute: bool
) -> None:
    """A 307 is followed with the same body and key, to an absolute or relative URL."""
    location = f"{node.url}/commands" if absolute else "/commands"
    proxy.canned.append(CannedReply(307, {"Location": location}))

    async with Client([proxy.url], attempts_max=2, **FAST_RETRIES) as client:
        submitted = await client.submit(
            "ledger.open", {"account": "a", "currency": "EUR"}, key="k"
        )

    assert submitted.id == "k"
    assert submitted.replayed is False
    assert client.retries == 0
    assert await stored_commands(node.url) == 1
