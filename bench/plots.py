"""PNG plots of the suite's results, drawn with matplotlib.

- `throughput.png`: single-command rate against connections, per system;
- `latency.png`: p50 and p99 latency against connections, per system;
- `retries.png`: request rate against the share of retried requests;
- `bootstrap.png`: commands stored by a bootstrapping node over time, and
  its rate between samples.

Each plot is drawn only when the parts it needs have results.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.summary import CMDLOG, merged_series
from bench.tools import ensure_module

COLORS = {
    CMDLOG: "tab:blue",
    "pg_service": "tab:orange",
    "jetstream": "tab:green",
    "bare_aiohttp": "tab:gray",
}
DPI = 110


def _pyplot() -> Any:
    ensure_module("matplotlib", "matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _connection_axis(axes: Any, counts: list[int]) -> None:
    axes.set_xscale("log", base=2)
    axes.set_xticks(counts)
    axes.set_xticklabels([str(count) for count in counts])
    axes.set_xlabel("connections (one request in flight each)")
    axes.grid(True, which="major", alpha=0.3)


def _throughput(plt: Any, series: dict[str, Any], path: Path) -> None:
    figure, axes = plt.subplots(figsize=(7, 4.5))
    counts = sorted({int(point[0]) for points in series.values() for point in points})
    for system, points in series.items():
        axes.plot(
            [p[0] for p in points],
            [p[1] for p in points],
            marker="o",
            label=system,
            color=COLORS.get(system),
        )
    _connection_axis(axes, counts)
    axes.set_ylabel("single commands/s (median)")
    axes.set_title("Single-command appends, one new key each")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    plt.close(figure)


def _latency(plt: Any, series: dict[str, Any], path: Path) -> None:
    figure, axes = plt.subplots(figsize=(7, 4.5))
    counts = sorted({int(point[0]) for points in series.values() for point in points})
    for system, points in series.items():
        color = COLORS.get(system)
        xs = [p[0] for p in points]
        axes.plot(xs, [p[2] / 1000 for p in points], "--", color=color, marker=".")
        axes.plot(
            xs,
            [p[3] / 1000 for p in points],
            "-",
            color=color,
            marker="o",
            label=system,
        )
    _connection_axis(axes, counts)
    axes.set_yscale("log")
    axes.set_ylabel("latency, ms (solid p99, dashed p50)")
    axes.set_title("Single-command latency")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    plt.close(figure)


def _retries(plt: Any, series: dict[str, Any], path: Path) -> None:
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for system, points in series.items():
        axes.plot(
            [p[0] * 100 for p in points],
            [p[1] for p in points],
            marker="o",
            label=system,
            color=COLORS.get(system),
        )
    axes.set_xlabel("requests that retry an earlier key, %")
    axes.set_ylabel("requests/s (median), retries included")
    axes.set_title("Retries at 64 connections")
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    plt.close(figure)


def _bootstrap(plt: Any, series: dict[str, list[list[float]]], path: Path) -> None:
    figure, (count_axes, rate_axes) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for size, samples in series.items():
        label = f"{int(size):,} commands"
        times = [sample[0] for sample in samples]
        counts = [sample[1] for sample in samples]
        count_axes.plot(times, counts, label=label)
        rates = [
            (counts[i] - counts[i - 1]) / (times[i] - times[i - 1])
            for i in range(1, len(samples))
            if times[i] > times[i - 1]
        ]
        rate_times = [
            times[i] for i in range(1, len(samples)) if times[i] > times[i - 1]
        ]
        rate_axes.plot(rate_times, rates, label=label)
    count_axes.set_ylabel("commands stored")
    count_axes.set_title("Bootstrap of an empty node from one peer (first run)")
    count_axes.legend()
    count_axes.grid(True, alpha=0.3)
    rate_axes.set_ylabel("commands/s between samples")
    rate_axes.set_xlabel("seconds since the new node was spawned")
    rate_axes.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    plt.close(figure)


def write_all(parts: dict[str, dict[str, Any]], out_dir: Path) -> list[str]:
    """Draw every plot the results allow into `out_dir`; return the file names."""
    jobs = []
    series = merged_series(parts, "series")
    if series:
        jobs += [("throughput.png", _throughput, series)]
        jobs += [("latency.png", _latency, series)]
    retries = merged_series(parts, "retries")
    if retries:
        jobs.append(("retries.png", _retries, retries))
    if "bootstrap" in parts:
        jobs.append(("bootstrap.png", _bootstrap, parts["bootstrap"]["series"]))
    if not jobs:
        return []
    plt = _pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, draw, data in jobs:
        draw(plt, data, out_dir / name)
    return [name for name, _draw, _data in jobs]
