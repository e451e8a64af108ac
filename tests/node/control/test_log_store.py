"""node.control.log_store: Raft persistence, run on MemoryKV and on a real LevelDB."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest

from node.control.log_store import RaftLogStore, RaftStateExists, RaftStoreError, write_bootstrap
from node.control.raft_types import (
    ConfState,
    Entry,
    EntryKind,
    HardState,
    PersistedState,
    Snapshot,
    SnapshotMeta,
)
from storage.errors import CorruptRecord
from storage.kv import KV, LevelDBKV, MemoryKV
from storage.schema import RAFT_HARD_STATE, RAFT_SNAPSHOT, raft_entry_key

VOTERS = ConfState(frozenset({"a", "b", "c"}))


@pytest.fixture(params=["memory", "leveldb"])
def kv(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[KV]:
    store: KV = LevelDBKV(tmp_path / "db") if request.param == "leveldb" else MemoryKV()
    yield store
    store.close()


def snap(index: int, term: int, data: bytes = b"state") -> Snapshot:
    return Snapshot(SnapshotMeta(index, term, VOTERS), data)


def entries(first: int, last: int, term: int) -> list[Entry]:
    return [Entry(i, term, data=f"cmd{i}@{term}".encode()) for i in range(first, last + 1)]


def indexes(state: PersistedState) -> list[tuple[int, int]]:
    return [(e.index, e.term) for e in state.entries]


def bootstrapped(kv: KV) -> RaftLogStore:
    write_bootstrap(kv, snap(1, 1))
    return RaftLogStore(kv)


def test_an_empty_store_has_no_state_and_loads_the_zero_state(kv: KV) -> None:
    store = RaftLogStore(kv)
    assert not store.has_state()
    assert store.load() == PersistedState()


def test_bootstrap_writes_the_snapshot_and_its_hard_state(kv: KV) -> None:
    store = bootstrapped(kv)
    assert store.has_state()
    assert store.load() == PersistedState(HardState(1, None, 1), snap(1, 1), ())


def test_bootstrap_refuses_a_node_with_raft_state(kv: KV) -> None:
    bootstrapped(kv)
    with pytest.raises(RaftStateExists):
        write_bootstrap(kv, snap(1, 1, b"other"))
    fresh = MemoryKV()
    RaftLogStore(fresh).save(hard_state=HardState(3, "b", 0), sync=True)
    with pytest.raises(RaftStateExists):
        write_bootstrap(fresh, snap(1, 1))


def test_entries_conf_entries_and_hard_state_round_trip(kv: KV) -> None:
    store = bootstrapped(kv)
    conf = Entry(4, 2, EntryKind.CONF, conf=ConfState(frozenset({"a", "b"}), frozenset({"d"})))
    written = [*entries(2, 3, 2), conf]
    store.save(entries=written, hard_state=HardState(2, "a", 3), sync=True)
    assert store.load() == PersistedState(HardState(2, "a", 3), snap(1, 1), tuple(written))


def test_an_entry_at_i_discards_stored_entries_from_i(kv: KV) -> None:
    store = bootstrapped(kv)
    store.save(entries=entries(2, 6, 1), sync=True)
    store.save(entries=entries(4, 4, 2), sync=True)
    assert indexes(store.load()) == [(2, 1), (3, 1), (4, 2)]
    store.save(entries=entries(5, 5, 2), sync=False)
    assert indexes(store.load()) == [(2, 1), (3, 1), (4, 2), (5, 2)]


def test_entries_that_would_break_the_log_are_refused_and_nothing_is_written(kv: KV) -> None:
    store = bootstrapped(kv)
    store.save(entries=entries(2, 3, 1), sync=True)
    before = store.load()
    with pytest.raises(RaftStoreError, match="gap after 3"):
        store.save(entries=entries(5, 5, 1), hard_state=HardState(9, None, 1), sync=True)
    with pytest.raises(RaftStoreError, match="inside the snapshot"):
        store.save(entries=entries(1, 1, 1), sync=True)
    with pytest.raises(RaftStoreError, match="not contiguous"):
        store.save(entries=[*entries(4, 4, 1), *entries(6, 6, 1)], sync=True)
    assert store.load() == before


def test_compaction_replaces_the_covered_entries_and_keeps_the_tail(kv: KV) -> None:
    store = bootstrapped(kv)
    store.save(entries=entries(2, 7, 1), hard_state=HardState(1, None, 7), sync=True)
    store.compact(snap(5, 1, b"at5"))
    loaded = store.load()
    assert loaded.snapshot == snap(5, 1, b"at5")
    assert indexes(loaded) == [(6, 1), (7, 1)]
    store.compact(snap(7, 1, b"at7"))
    assert store.load().entries == ()
    store.save(entries=entries(8, 8, 2), sync=True)  # the log goes on after the snapshot
    assert indexes(store.load()) == [(8, 2)]
    with pytest.raises(RaftStoreError, match="cannot compact"):
        store.compact(snap(9, 2))
    with pytest.raises(RaftStoreError, match="cannot compact"):
        store.compact(snap(6, 1))


def test_a_received_snapshot_matching_the_log_keeps_the_entries_after_it(kv: KV) -> None:
    store = bootstrapped(kv)
    store.save(entries=entries(2, 6, 3), sync=True)
    store.save(snapshot=snap(4, 3), hard_state=HardState(3, None, 4), sync=True)
    loaded = store.load()
    assert loaded.snapshot == snap(4, 3)
    assert indexes(loaded) == [(5, 3), (6, 3)]


def test_a_received_snapshot_that_conflicts_with_the_log_discards_all_of_it(kv: KV) -> None:
    store = bootstrapped(kv)
    store.save(entries=entries(2, 6, 2), sync=True)
    store.save(snapshot=snap(4, 3), hard_state=HardState(3, None, 4), sync=True)
    assert store.load().entries == ()


def test_a_received_snapshot_past_a_short_log_replaces_it(kv: KV) -> None:
    store = bootstrapped(kv)
    store.save(entries=entries(2, 3, 2), sync=True)
    store.save(snapshot=snap(9, 3), entries=entries(10, 11, 3), sync=True)
    loaded = store.load()
    assert loaded.snapshot == snap(9, 3)
    assert indexes(loaded) == [(10, 3), (11, 3)]


def _corrupted(kv: KV, key: bytes, value: bytes) -> str:
    kv.write([(key, value)])
    with pytest.raises(CorruptRecord) as caught:
        RaftLogStore(kv).load()
    return caught.value.message


def _row(**fields: object) -> bytes:
    return bytes(msgpack.packb({"v": 1, **fields}, use_bin_type=True))


@pytest.mark.parametrize(
    ("key", "value", "why"),
    [
        (RAFT_HARD_STATE, b"\xc1", "raft row r/hs: does not decode"),
        (RAFT_HARD_STATE, _row(term=-1, commit=0), "raft row r/hs: term"),
        (RAFT_HARD_STATE, _row(term=1, commit=1, vote=3), "raft row r/hs: vote"),
        (RAFT_HARD_STATE, _row(term=1, commit=9), "raft row r/hs: commit 9 is past the log"),
        (RAFT_HARD_STATE, b"\x01", "raft row r/hs: not a map"),
        (RAFT_SNAPSHOT, _row(index=1, term=1), "raft row r/snap: snapshot.conf"),
        (RAFT_SNAPSHOT, msgpack.packb({"v": 7}), "raft row r/snap: schema is not 1"),
        (raft_entry_key(2), _row(i=2, t=0, k="normal"), "raft row r/e/"),
        (raft_entry_key(3), _row(i=3, t=1, k="normal"), "expected the entry at 2"),
        (raft_entry_key(2), _row(i=5, t=1, k="normal"), "holds the entry at index 5"),
        (b"r/e/short", _row(i=2, t=1, k="normal"), "raft row r/e/short: not an entry key"),
    ],
)
def test_a_corrupt_row_is_named(kv: KV, key: bytes, value: bytes, why: str) -> None:
    bootstrapped(kv)
    assert why in _corrupted(kv, key, value)
