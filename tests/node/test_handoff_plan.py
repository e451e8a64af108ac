"""node.cluster.handoff_plan: fallback choice, sloppy/strict W, delivery outcome, backoff."""

from __future__ import annotations

import ast
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

import node.cluster.handoff_plan as plan_module
from node.cluster.handoff_plan import (
    MAX_REFUSALS,
    Delivery,
    backoff_s,
    counts_toward_w,
    delivery_outcome,
    plan_fallbacks,
    write_reached,
)
from node.cluster.ring import Ring, RingMember

PLAN_SETTINGS = settings(max_examples=200, deadline=None, derandomize=True)
KEY = b"ucxl-key-of-some-context"


def ring_of(names: list[str]) -> Ring:
    return Ring([RingMember(name) for name in names], vnodes=8)


def test_next_healthy_node_beyond_the_preference_list_holds_the_hint() -> None:
    names = [f"n{i}" for i in range(1, 7)]
    ring = ring_of(names)
    order = ring.preference_list(KEY, len(names))
    owners = order[:3]
    down = owners[1]
    up = set(names) - {down, order[3]}  # the first node beyond is down too
    plan = plan_fallbacks(ring, KEY, owners, {down}, up, me=owners[0])
    assert plan.holders == {down: order[4]}


def test_the_coordinator_holds_the_hint_when_no_node_is_left() -> None:
    names = ["n1", "n2", "n3"]
    ring = ring_of(names)
    owners = ring.preference_list(KEY, 3)
    plan = plan_fallbacks(ring, KEY, owners, {owners[2]}, set(names) - {owners[2]}, me="n1")
    assert plan.holders == {owners[2]: "n1"}


def test_two_missed_owners_get_two_distinct_holders_in_order() -> None:
    names = [f"n{i}" for i in range(1, 8)]
    ring = ring_of(names)
    order = ring.preference_list(KEY, len(names))
    owners, missed = order[:3], {order[0], order[2]}
    plan = plan_fallbacks(ring, KEY, owners, missed, set(names) - missed, me=owners[1])
    assert plan.holders == {order[0]: order[3], order[2]: order[4]}


def test_strict_counts_owners_only_and_sloppy_counts_durable_hints() -> None:
    assert not write_reached({"a"}, {"b"}, 2, sloppy=False)
    assert write_reached({"a"}, {"b"}, 2, sloppy=True)
    assert write_reached({"a", "b"}, set(), 2, sloppy=False)
    assert not write_reached(set(), {"a"}, 2, sloppy=True)
    assert write_reached({"a"}, {"a"}, 1, sloppy=True)
    assert not write_reached({"a"}, {"a"}, 2, sloppy=True)  # one owner counts once


def test_refusals_are_retried_a_bounded_number_of_times() -> None:
    assert delivery_outcome([True, False], 0) is Delivery.DELIVERED
    assert delivery_outcome([], 0) is Delivery.DELIVERED
    assert delivery_outcome([True, None, False], 0) is Delivery.RETRY
    assert delivery_outcome([True, False], MAX_REFUSALS - 1) is Delivery.DELIVERED
    outcomes = [delivery_outcome([None], before) for before in range(MAX_REFUSALS)]
    assert outcomes == [Delivery.RETRY] * (MAX_REFUSALS - 1) + [Delivery.REFUSED]


def test_backoff_doubles_and_is_capped() -> None:
    assert [backoff_s(1.0, f) for f in range(7)] == [0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0]
    assert backoff_s(1.0, 60) == 32.0


def test_the_core_is_pure() -> None:
    tree = ast.parse(Path(plan_module.__file__).read_text(encoding="utf-8"))
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {
        node.module.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module
    }
    assert not imported & {"trio", "time", "random", "os", "socket"}


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[Ring, list[str], set[str], set[str], str]:
    size = draw(st.integers(1, 9))
    names = [f"n{i}" for i in range(size)]
    ring = ring_of(names)
    n = draw(st.integers(1, size))
    owners = ring.preference_list(KEY, n)
    up = set(draw(st.lists(st.sampled_from(names), unique=True)))
    me = draw(st.sampled_from(names))
    up.add(me)
    missed = {o for o in owners if o not in up} | set(
        draw(st.lists(st.sampled_from(owners), unique=True))
    )
    return ring, owners, missed, up, me


@PLAN_SETTINGS
@given(scenarios())
def test_fallback_properties(scenario: tuple[Ring, list[str], set[str], set[str], str]) -> None:
    """One up holder per missed owner; never another owner; distinct unless the coordinator."""
    ring, owners, missed, up, me = scenario
    holders = plan_fallbacks(ring, KEY, owners, missed, up, me).holders
    assert set(holders) == missed
    for holder in holders.values():
        assert holder in up
        assert holder == me or holder not in owners
    others = [h for h in holders.values() if h != me]
    assert len(others) == len(set(others))
    spare = [n for n in ring.preference_list(KEY, len(ring)) if n not in owners and n in up]
    spare = [n for n in spare if n != me]
    assert len(others) == min(len(missed), len(spare))  # self only once the spares ran out


def test_one_owner_counts_toward_w_by_its_store_or_under_a_sloppy_quorum_by_its_hint() -> None:
    assert counts_toward_w(stored=True, hinted=False, sloppy=False)
    assert not counts_toward_w(stored=False, hinted=True, sloppy=False)
    assert counts_toward_w(stored=False, hinted=True, sloppy=True)
    assert not counts_toward_w(stored=False, hinted=False, sloppy=True)
