"""Tests for the hybrid logical clock in cmdlog.hlc, driven by a fake wall clock."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

from hypothesis import given
from hypothesis import strategies as st

from cmdlog.hlc import LOGICAL_BITS, HybridClock, stamp_ms

SKEW_MS_MAX = 500
START_MS = 1_700_000_000_000
LOGICAL_MAX = (1 << LOGICAL_BITS) - 1


@dataclass
class FakeWall:
    """A wall clock in milliseconds that a test sets by hand."""

    ms: int = START_MS

    def __call__(self) -> int:
        return self.ms


def stamp_at(ms: int, logical: int = 0) -> int:
    """Return the stamp for physical milliseconds `ms` and a logical counter."""
    return ms << LOGICAL_BITS | logical


def new_clock(wall: FakeWall, last: int = 0) -> HybridClock:
    return HybridClock(now_ms=wall, last=last, skew_ms_max=SKEW_MS_MAX)


def test_now_uses_wall_time() -> None:
    """The first stamp carries the wall clock's milliseconds and logical 0."""
    wall = FakeWall()
    clock = new_clock(wall)
    assert clock.now() == stamp_at(START_MS)


def test_now_follows_wall_forward() -> None:
    """When the wall clock moves forward, the stamp jumps to the new time."""
    wall = FakeWall()
    clock = new_clock(wall)
    clock.now()
    clock.now()
    wall.ms += 7
    assert clock.now() == stamp_at(START_MS + 7)


def test_now_increases_frozen_wall() -> None:
    """Stamps strictly increase while the wall clock is frozen."""
    wall = FakeWall()
    clock = new_clock(wall)
    stamps = [clock.now() for _ in range(1000)]
    assert all(a < b for a, b in pairwise(stamps))
    assert stamps[-1] == stamp_at(START_MS, 999)


def test_now_increases_wall_backwards() -> None:
    """Stamps strictly increase while the wall clock goes backwards."""
    wall = FakeWall()
    clock = new_clock(wall)
    stamps = []
    for step in range(100):
        wall.ms = START_MS - 1000 * step
        stamps.append(clock.now())
    assert all(a < b for a, b in pairwise(stamps))
    assert stamp_ms(stamps[-1]) == START_MS


def test_logical_overflow_carries() -> None:
    """More than 2**16 stamps in one millisecond carry into the millisecond part."""
    wall = FakeWall()
    clock = new_clock(wall)
    for _ in range(LOGICAL_MAX + 1):
        last = clock.now()
    assert last == stamp_at(START_MS, LOGICAL_MAX)
    carried = clock.now()
    assert carried == stamp_at(START_MS + 1)
    assert carried > last


def test_restart_continues_above_last() -> None:
    """A clock restarted from a persisted `last` issues stamps above it."""
    wall = FakeWall()
    persisted = stamp_at(START_MS + 60_000, 3)
    clock = new_clock(wall, last=persisted)
    first = clock.now()
    assert first > persisted
    assert first == persisted + 1


def test_restart_behind_wall_uses_wall() -> None:
    """A restart whose `last` is behind the wall clock continues at wall time."""
    wall = FakeWall()
    clock = new_clock(wall, last=stamp_at(START_MS - 5, 9))
    assert clock.now() == stamp_at(START_MS)


def test_observe_within_skew_advances() -> None:
    """A peer stamp within the skew is accepted and the next stamp exceeds it."""
    wall = FakeWall()
    clock = new_clock(wall)
    clock.now()
    peer = stamp_at(START_MS + SKEW_MS_MAX - 1, 42)
    assert clock.observe(peer) is True
    assert clock.last == peer
    assert clock.now() > peer


def test_observe_at_horizon_accepted() -> None:
    """A stamp exactly at the horizon is accepted."""
    wall = FakeWall()
    clock = new_clock(wall)
    horizon = clock.horizon()
    assert horizon == stamp_at(START_MS + SKEW_MS_MAX, LOGICAL_MAX)
    assert clock.observe(horizon) is True
    assert clock.now() > horizon


def test_observe_beyond_skew_rejected() -> None:
    """A stamp past the horizon returns False and leaves the clock unchanged."""
    wall = FakeWall()
    clock = new_clock(wall)
    before = clock.now()
    ahead = clock.horizon() + 1
    assert ahead == stamp_at(START_MS + SKEW_MS_MAX + 1)
    assert clock.observe(ahead) is False
    assert clock.last == before
    assert clock.now() == before + 1


def test_observe_far_future_rejected() -> None:
    """A stamp an hour ahead does not drag the clock forward."""
    wall = FakeWall()
    clock = new_clock(wall)
    assert clock.observe(stamp_at(START_MS + 3_600_000)) is False
    assert stamp_ms(clock.now()) == START_MS


def test_observe_accepted_once_wall_catches_up() -> None:
    """A stamp rejected as too far ahead is accepted once the wall clock nears it."""
    wall = FakeWall()
    clock = new_clock(wall)
    peer = stamp_at(START_MS + 2 * SKEW_MS_MAX)
    assert clock.observe(peer) is False
    wall.ms += SKEW_MS_MAX
    assert clock.observe(peer) is True
    assert clock.now() > peer


def test_observe_uses_given_horizon() -> None:
    """A horizon read earlier decides, not the wall clock's time now."""
    wall = FakeWall()
    clock = new_clock(wall)
    horizon = clock.horizon()
    peer = stamp_at(START_MS + 2 * SKEW_MS_MAX)
    wall.ms += 2 * SKEW_MS_MAX
    assert clock.observe(peer, horizon=horizon) is False
    assert clock.last < peer
    assert clock.observe(peer) is True
    assert clock.last == peer


def test_observe_older_keeps_last() -> None:
    """An older peer stamp is accepted without moving the clock back."""
    wall = FakeWall()
    clock = new_clock(wall)
    current = clock.now()
    assert clock.observe(stamp_at(START_MS - 10_000)) is True
    assert clock.last == current
    assert clock.now() == current + 1


def test_horizon_follows_wall() -> None:
    """The horizon moves with the wall clock, not with stamps issued."""
    wall = FakeWall()
    clock = new_clock(wall)
    first = clock.horizon()
    for _ in range(10):
        clock.now()
    assert clock.horizon() == first
    wall.ms += 3
    assert clock.horizon() == first + stamp_at(3)


def test_ahead_ms() -> None:
    """ahead_ms gives the stamp's distance from wall time, negative when behind."""
    wall = FakeWall()
    clock = new_clock(wall)
    assert clock.ahead_ms(stamp_at(START_MS + 1234, 77)) == 1234
    assert clock.ahead_ms(stamp_at(START_MS - 5)) == -5
    assert clock.ahead_ms(stamp_at(START_MS)) == 0


def test_stamps_match_calls_of_now() -> None:
    """A batch of stamps equals as many calls of now with the wall frozen."""
    wall = FakeWall()
    one_by_one, batched = new_clock(wall), new_clock(wall)
    one_by_one.now()
    batched.now()
    expected = [one_by_one.now() for _ in range(500)]
    assert list(batched.stamps(500)) == expected
    assert batched.last == one_by_one.last


def test_stamp_ms() -> None:
    """stamp_ms drops the logical part."""
    assert stamp_ms(stamp_at(START_MS, LOGICAL_MAX)) == START_MS


# One operation on the clock: issue a stamp, observe a peer stamp at an offset
# from wall time, or move the wall clock.
operations = st.one_of(
    st.tuples(st.just("now"), st.just(0), st.just(0)),
    st.tuples(st.just("stamps"), st.integers(0, LOGICAL_MAX + 10), st.just(0)),
    st.tuples(
        st.just("observe"),
        st.integers(-5 * SKEW_MS_MAX, 5 * SKEW_MS_MAX),
        st.integers(0, LOGICAL_MAX),
    ),
    st.tuples(st.just("jump"), st.integers(-100_000, 100_000), st.just(0)),
)


@given(st.lists(operations, max_size=80))
def test_stamps_increase_any_history(
    history: list[tuple[str, int, int]],
) -> None:
    """Under any mix of stamps, batches of stamps, observations and clock
    jumps, stamps increase."""
    wall = FakeWall()
    clock = new_clock(wall)
    previous = -1
    accepted_max = -1
    for operation, offset_ms, logical in history:
        if operation == "now":
            stamp = clock.now()
            assert stamp > previous
            assert stamp > accepted_max
            assert stamp_ms(stamp) >= wall.ms
            previous = stamp
        elif operation == "stamps":
            batch = list(clock.stamps(offset_ms))
            assert len(batch) == offset_ms
            for stamp in batch:
                assert stamp > previous
                assert stamp > accepted_max
                previous = stamp
            if batch:
                assert stamp_ms(batch[0]) >= wall.ms
                assert clock.last == batch[-1]
        elif operation == "observe":
            peer = stamp_at(wall.ms + offset_ms, logical)
            last_before = clock.last
            within_skew = offset_ms <= SKEW_MS_MAX
            assert clock.observe(peer) is within_skew
            if within_skew:
                accepted_max = max(accepted_max, peer)
                assert clock.last == max(last_before, peer)
            else:
                assert clock.last == last_before
        else:
            wall.ms += offset_ms
    assert clock.now() > max(previous, accepted_max)
