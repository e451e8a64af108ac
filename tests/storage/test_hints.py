"""HintStore contract on both KV stores (LevelDB and in-memory), restart and the byte bound."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storage.errors import CorruptRecord
from storage.hints import HintStore
from storage.kv import KV, LevelDBKV, MemoryKV
from storage.schema import HINT_PREFIX, HintRow, hint_key, split_hint_key

BIG = 1 << 30


def clock() -> int:
    return 1_767_225_600_000


@pytest.fixture(params=["leveldb", "memory"])
def kv(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[KV]:
    store: KV = LevelDBKV(tmp_path / "db") if request.param == "leveldb" else MemoryKV()
    yield store
    store.close()


def test_add_lists_per_target_oldest_first(kv: KV) -> None:
    hints = HintStore(kv, max_bytes=BIG, clock_ms=clock)
    a1 = hints.add("n2", "ctx-a", [b"v1", b"v2"])
    b1 = hints.add("n3", "ctx-b", [b"w1"])
    a2 = hints.add("n2", "ctx-c", [b"v3"])
    assert a1
    assert b1
    assert a2
    assert hints.targets() == ["n2", "n3"]
    got = hints.pending("n2")
    assert [h.seq for h in got] == [a1.seq, a2.seq]
    assert got[0].envelopes == (b"v1", b"v2")
    assert got[0].context == "ctx-a"
    assert got[0].created_ms == clock()
    assert [h.envelopes for h in hints.pending("n3")] == [(b"w1",)]
    assert [h.seq for h in hints.pending("n2", limit=1)] == [a1.seq]
    stats = hints.stats()
    assert stats.hints == 3
    assert stats.hint_bytes == a1.size + b1.size + a2.size


def test_delete_after_ack_counts_delivered_or_dropped(kv: KV) -> None:
    hints = HintStore(kv, max_bytes=BIG, clock_ms=clock)
    first = hints.add("n2", "c", [b"x"])
    second = hints.add("n2", "c", [b"y"])
    assert first
    assert second
    hints.delete([first], delivered=True)
    hints.delete([second], delivered=False)
    hints.delete([first], delivered=True)  # twice is a no-op, counted once
    assert hints.pending("n2") == []
    assert hints.targets() == []
    stats = hints.stats()
    assert (stats.hints, stats.hint_bytes, stats.hints_delivered, stats.hints_dropped) == (
        0, 0, 1, 1,
    )  # fmt: skip
    assert list(kv.scan(HINT_PREFIX)) == []


def test_byte_bound_drops_oldest_first_and_counts(kv: KV) -> None:
    probe = HintStore(MemoryKV(), max_bytes=BIG, clock_ms=clock).add("n2", "c", [b"0" * 100])
    assert probe is not None
    hints = HintStore(kv, max_bytes=probe.size * 3, clock_ms=clock)  # room for three
    added = [hints.add(t, "c", [bytes([48 + i]) * 100]) for i, t in enumerate("abcde")]
    assert all(h is not None for h in added)
    kept = [h.envelopes[0][:1] for t in hints.targets() for h in hints.pending(t)]
    assert sorted(kept) == [b"2", b"3", b"4"]  # the two oldest went
    stats = hints.stats()
    assert stats.hints == 3
    assert stats.hints_dropped == 2
    assert stats.hint_bytes <= hints.max_bytes


def test_a_hint_larger_than_the_bound_is_dropped_not_stored(kv: KV) -> None:
    hints = HintStore(kv, max_bytes=200, clock_ms=clock)
    kept = hints.add("n2", "c", [b"small"])
    assert hints.add("n2", "c", [b"x" * 500]) is None
    assert kept is not None
    assert [h.seq for h in hints.pending("n2")] == [kept.seq]
    assert hints.stats().hints_dropped == 1


def test_hints_survive_a_restart(tmp_path: Path) -> None:
    kv = LevelDBKV(tmp_path / "db")
    hints = HintStore(kv, max_bytes=BIG, clock_ms=clock)
    for i in range(5):
        hints.add("n3", f"c{i}", [b"v" * i])
    gone = hints.pending("n3", limit=2)
    hints.delete(gone, delivered=True)
    before = hints.stats()
    kv.close()
    kv = LevelDBKV(tmp_path / "db")
    try:
        again = HintStore(kv, max_bytes=BIG, clock_ms=clock)
        assert [h.context for h in again.pending("n3")] == ["c2", "c3", "c4"]
        after = again.stats()
        assert (after.hints, after.hint_bytes) == (before.hints, before.hint_bytes)
        newer = again.add("n3", "c5", [b"z"])
        assert newer is not None
        assert newer.seq > max(h.seq for h in again.pending("n3")[:-1])
    finally:
        kv.close()


def test_damaged_rows_are_skipped_not_fatal(kv: KV) -> None:
    kv.write([(hint_key("n2", 1), b"\xc1garbage"), (HINT_PREFIX + b"junk", b"x")])
    hints = HintStore(kv, max_bytes=BIG, clock_ms=clock)
    good = hints.add("n2", "c", [b"ok"])
    assert good is not None
    assert good.seq == 2
    assert [h.seq for h in hints.pending("n2")] == [2]


def test_bad_rows_raise_corrupt_record() -> None:
    with pytest.raises(CorruptRecord):
        HintRow.decode(b"\x93\x01\x02\x03")
    with pytest.raises(CorruptRecord):
        split_hint_key(b"H/n2")
    with pytest.raises(ValueError, match="max_bytes"):
        HintStore(MemoryKV(), max_bytes=0, clock_ms=clock)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(["n1", "n2", "n3"]), st.integers(0, 300)), max_size=40),
    st.integers(100, 3000),
)
def test_bound_and_accounting_hold(ops: list[tuple[str, int]], bound: int) -> None:
    """After any adds, bytes equal the stored rows' sizes, within the bound; the newest are kept."""
    kv = MemoryKV()
    hints = HintStore(kv, max_bytes=bound, clock_ms=clock)
    seqs = []
    for target, size in ops:
        hint = hints.add(target, "c", [b"x" * size])
        if hint is not None:
            seqs.append(hint.seq)
    stored = list(kv.scan(HINT_PREFIX))
    stats = hints.stats()
    assert stats.hint_bytes == sum(len(k) + len(v) for k, v in stored) <= bound
    kept = sorted(split_hint_key(k)[1] for k, _ in stored)
    assert kept == seqs[len(seqs) - len(kept) :]  # a suffix: oldest dropped first
    assert stats.hints + stats.hints_dropped == len(ops)
