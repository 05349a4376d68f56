"""The node: a database, its writer thread and its peers, with one lifecycle.

The HTTP API and the replication transport call the node; the node turns
their requests into writer jobs and reads. It is the one object that knows
every moving part of a running server.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from cmdlog.app import App
from cmdlog.auth import Credentials
from cmdlog.config import (
    ClockConfig,
    HttpConfig,
    ReplicationConfig,
    StoreConfig,
    WriterConfig,
)
from cmdlog.database import Database
from cmdlog.engine import Accepted, Status, Submission
from cmdlog.errors import KeyReused
from cmdlog.model import Command, Outcome
from cmdlog.peering import CommitSignal
from cmdlog.peers import Peers
from cmdlog.writer import Writer

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """Everything a node needs to start, gathered from flags and environment."""

    data_dir: str
    app_spec: str = "cmdlog.apps.example:app"
    peers: Sequence[str] = ()
    store: StoreConfig = field(default_factory=StoreConfig)
    writer: WriterConfig = field(default_factory=WriterConfig)
    clock: ClockConfig = field(default_factory=ClockConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    replication: ReplicationConfig = field(default_factory=ReplicationConfig)
    credentials: Credentials = field(default_factory=Credentials)
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    """CA bundle to verify peers' certificates with (https peer URLs)."""
    advertise_url: str | None = None
    """URL peers should use to reach this node; announced to every peer pulled
    from, so it starts pulling back."""


class Node:
    """A running cmdlog node: storage, group commit and replication."""

    def __init__(self, config: NodeConfig, app: App) -> None:
        self.config = config
        self.app = app
        self.database = Database(
            config.data_dir,
            app,
            store_config=config.store,
            clock_config=config.clock,
        )
        self.writer = Writer(self.database, config.writer)
        self.advertise_url = config.advertise_url
        self.conflicts_seen = 0
        self.closing = asyncio.Event()
        self.commit_signal: CommitSignal | None = None
        # A frame must hold at least one command of the largest allowed size.
        replication = config.replication
        frame_bytes_min = 2 * config.http.body_bytes_max + 64 * 1024
        if replication.frame_bytes_max < frame_bytes_min:
            replication = dataclasses.replace(
                replication, frame_bytes_max=frame_bytes_min
            )
        self.peers = Peers(self, replication)

    @property
    def node_id(self) -> str:
        return self.database.node_id

    def peer_headers(self) -> dict[str, str]:
        """Headers a puller sends to a peer: the peer token, when there is one."""
        token = self.config.credentials.outgoing_peer_token()
        return {"Authorization": f"Bearer {token}"} if token else {}

    def client_ssl(self) -> ssl.SSLContext | None:
        """Return the TLS context pullers use for https peers, trusting `tls_ca`."""
        if self.config.tls_ca is None:
            return None
        return ssl.create_default_context(cafile=self.config.tls_ca)

    async def start(self) -> None:
        signal = CommitSignal()
        self.commit_signal = signal
        self.writer.on_commit.append(signal.fire_threadsafe)
        self.writer.start()
        log.info("node_started", node=self.node_id, data_dir=self.config.data_dir)

    async def start_peers(self) -> None:
        """Start pulling from configured and remembered peers."""
        await self.peers.start(list(self.config.peers))

    async def close_streams(self) -> None:
        """Stop pulling and end every replication stream this node serves."""
        self.closing.set()
        await self.peers.stop()

    async def stop(self) -> None:
        try:
            await self.close_streams()
        finally:
            # The writer thread keeps the process alive until it stops.
            try:
                await self.writer.stop()
            finally:
                self.database.close()
        log.info("node_stopped", node=self.node_id)

    async def submit(
        self, submissions: Sequence[Submission]
    ) -> list[Accepted | KeyReused]:
        """Commit the submissions durably and return each one's result."""
        return await self.writer.submit(list(submissions))

    def view(self, command_id: str) -> tuple[Command, Outcome] | None:
        return self.database.view(command_id)

    def query(self, name: str, args: Mapping[str, str]) -> Any:
        return self.database.query(name, args)

    def status(self) -> Status:
        return self.database.status()
