"""The anti-entropy core: incremental hash trees, diffs, exchange plans, the throttle."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.cluster.antientropy import (
    ContextPlan,
    ContextState,
    HashTree,
    TokenBucket,
    apply_plan,
    change_delta,
    context_digest,
    covered,
    differing,
    differing_contexts,
    key_position,
    partitions_in,
    plan_exchange,
    winning_upto,
)
from node.cluster.ring import Ring, RingMember

CONTEXTS = [f"proj\x00task\x00agent\x00role\x00doc{i}".encode() for i in range(12)]


def vid(ms: int, node: str = "a") -> str:
    return f"{ms:012x}-000000-{node}"


# an operation: ("add", ctx index, version ms) or ("purge", ctx index, upto ms)
ops = st.lists(
    st.tuples(
        st.sampled_from(["add", "add", "add", "purge", "expire"]),
        st.integers(0, len(CONTEXTS) - 1),
        st.integers(1, 40),
    ),
    max_size=80,
)


class Model:
    """A replica's version sets and markers, applying changes the way the store does."""

    def __init__(self, tree: HashTree) -> None:
        self.ids: dict[bytes, set[str]] = {}
        self.upto: dict[bytes, str] = {}
        self.tree = tree

    def add(self, ctx: bytes, version: str) -> None:
        held = self.ids.setdefault(ctx, set())
        if version in held or covered(version, self.upto.get(ctx)):
            return
        held.add(version)
        self.tree.apply(ctx, change_delta(ctx, added=[version]))

    def purge(self, ctx: bytes, upto: str) -> None:
        old = self.upto.get(ctx)
        if winning_upto(old, upto) == old and old is not None:
            return
        removed = [v for v in self.ids.get(ctx, set()) if covered(v, upto)]
        self.ids[ctx] = self.ids.get(ctx, set()) - set(removed)
        self.upto[ctx] = upto
        self.tree.apply(ctx, change_delta(ctx, removed=removed, old_upto=old, new_upto=upto))

    def expire(self, ctx: bytes, version: str) -> None:
        if version in self.ids.get(ctx, set()):
            self.ids[ctx].discard(version)
            self.tree.apply(ctx, change_delta(ctx, removed=[version]))

    def run(self, steps: list[tuple[str, int, int]]) -> None:
        for op, index, ms in steps:
            getattr(self, op)(CONTEXTS[index], vid(ms))

    def states(self) -> dict[bytes, ContextState]:
        keys = set(self.ids) | set(self.upto)
        return {c: ContextState(frozenset(self.ids.get(c, ())), self.upto.get(c)) for c in keys}

    def rebuilt(self) -> HashTree:
        rows = [(c, s.version_ids, s.upto) for c, s in self.states().items()]
        return HashTree.rebuilt(self.tree.partitions, self.tree.leaves, rows)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(ops)
def test_incremental_tree_equals_rebuilt_tree(steps: list[tuple[str, int, int]]) -> None:
    """After any sequence of adds, purges and expiries the kept tree equals a rebuilt one."""
    model = Model(HashTree(8, 4))
    model.run(steps)
    assert model.tree == model.rebuilt()
    for ctx, state in model.states().items():
        assert model.tree.digest(ctx) == context_digest(ctx, state.version_ids, state.upto)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(ops, ops)
def test_diff_finds_exactly_the_differing_contexts(
    a_steps: list[tuple[str, int, int]], b_steps: list[tuple[str, int, int]]
) -> None:
    """Descending roots, leaves and digests finds exactly the contexts whose states differ."""
    a, b = Model(HashTree(8, 4)), Model(HashTree(8, 4))
    a.run(a_steps)
    b.run(b_steps)
    found: set[bytes] = set()
    roots_a = {p: a.tree.root(p) for p in range(8)}
    roots_b = {p: b.tree.root(p) for p in range(8)}
    for partition in differing(roots_a, roots_b):
        for leaf in differing(a.tree.leaf_hashes(partition), b.tree.leaf_hashes(partition)):
            found |= set(
                differing_contexts(
                    a.tree.contexts_in(partition, leaf), b.tree.contexts_in(partition, leaf)
                )
            )
    empty = ContextState(frozenset())
    sa, sb = a.states(), b.states()
    truly = {c for c in set(sa) | set(sb) if sa.get(c, empty) != sb.get(c, empty)}
    assert found == truly


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    st.frozensets(st.integers(1, 30)),
    st.frozensets(st.integers(1, 30)),
    st.none() | st.integers(1, 30),
    st.none() | st.integers(1, 30),
)
def test_plan_converges_to_union_minus_purged(
    mine_ms: frozenset[int], theirs_ms: frozenset[int], up_a: int | None, up_b: int | None
) -> None:
    """After a plan both sides hold the union minus what the winning marker covers."""
    a_upto = None if up_a is None else vid(up_a)
    b_upto = None if up_b is None else vid(up_b)
    # a replica never holds what its own marker covers
    mine = ContextState(frozenset(vid(m) for m in mine_ms if not covered(vid(m), a_upto)), a_upto)
    theirs = ContextState(
        frozenset(vid(m) for m in theirs_ms if not covered(vid(m), b_upto)), b_upto
    )
    plan = plan_exchange(mine, theirs)
    upto = winning_upto(a_upto, b_upto)
    assert not any(covered(v, upto) for v in plan.push + plan.pull)
    after_a, after_b = apply_plan(mine, theirs, plan)
    assert after_a == after_b
    union = {v for v in mine.version_ids | theirs.version_ids if not covered(v, upto)}
    assert after_a.version_ids == union
    assert after_a.upto == upto
    assert plan_exchange(after_a, after_b).empty


def test_plan_examples() -> None:
    mine = ContextState(frozenset({vid(1), vid(5)}), None)
    theirs = ContextState(frozenset({vid(5), vid(9)}), vid(3))
    plan = plan_exchange(mine, theirs)
    assert plan == ContextPlan(push=(), pull=(vid(9),), send_marker=False, take_marker=True)


def test_tree_uses_the_rings_partitions() -> None:
    ring = Ring([RingMember("a"), RingMember("b")], vnodes=2)
    tree = HashTree(ring.partitions, 16)
    for ctx in CONTEXTS:
        assert key_position(ctx) == ring.key_position(ctx)
        assert tree.partition_of(ctx) == (ring.key_position(ctx) * ring.partitions) >> 64


def test_tree_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="partitions"):
        HashTree(0, 4)


def test_token_bucket_paces_spending() -> None:
    bucket = TokenBucket(100.0, 50.0, now=0.0)
    assert bucket.delay(50, now=0.0) == 0.0
    bucket.spend(50, now=0.0)
    assert bucket.delay(10, now=0.0) == pytest.approx(0.1)
    assert bucket.delay(10, now=0.1) == 0.0
    bucket.spend(500, now=0.1)  # larger than the burst: allowed once, leaves debt
    assert bucket.delay(1, now=0.1) == pytest.approx(4.91)
    assert bucket.delay(1, now=10.0) == 0.0
    with pytest.raises(ValueError, match="rate"):
        TokenBucket(0, 1, now=0)


@settings(max_examples=100, deadline=None, derandomize=True)
@given(st.lists(st.tuples(st.floats(0, 5), st.integers(1, 400)), max_size=30))
def test_token_bucket_never_exceeds_rate(steps: list[tuple[float, int]]) -> None:
    """Spending only after waiting the asked delay never exceeds burst + rate * time."""
    rate, burst = 100.0, 200.0
    now, spent = 0.0, 0
    bucket = TokenBucket(rate, burst, now=0.0)
    for gap, amount in steps:
        now += gap
        now += bucket.delay(amount, now=now)
        bucket.spend(amount, now=now)
        spent += amount
        assert spent <= burst + rate * now + max(a for _, a in steps) + 1e-6


def test_partitions_in_tiles_the_rings_ranges() -> None:
    ring = Ring([RingMember(n) for n in "abcd"], vnodes=1)
    seen: list[int] = []
    for start, end, _ in ring.ranges(2):
        seen += list(partitions_in(start, end, ring.partitions))
    assert seen == list(range(ring.partitions))
