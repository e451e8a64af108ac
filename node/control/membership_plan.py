"""The decisions of a membership transition: the leader's next step, and what to refuse.

A pure core (ARCHITECTURE.md §2, §6): no I/O, no trio, no clock, no randomness. The
leader's shell (``node.control.membership``) calls ``next_step`` with what it knows now
(the applied metadata, the Raft configuration, the replication progress, the commit
index, the ``streamed`` epochs the data plane recorded, which members answer) and
carries out the one step it returns; then it asks again. Every input is in the log or
derived from the leader's Raft state, so a new leader resumes wherever the metadata and
the configuration say (nothing is remembered between calls).

Owns: the order of the steps and when each is due:

==========================================================  ============================
situation                                                   step
==========================================================  ============================
a Raft member (voter or learner) is removed or unknown      ``conf``: drop it
  in the metadata
a member joining/normal/leaving is not in the configuration  ``conf``: add as learner
a learner joining/normal whose match index >= commit index  ``conf``: promote to voter
a joining member, and every live ring member (old and new)  ``state``: joining -> normal
  streamed for the current ring epoch
a leaving member, likewise, unless it holds an admin share  ``state``: leaving -> removed
  the threshold still needs (``custody_gate``: the
  re-share hands it over first, node.control.reshare)
==========================================================  ============================

Conf steps come first and one at a time (``conf_blocked``: a conf entry is still
uncommitted); the leader drops itself last. Also owns the refusals of the operator's
``ctl.member_add`` / ``member_remove`` / ``member_forget`` (``add_refusal``,
``remove_refusal``, ``forget_refusal``), among them the custody rule: forgetting a
shareholder must leave at least ``threshold`` holders of the current custody epoch, or
the admin key could not be rebuilt (the leader re-shares right after a forget that
leaves enough; a removed member's share is handed over by a re-share before it goes,
so ``remove`` is not refused for custody; see docs/cluster.md).

Must not know: Raft's rules (the core checks every conf change again), how a range is
streamed (the data plane records ``streamed``), RPC, the clock.

Invariants: ``next_step`` is a function of its arguments; it never proposes a transition
the metadata's ``TRANSITIONS`` refuses, never more than one conf change at a time, and
never a state step while some live ring member has not streamed for the ring epoch.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Literal

from node.control.metadata import TRANSITIONS, ClusterMetadata, Member
from node.control.raft_types import ConfState

ACTIVE_STATES = frozenset({"joining", "normal", "leaving"})
PROMOTABLE_STATES = frozenset({"joining", "normal"})


@dataclass(frozen=True)
class Step:
    """One step of a transition. ``kind`` "conf": propose ``conf`` (a single-server change);
    "state": move ``node_id`` to ``state``. ``why`` says what led to it (for the log)."""

    kind: Literal["conf", "state"]
    node_id: str
    why: str
    conf: ConfState | None = None
    state: str | None = None


def _conf_step(
    state: ClusterMetadata,
    conf: ConfState,
    leader: str,
    match: Mapping[str, int],
    commit_index: int,
) -> Step | None:
    members = state.members
    in_conf = conf.voters | conf.learners
    gone = sorted(
        n for n in in_conf if members.get(n) is None or members[n].state not in ACTIVE_STATES
    )
    gone.sort(key=lambda n: n == leader)  # the leader drops itself last
    if gone:
        node = gone[0]
        new = ConfState(conf.voters - {node}, conf.learners - {node})
        return Step("conf", node, "removed from the cluster metadata", conf=new)
    for node_id, member in sorted(members.items()):
        if member.state in ACTIVE_STATES and node_id not in in_conf:
            new = ConfState(conf.voters, conf.learners | {node_id})
            return Step("conf", node_id, f"a {member.state} member: add as learner", conf=new)
    for node_id in sorted(conf.learners):
        member = members[node_id]
        if member.state in PROMOTABLE_STATES and match.get(node_id, 0) >= commit_index:
            new = ConfState(conf.voters | {node_id}, conf.learners - {node_id})
            return Step("conf", node_id, "the learner caught up: promote to voter", conf=new)
    return None


def unstreamed(
    state: ClusterMetadata, streamed: Mapping[str, int], live: Collection[str]
) -> list[str]:
    """Node ids of the live members of the ring (old and new: joining, normal, leaving)
    that have not streamed for the current ring epoch, sorted."""
    epoch = state.ring.epoch
    return sorted(
        node_id
        for node_id, member in state.members.items()
        if member.state in ACTIVE_STATES and node_id in live and streamed.get(node_id, 0) < epoch
    )


def custody_gate(state: ClusterMetadata, member: Member) -> str | None:
    """Why leaving ``member`` may not become removed yet (None: it may): it holds a share
    of the current custody epoch that the holders staying need to reach the threshold.
    A re-share to the staying members lifts it."""
    return custody_refusal(state, member)


def _state_step(
    state: ClusterMetadata, streamed: Mapping[str, int], live: Collection[str]
) -> Step | None:
    moving = [
        (node_id, m) for node_id, m in sorted(state.members.items())
        if m.state == "joining" or (m.state == "leaving" and custody_gate(state, m) is None)
    ]  # fmt: skip
    if not moving or unstreamed(state, streamed, live):
        return None
    node_id, member = moving[0]
    target = "normal" if member.state == "joining" else "removed"
    assert target in TRANSITIONS[member.state]
    why = f"every live ring member streamed for ring epoch {state.ring.epoch}"
    return Step("state", node_id, why, state=target)


def next_step(
    state: ClusterMetadata,
    conf: ConfState,
    *,
    leader: str,
    match: Mapping[str, int],
    commit_index: int,
    streamed: Mapping[str, int],
    live: Collection[str],
    conf_blocked: bool = False,
) -> Step | None:
    """The leader's next step of the transitions under way (None: nothing to do now).

    Args:
        state: the metadata the leader applied.
        conf: the Raft configuration (the latest, committed or not).
        leader: the leader's node id.
        match: the leader's replication progress, node id -> match index.
        commit_index: the leader's commit index.
        streamed: node id -> the ring epoch it last streamed everything for (the data
            plane's record in the metadata).
        live: node ids of the members that answer now (the leader itself included).
        conf_blocked: a conf entry is still uncommitted (no conf step now).
    """
    if not conf_blocked:
        step = _conf_step(state, conf, leader, match, commit_index)
        if step is not None:
            return step
    return _state_step(state, streamed, live)


# -- the operator's requests ------------------------------------------------------------------


def add_refusal(state: ClusterMetadata, name: str, node_id: str) -> str | None:
    """Why ``ctl.member_add`` of ``name`` (``node_id``) is refused (None: it is not)."""
    known = state.members.get(node_id)
    if known is not None:
        return f"node id {node_id} is or was the member {known.name!r} ({known.state})"
    if state.member_by_name(name) is not None:
        return f"the name {name!r} is taken by a member"
    return None


def remove_refusal(state: ClusterMetadata, name: str) -> str | None:
    """Why ``ctl.member_remove`` of ``name`` is refused (None: it is not)."""
    member = state.member_by_name(name)
    if member is None:
        return f"no member {name!r}"
    if member.state != "normal":
        return f"{name} is {member.state}; only a normal member can be removed"
    others = [m for m in state.members.values() if m.state == "normal" and m is not member]
    if not others:
        return f"{name} is the last normal member"
    return None  # an admin share it holds is re-shared to the others before it goes


def forget_refusal(state: ClusterMetadata, name: str, *, answers: bool) -> str | None:
    """Why ``ctl.member_forget`` of ``name`` is refused (None: it is not).

    Args:
        answers: whether the node answered a ping just now (a live node is removed with
            ``member_remove``, which streams its ranges away first).
    """
    member = state.member_by_name(name)
    if member is None:
        return f"no member {name!r}"
    if answers:
        return f"{name} is alive (it answers); use remove to decommission it"
    return custody_refusal(state, member)


def custody_refusal(state: ClusterMetadata, member: Member) -> str | None:
    """Why dropping ``member`` would endanger the admin key (None: it would not)."""
    custody = state.custody
    if custody is None or member.node_id not in custody.holders:
        return None
    staying = [
        node_id for node_id in custody.holders
        if node_id != member.node_id and member_state(state, node_id) in PROMOTABLE_STATES
    ]  # fmt: skip
    left = len(staying)  # holders leaving already will drop out too
    if left < custody.threshold:
        return (
            f"{member.name} holds admin share {custody.holders[member.node_id]}: without it "
            f"{left} shareholders of custody epoch {custody.epoch} would remain, below the "
            f"threshold {custody.threshold}, and the admin key could not be rebuilt"
        )
    return None


def member_state(state: ClusterMetadata | None, node_id: str) -> str | None:
    """The state of member ``node_id`` (None: unknown, or no metadata yet)."""
    if state is None:
        return None
    member = state.members.get(node_id)
    return None if member is None else member.state
