"""Markdown tables of the HTTP benchmark: rates, latency, CPU, ratios, targets.

Also the connection sweep and the retries, and `sweep_series` for plots.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from bench.http import (
    BATCH_CONNECTIONS,
    BATCH_ITEMS,
    BATCH_SYSTEMS,
    RETRY_SEED,
    RETRY_WINDOW,
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
    rounds = scale["rounds"]
    parts = [
        f"{rounds} round{'' if rounds == 1 else 's'}. Each measurement is a fresh "
        "server process, "
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
        "",
        render_sweep(results),
        "",
        render_retries(results),
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


# connection sweep and retries: `results["sweep"]` and `results["retries"]`
# are lists of plain dicts, one per measurement (see `bench.http.sweep_row`
# and `bench.http.retry_row`).


def _in_order(rows: list[dict[str, Any]], key: str) -> list[Any]:
    """Return the distinct values of `key` in `rows`, in order of first appearance."""
    return list(dict.fromkeys(row[key] for row in rows))


def _row_ratios(
    rows: list[dict[str, Any]], over: str, under: str, value: str = "requests_per_s"
) -> list[float]:
    """Return `over / under` of `value` for each round that measured both."""
    ratios_found = []
    for round_index in sorted({row["round"] for row in rows}):
        pair = {
            row["system"]: row[value] for row in rows if row["round"] == round_index
        }
        if over in pair and under in pair:
            ratios_found.append(pair[over] / pair[under])
    return ratios_found


def _ms_2(values: list[int]) -> str:
    return spread([value / 1000 for value in values], "{:,.2f}")


def _median_series(rows: list[dict[str, Any]], x: str) -> dict[str, list[list[float]]]:
    """Reduce rows to `[x, requests/s, p50 µs, p99 µs]` medians per system and x.

    Points are sorted by x, and systems keep the order in which they were
    measured.
    """
    series: dict[str, list[list[float]]] = {}
    for system in _in_order(rows, "system"):
        of_system = [row for row in rows if row["system"] == system]
        points = []
        for value in sorted({row[x] for row in of_system}):
            found = [row for row in of_system if row[x] == value]
            points.append(
                [
                    value,
                    median(row["requests_per_s"] for row in found),
                    median(row["p50_us"] for row in found),
                    median(row["p99_us"] for row in found),
                ]
            )
        series[system] = points
    return series


def sweep_series(results: dict[str, Any]) -> dict[str, list[list[float]]]:
    """Return each system's sweep as `[connections, requests/s, p50 µs, p99 µs]`,
    medians over the rounds."""
    return _median_series(results["sweep"], "connections")


def retry_series(results: dict[str, Any]) -> dict[str, list[list[float]]]:
    """Return each system's retry runs as `[duplicate share, requests/s, p50 µs,
    p99 µs]`, medians over the rounds."""
    return _median_series(results["retries"], "duplicate_share")


def render_sweep(results: dict[str, Any]) -> str:
    """Render the connection sweep as Markdown: rates and latency, then ratios."""
    rows: list[dict[str, Any]] = results["sweep"]
    systems = _in_order(rows, "system")
    connection_counts = sorted({row["connections"] for row in rows})
    measured = []
    ratio_rows = []
    for connections in connection_counts:
        at_count = [row for row in rows if row["connections"] == connections]
        for system in systems:
            found = [row for row in at_count if row["system"] == system]
            if not found:
                continue
            measured.append(
                [
                    connections,
                    system,
                    spread([row["requests_per_s"] for row in found]),
                    _ms_2([row["p50_us"] for row in found]),
                    _ms_2([row["p99_us"] for row in found]),
                    sum(row["errors"] for row in found),
                    spread([row["other_cores"] for row in found], "{:.2f}"),
                ]
            )
        ratio_rows.append(
            [
                connections,
                spread(_row_ratios(at_count, CMDLOG, PG), "{:.2f}"),
                spread(_row_ratios(at_count, CMDLOG, BARE), "{:.2f}"),
            ]
        )
    counts_text = ", ".join(str(count) for count in connection_counts)
    return "\n".join(
        [
            f"Connection sweep: the single commands above at {counts_text} "
            f"connections, with {WRK_THREADS} wrk threads (1 at 1 connection). "
            f"The {SINGLE_CONNECTIONS}-connection rows are the measurements of the "
            "single-command table. bare_aiohttp stores nothing, so it is the "
            "ceiling for one aiohttp process. Cells are median (min–max) over the "
            "rounds, and 'other CPU' is as in the first table:",
            "",
            table(
                [
                    "connections",
                    "system",
                    "requests/s",
                    "p50 ms",
                    "p99 ms",
                    "errors",
                    "other CPU",
                ],
                measured,
            ),
            "",
            "Sweep ratios of requests/s, computed within each round at the same "
            "connection count, then the median (min–max):",
            "",
            table(
                ["connections", "cmdlog / pg_service", "cmdlog / bare_aiohttp"],
                ratio_rows,
            ),
        ]
    )


def _stored_check(found: list[dict[str, Any]]) -> str:
    """Return "equal" when every round stored one command per new key sent.

    Otherwise name the rounds where the counts differ.
    """
    if any(row["stored"] is None for row in found):
        return "stores nothing"
    wrong = [row for row in found if row["stored"] != row["unique_keys"]]
    if not wrong:
        return "equal"
    rounds = ", ".join(str(row["round"] + 1) for row in wrong)
    return f"NOT equal in round {rounds}"


def render_retries(results: dict[str, Any]) -> str:
    """Render the retries as Markdown: rates, latency, stored counts, ratios."""
    rows: list[dict[str, Any]] = results["retries"]
    systems = _in_order(rows, "system")
    measured = []
    ratio_rows = []
    for share in sorted({row["duplicate_share"] for row in rows}):
        at_share = [row for row in rows if row["duplicate_share"] == share]
        for system in systems:
            found = [row for row in at_share if row["system"] == system]
            if not found:
                continue
            stored = [row["stored"] for row in found if row["stored"] is not None]
            measured.append(
                [
                    f"{share:.0%}",
                    system,
                    spread([row["requests_per_s"] for row in found]),
                    spread(
                        [
                            row["stored_per_s"]
                            for row in found
                            if row["stored_per_s"] is not None
                        ]
                    ),
                    _ms([row["p50_us"] for row in found]),
                    _ms([row["p99_us"] for row in found]),
                    sum(row["errors"] for row in found),
                    f"{sum(row['duplicates_sent'] for row in found):,}",
                    f"{sum(row['unique_keys'] for row in found):,}",
                    f"{sum(stored):,}" if stored else "",
                    _stored_check(found),
                    spread([row["other_cores"] for row in found], "{:.2f}"),
                ]
            )
        ratio_rows.append(
            [
                f"{share:.0%}",
                spread(_row_ratios(at_share, CMDLOG, PG), "{:.2f}"),
                spread(_row_ratios(at_share, CMDLOG, PG, "stored_per_s"), "{:.2f}"),
            ]
        )
    connections = _in_order(rows, "connections")
    return "\n".join(
        [
            "Retries: `POST /commands` over "
            f"{', '.join(map(str, connections))} connections "
            "(`bench/wrk/retry.lua`). With probability 'duplicate share', a "
            "request resends one of its wrk thread's last "
            f"{RETRY_WINDOW:,} new requests, picked uniformly, with the same "
            "Idempotency-Key and body, as a client retry does. Otherwise it sends "
            f"a new key. wrk thread i seeds its generator with {RETRY_SEED} + i, so "
            "the k-th request of a thread makes the same choice in every run. "
            "'requests/s' counts every completed response, new or resent. "
            "'stored/s' is the system's own "
            "count of new commands over the run time. 'new keys sent' includes "
            "the requests in flight when wrk stopped, and 'stored' is read once "
            "the count stops changing, so the two are equal when every retry was "
            "deduplicated and no new command was lost. Counts are summed over "
            "the rounds, and 'other CPU' is as in the first table:",
            "",
            table(
                [
                    "duplicate share",
                    "system",
                    "requests/s",
                    "stored/s",
                    "p50 ms",
                    "p99 ms",
                    "errors",
                    "resent",
                    "new keys sent",
                    "stored",
                    "stored vs new keys",
                    "other CPU",
                ],
                measured,
            ),
            "",
            "Retry ratios, computed within each round at the same duplicate share, "
            "then the median (min–max):",
            "",
            table(
                [
                    "duplicate share",
                    "cmdlog / pg_service requests/s",
                    "cmdlog / pg_service stored/s",
                ],
                ratio_rows,
            ),
        ]
    )
