"""The pure queue of stale index contexts: batching, lag figures, when a durable row may
go, forgetting, and the overflow into the durable rows."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from storage.index_queue import IndexQueue

A, B, C = b"a", b"b", b"c"


def queued(q: IndexQueue, *keys: bytes, now_ms: int) -> None:
    q.begin(keys)
    q.end(keys, (), now_ms)


def test_take_is_oldest_first_and_batched() -> None:
    q = IndexQueue()
    for i, key in enumerate((A, B, C)):
        queued(q, key, now_ms=100 + i)
    assert q.take(2) == [A, B]
    assert q.take(2) == [C]
    assert q.take(2) == []
    assert q.pending() == 3  # taken, not yet committed
    assert sorted(q.settle()) == [A, B, C]
    assert q.pending() == 0


def test_a_context_marked_twice_keeps_its_first_time() -> None:
    q = IndexQueue()
    queued(q, A, now_ms=100)
    queued(q, A, now_ms=900)
    assert q.pending() == 1
    assert q.lag_ms(1_000) == 900


def test_lag_is_the_age_of_the_oldest_queued_or_taken() -> None:
    q = IndexQueue()
    assert q.lag_ms(5_000) == 0  # nothing waits: a known 0
    queued(q, A, now_ms=1_000)
    queued(q, B, now_ms=3_000)
    assert q.lag_ms(5_000) == 4_000
    q.take(1)  # A is being indexed: still unindexed
    assert q.lag_ms(5_000) == 4_000
    q.settle()
    assert q.lag_ms(5_000) == 2_000
    assert q.lag_ms(2_000) == 0  # a clock behind the mark never gives a negative lag


def test_rows_of_unchanged_contexts_go_at_once_unless_other_work_waits() -> None:
    q = IndexQueue()
    q.begin([A, B])
    assert q.end([], [A, B], 10) == [A, B]  # nothing new: both rows may go
    queued(q, A, now_ms=20)
    q.begin([A])
    assert q.end([], [A], 30) == []  # A is queued: its row must stay
    q.begin([B])
    q.begin([B])  # a second writer of B
    assert q.end([], [B], 40) == []  # the other writer's row is not released
    assert q.end([], [B], 40) == [B]


def test_settle_keeps_the_row_of_a_context_written_again_during_the_drain() -> None:
    q = IndexQueue()
    queued(q, A, now_ms=1)
    queued(q, B, now_ms=2)
    assert q.take(10) == [A, B]
    queued(q, A, now_ms=3)  # a write that ended after the drain read A's head
    q.begin([B])  # a write of B is under way
    assert q.settle() == []  # neither row may go: both still have unindexed work
    assert q.take(10) == [A]  # A is drained again
    q.end([B], [], 4)
    assert q.take(10) == [B]
    assert sorted(q.settle()) == [A, B]


def test_a_forgotten_context_is_not_indexed_by_the_drain_that_took_it() -> None:
    q = IndexQueue()
    queued(q, A, now_ms=1)
    queued(q, B, now_ms=1)
    assert q.take(10) == [A, B]
    q.forget(A)  # purged while the drain was reading it
    assert not q.wanted(A)
    assert q.wanted(B)
    queued(q, C, now_ms=2)
    q.forget(C)
    assert q.take(10) == []


def test_overflow_leaves_the_rest_to_the_durable_rows_and_refills() -> None:
    q = IndexQueue(max_contexts=2)
    queued(q, A, now_ms=1)
    queued(q, B, now_ms=2)
    queued(q, C, now_ms=3)  # over the bound: only its durable row remembers it
    assert q.overflowed
    assert q.take(10) == [A, B]
    q.settle()
    q.refill([(C, 3)], complete=True)  # the shell read the rows back
    assert not q.overflowed
    assert q.lag_ms(10) == 7
    assert q.take(10) == [C]


def test_a_partial_refill_keeps_the_overflow_flag() -> None:
    q = IndexQueue(max_contexts=2)
    q.overflowed = True
    q.refill([(A, 1), (B, 2), (C, 3)], complete=True)
    assert q.overflowed  # C did not fit
    assert q.take(10) == [A, B]


def test_bounds_are_checked() -> None:
    with pytest.raises(ValueError, match="max_contexts"):
        IndexQueue(max_contexts=0)


@given(st.lists(st.tuples(st.sampled_from("wetsf"), st.sampled_from([A, B, C])), max_size=40))
def test_no_row_is_released_while_its_context_has_unindexed_work(
    steps: list[tuple[str, bytes]],
) -> None:
    """Whatever the interleaving, a released row's context is not queued, written or taken."""
    q = IndexQueue(max_contexts=2)
    open_writes: list[bytes] = []
    for now, (op, key) in enumerate(steps):
        released: list[bytes] = []
        if op == "w":
            q.begin([key])
            open_writes.append(key)
        elif op == "e" and key in open_writes:
            open_writes.remove(key)
            released = q.end([key], [], now)
        elif op == "t":
            q.take(1)
        elif op == "s":
            released = q.settle()
        elif op == "f":
            q.forget(key)
        for gone in released:
            assert gone not in open_writes
            assert gone not in q._queued


def test_a_deferred_context_keeps_its_row_and_waits_for_a_retry() -> None:
    q = IndexQueue()
    queued(q, A, now_ms=10)
    queued(q, B, now_ms=20)
    assert q.take(10) == [A, B]
    q.defer(A)  # its signer is not trusted yet
    assert q.settle() == [B]  # A's row stays
    assert (q.pending(), q.lag_ms(100)) == (0, 0)  # it waits for trust, not the indexer
    q.begin([A])
    assert q.end([], [A], 30) == []  # still deferred: its row is not released
    q.retry_deferred()
    assert (q.pending(), q.lag_ms(100)) == (1, 90)  # back with its first time
    assert q.take(10) == [A]
    assert q.settle() == [A]


def test_a_queued_context_can_be_deferred_directly() -> None:
    q = IndexQueue()
    queued(q, A, now_ms=5)
    q.defer(A)
    assert q.take(10) == []
    q.retry_deferred()
    assert q.take(10) == [A]
