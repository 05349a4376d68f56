"""Shared fixtures: real LMDB stores in temporary directories."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cmdlog.app import App
from cmdlog.apps.ledger import ledger
from cmdlog.config import StoreConfig
from cmdlog.database import Database


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
