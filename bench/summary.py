"""Tables across parts of the suite: cmdlog next to every peer.

The HTTP part measures cmdlog, the PostgreSQL service and the bare aiohttp
handler in rotated rounds. The JetStream part measures NATS in rounds of
its own, within the same suite run, so the ratios here are ratios of
medians: each part reduces its rounds to medians per connection count (a
"series"). Series points are `[connections, requests/s, p50 µs, p99 µs]`,
and retry points are `[duplicate share, requests/s, p50 µs, p99 µs]`.
"""

from __future__ import annotations

from typing import Any

from bench.report import table

CMDLOG = "cmdlog"
JETSTREAM = "jetstream"
PEERS = ("pg_service", JETSTREAM, "bare_aiohttp")
HEADLINE_CONNECTIONS = 64
TARGETS = {"pg_service": 2.0, JETSTREAM: 1.0}
"""Minimum ratio of cmdlog's single-command rate to each peer's, at 64 connections."""


def merged_series(parts: dict[str, dict[str, Any]], key: str) -> dict[str, Any]:
    """Merge one kind of series from the HTTP and JetStream parts, cmdlog first."""
    merged: dict[str, Any] = {}
    for name in ("http", "jetstream"):
        if name in parts:
            merged.update(parts[name].get(key, {}))
    return {system: merged[system] for system in (CMDLOG, *PEERS) if system in merged}


def _point(points: list[list[float]], x: float) -> list[float] | None:
    return next((point for point in points if point[0] == x), None)


def cross_targets(parts: dict[str, dict[str, Any]]) -> list[list[str]]:
    """Return target rows that need two parts: cmdlog against JetStream."""
    series = merged_series(parts, "series")
    if CMDLOG not in series or JETSTREAM not in series:
        return []
    ours = _point(series[CMDLOG], HEADLINE_CONNECTIONS)
    theirs = _point(series[JETSTREAM], HEADLINE_CONNECTIONS)
    if ours is None or theirs is None:
        return []
    ratio = ours[1] / theirs[1]
    goal = TARGETS[JETSTREAM]
    return [
        [
            f"single commands at {HEADLINE_CONNECTIONS} connections: cmdlog / "
            f"JetStream ≥ {goal:g} (ratio of medians)",
            f"{ratio:.2f}",
            "met" if ratio >= goal else "not met",
        ]
    ]


def render_side_by_side(parts: dict[str, dict[str, Any]]) -> str:
    """Render single-command rates and latency per connection count for every
    system, cmdlog's ratio to each peer, and the retries."""
    series = merged_series(parts, "series")
    if CMDLOG not in series:
        return ""
    text = _render_sweep(series)
    retries = merged_series(parts, "retries")
    if CMDLOG in retries:
        text += "\n\n" + _render_retries(retries)
    return text


def _render_sweep(series: dict[str, Any]) -> str:
    systems = list(series)
    counts = sorted({int(point[0]) for s in systems for point in series[s]})
    rows = []
    for connections in counts:
        for system in systems:
            point = _point(series[system], connections)
            if point is not None:
                rows.append(
                    [
                        connections,
                        system,
                        f"{point[1]:,.0f}",
                        f"{point[2] / 1000:.1f}",
                        f"{point[3] / 1000:.1f}",
                    ]
                )

    ratio_rows = []
    for connections in counts:
        ours = _point(series[CMDLOG], connections)
        cells: list[object] = [connections]
        for peer in systems[1:]:
            theirs = _point(series[peer], connections)
            cells.append(
                f"{ours[1] / theirs[1]:.2f}" if ours and theirs and theirs[1] else ""
            )
        ratio_rows.append(cells)

    return "\n".join(
        [
            "Single commands (one new key per request), medians over each part's "
            "rounds. cmdlog, pg_service and bare_aiohttp under wrk over HTTP; "
            "JetStream under the NATS client with one publish in flight per "
            "connection:",
            "",
            table(["connections", "system", "commands/s", "p50 ms", "p99 ms"], rows),
            "",
            "cmdlog's rate divided by each peer's (ratio of medians):",
            "",
            table(
                ["connections", *(f"cmdlog / {peer}" for peer in systems[1:])],
                ratio_rows,
            ),
        ]
    )


def _render_retries(retries: dict[str, Any]) -> str:
    points = sorted(
        (
            (share, system, rate, p50_us, p99_us)
            for system, of_system in retries.items()
            for share, rate, p50_us, p99_us in of_system
        ),
        key=lambda point: point[0],
    )
    rows = [
        [
            f"{share:.0%}",
            system,
            f"{rate:,.0f}",
            f"{p50_us / 1000:.1f}",
            f"{p99_us / 1000:.1f}",
        ]
        for share, system, rate, p50_us, p99_us in points
    ]
    return "\n".join(
        [
            f"Retries at {HEADLINE_CONNECTIONS} connections: a share of the "
            "requests resends an earlier one with the same key and body. "
            "Requests/s counts the resends too:",
            "",
            table(["duplicates", "system", "requests/s", "p50 ms", "p99 ms"], rows),
        ]
    )


def render_quick(parts: dict[str, dict[str, Any]]) -> str:
    """Render what a quick run prints: targets and the side-by-side tables."""
    targets: list[list[str]] = []
    for found in parts.values():
        targets += found["targets"]
    targets += cross_targets(parts)
    lines = [
        "",
        "Quick run: short measurements on a shared machine, for a first look only.",
        "",
        table(["target", "median", "verdict"], targets),
    ]
    side_by_side = render_side_by_side(parts)
    if side_by_side:
        lines += ["", side_by_side]
    return "\n".join(lines) + "\n"
