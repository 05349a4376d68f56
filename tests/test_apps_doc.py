"""The app in docs/APPS.md works as the text says."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from cmdlog.app import App
from cmdlog.database import Database
from cmdlog.engine import prepare_submission
from cmdlog.errors import KeyReused

DOC = Path(__file__).resolve().parent.parent / "docs" / "APPS.md"


def load_doc_app(directory: Path) -> App:
    source = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL)[0]
    (directory / "tickets_doc.py").write_text(source)
    sys.path.insert(0, str(directory))
    try:
        module = __import__("tickets_doc")
    finally:
        sys.path.remove(str(directory))
    app: App = module.app
    return app


def test_doc_app_books_a_seat_once(tmp_path: Path) -> None:
    """Two bookings of one seat under different keys are one command."""
    app = load_doc_app(tmp_path)
    db = Database(tmp_path / "node", app)
    payload = {"show": "hamlet-0412", "seat": "F7"}
    first = db.submit([prepare_submission(app, "key-1", "tickets.book", payload)])[0]
    second = db.submit([prepare_submission(app, "key-2", "tickets.book", payload)])[0]
    assert not isinstance(first, KeyReused)
    assert not isinstance(second, KeyReused)
    assert first.created
    assert not second.created
    assert first.command.id == second.command.id
    assert first.outcome.status == "applied"
    seat = db.query("tickets.seat", {"show": "hamlet-0412", "seat": "F7"})
    assert seat["booking"] == first.command.id
    db.close()
