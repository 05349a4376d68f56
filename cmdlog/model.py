"""The command model shared by the node, the wire and the client.

A command is immutable once stored. Its canonical position is the order key
`(stamp, origin, id)`; `order_key` encodes that tuple as bytes that sort the
same way, so LMDB's byte order is the fold order. Origins and IDs never
contain NUL (node IDs are hex, command IDs are printable ASCII), which makes
NUL a safe separator between the variable-length parts.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

from cmdlog.errors import InvalidKey

KEY_CHARS_MAX = 255
_KEY_PATTERN = re.compile(r"[\x21-\x7e]+")
NATURAL_ID_SEPARATOR = "~"
NATURAL_ID = re.compile(rf"[^/]+{NATURAL_ID_SEPARATOR}[0-9a-f]{{32}}")
"""The form of an ID derived from a natural key: `TYPE~HASH`."""
STAMP_BYTES = 8

APPLIED = "applied"
REJECTED = "rejected"
PENDING = "pending"


# Command and Outcome are named tuples rather than frozen dataclasses: both
# are immutable, and a frozen dataclass took about five times as long to
# build, once or more for every command a node stores or folds.


class Command(NamedTuple):
    """One stored command: what a client asked for, stamped by the node that took it."""

    id: str
    type: str
    payload: dict[str, Any]
    stamp: int
    origin: str

    def to_record(self) -> list[Any]:
        return list(self)

    @classmethod
    def from_record(cls, record: list[Any]) -> Command:
        command_id, type_name, payload, stamp, origin = record
        return cls(command_id, type_name, payload, stamp, origin)

    @property
    def order_key(self) -> bytes:
        return order_key(self.stamp, self.origin, self.id)


class Outcome(NamedTuple):
    """What folding a command produced: applied with a result, rejected, or pending."""

    status: str
    result: Any = None
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status, "result": self.result, "reason": self.reason}


def order_key(stamp: int, origin: str, command_id: str) -> bytes:
    """Encode `(stamp, origin, id)` so that byte order equals tuple order."""
    return (
        stamp.to_bytes(STAMP_BYTES, "big")
        + origin.encode("ascii")
        + b"\x00"
        + command_id.encode("ascii")
    )


def split_order_key(key: bytes) -> tuple[int, str, str]:
    """Decode an order key into `(stamp, origin, id)`."""
    stamp = int.from_bytes(key[:STAMP_BYTES], "big")
    origin, _, command_id = key[STAMP_BYTES:].partition(b"\x00")
    return stamp, origin.decode("ascii"), command_id.decode("ascii")


def parse_key(raw: str | None, *, field: str = "Idempotency-Key") -> str:
    """Validate a client's idempotency key and return it unquoted.

    The IETF Idempotency-Key draft sends the key as a quoted string, so a
    value in double quotes means the text between them.
    """
    if raw is None:
        raise InvalidKey(
            f"{field} is missing; send a unique key per logical operation, "
            "for example a UUID, and reuse it on every retry"
        )
    key = raw
    if len(key) >= 2 and key[0] == '"' and key[-1] == '"':
        key = key[1:-1]
    if not key:
        raise InvalidKey(f"{field} is empty; send 1 to {KEY_CHARS_MAX} characters")
    if len(key) > KEY_CHARS_MAX:
        raise InvalidKey(
            f"{field} has {len(key)} characters; the limit is {KEY_CHARS_MAX}"
        )
    if not _KEY_PATTERN.fullmatch(key):
        bad = next(c for c in key if not "\x21" <= c <= "\x7e")
        raise InvalidKey(
            f"{field} contains {bad!r} (U+{ord(bad):04X}); use only printable "
            "ASCII characters 0x21-0x7E, without spaces"
        )
    if NATURAL_ID.fullmatch(key):
        # A key of this form could take the ID of a command that a payload's
        # natural key names, and block that command.
        raise InvalidKey(
            f"{field} {key!r} has the form TYPE~HASH, which is kept for IDs "
            "derived from a natural key; send another key"
        )
    return key


def command_view(command: Command, outcome: Outcome) -> dict[str, Any]:
    """Return the public JSON-ready view of a command and its current outcome."""
    return {
        "id": command.id,
        "type": command.type,
        "payload": command.payload,
        "stamp": command.stamp,
        "origin": command.origin,
        "outcome": outcome.to_json(),
    }
