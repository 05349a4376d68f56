"""Tests of the log stream: JSON lines, access lines held briefly, order kept."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from tests.nodes import NodeProcess

# Logs three access lines, a warning and one more access line, and prints the
# size of stderr's file before the warning, after it, and after a flush.
_SCRIPT = """
import os, sys, structlog
from cmdlog.logs import configure_logging, flush_logs, log_request
configure_logging("info")
other = structlog.get_logger("cmdlog.test")
size = lambda: os.fstat(2).st_size
for n in range(3):
    log_request("POST", "/commands", 201, 1.5, f"key-{n}")
before_warning = size()
other.warning("something_failed")
after_warning = size()
log_request("GET", "/healthz", 200, 0.1, None)
flush_logs()
print(before_warning, after_warning, size())
"""
REQUEST_FIELDS = [
    "method", "path", "status", "duration_ms", "command_id", "event", "level",
    "timestamp",
]  # fmt: skip
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")


def run_script(tmp_path: Path) -> tuple[list[int], list[dict[str, object]]]:
    log_path = tmp_path / "stderr.log"
    with open(log_path, "wb") as stderr:
        done = subprocess.run(
            [sys.executable, "-c", _SCRIPT],
            stdout=subprocess.PIPE,
            stderr=stderr,
            check=True,
            timeout=60,
        )
    sizes = [int(part) for part in done.stdout.split()]
    lines = [json.loads(line) for line in log_path.read_text().splitlines()]
    return sizes, lines


def test_access_lines_wait_for_next_event(tmp_path: Path) -> None:
    sizes, lines = run_script(tmp_path)
    before_warning, after_warning, final = sizes

    assert before_warning == 0
    assert after_warning > 0
    assert final > after_warning
    assert [line["event"] for line in lines] == ["request_handled"] * 3 + [
        "something_failed",
        "request_handled",
    ]
    assert [line.get("command_id") for line in lines] == [
        "key-0", "key-1", "key-2", None, None,
    ]  # fmt: skip
    assert list(lines[0]) == REQUEST_FIELDS
    assert lines[0]["status"] == 201
    assert lines[0]["level"] == "info"
    assert TIMESTAMP.fullmatch(str(lines[0]["timestamp"]))
    assert TIMESTAMP.fullmatch(str(lines[3]["timestamp"]))


def test_access_lines_reach_log_without_other_events(
    node_factory: Callable[..., NodeProcess],
) -> None:
    node = node_factory()
    for n in range(3):
        with urllib.request.urlopen(f"{node.url}/healthz?n={n}", timeout=10):
            pass

    deadline = time.monotonic() + 10
    handled: list[dict[str, object]] = []
    while time.monotonic() < deadline and len(handled) < 3:
        time.sleep(0.05)
        events = [json.loads(line) for line in node.log_text().splitlines()]
        handled = [event for event in events if event["event"] == "request_handled"]

    assert len(handled) == 3
    assert list(handled[0]) == REQUEST_FIELDS
    assert {event["path"] for event in handled} == {"/healthz"}
    assert {event["status"] for event in handled} == {200}


def test_access_lines_precede_shutdown_events(
    node_factory: Callable[..., NodeProcess],
) -> None:
    node = node_factory()
    with urllib.request.urlopen(f"{node.url}/healthz", timeout=10):
        pass
    node.terminate()

    events = [json.loads(line)["event"] for line in node.log_text().splitlines()]
    assert "request_handled" in events
    assert events.index("request_handled") < events.index("server_stopping")
    assert events[-1] == "server_stopped"
