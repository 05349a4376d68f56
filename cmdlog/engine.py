"""The engine: every decision a node makes about its log, inside one transaction.

The engine accepts client submissions (deduplicate, stamp, append, fold),
ingests commands from peers (deduplicate, settle which copy of an ID wins,
hold back what cannot be folded yet) and keeps the fold in canonical order
by rewinding when a command arrives that sorts before folded ones. It knows
nothing of sockets, threads or the real clock: a caller passes a store
transaction and the engine holds an injected `HybridClock`, so a simulation
can drive several engines in one process.

Invariants, which hold after every transaction:

- every ID in `ids` names exactly one copy, the one that sorts first in
  canonical order among the copies this node has seen;
- that copy's order key is in `folded` (state includes its effect) or in
  `pending` (it cannot be folded yet), never both;
- `folded`, read in key order, is exactly the fold that produced the state;
- `undo` holds records for the newest `min(horizon, len(folded))` folded
  commands and no others;
- the digests in `meta` equal the digests computed from scratch.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import orjson
import structlog

from cmdlog import codec, fold
from cmdlog.app import App
from cmdlog.config import StoreConfig
from cmdlog.errors import DataError, KeyReused, MalformedBody, UnknownCommandType
from cmdlog.fold import StateOverlay
from cmdlog.hlc import HybridClock
from cmdlog.model import PENDING, Command, Outcome, order_key, split_order_key
from cmdlog.store import Txn

log = structlog.get_logger(__name__)

UNKNOWN_TYPE = "unknown_type"
CLOCK_SKEW = "clock_skew"
REFOLD_CHUNK_COMMANDS = 10_000


class Submission(NamedTuple):
    """A validated client write, ready to be stamped and appended."""

    id: str
    type: str
    payload: dict[str, Any]
    fingerprint: bytes


class Accepted(NamedTuple):
    """The result of one submission: the stored command and its outcome now."""

    command: Command
    outcome: Outcome
    created: bool


@dataclass(slots=True)
class IngestReport:
    """Counts of what one batch of peer commands did to the log."""

    stored: int = 0
    duplicates: int = 0
    replaced: int = 0
    conflicts: list[str] = field(default_factory=list)
    held: int = 0


@dataclass(frozen=True, slots=True)
class Status:
    """Counts and digests of the log and the fold."""

    commands: int
    applied: int
    pending: int
    log_entries: int
    state_digest: str
    log_digest: str
    pending_types: dict[str, int]
    conflicts: int


class _Entry(NamedTuple):
    """A command on its way into the fold: order key, log position, command."""

    key: bytes
    seq: int
    command: Command


def _order_of(entry: _Entry) -> bytes:
    return entry.key


class _Batch:
    """Working state of one write transaction."""

    def __init__(
        self, txn: Txn, clock: HybridClock, state_hashes: fold.StateItemHashes
    ) -> None:
        self.txn = txn
        self.state_hashes = state_hashes
        self.horizon: int = max(clock.horizon(), txn.meta_get("horizon", 0))
        """The skew horizon every hold decision of this transaction uses: read
        once, when it began, and never below the last one recorded, so a wall
        clock that steps back cannot fold less than before."""
        self.overlay = StateOverlay(txn.state_get)
        self.state_digest = fold.digest_from_bytes(txn.meta_get("state_digest"))
        self.log_digest = fold.digest_from_bytes(txn.meta_get("log_digest"))
        self.last_seq = txn.log_last_seq()
        self.ids: dict[str, list[Any] | None] = {}
        self.catalogued: set[str] = set()
        self.outcomes: dict[str, Outcome] = {}
        """Outcomes set in this batch, by command ID, so results need no read."""

    def id_get(self, command_id: str) -> list[Any] | None:
        """Return `[seq, fingerprint, stamp, origin]` of the ID's folded copy."""
        if command_id not in self.ids:
            seq = self.txn.id_get(command_id)
            entry = None
            if seq is not None:
                command = command_at(self.txn, seq, command_id)
                fingerprint = codec.fingerprint(command.type, command.payload)
                entry = [seq, fingerprint, command.stamp, command.origin]
            self.ids[command_id] = entry
        return self.ids[command_id]

    def id_put(self, command: Command, seq: int, fingerprint: bytes) -> None:
        """Point the ID at log entry `seq`, whatever it pointed at before."""
        self.txn.id_put(command.id, seq)
        self.ids[command.id] = [seq, fingerprint, command.stamp, command.origin]

    def claim(self, command: Command, fingerprint: bytes) -> int | None:
        """Append `command` and give it its ID, unless the ID is taken.

        Returns the new log sequence number, or None when the ID is stored.
        """
        if self.id_get(command.id) is not None:  # read once per transaction
            return None
        seq = self.last_seq + 1
        self.id_put(command, seq, fingerprint)
        self.append(command)
        return seq

    def append(self, command: Command) -> int:
        self.last_seq += 1
        self.txn.log_append(self.last_seq, command)
        return self.last_seq

    def flush_state(self) -> None:
        hashes = self.state_hashes
        for domain, key, base, current in self.overlay.changes():
            if base is not None:
                self.state_digest -= hashes.take(domain, key, base)
            if current is not None:
                self.state_digest += hashes.put(domain, key, current)
            self.txn.state_put(domain, key, current, stored=base is not None)
        self.overlay = StateOverlay(self.txn.state_get)

    def finish(self, clock: HybridClock) -> None:
        self.flush_state()
        self.txn.meta_put("state_digest", fold.digest_to_bytes(self.state_digest))
        self.txn.meta_put("log_digest", fold.digest_to_bytes(self.log_digest))
        self.txn.meta_put("clock", clock.last)
        # Replay judges clock-skew holds by this horizon, as the node did:
        # every command held now has a stamp beyond it (see Engine._finish).
        self.txn.meta_put("horizon", self.horizon)
        self.txn.meta_put("wall_ms", clock.wall_ms())


class Engine:
    """A node's log logic, run by one writer inside store transactions."""

    def __init__(
        self,
        app: App,
        clock: HybridClock,
        node_id: str,
        config: StoreConfig | None = None,
        *,
        fingerprints: dict[str, str] | None = None,
        catalogued: set[str] | None = None,
    ) -> None:
        self.app = app
        self.clock = clock
        self.node_id = node_id
        self.config = config or StoreConfig()
        self.fingerprints = fingerprints or {}
        """Handler fingerprint per type, recorded when a type is first folded."""
        self.catalogued = catalogued or set()
        """Types whose fingerprint was recorded in an earlier transaction."""
        self.state_hashes = fold.StateItemHashes()
        self.rewinds = 0
        """Rewinds that undid folded commands, not counting full re-folds."""
        self.full_refolds = 0
        """Full re-folds, started when a rewind would pass the undo horizon."""
        self._skew_held_from: int | None = None
        """The smallest stamp held for clock skew, None when none is; kept by
        `_route` and `_release_ready`, which `release_pending` runs at open."""

    # client writes

    def submit(
        self, txn: Txn, submissions: Iterable[Submission]
    ) -> list[Accepted | KeyReused]:
        """Append the new submissions, fold them, and report every one.

        A submission whose ID is stored with the same fingerprint is a retry,
        so it reports the stored command. One with another fingerprint gets a
        `KeyReused` error in its place in the list.
        """
        batch = _Batch(txn, self.clock, self.state_hashes)
        results: list[Accepted | KeyReused | str] = []
        fresh: list[_Entry] = []
        items = submissions if isinstance(submissions, list) else list(submissions)
        # A retry costs a stamp here, which no order depends on.
        stamps = self.clock.stamps(len(items))
        for submission, stamp in zip(items, stamps, strict=True):
            command = Command(
                submission.id,
                submission.type,
                submission.payload,
                stamp,
                self.node_id,
            )
            seq = batch.claim(command, submission.fingerprint)
            if seq is not None:
                batch.log_digest += fold.log_item_hash(
                    command.id, submission.fingerprint
                )
                fresh.append(_Entry(command.order_key, seq, command))
                results.append(submission.id)
                continue
            existing = batch.id_get(submission.id)
            assert existing is not None, f"ID {submission.id} is taken but not stored"
            if existing[1] == submission.fingerprint:
                results.append(submission.id)
            else:
                results.append(self._key_reused(batch, submission))

        created = {entry.command.id: entry.command for entry in fresh}
        self._fold_in(batch, fresh, removed=())
        self._finish(batch)

        answers: list[Accepted | KeyReused] = []
        for item in results:
            if isinstance(item, KeyReused):
                answers.append(item)
            elif item in created:
                command = created.pop(item)
                answers.append(Accepted(command, batch.outcomes[item], created=True))
            else:
                assert isinstance(item, str)
                viewed = self.view(txn, item)
                assert viewed is not None, f"command {item} vanished in its batch"
                answers.append(Accepted(viewed[0], viewed[1], created=False))
        return answers

    def _key_reused(self, batch: _Batch, submission: Submission) -> KeyReused:
        # The error path reads the log entry a second time, after `id_get`,
        # which keeps the hot path free of a cache of stored commands.
        entry = batch.id_get(submission.id)
        assert entry is not None, f"ID {submission.id} is taken but not stored"
        stored = command_at(batch.txn, entry[0], submission.id)
        stored_payload = orjson.dumps(
            stored.payload, option=orjson.OPT_SORT_KEYS
        ).decode()
        command_type = self.app.types.get(submission.type)
        if (
            command_type is not None
            and command_type.natural_id(submission.payload) == submission.id
        ):
            # The ID came from the payload, not from the client's key, so a
            # new key cannot help; new values of the natural key can.
            fields = ", ".join(command_type.natural_key)
            return KeyReused(
                f"a {stored.type} command with the same {fields} is already "
                f"stored with a different payload (stored payload: {stored_payload}); "
                "a new key does not change that: if this is another transaction, "
                f"send it with other values of {fields}"
            )
        return KeyReused(
            f"the key {submission.id!r} is already used by a {stored.type} "
            f"command with a different payload (stored payload: {stored_payload}); "
            "send this command under a new key"
        )

    # peer commands

    def ingest(
        self,
        txn: Txn,
        commands: Iterable[Command],
        *,
        source: tuple[str, str] | None = None,
    ) -> IngestReport:
        """Store and fold commands received from peers.

        Each ID keeps the copy that sorts first in canonical order. A later
        copy with the same fingerprint is dropped; one with another
        fingerprint is recorded as a conflict. A command whose type is
        unknown here, or whose stamp is beyond the skew horizon, is stored
        and held pending. With a `source` (the peer's node ID and boot), the
        copies stored are recorded as received from that process.
        """
        batch = _Batch(txn, self.clock, self.state_hashes)
        report = IngestReport()
        fresh: list[_Entry] = []
        removed: list[bytes] = []
        first_seq = batch.last_seq + 1
        for command in commands:
            self._ingest_one(batch, command, report, fresh, removed)
        if source is not None and batch.last_seq >= first_seq:
            txn.source_put(first_seq, batch.last_seq, *source)
        if fresh or removed:
            self._fold_in(batch, fresh, removed=removed)
        self._finish(batch)
        return report

    def _ingest_one(
        self,
        batch: _Batch,
        command: Command,
        report: IngestReport,
        fresh: list[_Entry],
        removed: list[bytes],
    ) -> None:
        key = command.order_key
        fingerprint = codec.fingerprint(command.type, command.payload)
        seq = batch.claim(command, fingerprint)
        if seq is not None:
            batch.log_digest += fold.log_item_hash(command.id, fingerprint)
            report.stored += 1
            self._route(batch, _Entry(key, seq, command), report, fresh)
            return

        existing = batch.id_get(command.id)
        assert existing is not None, f"ID {command.id} is taken but not stored"
        existing_seq, existing_fp, existing_stamp, existing_origin = existing
        existing_key = order_key(existing_stamp, existing_origin, command.id)
        if fingerprint == existing_fp and key >= existing_key:
            report.duplicates += 1
            return
        if batch.txn.superseded_has(command.id, key, fingerprint):
            # This copy lost before and was forwarded then; storing it again
            # would send it round the cluster forever.
            report.duplicates += 1
            return
        if fingerprint != existing_fp:
            report.conflicts.append(command.id)
        # The copy that sorts first keeps the ID. Two copies with one order key
        # can only come from a faulty origin. The smaller fingerprint wins
        # then, so every node still picks the same one.
        if (key, fingerprint) > (existing_key, existing_fp):
            seq = batch.append(command)
            batch.txn.conflict_put(command.id, key, seq, fingerprint)
            batch.txn.superseded_put(command.id, key, fingerprint)
            log.warning("command_conflicted", command_id=command.id, kept="stored")
            return

        seq = batch.append(command)
        batch.id_put(command, seq, fingerprint)
        batch.txn.superseded_put(command.id, existing_key, existing_fp)
        if fingerprint != existing_fp:
            batch.txn.conflict_put(command.id, existing_key, existing_seq, existing_fp)
            batch.log_digest += fold.log_item_hash(command.id, fingerprint)
            batch.log_digest -= fold.log_item_hash(command.id, existing_fp)
            log.warning("command_conflicted", command_id=command.id, kept="arrived")
        report.replaced += 1
        if batch.txn.pending_get(existing_key) is not None:
            batch.txn.pending_delete(existing_key)
        elif any(entry.key == existing_key for entry in fresh):
            fresh[:] = [entry for entry in fresh if entry.key != existing_key]
        else:
            removed.append(existing_key)
        self._route(batch, _Entry(key, seq, command), report, fresh)

    def _route(
        self,
        batch: _Batch,
        entry: _Entry,
        report: IngestReport,
        fresh: list[_Entry],
    ) -> None:
        """Send a newly stored copy to the fold, or hold it pending."""
        reason = self._hold_reason(entry.command, batch.horizon)
        if reason is None:
            self.clock.observe(entry.command.stamp, horizon=batch.horizon)
            fresh.append(entry)
        else:
            batch.txn.pending_put(entry.key, entry.seq, reason)
            report.held += 1
            if reason == CLOCK_SKEW:
                stamp = entry.command.stamp
                if self._skew_held_from is None or stamp < self._skew_held_from:
                    self._skew_held_from = stamp

    def _hold_reason(self, command: Command, horizon: int) -> str | None:
        if command.type not in self.app.types:
            return UNKNOWN_TYPE
        if command.stamp > horizon:
            return CLOCK_SKEW
        return None

    def release_pending(self, txn: Txn) -> int:
        """Fold held commands that can be folded now; return how many."""
        batch = _Batch(txn, self.clock, self.state_hashes)
        released = self._release_ready(batch)
        self._finish(batch)
        return released

    def _release_ready(self, batch: _Batch) -> int:
        """Fold the held commands that `batch` may fold; return how many."""
        txn = batch.txn
        ready: list[_Entry] = []
        self._skew_held_from = None
        for key, (seq, _reason) in list(txn.pending_iter()):
            command = Command.from_record(txn.log_get(seq))
            hold = self._hold_reason(command, batch.horizon)
            if hold is None:
                txn.pending_delete(key)
                self.clock.observe(command.stamp, horizon=batch.horizon)
                ready.append(_Entry(key, seq, command))
            elif hold == CLOCK_SKEW and (
                self._skew_held_from is None or command.stamp < self._skew_held_from
            ):
                self._skew_held_from = command.stamp
        if ready:
            log.info("pending_released", count=len(ready))
            self._fold_in(batch, ready, removed=())
        return len(ready)

    # the fold

    def _fold_in(
        self, batch: _Batch, fresh: list[_Entry], *, removed: Iterable[bytes]
    ) -> None:
        """Fold `fresh` and take `removed` out, keeping canonical order."""
        fresh.sort(key=_order_of)
        removed = sorted(removed)
        last = batch.txn.folded_last_key()
        starts = [entry.key for entry in fresh[:1]] + removed[:1]
        if not starts:
            return
        start = min(starts)
        if last is None or start > last:
            self._apply_all(batch, fresh)
            return
        self._rewind(batch, start, fresh, set(removed))

    def _rewind(
        self, batch: _Batch, start: bytes, fresh: list[_Entry], removed: set[bytes]
    ) -> None:
        """Undo folded commands from `start` on, then fold them again with the
        changes, in order."""
        txn = batch.txn
        horizon = min(self.config.undo_horizon_commands, txn.count("undo"))
        later: list[tuple[bytes, int]] = []
        for key, seq, _outcome in txn.folded_from(start):
            later.append((key, seq))
            if len(later) > horizon:
                self._full_refold(batch, fresh, removed)
                return

        for key, _seq in reversed(later):
            undo = txn.undo_pop(key)
            assert undo is not None, "an undo record inside the horizon is missing"
            fold.revert(batch.overlay, undo)
            self._forget_outcome(batch, key)
            txn.folded_delete(key)
        if later:
            self.rewinds += 1
            log.debug("fold_rewound", commands=len(later))

        replay = [
            _Entry(key, seq, self._command_at_seq(txn, seq))
            for key, seq in later
            if key not in removed
        ]
        self._apply_all(batch, sorted(replay + fresh, key=_order_of))

    def _full_refold(
        self, batch: _Batch, fresh: list[_Entry], removed: set[bytes]
    ) -> None:
        """Rebuild the whole fold from the folded index: the slow path for an
        arrival older than the undo horizon."""
        txn = batch.txn
        total = txn.count("folded") + len(fresh) - len(removed)
        self.full_refolds += 1
        log.warning(
            "full_refold_started",
            commands=total,
            undo_horizon_commands=self.config.undo_horizon_commands,
        )
        txn.state_drop_all()
        txn.undo_drop_all()
        batch.overlay = StateOverlay(txn.state_get)
        batch.state_digest = 0

        for key in removed:
            txn.folded_delete(key)
        keep_undo_from = total - self.config.undo_horizon_commands
        pending_fresh = iter(sorted(fresh, key=lambda entry: entry.key))
        next_fresh = next(pending_fresh, None)
        position = 0
        # The digest restarts from zero, so old outcomes are not subtracted.
        for key, seq, _outcome in self._folded_in_chunks(txn):
            while next_fresh is not None and next_fresh.key < key:
                self._apply_all(
                    batch, [next_fresh], keep_undo=position >= keep_undo_from
                )
                position += 1
                next_fresh = next(pending_fresh, None)
            current = _Entry(key, seq, self._command_at_seq(txn, seq))
            self._apply_all(batch, [current], keep_undo=position >= keep_undo_from)
            position += 1
            if position % REFOLD_CHUNK_COMMANDS == 0:
                batch.flush_state()
        while next_fresh is not None:
            self._apply_all(batch, [next_fresh], keep_undo=position >= keep_undo_from)
            position += 1
            next_fresh = next(pending_fresh, None)
        log.warning("full_refold_completed", commands=position)

    def _folded_in_chunks(self, txn: Txn) -> Iterator[tuple[bytes, int, bytes]]:
        """Iterate `folded` in order while the caller rewrites it, a chunk of
        keys at a time, so no cursor is open across writes."""
        after = b""
        while True:
            chunk = []
            for key, seq, outcome in txn.folded_from(after):
                if key == after:
                    continue
                chunk.append((key, seq, outcome))
                if len(chunk) >= REFOLD_CHUNK_COMMANDS:
                    break
            if not chunk:
                return
            yield from chunk
            after = chunk[-1][0]

    def _apply_all(
        self, batch: _Batch, entries: list[_Entry], *, keep_undo: bool = True
    ) -> None:
        """Fold `entries`, none of them in `folded`, in the order given, and
        record each one's outcome and, with `keep_undo`, its undo record.

        The lookups are hoisted out of the loop, because it runs for every
        command a node takes.
        """
        app, overlay, outcomes, txn = self.app, batch.overlay, batch.outcomes, batch.txn
        apply_command, pack, outcome_hash = (
            fold.apply_command,
            fold.pack_outcome,
            fold.outcome_item_hash,
        )
        known = self.catalogued | batch.catalogued
        digest = batch.state_digest
        for key, seq, command in entries:
            if command.type not in known:
                self._record_handler(txn, command.type)
                batch.catalogued.add(command.type)
                known.add(command.type)
            outcome, undo = apply_command(app, overlay, command)
            outcomes[command.id] = outcome
            packed = pack(outcome)
            digest += outcome_hash(command.id, packed)
            txn.folded_put(key, seq, packed, undo if keep_undo else None)
        batch.state_digest = digest

    def _record_handler(self, txn: Txn, type_name: str) -> None:
        fingerprint = self.fingerprints.get(type_name)
        if fingerprint is not None and txn.catalog_get(type_name) is None:
            txn.catalog_put(type_name, fingerprint)
            log.info("handler_recorded", type=type_name, fingerprint=fingerprint)

    def _forget_outcome(self, batch: _Batch, key: bytes) -> None:
        entry = batch.txn.folded_get(key)
        assert entry is not None, "a folded command has no folded entry"
        _stamp, _origin, command_id = split_order_key(key)
        batch.state_digest -= fold.outcome_item_hash(command_id, entry[1])

    def _finish(self, batch: _Batch) -> None:
        # Every commit records its horizon, and replay folds only the commands
        # within it. So no command within the horizon may stay held here.
        held_from = self._skew_held_from
        if held_from is not None and held_from <= batch.horizon:
            self._release_ready(batch)
        batch.finish(self.clock)
        batch.txn.undo_trim(self.config.undo_horizon_commands)

    # reads

    def _command_at_seq(self, txn: Txn, seq: int) -> Command:
        return Command.from_record(txn.log_get(seq))

    def view(self, txn: Txn, command_id: str) -> tuple[Command, Outcome] | None:
        """Return the stored command with this ID and its current outcome."""
        seq = txn.id_get(command_id)
        if seq is None:
            return None
        command = command_at(txn, seq, command_id)
        key = command.order_key
        folded = txn.folded_get(key)
        if folded is not None:
            return command, fold.unpack_outcome(folded[1])
        pending = txn.pending_get(key)
        assert pending is not None, f"command {command_id} is neither folded nor held"
        return command, Outcome(PENDING, None, pending[1])

    def status(self, txn: Txn) -> Status:
        """Return counts and digests as of this transaction."""
        pending_types: dict[str, int] = {}
        for _key, (seq, _reason) in txn.pending_iter():
            type_name = txn.log_get(seq)[1]
            pending_types[type_name] = pending_types.get(type_name, 0) + 1
        return Status(
            commands=txn.command_count(),
            applied=txn.count("folded"),
            pending=txn.count("pending"),
            log_entries=txn.log_last_seq(),
            state_digest=txn.meta_get("state_digest", bytes(32)).hex(),
            log_digest=txn.meta_get("log_digest", bytes(32)).hex(),
            pending_types=pending_types,
            conflicts=txn.count("conflicts"),
        )


def command_at(txn: Txn, seq: int, command_id: str) -> Command:
    """Return the command at log entry `seq`, which the ID index gave for
    `command_id`; raise `DataError` if the entry contains another ID."""
    command = Command.from_record(txn.log_get(seq))
    if command.id != command_id:
        raise DataError(
            f"the ID index points {command_id!r} at log entry {seq}, which "
            f"contains {command.id!r}, so the store is damaged; replay its log "
            "into a new directory"
        )
    return command


def prepare_submission(
    app: App, key: str, type_name: Any, payload: Any, *, payload_checked: bool = False
) -> Submission:
    """Validate a client's command and return it ready for the writer.

    `key` is the already-checked Idempotency-Key. Raises `MalformedBody` for
    a type or payload of the wrong shape, `UnknownCommandType`, and the
    type's own `ValidationError`. The command ID is the key, unless the
    payload carries the type's natural key, which then names the command.
    `payload_checked` skips `codec.check_value` for a payload that was
    checked as part of its request body already.
    """
    if type(type_name) is not str or not type_name:
        raise MalformedBody(
            "field 'type' must be a non-empty string naming a command type, "
            f"for example {app.type_names()[0]!r}"
            if app.types
            else "field 'type' must be a non-empty string"
        )
    if type(payload) is not dict:
        raise MalformedBody(
            f"field 'payload' must be a map, found {type(payload).__name__}"
        )
    if not payload_checked:
        codec.check_value(payload, "payload")
    command_type = app.types.get(type_name)
    if command_type is None:
        raise UnknownCommandType(type_name, app.type_names())
    valid = command_type.validate(payload)
    command_id = command_type.natural_id(valid) or key
    return Submission(command_id, type_name, valid, codec.fingerprint(type_name, valid))
