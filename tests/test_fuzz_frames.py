"""Fuzz tests of the replication decoder: cmdlog.frames and cmdlog.replication.

The first half feeds FrameReader, parse_entries, parse_record and
accept_hello random and mutated input in process. Every outcome must be
decoded frames, a well-formed command, FrameError, StreamTruncated or
VersionMismatch, and never another exception. The second half runs a real
node that pulls from a scripted peer on 127.0.0.1, which sends a valid
prefix and then a bad frame. The node must store exactly the prefix, never
move its cursor past it and stay healthy. A frame it cannot use must stop
the puller with an error in /status, and only a stream cut short is retried.
"""

from __future__ import annotations

import asyncio
import itertools
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, assume, event, given, note, settings
from hypothesis import strategies as st

from cmdlog import codec, frames, replication
from cmdlog.apps.example import app as example_app
from cmdlog.config import ReplicationConfig
from cmdlog.errors import DuplicateNodeId, VersionMismatch
from cmdlog.frames import FrameError, FrameReader, StreamTruncated, encode_frame
from cmdlog.model import Command
from cmdlog.replication import PeerState
from cmdlog.store import Store
from tests.fake_peer import FAKE_NODE, FakePeer, commands, hello
from tests.nodes import NodeProcess

SETTINGS = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow]}
FRAME_BYTES_MAX = ReplicationConfig().frame_bytes_max
SMALL_FRAME_BYTES_MAX = 256
"""Frame limit of the in-process readers, small so hypothesis reaches it."""
SETTLE_TIMEOUT_S = 10.0
OBSERVE_S = 1.0
"""Time a puller is watched after it settles, for a retry or a cursor move. A
retry would come after 0.05 to 0.1 s (half to all of the initial backoff)."""
SELF_NODE = "5e1f"
"""Node ID of the puller in the in-process tests."""
SELF_BOOT = "b007"
"""Boot of the puller's process in the in-process tests."""
PEER_URL = "http://127.0.0.1:9"
"""URL of the peer in the in-process tests. Nothing connects to it."""
STAMP = 1 << 16
"""A stamp in 1970, far behind every clock, so pulled commands are folded."""


# Values and frames.

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=12)
    | st.binary(max_size=12)
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)
PLAIN_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)
"""Values of the JSON data model, the only ones a command payload may hold."""
FRAME_KINDS = st.sampled_from([frames.HELLO, frames.COMMANDS, frames.HEARTBEAT])
FRAME_BODIES = st.builds(
    lambda kind, rest: {**rest, "t": kind},
    FRAME_KINDS | st.text(max_size=8),
    st.dictionaries(st.text(max_size=8), VALUES, max_size=4),
)


def roundtrip(frame: dict[str, Any]) -> Any:
    """Return the bytes of `frame` after one decode. Bytes compare equal even
    where a decoded NaN would not."""
    return codec.pack(codec.unpack(codec.pack(frame)))


def encode_raw(body: bytes, *, checksum: int | None = None) -> bytes:
    """Frame `body` with its length and a checksum (its CRC-32 by default)."""
    crc = zlib.crc32(body) if checksum is None else checksum
    return struct.pack(">II", len(body), crc) + body


@dataclass
class Decoded:
    """What a FrameReader made of one stream: frames, then at most one error."""

    frames: list[dict[str, Any]] = field(default_factory=list)
    error: Exception | None = None


def decode(data: bytes, cuts: list[int], *, limit: int) -> Decoded:
    """Feed `data` to a reader in chunks split at `cuts`, then close it.

    Only FrameError and StreamTruncated are caught, so any other exception
    fails the calling test.
    """
    reader = FrameReader(frame_bytes_max=limit)
    decoded = Decoded()
    bounds = [0, *sorted(cut for cut in cuts if 0 < cut < len(data)), len(data)]
    try:
        for start, end in itertools.pairwise(bounds):
            for frame in reader.feed(data[start:end]):
                decoded.frames.append(frame)
        reader.close()
    except (FrameError, StreamTruncated) as exc:
        decoded.error = exc
    return decoded


def cut_points(data_size: int) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(0, data_size), max_size=8)


# FrameReader.


@given(bodies=st.lists(FRAME_BODIES, max_size=5), data=st.data())
@settings(max_examples=100, **SETTINGS)  # type: ignore[arg-type]
def test_reader_splits_anywhere(
    bodies: list[dict[str, Any]], data: st.DataObject
) -> None:
    """A valid stream split at any points decodes to the frames that were sent."""
    stream = b"".join(encode_frame(body) for body in bodies)
    cuts = data.draw(cut_points(len(stream)))

    decoded = decode(stream, cuts, limit=FRAME_BYTES_MAX)

    assert decoded.error is None
    assert [codec.pack(frame) for frame in decoded.frames] == [
        roundtrip(body) for body in bodies
    ]


@given(stream=st.binary(max_size=300), data=st.data())
@settings(max_examples=200, **SETTINGS)  # type: ignore[arg-type]
def test_reader_any_bytes(stream: bytes, data: st.DataObject) -> None:
    """Any bytes give frames that are maps with a string 't', then at most one error."""
    cuts = data.draw(cut_points(len(stream)))
    limit = data.draw(st.integers(0, SMALL_FRAME_BYTES_MAX))

    decoded = decode(stream, cuts, limit=limit)

    for frame in decoded.frames:
        assert type(frame) is dict
        assert type(frame["t"]) is str


MUTATIONS = st.sampled_from(["flip", "cut", "insert", "length", "swap"])


@given(bodies=st.lists(FRAME_BODIES, min_size=1, max_size=4), data=st.data())
@settings(max_examples=150, **SETTINGS)  # type: ignore[arg-type]
def test_reader_mutated_stream(
    bodies: list[dict[str, Any]], data: st.DataObject
) -> None:
    """A valid stream with a byte flipped, cut, inserted or a length rewritten
    still gives only frames, FrameError or StreamTruncated."""
    stream = bytearray(b"".join(encode_frame(body) for body in bodies))
    mutation = data.draw(MUTATIONS)
    at = data.draw(st.integers(0, len(stream) - 1))
    if mutation == "flip":
        stream[at] ^= data.draw(st.integers(1, 255))
    elif mutation == "cut":
        del stream[at:]
    elif mutation == "insert":
        stream[at:at] = data.draw(st.binary(min_size=1, max_size=16))
    elif mutation == "length":
        first = encode_frame(bodies[0])
        stream[0:4] = struct.pack(">I", data.draw(st.integers(0, 2 * len(first))))
    else:
        other = data.draw(st.integers(0, len(stream) - 1))
        stream[at], stream[other] = stream[other], stream[at]
    cuts = data.draw(cut_points(len(stream)))

    decoded = decode(bytes(stream), cuts, limit=SMALL_FRAME_BYTES_MAX * 4)

    for frame in decoded.frames:
        assert type(frame) is dict
        assert type(frame["t"]) is str


@given(
    bodies=st.lists(FRAME_BODIES, max_size=3),
    excess=st.integers(1, 2**32 - 1 - SMALL_FRAME_BYTES_MAX),
    checksum=st.integers(0, 2**32 - 1),
    tail=st.binary(max_size=32),
    data=st.data(),
)
@settings(max_examples=100, **SETTINGS)  # type: ignore[arg-type]
def test_reader_oversized_header(
    bodies: list[dict[str, Any]],
    excess: int,
    checksum: int,
    tail: bytes,
    data: st.DataObject,
) -> None:
    """A header over the limit is a FrameError as soon as the header arrives."""
    prefix = b"".join(encode_frame(body) for body in bodies)
    assume(all(len(encode_frame(body)) - 8 <= SMALL_FRAME_BYTES_MAX for body in bodies))
    length = SMALL_FRAME_BYTES_MAX + excess
    stream = prefix + struct.pack(">II", length, checksum) + tail
    cuts = data.draw(cut_points(len(stream)))

    decoded = decode(stream, cuts, limit=SMALL_FRAME_BYTES_MAX)

    assert isinstance(decoded.error, FrameError)
    assert str(length) in decoded.error.message
    assert len(decoded.frames) == len(bodies)


@given(filler=st.integers(0, SMALL_FRAME_BYTES_MAX - 16))
@settings(max_examples=30, **SETTINGS)  # type: ignore[arg-type]
def test_reader_frame_at_limit(filler: int) -> None:
    """A frame whose body is exactly the limit decodes."""
    body = codec.pack({"t": "heartbeat", "x": b"\x00" * filler})
    body = codec.pack(
        {"t": "heartbeat", "x": b"\x00" * (filler + SMALL_FRAME_BYTES_MAX - len(body))}
    )
    assume(len(body) == SMALL_FRAME_BYTES_MAX)

    decoded = decode(encode_raw(body), [], limit=SMALL_FRAME_BYTES_MAX)

    assert decoded.error is None
    assert len(decoded.frames) == 1


@given(
    bodies=st.lists(FRAME_BODIES, min_size=1, max_size=3),
    damage=st.integers(1, 2**32 - 1),
    data=st.data(),
)
@settings(max_examples=100, **SETTINGS)  # type: ignore[arg-type]
def test_reader_wrong_checksum(
    bodies: list[dict[str, Any]], damage: int, data: st.DataObject
) -> None:
    """A frame whose checksum does not match is a FrameError, after earlier frames."""
    index = data.draw(st.integers(0, len(bodies) - 1))
    parts = [encode_frame(body) for body in bodies]
    bad_body = codec.pack(bodies[index])
    parts[index] = encode_raw(bad_body, checksum=zlib.crc32(bad_body) ^ damage)
    stream = b"".join(parts)

    decoded = decode(stream, data.draw(cut_points(len(stream))), limit=FRAME_BYTES_MAX)

    assert isinstance(decoded.error, FrameError)
    assert "checksum" in decoded.error.message
    assert len(decoded.frames) == index


@given(bodies=st.lists(FRAME_BODIES, min_size=1, max_size=4), data=st.data())
@settings(max_examples=100, **SETTINGS)  # type: ignore[arg-type]
def test_reader_truncated(bodies: list[dict[str, Any]], data: st.DataObject) -> None:
    """A stream that ends inside a frame yields the frames before it, then
    StreamTruncated on close."""
    parts = [encode_frame(body) for body in bodies]
    whole = b"".join(parts[:-1])
    kept_bytes = data.draw(st.integers(1, len(parts[-1]) - 1))
    stream = whole + parts[-1][:kept_bytes]

    decoded = decode(stream, data.draw(cut_points(len(stream))), limit=FRAME_BYTES_MAX)

    assert isinstance(decoded.error, StreamTruncated)
    assert len(decoded.frames) == len(bodies) - 1


# parse_record and parse_entries.


def assert_well_formed(command: Command) -> None:
    """Check every field of a command accepted from a peer."""
    assert type(command.id) is str
    assert replication.ID_PATTERN.fullmatch(command.id)
    assert type(command.type) is str
    assert 0 < len(command.type) <= replication.TYPE_CHARS_MAX
    assert type(command.payload) is dict
    codec.check_value(command.payload, "payload")
    assert type(command.stamp) is int
    assert 0 < command.stamp <= replication.STAMP_MAX
    assert type(command.origin) is str
    assert replication.ORIGIN_PATTERN.fullmatch(command.origin)
    assert command.order_key
    assert codec.pack(command.to_record())


GOOD_FIELDS = [
    st.from_regex(r"\A[\x21-\x7e]{1,40}\Z"),
    st.sampled_from(["ledger.open", "ledger.deposit", "x.y"]),
    st.dictionaries(st.text(max_size=8), PLAIN_VALUES, max_size=3),
    st.integers(1, 2**63 - 1),
    st.from_regex(r"\A[0-9a-f]{1,64}\Z"),
]
"""Strategies of the five record fields, each within its rule."""
VALID_RECORDS = st.tuples(*GOOD_FIELDS).map(lambda fields: codec.pack(list(fields)))
EDGE_FIELDS = [
    st.sampled_from(["", "a b", "x" * 320, "x" * 321, "caf\u00e9", "a\x00"]),
    st.sampled_from(["", "t" * 255, "t" * 256, "\u00e9" * 255]),
    st.dictionaries(st.text(max_size=8), VALUES, max_size=3),
    st.sampled_from([0, 1, -1, 2**63 - 1, 2**63, 2**64 - 1, True, 1.0]),
    st.sampled_from(["", "f" * 64, "f" * 65, "FA4E", "g"]),
]
"""Strategies of values at and just past each field's rule."""


@st.composite
def records(draw: st.DrawFn) -> bytes:
    """Draw a packed record: five fields, some at an edge or of any type,
    sometimes with fields missing or extra, sometimes with damaged bytes."""
    fields = [draw(strategy) for strategy in GOOD_FIELDS]
    for index in range(5):
        roll = draw(st.integers(0, 9))
        if roll == 0:
            fields[index] = draw(EDGE_FIELDS[index])
        elif roll == 1:
            fields[index] = draw(VALUES)
    shape = draw(st.integers(0, 9))
    if shape == 7:
        fields = fields[: draw(st.integers(0, 4))]
    elif shape == 8:
        fields.append(draw(VALUES))
    packed = codec.pack(fields if shape != 9 else draw(VALUES))
    if draw(st.integers(0, 3)):
        return packed
    damaged = bytearray(packed)
    at = draw(st.integers(0, len(damaged) - 1))
    damaged[at] = draw(st.integers(0, 255))
    return bytes(damaged[: draw(st.integers(0, len(damaged)))])


def parse_record_outcome(seq: int, record: bytes) -> Command | None:
    """Return the parsed command, or None on a FrameError."""
    try:
        command = replication.parse_record(seq, record)
    except FrameError:
        event("FrameError")
        return None
    event("command")
    return command


@given(record=st.binary(max_size=200))
@settings(max_examples=200, **SETTINGS)  # type: ignore[arg-type]
def test_parse_record_any_bytes(record: bytes) -> None:
    """Any bytes are a FrameError or a well-formed command."""
    command = parse_record_outcome(1, record)

    if command is not None:
        assert_well_formed(command)


@given(record=records())
@settings(max_examples=250, **SETTINGS)  # type: ignore[arg-type]
def test_parse_record_mutated(record: bytes) -> None:
    """Records with a field of any type or value, or damaged bytes, are a
    FrameError or a well-formed command."""
    command = parse_record_outcome(1, record)

    if command is not None:
        assert_well_formed(command)


@st.composite
def entry_lists(draw: st.DrawFn, after_seq: int) -> Any:
    """Draw the entries of a commands frame: mostly increasing `[seq, record]`
    pairs after `after_seq`, with some sequence numbers, records or shapes
    out of place."""
    if draw(st.integers(0, 9)) == 0:
        return draw(VALUES)
    entries, seq = [], after_seq
    for _ in range(draw(st.integers(0, 4))):
        roll = draw(st.integers(0, 9))
        seq = seq + draw(st.integers(1, 3)) if roll else draw(st.integers(-3, 12))
        record_bytes = draw(VALID_RECORDS if draw(st.integers(0, 2)) else records())
        entry: Any = [seq, record_bytes]
        if draw(st.integers(0, 14)) == 0:
            entry = draw(VALUES)
        entries.append(entry)
    return entries


@given(head=VALUES, after_seq=st.integers(0, 8), data=st.data())
@settings(max_examples=150, **SETTINGS)  # type: ignore[arg-type]
def test_parse_entries_any_frame(
    head: Any, after_seq: int, data: st.DataObject
) -> None:
    """A commands frame with any entries is a FrameError or increasing
    sequence numbers after `after_seq` with well-formed commands."""
    entries = data.draw(entry_lists(after_seq))
    frame = codec.unpack(
        codec.pack({"t": frames.COMMANDS, "entries": entries, "head": head})
    )

    try:
        parsed = replication.parse_entries(frame, after_seq=after_seq)
    except FrameError:
        event("FrameError")
        return

    event("no entries" if not parsed else "entries")
    seqs = [seq for seq, _command in parsed]
    assert all(type(seq) is int for seq in seqs)
    assert seqs == sorted(set(seqs))
    assert all(seq > after_seq for seq in seqs)
    for _seq, command in parsed:
        assert_well_formed(command)


# accept_hello.

# An "after" of "CURSOR" is a placeholder for the sequence that the puller
# requested, and each test fills it in.
HELLO_FIELDS = {
    "t": st.just(frames.HELLO),
    "version": st.just(frames.PROTOCOL_VERSION),
    "node": st.from_regex(r"\A[0-9a-f]{1,16}\Z") | st.just(SELF_NODE),
    "boot": st.just(SELF_BOOT) | st.from_regex(r"\A[0-9a-f]{1,16}\Z"),
    "instance": st.text(max_size=8),
    "head": st.integers(0, 10),
    "after": st.just("CURSOR") | st.integers(0, 10),
    "types": st.lists(st.text(max_size=8), max_size=3),
    "epoch": st.none() | st.from_regex(r"\A[0-9a-f]{1,16}\Z") | st.text(max_size=4),
    "rewound": st.booleans() | st.integers(0, 1),
}


@st.composite
def hellos(draw: st.DrawFn) -> dict[str, Any]:
    """Draw a hello map with some fields missing or replaced by any value."""
    hello_frame = {name: draw(strategy) for name, strategy in HELLO_FIELDS.items()}
    for name in draw(st.sets(st.sampled_from(sorted(HELLO_FIELDS)), max_size=3)):
        if draw(st.booleans()):
            del hello_frame[name]
        else:
            hello_frame[name] = draw(VALUES)
    return hello_frame


@given(
    hello_frame=hellos(),
    cursor=st.integers(0, 10),
    instance=st.none() | st.text(max_size=8),
)
@settings(max_examples=250, **SETTINGS)  # type: ignore[arg-type]
def test_accept_hello_any_hello(
    hello_frame: dict[str, Any], cursor: int, instance: str | None
) -> None:
    """Any hello is accepted with a valid peer state, or a FrameError or
    VersionMismatch that never moves the cursor forward."""
    if hello_frame.get("after") == "CURSOR":
        replaced = instance is not None and instance != hello_frame.get("instance")
        hello_frame["after"] = 0 if replaced else cursor
    peer = PeerState(PEER_URL, instance=instance, cursor=cursor)

    try:
        reset = replication.accept_hello(
            peer, hello_frame, self_node=SELF_NODE, self_boot=SELF_BOOT
        )
    except DuplicateNodeId:
        event("DuplicateNodeId")
        assert hello_frame.get("node") == SELF_NODE
        assert hello_frame.get("boot") != SELF_BOOT
        assert peer == PeerState(PEER_URL, instance=instance, cursor=cursor)
        return
    except (FrameError, VersionMismatch) as exc:
        event(type(exc).__name__)
        assert peer.cursor <= cursor
        return

    event("reset" if reset else "accepted")
    assert type(reset) is bool
    expected = cursor
    if instance is not None and instance != hello_frame.get("instance"):
        expected = 0  # a replaced log is read from its start
    after = hello_frame.get("after")
    if hello_frame.get("rewound") is True and type(after) is int and after < expected:
        expected = after  # a log that went back is read from where it matches
    assert peer.cursor == expected
    assert reset or peer.cursor == cursor
    assert peer.epoch is None or replication.BOOT_PATTERN.fullmatch(peer.epoch)
    assert type(peer.node) is str
    assert replication.ORIGIN_PATTERN.fullmatch(peer.node)
    assert type(peer.instance) is str
    assert type(peer.head) is int
    assert all(type(name) is str for name in peer.types)


@st.composite
def pulled_streams(draw: st.DrawFn) -> tuple[bytes, int]:
    """Draw a stream as a peer sends it, damaged in up to three places, and
    the cursor that the puller requested."""
    cursor = draw(st.integers(0, 3))
    if draw(st.integers(0, 4)):
        hello_frame = {**draw(st.fixed_dictionaries(HELLO_FIELDS)), "after": cursor}
    else:
        hello_frame = draw(hellos())
        if hello_frame.get("after") == "CURSOR":
            hello_frame["after"] = cursor
    parts = [encode_frame(hello_frame)]
    seq = cursor
    for _ in range(draw(st.integers(1, 4))):
        roll = draw(st.integers(0, 5))
        if roll < 4:
            frame_entries = []
            for _ in range(draw(st.integers(1, 3))):
                seq += draw(st.integers(-1, 4)) if draw(st.integers(0, 4)) == 0 else 1
                frame_entries.append(
                    [seq, draw(VALID_RECORDS if draw(st.integers(0, 3)) else records())]
                )
            body: dict[str, Any] = {
                "t": frames.COMMANDS,
                "entries": frame_entries,
                "head": seq,
            }
        elif roll == 4:
            body = {"t": frames.HEARTBEAT, "head": draw(VALUES)}
        else:
            body = draw(FRAME_BODIES)
        parts.append(encode_frame(body))
    stream = bytearray(b"".join(parts))
    for _ in range(max(0, draw(st.integers(-6, 3)))):
        at = draw(st.integers(0, len(stream) - 1))
        stream[at] = draw(st.integers(0, 255))
    if draw(st.integers(0, 3)) == 0:
        del stream[draw(st.integers(1, len(stream) - 1)) :]
    return bytes(stream), cursor


def read_like_puller(stream: bytes, cuts: list[int], cursor: int) -> int:
    """Decode `stream` as the puller does and return the last sequence accepted.

    Raises only FrameError, StreamTruncated, VersionMismatch or
    DuplicateNodeId.
    """
    reader = FrameReader(frame_bytes_max=FRAME_BYTES_MAX)
    peer = PeerState(PEER_URL, cursor=cursor)
    received_seq = cursor
    hello_seen = False
    bounds = [0, *sorted(cut for cut in cuts if 0 < cut < len(stream)), len(stream)]
    for start, end in itertools.pairwise(bounds):
        for frame in reader.feed(stream[start:end]):
            if not hello_seen:
                replication.accept_hello(
                    peer, frame, self_node=SELF_NODE, self_boot=SELF_BOOT
                )
                received_seq = peer.cursor
                hello_seen = True
            elif frame["t"] == frames.COMMANDS:
                parsed = replication.parse_entries(frame, after_seq=received_seq)
                for _seq, command in parsed:
                    assert_well_formed(command)
                if parsed:
                    event("parsed a commands frame")
                    assert parsed[0][0] > received_seq
                    received_seq = parsed[-1][0]
            elif frame["t"] != frames.HEARTBEAT:
                raise FrameError(f"unknown replication frame kind {frame['t']!r}")
    reader.close()
    return received_seq


@pytest.mark.slow
@given(pulled=pulled_streams(), data=st.data())
@settings(max_examples=1000, **SETTINGS)  # type: ignore[arg-type]
def test_puller_decoding_thorough(
    pulled: tuple[bytes, int], data: st.DataObject
) -> None:
    """Damaged peer streams, read the way a puller reads them, end in a
    decoder error or in well-formed commands after the cursor."""
    stream, cursor = pulled
    cuts = data.draw(cut_points(len(stream)))

    try:
        last_seq = read_like_puller(stream, cuts, cursor)
    except (FrameError, StreamTruncated, VersionMismatch, DuplicateNodeId) as exc:
        event(f"ended by {type(exc).__name__}")
        return

    event("accepted commands" if last_seq > cursor else "accepted no command")
    assert last_seq >= cursor


# A real node pulling from a scripted peer.

Entry = tuple[int, list[Any]]


def record(seq: int, type_name: str = "ledger.open", **payload: Any) -> list[Any]:
    """Return the record of the command with ID `c<seq>`."""
    body = payload or {"account": f"acct{seq}", "currency": "EUR"}
    return [f"c{seq}", type_name, body, STAMP * seq, FAKE_NODE]


def entries(seqs: list[int]) -> list[Entry]:
    return [(seq, record(seq)) for seq in seqs]


def raw_commands_frame(frame_entries: Any, head: int) -> bytes:
    """Return a commands frame with `frame_entries` exactly as given."""
    return encode_frame({"t": frames.COMMANDS, "entries": frame_entries, "head": head})


@dataclass(frozen=True, slots=True)
class PullScenario:
    """A peer's script: hello, frames of well-formed commands, then a tail.

    `ending` is what the tail must do to the puller: "stop" it for good (a
    frame it cannot use), make it "retry" (a stream cut inside a frame), or
    nothing, so the stream stays "open". `later` are well-formed commands
    sent after the tail, which the node must never store.
    """

    name: str
    prefix: list[list[Entry]]
    tail: bytes = b""
    ending: str = "open"
    later: list[Entry] = field(default_factory=list)

    @property
    def stored(self) -> list[Entry]:
        return [entry for frame in self.prefix for entry in frame]

    @property
    def last_seq(self) -> int:
        return self.stored[-1][0] if self.stored else 0

    @property
    def absent_ids(self) -> list[str]:
        """IDs the node must not store: `later` and what a tail may carry."""
        seqs = range(self.last_seq + 1, self.last_seq + 4)
        return [fields[0] for _seq, fields in self.later] + [f"c{seq}" for seq in seqs]

    def script(self) -> bytes:
        head = self.last_seq + 10
        parts = [hello(head=head)]
        parts += [commands(frame, head=head) for frame in self.prefix]
        parts.append(self.tail)
        if self.later:
            parts.append(commands(self.later, head=head))
        return b"".join(parts)


@dataclass
class PullResult:
    """What a node showed while it pulled a scenario's script."""

    cursors: list[int]
    """Every cursor /status reported for the peer, in order."""
    peer: dict[str, Any]
    requests: list[dict[str, str]]
    commands: int
    found: dict[str, int]
    """Status of GET /commands/{id} for every ID of the scenario."""
    outcomes: dict[str, dict[str, Any]]
    """Outcome of every command of the scenario that the node stored."""
    health: int
    log: str
    stored_cursor: int
    """The peer's cursor in the node's LMDB store after the node stopped."""


async def node_status(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with session.get(url + "/status") as response:
        assert response.status == 200
        status: dict[str, Any] = await response.json()
        return status


def is_settled(
    scenario: PullScenario, peer_state: dict[str, Any], requests: int
) -> bool:
    """Return True once the puller has met the tail, or has clearly failed."""
    if scenario.ending == "stop":
        return peer_state["error"] is not None
    if scenario.ending == "retry":
        return requests >= 2
    dropped = peer_state["node"] is not None and not peer_state["connected"]
    return peer_state["cursor"] == scenario.last_seq or dropped


async def pull(scenario: PullScenario, data_dir: Path) -> PullResult:
    """Run one node against a fake peer serving the scenario, and watch it."""
    hold_open = scenario.ending != "retry"
    peer = await FakePeer(scenario.script(), hold_open=hold_open).start()
    node = NodeProcess(data_dir, peers=(peer.url,))
    cursors: list[int] = []
    try:
        node.start()
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            deadline = time.monotonic() + SETTLE_TIMEOUT_S
            while time.monotonic() < deadline:
                state = (await node_status(session, node.url))["peers"][0]
                cursors.append(state["cursor"])
                if is_settled(scenario, state, len(peer.requests)):
                    break
                await asyncio.sleep(0.02)
            watch_until = time.monotonic() + OBSERVE_S
            while time.monotonic() < watch_until:
                status = await node_status(session, node.url)
                cursors.append(status["peers"][0]["cursor"])
                await asyncio.sleep(0.05)
            found, outcomes = {}, {}
            ids = [fields[0] for _seq, fields in scenario.stored] + scenario.absent_ids
            for command_id in ids:
                async with session.get(f"{node.url}/commands/{command_id}") as response:
                    found[command_id] = response.status
                    if response.status == 200:
                        outcomes[command_id] = (await response.json())["outcome"]
            async with session.get(node.url + "/healthz") as response:
                health = response.status
    finally:
        if node.is_running():
            node.kill()
        await peer.stop()

    store = Store(data_dir, list(example_app.domains), readonly=True)
    try:
        with store.read() as txn:
            stored_cursor = int(txn.peers()[peer.url]["cursor"])
    finally:
        store.close()
    return PullResult(
        cursors=cursors,
        peer=status["peers"][0],
        requests=list(peer.requests),
        commands=status["commands"],
        found=found,
        outcomes=outcomes,
        health=health,
        log=node.log_text(),
        stored_cursor=stored_cursor,
    )


def check_pull(scenario: PullScenario, result: PullResult) -> None:
    """Check storage, cursors, health and how the puller ended."""
    assert result.health == 200
    for _seq, fields in scenario.stored:
        assert result.found[fields[0]] == 200, result.found
    for command_id in scenario.absent_ids:
        assert result.found[command_id] == 404, result.found
    assert result.commands == len(scenario.stored), result.found
    assert max(result.cursors) <= scenario.last_seq, result.cursors
    assert result.peer["cursor"] == scenario.last_seq, result.peer
    assert result.stored_cursor == scenario.last_seq
    assert result.requests[0]["after"] == "0"

    if scenario.ending == "stop":
        assert result.peer["error"], result.peer
        assert len(result.requests) == 1, result.requests
        assert "puller_stopped" in result.log
    elif scenario.ending == "retry":
        assert len(result.requests) >= 2, result.requests
        assert result.requests[1]["after"] == str(scenario.last_seq)
    else:
        assert result.peer["error"] is None, result.peer
        assert result.peer["connected"], result.peer
        assert len(result.requests) == 1, result.requests


def run_pull(scenario: PullScenario, data_dir: Path) -> PullResult:
    return asyncio.run(pull(scenario, data_dir))


def bad_record_frame(first_seq: int, bad: list[Any]) -> bytes:
    """A commands frame with a good entry, then an entry with a bad record."""
    frame_entries = [
        [first_seq, codec.pack(record(first_seq))],
        [first_seq + 1, codec.pack(bad)],
    ]
    return raw_commands_frame(frame_entries, head=first_seq + 10)


def fixed_scenarios() -> list[PullScenario]:
    prefix = [entries([1, 2]), entries([3])]
    good_next = commands(entries([4]), head=13)
    flipped = good_next[:4] + bytes([good_next[4] ^ 0x01]) + good_next[5:]
    oversized = struct.pack(">II", FRAME_BYTES_MAX + 1, 0) + b"\x00" * 1024
    bad_stamp = ["c5", "ledger.open", {}, 0, FAKE_NODE]
    return [
        PullScenario("oversized", prefix, oversized, "stop"),
        PullScenario("checksum", prefix, flipped, "stop", entries([5])),
        PullScenario("bad-record", prefix, bad_record_frame(4, bad_stamp), "stop"),
        PullScenario("truncated", prefix, good_next[: len(good_next) // 2], "retry"),
    ]


@pytest.mark.parametrize("scenario", fixed_scenarios(), ids=lambda case: case.name)
def test_pull_bad_tail(scenario: PullScenario, tmp_path: Path) -> None:
    """After a valid prefix, a bad frame leaves exactly the prefix stored."""
    result = run_pull(scenario, tmp_path / "node")

    check_pull(scenario, result)


# Generated scenarios for the slow suite.

PACKABLE_INTS = st.integers(codec.INT_MIN, codec.INT_MAX)
"""Integers msgpack can encode: a wider one would fail in the test's own
`codec.pack`, not in the node."""

BAD_RECORD_FIELDS = [
    st.sampled_from(["", "has space", "x" * 321, "caf\u00e9"]) | PACKABLE_INTS,
    st.sampled_from(["", "t" * 256]) | PACKABLE_INTS | st.none(),
    PACKABLE_INTS | st.text(max_size=4) | st.lists(PACKABLE_INTS, max_size=2),
    st.integers(-(2**63), 0)
    | st.integers(2**63, 2**64 - 1)
    | st.floats()
    | st.booleans(),
    st.sampled_from(["", "FA4E", "g1", "f" * 65]) | PACKABLE_INTS,
]


@st.composite
def bad_entries(draw: st.DrawFn, first_seq: int) -> Any:
    """Draw the entries of a commands frame in which one entry is invalid."""
    good = [[first_seq, codec.pack(record(first_seq))]]
    kind = draw(st.sampled_from(["record", "seq", "not-bytes", "not-pair", "not-list"]))
    if kind == "record":
        fields = record(first_seq + 1)
        index = draw(st.integers(0, 4))
        fields[index] = draw(BAD_RECORD_FIELDS[index])
        bad: Any = [first_seq + 1, codec.pack(fields)]
    elif kind == "seq":
        bad_seq = draw(st.integers(-5, first_seq) | st.floats() | st.text(max_size=3))
        bad = [bad_seq, codec.pack(record(first_seq + 1))]
    elif kind == "not-bytes":
        bad = [first_seq + 1, record(first_seq + 1)]
    elif kind == "not-pair":
        bad = draw(st.lists(PACKABLE_INTS, max_size=3).filter(lambda v: len(v) != 2))
    else:
        return draw(VALUES.filter(lambda value: type(value) is not list))
    return [*good, bad]


TAIL_KINDS = ["oversized", "checksum", "not-msgpack", "not-map", "kind", "entries"]


@st.composite
def bad_tails(draw: st.DrawFn, first_seq: int) -> tuple[bytes, str]:
    """Draw a tail after a prefix that ends at `first_seq - 1`, and its ending."""
    head = first_seq + 10
    good = commands(entries([first_seq, first_seq + 1]), head=head)
    body = good[8:]
    kind = draw(st.sampled_from([*TAIL_KINDS, "cut"]))
    if kind == "oversized":
        length = draw(st.integers(FRAME_BYTES_MAX + 1, 2**32 - 1))
        header = struct.pack(">II", length, draw(st.integers(0, 2**32 - 1)))
        return header + draw(st.binary(max_size=64)), "stop"
    if kind == "checksum":
        damage = draw(st.integers(1, 2**32 - 1))
        return encode_raw(body, checksum=zlib.crc32(body) ^ damage), "stop"
    if kind == "not-msgpack":
        return encode_raw(body[: draw(st.integers(0, len(body) - 1))]), "stop"
    if kind == "not-map":
        value = draw(VALUES.filter(lambda value: type(value) is not dict))
        return encode_raw(codec.pack(value)), "stop"
    if kind == "kind":
        names = st.text(max_size=8).filter(lambda text: text not in KNOWN_KINDS)
        t_value = draw(names | PACKABLE_INTS | st.none())
        return encode_raw(codec.pack({"t": t_value, "head": head})), "stop"
    if kind == "entries":
        return raw_commands_frame(draw(bad_entries(first_seq)), head), "stop"
    return good[: draw(st.integers(1, len(good) - 1))], "retry"


KNOWN_KINDS = (frames.COMMANDS, frames.HEARTBEAT)


@st.composite
def pull_scenarios(draw: st.DrawFn) -> PullScenario:
    """Draw up to three frames of good commands, a bad tail, maybe more after it."""
    prefix, seq = [], 0
    for size in draw(st.lists(st.integers(1, 3), max_size=3)):
        prefix.append(entries(list(range(seq + 1, seq + size + 1))))
        seq += size
    tail, ending = draw(bad_tails(seq + 1))
    later = entries([seq + 4]) if ending == "stop" and draw(st.booleans()) else []
    return PullScenario("generated", prefix, tail, ending, later)


@pytest.mark.slow
@pytest.mark.timeout(600)
@given(scenario=pull_scenarios())
@settings(max_examples=25, **SETTINGS)  # type: ignore[arg-type]
def test_pull_generated_tails(
    scenario: PullScenario, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Generated prefixes and bad tails get the same checks as the fixed cases."""
    note(f"scenario: {scenario!r}")
    result = run_pull(scenario, tmp_path_factory.mktemp("pull") / "node")

    check_pull(scenario, result)


# Well-formed peer records whose fold fails. Type validation runs only on the
# node that accepts a command from a client, so a peer can send payloads that
# no client could.

UNFOLDABLE = [
    PullScenario(
        "state-key-over-lmdb-limit",
        [[(1, record(1, account="a" * 600, currency="EUR"))]],
    ),
    PullScenario(
        "balance-below-int64",
        [
            [
                (1, record(1)),
                (2, record(2, "ledger.deposit", account="acct1", amount=-(2**63))),
                (3, record(3, "ledger.deposit", account="acct1", amount=-1)),
            ]
        ],
    ),
]


@pytest.mark.parametrize("scenario", UNFOLDABLE, ids=lambda case: case.name)
def test_pull_unfoldable_payload(scenario: PullScenario, tmp_path: Path) -> None:
    """Records whose fold fails are stored, the failing one as rejected, and
    the puller keeps its stream open."""
    result = run_pull(scenario, tmp_path / "node")

    check_pull(scenario, result)
    last_id = scenario.stored[-1][1][0]
    assert result.outcomes[last_id]["status"] == "rejected"
    assert result.outcomes[last_id]["reason"] == "handler_failed"
