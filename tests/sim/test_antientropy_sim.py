"""Simulation tier: active anti-entropy converges replicas with no reads at all.

Invariant (the issue's): after a partition heals and one pass interval passes, every
replica of each context holds the identical version set (union of what any replica
held, minus what a purge marker covers), and nothing purged comes back anywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from node.cluster.antientropy import HashTree, context_digest
from node.cluster.antientropy_service import AntiEntropyConfig
from node.cluster.handoff_plan import HandoffConfig
from storage.address import ContextName, parse
from tests.sim.harness import SimCluster, open_sim_cluster

INTERVAL_S = 30.0
CONFIG = AntiEntropyConfig(interval_s=INTERVAL_S, bytes_per_s=256 * 1024)
NO_HANDOFF = HandoffConfig(enabled=False)  # anti-entropy alone must converge


def address(i: int) -> str:
    return f"ucxl://agent{i % 3}:backend_developer@sim:t{i % 4}/*^/doc{i}.md"


def ctx_of(i: int) -> ContextName:
    return parse(address(i)).context()


async def put(sim: SimCluster, node: str, i: int, summary: str, **extra: Any) -> str:
    body = {"address": address(i), "record": {"summary": summary}, **extra}
    return str((await sim.call(node, "ctx.put", body))["ref"]["version_id"])


def holdings(sim: SimCluster, ctx: ContextName) -> dict[str, tuple[list[str], str | None]]:
    """Per replica of ``ctx``: its version ids and purge marker, read from its store."""
    service = sim.nodes["n1"].service
    replicas = service._current_ring().preference_list(ctx.key(), service.config.quorum.n)
    out = {}
    for name in replicas:
        versions = sim.nodes[name].store.versions
        marker = versions.purge_marker(ctx)
        out[name] = (versions.version_ids(ctx), None if marker is None else marker.upto)
    return out


@pytest.mark.parametrize("seed", range(3))
async def test_partitioned_node_converges_without_reads(
    tmp_path: Path, seed: int, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_sim_cluster(tmp_path, seed=seed, antientropy=CONFIG, handoff=NO_HANDOFF) as sim:
        before = {i: await put(sim, "n1", i, f"before {i}") for i in range(6)}
        purged = 2
        sim.network.partition(["n3"], ["n1", "n2", "client"])
        await trio.sleep(2)  # failure detection sees the cut
        acked = {i: await put(sim, ["n1", "n2"][i % 2], i, f"during {i}") for i in range(4, 30)}
        await sim.call("n1", "ctx.purge", {"address": address(purged)})
        sim.network.heal()
        sim.network.partition(["n1", "n2"], ["client"])  # only n3 takes a write (W=1)
        only_n3 = await put(sim, "n3", 40, "written on n3 alone", w=1)
        sim.network.heal()
        assert sim.nodes["n1"].store.versions.version_ids(ctx_of(40)) == []
        await trio.sleep(INTERVAL_S + 5)

        for i in [*range(30), 40]:
            held = holdings(sim, ctx_of(i))
            assert len({str(h) for h in held.values()}) == 1, f"context {i} differs: {held}"
        ids, upto = holdings(sim, ctx_of(purged))["n3"]
        assert ids == [], "nothing purged came back on n3"
        assert upto is not None, "the purge marker reached n3"
        assert before[purged] not in sim.nodes["n3"].store.versions.version_ids(ctx_of(purged))
        for i, vid in acked.items():
            assert vid in holdings(sim, ctx_of(i))["n3"][0]
        assert holdings(sim, ctx_of(40))["n1"][0] == [only_n3]
        repaired = sum(n.antientropy.stats.versions_repaired for n in sim.nodes.values())
        assert repaired >= len(acked) + 2  # n3 caught up (26 + 2 before), n1/n2 got n3's
        _assert_trees_agree(sim)
        status = await sim.call("n3", "node.status", {})
        assert sim.nodes["n3"].antientropy.stats.passes >= 2
        assert status["antientropy"]["last_pass_age_s"] <= INTERVAL_S + 1


def _assert_trees_agree(sim: SimCluster) -> None:
    """Every node's live tree equals one rebuilt from its store, and the roots agree."""
    trees = []
    for node in sim.nodes.values():
        kept = node.antientropy.keeper.tree
        rows = [(c, ids, up) for c, ids, up in node.store.versions.version_sets()]
        assert kept == HashTree.rebuilt(kept.partitions, kept.leaves, rows)
        for ctx, ids, up in rows:
            assert kept.digest(ctx) == context_digest(ctx, ids, up)
        trees.append(kept)
    assert all(
        [t.root(p) for p in range(t.partitions)] == [trees[0].root(p) for p in range(t.partitions)]
        for t in trees
    )


async def test_malformed_peer_answer_fails_one_exchange_only(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_sim_cluster(tmp_path, antientropy=CONFIG, handoff=NO_HANDOFF) as sim:
        await put(sim, "n1", 1, "one")

        async def garbage(peer: Any, body: dict[str, Any]) -> dict[str, Any]:
            return {"roots": [b"short"]}

        sim.nodes["n2"].service.extra_replica_methods["rep.tree"] = garbage
        healer = sim.nodes["n1"].antientropy
        failed = healer.stats.exchanges_failed
        await healer.run_pass()
        assert healer.stats.exchanges_failed == failed + 1  # n2's answer; n3 was fine
        assert await put(sim, "n1", 2, "still serving")


async def test_repairs_per_exchange_are_capped(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    config = AntiEntropyConfig(interval_s=1000.0, max_repairs_per_exchange=3)
    async with open_sim_cluster(tmp_path, antientropy=config, handoff=NO_HANDOFF) as sim:
        sim.network.partition(["n3"], ["n1", "n2", "client"])
        await trio.sleep(2)
        for i in range(10):
            await put(sim, "n1", i, f"missed {i}")
        sim.network.heal()
        await trio.sleep(3)  # the heal triggers a pass: at most 3 contexts from each peer
        n3 = sim.nodes["n3"].store.versions
        caught_up = [i for i in range(10) if n3.version_ids(ctx_of(i))]
        assert 3 <= len(caught_up) <= 6
        for _ in range(4):
            await sim.nodes["n3"].antientropy.run_pass()
        assert all(n3.version_ids(ctx_of(i)) for i in range(10))
