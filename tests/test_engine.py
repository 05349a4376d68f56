"""Tests of the engine: deduplication, canonical order, rewinds and digests."""

from __future__ import annotations

import itertools
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cmdlog import codec, fold
from cmdlog.app import App
from cmdlog.apps.ledger import ledger
from cmdlog.config import ClockConfig
from cmdlog.database import Database
from cmdlog.engine import UNKNOWN_TYPE, prepare_submission
from cmdlog.errors import KeyReused
from cmdlog.fold import StateOverlay
from cmdlog.hlc import LOGICAL_BITS
from cmdlog.model import APPLIED, PENDING, REJECTED, Command, order_key
from cmdlog.replay import replay
from cmdlog.replication import ID_CHARS_MAX
from cmdlog.store import Store
from tests.conftest import fast_store

APP = App([ledger])
ACCOUNTS = ["a0", "a1", "a2"]
ORIGINS = ["n1", "n2", "n3"]


# A reference fold: the deduplicated command set folded in canonical order
# with plain dictionaries, and both digests computed from scratch.


def rank(command: Command) -> tuple[bytes, bytes]:
    return command.order_key, codec.fingerprint(command.type, command.payload)


def winners(copies: list[Command]) -> dict[str, Command]:
    """Each ID's copy that sorts first; equal order keys go to the smaller
    fingerprint."""
    best: dict[str, Command] = {}
    for command in copies:
        held = best.get(command.id)
        if held is None or rank(command) < rank(held):
            best[command.id] = command
    return best


def reference_fold(copies: list[Command]) -> tuple[dict[str, Any], str, str]:
    chosen = winners(copies)
    state: dict[tuple[str, bytes], bytes] = {}
    overlay = StateOverlay(lambda domain, key: state.get((domain, key)))
    outcomes = {}
    for command in sorted(chosen.values(), key=lambda c: c.order_key):
        outcome, _undo = fold.apply_command(APP, overlay, command)
        outcomes[command.id] = outcome
    state_digest = 0
    for domain, key, _base, value in overlay.changes():
        if value is not None:
            state_digest += fold.state_item_hash(domain, key, value)
    for command_id, outcome in outcomes.items():
        state_digest += fold.outcome_item_hash(command_id, fold.pack_outcome(outcome))
    log_digest = 0
    for command in chosen.values():
        fingerprint = codec.fingerprint(command.type, command.payload)
        log_digest += fold.log_item_hash(command.id, fingerprint)
    return (
        outcomes,
        fold.digest_to_bytes(state_digest).hex(),
        fold.digest_to_bytes(log_digest).hex(),
    )


@st.composite
def payloads(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    kind = draw(st.sampled_from(["open", "deposit", "charge", "transfer"]))
    account = draw(st.sampled_from(ACCOUNTS))
    amount = draw(st.integers(1, 60))
    if kind == "open":
        currency = draw(st.sampled_from(["EUR", "EUR", "USD"]))
        return "ledger.open", {"account": account, "currency": currency}
    if kind == "transfer":
        target = draw(st.sampled_from([a for a in ACCOUNTS if a != account]))
        return "ledger.transfer", {"from": account, "to": target, "amount": amount}
    return f"ledger.{kind}", {"account": account, "amount": amount}


@st.composite
def command_sets(draw: st.DrawFn) -> list[Command]:
    """Commands from three origins, some IDs sent twice with other stamps,
    some IDs reused with another payload (conflicts)."""
    count = draw(st.integers(1, 25))
    copies = []
    for i in range(count):
        type_name, payload = draw(payloads())
        stamp = draw(st.integers(1_000, 1_100))
        origin = draw(st.sampled_from(ORIGINS))
        copies.append(Command(f"c{i}", type_name, payload, stamp, origin))
        extra = draw(st.sampled_from(["none", "none", "retry", "conflict"]))
        if extra == "retry":
            stamp = draw(st.integers(1_000, 1_100))
            origin = draw(st.sampled_from(ORIGINS))
            copies.append(Command(f"c{i}", type_name, payload, stamp, origin))
        elif extra == "conflict":
            other_type, other = draw(payloads())
            stamp = draw(st.integers(1_000, 1_100))
            origin = draw(st.sampled_from(ORIGINS))
            copies.append(Command(f"c{i}", other_type, other, stamp, origin))
    return copies


def deliveries(copies: list[Command]) -> st.SearchStrategy[list[list[Command]]]:
    """Any order, any duplication, split into batches of any size."""

    @st.composite
    def build(draw: st.DrawFn) -> list[list[Command]]:
        repeated = copies + draw(st.lists(st.sampled_from(copies), max_size=10))
        order = draw(st.permutations(repeated))
        cuts = sorted(draw(st.sets(st.integers(1, max(1, len(order) - 1)))))
        batches, start = [], 0
        for cut in [*cuts, len(order)]:
            if cut > start:
                batches.append(list(order[start:cut]))
                start = cut
        return batches

    return build()


@pytest.fixture
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as path:
        yield Path(path)


def open_db(
    path: Path, horizon: int = 100_000, generation: int = 65_536, merge_keys: int = 8
) -> Database:
    config = fast_store(
        undo_horizon_commands=horizon,
        generation_commands=generation,
        merge_fan_in=2,
        merge_keys_per_command=merge_keys,
    )
    return Database(path, APP, store_config=config)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    data=st.data(),
    copies=command_sets(),
    horizon=st.sampled_from([2, 100_000]),
    generation=st.sampled_from([1, 3, 65_536]),
    merge_keys=st.sampled_from([1, 8]),
)
def test_any_delivery_matches_canonical_fold(
    data: st.DataObject,
    copies: list[Command],
    horizon: int,
    generation: int,
    merge_keys: int,
) -> None:
    """Any delivery order and duplication gives the canonical fold's outcomes
    and digests, with rewinds inside the undo horizon and full re-folds
    beyond it, and a replay of the resulting log gives the same digests.

    The store starts a new generation of its ID index and state every 1 or
    3 commands or almost never, merges every two runs of a level, a few
    keys per commit or more, and reopens at any point (which builds its
    key filters again), so IDs and state keys are read, overwritten and
    deleted across generations and merges."""
    expected_outcomes, expected_state, expected_log = reference_fold(copies)
    batches = data.draw(deliveries(copies))
    reopen_after = data.draw(st.integers(0, len(batches)))
    with tempfile.TemporaryDirectory() as path:
        db = open_db(Path(path), horizon, generation, merge_keys)
        try:
            for position, batch in enumerate(batches):
                if position == reopen_after:
                    db.close()
                    db = open_db(Path(path), horizon, generation, merge_keys)
                db.ingest(batch)
            status = db.status()
            assert status.commands == len(expected_outcomes)
            assert status.applied == len(expected_outcomes)
            assert status.state_digest == expected_state
            assert status.log_digest == expected_log
            for command_id, outcome in expected_outcomes.items():
                viewed = db.view(command_id)
                assert viewed is not None
                assert viewed[1] == outcome, command_id
        finally:
            db.close()
        report = replay(path, APP)
        assert report.commands == len(expected_outcomes)
        assert report.applied == len(expected_outcomes)
        assert report.state_digest == expected_state
        assert report.log_digest == expected_log
        assert report.matches


def log_in_canonical_order(path: Path) -> bool:
    """Whether the stored log's order keys increase and each ID has one copy."""
    store = Store(path, list(APP.domains), readonly=True)
    try:
        with store.read() as txn:
            records = [codec.unpack(record) for _seq, record in txn.log_records(0)]
    finally:
        store.close()
    keys = [order_key(stamp, origin, cid) for cid, _t, _p, stamp, origin in records]
    ids = {record[0] for record in records}
    increasing = all(first < second for first, second in itertools.pairwise(keys))
    return increasing and len(ids) == len(records)


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data(), copies=command_sets())
def test_replay_passes_match_live(data: st.DataObject, copies: list[Command]) -> None:
    """With its second process, replay folds a log in canonical order with
    one copy per ID in one pass and any other log in two, and both give the
    live digests. Deliveries: the winners in canonical order, every copy in
    canonical order (a conflicting copy is then stored second), or any."""
    delivery = data.draw(st.sampled_from(["winners", "copies", "any"]))
    if delivery == "winners":
        batches = [[c] for c in sorted(winners(copies).values(), key=rank)]
    elif delivery == "copies":
        batches = [[c] for c in sorted(copies, key=rank)]
    else:
        batches = data.draw(deliveries(copies))
    with tempfile.TemporaryDirectory() as path:
        db = open_db(Path(path))
        try:
            for batch in batches:
                db.ingest(batch)
            status = db.status()
        finally:
            db.close()
        canonical = log_in_canonical_order(Path(path))
        report = replay(path, APP, worker_entries_min=0)
    if delivery == "winners":
        assert canonical
    assert report.passes == (1 if canonical else 2)
    assert report.commands == status.commands
    assert report.state_digest == status.state_digest
    assert report.log_digest == status.log_digest
    assert report.matches


def test_replay_ordered_duplicate_two_passes(scratch: Path) -> None:
    """A conflicting copy that sorts after the first is stored second, so the
    log is in canonical order but has an ID twice: the second process finds
    it, and replay leaves the one-pass fold for two passes."""
    db = open_db(scratch)
    db.ingest([open_account(10)])
    db.ingest(
        [Command("x", "ledger.deposit", {"account": "a0", "amount": 5}, 20, "n1")]
    )
    db.ingest(
        [Command("x", "ledger.deposit", {"account": "a0", "amount": 9}, 30, "n2")]
    )
    status = db.status()
    db.close()

    assert log_in_canonical_order(scratch) is False
    report = replay(scratch, APP, worker_entries_min=0)
    assert report.passes == 2
    assert report.log_entries == 3
    assert report.commands == 2
    assert report.log_digest == status.log_digest
    assert report.state_digest == status.state_digest


def test_replay_unsorted_log_two_passes(scratch: Path) -> None:
    """A command that arrived after one it sorts before ends the one-pass
    fold part way; the two passes that follow start from empty state."""
    db = open_db(scratch)
    db.ingest([open_account(10)])
    db.ingest(
        [Command("b", "ledger.deposit", {"account": "a0", "amount": 5}, 30, "n1")]
    )
    db.ingest([Command("a", "ledger.charge", {"account": "a0", "amount": 5}, 20, "n3")])
    status = db.status()
    db.close()

    report = replay(scratch, APP, worker_entries_min=0)
    assert report.passes == 2
    assert report.applied == 3
    assert report.state_digest == status.state_digest
    assert report.matches


def test_two_nodes_same_set_same_digests(scratch: Path) -> None:
    """Two stores fed the same commands in opposite orders report equal digests."""
    copies = [
        Command("o", "ledger.open", {"account": "a0", "currency": "EUR"}, 10, "n1"),
        Command("d", "ledger.deposit", {"account": "a0", "amount": 50}, 20, "n2"),
        Command("c", "ledger.charge", {"account": "a0", "amount": 30}, 30, "n1"),
        Command("c2", "ledger.charge", {"account": "a0", "amount": 30}, 31, "n3"),
    ]
    first = open_db(scratch / "first")
    second = open_db(scratch / "second")
    for command in copies:
        first.ingest([command])
    for command in reversed(copies):
        second.ingest([command])
    assert first.status().state_digest == second.status().state_digest
    assert first.status().log_digest == second.status().log_digest
    viewed = second.view("c2")
    assert viewed is not None
    assert viewed[1].status == REJECTED
    assert viewed[1].reason == "insufficient_funds"
    first.close()
    second.close()


def test_earlier_copy_takes_over_id(scratch: Path) -> None:
    """A copy of a folded ID that sorts first replaces it and moves its effect."""
    db = open_db(scratch)
    db.ingest(
        [
            Command("o", "ledger.open", {"account": "a0", "currency": "EUR"}, 10, "n1"),
            Command("d", "ledger.deposit", {"account": "a0", "amount": 50}, 20, "n1"),
            Command("c", "ledger.charge", {"account": "a0", "amount": 40}, 30, "n1"),
        ]
    )
    report = db.ingest(
        [Command("c", "ledger.charge", {"account": "a0", "amount": 40}, 5, "n2")]
    )
    assert report.replaced == 1
    viewed = db.view("c")
    assert viewed is not None
    assert viewed[0].stamp == 5
    assert viewed[1].reason == "no_such_account"
    assert db.query("ledger.balance", {"account": "a0"})["balance"] == 50
    assert db.status().commands == 3
    db.close()


def test_conflicting_copy_recorded_not_applied(scratch: Path) -> None:
    """A later copy with another payload is recorded as a conflict and not applied."""
    db = open_db(scratch)
    db.ingest(
        [
            Command("o", "ledger.open", {"account": "a0", "currency": "EUR"}, 10, "n1"),
            Command("d", "ledger.deposit", {"account": "a0", "amount": 50}, 20, "n1"),
        ]
    )
    report = db.ingest(
        [Command("d", "ledger.deposit", {"account": "a0", "amount": 999}, 30, "n2")]
    )
    assert report.conflicts == ["d"]
    assert db.query("ledger.balance", {"account": "a0"})["balance"] == 50
    with db.store.read() as txn:
        assert txn.count("conflicts") == 1
    db.close()


def test_copies_of_longest_id_kept(scratch: Path) -> None:
    """Copies of an ID of the most characters a peer may send, with the
    longest origin, are superseded and recorded as conflicts like any other:
    their records' keys stay within LMDB's key size."""
    long_id = "k" * ID_CHARS_MAX
    origins = ["e" * 64, "d" * 64, "f" * 64]
    db = open_db(scratch)
    db.ingest(
        [Command("o", "ledger.open", {"account": "a0", "currency": "EUR"}, 10, "n1")]
    )
    deposit = {"account": "a0", "amount": 5}
    db.ingest([Command(long_id, "ledger.deposit", deposit, 30, origins[0])])

    earlier = db.ingest([Command(long_id, "ledger.deposit", deposit, 20, origins[1])])
    other = {"account": "a0", "amount": 7}
    conflicting = db.ingest([Command(long_id, "ledger.deposit", other, 40, origins[2])])
    again = db.ingest([Command(long_id, "ledger.deposit", deposit, 30, origins[0])])

    assert earlier.replaced == 1
    assert conflicting.conflicts == [long_id]
    assert again.duplicates == 1
    viewed = db.view(long_id)
    assert viewed is not None
    assert viewed[0].origin == origins[1]
    assert db.query("ledger.balance", {"account": "a0"})["balance"] == 5
    assert db.status().conflicts == 1
    db.close()
    assert replay(scratch, APP).matches


def test_unknown_type_held_pending(scratch: Path) -> None:
    """A command of an unknown type is stored, counted, and pending with a reason."""
    db = open_db(scratch)
    report = db.ingest([Command("x", "ledger.refund", {"charge": "c"}, 10, "n2")])
    assert report.held == 1
    status = db.status()
    assert status.commands == 1
    assert status.applied == 0
    assert status.pending_types == {"ledger.refund": 1}
    viewed = db.view("x")
    assert viewed is not None
    assert viewed[1].status == PENDING
    assert viewed[1].reason == UNKNOWN_TYPE
    db.close()


def test_future_stamp_held_then_released(scratch: Path) -> None:
    """A stamp beyond the skew horizon is held and folded once the clock allows."""
    now = [1_000_000]
    db = Database(scratch, APP, store_config=fast_store(), now_ms=lambda: now[0])
    skew_ms = db.clock.skew_ms_max
    ahead = (now[0] + skew_ms + 5_000) << 16
    db.ingest(
        [Command("o", "ledger.open", {"account": "a0", "currency": "EUR"}, ahead, "n2")]
    )
    assert db.clock.last < ahead
    viewed = db.view("o")
    assert viewed is not None
    assert viewed[1].reason == "clock_skew"
    assert db.release_pending() == 0

    now[0] += 6_000
    assert db.release_pending() == 1
    viewed = db.view("o")
    assert viewed is not None
    assert viewed[1].status == APPLIED
    db.close()


def test_submit_retry_and_reuse(database: Database) -> None:
    """A resubmitted key replays; the same key with another payload is refused."""
    open_cmd = prepare_submission(
        APP, "k1", "ledger.open", {"account": "a0", "currency": "EUR"}
    )
    first = database.submit([open_cmd])[0]
    again = database.submit([open_cmd])[0]
    other = prepare_submission(
        APP, "k1", "ledger.open", {"account": "a1", "currency": "EUR"}
    )
    reused = database.submit([other])[0]
    assert not isinstance(first, KeyReused)
    assert first.created
    assert not isinstance(again, KeyReused)
    assert not again.created
    assert again.command == first.command
    assert isinstance(reused, KeyReused)
    assert database.status().commands == 1


def test_submit_duplicates_in_one_batch(database: Database) -> None:
    """Two submissions with one key in the same commit store one command."""
    open_cmd = prepare_submission(
        APP, "k1", "ledger.open", {"account": "a0", "currency": "EUR"}
    )
    results = database.submit([open_cmd, open_cmd])
    created = [r.created for r in results if not isinstance(r, KeyReused)]
    assert created == [True, False]
    assert database.status().commands == 1


def test_undo_records_bounded_by_horizon(scratch: Path) -> None:
    """Only the newest folded commands keep undo records."""
    db = open_db(scratch, horizon=5)
    db.ingest(
        [
            Command(
                f"o{i}",
                "ledger.open",
                {"account": f"a{i}", "currency": "EUR"},
                10 + i,
                "n1",
            )
            for i in range(12)
        ]
    )
    with db.store.read() as txn:
        assert txn.count("undo") == 5
        assert txn.count("folded") == 12
    db.close()


def test_replay_keeps_skew_hold(scratch: Path) -> None:
    """Replay judges held commands by the node's recorded clock, not today's."""
    now = [1_000_000]
    db = Database(scratch, APP, store_config=fast_store(), now_ms=lambda: now[0])
    ahead = (now[0] + db.clock.skew_ms_max + 5_000) << 16
    db.ingest(
        [Command("o", "ledger.open", {"account": "a0", "currency": "EUR"}, ahead, "n2")]
    )
    held = db.status()
    db.close()

    report = replay(scratch, APP)
    assert held.applied == 0
    assert report.applied == 0
    assert report.matches


@pytest.mark.parametrize("worker_entries_min", [0, 1_000_000])
def test_replay_log_digest_leaves_out_lost_copies(
    scratch: Path, worker_entries_min: int
) -> None:
    """Replay's log digest leaves out each copy that lost its ID. The sum runs
    in a second process (0) or in this one. The lost copies are a later copy,
    a replaced one, a conflicting one, and one that lost a tie of order keys."""

    def deposit(command_id: str, amount: int, stamp: int, origin: str) -> Command:
        payload = {"account": "a0", "amount": amount}
        return Command(command_id, "ledger.deposit", payload, stamp, origin)

    db = open_db(scratch)
    db.ingest(
        [Command("o", "ledger.open", {"account": "a0", "currency": "EUR"}, 10, "n1")]
    )
    db.ingest([deposit("x", 10, 30, "n1")])
    db.ingest([deposit("x", 10, 20, "n2")])  # sorts first: replaces the copy above
    db.ingest([deposit("x", 99, 25, "n3")])  # another payload, sorts later: conflict
    db.ingest([deposit("y", 1, 40, "n1")])
    db.ingest(
        [deposit("y", 2, 40, "n1")]
    )  # same order key: the smaller fingerprint wins
    status = db.status()
    db.close()

    report = replay(scratch, APP, worker_entries_min=worker_entries_min)
    assert report.log_entries == 6
    assert report.commands == 3
    assert report.log_digest == status.log_digest
    assert report.state_digest == status.state_digest
    assert report.matches


@pytest.mark.parametrize("executable", ["/nonexistent/python", "/bin/false"])
def test_replay_sums_itself_when_second_process_fails(
    scratch: Path, executable: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second process that cannot start, or exits with an error, only costs
    time: replay takes two passes, sums the log's items itself and still
    matches."""
    db = open_db(scratch)
    db.ingest(
        [
            Command("o", "ledger.open", {"account": "a0", "currency": "EUR"}, 10, "n1"),
            Command("d", "ledger.deposit", {"account": "a0", "amount": 5}, 20, "n1"),
        ]
    )
    status = db.status()
    db.close()

    monkeypatch.setattr(sys, "executable", executable)
    report = replay(scratch, APP, worker_entries_min=0)
    assert report.passes == 2
    assert report.log_digest == status.log_digest
    assert report.matches


def test_replay_removes_stale_scratch(scratch: Path) -> None:
    """Scratch left in the data directory by a killed replay is deleted by
    the next one, which leaves none of its own."""
    db = open_db(scratch)
    db.ingest(
        [Command("o", "ledger.open", {"account": "a0", "currency": "EUR"}, 10, "n1")]
    )
    db.close()
    stale = scratch / ".replay-killed"
    stale.mkdir()
    (stale / "data.mdb").write_bytes(b"\0" * 4096)

    assert replay(scratch, APP).matches
    assert not list(scratch.glob(".replay-*"))


class SteppingWall:
    """A wall clock in milliseconds that moves `step` forward after each read."""

    def __init__(self, ms: int) -> None:
        self.ms = ms
        self.step = 0

    def __call__(self) -> int:
        now = self.ms
        self.ms += self.step
        return now


def open_account(stamp: int) -> Command:
    return Command(
        "o", "ledger.open", {"account": "a0", "currency": "EUR"}, stamp, "n2"
    )


def deposit_at(stamp: int) -> Command:
    return Command("d", "ledger.deposit", {"account": "a0", "amount": 5}, stamp, "n2")


def test_replay_holds_what_the_transaction_held(scratch: Path) -> None:
    """A command beyond the horizon a transaction began with stays held in
    replay too, however far the wall clock moved before the commit."""
    wall = SteppingWall(1_000_000)
    db = Database(scratch, APP, store_config=fast_store(), now_ms=wall)
    start = wall.ms
    wall.step = 60_000  # each clock read inside the transaction is a minute later
    edge = (start + db.clock.skew_ms_max + 1) << LOGICAL_BITS
    db.ingest([open_account(start << LOGICAL_BITS), deposit_at(edge)])
    status = db.status()
    db.close()

    assert (status.applied, status.pending) == (1, 1)
    report = replay(scratch, APP)
    assert report.applied == 1
    assert report.matches


def test_commit_releases_what_its_horizon_covers(scratch: Path) -> None:
    """The next commit of any kind folds a held command that the wall clock
    has reached. So no commit records a horizon over a held command, and
    replay agrees."""
    wall = SteppingWall(1_000_000)
    db = Database(scratch, APP, store_config=fast_store(), now_ms=wall)
    ahead = (wall.ms + db.clock.skew_ms_max + 5_000) << LOGICAL_BITS
    db.ingest([open_account(wall.ms << LOGICAL_BITS), deposit_at(ahead)])
    assert db.status().pending == 1

    wall.ms += 10_000
    db.submit(
        [prepare_submission(APP, "k", "ledger.deposit", {"account": "a0", "amount": 1})]
    )
    status = db.status()
    db.close()

    assert (status.applied, status.pending) == (3, 0)
    assert replay(scratch, APP).matches


def test_replay_uses_the_node_skew_setting(scratch: Path) -> None:
    """Replay uses the horizon the node recorded, which came from the node's
    own skew setting, not the default one."""
    wall = SteppingWall(1_000_000)
    db = Database(
        scratch,
        APP,
        store_config=fast_store(),
        clock_config=ClockConfig(skew_ms_max=1_000),
        now_ms=wall,
    )
    db.ingest(
        [
            open_account(wall.ms << LOGICAL_BITS),
            deposit_at((wall.ms + 5_000) << LOGICAL_BITS),
        ]
    )
    status = db.status()
    db.close()

    assert status.pending == 1
    report = replay(scratch, APP)
    assert report.applied == 1
    assert report.matches


def test_second_process_ignores_working_directory(
    scratch: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second process imports the replay's own cmdlog, not a cmdlog
    package in the directory replay runs from."""
    db = open_db(scratch)
    db.ingest([open_account(10), deposit_at(20)])
    status = db.status()
    db.close()
    planted = tmp_path / "cmdlog"
    planted.mkdir()
    (planted / "__init__.py").write_text("")
    (planted / "replay.py").write_text('print("3039 1")\n')
    monkeypatch.chdir(tmp_path)

    report = replay(scratch, APP, worker_entries_min=0)
    assert report.passes == 1
    assert report.log_digest == status.log_digest
    assert report.matches


def test_second_process_exits_with_its_parent() -> None:
    """The second process's watch ends it once its parent is gone (its
    parent ID is no longer the one it started with), and not before."""
    watch = "import os, sys; from cmdlog.replay import _exit_with_parent; "
    orphaned = subprocess.run(
        [sys.executable, "-c", watch + "_exit_with_parent(os.getppid() + 1)"],
        timeout=10,
    )
    assert orphaned.returncode == 1
    with pytest.raises(subprocess.TimeoutExpired):
        subprocess.run(
            [sys.executable, "-c", watch + "_exit_with_parent(os.getppid())"],
            timeout=1,
        )


def test_key_reused_message_shows_payload_as_json(scratch: Path) -> None:
    """A key reused with another payload is refused with the stored payload
    as JSON and the fix: a new key."""
    db = open_db(scratch)
    payload = {"account": "a0", "currency": "EUR"}
    db.submit([prepare_submission(APP, "k1", "ledger.open", payload)])
    other = {"account": "a0", "currency": "USD"}
    [result] = db.submit([prepare_submission(APP, "k1", "ledger.open", other)])
    db.close()
    assert isinstance(result, KeyReused)
    assert '(stored payload: {"account":"a0","currency":"EUR"})' in result.message
    assert result.message.endswith("send this command under a new key")


def test_natural_key_reused_message_names_fields(scratch: Path) -> None:
    """A charge whose account and reference are stored with another amount is
    rejected naming those fields, not the derived ID the client never sent.
    The message states that a new key does not help."""
    db = open_db(scratch)
    opened = {"account": "a0", "currency": "EUR"}
    db.submit([prepare_submission(APP, "o", "ledger.open", opened)])
    charge = {"account": "a0", "amount": 1, "reference": "r1"}
    db.submit([prepare_submission(APP, "t1", "ledger.charge", charge)])
    other = {**charge, "amount": 5}
    [result] = db.submit([prepare_submission(APP, "t2", "ledger.charge", other)])
    db.close()
    assert isinstance(result, KeyReused)
    assert "with the same account, reference is already stored" in result.message
    assert "~" not in result.message
    assert "a new key does not change that" in result.message
