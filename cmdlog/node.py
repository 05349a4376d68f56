"""The node: a database, its writer thread and its peers, with one lifecycle.

The HTTP API and the replication transport call the node; the node turns
their requests into writer jobs and reads. It is the one object that knows
every moving part of a running server.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from cmdlog.app import App
from cmdlog.config import ClockConfig, HttpConfig, StoreConfig, WriterConfig
from cmdlog.database import Database
from cmdlog.engine import Accepted, Status, Submission
from cmdlog.errors import KeyReused
from cmdlog.model import Command, Outcome
from cmdlog.store import Txn
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
    token: str | None = None


class Node:
    """A running cmdlog node: storage, group commit, and (later) replication."""

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

    @property
    def node_id(self) -> str:
        return self.database.node_id

    async def start(self) -> None:
        self.writer.start()
        log.info("node_started", node=self.node_id, data_dir=self.config.data_dir)

    async def stop(self) -> None:
        await self.writer.stop()
        self.database.close()
        log.info("node_stopped", node=self.node_id)

    async def submit(
        self, submissions: Sequence[Submission]
    ) -> list[Accepted | KeyReused]:
        """Commit the submissions durably and return each one's result."""
        items = list(submissions)
        engine = self.database.engine

        def work(txn: Txn) -> list[Accepted | KeyReused]:
            return engine.submit(txn, items)

        result: list[Accepted | KeyReused] = await self.writer.run(
            work, size=len(items)
        )
        return result

    def view(self, command_id: str) -> tuple[Command, Outcome] | None:
        return self.database.view(command_id)

    def query(self, name: str, args: Mapping[str, str]) -> Any:
        return self.database.query(name, args)

    def status(self) -> Status:
        return self.database.status()
