"""Tests for the memo of state item hashes that keeps digest upkeep cheap."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from cmdlog import fold

# Few domains, keys and values, so that draws repeat them and the memo is hit.
writes = st.lists(
    st.tuples(
        st.sampled_from(["ledger", "users"]),
        st.sampled_from([b"a", b"b", b"c", b"d"]),
        st.sampled_from([b"1", b"2", b"\x00", b""]),
        st.booleans(),
    ),
    max_size=60,
)


@given(writes, st.integers(1, 5))
def test_memo_hashes_match_direct(
    operations: list[tuple[str, bytes, bytes, bool]], entries_max: int
) -> None:
    """take and put return the item hash of the value they are given, whether
    the memo contains that key with the same value, another value or nothing,
    and however often it starts over."""
    hashes = fold.StateItemHashes(entries_max)
    for domain, key, value, is_put in operations:
        found = (hashes.put if is_put else hashes.take)(domain, key, value)
        assert found == fold.state_item_hash(domain, key, value)


def test_memo_reuses_hash_of_same_value() -> None:
    """take returns the hash put stored for the same value without hashing
    again, and hashes a value that differs from the stored one."""
    hashes = fold.StateItemHashes()
    hashes.put("ledger", b"account/a", b"old")
    # A stand-in hash, so the test can see that take reuses it.
    hashes._hashes[("ledger", b"account/a")] = (b"old", 7)

    assert hashes.take("ledger", b"account/a", b"old") == 7
    hashes.put("ledger", b"account/a", b"new")
    assert hashes.take("ledger", b"account/a", b"other") == fold.state_item_hash(
        "ledger", b"account/a", b"other"
    )
