"""node.cluster.inflight_writes: writes in flight per layout epoch (epoch_seen's wait)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.cluster.inflight_writes import InflightWrites, WriteToken

SETTINGS = settings(max_examples=200, deadline=None, derandomize=True)


def test_drained_below_waits_for_older_epochs_only() -> None:
    writes = InflightWrites()
    assert writes.drained_below(5)  # nothing in flight
    old = writes.begin(1)
    mid = writes.begin(2)
    new = writes.begin(3)
    assert writes.drained_below(1)
    assert not writes.drained_below(2)  # the epoch-1 write
    assert not writes.drained_below(3)
    writes.end(old)
    assert writes.drained_below(2)
    assert not writes.drained_below(3)  # the epoch-2 write still runs
    writes.end(mid)
    assert writes.drained_below(3)  # the epoch-3 write does not hold epoch 3 back
    assert not writes.drained_below(4)
    assert writes.in_flight() == 1
    assert writes.in_flight(below=3) == 0
    writes.end(new)
    assert writes.drained_below(10)
    assert writes.changes == 3


def test_tokens_of_one_epoch_are_counted_apart() -> None:
    writes = InflightWrites()
    a, b = writes.begin(7), writes.begin(7)
    assert a != b
    writes.end(a)
    assert not writes.drained_below(8)
    assert writes.in_flight(below=8) == 1
    writes.end(b)
    assert writes.drained_below(8)


def test_ending_twice_or_a_foreign_token_is_a_bug() -> None:
    writes = InflightWrites()
    token = writes.begin(1)
    writes.end(token)
    with pytest.raises(ValueError, match="not in flight"):
        writes.end(token)
    with pytest.raises(ValueError, match="not in flight"):
        writes.end(WriteToken(99, 1))
    assert writes.drained_below(2)


@SETTINGS
@given(st.lists(st.integers(0, 4), min_size=1, max_size=30), st.integers(0, 2**32 - 1))
def test_drained_below_matches_a_reference_set(epochs: list[int], seed: int) -> None:
    """drained_below(E) holds exactly when no open token has an epoch below E."""
    rng = random.Random(seed)
    writes = InflightWrites()
    open_tokens: list[WriteToken] = []
    for epoch in epochs:
        open_tokens.append(writes.begin(epoch))
        if rng.random() < 0.5:
            writes.end(open_tokens.pop(rng.randrange(len(open_tokens))))
        for probe in range(6):
            assert writes.drained_below(probe) == all(t.epoch >= probe for t in open_tokens)
            assert writes.in_flight(below=probe) == sum(t.epoch < probe for t in open_tokens)
