"""Run the core and HTTP benchmarks and write bench/RESULTS.md.

Run `.venv/bin/python -m bench.run [--quick] [--no-profile] [--only core|http]`
from the repository root. The full run took about 11 minutes on 2 cores.
It installs wrk and lmdb-utils (apt-get) and asyncpg (pip) when they are
missing. The profiles of `cmdlog serve` need py-spy on PATH and are skipped
without it.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import core, core_report, http, http_report
from bench.report import machine_facts, progress, table

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
REPO = RESULTS.parent.parent


def _git(*args: str) -> str:
    """Run a read-only git command in the repository and return its output."""
    try:
        done = subprocess.run(
            ["git", *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.rstrip()


def _code_version() -> str:
    commit = _git("rev-parse", "--short", "HEAD").strip() or "unknown"
    changed = _git("status", "--porcelain", "--", "cmdlog")
    if not changed:
        return f"commit {commit}, `cmdlog/` unchanged"
    files = ", ".join(line[3:] for line in changed.splitlines())
    return f"commit {commit} plus uncommitted changes in {files}"


def _source_digest() -> str:
    """Return a hash of every Python source file under cmdlog/."""
    digest = hashlib.blake2b(digest_size=8)
    for path in sorted((REPO / "cmdlog").rglob("*.py")):
        digest.update(str(path.relative_to(REPO)).encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def render(
    *,
    quick: bool,
    minutes: float,
    code_version: str,
    code_changed: bool,
    core_results: dict[str, Any] | None,
    http_results: dict[str, Any] | None,
) -> str:
    facts = machine_facts(Path(tempfile.gettempdir()))
    facts["cmdlog code measured"] = code_version
    if code_changed:
        facts["cmdlog code measured"] += (
            " (NOTE: files under cmdlog/ changed during the run, so later "
            "measurements may have run other code)"
        )
    if http_results is not None:
        facts["PostgreSQL"] = http_results["postgres_version"]
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    flags = " --quick" if quick else ""
    targets: list[list[str]] = []
    if core_results is not None:
        targets += core_report.target_rows(core_results)
    if http_results is not None:
        targets += http_report.target_rows(http_results)

    parts = [
        "# Benchmark results",
        "",
        f"Written by `.venv/bin/python -m bench.run{flags}` on {started}; the run "
        f"took {minutes:.0f} minutes. Every number below comes from that run.",
    ]
    if quick:
        parts += ["", "This was a `--quick` run: short runs, not for comparison."]
    parts += [
        "",
        "## Machine",
        "",
        table(["fact", "value"], [[name, value] for name, value in facts.items()]),
        "",
        "## Targets",
        "",
        table(["target", "median", "verdict"], targets),
    ]
    if core_results is not None:
        parts += [
            "",
            "## In-process core (`bench/core.py`)",
            "",
            core_report.render(core_results),
        ]
    if http_results is not None:
        parts += [
            "",
            "## HTTP (`bench/http.py`)",
            "",
            http_report.render(http_results),
            "",
            "Command lines used ($TMP, $PGTMP: temporary directories; $PORT, "
            "$PGPORT: free ports on 127.0.0.1; the wrk key prefix changes per run):",
            "",
            http_report.render_commands(http_results),
        ]
    parts += [
        "",
        "## How to run",
        "",
        "```sh",
        ".venv/bin/pip install asyncpg   # bench/http.py does this when it is missing",
        "apt-get install -y wrk          # bench/http.py does this when it is missing",
        "apt-get install -y lmdb-utils   # bench/core.py does this for mdb_stat",
        ".venv/bin/python -m bench.run           # full run, writes bench/RESULTS.md",
        ".venv/bin/python -m bench.run --quick   # short runs, same tables",
        ".venv/bin/python -m bench.core --quick  # one part alone, printed to stdout",
        "```",
        "",
        "The profiles of `cmdlog serve` use py-spy (`pip install py-spy` into any "
        "directory on PATH); without it they are skipped.",
    ]
    return "\n".join(parts) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs")
    parser.add_argument(
        "--no-profile", action="store_true", help="skip the cProfile and py-spy runs"
    )
    parser.add_argument(
        "--only", choices=["core", "http"], help="run one of the two benchmarks"
    )
    args = parser.parse_args()
    profile = not args.no_profile
    started = time.monotonic()
    code_version = _code_version()
    source_digest = _source_digest()

    core_results = None
    http_results = None
    if args.only in (None, "core"):
        progress("core benchmark")
        core_results = core.run(quick=args.quick, profile=profile)
    if args.only in (None, "http"):
        progress("HTTP benchmark")
        http_results = http.run(quick=args.quick, profile=profile)

    text = render(
        quick=args.quick,
        minutes=(time.monotonic() - started) / 60,
        code_version=code_version,
        code_changed=_source_digest() != source_digest,
        core_results=core_results,
        http_results=http_results,
    )
    RESULTS.write_text(text, encoding="utf-8")
    progress(f"wrote {RESULTS.relative_to(REPO)}")
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
