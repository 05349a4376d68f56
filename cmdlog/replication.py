"""Replication logic: reading the log for a stream and checking what arrives.

This module holds the protocol's decisions, free of sockets: which log
entries a stream sends next, what a hello from a peer means for the
cursor, and whether a record from a peer is a well-formed command. The
HTTP transport (`peering`) moves the frames.

Compared with CouchDB's replication, which it resembles (a puller per
peer, a checkpointed cursor into the peer's local sequence), cmdlog keeps
the cursor in the same transaction as the commands it covers, so no
checkpoint can run ahead of what is stored, and identifies the peer's log
instance in the stream's hello, so a peer whose data directory was
replaced is read again from the start instead of from a stale sequence.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from cmdlog import codec, epochs, frames
from cmdlog.database import Database
from cmdlog.errors import DuplicateNodeId, MalformedBody, VersionMismatch
from cmdlog.frames import FrameError
from cmdlog.model import KEY_CHARS_MAX, Command

TYPE_CHARS_MAX = 255
ORIGIN_PATTERN = re.compile(r"[0-9a-f]{1,64}")
ID_CHARS_MAX = KEY_CHARS_MAX + 65
"""Maximum length of a command ID from a peer: a key with a principal prefix."""
ID_PATTERN = re.compile(rf"[\x21-\x7e]{{1,{ID_CHARS_MAX}}}")
STAMP_MAX = 2**63 - 1
_VALID_ORIGINS_MAX = 1024
_valid_origins: set[str] = set()
"""Origins already checked: a cluster has a few, and every record names one."""


BOOT_PATTERN = re.compile(r"[0-9a-f]{1,64}")

NEW_NODE_ID_FIX = (
    "Stop one of the two, give its data directory a new node ID with "
    "'cmdlog identity --data DIR --regenerate', and start it again"
)
"""The fix for two processes with one node ID. The command keeps every
command of that directory, and peers read its log again from the start."""


@dataclass(frozen=True, slots=True)
class Reader:
    """The node reading a stream, as its request names it."""

    node: str
    boot: str
    """The reader's process, as `Database.boot` names it."""

    @property
    def names(self) -> tuple[str, str]:
        return self.node, self.boot


def log_head(database: Database) -> int:
    """Return the last sequence number of the local log."""
    with database.store.read() as txn:
        return txn.log_last_seq()


def read_log_chunk(
    database: Database,
    after_seq: int,
    *,
    entries_max: int,
    bytes_max: int,
    reader: Reader | None = None,
) -> tuple[list[list[Any]], int, int]:
    """Return the next log entries after `after_seq` for a stream.

    Returns up to `entries_max` entries as `[seq, packed record]`, the
    sequence number the chunk covers through, and the log's last sequence
    number. With a `reader`, runs of copies received from that node's
    current process are covered but not returned: a running node's log only
    grows, so it still has them. Copies from its earlier processes are
    returned, since it may have come back from an old backup.

    The read transaction is closed before this returns, so a stream never
    holds one while it waits on a socket.
    """
    entries: list[list[Any]] = []
    size = 0
    with database.store.read() as txn:
        head = txn.log_last_seq()
        through = after_seq
        # Runs come in log order. Each turn of the loop skips one run of the
        # reader's own copies or reads entries up to the next run that
        # matters, so the work stays in proportion to what the chunk covers.
        runs = iter(()) if reader is None else txn.sources_from(after_seq + 1)
        run = next(runs, None)
        while through < head:
            while run is not None and run[1] <= through:
                run = next(runs, None)
            own = reader is not None and run is not None and run[2:] == reader.names
            if run is not None and run[0] <= through + 1:
                if own:
                    through = run[1]
                    continue
                stop = run[1]  # another node's copies: sent like any entry
            else:
                stop = head if run is None else run[0] - 1
            for seq, record in txn.log_iter(through):
                if seq > stop:
                    break
                if entries and size + len(record) > bytes_max:
                    return entries, through, head
                entries.append([seq, record])
                size += len(record)
                through = seq
                if len(entries) >= entries_max:
                    return entries, through, head
            through = stop
    return entries, through, head


def hello_frame(
    database: Database, head: int, *, after: int, rewound: bool = False
) -> dict[str, Any]:
    """Build a stream's first frame. With `rewound`, the frame marks a stream
    that starts before the reader's cursor, because this log no longer has
    what the reader read after `after` (see `cmdlog.epochs`)."""
    hello = {
        "t": frames.HELLO,
        "after": after,
        "epoch": epochs.boot_at(database.epochs, after),
        "version": frames.PROTOCOL_VERSION,
        "node": database.node_id,
        "instance": database.log_instance,
        "boot": database.boot,
        "head": head,
        "types": database.app.type_names(),
    }
    if rewound:
        hello["rewound"] = True
    return hello


def check_version(version: Any) -> None:
    if version != frames.PROTOCOL_VERSION:
        raise VersionMismatch(
            f"the peer speaks replication version {version!r}, this node speaks "
            f"version {frames.PROTOCOL_VERSION}; run the same cmdlog release on "
            "both, or one that supports both versions"
        )


@dataclass(slots=True)
class PeerState:
    """A node's record of one peer it pulls from."""

    url: str
    node: str | None = None
    instance: str | None = None
    boot: str | None = None
    """The peer's process, from its hello; None from a release without it."""
    cursor: int = 0
    epoch: str | None = None
    """The peer's boot that appended the entry at `cursor`, from its frames."""
    head: int = 0
    connected: bool = False
    types: tuple[str, ...] = ()
    error: str | None = None

    @property
    def lag(self) -> int:
        return max(0, self.head - self.cursor)

    def source(self) -> tuple[str, str] | None:
        """Return the peer's node ID and boot once its hello named both."""
        if self.node is None or self.boot is None:
            return None
        return self.node, self.boot

    @classmethod
    def from_record(cls, url: str, record: dict[str, Any] | None) -> PeerState:
        """Build the state of the peer at `url` from its stored record, if any."""
        record = record or {}
        return cls(
            url,
            node=record.get("node"),
            instance=record.get("instance"),
            cursor=int(record.get("cursor", 0)),
            epoch=parse_boot(record.get("epoch")),
        )

    def to_record(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "instance": self.instance,
            "cursor": self.cursor,
            "epoch": self.epoch,
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "node": self.node,
            "cursor": self.cursor,
            "connected": self.connected,
            "lag": self.lag,
            "head": self.head,
            "error": self.error,
        }


def accept_hello(
    peer: PeerState, hello: dict[str, Any], *, self_node: str, self_boot: str
) -> bool:
    """Apply a stream's hello to `peer`; return True if the cursor went back.

    The cursor goes back to 0 for a replaced log, and to the end of the part
    that still matches for a log restored from a backup.

    Raises `VersionMismatch` for another protocol version and `FrameError`
    for a malformed hello. A hello from this very process (a peer URL that
    points back at us) is a `FrameError` too, so the puller stops. A hello
    with this node's ID from another process raises `DuplicateNodeId`: the
    data directory was copied and both copies run.
    """
    if hello.get("t") != frames.HELLO:
        raise FrameError(f"expected a hello frame first, found {hello.get('t')!r}")
    check_version(hello.get("version"))
    node, instance, head = hello.get("node"), hello.get("instance"), hello.get("head")
    if type(node) is not str or not ORIGIN_PATTERN.fullmatch(node):
        raise FrameError(f"hello has an invalid node ID {node!r}")
    if type(instance) is not str or type(head) is not int:
        raise FrameError("hello lacks a string 'instance' or an integer 'head'")
    boot = parse_boot(hello.get("boot"))  # None from a release without boots
    if node == self_node and boot is not None and boot != self_boot:
        raise DuplicateNodeId(
            f"{peer.url} runs with this node's ID {node} in another process "
            f"(boot {boot} there, {self_boot} here), so one of the two data "
            f"directories is a copy of the other. {NEW_NODE_ID_FIX}"
        )
    if node == self_node:
        raise FrameError(f"{peer.url} is this node itself; remove it from --peer")
    types = hello.get("types")
    peer.types = (
        tuple(t for t in types if type(t) is str) if type(types) is list else ()
    )
    after = hello.get("after")
    reset = peer.instance is not None and peer.instance != instance
    if reset:
        peer.cursor, peer.epoch = 0, None
    rewound = hello.get("rewound") is True
    if rewound and type(after) is int and 0 <= after < peer.cursor:
        # The peer's log went back (a restore from a backup): what this node
        # read after `after` is not in it, so reading resumes there.
        peer.cursor, peer.epoch = after, parse_boot(hello.get("epoch"))
    if after != peer.cursor:
        raise FrameError(
            f"the stream starts after sequence {after!r}, but this node asked for "
            f"{peer.cursor}"
        )
    peer.node, peer.instance, peer.head = node, instance, head
    peer.epoch = parse_boot(hello.get("epoch")) or peer.epoch
    peer.boot = boot
    return reset or rewound


def parse_boot(value: Any) -> str | None:
    """Return `value` if it is a boot name, else None (missing or malformed).

    A boot names one run of a node's process, and a log epoch by the boot
    that began it, so frames' epochs are parsed with this too.
    """
    if type(value) is str and BOOT_PATTERN.fullmatch(value):
        return value
    return None


def parse_entries(
    frame: dict[str, Any], *, after_seq: int
) -> list[tuple[int, Command]]:
    """Check a commands frame and return its `(seq, command)` pairs.

    Sequence numbers must increase and start after `after_seq`; every record
    must be a well-formed command. Raises `FrameError` naming the problem.
    """
    entries = frame.get("entries")
    if type(entries) is not list:
        raise FrameError("commands frame lacks a list 'entries'")
    parsed = []
    previous = after_seq
    for entry in entries:
        if type(entry) is not list or len(entry) != 2:
            raise FrameError("a log entry is not a [seq, record] pair")
        seq, record = entry
        if type(seq) is not int or seq <= previous:
            raise FrameError(
                f"log entry sequence {seq!r} does not follow {previous}; the peer "
                "sent its log out of order"
            )
        if type(record) is not bytes:
            raise FrameError(f"log entry {seq} is not a packed record")
        parsed.append((seq, parse_record(seq, record)))
        previous = seq
    return parsed


def parse_through(
    frame: dict[str, Any], entries: list[tuple[int, Command]], *, after_seq: int
) -> int:
    """Return the sequence number a commands frame covers through.

    A frame from a stream that skipped the reader's own copies gives
    `through`, and otherwise its last entry is the end. Raises `FrameError` for
    a `through` before the frame's last entry, and for a frame that covers
    nothing after `after_seq`, which no stream sends.
    """
    last = entries[-1][0] if entries else after_seq
    through = frame.get("through", last)
    if type(through) is not int or through < last:
        raise FrameError(
            f"commands frame covers through {through!r}, before its last entry {last}"
        )
    if through <= after_seq:
        raise FrameError(
            f"commands frame covers through {through}, which this node has (it "
            f"asked for what follows {after_seq})"
        )
    return through


def parse_record(seq: int, record: bytes) -> Command:
    """Decode and check one command record from a peer."""
    try:
        fields = codec.unpack(record)
    except MalformedBody as exc:
        raise FrameError(f"log entry {seq} does not decode: {exc.message}") from exc
    if type(fields) is not list or len(fields) != 5:
        raise FrameError(f"log entry {seq} is not a 5-field command record")
    command_id, type_name, payload, stamp, origin = fields
    if type(command_id) is not str or not ID_PATTERN.fullmatch(command_id):
        raise FrameError(f"log entry {seq} has an invalid command ID {command_id!r}")
    if type(type_name) is not str or not 0 < len(type_name) <= TYPE_CHARS_MAX:
        raise FrameError(f"log entry {seq} has an invalid type {type_name!r}")
    if type(payload) is not dict:
        raise FrameError(f"log entry {seq} has a payload that is not a map")
    try:
        codec.check_value(payload, "payload")
    except MalformedBody as exc:
        raise FrameError(f"log entry {seq}: {exc.message}") from exc
    if type(stamp) is not int or not 0 < stamp <= STAMP_MAX:
        raise FrameError(f"log entry {seq} has an invalid stamp {stamp!r}")
    if type(origin) is not str or origin not in _valid_origins:
        if type(origin) is not str or not ORIGIN_PATTERN.fullmatch(origin):
            raise FrameError(f"log entry {seq} has an invalid origin {origin!r}")
        if len(_valid_origins) < _VALID_ORIGINS_MAX:
            _valid_origins.add(origin)
    return Command(command_id, type_name, payload, stamp, origin)
