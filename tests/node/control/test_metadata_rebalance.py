"""node.control.metadata: the rebalance marks ``stream_done`` and ``epoch_seen`` and their codec."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import msgpack
import pytest

from node.control.metadata import (
    ClusterMetadata,
    Member,
    apply,
    cmd_epoch_seen,
    cmd_member_add,
    cmd_member_state,
    cmd_stream_done,
    decode_state,
    encode_state,
)
from tests.node.control.metadata_fixtures import IDS, three_node_state


def step(state: ClusterMetadata, data: bytes) -> tuple[ClusterMetadata, bool, str | None]:
    after, result = apply(state, state.applied_index + 1, data)
    return after, result.ok, result.error


def joined() -> ClusterMetadata:
    """Three normal members and a fourth joining (ring epoch 2)."""
    state, ok, _ = step(
        three_node_state(), cmd_member_add(Member("id-d", "node4", "joining", "age1d"))
    )
    assert ok
    assert state.ring.epoch == 2
    return state


@pytest.mark.parametrize(
    ("cmd", "field"), [(cmd_stream_done, "streamed"), (cmd_epoch_seen, "seen")]
)
def test_marks_keep_the_highest_epoch(cmd: Callable[[str, int], bytes], field: str) -> None:
    state = joined()
    make = cmd
    state, ok, _ = step(state, make(IDS[0], 2))
    assert ok
    assert getattr(state, field) == {IDS[0]: 2}
    state, ok, _ = step(state, make(IDS[0], 1))
    assert ok
    assert getattr(state, field) == {IDS[0]: 2}  # a late, older mark lowers nothing
    state, ok, _ = step(state, make("id-d", 1))
    assert ok
    assert getattr(state, field) == {IDS[0]: 2, "id-d": 1}


@pytest.mark.parametrize("cmd", [cmd_stream_done, cmd_epoch_seen])
def test_marks_refused_for_a_future_epoch_or_a_stranger(cmd: Callable[[str, int], bytes]) -> None:
    state = joined()
    make = cmd
    after, ok, error = step(state, make(IDS[0], 3))
    assert not ok
    assert "epoch 2" in str(error)
    assert after == replace(state, applied_index=state.applied_index + 1)
    _, ok, error = step(state, make("id-x", 1))
    assert not ok
    assert "no member" in str(error)
    removed, ok, _ = step(state, cmd_member_state("id-d", "removed"))
    assert ok
    _, ok, _ = step(removed, make("id-d", 2))
    assert not ok


def test_codec_round_trip_and_old_snapshots_default_to_empty() -> None:
    state = joined()
    state, _, _ = step(state, cmd_stream_done(IDS[1], 2))
    state, _, _ = step(state, cmd_epoch_seen(IDS[2], 1))
    assert decode_state(encode_state(state)) == state
    old = msgpack.unpackb(encode_state(state), raw=False)
    del old["streamed"], old["seen"]  # a snapshot written before the marks existed
    decoded = decode_state(msgpack.packb(old, use_bin_type=True))
    assert decoded.streamed == {}
    assert decoded.seen == {}
    assert decoded == replace(state, streamed={}, seen={})
