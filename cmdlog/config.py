"""Named limits and defaults, in one place.

Every queue, batch, buffer and retry loop in cmdlog is bounded by a value
defined here, so an operator can find and change each bound by name.
"""

from __future__ import annotations

from dataclasses import dataclass

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB

FORMAT_VERSION = 3
"""Version of the on-disk layout; a node refuses a data directory of another."""


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """Bounds of the LMDB store and of the fold."""

    map_bytes_initial: int = 256 * MIB
    map_growth_factor: float = 2.0
    map_fill_ratio_max: float = 0.75
    """Grow the map before a write when more than this share of it is used."""
    map_grow_attempts_max: int = 8
    undo_horizon_commands: int = 100_000
    """Undo records kept for the most recently folded commands. An arrival that
    sorts before all of them is folded by a full re-fold instead of a rewind."""
    generation_commands: int = 65_536
    """Commands after which the ID index and the state start writing a new
    generation (see `cmdlog/generations.py`). Smaller keeps each commit's
    random writes among fewer pages. Larger makes fewer runs for a read to
    look through, and fewer merges."""
    merge_fan_in: int = 16
    """Runs of one level that a merge turns into one run of the next. A read
    of a key that is not in the newest runs looks through at most about
    this many runs per level."""
    merge_keys_per_command: int = 3
    """Keys a merge of generations may move per command a commit appends,
    twice as many while another merge waits. Each key moves once per level,
    so 3 keeps up with one level at about 1.5 keys per command (an ID and
    half a charge), and the doubling with two."""
    readers_max: int = 256
    durable: bool = True
    """Sync every commit to disk. Only tests of other things turn this off."""


@dataclass(frozen=True, slots=True)
class WriterConfig:
    """Bounds of the group-commit writer thread."""

    batch_commands_max: int = 2_000
    queue_requests_max: int = 20_000
    """Requests waiting for the writer; above this a submit is rejected (503)."""


@dataclass(frozen=True, slots=True)
class ClockConfig:
    """Bounds of the hybrid logical clock."""

    skew_ms_max: int = 60_000
    """A peer command stamped further ahead of local wall time than this is
    stored but not folded until the local clock catches up."""


@dataclass(frozen=True, slots=True)
class HttpConfig:
    """Bounds of the HTTP API."""

    body_bytes_max: int = 1 * MIB
    """Largest request body, for one command or a whole batch (413 above it).
    Commands arriving by replication are held to the same limit."""
    batch_items_max: int = 1_000
    connections_max: int = 1_024
    """Open client connections. Above this, a request closes the oldest idle
    connections, or gets 503 and closes its own when none is idle."""
    idle_timeout_s: float = 30.0
    """How long a connection may wait for its next request, or its first,
    before the node closes it, so idle connections do not hold the limit."""
    body_timeout_s: float = 30.0
    """How long a request body may stop arriving (no new bytes) before the
    request gets 408 and its connection closes, so a stalled upload does not
    hold a request slot forever."""
    requests_in_flight_max: int = 2_048
    """Requests being handled at once; above this a request gets 503."""
    shutdown_timeout_s: float = 10.0
    """How long SIGTERM waits for in-flight requests, their bodies included.
    A request still waiting for its body then gets 503, and what else is
    still running gets `shutdown_close_timeout_s` more."""
    shutdown_close_timeout_s: float = 0.5
    """How long each of the last three shutdown steps may wait. The first
    waits for the 503s sent to requests still waiting for a body, and the
    other two let aiohttp wait for requests still running, before it cancels
    them and after."""
    retry_after_s: int = 1


@dataclass(frozen=True, slots=True)
class ReplicationConfig:
    """Bounds of the replication stream and of each puller."""

    heartbeat_interval_s: float = 1.0
    """Idle time after which a stream sends a heartbeat; a reader that takes
    no bytes for two intervals is dropped."""
    frame_entries_max: int = 1_000
    frame_bytes_max: int = 4 * MIB
    """Largest frame a node sends or accepts; at least the body limit, since one
    command of the largest allowed size must fit in a frame."""
    ingest_commands_max: int = 2_000
    """Commands a puller folds in one transaction (one sorted batch)."""
    queue_frames_max: int = 4
    """Frames a puller buffers between the socket and the writer."""
    backoff_initial_s: float = 0.1
    backoff_max_s: float = 5.0
    connect_timeout_s: float = 5.0
    read_idle_timeout_s: float = 5.0
    """A stream that sends nothing, not even a heartbeat, for this long is
    treated as dead and reconnected."""
    streams_max: int = 64
    learned_peers_max: int = 64
    """Peers a node learns from announces; more announces are ignored."""
