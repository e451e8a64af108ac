"""The pure coordinator core: ranks, delete, resolution, search role, repair plan, budgets."""

from __future__ import annotations

from itertools import combinations

from hypothesis import given, settings
from hypothesis import strategies as st

from node.cluster.coordinator import (
    RepairPlan,
    choose_context,
    decide_delete,
    fitting,
    inner_timeout,
    needs_pre_read,
    page_versions,
    repair_plan,
    search_role,
    write_ranks,
)
from node.cluster.replication import VersionSet, merge_version_sets
from storage.views import ContextInfo

AUTH = {"admin": 5, "architect": 4, "developer": 2, "observer": 1}
vids = st.integers(0, 40).map(lambda i: f"{i:012x}-000000-n")


def test_write_ranks_count_down_from_the_reported_head() -> None:
    ranks = write_ranks({"c": ["002", "001", "003"]}, {"c": 7})
    assert ranks == {("c", "003"): 7, ("c", "002"): 6, ("c", "001"): 5}
    assert write_ranks({"d": ["001", "002"]}, {}) == {("d", "001"): 1, ("d", "002"): 1}


def test_delete_needs_a_live_newest_version() -> None:
    assert decide_delete([]) is None
    assert decide_delete([("001", False), ("002", True)]) is None
    decision = decide_delete([("001", False), ("002", False)])
    assert decision is not None
    assert (decision.parent, decision.fallback_count) == ("002", 3)


def _info(name: str, updated: int, live: bool = True) -> ContextInfo:
    return ContextInfo(name, name, 1, "001", updated, live)


def test_a_wildcard_resolves_to_the_newest_live_match() -> None:
    infos = [_info("a", 5), _info("b", 9, live=False), _info("c", 7), _info("d", 99)]
    assert choose_context(infos, [True, True, True, False]) == infos[2]
    assert choose_context(infos, [False, True, False, False]) is None


def test_search_role_rules() -> None:
    assert search_role("node", (), "x", AUTH).role == "x"
    assert search_role("client", ("developer",), "admin", AUTH).refusal is not None
    assert search_role("client", ("admin",), None, AUTH).role is None
    assert search_role("client", ("observer", "architect"), None, AUTH).role == "architect"
    assert search_role("client", ("stranger",), None, AUTH).refusal is not None


sets = st.dictionaries(st.sampled_from(["n1", "n2", "n3"]), st.sets(vids), min_size=1)


@settings(max_examples=200, deadline=None)
@given(sets, st.integers(1, 64))
def test_after_the_repair_plan_every_replica_holds_the_merged_union(
    held: dict[str, set[str]], budget: int
) -> None:
    """Applying the plan leaves every replica with the union; nothing sent twice to one."""
    answers = {
        n: VersionSet({v: bytes(int(v[:12], 16) % 7 + 1) for v in vs}) for n, vs in held.items()
    }
    merged = merge_version_sets(answers)
    plan = repair_plan(merged, budget)
    union = {vid for vid, _ in merged.envelopes}
    sizes = dict(merged.envelopes)
    for node, versions in held.items():
        sent = [vid for batch in plan.pushes.get(node, ()) for vid in batch]
        assert len(sent) == len(set(sent))
        assert versions | set(sent) == union
        for batch in plan.pushes.get(node, ()):
            assert len(batch) == 1 or sum(len(sizes[v]) for v in batch) <= budget
    assert isinstance(plan, RepairPlan)


@settings(max_examples=200, deadline=None)
@given(st.lists(vids, unique=True), st.integers(1, 30))
def test_paging_returns_every_row_once_in_order(ids: list[str], budget: int) -> None:
    """Following ``more`` from page to page yields every row exactly once, in order."""
    rows = [(vid, bytes(int(vid[:12], 16) % 5 + 1)) for vid in sorted(ids)]
    got: list[tuple[str, bytes]] = []
    after = None
    while True:
        page, more = page_versions(rows, after, budget)
        got.extend(page)
        if not more:
            break
        assert page
        after = page[-1][0]
    assert got == rows


@given(
    st.floats(0, 100),
    st.one_of(st.none(), st.floats(-10, 100)),
    st.floats(0, 1),
)
def test_an_inner_call_never_outlives_the_clients_deadline(
    configured: float, remaining: float | None, margin: float
) -> None:
    """The budget is within [0, configured] and never beyond remaining - margin."""
    budget = inner_timeout(configured, remaining, margin)
    assert 0 <= budget <= configured
    if remaining is not None:
        assert budget <= max(remaining - margin, 0)


@given(st.lists(st.integers(0, 50)), st.integers(1, 120))
def test_fitting_takes_the_longest_prefix_within_budget(sizes: list[int], budget: int) -> None:
    """The prefix fits the budget (or is one item), and one more item would not fit."""
    count = fitting(sizes, budget)
    assert (count == 0) == (not sizes)
    if count > 1:
        assert sum(sizes[:count]) <= budget
    if 0 < count < len(sizes):
        assert sum(sizes[: count + 1]) > budget


@given(st.integers(min_value=1, max_value=9), st.data())
def test_a_write_skips_the_pre_read_exactly_when_its_quorum_meets_every_purge_quorum(
    n: int, data: st.DataObject
) -> None:
    """No pre-read iff every W-write set intersects every purge set (brute force)."""
    write_w = data.draw(st.integers(min_value=1, max_value=n))
    purge_w = data.draw(st.integers(min_value=1, max_value=n))
    nodes = range(n)
    always_meet = all(
        set(a) & set(b) for a in combinations(nodes, write_w) for b in combinations(nodes, purge_w)
    )
    assert needs_pre_read(write_w, purge_w, n) is not always_meet
