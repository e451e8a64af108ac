"""Seal epochs in anti-entropy and read merges: a re-sealed copy of a version (same id,
higher seal epoch, ``storage.envelope``) is a difference both see, and the higher wins.

Covers the pure cores (``node.cluster.antientropy``: digests, deltas, exchange plans;
``node.cluster.replication.merge_version_sets``) and the store side that feeds them
(``seal_epoch_of``, ``VersionStore`` reports and ``version_states``, ``TreeKeeper``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from crypto.roles import DEFAULT_ROLES
from node.cluster.antientropy import (
    ContextState,
    HashTree,
    apply_plan,
    change_delta,
    context_digest,
    plan_exchange,
    version_hash,
)
from node.cluster.antientropy_replica import TreeKeeper
from node.cluster.replication import VersionSet, merge_version_sets
from storage.address import parse
from storage.context_store import ContextStore
from storage.envelope import Envelope, seal_epoch_of
from storage.record import ContextRecord
from storage.schema import PurgeMarker
from storage.version_store import SetChange

CTX = b"proj\x00task\x00agent\x00role\x00doc"
ADDR = "ucxl://agent:backend_developer@chorus:task/*^/doc{}.md"


def vid(ms: int, node: str = "a") -> str:
    return f"{ms:012x}-000000-{node}"


# -- the core: hashes, digests, deltas ----------------------------------------------------


def test_a_version_as_written_hashes_as_before_and_a_reseal_hashes_apart() -> None:
    v = vid(1)
    assert version_hash(CTX, v, 0) == version_hash(CTX, v)
    assert context_digest(CTX, [v], None, {}) == context_digest(CTX, [v], None)
    assert len({version_hash(CTX, v, e) for e in (0, 1, 2, 9)}) == 4
    assert context_digest(CTX, [v], None, {v: 3}) != context_digest(CTX, [v], None)


def test_a_reseal_delta_moves_the_digest_to_the_new_epoch() -> None:
    ids = [vid(1), vid(2)]
    tree = HashTree(4, 2)
    tree.apply(CTX, context_digest(CTX, ids, None, {vid(2): 2}))
    tree.apply(CTX, change_delta(CTX, resealed=[(vid(1), 0, 5), (vid(2), 2, 7)]))
    assert tree.digest(CTX) == context_digest(CTX, ids, None, {vid(1): 5, vid(2): 7})
    tree.apply(CTX, change_delta(CTX, removed=[vid(1)], epochs={vid(1): 5}))
    tree.apply(CTX, change_delta(CTX, added=[vid(3)], epochs={vid(3): 4}))
    want = context_digest(CTX, [vid(2), vid(3)], None, {vid(2): 7, vid(3): 4})
    assert tree.digest(CTX) == want
    assert tree == HashTree.rebuilt(4, 2, [(CTX, [vid(2), vid(3)], None)],
                                    {CTX: {vid(2): 7, vid(3): 4}})  # fmt: skip


def test_plan_moves_the_higher_seal_both_ways_and_never_an_equal_one() -> None:
    ids = frozenset({vid(1), vid(2), vid(3)})
    mine = ContextState(ids, None, {vid(1): 4, vid(3): 2})
    theirs = ContextState(ids, None, {vid(2): 3, vid(3): 2})
    plan = plan_exchange(mine, theirs)
    assert plan.push == (vid(1),)
    assert plan.pull == (vid(2),)
    a, b = apply_plan(mine, theirs, plan)
    assert a == b == ContextState(ids, None, {vid(1): 4, vid(2): 3, vid(3): 2})
    assert plan_exchange(a, b).empty


def test_a_purge_marker_still_wins_over_a_reseal() -> None:
    mine = ContextState(frozenset({vid(1)}), None, {vid(1): 4})
    theirs = ContextState(frozenset({vid(1)}), vid(1))
    plan = plan_exchange(mine, theirs)
    assert plan.push == ()
    assert plan.take_marker


epoch_maps = st.dictionaries(st.sampled_from([vid(i) for i in range(1, 7)]), st.integers(0, 4))


@given(epoch_maps, epoch_maps)
def test_after_one_exchange_both_hold_the_highest_seal_of_every_version(
    a: dict[str, int], b: dict[str, int]
) -> None:
    """After applying the plan, both sides hold every version at the max of the epochs."""
    mine = ContextState(frozenset(a), None, {v: e for v, e in a.items() if e})
    theirs = ContextState(frozenset(b), None, {v: e for v, e in b.items() if e})
    x, y = apply_plan(mine, theirs, plan_exchange(mine, theirs))
    want = {v: max(a.get(v, 0), b.get(v, 0)) for v in set(a) | set(b)}
    assert x == y
    assert {v: x.epoch(v) for v in x.version_ids} == want
    ids = sorted(x.version_ids)
    assert context_digest(CTX, ids, None, x.epochs) == context_digest(CTX, ids, None, y.epochs)


# -- the store side -----------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ContextStore]:
    ContextStore.init(tmp_path / "s", DEFAULT_ROLES)
    opened = ContextStore.open(tmp_path / "s")
    yield opened
    opened.close()


def _written(store: ContextStore, count: int) -> list[Envelope]:
    for i in range(count):
        store.store(ADDR.format(i), ContextRecord.from_fields({"summary": f"s{i}"}))
    return [
        Envelope.decode(row.data)
        for i in range(count)
        for row in store.versions.versions(parse(ADDR.format(i)).context())
    ]


def _resealed(store: ContextStore, env: Envelope, epoch: int) -> Envelope:
    return replace(env, seal_epoch=epoch).sealed(store.keyring.signer)


def test_seal_epoch_of_reads_what_decode_reads(store: ContextStore) -> None:
    env = _written(store, 1)[0]
    assert seal_epoch_of(env.encode()) == 0
    for epoch in (1, 7, 2**40):
        assert seal_epoch_of(_resealed(store, env, epoch).encode()) == epoch
    assert seal_epoch_of(b"") == 0
    assert seal_epoch_of(b"\xdc\x00\x12\x02garbage") == 0  # damaged: verification refuses it


def test_the_live_tree_follows_rewrites_purges_and_expiry(store: ContextStore) -> None:
    envs = _written(store, 3)
    keeper = TreeKeeper(store.versions, 8, 4)
    changes: list[SetChange] = []
    store.versions.add_observer(changes.append)
    first = _resealed(store, envs[0], 3)
    assert store.versions.rewrite([first, _resealed(store, envs[0], 5), envs[1]]) == 2
    assert [c.resealed for c in changes] == [((envs[0].version_id, 0, 5),)]
    assert store.versions.rewrite([first]) == 0  # an older seal is never taken back

    def rebuilt() -> HashTree:
        rows = list(store.versions.version_states())
        return HashTree.rebuilt(8, 4, [(c, i, u) for c, i, u, _ in rows],
                                {c: e for c, _, _, e in rows})  # fmt: skip

    assert keeper.tree == rebuilt()
    assert keeper.tree != HashTree.rebuilt(8, 4, store.versions.version_sets())
    ctx0 = parse(envs[0].context).context()
    assert store.versions.seal_epochs(ctx0) == {envs[0].version_id: 5}
    store.versions.purge(ctx0, PurgeMarker(envs[0].version_id, 0, "admin"))
    assert changes[-1].epochs == {envs[0].version_id: 5}
    ctx2 = parse(envs[2].context).context()
    store.versions.rewrite([_resealed(store, envs[2], 2)])
    store.versions.remove_versions(ctx2, [envs[2].version_id])
    assert changes[-1].epochs == {envs[2].version_id: 2}
    assert keeper.tree == rebuilt()
    assert TreeKeeper(store.versions, 8, 4).tree == keeper.tree


# -- the read merge -----------------------------------------------------------------------


def test_the_read_merge_takes_the_highest_seal_and_repairs_the_older(store: ContextStore) -> None:
    env = _written(store, 1)[0]
    v = env.version_id
    low, high = _resealed(store, env, 2).encode(), _resealed(store, env, 4).encode()
    answers = {"a": VersionSet({v: env.encode()}), "b": VersionSet({v: high}),
               "c": VersionSet({v: low}), "d": VersionSet({v: high})}  # fmt: skip
    merged = merge_version_sets(answers)
    assert merged.envelopes == ((v, high),)
    assert merged.missing == {"a": (v,), "c": (v,)}
    plain = merge_version_sets({"a": VersionSet({v: env.encode()}), "b": VersionSet({})})
    assert plain.missing == {"b": (v,)}  # copies as written: nothing new
