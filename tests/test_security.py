"""Principals, peer authentication, TLS and secrets, against real nodes."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import aiohttp
import trustme

from tests.cluster import wait_converged
from tests.nodes import NodeProcess

Factory = Callable[..., NodeProcess]
ALICE, BOB, PEER = "alice-secret-token-1", "bob-secret-token-2", "peer-secret-token-3"
OPEN = {"type": "ledger.open", "payload": {"account": "acc", "currency": "EUR"}}


def tokens_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text(f"# principal token\nalice {ALICE}\nbob {BOB}\n")
    return path


def peer_token_file(tmp_path: Path) -> Path:
    path = tmp_path / "peer-token"
    path.write_text(PEER + "\n")
    return path


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def post(
    session: aiohttp.ClientSession, url: str, token: str, key: str, body: object
) -> tuple[int, dict[str, object]]:
    headers = {**auth(token), "Idempotency-Key": key}
    async with session.post(url + "/commands", json=body, headers=headers) as response:
        return response.status, await response.json()


async def test_keys_scoped_by_principal(node_factory: Factory, tmp_path: Path) -> None:
    """Two principals using one key get two commands and cannot read each other's."""
    node = node_factory(extra_args=("--tokens-file", str(tokens_file(tmp_path))))
    other = {
        "type": "ledger.open",
        "payload": {"account": "bob-acc", "currency": "EUR"},
    }
    async with aiohttp.ClientSession() as session:
        alice_status, alice_view = await post(session, node.url, ALICE, "k1", OPEN)
        bob_status, bob_view = await post(session, node.url, BOB, "k1", other)
        async with session.get(
            f"{node.url}/commands/k1", headers=auth(BOB)
        ) as response:
            bob_reads = await response.json()
        async with session.get(
            f"{node.url}/commands/alice%2Fk1", headers=auth(BOB)
        ) as response:
            guessed = response.status
        async with session.get(f"{node.url}/commands/k1") as response:
            anonymous = response.status
    assert alice_status == 201
    assert bob_status == 201
    assert alice_view["id"] == "alice/k1"
    assert bob_view["id"] == "bob/k1"
    assert bob_reads["id"] == "bob/k1"
    assert guessed == 404
    assert anonymous == 401


async def test_natural_key_shared_across_principals(
    node_factory: Factory, tmp_path: Path
) -> None:
    """A charge's reference names one transaction whoever sends it."""
    node = node_factory(extra_args=("--tokens-file", str(tokens_file(tmp_path))))
    payload = {"account": "acc", "amount": 5, "reference": "r-1"}
    charge = {"type": "ledger.charge", "payload": payload}
    fund = {"type": "ledger.deposit", "payload": {"account": "acc", "amount": 50}}
    async with aiohttp.ClientSession() as session:
        await post(session, node.url, ALICE, "open", OPEN)
        await post(session, node.url, ALICE, "fund", fund)
        first = await post(session, node.url, ALICE, "c-a", charge)
        second = await post(session, node.url, BOB, "c-b", charge)
    assert first[0] == 201
    assert second[0] == 200
    assert first[1]["id"] == second[1]["id"]


async def test_replicate_needs_peer_token(
    node_factory: Factory, tmp_path: Path
) -> None:
    """/replicate answers only the peer token; client tokens do not open it."""
    node = node_factory(
        extra_args=(
            "--tokens-file", str(tokens_file(tmp_path)),
            "--peer-token-file", str(peer_token_file(tmp_path)),
        )
    )  # fmt: skip
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        statuses = {}
        for name, headers in (
            ("none", {}),
            ("client", auth(ALICE)),
            ("peer", auth(PEER)),
        ):
            async with session.get(
                f"{node.url}/replicate", headers=headers
            ) as response:
                statuses[name] = response.status
    assert statuses == {"none": 401, "client": 401, "peer": 200}


async def test_replicate_rejects_principal_tokens(
    node_factory: Factory, tmp_path: Path
) -> None:
    """With several principals and no peer token, no client token opens
    /replicate: a stream would show one principal the others' commands, and
    its announce would make the node pull from any URL. The 401 message names
    --peer-token-file, and the announced URL is not learned."""
    node = node_factory(extra_args=("--tokens-file", str(tokens_file(tmp_path))))
    announce = "http://127.0.0.1:9/"
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await post(session, node.url, BOB, "bob-private", OPEN)
        async with session.get(
            f"{node.url}/replicate",
            params={"after": "0", "announce": announce},
            headers=auth(ALICE),
        ) as response:
            refused = response.status
            error = (await response.json())["error"]
        async with session.get(f"{node.url}/status", headers=auth(ALICE)) as response:
            peers = (await response.json())["peers"]
    assert refused == 401
    assert "--peer-token-file" in error["message"]
    assert peers == []


async def test_peers_replicate_with_peer_token(
    node_factory: Factory, tmp_path: Path
) -> None:
    """Two nodes sharing a peer token replicate; the token never reaches the logs."""
    args = ("--tokens-file", str(tokens_file(tmp_path)),
            "--peer-token-file", str(peer_token_file(tmp_path)))  # fmt: skip
    first = node_factory("first", extra_args=args)
    second = node_factory("second", peers=(first.url,), extra_args=args)
    async with aiohttp.ClientSession() as session:
        await post(session, first.url, ALICE, "k", OPEN)
        await post(session, second.url, BOB, "wrong", OPEN | {"x": 1})
        await post(session, second.url, "not-a-token", "k", OPEN)
        async with session.get(f"{first.url}/status", headers=auth(ALICE)) as response:
            assert response.status == 200
        # wait_converged reads /status without a token, so read it with one.
        headers = auth(ALICE)
        async with aiohttp.ClientSession(headers=headers) as authed:
            states = await wait_converged(authed, [first.url, second.url])
    assert states[0]["commands"] == 1
    for node in (first, second):
        node.terminate()
        text = node.log_text()
        assert ALICE not in text
        assert BOB not in text
        assert PEER not in text


async def test_puller_without_peer_token_says_how_to_fix(
    node_factory: Factory, tmp_path: Path
) -> None:
    """A node pulling from a peer that wants a peer token it lacks reports the
    refusal and the flag that fixes it, in /status and in a warning."""
    guarded = node_factory(
        "guarded",
        extra_args=("--peer-token-file", str(peer_token_file(tmp_path))),
    )
    puller = node_factory("puller", peers=(guarded.url,))
    error = ""
    async with aiohttp.ClientSession() as session:
        for _attempt in range(50):
            async with session.get(f"{puller.url}/status") as response:
                error = (await response.json())["peers"][0]["error"] or ""
            if "refused" in error:
                break
            await asyncio.sleep(0.1)
    assert f"{guarded.url} refused the stream with 401" in error
    assert "--peer-token-file FILE or CMDLOG_PEER_TOKEN" in error
    puller.terminate()
    assert "peer_refused" in puller.log_text()
    assert PEER not in puller.log_text()


def make_certificates(tmp_path: Path) -> tuple[Path, Path]:
    authority = trustme.CA()
    certificate = authority.issue_cert("127.0.0.1")
    ca_file = tmp_path / "ca.pem"
    cert_file = tmp_path / "node.pem"
    authority.cert_pem.write_to_path(str(ca_file))
    certificate.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    return ca_file, cert_file


async def test_tls_for_clients_and_peers(node_factory: Factory, tmp_path: Path) -> None:
    """Nodes serve HTTPS and pull from each other over it, verifying the CA."""
    ca_file, cert_file = make_certificates(tmp_path)
    args = ("--tls-cert", str(cert_file), "--tls-ca", str(ca_file))
    first = node_factory("first", extra_args=args)
    second = node_factory("second", peers=(first.url,), extra_args=args)
    context = ssl.create_default_context(cafile=str(ca_file))
    connector = aiohttp.TCPConnector(ssl=context)
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.post(
            first.url + "/commands", json=OPEN, headers={"Idempotency-Key": "t"}
        ) as response:
            created = response.status
        states = await wait_converged(session, [first.url, second.url])
        # The first node learns the second from its announcement, which can
        # land just after the two converge.
        learned = states[0]["peers"]
        for _attempt in range(50):
            if learned:
                break
            await asyncio.sleep(0.1)
            async with session.get(first.url + "/status") as response:
                learned = (await response.json())["peers"]
    assert first.url.startswith("https://")
    assert created == 201
    assert states[1]["commands"] == 1
    assert learned[0]["url"].startswith("https://")


async def test_tls_rejects_unknown_ca(node_factory: Factory, tmp_path: Path) -> None:
    """A client that does not trust the node's CA cannot connect."""
    _ca_file, cert_file = make_certificates(tmp_path)
    node = node_factory(extra_args=("--tls-cert", str(cert_file)))
    async with aiohttp.ClientSession() as session:
        try:
            async with session.get(node.url + "/healthz"):
                connected = True
        except aiohttp.ClientConnectorCertificateError:
            connected = False
    assert not connected


def test_public_listen_needs_token(tmp_path: Path) -> None:
    """Listening on a non-loopback address without a token refuses to start."""
    result = subprocess.run(
        [sys.executable, "-m", "cmdlog.cli", "serve", "--data", str(tmp_path / "d"),
         "--listen", "0.0.0.0:0"],
        capture_output=True, text=True, timeout=30,
        env={"PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert result.returncode == 2
    assert "needs a token" in result.stderr
