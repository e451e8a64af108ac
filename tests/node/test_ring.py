"""node.cluster.ring: weighted rendezvous over fixed partitions, checked against a slow reference.

Every hypothesis test is derandomized (fixed examples, no flakes); statistical bounds are
chosen at >= 5 sigma of the binomial partition counts, so they hold for any example.
"""

from __future__ import annotations

import hashlib
import math
from bisect import bisect_right
from collections.abc import Callable, Sequence
from itertools import pairwise

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from node.cluster.ring import KEY_SPACE, Ring, RingMember

RING_SETTINGS = settings(max_examples=20, deadline=None, derandomize=True)
SAMPLE_KEYS = [f"ucxl://agent:role@project:task/sample/{i}".encode() for i in range(4_000)]

# The placement spec, restated independently of node.cluster.ring: changing either constant
# re-places every key, so a mixed-version cluster would disagree about owners.
SPEC_SCORE_DOMAIN = b"slurp-ring-v1 partition-scores\x00"
SPEC_KEY_PERSON = b"slurp-ring-key"
SPEC_PARTITIONS_PER_VNODE = 64

node_ids = st.text(min_size=1, max_size=24)
weights = st.sampled_from([0.5, 1.0, 1.5, 2.0, 3.0])


def id_sets(min_size: int, max_size: int) -> st.SearchStrategy[list[str]]:
    """Distinct node ids, as a list (in the order drawn)."""
    return st.lists(node_ids, min_size=min_size, max_size=max_size, unique=True)


@st.composite
def memberships(draw: st.DrawFn, min_size: int = 1, max_size: int = 8) -> list[RingMember]:
    """Members with distinct ids; all weight 1 about half the time, else mixed weights."""
    ids = draw(id_sets(min_size, max_size))
    if draw(st.booleans()):
        return [RingMember(node_id) for node_id in ids]
    return [RingMember(node_id, draw(weights)) for node_id in ids]


class ReferenceRing:
    """The placement spec, done the slow obvious way: every owner by brute force."""

    def __init__(self, members: Sequence[RingMember], vnodes: int = 64) -> None:
        self.weights = {m.node_id: m.weight for m in members}
        self.partitions = vnodes * SPEC_PARTITIONS_PER_VNODE
        self.equal_weights = len(set(self.weights.values())) == 1
        self.streams = {
            node_id: hashlib.shake_256(SPEC_SCORE_DOMAIN + node_id.encode()).digest(
                8 * self.partitions
            )
            for node_id in self.weights
        }

    def partition_of(self, key: bytes) -> int:
        digest = hashlib.blake2b(key, digest_size=8, person=SPEC_KEY_PERSON).digest()
        return int.from_bytes(digest, "big") * self.partitions // KEY_SPACE

    def score(self, node_id: str, partition: int) -> float:
        raw = int.from_bytes(self.streams[node_id][8 * partition : 8 * partition + 8], "big")
        if self.equal_weights:
            return raw
        return math.log((float(raw) + 0.5) * 2.0**-64) / self.weights[node_id]

    def owner(self, partition: int) -> str:
        """Highest score wins; a tie goes to the larger id."""
        return max(self.weights, key=lambda node_id: (self.score(node_id, partition), node_id))

    def preference_list(self, key: bytes, n: int) -> list[str]:
        """Walk the whole circle once from the key; members never met come last, by id."""
        start = self.partition_of(key)
        walk: list[str] = []
        for step in range(self.partitions):
            if len(walk) >= min(n, len(self.weights)):
                break
            owner = self.owner((start + step) % self.partitions)
            if owner not in walk:
                walk.append(owner)
        walk += sorted(set(self.weights) - set(walk))
        return walk[: min(n, len(self.weights))]


def moved_fraction(before: Ring, after: Ring) -> float:
    """Exact share of the key space whose primary differs (overlaying both ranges(1))."""
    old, new = before.ranges(1), after.ranges(1)
    old_starts, new_starts = [arc[0] for arc in old], [arc[0] for arc in new]
    cuts = sorted({*old_starts, *new_starts, KEY_SPACE})
    moved = 0
    for start, end in pairwise(cuts):
        old_primary = old[bisect_right(old_starts, start) - 1][2][0]
        new_primary = new[bisect_right(new_starts, start) - 1][2][0]
        moved += end - start if old_primary != new_primary else 0
    return moved / KEY_SPACE


def sampled_moves(before: Ring, after: Ring) -> list[tuple[str, str]]:
    """(old primary, new primary) of every sample key whose primary changed."""
    pairs = ((before.primary(key), after.primary(key)) for key in SAMPLE_KEYS)
    return [(old, new) for old, new in pairs if old != new]


def binomial_slack(partitions: int, share: float, sigmas: float) -> float:
    """``sigmas`` standard deviations of a share measured as a fraction of partitions."""
    return sigmas * math.sqrt(share * (1 - share) / partitions)


@RING_SETTINGS
@given(members=memberships(max_size=6), keys=st.lists(st.binary(max_size=40), max_size=8))
def test_matches_the_slow_reference(members: list[RingMember], keys: list[bytes]) -> None:
    """For every key and n, the fast ring's preference list equals the brute-force one's."""
    ring, reference = Ring(members), ReferenceRing(members)
    for key in [*keys, *SAMPLE_KEYS[:10]]:
        for n in (1, 3, len(members) + 1):
            assert ring.preference_list(key, n) == reference.preference_list(key, n)
        assert ring.primary(key) == reference.preference_list(key, 1)[0]


@RING_SETTINGS
@given(count=st.integers(1, 150), seed=st.binary(min_size=1, max_size=4))
@example(count=150, seed=b"many")
def test_matches_the_reference_when_members_outnumber_partitions(count: int, seed: bytes) -> None:
    """With 64 partitions, members that own nothing still complete preference lists, by id."""
    members = [RingMember(f"{seed.hex()}-{i}") for i in range(count)]
    ring, reference = Ring(members, vnodes=1), ReferenceRing(members, vnodes=1)
    for key in SAMPLE_KEYS[:5]:
        for n in (1, 3, count):
            assert ring.preference_list(key, n) == reference.preference_list(key, n)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(ids=id_sets(5, 5))
def test_five_equal_nodes_are_balanced(ids: list[str]) -> None:
    """With default vnodes and 5 equal nodes, the largest share is <= 1.3x the mean."""
    shares = Ring(RingMember(node_id) for node_id in ids).ownership()
    assert math.isclose(sum(shares.values()), 1.0)
    assert max(shares.values()) <= 1.3 * (1 / 5)


@RING_SETTINGS
@given(ids=id_sets(2, 12))
def test_up_to_twelve_equal_nodes_are_balanced(ids: list[str]) -> None:
    """With default vnodes and 2..12 equal nodes, the largest share is <= 1.3x the mean."""
    shares = Ring(RingMember(node_id) for node_id in ids).ownership()
    assert max(shares.values()) <= 1.3 / len(ids)


@RING_SETTINGS
@given(ids=id_sets(2, 12), newcomer=node_ids)
def test_adding_a_node_moves_few_keys_and_only_to_it(ids: list[str], newcomer: str) -> None:
    """Adding a node to n moves <= 1.5/n of the keys, every one of them to the new node."""
    assume(newcomer not in ids)
    before = Ring(RingMember(node_id) for node_id in ids)
    after = before.with_member(RingMember(newcomer))
    bound = 1.5 / len(ids)
    assert moved_fraction(before, after) <= bound
    moves = sampled_moves(before, after)
    assert len(moves) / len(SAMPLE_KEYS) <= bound
    assert all(new == newcomer for _, new in moves)


@RING_SETTINGS
@given(ids=id_sets(2, 12), data=st.data())
def test_removing_a_node_moves_few_keys_and_only_its_own(
    ids: list[str], data: st.DataObject
) -> None:
    """Removing one of n nodes moves <= 1.5/n of the keys, all of them the removed node's."""
    leaver = data.draw(st.sampled_from(ids))
    before = Ring(RingMember(node_id) for node_id in ids)
    after = before.without(leaver)
    bound = 1.5 / len(ids)
    assert moved_fraction(before, after) <= bound
    moves = sampled_moves(before, after)
    assert len(moves) / len(SAMPLE_KEYS) <= bound
    assert all(old == leaver for old, _ in moves)


@RING_SETTINGS
@given(ids=id_sets(2, 9))
def test_a_weight_two_node_owns_about_twice_a_weight_one_node(ids: list[str]) -> None:
    """A weight-2 node's share is 1.5x..2.5x the mean weight-1 share (>= 5 sigma for k <= 8)."""
    heavy, *light = ids
    shares = Ring([RingMember(heavy, 2.0), *(RingMember(node_id) for node_id in light)]).ownership()
    mean_light = sum(shares[node_id] for node_id in light) / len(light)
    assert 1.5 <= shares[heavy] / mean_light <= 2.5


@RING_SETTINGS
@given(members=memberships(min_size=2, max_size=10))
def test_every_share_is_near_its_weight(members: list[RingMember]) -> None:
    """Each member's share is within 6 sigma of weight / total weight (binomial counts)."""
    ring = Ring(members)
    total = sum(m.weight for m in members)
    for member in members:
        expected = member.weight / total
        slack = binomial_slack(ring.partitions, expected, 6)
        assert abs(ring.ownership()[member.node_id] - expected) <= slack


@RING_SETTINGS
@given(members=memberships(max_size=8), n=st.integers(0, 10), key=st.binary(max_size=40))
def test_preference_lists_are_distinct_members(
    members: list[RingMember], n: int, key: bytes
) -> None:
    """A preference list holds min(n, members) distinct member ids, the primary first."""
    ring = Ring(members)
    preference = ring.preference_list(key, n)
    assert len(preference) == len(set(preference)) == min(n, len(members))
    assert set(preference) <= {m.node_id for m in members}
    if n:
        assert preference[0] == ring.primary(key)
        assert ring.preference_list(key, n + 1)[:n] == preference


@RING_SETTINGS
@given(members=memberships(max_size=8), data=st.data())
def test_order_of_listing_and_joining_does_not_matter(
    members: list[RingMember], data: st.DataObject
) -> None:
    """Rings from any listing order, or any join order, are equal and place keys alike."""
    listed = Ring(members)
    shuffled = Ring(data.draw(st.permutations(members)))
    joined = Ring([])
    for member in data.draw(st.permutations(members)):
        joined = joined.with_member(member)
    assert listed == shuffled == joined
    assert hash(listed) == hash(joined)
    assert listed.ranges(3) == shuffled.ranges(3) == joined.ranges(3)
    assert all(
        listed.preference_list(key, 3) == joined.preference_list(key, 3) for key in SAMPLE_KEYS[:50]
    )


@RING_SETTINGS
@given(members=memberships(max_size=6), n=st.integers(0, 4), keys=st.lists(st.binary(), max_size=5))
def test_ranges_tile_the_key_space_and_agree_with_lookups(
    members: list[RingMember], n: int, keys: list[bytes]
) -> None:
    """ranges(n) tiles [0, 2**64) in order, merges equal neighbours, and matches lookups."""
    ring = Ring(members)
    arcs = ring.ranges(n)
    assert arcs[0][0] == 0
    assert arcs[-1][1] == KEY_SPACE
    for (_, end, preference), (start, _, following) in pairwise(arcs):
        assert end == start
        assert preference != following
    starts = [start for start, _, _ in arcs]
    for key in [*keys, *SAMPLE_KEYS[:20]]:
        start, end, preference = arcs[bisect_right(starts, ring.key_position(key)) - 1]
        assert start <= ring.key_position(key) < end
        assert list(preference) == ring.preference_list(key, n)


@RING_SETTINGS
@given(key=st.binary(), n=st.integers(0, 5))
def test_an_empty_ring_places_nothing(key: bytes, n: int) -> None:
    """An empty ring: empty preference lists, no owners, one arc owned by no one."""
    ring = Ring([])
    assert ring.preference_list(key, n) == []
    assert ring.ownership() == {}
    assert ring.ranges(n) == [(0, KEY_SPACE, ())]
    assert 0 <= ring.key_position(key) < KEY_SPACE
    with pytest.raises(LookupError):
        ring.primary(key)


@RING_SETTINGS
@given(node_id=node_ids, weight=weights, key=st.binary(), n=st.integers(1, 5))
def test_a_single_member_owns_everything(node_id: str, weight: float, key: bytes, n: int) -> None:
    """A one-member ring sends every key to that member alone."""
    ring = Ring([RingMember(node_id, weight)])
    assert ring.preference_list(key, n) == [node_id]
    assert ring.primary(key) == node_id
    assert ring.ownership() == {node_id: 1.0}
    assert ring.ranges(n) == [(0, KEY_SPACE, (node_id,))]


def test_a_negligible_weight_still_completes_preference_lists() -> None:
    """A member too light to own any partition still comes last in full preference lists."""
    ring = Ring([RingMember("heavy"), RingMember("light", 1e-12)])
    assert ring.ownership() == {"heavy": 1.0, "light": 0.0}
    assert ring.preference_list(b"k", 2) == ["heavy", "light"]
    assert ring.preference_list(b"k", 1) == ["heavy"]


def test_with_member_replaces_a_weight_and_without_undoes_a_join() -> None:
    base = Ring([RingMember("a"), RingMember("b")])
    reweighted = base.with_member(RingMember("b", 3.0))
    assert reweighted.members == (RingMember("a"), RingMember("b", 3.0))
    assert reweighted.ownership()["b"] > 0.7
    assert base.with_member(RingMember("c")).without("c") == base
    assert "a" in base
    assert "c" not in base
    assert len(base) == 2


def test_placement_is_pinned_across_versions() -> None:
    """Golden values: any change here re-places keys on a running, mixed-version cluster."""
    equal = Ring(RingMember(f"node-{i}") for i in range(5))
    weighted = Ring([RingMember("node-0", 2.0), RingMember("node-1"), RingMember("node-2")])
    key = b"ucxl://claude:architect@chorus:auth/*^/src/auth/jwt.py"
    assert equal.key_position(key) == 16587233431924822802
    assert equal.preference_list(key, 3) == ["node-1", "node-2", "node-4"]
    assert weighted.preference_list(key, 3) == ["node-1", "node-0", "node-2"]
    assert equal.ownership()["node-3"] == 848 / 4096
    assert weighted.ownership()["node-0"] == 2003 / 4096
    assert _fingerprint(equal) == GOLDEN_EQUAL_FINGERPRINT
    assert _fingerprint(weighted) == GOLDEN_WEIGHTED_FINGERPRINT


GOLDEN_EQUAL_FINGERPRINT = "ea67ad7a796e64e0ceb823d94262308693a50a6b38d3ac07194e3d05b0f00ecd"
GOLDEN_WEIGHTED_FINGERPRINT = "96997286601989782a4abc2ef96f2a4e882a2b3dbdfde3ce095adcd011456473"


def _fingerprint(ring: Ring) -> str:
    """SHA-256 of the whole primary placement (every arc and its owner)."""
    return hashlib.sha256(repr(ring.ranges(1)).encode()).hexdigest()


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(lambda: RingMember("a", 0.0), id="zero weight"),
        pytest.param(lambda: RingMember("a", -1.0), id="negative weight"),
        pytest.param(lambda: RingMember("a", math.nan), id="nan weight"),
        pytest.param(lambda: RingMember("a", math.inf), id="infinite weight"),
        pytest.param(lambda: RingMember(""), id="empty id"),
        pytest.param(lambda: Ring([RingMember("a"), RingMember("a", 2.0)]), id="duplicate id"),
        pytest.param(lambda: Ring([], vnodes=0), id="no vnodes"),
        pytest.param(lambda: Ring([RingMember("a")]).preference_list(b"k", -1), id="n < 0"),
        pytest.param(lambda: Ring([RingMember("a")]).ranges(-1), id="ranges n < 0"),
    ],
)
def test_invalid_input_raises_value_error(build: Callable[[], object]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each case names its own cause
        build()


def test_removing_an_unknown_node_raises_key_error() -> None:
    with pytest.raises(KeyError):
        Ring([RingMember("a")]).without("b")
