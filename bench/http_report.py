"""Markdown tables of the HTTP benchmark: rates, latency, CPU, ratios, targets."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from bench.http import (
    BATCH_CONNECTIONS,
    BATCH_ITEMS,
    BATCH_SYSTEMS,
    SINGLE_CONNECTIONS,
    SINGLE_SYSTEMS,
    WRK_THREADS,
    Measurement,
)
from bench.report import median, spread, table
from bench.systems import BARE, CMDLOG, CMDLOG_QUIET, PG


def _ms(values: list[int]) -> str:
    return spread([value / 1000 for value in values], "{:,.1f}")


def _mode_table(measurements: list[Measurement], systems: tuple[str, ...]) -> str:
    rows = []
    for system in systems:
        found = [m for m in measurements if m.system == system]
        if not found:
            continue
        acknowledged = sum(m.wrk.requests * m.items_per_request for m in found)
        stored = [m.stored for m in found if m.stored is not None]
        stored_cell = (
            f"{sum(stored):,} / {acknowledged:,}" if stored else "stores nothing"
        )
        rows.append(
            [
                system,
                spread([m.commands_per_s for m in found]),
                _ms([m.wrk.p50_us for m in found]),
                _ms([m.wrk.p99_us for m in found]),
                spread([m.cpu_us_per_command for m in found], "{:,.0f}"),
                sum(m.wrk.errors for m in found),
                stored_cell,
                spread([m.other_cores for m in found], "{:.2f}"),
            ]
        )
    return table(
        [
            "system",
            "commands/s",
            "p50 ms",
            "p99 ms",
            "CPU µs per command",
            "errors",
            "stored / completed",
            "other CPU",
        ],
        rows,
    )


def _cpu_table(measurements: list[Measurement], systems: tuple[str, ...]) -> str:
    def per_command(
        found: list[Measurement], get: Callable[[Measurement], float]
    ) -> str:
        return spread([get(m) / m.commands * 1e6 for m in found], "{:,.0f}")

    rows = []
    for system in systems:
        found = [m for m in measurements if m.system == system]
        if found:
            group_sizes = [
                m.stored / m.commits for m in found if m.stored and m.commits
            ]
            rows.append(
                [
                    system,
                    spread(group_sizes, "{:,.0f}") if group_sizes else "",
                    per_command(found, lambda m: m.cpu_s),
                    per_command(found, lambda m: m.main_thread_cpu_s),
                    per_command(
                        found,
                        lambda m: max(m.process_cpu_s - m.main_thread_cpu_s, 0.0),
                    ),
                    per_command(found, lambda m: max(m.cpu_s - m.process_cpu_s, 0.0)),
                ]
            )
    return table(
        [
            "system",
            "commands per commit",
            "all",
            "event-loop thread",
            "other threads of the process",
            "other processes (PostgreSQL)",
        ],
        rows,
    )


def ratios(
    measurements: list[Measurement], mode: str, over: str, under: str
) -> list[float]:
    """Return `over / under` commands/s for each round that measured both."""
    values = []
    for round_index in sorted({m.round_index for m in measurements}):
        pair = {
            m.system: m.commands_per_s
            for m in measurements
            if m.mode == mode and m.round_index == round_index
        }
        if over in pair and under in pair:
            values.append(pair[over] / pair[under])
    return values


def target_rows(results: dict[str, Any]) -> list[list[str]]:
    """Return `[target, measured median, verdict]` rows for the HTTP targets."""
    measurements: list[Measurement] = results["measurements"]
    batch = [
        m.commands_per_s
        for m in measurements
        if m.mode == "batch" and m.system == CMDLOG
    ]
    checks = [
        (
            "single commands: cmdlog / pg_service ≥ 2",
            median(ratios(measurements, "single", CMDLOG, PG)),
            2.0,
            "{:.2f}",
        ),
        (
            "single commands: cmdlog / bare_aiohttp ≥ 0.6",
            median(ratios(measurements, "single", CMDLOG, BARE)),
            0.6,
            "{:.2f}",
        ),
        (
            "batch endpoint: cmdlog ≥ 25,000 commands/s",
            median(batch),
            25_000,
            "{:,.0f}",
        ),
    ]
    return [
        [name, fmt.format(value), "met" if value >= goal else "not met"]
        for name, value, goal, fmt in checks
    ]


def render(results: dict[str, Any]) -> str:
    """Render the HTTP results as Markdown."""
    scale = results["scale"]
    measurements: list[Measurement] = results["measurements"]
    single = [m for m in measurements if m.mode == "single"]
    batch = [m for m in measurements if m.mode == "batch"]
    parts = [
        f"{scale['rounds']} rounds. Each measurement is a fresh server process, "
        f"{scale['warmup_s']} s of warm-up, then {scale['duration_s']} s measured by "
        f"wrk ({WRK_THREADS} threads). Cells are median (min–max) over the rounds. "
        "CPU is the server's user + system time over the measured run per "
        "completed command, with every PostgreSQL process added for pg_service. "
        "'stored / completed' compares the system's own count of new commands with "
        "the responses wrk completed, summed over the rounds. Stored can be higher "
        "by the requests still in flight when wrk stopped. 'other CPU' is the CPU "
        "that processes other than the server, its database and wrk used during "
        f"the run, in cores out of {os.cpu_count()}, so it shows other users of "
        "this shared machine.",
        "",
        f"Single commands: `POST /commands`, {SINGLE_CONNECTIONS} connections, a new "
        "Idempotency-Key per request, a `ledger.deposit` body:",
        "",
        _mode_table(single, (CMDLOG, CMDLOG_QUIET, PG, BARE)),
        "",
        f"Batches: `POST /commands/batch`, {BATCH_ITEMS:,} items per request, "
        f"{BATCH_CONNECTIONS} connections. Latency is per batch request:",
        "",
        _mode_table(batch, BATCH_SYSTEMS),
        "",
        "CPU µs per command by where it was spent, from the user + system time "
        "in /proc. In cmdlog the other thread is the writer, which runs every "
        "write transaction. 'commands per commit' is cmdlog's group-commit size, "
        "from `cmdlog_commits_total` in /metrics. The `GET /healthz` row is "
        "cmdlog's HTTP layer "
        "alone (middlewares, metrics, the per-request log line) with no body "
        "and no write. Single commands first, then batches:",
        "",
        _cpu_table(single, SINGLE_SYSTEMS),
        "",
        _cpu_table(batch, BATCH_SYSTEMS),
        "",
        "Ratios of commands/s, computed within each round, then the median (min–max):",
        "",
        table(
            ["ratio", "value", "target"],
            [
                [
                    "single: cmdlog / pg_service",
                    spread(ratios(single, "single", CMDLOG, PG), "{:.2f}"),
                    "≥ 2",
                ],
                [
                    "single: cmdlog / bare_aiohttp",
                    spread(ratios(single, "single", CMDLOG, BARE), "{:.2f}"),
                    "≥ 0.6",
                ],
                [
                    "single: cmdlog --log-level warning / cmdlog",
                    spread(ratios(single, "single", CMDLOG_QUIET, CMDLOG), "{:.2f}"),
                    "",
                ],
                [
                    "batch: cmdlog / pg_service",
                    spread(ratios(batch, "batch", CMDLOG, PG), "{:.2f}"),
                    "",
                ],
                [
                    "batch: cmdlog / bare_aiohttp",
                    spread(ratios(batch, "batch", CMDLOG, BARE), "{:.2f}"),
                    "",
                ],
            ],
        ),
    ]
    for mode, text in results["profiles"].items():
        parts += [
            "",
            f"py-spy profile of `cmdlog serve` during one extra {mode} run "
            f"({scale['duration_s']} s, not part of the tables above):",
            "",
            "```",
            text,
            "```",
        ]
    return "\n".join(parts)


def render_commands(results: dict[str, Any]) -> str:
    lines = [f"# {role}\n{command}" for role, command in results["commands"].items()]
    return "```sh\n" + "\n".join(lines) + "\n```"
