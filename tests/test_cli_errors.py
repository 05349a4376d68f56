"""Startup errors of the `cmdlog` command line, run as a real process.

A command that cannot run with its flags or variables exits 2 and prints one
line, `cmdlog: ...`, that names the flag or variable, the value and the fix.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from cmdlog.cli import DEFAULT_APP, build_parser
from tests.nodes import NodeProcess

RUN_TIMEOUT_S = 10
"""A failing command exits within a second or two; one that starts instead
would run until killed, so the timeout fails the test."""


def run_cli(
    *argv: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `cmdlog ARGV` with no CMDLOG_ variables but those in `env`."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CMDLOG_")}
    return subprocess.run(
        [sys.executable, "-m", "cmdlog.cli", "--log-level", "warning", *argv],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        env={**clean, **(env or {})},
        cwd=cwd,
    )


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    """Return the only line of stderr, failing the test if there are others."""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("cmdlog: "), lines[0]
    return lines[0]


def serve_args(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "serve",
        "--data",
        str(tmp_path / "data"),
        "--listen",
        "127.0.0.1:0",
        *extra,
    ]


# Empty CMDLOG_ variables


def test_empty_data_variable_is_unset(tmp_path: Path) -> None:
    """An empty CMDLOG_DATA leaves --data required instead of serving the
    current directory."""
    result = run_cli(
        "serve", "--listen", "127.0.0.1:0", env={"CMDLOG_DATA": ""}, cwd=tmp_path
    )
    assert result.returncode == 2
    last_line = result.stderr.splitlines()[-1]
    assert last_line.endswith("the following arguments are required: --data")
    assert list(tmp_path.iterdir()) == []


def test_empty_variables_use_defaults(
    node_factory: Callable[..., NodeProcess],
) -> None:
    """A node starts with every CMDLOG_ variable set to the empty string."""
    help_text = run_cli("serve", "--help", env={"COLUMNS": "200"}).stdout
    variables = set(re.findall(r"\bCMDLOG_[A-Z0-9_]*[A-Z0-9]\b", help_text))
    assert {"CMDLOG_DATA", "CMDLOG_BODY_BYTES_MAX", "CMDLOG_TOKEN"} <= variables
    node = node_factory(env=dict.fromkeys(variables, ""))
    assert node.terminate() == 0


@pytest.mark.parametrize(
    ("name", "attribute", "default"),
    [
        ("LISTEN", "listen", "127.0.0.1:7001"),
        ("APP", "app", DEFAULT_APP),
        ("ADVERTISE", "advertise", None),
        ("TOKEN_FILE", "token_file", None),
        ("TOKENS_FILE", "tokens_file", None),
        ("PEER_TOKEN_FILE", "peer_token_file", None),
        ("TLS_CERT", "tls_cert", None),
        ("TLS_KEY", "tls_key", None),
        ("TLS_CA", "tls_ca", None),
    ],
)
def test_empty_variable_keeps_default(
    monkeypatch: pytest.MonkeyPatch, name: str, attribute: str, default: str | None
) -> None:
    """Each empty CMDLOG_ variable leaves its flag at the default."""
    monkeypatch.setenv(f"CMDLOG_{name}", "")
    args = build_parser().parse_args(["serve", "--data", "d"])
    assert getattr(args, attribute) == default


# Limits


def test_limit_variable_not_number_rejected(tmp_path: Path) -> None:
    """A limit variable that is not a number exits 2, as its flag does."""
    result = run_cli(*serve_args(tmp_path), env={"CMDLOG_BODY_BYTES_MAX": "abc"})
    assert result.returncode == 2
    assert error_line(result) == (
        "cmdlog: CMDLOG_BODY_BYTES_MAX must be a whole number of 1 or more, found 'abc'"
    )


def test_limit_variable_spares_other_commands() -> None:
    """An invalid limit variable of serve does not stop other commands or --help."""
    result = run_cli("--help", env={"CMDLOG_BODY_BYTES_MAX": "abc"})
    assert result.returncode == 0
    assert result.stderr == ""


# --advertise and the peer URLs


@pytest.mark.parametrize("source", ["flag", "variable"])
def test_advertise_not_url_rejected(tmp_path: Path, source: str) -> None:
    """An --advertise that is not a URL stops the node before it opens the
    data directory, instead of every peer rejecting its pulls with 400."""
    extra = ["--peer", "http://127.0.0.1:1"]
    env = {}
    if source == "flag":
        extra += ["--advertise", "garbage"]
    else:
        env["CMDLOG_ADVERTISE"] = "garbage"
    result = run_cli(*serve_args(tmp_path, *extra), env=env)
    assert result.returncode == 2
    line = error_line(result)
    assert "--advertise: peer URL 'garbage'" in line
    assert "for example http://" in line
    assert not (tmp_path / "data").exists()


def test_peer_url_too_long_rejected(tmp_path: Path) -> None:
    """A --peer URL over LMDB's key size names the limit, and the error line
    repeats only the start of the URL."""
    url = "http://" + "a" * 600 + ":1"
    result = run_cli(*serve_args(tmp_path, "--peer", url))
    assert result.returncode == 2
    line = error_line(result)
    assert "over the limit of 511" in line
    assert "--peer: peer URL 'http://aaa" in line
    assert len(line) < 400


def test_peers_variable_named_in_error(tmp_path: Path) -> None:
    """An invalid entry of CMDLOG_PEERS is reported under that name, not --peer."""
    result = run_cli(*serve_args(tmp_path), env={"CMDLOG_PEERS": "127.0.0.1:9"})
    assert result.returncode == 2
    assert "CMDLOG_PEERS: peer URL '127.0.0.1:9'" in error_line(result)


# The data directory and CA files


@pytest.mark.parametrize("source", ["flag", "variable"])
def test_data_regular_file_rejected(tmp_path: Path, source: str) -> None:
    """--data naming a regular file stops with one line, not a traceback."""
    data = tmp_path / "file"
    data.write_text("not a directory\n")
    argv = ["serve", "--listen", "127.0.0.1:0"]
    env = {}
    if source == "flag":
        argv += ["--data", str(data)]
    else:
        env["CMDLOG_DATA"] = str(data)
    result = run_cli(*argv, env=env)
    assert result.returncode == 2
    assert f"--data {data} is not a directory" in error_line(result)


def test_data_under_regular_file_rejected(tmp_path: Path) -> None:
    """--data FILE/sub, which cannot be created, stops with one line."""
    (tmp_path / "file").write_text("not a directory\n")
    data = tmp_path / "file" / "sub"
    result = run_cli("serve", "--data", str(data), "--listen", "127.0.0.1:0")
    assert result.returncode == 2
    line = error_line(result)
    assert f"cannot create the --data directory {data}" in line
    assert "Not a directory" in line


def test_status_missing_ca_rejected(tmp_path: Path) -> None:
    """`status --tls-ca` naming no file stops before any request."""
    missing = tmp_path / "missing.pem"
    result = run_cli("status", "http://127.0.0.1:1", "--tls-ca", str(missing))
    assert result.returncode == 2
    line = error_line(result)
    assert f"cannot load --tls-ca {missing}" in line
    assert "No such file or directory" in line


def test_serve_missing_ca_rejected(tmp_path: Path) -> None:
    """`serve --tls-ca` naming no file stops at startup, instead of a node
    whose https puller fails and whose shutdown then hangs."""
    missing = tmp_path / "missing.pem"
    extra = ["--peer", "https://127.0.0.1:1", "--tls-ca", str(missing)]
    result = run_cli(*serve_args(tmp_path, *extra))
    assert result.returncode == 2
    assert f"cannot load --tls-ca {missing}" in error_line(result)


# Token files


def test_token_file_missing_rejected(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    result = run_cli(*serve_args(tmp_path, "--token-file", str(missing)))
    assert result.returncode == 2
    line = error_line(result)
    assert f"cannot read --token-file {missing}: No such file" in line
    assert "or set CMDLOG_TOKEN" in line


@pytest.mark.parametrize(
    ("flag", "variable"),
    [("--token-file", "CMDLOG_TOKEN"), ("--peer-token-file", "CMDLOG_PEER_TOKEN")],
)
def test_token_file_empty_rejected(tmp_path: Path, flag: str, variable: str) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    result = run_cli(*serve_args(tmp_path, flag, str(empty)))
    assert result.returncode == 2
    line = error_line(result)
    assert f"{flag} {empty} is empty" in line
    assert f"or set {variable}" in line


# cmdlog status


def test_status_accepts_status_url(node: NodeProcess) -> None:
    """`cmdlog status URL/status` reads URL/status, not URL/status/status."""
    for url in (node.url + "/status", node.url + "/status/"):
        result = run_cli("status", url)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("node "), result.stdout


@pytest.mark.parametrize(
    ("lock_text", "expected"),
    [
        (None, "cannot read --lock"),
        ("not json", "is not JSON"),
        ("[1]", "is not a map of type to fingerprint"),
    ],
)
def test_handlers_check_bad_lock_rejected(
    tmp_path: Path, lock_text: str | None, expected: str
) -> None:
    """`handlers check` with a missing or malformed lock file stops with one
    line and exit 2, not a traceback."""
    lock = tmp_path / "handlers.lock"
    if lock_text is not None:
        lock.write_text(lock_text)
    result = run_cli("handlers", "check", "--lock", str(lock))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert expected in error_line(result)


def test_handlers_check_needs_lock() -> None:
    result = run_cli("handlers", "check")
    assert result.returncode == 2
    assert "needs --lock FILE" in error_line(result)
