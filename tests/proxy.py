"""A TCP proxy on 127.0.0.1 that a test can cut and heal."""

from __future__ import annotations

import asyncio
import contextlib


class TcpProxy:
    """Forwards connections to a target port until told to cut them."""

    def __init__(self) -> None:
        self.target_port: int | None = None
        self.blocked = False
        self.port = 0
        self._server: asyncio.Server | None = None
        self._links: set[asyncio.Task[None]] = set()
        self.connections = 0

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _accept(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        if self.blocked or self.target_port is None:
            client_writer.close()
            return
        try:
            target_reader, target_writer = await asyncio.open_connection(
                "127.0.0.1", self.target_port
            )
        except OSError:
            client_writer.close()
            return
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._links.add(task)
        try:
            await asyncio.gather(
                _pipe(client_reader, target_writer), _pipe(target_reader, client_writer)
            )
        except asyncio.CancelledError:
            pass
        finally:
            self._links.discard(task)
            for writer in (client_writer, target_writer):
                writer.transport.abort()

    def cut(self) -> None:
        """Drop every open connection; new ones are still accepted."""
        for task in list(self._links):
            task.cancel()

    def block(self) -> None:
        """Drop every open connection and refuse new ones until `heal`."""
        self.blocked = True
        self.cut()

    def heal(self) -> None:
        self.blocked = False

    async def stop(self) -> None:
        self.block()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.transport.abort()
