"""Generations: LMDB trees whose new keys land in a small part of the tree.

The ID index and the state databases are keyed by values that arrive in no
order: command IDs are whatever clients send, often UUID4, and a charge's
state key holds its reference. In one B-tree of such keys, each put lands
on a leaf of its own, and a commit rewrites every leaf it touched and the
branch pages above them. With 10,000,000 commands stored, a commit of
1,000 rewrote about 3,100 pages, against 1,600 in a new store, and the
append rate fell to 0.37 of a new store's.

So each key is stored under a 4-byte generation number, big-endian,
followed by the key. The store starts a new generation every
`StoreConfig.generation_commands` commands, and every write goes to the
newest one: however many keys are stored, new keys land among the leaves of
one generation, as in a new store. Older generations are only read.

A read looks in the newest generation first and goes back until it finds
the key. An empty value is a tombstone: the key was deleted while an older
generation (or run, below) still has a value for it. Most lookups are for
keys never stored (a new ID, a new reference), which would read every
generation, so a writable store keeps a `KeyFilter` per database, and a key
the filter has never seen is absent without a read.

So that a read of an old key (a late retry), or of a key the filter passes
by mistake, does not look through every generation ever written, sealed
generations are merged, as in a tiered LSM tree. Once
`StoreConfig.merge_fan_in` runs of one level follow each other, their keys
move in key order into one run of the next level, a few with each commit.
A run is one prefix: a generation, or a merged run numbered from
`MERGED_PREFIX_BASE` up, above every generation, so that moving keys into
it appends. The store keeps the runs, newest first, as `[number, level]`
pairs (`Runs`); while a merge runs, its run comes right before its
sources.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Sequence
from typing import Any

GENERATION_BYTES = 4
TOMBSTONE = b""
"""The value of a deleted key that an older generation has a value for."""
_BITS_PER_KEY = 16
_WORD_BITS = 64
_FILTER_KEYS_MIN = 1 << 16
_FOUND_KEYS_MAX = 1 << 16
_GROWTH = 4
MERGED_PREFIX_BASE = 1 << 31
Runs = list[list[int]]
"""`[number, level]` of each run, newest first; the first is being written."""


def generation_prefix(generation: int) -> bytes:
    return generation.to_bytes(GENERATION_BYTES, "big")


def run_prefixes(runs: Runs) -> tuple[bytes, ...]:
    """Return the prefixes of the runs to read, newest first."""
    return tuple(generation_prefix(number) for number, _level in runs)


def pick_merge(runs: Runs, fan_in: int) -> tuple[int, int] | None:
    """Return `(start, end)` of the `fan_in` oldest sealed runs of the
    lowest level that has that many in a row, or None.

    Runs of one level follow each other: new generations are level 0, and
    a merge puts its run where its sources were.
    """
    levels = sorted({level for _number, level in runs[1:]})
    for level in levels:
        positions = [i for i in range(1, len(runs)) if runs[i][1] == level]
        if len(positions) < fan_in:
            continue
        start = positions[-fan_in]
        if positions[-1] - start == fan_in - 1:
            return start, start + fan_in
    return None


def move_step(
    raw: Any,
    db: Any,
    sources: Sequence[bytes],
    target: bytes,
    budget: int,
    *,
    keep_tombstones: bool,
) -> tuple[bool, int]:
    """Move the first keys of the `sources` runs (newest first) into
    `target`, keeping the newest version of each. Return whether no key is
    left, and how many entries moved.

    Each source reads at most its share of `budget`. Only keys up to the
    smallest last key of the sources that stopped short move, so every
    version of a key moves in the same transaction, and a reader finds each
    key in the merged run or in the sources.
    """
    share = max(budget // len(sources), 1)
    entries: list[tuple[bytes, int, bytes]] = []
    bound: bytes | None = None
    cursor = raw.cursor(db=db)
    for rank, prefix in enumerate(sources):
        if not cursor.set_range(prefix):
            continue
        for count, (stored, value) in enumerate(cursor.iternext(), start=1):
            if not stored.startswith(prefix):
                break
            key = stored[GENERATION_BYTES:]
            entries.append((key, rank, value))
            if count == share:
                if bound is None or key < bound:
                    bound = key
                break
    if bound is not None:
        entries = [entry for entry in entries if entry[0] <= bound]
    entries.sort()
    previous: bytes | None = None
    for key, rank, value in entries:
        raw.delete(sources[rank] + key, b"", db)
        if key == previous:
            continue  # an older version of a key already moved
        previous = key
        if value == TOMBSTONE and not keep_tombstones:
            continue
        appended = raw.put(target + key, value, True, True, True, db)
        assert appended, f"merge met key {key!r} out of order"
    return bound is None, len(entries)


def _masks(count: int) -> tuple[int, ...]:
    """Return `count` 64-bit masks of four bits each, from a fixed LCG."""
    masks = []
    state = 0x9E3779B97F4A7C15
    for _ in range(count):
        bits = 0
        while bits.bit_count() < 4:
            state = (state * 6364136223846793005 + 1442695040888963407) % 2**64
            bits |= 1 << (state >> 58)
        masks.append(bits)
    return tuple(masks)


_MASKS = _masks(4096)
"""A key's bits within its word: one of these, picked by 12 bits of its hash.
A table lookup costs less than building the mask from four shifts."""


class KeyFilter:
    """A Bloom filter of byte strings, kept in memory.

    `key in f` is False only for a key never added. It is blocked: a key's
    four bits lie in one 64-bit word, and the key's `hash()` picks the word
    and the four bits, so a test reads one word per layer. At 16 bits per
    key, a full layer passes about one key in 200 that was never added.

    The filter grows by layers: once the newest has as many keys as it was
    sized for, a layer four times as large takes the new ones. A test reads
    every layer, so fewer and larger layers test faster. Nothing is ever
    removed, so a key deleted from the database still passes and costs one
    lookup.
    `hash()` of bytes differs between processes (PYTHONHASHSEED), so a
    filter is built from the database each time the store opens.

    One thread adds while others test. A key's bits are set before the
    transaction that stores it commits, so a reader that can read the key
    also finds its bits.
    """

    __slots__ = ("_layers", "_room")

    def __init__(self, keys: int = 0) -> None:
        self._layers: list[tuple[array[int], int]] = []
        self._room = 0
        self._add_layer(keys)

    def _add_layer(self, keys: int) -> None:
        wanted = max(keys, _FILTER_KEYS_MIN) * _BITS_PER_KEY // _WORD_BITS
        words = 1 << (wanted - 1).bit_length()
        self._layers.append((array("Q", bytes(8 * words)), words - 1))
        self._room = words * _WORD_BITS // _BITS_PER_KEY

    def add(self, key: bytes, _masks: tuple[int, ...] = _MASKS) -> None:
        h = hash(key)
        bits = _masks[h >> 52 & 4095]
        words, mask = self._layers[-1]
        index = h & mask
        old = words[index]
        if old | bits != old:
            words[index] = old | bits
            self._room -= 1
            if self._room <= 0:
                self._add_layer(_GROWTH * len(words) * _WORD_BITS // _BITS_PER_KEY)

    def __contains__(self, key: bytes, _masks: tuple[int, ...] = _MASKS) -> bool:
        h = hash(key)
        bits = _masks[h >> 52 & 4095]
        # A loop, not any(): a generator costs more than the test itself.
        for words, mask in self._layers:  # noqa: SIM110
            if words[h & mask] & bits == bits:
                return True
        return False

    def memory_bytes(self) -> int:
        return sum(8 * len(words) for words, _mask in self._layers)

    def add_stored(self, keys: Iterable[bytes]) -> None:
        """Add each key as stored: the generation prefix, then the key."""
        add = self.add
        for key in keys:
            add(key[GENERATION_BYTES:])


class GenerationTree:
    """One LMDB database whose keys are kept in generations.

    Every method takes the raw py-lmdb transaction. Reads take the prefixes
    of the runs to look in, newest first. Writes take the prefix of the
    generation being written.
    """

    __slots__ = ("_found", "db", "filter")

    def __init__(self, db: Any, key_filter: KeyFilter | None) -> None:
        self.db = db
        self.filter = key_filter
        self._found: set[bytes] = set()
        """Keys found lately. Such a key skips the filter, which would pass
        it anyway: an account is read for every payment to it. A key here
        that is gone since only costs the reads the filter would have saved."""

    def get(self, raw: Any, prefixes: Sequence[bytes], key: bytes) -> bytes | None:
        key_filter = self.filter
        found = self._found
        if key_filter is not None and key not in found and key not in key_filter:
            return None
        db = self.db
        for prefix in prefixes:
            value = raw.get(prefix + key, None, db)
            if value is not None:
                if len(found) >= _FOUND_KEYS_MAX:
                    found.clear()
                found.add(key)
                return value or None
        return None

    def put(
        self, raw: Any, prefix: bytes, key: bytes, value: bytes, *, stored: bool = False
    ) -> None:
        """Write `key` in generation `prefix`. With `stored`, the key is in
        the tree already, and so in the filter."""
        raw.put(prefix + key, value, True, True, False, self.db)
        if not stored and self.filter is not None:
            self.filter.add(key)

    def delete(
        self, raw: Any, prefixes: Sequence[bytes], prefix: bytes, key: bytes
    ) -> None:
        """Delete `key` as written in generation `prefix`, leaving a tombstone
        when an older generation still has a value for it."""
        raw.delete(prefix + key, b"", self.db)
        older = prefixes[prefixes.index(prefix) + 1 :]
        if self.get(raw, older, key) is not None:
            raw.put(prefix + key, TOMBSTONE, True, True, False, self.db)

    def build_filter(self, raw: Any) -> None:
        """Give the tree a filter of every key stored in it, with room for a
        quarter more before it adds a layer."""
        entries = int(raw.stat(self.db)["entries"])
        key_filter = KeyFilter(entries + entries // 4)
        key_filter.add_stored(raw.cursor(db=self.db).iternext(values=False))
        self.filter = key_filter
