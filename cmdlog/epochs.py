"""Log epochs: which process of a node appended each part of its log.

Sequence numbers alone cannot tell a reader that a peer's log went back. A
node restored from a backup keeps its log instance but has the backup's
shorter log. It appends new commands under sequence numbers that the lost
commands had, so a reader whose cursor is past the backup point would skip
the new commands for good.

Each time a node opens its data directory it starts an epoch: the first
sequence number it will append, under its process's boot name, recorded in
the same LMDB file as the log. A backup contains the epochs up to its own
end, so after a restore the sequence numbers past the backup point belong to a
boot the reader never saw. A reader keeps, next to its cursor, the boot of
the epoch the cursor is in, and the stream checks that pair against its
own epochs, the way a Raft follower checks the term of the entry before
the ones it is sent.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

Epoch = tuple[int, str]
"""`(first seq, boot)`: the process `boot` appended the log from `first seq`
until the next epoch's first seq."""


def begin(epochs: Sequence[Sequence[Any]], first_seq: int, boot: str) -> list[Epoch]:
    """Return `epochs` followed by a new epoch of `boot` from `first_seq`.

    An epoch that appended nothing (its first seq is also `first_seq`) is
    dropped, so restarts that write nothing do not lengthen the list.
    """
    updated = [(int(first), str(name)) for first, name in epochs]
    if updated and updated[-1][0] == first_seq:
        updated.pop()
    updated.append((first_seq, boot))
    return updated


def boot_at(epochs: Sequence[Epoch], seq: int) -> str | None:
    """Return the boot that appended `seq`; None for 0 and seqs before every epoch."""
    index = bisect.bisect_right([first for first, _boot in epochs], seq) - 1
    if seq < 1 or index < 0:
        return None
    return epochs[index][1]


def _last_seq_of(epochs: Sequence[Epoch], boot: str, head: int) -> int | None:
    """Return the last seq `boot` appended in this log, or None if it appended none."""
    for index, (_first, name) in enumerate(epochs):
        if name == boot:
            if index + 1 < len(epochs):
                return epochs[index + 1][0] - 1
            return head
    return None


def resume_point(
    epochs: Sequence[Epoch], head: int, after: int, boot: str | None
) -> int:
    """Return where a stream should start for a reader at `after`.

    `boot` is the epoch the reader recorded for `after`, or None if it has
    none. The result is `after` unless this log no longer has what the
    reader read, as after a restore from a backup. Then the result is the
    end of the part both logs share: the last seq of the reader's epoch
    here, or 0 when that epoch is not in this log at all.
    """
    if after <= 0:
        return 0
    if after <= head and (boot is None or boot_at(epochs, after) == boot):
        return after
    shared_end = None if boot is None else _last_seq_of(epochs, boot, head)
    if shared_end is None:
        return 0
    return min(after, shared_end)
