"""Streams skip the reader's own copies: `read_log_chunk` with a reader, on LMDB."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cmdlog import codec
from cmdlog.app import App
from cmdlog.apps.ledger import ledger
from cmdlog.database import Database
from cmdlog.replication import Reader, read_log_chunk
from cmdlog.store import Txn
from tests.conftest import fast_store

READER = Reader("a1", "b1")
# Where a run of log entries came from: written here (None), or pulled from
# a node while it ran as a given boot.
SOURCES = [None, ("a1", "b1"), ("a1", "b0"), ("c3", "b1")]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield tmp_path_factory.mktemp("echo")


def build_log(path: Path, runs: list[tuple[int, int]]) -> tuple[Database, set[int]]:
    """Write runs of `(length, source index)`; return the store and the
    sequence numbers that are the reader's own copies."""
    database = Database(path, App([ledger]), store_config=fast_store())
    own: set[int] = set()

    def write(txn: Txn) -> None:
        seq = txn.log_last_seq()
        for length, source_index in runs:
            first = seq + 1
            for _ in range(length):
                seq += 1
                txn.log_append(seq, [f"id{seq}", "ledger.deposit", {}, seq, "aa"])
            source = SOURCES[source_index]
            if source is not None:
                txn.source_put(first, seq, *source)
                if source == (READER.node, READER.boot):
                    own.update(range(first, seq + 1))

    database.store.write(write)
    return database, own


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    runs=st.lists(
        st.tuples(st.integers(1, 6), st.integers(0, len(SOURCES) - 1)), max_size=12
    ),
    after=st.integers(0, 10),
    entries_max=st.integers(1, 5),
)
def test_stream_covers_all_but_own_copies(
    scratch: Path,
    runs: list[tuple[int, int]],
    after: int,
    entries_max: int,
) -> None:
    """Chunk after chunk, a stream sends every entry once except the reader's
    own copies, and covers through the head."""
    database, own = build_log(Path(tempfile.mkdtemp(dir=scratch)), runs)
    try:
        head = sum(length for length, _source in runs)
        after = min(after, head)
        sent: list[int] = []
        cursor = after
        while cursor < head:
            entries, through, reported_head = read_log_chunk(
                database, cursor, entries_max=entries_max, bytes_max=1 << 20,
                reader=READER,
            )  # fmt: skip
            seqs = [seq for seq, _record in entries]
            assert reported_head == head
            assert through > cursor
            assert len(seqs) <= entries_max
            assert all(cursor < seq <= through for seq in seqs)
            sent += seqs
            cursor = through
        entries, through, _head = read_log_chunk(
            database, cursor, entries_max=entries_max, bytes_max=1 << 20,
            reader=READER,
        )  # fmt: skip
    finally:
        database.close()

    expected = [seq for seq in range(after + 1, head + 1) if seq not in own]
    assert sent == expected
    assert (entries, through) == ([], head)


def test_stream_without_reader_sends_all(tmp_path: Path) -> None:
    """A reader that does not name itself gets every entry, its copies too."""
    database, own = build_log(tmp_path / "log", [(3, 1), (2, 0), (4, 1)])
    try:
        entries, through, head = read_log_chunk(
            database, 0, entries_max=100, bytes_max=1 << 20
        )
    finally:
        database.close()

    assert len(own) == 7
    assert [seq for seq, _record in entries] == list(range(1, 10))
    assert through == head == 9
    assert codec.unpack(entries[0][1])[0] == "id1"


def test_adjacent_runs_from_one_boot_merge(tmp_path: Path) -> None:
    """Runs that follow each other from the same boot are kept as one record."""
    database = Database(tmp_path / "log", App([ledger]), store_config=fast_store())
    try:

        def write(txn: Txn) -> None:
            txn.source_put(1, 3, "a1", "b1")
            txn.source_put(4, 6, "a1", "b1")
            txn.source_put(7, 8, "a1", "b2")
            txn.source_put(10, 12, "a1", "b2")
            txn.source_put(13, 13, "c3", "b2")

        database.store.write(write)
        with database.store.read() as txn:
            runs = list(txn.sources_from(0))
    finally:
        database.close()

    assert runs == [
        (1, 6, "a1", "b1"),
        (7, 8, "a1", "b2"),
        (10, 12, "a1", "b2"),
        (13, 13, "c3", "b2"),
    ]


def test_chunk_reads_runs_it_covers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chunk looks at the runs it covers, not at every later run of
    another node's copies."""
    database, own = build_log(tmp_path / "log", [(1, 3), (1, 0)] * 1000)
    consumed = [0]
    sources_from = Txn.sources_from

    def counted(self: Txn, seq: int) -> Iterator[tuple[int, int, str, str]]:
        for run in sources_from(self, seq):
            consumed[0] += 1
            yield run

    monkeypatch.setattr(Txn, "sources_from", counted)
    try:
        entries, through, head = read_log_chunk(
            database, 0, entries_max=5, bytes_max=1 << 20, reader=READER
        )
    finally:
        database.close()

    assert own == set()
    assert [seq for seq, _record in entries] == [1, 2, 3, 4, 5]
    assert (through, head) == (5, 2000)
    assert consumed[0] <= 6
