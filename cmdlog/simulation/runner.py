"""Runs of the simulation: one seed with `simulate`, a range of seeds with
`main`, the command behind `python -m cmdlog.simulation`."""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import structlog

from cmdlog.simulation.cluster import Cluster
from cmdlog.simulation.records import SimReport
from cmdlog.simulation.settings import STEPS_DEFAULT, Fault


def simulate(
    seed: int,
    *,
    nodes: int = 3,
    steps: int = STEPS_DEFAULT,
    root: Path,
    fault: Fault | None = None,
) -> SimReport:
    """Run one seeded simulation in `root`, which must be empty, and check it.

    The same seed, node count, step count and fault give the same report.
    Raises `ValueError` for bad arguments, and whatever the node code raises,
    for example an `AssertionError` from an engine invariant.
    """
    if nodes < 1 or steps < 0:
        raise ValueError(f"need at least 1 node and 0 steps, got {nodes} and {steps}")
    root = Path(root)
    if root.exists() and any(root.iterdir()):
        raise ValueError(f"the simulation root {root} is not empty")
    cluster = Cluster(seed, nodes, root, fault)
    try:
        cluster.run(steps)
        cluster.settle()
        snapshots = cluster.check()
    finally:
        cluster.close()
    return cluster.report(seed, steps, snapshots)


def main(argv: Sequence[str] | None = None) -> int:
    """Run a range of seeds, print each failing one, and return 1 if any failed."""
    parser = argparse.ArgumentParser(
        prog="python -m cmdlog.simulation",
        description="Run the seeded cluster simulation for a range of seeds.",
    )
    parser.add_argument("--seeds", type=int, default=100, help="how many seeds to run")
    parser.add_argument("--start", type=int, default=0, help="the first seed")
    parser.add_argument("--nodes", type=int, default=3, help="nodes per run")
    parser.add_argument(
        "--steps", type=int, default=STEPS_DEFAULT, help="simulated steps per run"
    )
    parser.add_argument(
        "--fault",
        choices=["skip_chunk", "cursor_apart"],
        help="break delivery on purpose, to see the checks fail",
    )
    parser.add_argument(
        "--verbose", action="store_true", help="print every report in full"
    )
    args = parser.parse_args(argv)

    started = time.monotonic()
    failed = 0
    with _errors_only_logs():
        for seed in range(args.start, args.start + args.seeds):
            with tempfile.TemporaryDirectory(prefix="cmdlog-sim-") as tmp:
                try:
                    report = simulate(
                        seed,
                        nodes=args.nodes,
                        steps=args.steps,
                        root=Path(tmp),
                        fault=args.fault,
                    )
                except Exception as exc:
                    failed += 1
                    print(
                        f"seed {seed}: raised {type(exc).__name__}: {exc}", flush=True
                    )
                    if args.verbose:
                        traceback.print_exc()
                    continue
            if args.verbose:
                print(report, flush=True)
            if report.violations:
                failed += 1
                more = len(report.violations) - 1
                suffix = f" (and {more} more)" if more else ""
                print(f"seed {seed}: {report.violations[0]}{suffix}", flush=True)
    elapsed_s = time.monotonic() - started
    print(
        f"{args.seeds} seeds from {args.start}: {failed} failed, "
        f"{args.seeds - failed} passed in {elapsed_s:.1f} s"
    )
    return 1 if failed else 0


@contextmanager
def _errors_only_logs() -> Iterator[None]:
    """Drop structlog events below error while seeds run, then restore the
    previous structlog configuration.

    Every node logs its openings, conflicts and rewinds, and structlog's
    default configuration prints them to stdout among the reports.
    """
    saved = structlog.get_config()
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR)
    )
    try:
        yield
    finally:
        structlog.configure(**saved)
