"""The peers of a node: the pullers it runs and the streams it serves.

A node pulls from each configured or learned peer URL with one `Puller`, and
makes sure it pulls each running node once. It serves each reader node one
stream at a time, within a bounded number of stream slots.
"""

from __future__ import annotations

from typing import Any

import structlog

from cmdlog.config import ReplicationConfig
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

    @property
    def streams(self) -> int:
        return len(self.stream_slots)

    def take_stream_slot(self, reader: str | None) -> StreamSlot | None:
        """Return a slot for a new stream to `reader`, or None if all are taken.

        A reader's earlier streams are ended, because it opens a new one only
        after giving up on them, and the node would notice only at a later
        write. At the limit, a named reader ends the oldest stream of an
        unnamed one, since every peer's puller names its node.
        """
        if reader is not None:
            for slot in self.stream_slots:
                if slot.reader == reader:
                    slot.ended.set()
        active = [slot for slot in self.stream_slots if not slot.ended.is_set()]
        if len(active) >= self.config.streams_max:
            unnamed = next((slot for slot in active if slot.reader is None), None)
            if reader is None or unnamed is None:
                return None
            unnamed.ended.set()
        slot = StreamSlot(reader)
        self.stream_slots.append(slot)
        return slot

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

    def pulled_elsewhere(self, peer: PeerState) -> str | None:
        """Return the URL of another puller of `peer.node` that `peer`'s puller
        yields to, or None. A configured URL never yields; of two learned
        ones, the greater URL yields."""
        if peer.url in self.configured:
            return None
        for url, puller in self.pullers.items():
            same_node = url != peer.url and puller.peer.node == peer.node
            if same_node and (url in self.configured or url < peer.url):
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
