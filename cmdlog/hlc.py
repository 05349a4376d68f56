"""A hybrid logical clock whose stamps are plain integers.

A stamp is `physical_ms << 16 | logical`. Unlike the HLC paper, which keeps
the two parts apart, cmdlog adds them as one integer: a new local stamp is
`max(now_ms << 16, last + 1)`, so a burst of more than 65,536 events in one
millisecond carries into the millisecond part instead of overflowing. The
result still never decreases, stays close to wall time, and sorts the same
as the paper's pair.

Stamps from peers advance the clock only when they are within the allowed
skew of local wall time, so one node with a bad clock cannot drag every
other clock forward. The caller persists `last` with every commit, and a
restarted node resumes from it, so stamps never decrease across restarts.
"""

from __future__ import annotations

import time
from collections.abc import Callable

LOGICAL_BITS = 16


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


def stamp_ms(stamp: int) -> int:
    """Return the physical milliseconds of a stamp."""
    return stamp >> LOGICAL_BITS


class HybridClock:
    """Issues stamps that never decrease and tracks stamps seen from peers."""

    def __init__(
        self,
        *,
        now_ms: Callable[[], int] = wall_ms,
        last: int = 0,
        skew_ms_max: int,
    ) -> None:
        self._now_ms = now_ms
        self.last = last
        self.skew_ms_max = skew_ms_max

    def wall_ms(self) -> int:
        """Return the wall-clock milliseconds this clock reads."""
        return self._now_ms()

    def now(self) -> int:
        """Return a new stamp, greater than every stamp issued or observed so far."""
        return self.stamps(1)[0]

    def stamps(self, count: int) -> range:
        """Return `count` new stamps in increasing order, each greater than
        every stamp issued or observed so far, reading the wall clock once.

        They are the stamps that `count` calls of `now` would return while the
        wall clock stays in one millisecond.
        """
        if count <= 0:
            return range(0)
        first = max(self._now_ms() << LOGICAL_BITS, self.last + 1)
        self.last = first + count - 1
        return range(first, first + count)

    def horizon(self) -> int:
        """Return the largest stamp a peer may send that can be folded now."""
        return self.horizon_at(self._now_ms())

    def horizon_at(self, wall_ms: int) -> int:
        """Return the largest stamp that can be folded at wall time `wall_ms`."""
        return (wall_ms + self.skew_ms_max) << LOGICAL_BITS | ((1 << LOGICAL_BITS) - 1)

    def observe(self, stamp: int, *, horizon: int | None = None) -> bool:
        """Advance past a peer's stamp; return False if it is too far ahead.

        A stamp beyond the skew horizon leaves the clock untouched. A caller
        that checks many stamps at once may pass the `horizon` it read.
        """
        if stamp > (self.horizon() if horizon is None else horizon):
            return False
        if stamp > self.last:
            self.last = stamp
        return True

    def ahead_ms(self, stamp: int) -> int:
        """Return how many milliseconds `stamp` is ahead of local wall time."""
        return stamp_ms(stamp) - self._now_ms()
