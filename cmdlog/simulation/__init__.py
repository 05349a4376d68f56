"""A seeded simulation of a cmdlog cluster: several nodes in one process.

Each node is a real `Database` on its own LMDB directory with a simulated
wall clock. Nodes pull each other's logs over simulated streams that run the
replication logic of the HTTP transport: `read_log_chunk`, which skips the
copies a stream's reader sent in its current boot, the hello checks,
`parse_entries` and `parse_through`, and the cursor stored in the
transaction that ingests the commands. The simulated network delays,
drops, duplicates and reorders frames, and partitions the cluster for a
while. Clients submit ledger commands to random nodes, retry through other
nodes and reuse keys. Nodes crash (the `Database` is closed between steps)
and restart from their directory, and now and then a node's directory is
replaced by an empty one.
At the end the cluster is healed and settles, and every promise is checked:
at most once, no acknowledged loss, convergence, replay, the choice of each
ID's copy by canonical order, and the ledger's own rules. Two checks go
beyond the promises: replication must settle, and no log may contain the
same copy of a command twice.

Every random choice comes from one `random.Random(seed)`, node IDs and
boots included, so a failing seed replays exactly with
`python -m cmdlog.simulation --seeds 1 --start SEED --verbose`.

Where this departs from the HTTP transport: a frame delivered twice within
one connection (which TCP never does) is caught by the cursor check of
`parse_entries`, and the simulated puller then reconnects from its stored
cursor where the real one stops. Sockets, backoff timers and the writer
thread's group commit are not modelled, so each delivery is one transaction.
"""

from cmdlog.simulation.records import SimReport
from cmdlog.simulation.runner import main, simulate

__all__ = ["SimReport", "main", "simulate"]
