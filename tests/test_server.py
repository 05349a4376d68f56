"""Smoke tests of `cmdlog serve` as a real process."""

from __future__ import annotations

import json
import urllib.request

from tests.nodes import NodeProcess


def post(url: str, body: dict[str, object], key: str) -> tuple[int, dict[str, object]]:
    request = urllib.request.Request(
        url + "/commands",
        data=json.dumps(body).encode(),
        headers={"Idempotency-Key": key, "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, json.loads(response.read())


def test_serve_accepts_and_drains(node: NodeProcess) -> None:
    """A node accepts a command, and SIGTERM makes it exit 0 keeping it."""
    status, view = post(
        node.url,
        {"type": "ledger.open", "payload": {"account": "a", "currency": "EUR"}},
        "k",
    )
    assert status == 201
    assert view["id"] == "k"
    assert node.terminate() == 0
    assert "server_stopped" in node.log_text()
