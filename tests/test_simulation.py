"""Tests of the seeded cluster simulation: its promises, replays and checks."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cmdlog.simulation import SimReport, main, simulate

QUICK_SEEDS = range(20)
QUICK_STEPS = 100
FAULT_STEPS = 200
SOAK_SEEDS = range(1_000, 1_300)
SOAK_STEPS = 250


@pytest.fixture(scope="module")
def quick_reports(tmp_path_factory: pytest.TempPathFactory) -> list[SimReport]:
    root = tmp_path_factory.mktemp("simulation")
    return [
        simulate(seed, steps=QUICK_STEPS, root=root / f"seed-{seed}")
        for seed in QUICK_SEEDS
    ]


def test_quick_seeds_keep_promises(quick_reports: list[SimReport]) -> None:
    """Twenty seeded runs of three nodes keep every promise."""
    failures = {r.seed: r.violations for r in quick_reports if r.violations}
    assert failures == {}


def test_quick_seeds_exercise_faults(quick_reports: list[SimReport]) -> None:
    """The quick seeds together crash, drop, duplicate, partition and rewind."""
    totals: dict[str, int] = {}
    for report in quick_reports:
        for name, count in report.counts.items():
            totals[name] = totals.get(name, 0) + count
        totals["rewinds"] = totals.get("rewinds", 0) + report.rewinds
        totals["full_refolds"] = totals.get("full_refolds", 0) + report.full_refolds
        totals["conflicts"] = totals.get("conflicts", 0) + report.conflicts
    for name in (
        "crashes",
        "drops",
        "duplicates",
        "partitions",
        "clock_fixes",
        "replacements",
        "held",
        "key_reused",
        "rewinds",
        "full_refolds",
        "conflicts",
    ):
        assert totals[name] > 0, name


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_soak_seeds_keep_promises(tmp_path: Path) -> None:
    """Three hundred seeded runs keep every promise."""
    failures = {}
    for seed in SOAK_SEEDS:
        root = tmp_path / f"seed-{seed}"
        report = simulate(seed, steps=SOAK_STEPS, root=root)
        shutil.rmtree(root)
        if report.violations:
            failures[seed] = report.violations
    assert failures == {}


def test_conflicting_copies_settle(tmp_path: Path) -> None:
    """Copies of one ID with other payloads settle, each logged once per node."""
    report = simulate(0, steps=QUICK_STEPS, root=tmp_path)
    promises = {violation.split(":", 1)[0] for violation in report.violations}
    assert report.conflicts > 0, "pick a seed with conflicting copies"
    assert report.counts["settle_rounds"] > 0
    assert "quiescence" not in promises
    assert "log" not in promises


def test_same_seed_same_report(tmp_path: Path) -> None:
    """A seed replays exactly: two runs of it give equal reports."""
    # Seed 11 crashes a node, replaces one, and runs a clock beyond the skew.
    first = simulate(11, steps=QUICK_STEPS, root=tmp_path / "first")
    second = simulate(11, steps=QUICK_STEPS, root=tmp_path / "second")
    assert first.counts["crashes"] > 0, "pick a seed that crashes a node"
    assert first.counts["replacements"] > 0, "pick a seed that replaces a node"
    assert first.counts["held"] > 0, "pick a seed with a fast clock"
    assert first == second


def test_other_seed_other_run(tmp_path: Path) -> None:
    """Different seeds drive different runs."""
    first = simulate(4, steps=QUICK_STEPS, root=tmp_path / "first")
    second = simulate(5, steps=QUICK_STEPS, root=tmp_path / "second")
    assert first.counts != second.counts


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_skipped_chunk_breaks_promises(tmp_path: Path, seed: int) -> None:
    """A puller that stores a chunk's cursor but not its commands is caught."""
    report = simulate(
        seed, nodes=2, steps=FAULT_STEPS, root=tmp_path, fault="skip_chunk"
    )
    assert report.violations != ()


@pytest.mark.parametrize("seed", [0, 2, 3])
def test_cursor_apart_breaks_promises(tmp_path: Path, seed: int) -> None:
    """A puller that stores the cursor apart from the commands is caught."""
    report = simulate(
        seed, nodes=2, steps=FAULT_STEPS, root=tmp_path, fault="cursor_apart"
    )
    assert report.violations != ()


def test_soak_command_passes(capsys: pytest.CaptureFixture[str]) -> None:
    """The soak command exits 0 and prints a summary when every seed passes."""
    assert main(["--seeds", "2", "--steps", "60"]) == 0
    output = capsys.readouterr().out
    assert "2 seeds from 0: 0 failed, 2 passed" in output


def test_soak_command_fails(capsys: pytest.CaptureFixture[str]) -> None:
    """The soak command prints a failing seed's violation and exits 1."""
    argv = ["--seeds", "1", "--start", "3", "--nodes", "2", "--steps", "100"]
    assert main([*argv, "--fault", "skip_chunk"]) == 1
    output = capsys.readouterr().out
    assert output.startswith("seed 3: ")
    assert "1 seeds from 3: 1 failed, 0 passed" in output
