"""The database: a data directory opened as one node's store, clock and engine.

This is the synchronous face of a node. It opens (or creates) the data
directory, gives the node its identity on first open, restores the clock,
and runs engine work in store transactions. The writer thread calls
`submit` and `ingest`; any thread may call the read methods.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import structlog

from cmdlog import catalog, codec, epochs
from cmdlog.app import App
from cmdlog.config import ClockConfig, StoreConfig
from cmdlog.engine import Accepted, Engine, IngestReport, Status, Submission
from cmdlog.errors import KeyReused, StartupError
from cmdlog.hlc import HybridClock, wall_ms
from cmdlog.model import Command, Outcome
from cmdlog.store import Store, Txn

log = structlog.get_logger(__name__)

NODE_ID_BYTES = 8
LOG_INSTANCE_BYTES = 16
BOOT_BYTES = 8


def new_identity(txn: Txn) -> tuple[str, str]:
    """Store a new random node ID and log instance; return both.

    A node gets them when its data directory is created. A copy of a data
    directory needs new ones before it runs beside its original, because
    peers take a node ID to name one running node and a log instance to name
    one log. The commands stored keep their origin.
    """
    node_id = secrets.token_hex(NODE_ID_BYTES)
    log_instance = secrets.token_hex(LOG_INSTANCE_BYTES)
    txn.meta_put("node_id", node_id)
    txn.meta_put("log_instance", log_instance)
    return node_id, log_instance


class _QueryState:
    """Read-only view of one domain's state inside a read transaction."""

    def __init__(self, txn: Txn, domain: str) -> None:
        self._txn = txn
        self._domain = domain

    def get(self, key: str) -> Any:
        data = self._txn.state_get(self._domain, key.encode())
        return None if data is None else codec.unpack(data)


class Database:
    """One node's data directory, open for reading and writing."""

    def __init__(
        self,
        path: Path | str,
        app: App,
        *,
        store_config: StoreConfig | None = None,
        clock_config: ClockConfig | None = None,
        now_ms: Callable[[], int] = wall_ms,
    ) -> None:
        self.app = app
        self.boot = secrets.token_hex(BOOT_BYTES)
        """A new random name per open: within one boot the log only grows."""
        self.store = Store(path, list(app.domains), store_config)
        clock_config = clock_config or ClockConfig()

        identity = self.store.write(self._identity)
        self.node_id: str = identity["node_id"]
        self.log_instance: str = identity["log_instance"]
        self.epochs: list[epochs.Epoch] = identity["epochs"]
        """The processes that appended the log, this one last (see `cmdlog.epochs`)."""
        self.clock = HybridClock(
            now_ms=now_ms, last=identity["clock"], skew_ms_max=clock_config.skew_ms_max
        )
        fingerprints = catalog.app_fingerprints(app)
        with self.store.read() as txn:
            recorded = txn.catalog()
        self._check_catalog(recorded, fingerprints)
        self.engine = Engine(
            app,
            self.clock,
            self.node_id,
            self.store.config,
            fingerprints=fingerprints,
            catalogued=set(recorded),
        )

        released = self.store.write(self.engine.release_pending)
        log.info(
            "database_opened",
            path=str(self.store.path),
            node=self.node_id,
            released_pending=released,
        )

    def _check_catalog(
        self, recorded: dict[str, str], fingerprints: dict[str, str]
    ) -> None:
        for entry in catalog.compare(recorded, fingerprints):
            if entry.state == "CHANGED":
                self.store.close()
                raise StartupError(catalog.changed_message(entry))
            if entry.state == "removed":
                self.store.close()
                raise StartupError(
                    f"the app has no handler for {entry.type_name}, which this "
                    "node has applied; a handler that has run cannot be removed. "
                    "Serve an app that still registers it"
                )

    def _identity(self, txn: Txn) -> dict[str, Any]:
        node_id = txn.meta_get("node_id")
        if node_id is None:
            node_id, _log_instance = new_identity(txn)
        log_epochs = epochs.begin(
            txn.meta_get("epochs", []), txn.log_last_seq() + 1, self.boot
        )
        txn.meta_put("epochs", log_epochs)
        return {
            "node_id": node_id,
            "log_instance": txn.meta_get("log_instance"),
            "clock": txn.meta_get("clock", 0),
            "epochs": log_epochs,
        }

    # writes (writer thread only)

    def submit(self, submissions: Iterable[Submission]) -> list[Accepted | KeyReused]:
        batch = list(submissions)
        return self.store.write(lambda txn: self.engine.submit(txn, batch))

    def ingest(self, commands: Iterable[Command]) -> IngestReport:
        batch = list(commands)
        return self.store.write(lambda txn: self.engine.ingest(txn, batch))

    def release_pending(self) -> int:
        return self.store.write(self.engine.release_pending)

    # reads (any thread)

    def view(self, command_id: str) -> tuple[Command, Outcome] | None:
        with self.store.read() as txn:
            return self.engine.view(txn, command_id)

    def status(self) -> Status:
        with self.store.read() as txn:
            return self.engine.status(txn)

    def query(self, name: str, args: Mapping[str, str]) -> Any:
        query = self.app.query(name)
        with self.store.read() as txn:
            return query.run(_QueryState(txn, query.domain), args)

    def close(self) -> None:
        self.store.close()
