"""Profile summaries: cProfile for in-process runs, py-spy for a server process.

cProfile adds a fixed cost to every Python call, so its absolute seconds are
inflated and its shares lean toward call-heavy code. They show where the
time goes, not how fast the code runs without the profiler. py-spy
samples from outside the process and only slows it a little.
"""

from __future__ import annotations

import contextlib
import io
import os
import pstats
import re
import signal
import subprocess
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

TOP_LINES = 18
PY_SPY_RATE_HZ = 200
PY_SPY_GRACE_S = 60.0

# Each group names the functions whose cumulative time it adds up, as
# (file name ending, function name) pairs, where a file of "~" means a C
# function. Groups may overlap (a hash inside the fold counts in both), so their
# shares do not add up to 100%.
Group = tuple[str, Sequence[tuple[str, str]]]

APPEND_GROUPS: list[Group] = [
    ("Database.submit, all of it", [("database.py", "submit")]),
    ("Engine.submit (inside the write transaction)", [("engine.py", "submit")]),
    (
        "commit and sync (Transaction.__exit__)",
        [("~", "<method '__exit__' of 'Transaction' objects>")],
    ),
    ("fold.apply_command (handler and state overlay)", [("fold.py", "apply_command")]),
    (
        "digest upkeep (blake2b of state, outcome and log items)",
        [
            ("fold.py", "state_item_hash"),
            ("fold.py", "outcome_item_hash"),
            ("fold.py", "log_item_hash"),
        ],
    ),
    (
        "_Batch.flush_state (state puts and state digests)",
        [("engine.py", "flush_state")],
    ),
    ("codec.pack (every msgpack encode)", [("codec.py", "pack")]),
    ("codec.unpack (every msgpack decode)", [("codec.py", "unpack")]),
    (
        "py-lmdb put, get, delete, pop and cursors (C)",
        [
            ("~", "<method 'put' of 'Transaction' objects>"),
            ("~", "<method 'get' of 'Transaction' objects>"),
            ("~", "<method 'pop' of 'Transaction' objects>"),
            ("~", "<method 'delete' of 'Transaction' objects>"),
            ("~", "<method 'delete' of 'Cursor' objects>"),
            ("~", "<method 'first' of 'Cursor' objects>"),
            ("~", "<method 'last' of 'Cursor' objects>"),
            ("~", "<method 'stat' of 'Transaction' objects>"),
        ],
    ),
    ("Txn.undo_trim", [("store.py", "undo_trim")]),
    ("Engine.view (reads for answers)", [("engine.py", "view")]),
]

REPLAY_GROUPS: list[Group] = [
    ("replay, all of it", [("replay.py", "replay")]),
    (
        "pass 1: each ID's winning copy (scratch ID and order indexes)",
        [("replay.py", "_find_winners")],
    ),
    ("codec.fingerprint (recomputed for every command)", [("codec.py", "fingerprint")]),
    (
        "pass 2: fold the winners in canonical order",
        [("replay.py", "_fold_winners")],
    ),
    (
        "one pass: fold the log as it is read (a log in canonical order)",
        [("replay.py", "_fold_in_log_order")],
    ),
    ("fold.apply_command (handler and state overlay)", [("fold.py", "apply_command")]),
    (
        "digest upkeep (blake2b of state, outcome and log items)",
        [
            ("fold.py", "state_item_hash"),
            ("fold.py", "outcome_item_hash"),
            ("fold.py", "log_item_hash"),
        ],
    ),
    ("codec.pack (every msgpack encode)", [("codec.py", "pack")]),
    ("codec.unpack (every msgpack decode)", [("codec.py", "unpack")]),
    (
        "reading the source log (Txn.log_iter, Txn.log_get)",
        [("store.py", "log_iter"), ("store.py", "log_get")],
    ),
    (
        "py-lmdb put, get, delete and pop (C)",
        [
            ("~", "<method 'put' of 'Transaction' objects>"),
            ("~", "<method 'get' of 'Transaction' objects>"),
            ("~", "<method 'pop' of 'Transaction' objects>"),
            ("~", "<method 'delete' of 'Transaction' objects>"),
            ("~", "<method 'delete' of 'Cursor' objects>"),
        ],
    ),
    (
        "commits (Transaction.__exit__)",
        [("~", "<method '__exit__' of 'Transaction' objects>")],
    ),
]


def group_shares(
    profile: pstats.Stats, groups: list[Group]
) -> list[tuple[str, float, float]]:
    """Return `(group, seconds, share of the first group)` for each group.

    A group's seconds are the summed cumulative time of its functions; the
    first group is the whole measured call, so its share is 100%.
    """
    table = profile.stats  # type: ignore[attr-defined]
    rows = []
    for name, functions in groups:
        seconds = 0.0
        for (filename, _line, function), (
            _cc,
            _nc,
            _tt,
            cumulative,
            _callers,
        ) in table.items():
            for suffix, wanted in functions:
                if function == wanted and (
                    filename == suffix or filename.endswith(suffix)
                ):
                    seconds += cumulative
        rows.append((name, seconds))
    total = rows[0][1] or 1.0
    return [(name, seconds, seconds / total) for name, seconds in rows]


def top_functions(profile: pstats.Stats) -> str:
    """Return pstats' listing of the functions with the most own time."""
    out = io.StringIO()
    profile.stream = out  # type: ignore[attr-defined]
    profile.strip_dirs().sort_stats("tottime").print_stats(TOP_LINES)
    text = out.getvalue()
    start = text.find("   ncalls")
    return text[start:].rstrip() if start >= 0 else text


class PySpy:
    """A py-spy sampler of one process during a measurement, with summed stacks."""

    def __init__(self, py_spy: str, scratch: Path) -> None:
        self.py_spy = py_spy
        self.scratch = scratch
        self.stacks: Counter[str] = Counter()

    @contextlib.contextmanager
    def sampling(self, pid: int, duration_s: int) -> Iterator[None]:
        """Record `pid` for `duration_s` while the `with` block runs."""
        output = self.scratch / f"py-spy-{pid}.txt"
        argv = [
            self.py_spy,
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(duration_s),
            "--rate",
            str(PY_SPY_RATE_HZ),
            "--format",
            "raw",
            "--threads",
            "--nonblocking",
            "--output",
            str(output),
        ]
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            yield
        finally:
            try:
                process.wait(timeout=duration_s + PY_SPY_GRACE_S)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        if output.exists():
            for line in output.read_text(errors="replace").splitlines():
                stack, _, count = line.rpartition(" ")
                if count.isdigit():
                    self.stacks[stack] += int(count)

    def summary(self) -> str:
        """Return per-thread shares and the top functions by own and total samples."""
        total = sum(self.stacks.values())
        if not total:
            return "py-spy recorded no samples"
        threads: Counter[str] = Counter()
        own: Counter[str] = Counter()
        inclusive: Counter[str] = Counter()
        for stack, count in self.stacks.items():
            frames = stack.split(";")
            threads[_thread_name(frames[0])] += count
            own[_short_frame(frames[-1])] += count
            for name in {_short_frame(frame) for frame in frames[1:]}:
                inclusive[name] += count
        lines = [
            f"{total:,} samples at {PY_SPY_RATE_HZ} Hz of threads that were running",
            "",
        ]
        lines += [
            f"thread {name}: {n / total:.0%}" for name, n in threads.most_common()
        ]
        lines += ["", "own samples (innermost Python frame; C calls count here):"]
        lines += [f"{n / total:6.1%}  {name}" for name, n in own.most_common(TOP_LINES)]
        lines += ["", "total samples (frame anywhere on the stack):"]
        lines += [
            f"{n / total:6.1%}  {name}" for name, n in inclusive.most_common(TOP_LINES)
        ]
        return "\n".join(lines)


def _thread_name(frame: str) -> str:
    """Turn py-spy's `thread (1234): MainThread` into `MainThread`."""
    return frame.partition("): ")[2] or frame


def _short_frame(frame: str) -> str:
    """Turn py-spy's `func (cmdlog/store.py:12)` into `func (cmdlog/store.py)`."""
    return re.sub(r":\d+\)$", ")", frame.strip())
