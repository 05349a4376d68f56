"""The fold: applying commands to domain state, undoing them, and digests.

Everything here is pure. State is read through a caller-supplied function
and written to a `StateOverlay`, a write-back cache that the caller flushes
to storage once per transaction. Applying a command returns its outcome and
an undo record (the previous value of every key it wrote), which is what a
rewind needs to take the command back out.

Digests are sums, modulo 2**256, of a hash per item. A sum depends only on
the set of items, never on the order they were added in, and an item is
removed by subtracting its hash, so a digest can be kept up to date with
each write and still equal the digest computed from scratch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from typing import Any

from cmdlog import codec
from cmdlog.app import App, Rejected
from cmdlog.model import APPLIED, REJECTED, Command, Outcome

DIGEST_MODULUS = 2**256
_blake2b = hashlib.blake2b
StateKey = tuple[str, bytes]
UndoEntry = list[Any]  # [domain, key, previous value or None]

STATE_KEY_BYTES_MAX = 480
"""Maximum length of a state key a handler may write (LMDB's limit is 511 bytes)."""

STATE_HASHES_MAX = 20_000
"""Entries a `StateItemHashes` keeps before it starts over: a few megabytes."""

HANDLER_FAILED = "handler_failed"
"""Reason given when a handler raises instead of returning or rejecting. It
happens only for payloads that skipped validation (from a faulty peer) or
for a handler bug, and is deterministic either way."""


# Each item is hashed from a tag byte and its parts. Domain names and command
# IDs contain no NUL, so NUL ends them. A state key gets a length prefix
# because it may contain any byte, and the last part runs to the end.


# The three item hashes below each call blake2b themselves rather than share
# a helper, because together they run several times per command.


def state_item_hash(domain: str, key: bytes, value: bytes) -> int:
    data = b"s" + domain.encode() + b"\x00" + len(key).to_bytes(4, "big") + key + value
    return int.from_bytes(_blake2b(data, digest_size=32).digest(), "big")


def outcome_item_hash(command_id: str, outcome: bytes) -> int:
    """Hash a command's packed outcome (see `pack_outcome`)."""
    data = b"o" + command_id.encode() + b"\x00" + outcome
    return int.from_bytes(_blake2b(data, digest_size=32).digest(), "big")


def log_item_hash(command_id: str, fingerprint: bytes) -> int:
    data = b"l" + command_id.encode() + b"\x00" + fingerprint
    return int.from_bytes(_blake2b(data, digest_size=32).digest(), "big")


class StateItemHashes:
    """A memo of the item hashes of the state values written last.

    The next write to the same key subtracts the old item's hash from the
    digest, and finds it here instead of hashing the value again. A hash is
    used only for the exact value it was computed from. A ledger account is
    written by many commands in a row, so in a batch of a thousand commands
    about two thirds of the old values are found here.
    """

    def __init__(self, entries_max: int = STATE_HASHES_MAX) -> None:
        self._entries_max = entries_max
        self._hashes: dict[StateKey, tuple[bytes, int]] = {}

    def take(self, domain: str, key: bytes, value: bytes) -> int:
        """Return the item hash of `value`, the value `key` had until now."""
        known = self._hashes.pop((domain, key), None)
        if known is not None and known[0] == value:
            return known[1]
        return state_item_hash(domain, key, value)

    def put(self, domain: str, key: bytes, value: bytes) -> int:
        """Return the item hash of `value`, the value `key` has from now on."""
        item_hash = state_item_hash(domain, key, value)
        hashes = self._hashes
        if len(hashes) >= self._entries_max:
            hashes.clear()
        hashes[(domain, key)] = (value, item_hash)
        return item_hash


def pack_outcome(outcome: Outcome) -> bytes:
    """Encode `[status, result, reason]`; a named tuple packs as that array."""
    return codec.pack(outcome)


def unpack_outcome(data: bytes) -> Outcome:
    status, result, reason = codec.unpack(data)
    return Outcome(status, result, reason)


def digest_to_bytes(value: int) -> bytes:
    return (value % DIGEST_MODULUS).to_bytes(32, "big")


def digest_from_bytes(data: bytes | None) -> int:
    return 0 if data is None else int.from_bytes(data, "big")


class StateOverlay:
    """A write-back cache of domain state over a base read function.

    `changes()` lists every key whose value differs from the base, with the
    base value, so the caller can write it back and update the digest.
    """

    def __init__(self, base_get: Callable[[str, bytes], bytes | None]) -> None:
        self._base_get = base_get
        self._current: dict[StateKey, bytes | None] = {}
        self._base: dict[StateKey, bytes | None] = {}

    def get(self, domain: str, key: bytes) -> bytes | None:
        state_key = (domain, key)
        if state_key in self._current:
            return self._current[state_key]
        value = self._base_get(domain, key)
        self._current[state_key] = value
        self._base[state_key] = value
        return value

    def set(self, domain: str, key: bytes, value: bytes | None) -> None:
        state_key = (domain, key)
        if state_key not in self._base:
            self._base[state_key] = self._base_get(domain, key)
        self._current[state_key] = value

    def swap(self, domain: str, key: bytes, value: bytes | None) -> bytes | None:
        """Set `key` to `value` and return the value it had."""
        state_key = (domain, key)
        if state_key in self._current:
            previous = self._current[state_key]
        else:
            # Every key in `_current` is also in `_base`.
            previous = self._base[state_key] = self._base_get(domain, key)
        self._current[state_key] = value
        return previous

    def changes(self) -> Iterator[tuple[str, bytes, bytes | None, bytes | None]]:
        """Yield `(domain, key, base value, current value)` for each changed key."""
        for (domain, key), value in self._current.items():
            base = self._base[(domain, key)]
            if base != value:
                yield domain, key, base, value


class _HandlerState:
    """One domain's state as one handler call reads and writes it. Writes stay
    local until the handler returns, so a rejection leaves no trace."""

    __slots__ = ("_domain", "_overlay", "writes")

    def __init__(self, overlay: StateOverlay, domain: str) -> None:
        self._overlay = overlay
        self._domain = domain
        self.writes: dict[bytes, bytes | None] = {}

    def get(self, key: str) -> Any:
        raw_key = key.encode()
        if raw_key in self.writes:
            data = self.writes[raw_key]
        else:
            data = self._overlay.get(self._domain, raw_key)
        return None if data is None else codec.unpack(data)

    def put(self, key: str, value: Any) -> None:
        self.writes[_state_key(key)] = codec.pack(value)

    def delete(self, key: str) -> None:
        self.writes[_state_key(key)] = None


def _state_key(key: str) -> bytes:
    raw = key.encode()
    if not 0 < len(raw) <= STATE_KEY_BYTES_MAX:
        # A handler fed a payload that skipped validation (from a faulty peer)
        # could build any key; this rejects the command instead of failing
        # the whole commit on LMDB's key limit.
        raise ValueError(
            f"state key of {len(raw)} bytes; keys must have 1 to "
            f"{STATE_KEY_BYTES_MAX} bytes"
        )
    return raw


def apply_command(
    app: App, overlay: StateOverlay, command: Command
) -> tuple[Outcome, list[UndoEntry]]:
    """Fold one command of a known type into `overlay`.

    Returns the outcome and the undo record for the keys the command wrote.
    A rejected command writes nothing and has an empty undo record.
    """
    command_type = app.types[command.type]
    domain = command_type.domain
    state = _HandlerState(overlay, domain)
    try:
        result = command_type.apply(state, command)
    except Rejected as rejection:
        return Outcome(REJECTED, rejection.detail, rejection.reason), []
    except (
        KeyError,
        TypeError,
        ValueError,
        AttributeError,
        IndexError,
        OverflowError,
    ) as exc:
        return Outcome(REJECTED, str(exc), HANDLER_FAILED), []

    undo: list[UndoEntry] = []
    for key, value in state.writes.items():
        undo.append([domain, key, overlay.swap(domain, key, value)])
    return Outcome(APPLIED, result), undo


def revert(overlay: StateOverlay, undo: list[UndoEntry]) -> None:
    """Restore the state keys in `undo` to the values they had before the command."""
    for domain, key, previous in reversed(undo):
        overlay.set(domain, key, previous)
