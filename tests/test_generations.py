"""Generations of the ID index and the state, and their key filters.

The tree tests run on real LMDB files against a dict as the model. The
store tests check what the engine relies on across generations: dedupe of
an old ID, reads of an old state key, and readers in another process.
"""

from __future__ import annotations

import dataclasses
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lmdb
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cmdlog.apps.example import app
from cmdlog.database import Database
from cmdlog.engine import prepare_submission
from cmdlog.generations import (
    TOMBSTONE,
    GenerationTree,
    KeyFilter,
    generation_prefix,
    pick_merge,
    run_prefixes,
)
from cmdlog.store import Store
from tests.conftest import fast_store

keys = st.binary(min_size=1, max_size=40)


def newest_first(newest: int) -> tuple[bytes, ...]:
    """Return the prefixes of generations `newest` down to 0, unmerged."""
    return run_prefixes([[g, 0] for g in range(newest, -1, -1)])


@settings(max_examples=50, deadline=None)
@given(added=st.lists(keys, max_size=3_000), first_layer_keys=st.integers(0, 5_000))
def test_filter_keeps_every_key_added(
    added: list[bytes], first_layer_keys: int
) -> None:
    """No key added is ever reported absent, also after the filter has grown
    layers past the keys it was sized for."""
    key_filter = KeyFilter(first_layer_keys)
    for key in added:
        key_filter.add(key)
    assert all(key in key_filter for key in added)


def test_filter_growth_keeps_false_positives_rare() -> None:
    """Filled to eight times its first size, so with two full layers and a
    third, the filter still rejects at least 98.5% of keys never added
    (about 0.5% pass each full layer), and every added key passes."""
    rng = random.Random(7)
    key_filter = KeyFilter(0)
    added = [rng.randbytes(16) for _ in range(8 * 65_536)]
    for key in added:
        key_filter.add(key)
    assert all(key in key_filter for key in added)
    others = [rng.randbytes(17) for _ in range(100_000)]
    passed = sum(key in key_filter for key in others)
    assert len(key_filter._layers) == 3
    assert passed < 1_500, passed


@pytest.fixture
def env(tmp_path: Path) -> Iterator[tuple[lmdb.Environment, Any]]:
    environment = lmdb.open(str(tmp_path), max_dbs=2, map_size=64 << 20, sync=False)
    yield environment, environment.open_db(b"tree")
    environment.close()


operations = st.lists(
    st.one_of(
        st.tuples(
            st.just("put"), st.integers(0, 30), st.binary(min_size=1, max_size=8)
        ),
        st.tuples(st.just("delete"), st.integers(0, 30), st.just(b"")),
        st.tuples(st.just("next"), st.just(0), st.just(b"")),
        st.tuples(st.just("reopen"), st.just(0), st.just(b"")),
    ),
    max_size=120,
)


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(ops=operations, filtered=st.booleans())
def test_tree_reads_as_a_dict(
    env: tuple[lmdb.Environment, Any], ops: list[tuple[str, int, bytes]], filtered: bool
) -> None:
    """Puts and deletes spread over any number of generations read back as
    one dict: the newest value wins, a delete hides every older value, and
    a filter rebuilt from the stored keys (as at reopen) changes nothing."""
    environment, db = env
    with environment.begin(write=True) as raw:
        raw.drop(db, delete=False)
    tree = GenerationTree(db, KeyFilter() if filtered else None)
    model: dict[bytes, bytes] = {}
    generation = 0
    for op, number, value in ops:
        key = b"key-%d" % number
        prefixes = newest_first(generation)
        with environment.begin(write=True) as raw:
            if op == "put":
                tree.put(raw, generation_prefix(generation), key, value)
                model[key] = value
            elif op == "delete":
                tree.delete(raw, prefixes, generation_prefix(generation), key)
                model.pop(key, None)
            elif op == "next":
                generation += 1
            elif filtered:
                tree.build_filter(raw)
        with environment.begin() as raw:
            prefixes = newest_first(generation)
            for number in range(31):
                key = b"key-%d" % number
                assert tree.get(raw, prefixes, key) == model.get(key), key

    # A tombstone is kept only over a value in an older generation.
    with environment.begin() as raw:
        for stored_key, value in list(raw.cursor(db=db)):
            if value == TOMBSTONE:
                prefix, key = stored_key[:4], stored_key[4:]
                older = [p for p in newest_first(generation) if p < prefix]
                assert GenerationTree(db, None).get(raw, older, key) is not None


def _append_entry(txn: Any, seq: int) -> None:
    """Append a log entry, which counts toward the generation's commands."""
    txn.log_append(seq, ["c", "t", {}, seq, "0"])


store_ops = st.lists(
    st.tuples(
        st.sampled_from(["put", "put", "delete", "id"]),
        st.integers(0, 40),
        st.binary(min_size=1, max_size=6),
    ),
    min_size=1,
    max_size=160,
)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    ops=store_ops,
    data=st.data(),
    merge_keys=st.sampled_from([1, 3, 8]),
    fan_in=st.sampled_from([2, 3]),
)
def test_store_reads_as_dict_through_merges(
    tmp_path_factory: pytest.TempPathFactory,
    ops: list[tuple[str, int, bytes]],
    data: st.DataObject,
    merge_keys: int,
    fan_in: int,
) -> None:
    """State keys and IDs written over many generations read back as a dict
    after every commit, while merges copy runs a few keys per commit and
    delete their sources, across reopens. Once merges have caught up, the
    runs left are few and every stored key is in one of them."""
    path = tmp_path_factory.mktemp("store")
    config = fast_store(
        generation_commands=1, merge_fan_in=fan_in, merge_keys_per_command=merge_keys
    )
    store = Store(path, ["d"], config)
    state: dict[bytes, bytes] = {}
    ids: dict[str, int] = {}
    seq = 0

    def check() -> None:
        with store.read() as txn:
            for number in range(41):
                key = b"k%d" % number
                assert txn.state_get("d", key) == state.get(key), key
                assert txn.id_get(f"id{number}") == ids.get(f"id{number}")

    try:
        position = 0
        while position < len(ops):
            size = data.draw(st.integers(1, 6))
            chunk = ops[position : position + size]
            position += size

            def work(
                txn: Any,
                chunk: list[tuple[str, int, bytes]] = chunk,
                first: int = seq + 1,
            ) -> None:
                for offset, (op, number, value) in enumerate(chunk, start=first):
                    _append_entry(txn, offset)
                    if op == "put":
                        txn.state_put("d", b"k%d" % number, value)
                    elif op == "delete":
                        txn.state_put("d", b"k%d" % number, None)
                    else:
                        txn.id_put(f"id{number}", offset)

            store.write(work)
            for op, number, value in chunk:
                seq += 1
                if op == "put":
                    state[b"k%d" % number] = value
                elif op == "delete":
                    state.pop(b"k%d" % number, None)
                else:
                    ids[f"id{number}"] = seq
            check()
            if data.draw(st.integers(0, 4), label="reopen when 0") == 0:
                store.close()
                store = Store(path, ["d"], config)
                check()

        # Commits with nothing but a log entry let the merges catch up, with
        # no new generation and a larger share of keys per command.
        store.close()
        catch_up = dataclasses.replace(
            config, generation_commands=10**9, merge_keys_per_command=64
        )
        store = Store(path, ["d"], catch_up)
        for _ in range(400):
            seq += 1
            store.write(lambda txn, at=seq: _append_entry(txn, at))
            with store.read() as txn:
                if txn.meta_get("merge") is None and not pick_merge(txn.runs(), fan_in):
                    break
        check()
        with store.read() as txn:
            runs = txn.runs()
            assert txn.meta_get("merge") is None
            prefixes = set(txn.runs_to_read())
            for name in ("id_gens", "state_gens.d"):
                db = store.merge_trees()[name].db
                for stored in txn.raw.cursor(db=db).iternext(values=False):
                    assert stored[:4] in prefixes, stored
        levels = max(level for _number, level in runs) + 1
        assert len(runs) <= 1 + levels * (fan_in - 1), runs
    finally:
        store.close()


def _submit(db: Database, key: str, type_name: str, payload: dict[str, Any]) -> bool:
    return db.submit([prepare_submission(app, key, type_name, payload)])[0].created


def test_old_keys_found_across_generations(tmp_path: Path) -> None:
    """An ID and an account written generations ago, and a charge reference,
    are still found: their retries take no effect, after a reopen too."""
    config = fast_store(generation_commands=2)
    db = Database(tmp_path, app, store_config=config)
    try:
        assert _submit(db, "open", "ledger.open", {"account": "a", "currency": "EUR"})
        assert _submit(db, "dep", "ledger.deposit", {"account": "a", "amount": 100})
        charge = {"account": "a", "amount": 30, "reference": "inv-1"}
        assert _submit(db, "charge", "ledger.charge", charge)
        for i in range(20):
            user = {"username": f"user{i}", "display_name": "U"}
            assert _submit(db, f"user-{i}", "users.register", user)
        with db.store.read() as txn:
            generation = txn.generation()[0]
        assert generation >= 10
    finally:
        db.close()

    db = Database(tmp_path, app, store_config=config)
    try:
        assert not _submit(db, "dep", "ledger.deposit", {"account": "a", "amount": 100})
        assert not _submit(db, "charge-again", "ledger.charge", charge)
        assert db.query("ledger.balance", {"account": "a"})["balance"] == 70
        assert db.status().commands == 23
    finally:
        db.close()


_READER = """
import sys
from cmdlog.apps.example import app
from cmdlog.store import Store
store = Store(sys.argv[1], list(app.domains), readonly=True)
print("open", flush=True)
sys.stdin.readline()
with store.read() as txn:
    found = [txn.id_get(f"user-{i}") is not None for i in range(6)]
    print(txn.generation()[0], *found, flush=True)
store.close()
"""


def test_read_only_store_follows_a_writer(tmp_path: Path) -> None:
    """A read-only store in another process, as `cmdlog` commands open a
    running node's data, finds IDs in generations the writer started after
    it opened."""
    db = Database(tmp_path, app, store_config=fast_store(generation_commands=1))
    try:
        assert _submit(
            db, "user-0", "users.register", {"username": "u0", "display_name": "U"}
        )
        reader = subprocess.Popen(
            [sys.executable, "-c", _READER, str(tmp_path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert reader.stdout is not None and reader.stdin is not None
            assert reader.stdout.readline() == "open\n"
            for i in range(1, 5):
                user = {"username": f"user{i}", "display_name": "U"}
                assert _submit(db, f"user-{i}", "users.register", user)
            output, _ = reader.communicate("go\n", timeout=30)
        finally:
            reader.kill()
    finally:
        db.close()
    generation, *found = output.split()
    assert int(generation) >= 4
    assert found == ["True"] * 5 + ["False"]


def test_merge_keeps_removed_domain_state(tmp_path: Path) -> None:
    """Merges that run while the app lacks a domain still move that domain's
    keys, so its state reads back when the domain returns."""
    config = fast_store(generation_commands=1, merge_fan_in=2)
    seq = 0

    def write(store: Store, **state: bytes) -> None:
        nonlocal seq
        seq += 1

        def work(txn: Any, at: int = seq) -> None:
            _append_entry(txn, at)
            for domain, value in state.items():
                txn.state_put(domain, b"key", value)

        store.write(work)

    store = Store(tmp_path, ["a", "b"], config)
    try:
        write(store, a=b"1", b=b"kept")
    finally:
        store.close()
    store = Store(tmp_path, ["a"], config)
    try:
        for i in range(40):
            write(store, a=b"%d" % i)
        with store.read() as txn:
            assert len(txn.runs()) < 20
    finally:
        store.close()
    store = Store(tmp_path, ["a", "b"], config)
    try:
        with store.read() as txn:
            assert txn.state_get("b", b"key") == b"kept"
            assert txn.state_get("a", b"key") == b"39"
    finally:
        store.close()
