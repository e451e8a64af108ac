"""node.cluster.rebalance_plan: walk, barrier, targets, offers and cleanup decisions."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from node.cluster import rebalance_plan as plan
from node.cluster.antientropy import ContextState
from node.cluster.layout import Layout
from storage.versions import VersionId

SETTINGS = settings(max_examples=150, deadline=None, derandomize=True)
JOIN = Layout(2, ("n1", "n2", "n3"), ("n1", "n2", "n3", "n4"))
STEADY = Layout(3, ("n1", "n2", "n3", "n4"), ("n1", "n2", "n3", "n4"))


def vid(ms: int) -> str:
    return str(VersionId(ms, 0, "node"))


def test_walk_kind() -> None:
    assert plan.walk_kind(JOIN, 1, None) == plan.STREAM
    assert plan.walk_kind(JOIN, 2, None) is None  # stream_done(2) marked: nothing to do
    assert plan.walk_kind(STEADY, 2, JOIN.new) == plan.REPORT  # the transition's end
    assert plan.walk_kind(STEADY, 2, None) == plan.RESTORE  # restarted: cannot know
    forget = Layout(4, ("n1", "n2", "n3"), ("n1", "n2", "n3"))
    assert plan.walk_kind(forget, 3, STEADY.new) == plan.RESTORE  # a member vanished


def test_barrier_needs_every_name() -> None:
    assert plan.barrier_met(["n1", "n2"], {"n1": 2, "n2": 3}, 2)
    assert not plan.barrier_met(["n1", "n2"], {"n1": 2}, 2)
    assert not plan.barrier_met(["n1"], {"n1": 1}, 2)


lists = st.lists(st.sampled_from(["n1", "n2", "n3", "n4", "n5"]), min_size=1, max_size=3,
                 unique=True)  # fmt: skip


@SETTINGS
@given(lists, lists, st.sampled_from(["n1", "n2", "n3", "n4", "n5"]))
def test_targets(old: list[str], new: list[str], me: str) -> None:
    """Stream: the new-only owners; restore: every other owner; never this node."""
    streamed = plan.targets(plan.STREAM, old, new, me)
    assert set(streamed) == set(new) - set(old) - {me}
    assert set(plan.targets(plan.RESTORE, old, new, me)) == set(new) - {me}


def test_offer_sends_what_they_lack_and_respects_their_marker() -> None:
    mine = ContextState(frozenset({vid(1), vid(2), vid(3)}), None)
    assert plan.offer(mine, ContextState(frozenset({vid(2)}))).push == (vid(1), vid(3))
    purged = ContextState(frozenset(), vid(2))  # they purged up to 2
    todo = plan.offer(mine, purged)
    assert todo.push == (vid(3),)
    assert not todo.send_marker
    assert plan.offer(mine, ContextState(frozenset(mine.version_ids))).empty
    marked = ContextState(frozenset({vid(3)}), vid(2))
    assert plan.offer(marked, ContextState(frozenset({vid(3)}))).send_marker


def test_cleanup_waits_for_a_settled_layout_every_member_and_this_walk() -> None:
    everyone = {n: 3 for n in STEADY.new}
    assert plan.cleanup_ready(STEADY, everyone, 3)
    assert not plan.cleanup_ready(STEADY, everyone, 2)  # this node's walk not done
    assert not plan.cleanup_ready(STEADY, {**everyone, "n4": 2}, 3)  # n4 lags
    assert not plan.cleanup_ready(JOIN, {n: 2 for n in JOIN.members}, 2)  # in transition
    assert plan.drops(("n1", "n2", "n4"), "n3")
    assert not plan.drops(("n1", "n3"), "n3")


def test_pending_ranges_counts_arcs_not_walked_past() -> None:
    arcs = [(0, 10), (20, 30), (40, 50)]
    assert plan.pending_ranges(arcs, None) == 3
    assert plan.pending_ranges(arcs, 25) == 2
    assert plan.pending_ranges(arcs, 50) == 0
