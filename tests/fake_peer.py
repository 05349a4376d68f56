"""A scripted replication peer: an aiohttp server on 127.0.0.1 whose
/replicate stream sends exactly the bytes a test gives it."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from cmdlog import frames
from cmdlog.frames import encode_frame

FAKE_NODE = "fa4e"
FAKE_INSTANCE = "fake-instance"


def hello(
    *,
    head: int,
    after: int = 0,
    version: int = frames.PROTOCOL_VERSION,
    boot: str | None = None,
) -> bytes:
    """Return a hello frame of the fake node; with `boot`, it names its process."""
    body: dict[str, Any] = {
        "t": frames.HELLO,
        "version": version,
        "node": FAKE_NODE,
        "instance": FAKE_INSTANCE,
        "head": head,
        "after": after,
        "types": [],
    }
    if boot is not None:
        body["boot"] = boot
    return encode_frame(body)


def commands(entries: list[tuple[int, list[Any]]], head: int) -> bytes:
    from cmdlog import codec

    packed = [[seq, codec.pack(record)] for seq, record in entries]
    return encode_frame({"t": frames.COMMANDS, "entries": packed, "head": head})


class FakePeer:
    """Serves a fixed byte script on every /replicate request, then holds the
    stream open (or closes it) as told."""

    def __init__(self, script: bytes, *, hold_open: bool = True) -> None:
        self.script = script
        self.hold_open = hold_open
        self.requests: list[dict[str, str]] = []
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def _replicate(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(dict(request.query))
        response = web.StreamResponse(
            headers={"Content-Type": "application/x-cmdlog-frames"}
        )
        await response.prepare(request)
        await response.write(self.script)
        if self.hold_open:
            await asyncio.sleep(30)
        return response

    async def start(self) -> FakePeer:
        app = web.Application()
        app.router.add_get("/replicate", self._replicate)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
