"""Tests of the handler catalog: fingerprints, refusal to start, lock files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cmdlog.app import App, Domain
from cmdlog.apps.example import app as example_app
from cmdlog.apps.upgraded import app as upgraded_app
from cmdlog.catalog import app_fingerprints, handler_fingerprint
from cmdlog.database import Database
from cmdlog.engine import prepare_submission
from cmdlog.errors import StartupError

APP_TEMPLATE = '''
"""A tiny app for catalog tests."""
from cmdlog.app import App, Domain, Rejected

counter = Domain("counter")


def step(amount):
    return amount{step_change}


@counter.command("counter.add")
def add(state, command):
    {comment}
    total = (state.get("total") or 0) + step(command.payload["amount"])
    state.put("total", total)
    return {{"total": total}}


app = App([counter])
'''


def write_app(directory: Path, name: str, **changes: str) -> str:
    values = {"step_change": "", "comment": "# no comment"} | changes
    (directory / f"{name}.py").write_text(APP_TEMPLATE.format(**values))
    return f"{name}:app"


def load(directory: Path, name: str) -> App:
    sys.path.insert(0, str(directory))
    try:
        module = __import__(name)
    finally:
        sys.path.remove(str(directory))
    result: App = module.app
    return result


def test_formatting_and_comments_do_not_count(tmp_path: Path) -> None:
    """Comments, docstrings and layout leave the fingerprint unchanged."""
    write_app(tmp_path, "plain")
    write_app(tmp_path, "commented", comment='"""Docstring."""  # and a comment\n')
    plain = load(tmp_path, "plain").types["counter.add"]
    commented = load(tmp_path, "commented").types["counter.add"]
    assert handler_fingerprint(plain) == handler_fingerprint(commented)


def test_helper_change_counts(tmp_path: Path) -> None:
    """Changing a function the handler calls changes the fingerprint."""
    write_app(tmp_path, "before")
    write_app(tmp_path, "after", step_change=" * 2")
    before = load(tmp_path, "before").types["counter.add"]
    after = load(tmp_path, "after").types["counter.add"]
    assert handler_fingerprint(before) != handler_fingerprint(after)


def test_upgrade_keeps_old_fingerprints() -> None:
    """The upgraded example app adds types and changes none of the old ones."""
    old = app_fingerprints(example_app)
    new = app_fingerprints(upgraded_app)
    assert set(new) - set(old) == {"ledger.refund", "users.register.v2"}
    assert all(new[name] == old[name] for name in old)


def test_edited_handler_refuses_to_start(tmp_path: Path) -> None:
    """A node whose handler for an applied type changed refuses to start."""
    write_app(tmp_path, "v1")
    write_app(tmp_path, "v1edit", step_change=" + 1")
    first, edited = load(tmp_path, "v1"), load(tmp_path, "v1edit")
    data = tmp_path / "node"
    db = Database(data, first)
    db.submit([prepare_submission(first, "k", "counter.add", {"amount": 2})])
    db.close()

    with pytest.raises(StartupError) as raised:
        Database(data, edited)
    message = raised.value.message
    assert "counter.add" in message
    assert handler_fingerprint(first.types["counter.add"]) in message
    assert handler_fingerprint(edited.types["counter.add"]) in message
    assert "new type" in message


def test_unapplied_type_may_change(tmp_path: Path) -> None:
    """A type that never folded a command is not recorded and may change."""
    write_app(tmp_path, "w1")
    write_app(tmp_path, "w1edit", step_change=" + 1")
    Database(tmp_path / "node", load(tmp_path, "w1")).close()
    Database(tmp_path / "node", load(tmp_path, "w1edit")).close()


def test_serve_refuses_edited_handler(tmp_path: Path) -> None:
    """`cmdlog serve` with an edited handler exits non-zero naming the type."""
    write_app(tmp_path, "s1")
    first = load(tmp_path, "s1")
    db = Database(tmp_path / "node", first)
    db.submit([prepare_submission(first, "k", "counter.add", {"amount": 1})])
    db.close()
    app_spec = write_app(tmp_path, "s1edit", step_change=" - 1")
    result = subprocess.run(
        [sys.executable, "-m", "cmdlog.cli", "serve", "--data", str(tmp_path / "node"),
         "--listen", "127.0.0.1:0", "--app", app_spec],
        capture_output=True, text=True, timeout=30,
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert result.returncode == 2
    assert "counter.add" in result.stderr
    assert "has changed" in result.stderr


def run_handlers(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cmdlog.cli", "handlers", *args],
        capture_output=True, text=True, timeout=30, cwd=cwd,
        env={"PYTHONPATH": str(cwd), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip


def test_lock_check_fails_on_change(tmp_path: Path) -> None:
    """`handlers check` passes for added types and fails for an edited one."""
    lock = tmp_path / "handlers.lock"
    written = run_handlers(
        "lock", "--lock", str(lock), "--app", write_app(tmp_path, "l1"), cwd=tmp_path
    )
    assert written.returncode == 0
    locked: dict[str, Any] = json.loads(lock.read_text())
    assert list(locked) == ["counter.add"]

    same = run_handlers("check", "--lock", str(lock), "--app", "l1:app", cwd=tmp_path)
    edited_spec = write_app(tmp_path, "l1edit", step_change=" * 3")
    edited = run_handlers(
        "check", "--lock", str(lock), "--app", edited_spec, cwd=tmp_path
    )
    assert same.returncode == 0
    assert edited.returncode == 1
    assert "CHANGED" in edited.stdout


def test_new_domain_type_fingerprint_stable() -> None:
    """The fingerprint of a type is the same across two computations."""
    domain = Domain("d")

    @domain.command("d.x")
    def apply_x(state: Any, command: Any) -> None:
        return None

    app = App([domain])
    assert app_fingerprints(app) == app_fingerprints(app)
