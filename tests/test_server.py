"""Smoke tests of `cmdlog serve` as a real process."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from cmdlog import wire
from cmdlog.cli import main
from cmdlog.errors import MalformedBody
from cmdlog.store import DirectoryLock
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


def serve_failing(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """Run `cmdlog serve` that is expected to fail at startup; it must exit."""
    argv = [sys.executable, "-m", "cmdlog.cli", "--log-level", "warning", "serve"]
    argv += ["--data", str(tmp_path / "data"), *extra]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30)


def test_serve_exits_when_address_in_use(node: NodeProcess, tmp_path: Path) -> None:
    """A node whose address is taken says so in one line and exits 2, leaving
    its data directory unlocked, instead of hanging on its writer thread."""
    address = node.url.removeprefix("http://")
    failed = serve_failing(tmp_path, "--listen", address)
    assert failed.returncode == 2
    assert f"cmdlog: cannot listen on {address}" in failed.stderr
    assert "--listen" in failed.stderr
    assert "Traceback" not in failed.stderr
    DirectoryLock(tmp_path / "data").release()


def test_serve_exits_on_bad_peer_url(tmp_path: Path) -> None:
    """A --peer that is not an http(s) URL stops the node at startup."""
    failed = serve_failing(tmp_path, "--listen", "127.0.0.1:0", "--peer", "127.0.0.1:9")
    assert failed.returncode == 2
    assert "cmdlog: --peer: peer URL '127.0.0.1:9' is not an http://" in failed.stderr


def test_serve_keeps_writing_after_log_pipe_closes(tmp_path: Path) -> None:
    """A node whose log reader went away (`cmdlog serve 2>&1 | head`) still
    commits writes, responds to them, and stops on SIGTERM."""
    argv = [sys.executable, "-m", "cmdlog.cli", "serve", "--data", str(tmp_path)]
    process = subprocess.Popen(
        [*argv, "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None and process.stderr is not None
        process.stderr.close()  # every log line from now on hits a closed pipe
        line = process.stdout.readline()
        url = line.split("listening on ", 1)[1].strip()
        for index in range(3):
            status, _view = post(
                url,
                {
                    "type": "ledger.open",
                    "payload": {"account": f"a{index}", "currency": "EUR"},
                },
                f"k{index}",
            )
            assert status == 201
        with urllib.request.urlopen(url + "/status", timeout=10) as response:
            assert json.loads(response.read())["commands"] == 3
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


_WHOLE_NUMBER = "must be a whole number of 1 or more"
_SECONDS = "must be a number of seconds above 0"
BAD_SETTINGS = [
    ("--requests-max", "0", _WHOLE_NUMBER),
    ("--requests-max", "-1", _WHOLE_NUMBER),
    ("--requests-max", "many", _WHOLE_NUMBER),
    ("--shutdown-timeout-s", "0", _SECONDS),
    ("--shutdown-timeout-s", "-1", _SECONDS),
    ("--shutdown-timeout-s", "nan", _SECONDS),
    ("--shutdown-timeout-s", "inf", _SECONDS),
    ("--shutdown-timeout-s", "soon", _SECONDS),
    ("--idle-timeout-s", "0", _SECONDS),
    ("--idle-timeout-s", "inf", _SECONDS),
]


@pytest.mark.parametrize(("flag", "value", "expected"), BAD_SETTINGS)
def test_serve_refuses_bad_setting(
    tmp_path: Path,
    flag: str,
    value: str,
    expected: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A limit flag of 0, a negative or a non-number, or a timeout flag that is
    not a finite number above 0, stops `serve` before it opens anything,
    naming the flag, instead of a node that refuses every request."""
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--data", str(tmp_path / "d"), flag, value])
    assert exited.value.code == 2
    assert f"{flag}: {expected}, found '{value}'" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize(
    ("variable", "expected"),
    [
        ("CMDLOG_BODY_BYTES_MAX", _WHOLE_NUMBER),
        ("CMDLOG_SHUTDOWN_TIMEOUT_S", _SECONDS),
        ("CMDLOG_IDLE_TIMEOUT_S", _SECONDS),
    ],
)
def test_serve_refuses_bad_setting_variable(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    variable: str,
    expected: str,
) -> None:
    """The same holds for the setting's CMDLOG_ variable."""
    monkeypatch.setenv(variable, "0")
    assert main(["serve", "--data", str(tmp_path / "d")]) == 2
    assert capsys.readouterr().err == f"cmdlog: {variable} {expected}, found '0'\n"
    assert not (tmp_path / "d").exists()


def test_status_command_hints(
    node_factory: Callable[..., NodeProcess], capsys: pytest.CaptureFixture[str]
) -> None:
    """`cmdlog status` names the fix for a URL without a scheme and for a
    missing token, instead of repeating the URL or quoting the HTTP header."""
    node = node_factory(token="status-token-1")
    address = node.url.removeprefix("http://")
    assert main(["status", address]) == 1
    assert f"write it as http://{address}" in capsys.readouterr().err
    assert main(["status", node.url]) == 1
    assert "needs a token; pass --token-file FILE" in capsys.readouterr().err


def test_json_sent_as_msgpack_names_content_type() -> None:
    """A JSON body labelled msgpack is refused with the Content-Type to use."""
    with pytest.raises(MalformedBody) as raised:
        wire.decode(b'{"type": "ledger.open"}', wire.MSGPACK)
    assert raised.value.message.endswith(
        "the body looks like JSON, so send it with Content-Type: application/json"
    )
