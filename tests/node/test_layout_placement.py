"""node.cluster.layout and quorum groups: layout-aware placement and quorum decisions."""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from itertools import pairwise

from hypothesis import given, settings
from hypothesis import strategies as st

from node.cluster.layout import Layout, layout_of, moving_arcs, place_layout, place_read
from node.cluster.replication import Outcome, Placement, QuorumTracker, place
from node.cluster.ring import KEY_SPACE, Ring, RingMember

SETTINGS = settings(max_examples=120, deadline=None, derandomize=True)
VNODES = 4  # 256 partitions: fast, and still many arcs


def ring(*names: str) -> Ring:
    return Ring([RingMember(n) for n in names], vnodes=VNODES)


@dataclass(frozen=True)
class _M:
    name: str
    state: str


@dataclass(frozen=True)
class _R:
    epoch: int


@dataclass(frozen=True)
class _Meta:
    members: dict[str, _M]
    ring: _R


def test_layout_of_reads_member_states() -> None:
    meta = _Meta(
        {
            "a": _M("n1", "normal"),
            "b": _M("n2", "leaving"),
            "c": _M("n3", "joining"),
            "d": _M("n4", "removed"),
        },
        _R(7),
    )
    layout = layout_of(meta)
    assert layout == Layout(7, ("n1", "n2"), ("n1", "n3"))
    assert layout.in_transition
    assert layout.members == ("n1", "n2", "n3")
    steady = layout_of(_Meta({"a": _M("n1", "normal"), "d": _M("n4", "removed")}, _R(9)))
    assert steady == Layout.steady(9, ["n1"])
    assert not steady.in_transition


@SETTINGS
@given(st.binary(min_size=1, max_size=16), st.sets(st.sampled_from(["n1", "n2", "n3", "n4"])))
def test_place_layout_is_plain_placement_when_the_lists_agree(key: bytes, up: set[str]) -> None:
    """With equal rings, the layout placement is today's placement (no groups)."""
    r = ring("n1", "n2", "n3", "n4")
    assert place_layout(r, r, key, 3, up) == place(r, key, 3, up)


@SETTINGS
@given(st.binary(min_size=1, max_size=16), st.sets(st.sampled_from(["n1", "n2", "n3", "n4"])))
def test_place_layout_in_transition_is_the_union_with_a_group_per_list(
    key: bytes, up: set[str]
) -> None:
    """The union holds both lists, old first; each list is a quorum group."""
    old, new = ring("n1", "n2", "n3"), ring("n1", "n2", "n3", "n4")
    p = place_layout(old, new, key, 3, up)
    old_list, new_list = old.preference_list(key, 3), new.preference_list(key, 3)
    assert p.replicas[:3] == tuple(old_list)
    assert set(p.replicas) == set(old_list) | set(new_list)
    assert p.live == tuple(x for x in p.replicas if x in up)
    if old_list == new_list:
        assert p.groups == ()
    else:
        assert p.groups == (tuple(old_list), tuple(new_list))


@SETTINGS
@given(st.binary(min_size=1, max_size=16), st.sets(st.sampled_from(["n1", "n2", "n3", "n4"])))
def test_place_read_counts_the_old_list_and_asks_the_new_only_owners(
    key: bytes, up: set[str]
) -> None:
    """A read asks old ∪ new (old first); R counts in its one group, the old list."""
    old, new = ring("n1", "n2", "n3"), ring("n1", "n2", "n3", "n4")
    p = place_read(old, new, key, 3, up)
    old_list, new_list = old.preference_list(key, 3), new.preference_list(key, 3)
    assert p.replicas[:3] == tuple(old_list)
    assert set(p.replicas) == set(old_list) | set(new_list)
    assert p.live == tuple(x for x in p.replicas if x in up)
    if old_list == new_list:
        assert p == place(old, key, 3, up)
    else:
        assert p.groups == (tuple(old_list),)
        assert p.can_reach(2) == (sum(1 for x in old_list if x in up) >= 2)


def test_a_read_in_transition_is_not_reached_by_a_new_only_answer() -> None:
    """R=2 with one old-list answer and the new owner's: still pending; the old list's
    second answer reaches it."""
    old, new = ring("n1", "n2", "n3"), ring("n1", "n2", "n3", "n4")
    key = next(k.to_bytes(4, "big") for k in range(10_000)
               if "n4" in new.preference_list(k.to_bytes(4, "big"), 3))  # fmt: skip
    p = place_read(old, new, key, 3, {"n1", "n2", "n3", "n4"})
    tracker = QuorumTracker(p.live, 2, groups=p.groups)
    first, second = p.groups[0][:2]
    assert tracker.record("n4", True) is Outcome.PENDING
    assert tracker.record(first, True) is Outcome.PENDING
    assert (len(tracker.ok), tracker.counted) == (2, 1)  # n4's answer counts nowhere
    assert tracker.record(second, True) is Outcome.REACHED
    assert tracker.counted == 2


def reference_outcome(groups: list[list[str]], needed: int, ok: set[str], failed: set[str]) -> str:
    """The obvious rule: reached when every group has ``needed`` ok; failed when a group
    cannot get there any more."""
    if all(len(set(g) & ok) >= needed for g in groups):
        return "reached"
    if any(len(set(g) - failed) < needed for g in groups):
        return "failed"
    return "pending"


@SETTINGS
@given(
    st.permutations(["a", "b", "c", "d"]),
    st.lists(st.booleans(), min_size=4, max_size=4),
    st.integers(1, 3),
    st.integers(0, 3),
)
def test_group_quorum_matches_the_reference(
    order: list[str], answers: list[bool], needed: int, split: int
) -> None:
    """After every answer, the grouped tracker agrees with the reference rule."""
    groups = (("a", "b", "c"), ("a", "b", "d")) if split else (("a", "b", "c"),)
    asked = sorted({x for g in groups for x in g})
    tracker = QuorumTracker(asked, needed, groups=groups if split else ())
    ok: set[str] = set()
    failed: set[str] = set()
    for node, success in zip([x for x in order if x in asked], answers, strict=False):
        (ok if success else failed).add(node)
        outcome = tracker.record(node, success)
        want = reference_outcome([list(g) for g in groups], needed, ok, failed)
        assert outcome.value == want, (groups, ok, failed)


def test_a_write_needs_w_in_the_old_and_in_the_new_list() -> None:
    """W=2 acks from the old list alone do not make a transition write succeed."""
    groups = (("n1", "n2", "n3"), ("n1", "n2", "n4"))
    tracker = QuorumTracker(["n1", "n2", "n3", "n4"], 2, groups=groups)
    assert tracker.record("n3", True) is Outcome.PENDING
    assert tracker.record("n1", True) is Outcome.PENDING  # old has 2, new has 1
    assert tracker.record("n4", True) is Outcome.REACHED
    placement = Placement(("n1", "n2", "n3", "n4"), ("n1", "n3"), groups)
    assert not placement.can_reach(2)  # the new list has one live replica only


def _lookup(arcs: list[tuple[int, int, tuple[str, ...]]], position: int) -> frozenset[str]:
    starts = [a[0] for a in arcs]
    return frozenset(arcs[bisect.bisect_right(starts, position) - 1][2])


@settings(max_examples=20, deadline=None, derandomize=True)
@given(st.integers(3, 6), st.booleans())
def test_moving_arcs_are_exactly_where_replica_sets_differ(size: int, join: bool) -> None:
    """Every boundary sub-arc is inside a moving arc iff its replica sets differ."""
    names = [f"n{i}" for i in range(1, size + 1)]
    old, new = (ring(*names[:-1]), ring(*names)) if join else (ring(*names), ring(*names[1:]))
    moving = moving_arcs(old, new, 3)
    a, b = old.ranges(3), new.ranges(3)
    cuts = sorted({s for s, _, _ in a} | {s for s, _, _ in b} | {KEY_SPACE})
    for start, end in pairwise(cuts):
        differs = _lookup(a, start) != _lookup(b, start)
        inside = any(s <= start and end <= e for s, e in moving)
        assert differs == inside
    assert moving, "a membership change moves something"
    assert moving_arcs(old, old, 3) == []
