"""Markdown tables of the core benchmark: rates, ratios, pages, profiles."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from bench import profiles
from bench.core import RAW_BATCH, RAW_OTHER_WRITEMAP, RAW_PUTS, Profile, Round
from bench.lmdb_ceiling import distinct_leaves_expected, newest_generation_leaves
from bench.pages import TAIL_COMMITS, CommitPages
from bench.report import median, spread, table
from bench.workload import ACCOUNTS, BATCH_COMMANDS, DEPOSIT_SHARE


def target_rows(results: dict[str, Any]) -> list[list[str]]:
    """Return `[target, measured median, verdict]` rows for the core targets."""
    rounds: list[Round] = results["rounds"]
    checks = [
        (
            "append, `Database.submit` only ≥ 30,000 commands/s",
            median(r.append.rate_excluding_prepare for r in rounds),
            30_000,
        ),
        (
            "append with `prepare_submission` ≥ 30,000 commands/s",
            median(r.append.rate_including_prepare for r in rounds),
            30_000,
        ),
        ("replay ≥ 100,000 commands/s", median(r.replay.rate for r in rounds), 100_000),
    ]
    return [
        [name, f"{value:,.0f}", "met" if value >= goal else "not met"]
        for name, value, goal in checks
    ]


def render(results: dict[str, Any]) -> str:
    """Render core results as Markdown: rates, ratios, pages, profiles."""
    rounds: list[Round] = results["rounds"]
    scale = results["scale"]

    def each(get: Callable[[Round], float]) -> list[float]:
        return [get(r) for r in rounds]

    def ratio(get: Callable[[Round], float]) -> str:
        return spread(each(get), "{:.2f}")

    deposits = int(DEPOSIT_SHARE * 100)
    parts = [
        f"Each round: {ACCOUNTS:,} `ledger.open`, then {scale['commands']:,} "
        f"commands, {BATCH_COMMANDS:,} per commit, {deposits}% deposits and "
        f"{100 - deposits}% charges on random accounts under random UUID4 keys, "
        f"{len(rounds)} rounds. Cells are median (min–max) over the rounds. Other "
        "processes on this shared machine used "
        f"{spread(each(lambda r: r.other_cores), '{:.2f}')} of its "
        f"{os.cpu_count()} cores during the rounds. The raw runs open LMDB with "
        f"the flags of cmdlog's store (`writemap={results['writemap']}`), except "
        "the run marked 'the other writemap setting'.",
        "",
        table(
            ["measure", "commands/s", "target"],
            [
                [
                    "(a) append, `Database.submit` only",
                    spread(each(lambda r: r.append.rate_excluding_prepare)),
                    "≥ 30,000",
                ],
                [
                    "(a) append, with `prepare_submission`",
                    spread(each(lambda r: r.append.rate_including_prepare)),
                    "≥ 30,000",
                ],
                [
                    "(b) replay, `cmdlog.replay.replay` "
                    + _passes_label({r.replay.passes for r in rounds}),
                    spread(each(lambda r: r.replay.rate)),
                    "≥ 100,000",
                ],
                [
                    "(c) raw LMDB, commit per 1,000 commands",
                    spread(each(lambda r: r.raw[RAW_BATCH].rate)),
                    "",
                ],
                [
                    "(c) raw LMDB, commit per 1,000 puts",
                    spread(each(lambda r: r.raw[RAW_PUTS].rate)),
                    "",
                ],
                [
                    "(c) raw LMDB, commit per 1,000 commands, "
                    f"`writemap={not results['writemap']}`",
                    spread(each(lambda r: r.raw[RAW_OTHER_WRITEMAP].rate)),
                    "",
                ],
                [
                    "disk: 4 KiB write + fdatasync, per second",
                    spread(each(lambda r: r.fsync_per_s)),
                    "",
                ],
            ],
        ),
        "",
        "Ratios, computed within each round, then the median (min–max). The "
        "first raw variant commits as often as cmdlog does, so it is the "
        "ceiling to compare with:",
        "",
        table(
            ["ratio", "value"],
            [
                [
                    "(a) append / (c) raw per 1,000 commands",
                    ratio(
                        lambda r: (
                            r.append.rate_excluding_prepare / r.raw[RAW_BATCH].rate
                        )
                    ),
                ],
                [
                    "(a) append with prepare / (c) raw per 1,000 commands",
                    ratio(
                        lambda r: (
                            r.append.rate_including_prepare / r.raw[RAW_BATCH].rate
                        )
                    ),
                ],
                [
                    "(b) replay / (c) raw per 1,000 commands",
                    ratio(lambda r: r.replay.rate / r.raw[RAW_BATCH].rate),
                ],
                [
                    "(a) append / (c) raw per 1,000 puts",
                    ratio(
                        lambda r: r.append.rate_excluding_prepare / r.raw[RAW_PUTS].rate
                    ),
                ],
                [
                    "(b) replay / (c) raw per 1,000 puts",
                    ratio(lambda r: r.replay.rate / r.raw[RAW_PUTS].rate),
                ],
            ],
        ),
        "",
        _render_append_detail(rounds),
        "",
        _render_pages(rounds),
    ]
    for name, found in results["profiles"].items():
        parts += ["", _render_profile(name, found)]
    return "\n".join(parts)


def _render_append_detail(rounds: list[Round]) -> str:
    appends = [r.append for r in rounds]
    before = [
        a.before_trim_commands / a.before_trim_s for a in appends if a.before_trim_s
    ]
    after = [a.after_trim_commands / a.after_trim_s for a in appends if a.after_trim_s]
    rows = [
        [
            "engine work inside the transaction, µs per command",
            spread([a.engine_s / a.commands * 1e6 for a in appends], "{:.1f}"),
        ],
        [
            "commit, sync and transaction setup, ms per commit",
            spread(
                [(a.submit_s - a.engine_s) / a.commits * 1e3 for a in appends], "{:.1f}"
            ),
        ],
        [
            "share of `Database.submit` time inside the transaction",
            spread([a.engine_s / a.submit_s for a in appends], "{:.0%}"),
        ],
        [
            "`prepare_submission`, µs per command",
            spread([a.prepare_s / a.commands * 1e6 for a in appends], "{:.1f}"),
        ],
        ["append rate while the undo horizon fills, commands/s", spread(before)],
        ["append rate once every commit trims undo, commands/s", spread(after)],
        [
            "charges rejected (`insufficient_funds`)",
            spread([a.rejected for a in appends]),
        ],
    ]
    return "\n".join(
        ["Where the append time goes:", "", table(["measure", "value"], rows)]
    )


def _render_pages(rounds: list[Round]) -> str:
    def columns(get: Callable[[Round], CommitPages]) -> list[str]:
        tails = [get(r).tail_dirtied for r in rounds]
        return [
            spread([median(tail) for tail in tails]) if all(tails) else "n/a",
            spread([get(r).last_pgno_growth_per_commit for r in rounds], "{:,.1f}"),
            spread([get(r).device_mb_per_commit for r in rounds], "{:,.1f}"),
        ]

    rows = [["cmdlog append", *columns(lambda r: r.append.pages)]]
    for name in rounds[0].raw:
        rows.append([name, *columns(lambda r, n=name: r.raw[n].pages)])

    trees = rounds[-1].trees
    tree_rows = [
        [
            t["db"],
            f"{t['entries']:,}",
            t["depth"],
            f"{t['branch_pages']:,}",
            f"{t['leaf_pages']:,}",
            f"{t['entries'] / max(t['leaf_pages'], 1):.1f}",
        ]
        for t in trees
    ]
    ids = next(t for t in trees if t["db"] == "id_gens")
    state = next(t for t in trees if t["db"] == "state_gens.ledger")
    charges = int(BATCH_COMMANDS * (1 - DEPOSIT_SHARE))
    ids_leaves = newest_generation_leaves(ids)
    state_leaves = newest_generation_leaves(state)
    ids_hit = distinct_leaves_expected(ids_leaves, BATCH_COMMANDS)
    state_hit = distinct_leaves_expected(state_leaves, charges + ACCOUNTS)
    return "\n".join(
        [
            "Pages per commit of 1,000 commands. 'Pages dirtied' is, for each of "
            f"the last {TAIL_COMMITS} commits of a run (trees at full size), the "
            "pages named in that commit's free-list record (`mdb_stat -ff`: the "
            "old copies of every page it rewrote) plus the growth of the trees' "
            "page counts (pages it added); the cell is the median over those "
            "commits. 'last_pgno growth' counts only pages taken from the end "
            "of the file rather than from the free list. 'Device MB' is the "
            "growth of sectors written in /proc/diskstats over each commit, "
            "averaged over the run (other processes' writes included):",
            "",
            table(
                [
                    "run",
                    "pages dirtied per commit",
                    "last_pgno growth per commit",
                    "device MB per commit",
                ],
                rows,
            ),
            "",
            "Tree shape of the cmdlog store after the last round's append:",
            "",
            table(
                [
                    "database",
                    "entries",
                    "depth",
                    "branch pages",
                    "leaf pages",
                    "per leaf",
                ],
                tree_rows,
            ),
            "",
            "Every put lands in the newest generation (see "
            "`cmdlog/generations.py`). With L ≈ "
            f"{ids_leaves:,.0f} leaves in the newest generation of `id_gens` "
            "(its share of the tree's leaves by entries), "
            f"{BATCH_COMMANDS:,} uniformly random keys are expected to land on "
            f"L·(1 − (1 − 1/L)^{BATCH_COMMANDS}) ≈ {ids_hit:,.0f} distinct leaves. "
            f"In `state_gens.ledger` (L ≈ {state_leaves:,.0f}), the {charges} "
            f"random `charge/<key>` keys and up to {ACCOUNTS:,} account keys hit at "
            f"most ≈ {state_hit:,.0f}. LMDB copies each leaf a commit touches, "
            "and the branch pages above it, whole.",
        ]
    )


def _render_profile(name: str, found: Profile) -> str:
    rows = [
        [group, f"{seconds:.2f}", f"{share:.0%}"]
        for group, seconds, share in found.groups
    ]
    return "\n".join(
        [
            f"cProfile of one {name} run (cumulative seconds under the profiler; "
            "groups overlap, so shares do not add up to 100%):",
            "",
            table(["code", "seconds", "share"], rows),
            "",
            f"Top {profiles.TOP_LINES} functions by own time:",
            "",
            "```",
            found.top,
            "```",
        ]
    )


def _passes_label(passes: set[int]) -> str:
    """Name how the rounds' replays read the log, in parentheses."""
    names = {1: "one pass", 2: "two passes"}
    return "(" + ", ".join(names[p] for p in sorted(passes)) + ")"
