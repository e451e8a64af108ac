"""Simulation tier: hinted handoff brings a node that missed writes up to date with no reads.

Invariants (checked on each node's own store, never on log lines): once a cut-off owner is
back, its local store holds every acknowledged version it owns, without any client read;
the hints are then gone; a version purged before delivery never comes back; strict W
refuses what a sloppy quorum accepts once its hints are durable; a fallback beyond the
preference list holds the hint through ``rep.hint`` and delivers it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from node.cluster.handoff_plan import HandoffConfig
from node.cluster.replication import Quorum
from node.errors import RemoteError
from storage.address import ContextName, parse
from tests.sim.harness import SimCluster, open_sim_cluster

SEEDS = range(6)


def address(i: int) -> str:
    return f"ucxl://agent{i % 3}:backend_developer@sim:hh{i % 4}/*^/doc{i % 9}.md"


def ctx_of(addr: str) -> ContextName:
    return parse(addr).context()


def held(sim: SimCluster, node: str, addr: str) -> set[str]:
    """Version ids of ``addr``'s context in ``node``'s own store."""
    return {row.version_id for row in sim.nodes[node].store.versions.versions(ctx_of(addr))}


def owners(sim: SimCluster, addr: str) -> tuple[str, ...]:
    service = sim.nodes["n1"].service
    return tuple(service._current_ring().preference_list(ctx_of(addr).key(), 3))


def hint_totals(sim: SimCluster) -> dict[str, int]:
    totals: dict[str, int] = {}
    for node in sim.nodes.values():
        for key, value in node.service.status_sources["handoff"]().items():
            totals[key] = totals.get(key, 0) + int(value)
    return totals


async def put(sim: SimCluster, node: str, addr: str, summary: str, **extra: Any) -> str:
    answer = await sim.call(
        node, "ctx.put", {"address": addr, "record": {"summary": summary}, **extra}
    )
    return str(answer["ref"]["version_id"])


async def wait_for(predicate: Any, *, timeout_s: float = 60.0) -> None:
    with trio.fail_after(timeout_s):
        while not predicate():  # noqa: ASYNC110 (polls state that no event announces)
            await trio.sleep(0.25)


@pytest.mark.parametrize("seed", SEEDS)
async def test_a_returning_node_catches_up_without_reads(
    tmp_path: Path, seed: int, autojump_clock: trio.testing.MockClock
) -> None:
    acked: dict[str, set[str]] = {}  # address -> version ids
    async with open_sim_cluster(tmp_path, seed=seed, max_delay_s=0.02) as sim:
        sim.network.partition(["n3"], ["n1", "n2", "client"])
        for i in range(30):
            addr = address(i)
            vid = await put(sim, ["n1", "n2"][i % 2], addr, f"seed {seed} write {i}")
            acked.setdefault(addr, set()).add(vid)
        assert hint_totals(sim)["hints"] > 0
        assert all(not held(sim, "n3", addr) for addr in acked)
        sim.network.heal()  # no client read from here on

        def caught_up() -> bool:
            return all(vids <= held(sim, "n3", addr) for addr, vids in acked.items())

        await wait_for(caught_up)
        await wait_for(lambda: hint_totals(sim)["hints"] == 0)
        totals = hint_totals(sim)
        assert totals["hint_bytes"] == 0
        assert totals["hints_dropped"] == 0
        assert totals["hints_delivered"] > 0


@pytest.mark.parametrize("seed", SEEDS[:3])
async def test_a_purge_before_delivery_does_not_bring_the_version_back(
    tmp_path: Path, seed: int, autojump_clock: trio.testing.MockClock
) -> None:
    addr, other = address(0), address(1)
    async with open_sim_cluster(tmp_path, seed=seed) as sim:
        sim.network.partition(["n3"], ["n1", "n2", "client"])
        purged = await put(sim, "n1", addr, "to be purged")
        kept = await put(sim, "n1", other, "to be kept")
        await sim.call("n1", "ctx.purge", {"address": addr})
        assert not held(sim, "n1", addr)
        sim.network.heal()
        await wait_for(lambda: kept in held(sim, "n3", other))
        await wait_for(lambda: hint_totals(sim)["hints"] == 0)
        await trio.sleep(10)  # several more delivery rounds
        assert purged not in held(sim, "n3", addr)
        assert all(purged not in held(sim, name, addr) for name in sim.nodes)
        assert hint_totals(sim)["hints_dropped"] >= 1


async def test_strict_quorum_refuses_what_a_sloppy_quorum_accepts(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    addr = address(5)
    async with open_sim_cluster(tmp_path / "strict", seed=1) as sim:
        sim.network.partition(["n1", "client"], ["n2", "n3"])
        await trio.sleep(3)  # failure detection marks n2 and n3 down
        with pytest.raises(RemoteError) as refused:
            await put(sim, "n1", addr, "strict")
        assert refused.value.code == "UCXL-503-UNAVAILABLE"
        assert hint_totals(sim)["hints"] == 0  # nothing was sent, nothing hinted
    sloppy = HandoffConfig(sloppy_quorum=True)
    async with open_sim_cluster(tmp_path / "sloppy", seed=1, handoff=sloppy) as sim:
        sim.network.partition(["n1", "client"], ["n2", "n3"])
        await trio.sleep(3)
        vid = await put(sim, "n1", addr, "sloppy")  # n1 + two durable hints on n1 >= W
        assert sim.nodes["n1"].service.status_sources["handoff"]()["hints"] == 2
        sim.network.heal()
        await wait_for(lambda: all(vid in held(sim, name, addr) for name in sim.nodes))
        await wait_for(lambda: hint_totals(sim)["hints"] == 0)


async def test_a_fallback_beyond_the_preference_list_holds_and_delivers(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_sim_cluster(tmp_path, size=5, seed=2, quorum=Quorum(3, 2, 2)) as sim:
        addr = address(3)
        prefs = owners(sim, addr)
        ring = sim.nodes["n1"].service._current_ring()
        beyond = [n for n in ring.preference_list(ctx_of(addr).key(), 5) if n not in prefs]
        down = prefs[2]
        coordinator = prefs[0]
        sim.network.partition([down], [n for n in sim.nodes if n != down] + ["client"])
        await trio.sleep(3)
        vid = await put(sim, coordinator, addr, "for the fallback")
        holder = beyond[0]
        await wait_for(lambda: sim.nodes[holder].service.status_sources["handoff"]()["hints"] == 1)
        assert not held(sim, holder, addr)  # a hint, not a replica
        sim.network.heal()
        await wait_for(lambda: vid in held(sim, down, addr))
        await wait_for(lambda: hint_totals(sim)["hints"] == 0)


async def test_a_redirected_hint_waiting_for_a_down_owner_ends_the_pass(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Sim seed 9132: a hint whose target no longer owns its context waits while one of
    the current owners is down (``_redirect`` keeps it). The pass must end there: it read
    the same hints again and again, never yielding to the clock (the simulation hung)."""
    async with open_sim_cluster(tmp_path, size=4, seed=0) as sim:
        addr = address(0)
        await put(sim, "n1", addr, "v1")
        owner_list = owners(sim, addr)
        target = next(n for n in sim.nodes if n not in owner_list)
        holder, down = owner_list[0], owner_list[1]
        node = sim.nodes[holder]
        assert node.handoff is not None
        hints = node.handoff.hints
        blobs = [row.data for row in node.store.versions.versions(ctx_of(addr))]
        assert hints.add(target, ctx_of(addr).canonical(), blobs) is not None
        sim.network.partition([down], [n for n in sim.nodes if n != down] + ["client"])
        await wait_for(lambda: not node.service.cluster.is_up(down))
        reads = 0
        pending = hints.pending
        this_pass = trio.lowlevel.current_task()  # the handoff service's own passes run too

        def counted(target: str, *, limit: int | None = None, after: int | None = None) -> Any:
            nonlocal reads
            if trio.lowlevel.current_task() is this_pass:
                reads += 1
                assert reads < 10, "the pass read the same hints again and again"
            return pending(target, limit=limit, after=after)

        hints.pending = counted  # type: ignore[method-assign]
        assert await node.handoff._deliver_to(target) == 0
        assert reads == 2  # the round, then one resumed past the kept hint: nothing left
        assert [h.context for h in pending(target)] == [ctx_of(addr).canonical()]  # kept
