"""Settings of the cluster simulation: the app, sizes, limits and chances."""

from __future__ import annotations

from typing import Literal

from cmdlog.app import App
from cmdlog.apps.ledger import ledger
from cmdlog.config import MIB, ReplicationConfig

APP = App([ledger])
REPLICATION = ReplicationConfig()
Fault = Literal["skip_chunk", "cursor_apart"]
"""A deliberate bug in delivery, to show that the checks can fail.
`skip_chunk` commits a chunk's cursor without its commands. `cursor_apart`
stores the cursor in its own transaction before the commands, and now and
then the node crashes between the two."""

EPOCH_MS = 1_700_000_000_000
"""Simulated time starts in November 2023. Replay holds commands by the
horizon each node recorded, so it does not depend on the real clock."""
STEPS_DEFAULT = 300
STEP_MS_MAX = 20
LATENCY_MS_MAX = 80
SKEW_MS_MAX = 2_000
CLOCK_OFFSET_MS_MAX = 400
FAST_CLOCK_AHEAD_MS_MAX = 6_000
"""How far beyond the allowed skew a fast node's clock runs."""
UNDO_HORIZONS_COMMANDS = (16, 100_000)
"""Undo horizons a seed picks from. The small one forces full re-folds."""
MAP_BYTES_INITIAL = 4 * MIB
FRAME_ENTRIES_MAX = 8
RECENT_FRAMES_MAX = 4
BATCH_ITEMS_MAX = 3
RESTART_STEPS_MAX = 20
PARTITION_STEPS_MAX = 80
SETTLE_ROUNDS_MAX = 10
SETTLE_ENTRIES_MAX = 50_000
"""Entries the settling cluster may move before the nodes converge."""
VIOLATIONS_PER_PROMISE_MAX = 5

# Chances per step, or per stream and step for the replication ones.
SUBMIT_P = 0.5
RETRY_ELSEWHERE_P = 0.15
CONNECT_P = 0.3
SEND_P = 0.4
COMMIT_P = 0.5
RELEASE_P = 0.05
CRASH_P = 0.012
DROP_P = 0.03
DUPLICATE_P = 0.03
REDELIVER_P = 0.02
PARTITION_P = 0.01
FAST_CLOCK_P = 0.3
"""Chance per seed that one node's clock runs beyond the allowed skew."""
CLOCK_FIX_P = 0.004
REPLACE_P = 0.002
SKIP_CHUNK_P = 0.2
CURSOR_APART_CRASH_P = 0.2

ACCOUNTS = {"acct-0": "EUR", "acct-1": "EUR", "acct-2": "EUR", "acct-3": "USD"}
HOT_ACCOUNT = "acct-0"
