"""The membership transition core: the leader's next step and the operator refusals."""

from __future__ import annotations

from node.control import metadata
from node.control.membership_plan import (
    add_refusal,
    forget_refusal,
    member_state,
    next_step,
    remove_refusal,
    unstreamed,
)
from node.control.metadata import ClusterMetadata, Member
from node.control.raft_types import ConfState
from tests.node.control.metadata_fixtures import IDS, three_node_state

A, B, C = IDS
D = "id-d"
ALL3 = ConfState(frozenset(IDS))


def _apply(state: ClusterMetadata, *commands: bytes) -> ClusterMetadata:
    for command in commands:
        state, result = metadata.apply(state, state.applied_index + 1, command)
        assert result.ok, result.error
    return state


def _joining(state: ClusterMetadata) -> ClusterMetadata:
    new = Member(D, "node4", "joining", "age1node4", "127.0.0.1", 7004)
    return _apply(state, metadata.cmd_member_add(new))


def _step(state: ClusterMetadata, conf: ConfState, **kw: object):  # type: ignore[no-untyped-def]
    args: dict[str, object] = {
        "leader": A, "match": {}, "commit_index": 10, "streamed": {},
        "live": {A, B, C, D}, "conf_blocked": False,
    }  # fmt: skip
    args.update(kw)
    return next_step(state, conf, **args)  # type: ignore[arg-type]


def test_a_settled_cluster_has_nothing_to_do() -> None:
    assert _step(three_node_state(), ALL3) is None


def test_a_joining_member_is_added_as_a_learner_first() -> None:
    step = _step(_joining(three_node_state()), ALL3)
    assert step is not None
    assert step.kind == "conf"
    assert step.node_id == D
    assert step.conf == ConfState(frozenset(IDS), frozenset({D}))


def test_a_learner_is_promoted_only_once_caught_up() -> None:
    state = _joining(three_node_state())
    conf = ConfState(frozenset(IDS), frozenset({D}))
    assert _step(state, conf, match={D: 9}, commit_index=10) is None
    step = _step(state, conf, match={D: 10}, commit_index=10)
    assert step is not None
    assert step.conf == ConfState(frozenset({*IDS, D}))


def test_no_conf_step_while_a_conf_entry_is_uncommitted() -> None:
    state = _joining(three_node_state())
    assert _step(state, ALL3, conf_blocked=True) is None


def test_joining_becomes_normal_only_when_every_live_ring_member_streamed() -> None:
    state = _joining(three_node_state())
    conf = ConfState(frozenset({*IDS, D}))
    epoch = state.ring.epoch
    partial = {A: epoch, B: epoch, C: epoch, D: epoch - 1}
    assert _step(state, conf, streamed=partial) is None
    assert unstreamed(state, partial, {A, B, C, D}) == [D]
    done = {n: epoch for n in (A, B, C, D)}
    step = _step(state, conf, streamed=done)
    assert step is not None
    assert (step.kind, step.node_id, step.state) == ("state", D, "normal")


def test_a_dead_member_does_not_hold_a_transition_up() -> None:
    state = _joining(three_node_state())
    conf = ConfState(frozenset({*IDS, D}))
    epoch = state.ring.epoch
    streamed = {A: epoch, B: epoch, D: epoch}
    assert _step(state, conf, streamed=streamed, live={A, B, C, D}) is None
    step = _step(state, conf, streamed=streamed, live={A, B, D})
    assert step is not None
    assert step.state == "normal"


def test_leaving_becomes_removed_after_streaming_then_leaves_the_configuration() -> None:
    state = _apply(three_node_state(), metadata.cmd_member_state(C, "leaving"))
    epoch = state.ring.epoch
    assert _step(state, ALL3, streamed={A: epoch, B: epoch}) is None  # C has not streamed
    step = _step(state, ALL3, streamed={A: epoch, B: epoch, C: epoch})
    assert step is not None
    assert (step.node_id, step.state) == (C, "removed")
    removed = _apply(state, metadata.cmd_member_state(C, "removed"))
    step = _step(removed, ALL3)
    assert step is not None
    assert step.kind == "conf"
    assert step.conf == ConfState(frozenset({A, B}))


def test_the_leader_drops_itself_last() -> None:
    state = _apply(
        three_node_state(),
        metadata.cmd_member_state(A, "removed"),
        metadata.cmd_member_state(B, "removed"),
    )
    step = _step(state, ALL3, leader=A)
    assert step is not None
    assert step.node_id == B


def test_a_member_missing_from_the_configuration_is_added_back_resumably() -> None:
    """A leader that crashed between member_add and the conf change: the next one adds it."""
    state = three_node_state()
    step = _step(state, ConfState(frozenset({A, B})))
    assert step is not None
    assert step.node_id == C
    assert step.conf is not None
    assert step.conf.learners == frozenset({C})


def test_add_refusals() -> None:
    state = three_node_state()
    assert add_refusal(state, "node4", D) is None
    assert "taken" in (add_refusal(state, "node1", D) or "")
    assert "is or was" in (add_refusal(state, "node9", A) or "")


def test_remove_refusals() -> None:
    state = three_node_state()
    assert remove_refusal(state, "node9") == "no member 'node9'"
    leaving = _apply(state, metadata.cmd_member_state(C, "leaving"))
    assert "only a normal member" in (remove_refusal(leaving, "node3") or "")
    # custody is no reason to refuse a remove: the re-share hands the share over first
    assert remove_refusal(state, "node3") is None
    assert remove_refusal(leaving, "node2") is None


def test_forget_refuses_a_live_node_and_a_needed_shareholder() -> None:
    state = three_node_state()
    assert "alive" in (forget_refusal(state, "node3", answers=True) or "")
    assert forget_refusal(state, "node3", answers=False) is None
    gone = _apply(state, metadata.cmd_member_state(C, "removed"))
    assert "admin share 2" in (forget_refusal(gone, "node2", answers=False) or "")
    assert forget_refusal(gone, "node3", answers=False) == "no member 'node3'"


def test_member_state() -> None:
    assert member_state(None, A) is None
    assert member_state(three_node_state(), A) == "normal"
    assert member_state(three_node_state(), D) is None
