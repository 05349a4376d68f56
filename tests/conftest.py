"""Shared fixtures: real LMDB stores in temporary directories."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cmdlog.app import App
from cmdlog.apps.ledger import ledger
from cmdlog.config import StoreConfig
from cmdlog.database import Database
from tests.nodes import NodeProcess


@pytest.fixture
def ledger_app() -> App:
    return App([ledger])


@pytest.fixture
def database(tmp_path: Path, ledger_app: App) -> Iterator[Database]:
    db = Database(tmp_path / "node", ledger_app)
    yield db
    db.close()


def fast_store(**overrides: object) -> StoreConfig:
    """Return a store config without fsync, for tests of logic, not durability."""
    return StoreConfig(durable=False, map_bytes_initial=64 * 1024 * 1024, **overrides)  # type: ignore[arg-type]


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[Callable[..., NodeProcess]]:
    """Start real `cmdlog serve` processes; every one is killed at teardown."""
    started: list[NodeProcess] = []
    counter = [0]

    def start(name: str | None = None, **kwargs: Any) -> NodeProcess:
        counter[0] += 1
        node = NodeProcess(tmp_path / (name or f"node{counter[0]}"), **kwargs)
        started.append(node)
        return node.start()

    yield start
    for node in started:
        if node.is_running():
            node.kill()


@pytest.fixture
def node(node_factory: Callable[..., NodeProcess]) -> NodeProcess:
    """One running node with the example app and no token."""
    return node_factory()
