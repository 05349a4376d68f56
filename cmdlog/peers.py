"""The peers of a node: the pullers it runs and the streams it serves.

A node pulls from each configured or learned peer URL with one `Puller`, and
makes sure it pulls each running node once. It serves each reader node one
stream at a time, within a bounded number of stream slots. Both ends
reject two running processes with one node ID, which is what a copied data
directory started beside its original gives.
"""

from __future__ import annotations

from typing import Any

import structlog

from cmdlog import replication
from cmdlog.config import ReplicationConfig
from cmdlog.errors import DuplicateNodeId
from cmdlog.frames import FrameError
from cmdlog.peering import Puller, StreamSlot, normalize_url
from cmdlog.replication import PeerState

log = structlog.get_logger(__name__)


class Peers:
    """The pullers of one node: configured peers, and peers learned at runtime."""

    def __init__(self, node: Any, config: ReplicationConfig) -> None:
        self.node = node
        self.config = config
        self.pullers: dict[str, Puller] = {}
        self.configured: set[str] = set()
        self.stream_slots: list[StreamSlot] = []
        self.replaced_readers: dict[tuple[str, str], None] = {}
        """Reader processes, as `(node, boot)`, whose streams were ended for
        another process with the same node ID; the oldest first, at most
        `streams_max`."""

    @property
    def streams(self) -> int:
        return len(self.stream_slots)

    def take_stream_slot(
        self, reader: replication.Reader | None, *, remote: str | None = None
    ) -> StreamSlot | None:
        """Return a slot for a new stream to `reader`, or None if all are taken.

        A reader node's earlier streams are ended, because it opens a new one
        only after giving up on them (or after a restart), and the node would
        notice only at a later write. At the limit, a named reader ends the
        oldest stream of an unnamed one, since every peer's puller names its
        node.

        Raises `DuplicateNodeId` when a reader process whose streams were
        ended for another process of the same node ID comes back while that
        one still reads: a stopped process never comes back, so both run, on
        copies of one data directory.
        """
        if reader is not None:
            self._check_reader_alone(reader, remote)
            for slot in self.stream_slots:
                if slot.reader is None or slot.reader.node != reader.node:
                    continue
                if slot.reader.boot != reader.boot:
                    self._note_replaced(slot.reader)
                slot.ended.set()
        active = [slot for slot in self.stream_slots if not slot.ended.is_set()]
        if len(active) >= self.config.streams_max:
            unnamed = next((slot for slot in active if slot.reader is None), None)
            if reader is None or unnamed is None:
                return None
            unnamed.ended.set()
        slot = StreamSlot(reader, remote)
        self.stream_slots.append(slot)
        return slot

    def _check_reader_alone(
        self, reader: replication.Reader, remote: str | None
    ) -> None:
        """Raise `DuplicateNodeId` if `reader` was replaced by another process
        of its node ID that still reads."""
        if reader.names not in self.replaced_readers:
            return
        for slot in self.stream_slots:
            other = slot.reader
            if slot.ended.is_set() or other is None or other.node != reader.node:
                continue
            if other.boot == reader.boot:
                continue
            raise DuplicateNodeId(
                f"another process with node ID {reader.node} (boot {other.boot}, "
                f"from {slot.remote}) already reads the log of node "
                f"{self.node.node_id}, so it and the reader of boot {reader.boot} "
                f"(from {remote}) run on copies of one data directory. "
                f"{replication.NEW_NODE_ID_FIX}"
            )

    def _note_replaced(self, reader: replication.Reader) -> None:
        self.replaced_readers.pop(reader.names, None)
        self.replaced_readers[reader.names] = None
        while len(self.replaced_readers) > self.config.streams_max:
            del self.replaced_readers[next(iter(self.replaced_readers))]

    def release_stream_slot(self, slot: StreamSlot) -> None:
        self.stream_slots.remove(slot)

    async def start(self, configured: list[str]) -> None:
        self.configured = {normalize_url(url) for url in configured}
        with self.node.database.store.read() as txn:
            stored = txn.peers()
        for url in [*configured, *stored]:
            url = normalize_url(url)
            if url not in self.pullers:
                self._start_puller(url, stored.get(url))

    def _start_puller(self, url: str, record: dict[str, Any] | None) -> None:
        peer = PeerState.from_record(url, record)
        puller = Puller(self.node, peer, self.config)
        self.pullers[url] = puller
        puller.start()
        log.info("puller_started", peer=url, cursor=peer.cursor)

    async def check_pulled_once(self, peer: PeerState) -> None:
        """Raise if `peer`'s puller must not pull beside another puller of
        `peer.node`.

        Raises `DuplicateNodeId` if another puller reaches another process
        with the same node ID and that process still sends frames: two live
        processes with one node ID run on copies of one data directory. The
        wait for that frame, up to the read idle timeout, keeps a stream to a
        process that has just stopped, as in a restart, from counting.

        Raises `FrameError` if `peer.url` is a second URL of a node this node
        already pulls from and `peer`'s puller yields (see `pulled_elsewhere`).
        """
        waited: set[str] = set()
        for _other_count in range(len(self.pullers)):
            other = self._other_process(peer, skip=waited)
            if other is None:
                break
            waited.add(other.peer.url)
            if await other.sends_again(self.config.read_idle_timeout_s):
                raise DuplicateNodeId(
                    f"{peer.url} and {other.peer.url} both report node ID "
                    f"{peer.node}, from two processes (boot {peer.boot} and "
                    f"{other.peer.boot}), so one of them runs on a copy of the "
                    f"other's data directory. {replication.NEW_NODE_ID_FIX}. "
                    f"Until then this node pulls from {other.peer.url} only"
                )
        elsewhere = self.pulled_elsewhere(peer)
        if elsewhere is not None:
            raise FrameError(
                f"{peer.url} reaches node {peer.node}, which this node "
                f"already pulls from at {elsewhere}; remove one of the two URLs"
            )

    def _other_process(self, peer: PeerState, *, skip: set[str]) -> Puller | None:
        """Return a connected puller, not of a URL in `skip`, whose peer has
        `peer.node` as node ID but another boot, or None if there is none."""
        if peer.boot is None:
            return None
        for url, puller in self.pullers.items():
            other = puller.peer
            if url == peer.url or url in skip or not other.connected:
                continue
            if other.node == peer.node and other.boot not in (None, peer.boot):
                return puller
        return None

    def pulled_elsewhere(self, peer: PeerState) -> str | None:
        """Return the URL of another puller of `peer.node` that `peer`'s puller
        yields to, or None. A configured URL never yields; of two learned
        ones, the greater URL yields.

        A puller whose last hello came from another process of that node ID
        does not count. That process may be a copy, which `check_pulled_once`
        rejects once both run, and not the same one at another URL.
        """
        if peer.url in self.configured:
            return None
        for url, puller in self.pullers.items():
            other = puller.peer
            same_node = url != peer.url and other.node == peer.node
            other_process = None not in (other.boot, peer.boot) and (
                other.boot != peer.boot
            )
            yields = url in self.configured or url < peer.url
            if same_node and not other_process and yields:
                return url
        return None

    async def learn(self, url: str) -> None:
        """Start pulling from a peer that announced itself, and remember it,
        unless this node already learned `learned_peers_max` peers."""
        if url in self.pullers or url == self.node.advertise_url:
            return
        learned = len(self.pullers) - len(self.configured)
        if learned >= self.config.learned_peers_max:
            log.warning(
                "peer_not_learned",
                peer=url,
                learned=learned,
                hint="forget unused peers with 'cmdlog peers --forget', or add "
                "this one with --peer",
            )
            return
        record = PeerState(url).to_record()
        await self.node.writer.run(lambda txn: txn.peer_put(url, record))
        log.info("peer_learned", peer=url)
        self._start_puller(url, None)

    async def stop(self) -> None:
        for puller in self.pullers.values():
            await puller.stop()

    def states(self) -> list[PeerState]:
        return [puller.peer for puller in self.pullers.values()]
