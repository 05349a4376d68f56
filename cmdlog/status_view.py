"""`cmdlog status URL`: a readable view of a node's /status."""

from __future__ import annotations

import asyncio
import ssl
import sys
from typing import Any

import aiohttp


async def fetch_status(
    url: str, token: str | None, ca_file: str | None = None
) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    timeout = aiohttp.ClientTimeout(total=10)
    tls = ssl.create_default_context(cafile=ca_file) if ca_file else True
    async with (
        aiohttp.ClientSession(
            timeout=timeout, connector=aiohttp.TCPConnector(ssl=tls)
        ) as session,
        session.get(url.rstrip("/") + "/status", headers=headers) as response,
    ):
        body: dict[str, Any] = await response.json()
        if response.status == 401:
            raise RuntimeError(
                f"{url} needs a token; pass --token-file FILE or set CMDLOG_TOKEN"
            )
        if response.status != 200:
            message = body.get("error", {}).get("message", response.reason)
            raise RuntimeError(f"{url} answered {response.status}: {message}")
        return body


def render(status: dict[str, Any]) -> str:
    lines = [
        f"node           {status['node']}",
        f"commands       {status['commands']}",
        f"applied        {status['applied']}",
        f"pending        {status.get('pending', 0)}",
        f"state digest   {status['digest']['state']}",
        f"log digest     {status['digest']['log']}",
    ]
    for type_name, count in sorted(status.get("pending_types", {}).items()):
        lines.append(f"  pending {type_name}: {count}")
    peers = status.get("peers", [])
    lines.append(f"peers          {len(peers)}")
    for peer in peers:
        state = "connected" if peer.get("connected") else "disconnected"
        lines.append(
            f"  {peer['url']}  node={peer.get('node') or '?'}  "
            f"cursor={peer.get('cursor')}  lag={peer.get('lag')}  {state}"
        )
    return "\n".join(lines)


def show_status(url: str, *, token: str | None, ca_file: str | None = None) -> int:
    if not url.startswith(("http://", "https://")):
        print(
            f"cmdlog status: {url!r} is not a URL; write it as http://{url}",
            file=sys.stderr,
        )
        return 1
    try:
        status = asyncio.run(fetch_status(url, token, ca_file))
    except (aiohttp.ClientError, RuntimeError, TimeoutError) as exc:
        print(f"cmdlog status: cannot read {url}/status: {exc}", file=sys.stderr)
        return 1
    print(render(status))
    return 0
