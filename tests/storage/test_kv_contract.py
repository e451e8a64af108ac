"""One contract suite for both KV stores (LevelDB and in-memory), plus group commit."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storage.errors import DataDirInUse, Internal
from storage.kv import KV, LevelDBKV, MemoryKV


@pytest.fixture(params=["leveldb", "memory"])
def kv(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[KV]:
    store: KV = LevelDBKV(tmp_path / "db") if request.param == "leveldb" else MemoryKV()
    yield store
    store.close()


def test_get_put_delete(kv: KV) -> None:
    assert kv.get(b"a") is None
    kv.write([(b"a", b"1"), (b"b", b"2")])
    assert kv.get(b"a") == b"1"
    kv.write([(b"a", b"3")], [b"b"])
    assert kv.get(b"a") == b"3"
    assert kv.get(b"b") is None


def test_delete_then_put_in_one_batch_keeps_the_put(kv: KV) -> None:
    kv.write([(b"k", b"old")])
    kv.write([(b"k", b"new")], [b"k"])
    assert kv.get(b"k") == b"new"


def test_scan_is_ordered_and_bounded_by_prefix(kv: KV) -> None:
    kv.write([(b"p/b", b"2"), (b"p/a", b"1"), (b"q/a", b"x"), (b"p", b"0"), (b"p/c", b"3")])
    assert [k for k, _ in kv.scan(b"p/")] == [b"p/a", b"p/b", b"p/c"]
    assert [k for k, _ in kv.scan(b"p/", reverse=True)] == [b"p/c", b"p/b", b"p/a"]
    assert list(kv.scan(b"zz")) == []


def test_scan_keys_lists_keys_under_a_prefix(kv: KV) -> None:
    kv.write([(b"p/b", b"2"), (b"p/a", b"1"), (b"q/a", b"x"), (b"p", b"0")])
    assert list(kv.scan_keys(b"p/")) == [b"p/a", b"p/b"]
    assert list(kv.scan_keys(b"r/")) == []


def test_scan_resumes_after_a_key(kv: KV) -> None:
    """``after`` skips every key up to and including it, and keeps the prefix bound."""
    kv.write([(b"p", b"0"), (b"p/a", b"1"), (b"p/b", b"2"), (b"p/c", b"3"), (b"q/a", b"x")])
    assert [k for k, _ in kv.scan(b"p/", after=b"p/a")] == [b"p/b", b"p/c"]
    assert [k for k, _ in kv.scan(b"p/", after=b"p/ab")] == [b"p/b", b"p/c"]
    assert [k for k, _ in kv.scan(b"p/", after=b"a")] == [b"p/a", b"p/b", b"p/c"]
    assert [k for k, _ in kv.scan(b"p/", after=b"p/c")] == []
    assert [k for k, _ in kv.scan(b"p/", after=b"z")] == []
    with pytest.raises(ValueError, match="forward"):
        list(kv.scan(b"p/", reverse=True, after=b"p/a"))


def test_compact_keeps_data(kv: KV) -> None:
    kv.write([(bytes([i]), b"v") for i in range(50)])
    kv.write([], [bytes([i]) for i in range(0, 50, 2)])
    kv.compact()
    assert len(list(kv.scan(b""))) == 25


@settings(max_examples=40, deadline=None)
@given(
    ops=st.lists(
        st.tuples(st.booleans(), st.binary(min_size=1, max_size=3), st.binary(max_size=4)),
        max_size=30,
    )
)
def test_memory_kv_matches_a_dict(ops: list[tuple[bool, bytes, bytes]]) -> None:
    """Any sequence of puts and deletes leaves MemoryKV equal to a sorted dict."""
    kv = MemoryKV()
    model: dict[bytes, bytes] = {}
    for is_put, key, value in ops:
        if is_put:
            kv.write([(key, value)])
            model[key] = value
        else:
            kv.write([], [key])
            model.pop(key, None)
    assert list(kv.scan(b"")) == sorted(model.items())


def test_closed_memory_kv_refuses_use() -> None:
    kv = MemoryKV()
    kv.close()
    with pytest.raises(Internal):
        kv.get(b"a")


def test_second_open_of_leveldb_is_a_clear_error(tmp_path: Path) -> None:
    first = LevelDBKV(tmp_path / "db")
    try:
        with pytest.raises(DataDirInUse, match="in use"):
            LevelDBKV(tmp_path / "db")
    finally:
        first.close()


def test_group_commit_folds_concurrent_synced_writes(tmp_path: Path) -> None:
    kv = LevelDBKV(tmp_path / "db")
    threads_n, per_thread = 8, 25
    barrier = threading.Barrier(threads_n)

    def writer(t: int) -> None:
        barrier.wait()
        for i in range(per_thread):
            kv.write([(f"{t:02d}/{i:03d}".encode(), b"x" * 100)], sync=True)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(threads_n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stats = kv.group_stats
    assert stats.writes == threads_n * per_thread
    assert stats.syncs <= stats.writes
    assert len(list(kv.scan(b""))) == threads_n * per_thread
    kv.close()
    reopened = LevelDBKV(tmp_path / "db")
    assert len(list(reopened.scan(b""))) == threads_n * per_thread
    reopened.close()


class _FullDisk:
    """A plyvel database whose writes fail as LevelDB's do when the disk is full."""

    closed = False

    def write_batch(self, **_: object) -> object:
        import plyvel

        raise plyvel.IOError(b"IO error: No space left on device")

    def close(self) -> None:
        """Nothing to close."""


@pytest.mark.parametrize("sync", [True, False])
def test_a_failed_leveldb_write_is_a_storage_error(tmp_path: Path, sync: bool) -> None:
    """Disk full surfaces as Unavailable (a StorageError the node answers), not a raw
    plyvel error that would escape the service; the store stays usable."""
    from storage.errors import Unavailable

    kv = LevelDBKV(tmp_path / "db")
    real = kv._db
    kv._db = _FullDisk()
    with pytest.raises(Unavailable, match="No space left") as caught:
        kv.write([(b"k", b"v")], sync=sync)
    assert caught.value.field == "data_dir"
    kv._db = real
    kv.write([(b"k", b"v")], sync=sync)
    assert kv.get(b"k") == b"v"
    kv.close()
