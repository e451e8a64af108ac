"""node.control.reshare_plan: when the admin key is re-shared, to whom, and what commits."""

from __future__ import annotations

from dataclasses import replace

from crypto import shamir
from node.control import metadata
from node.control.membership_plan import Step, next_step
from node.control.metadata import ClusterMetadata, Custody, Member
from node.control.raft_types import ConfState
from node.control.reshare_plan import (
    MAX_HOLDERS,
    holders_of,
    plan_reshare,
    reshare_reason,
    reshare_refusal,
    stale_epochs,
    targets,
    threshold_for,
)
from tests.node.control.metadata_fixtures import IDS, three_node_state

A, B, C = IDS
D = "id-d"
ALL = frozenset({A, B, C, D})


def _apply(state: ClusterMetadata, *commands: bytes) -> ClusterMetadata:
    for command in commands:
        state, result = metadata.apply(state, state.applied_index + 1, command)
        assert result.ok, result.error
    return state


def _four(state_of_d: str = "normal") -> ClusterMetadata:
    new = Member(D, "node4", "joining", "age1node4", "127.0.0.1", 7004)
    state = _apply(three_node_state(), metadata.cmd_member_add(new))
    if state_of_d != "joining":
        state = _apply(state, metadata.cmd_member_state(D, state_of_d))
    return state


def test_the_threshold_is_a_majority_as_cluster_up_splits() -> None:
    assert [threshold_for(n) for n in range(1, 8)] == [1, 2, 2, 3, 3, 4, 4]
    assert MAX_HOLDERS == shamir.MAX_SHARES


def test_a_member_without_a_recipient_on_record_is_no_target() -> None:
    state = _four()
    blind = replace(state.members[D], age_recipient="")
    state = replace(state, members={**state.members, D: blind})
    assert targets(state, ALL) == [A, B, C]
    assert reshare_reason(state, ALL, ALL) is None


def test_at_most_max_holders_targets() -> None:
    state = three_node_state()
    for i in range(20):
        new = Member(f"id-x{i:02d}", f"x{i}", "normal", "age1x", "127.0.0.1", 8000 + i)
        state = _apply(state, metadata.cmd_member_add(new))
    voters = frozenset(state.members)
    wanted = targets(state, voters)
    assert len(wanted) == MAX_HOLDERS
    assert wanted == sorted(voters)[:MAX_HOLDERS]
    step = plan_reshare(state, voters, voters)
    assert step is not None
    assert (step.shares, step.threshold) == (16, 9)


def test_nothing_is_due_while_the_holders_are_the_live_normal_voters() -> None:
    assert reshare_reason(three_node_state(), ALL, ALL) is None
    assert reshare_reason(_four("joining"), ALL, ALL) is None  # not normal yet
    assert reshare_reason(_four(), {A, B, C}, ALL) is None  # not a voter yet
    assert reshare_reason(_four(), ALL, {A, B, C}) is None  # down: re-shared when back
    no_custody = replace(three_node_state(), custody=None)
    assert reshare_reason(no_custody, ALL, ALL) is None
    assert plan_reshare(no_custody, ALL, ALL) is None


def test_a_new_normal_member_is_a_reason_and_gets_a_share() -> None:
    state = _four()
    assert reshare_reason(state, ALL, ALL) == "node4 holds no share of epoch 0"
    step = plan_reshare(state, ALL, ALL)
    assert step is not None
    assert (step.epoch, step.threshold, step.shares) == (1, 3, 4)
    assert dict(step.numbers) == {A: 1, B: 2, C: 3, D: 4}
    assert step.deliver == (A, B, C, D)
    assert step.recipients[D] == "age1node4"
    assert targets(state, ALL) == [A, B, C, D]


def test_a_removed_or_leaving_holder_is_a_reason() -> None:
    forgotten = _apply(three_node_state(), metadata.cmd_member_state(C, "removed"))
    assert reshare_reason(forgotten, ALL, ALL) == "1 share(s) of epoch 0 left with removed members"
    step = plan_reshare(forgotten, ALL, ALL)
    assert step is not None
    assert step.deliver == (A, B)
    assert step.threshold == 2
    leaving = _apply(three_node_state(), metadata.cmd_member_state(B, "leaving"))
    assert reshare_reason(leaving, ALL, ALL) == "node2 holds a share of epoch 0 and is leaving"
    step = plan_reshare(leaving, ALL, ALL)
    assert step is not None
    assert step.deliver == (A, C)


def test_no_re_share_while_too_few_targets_answer() -> None:
    forgotten = _apply(_four(), metadata.cmd_member_state(C, "removed"))
    assert plan_reshare(forgotten, ALL, {A}) is None  # 3 targets, threshold 2, 1 answers
    step = plan_reshare(forgotten, ALL, {A, B})
    assert step is not None
    assert step.shares == 3
    assert step.threshold == 2
    assert step.deliver == (A, B)


def test_only_a_fully_acknowledged_delivery_commits() -> None:
    step = plan_reshare(_four(), ALL, ALL)
    assert step is not None
    assert holders_of(step, {A, B, C}) is None  # node4 did not acknowledge
    custody = holders_of(step, {A, B, C, D})
    assert custody == Custody(3, 4, "age1admin", {A: 1, B: 2, C: 3, D: 4}, epoch=1)
    state = _apply(_four(), metadata.cmd_custody(custody))
    assert reshare_reason(state, ALL, ALL) is None  # settled


def test_a_member_accepts_a_share_only_from_its_leader_for_a_new_epoch() -> None:
    assert reshare_refusal("node1", "node1", 4, 4, 1, 0) is None
    assert "not the leader I know" in (reshare_refusal("node2", "node1", 4, 4, 1, 0) or "")
    assert "stale term 3 < 4" in (reshare_refusal("node1", "node1", 3, 4, 1, 0) or "")
    assert "no leader known" in (reshare_refusal("node1", None, 4, 4, 1, 0) or "")
    assert "not above the committed" in (reshare_refusal("node1", "node1", 4, 4, 2, 2) or "")
    assert "no admin custody" in (reshare_refusal("node1", "node1", 4, 4, 1, None) or "")


def test_stale_share_files_are_older_epochs_and_an_epoch_not_held() -> None:
    custody = Custody(2, 2, "age1admin", {A: 1, B: 2}, epoch=2)
    assert stale_epochs([0, 1, 2, 3], custody, A) == [0, 1]  # 3 may still commit
    assert stale_epochs([0, 2], custody, C) == [0, 2]  # C is not a holder of epoch 2
    assert stale_epochs([0], replace(custody, epoch=0, holders={}), C) == []  # never epoch 0
    assert stale_epochs([0, 1], None, A) == []


def test_a_leaving_holder_the_threshold_needs_is_removed_only_after_the_re_share() -> None:
    two = _apply(
        three_node_state(),
        metadata.cmd_member_state(C, "removed"),
        metadata.cmd_custody(Custody(2, 2, "age1admin", {A: 1, B: 2}, epoch=1)),
        metadata.cmd_member_state(B, "leaving"),
    )
    conf = ConfState(frozenset({A, B}))
    streamed = {A: two.ring.epoch, B: two.ring.epoch}

    def step_of(state: ClusterMetadata) -> Step | None:
        return next_step(
            state, conf, leader=A, match={}, commit_index=1, streamed=streamed, live={A, B}
        )

    assert step_of(two) is None  # gated: B's share needed
    step = plan_reshare(two, conf.voters, {A, B})
    assert step is not None
    assert step.deliver == (A,)
    assert step.threshold == 1
    custody = holders_of(step, {A})
    assert custody is not None
    reshared = _apply(two, metadata.cmd_custody(custody))
    after = step_of(reshared)
    assert after is not None
    assert (after.node_id, after.state) == (B, "removed")
