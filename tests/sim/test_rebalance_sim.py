"""Simulation tier: membership changes move ranges without losing or hiding a write.

Every node is a real ``NodeService`` with a real ``RebalanceService``; the control plane
is a shared in-process log (``SharedLog``: the real metadata state machine, no Raft) that
sets every node's layout when it applies an entry, as the daemon's ``_sync_members``
does, and plays the leader's duty (H8's): it ends a transition once every live member
of old ∪ new marked ``stream_done`` for the epoch.

Invariants (issue 9): no acknowledged write is lost; a read during the move never misses
an acknowledged write; every context has exactly N replicas in the new ring once cleanup
is done; no node drops a context before every owner in the new ring holds it.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from node.cluster.antientropy_service import AntiEntropyConfig
from node.cluster.handoff_plan import HandoffConfig
from node.cluster.layout import Layout, layout_of
from node.cluster.rebalance import RebalanceConfig, RebalanceService, _Item
from node.cluster.ring import Ring, RingMember
from node.control.metadata import (
    ApplyResult,
    ClusterMetadata,
    Member,
    apply,
    bootstrap_state,
    cmd_member_add,
    cmd_member_state,
)
from node.errors import PeerUnavailable, RemoteError
from node.rpc.transport import Peer
from storage.address import ContextName, parse
from storage.errors import Unavailable
from tests.sim.harness import SimCluster, open_sim_cluster

N = 3
QUIET = AntiEntropyConfig(enabled=False)  # streaming alone must move the data


class SharedLog:
    """One metadata log every node applies at once (the control plane, minus Raft)."""

    def __init__(self, sim: SimCluster, state: ClusterMetadata) -> None:
        self.sim = sim
        self.state = state
        self.rebalancers: list[RebalanceService] = []
        self.on_transition_end: list[Callable[[], None]] = []  # checks, before it ends
        self._publish()

    def view(self) -> SharedLog:
        return self

    @property
    def metadata(self) -> ClusterMetadata:
        return self.state

    async def propose(self, data: bytes) -> ApplyResult:
        self.state, result = apply(self.state, self.state.applied_index + 1, data)
        self._publish()
        self._leader_duty()
        return result

    def _publish(self) -> None:
        layout = layout_of(self.state)
        for node in self.sim.nodes.values():
            node.service.set_layout(layout)
        for rebalancer in self.rebalancers:
            rebalancer.wake()

    def _leader_duty(self) -> None:
        """End the transition once every live member of old ∪ new streamed the epoch."""
        layout = layout_of(self.state)
        if not layout.in_transition:
            return
        ids = {m.name: i for i, m in self.state.members.items() if m.state != "removed"}
        up = self.sim.nodes["n1"].cluster
        live = [name for name in layout.members if up.is_up(name)]
        if all(self.state.streamed.get(ids[name], 0) >= layout.epoch for name in live):
            for check in self.on_transition_end:
                check()
            for node_id, member in sorted(self.state.members.items()):
                target = {"joining": "normal", "leaving": "removed"}.get(member.state)
                if target is not None:
                    self.state, result = apply(
                        self.state,
                        self.state.applied_index + 1,
                        cmd_member_state(node_id, target),
                    )
                    assert result.ok, result.error
            self._publish()


class CheckedRebalance(RebalanceService):
    """Checks, before every drop, that every owner in the new ring holds the context."""

    sim: SimCluster
    drops: list[str]

    async def _drop(self, items: Sequence[_Item]) -> None:
        _, ring = self.service.placement_rings()
        for item in items:
            for owner in ring.preference_list(item.ctx.key(), N):
                held = set(self.sim.nodes[owner].store.versions.version_ids(item.ctx))
                assert item.state.version_ids <= held, f"{owner} lacks {item.ctx.canonical()}"
            self.drops.append(item.ctx.canonical())
        await super()._drop(items)


def address(i: int) -> str:
    return f"ucxl://agent{i % 3}:backend_developer@sim:t{i % 5}/*^/doc{i}.md"


def member_of(sim: SimCluster, name: str, state: str) -> Member:
    return Member(sim.nodes[name].store.keyring.node_id, name, state, "")


async def start(
    sim: SimCluster, nursery: trio.Nursery, founders: Sequence[str]
) -> tuple[SharedLog, list[CheckedRebalance]]:
    state = bootstrap_state("sim", [member_of(sim, n, "normal") for n in founders], None, {})
    log = SharedLog(sim, state)
    rebalancers = []
    for node in sim.nodes.values():
        rebalancer = CheckedRebalance(
            node.service, log, RebalanceConfig(bytes_per_s=1 << 20, poll_s=0.5)
        )
        rebalancer.sim, rebalancer.drops = sim, []
        log.rebalancers.append(rebalancer)
        rebalancers.append(rebalancer)
        await nursery.start(rebalancer.run)
    return log, rebalancers


class Workload:
    """Writes and reads through random coordinators; remembers every acknowledged version."""

    def __init__(self, sim: SimCluster, seed: int, coordinators: Sequence[str]) -> None:
        self.sim = sim
        self.rng = random.Random(seed)
        self.coordinators = list(coordinators)
        self.acked: dict[int, set[str]] = {}  # context number -> acknowledged version ids
        self.reads = 0

    async def write(self, i: int) -> None:
        node = self.rng.choice(self.coordinators)
        body = {"address": address(i), "record": {"summary": f"doc {i}"}}
        try:
            answer = await self.sim.call(node, "ctx.put", body)
        except (RemoteError, PeerUnavailable):
            return  # not acknowledged: nothing promised
        self.acked.setdefault(i, set()).add(answer["ref"]["version_id"])

    async def read_all(self) -> None:
        """Every acknowledged version is in a quorum read's history."""
        for i, want in sorted(self.acked.items()):
            node = self.rng.choice(self.coordinators)
            answer = await self.sim.call(node, "ctx.history", {"address": address(i), "r": 2})
            found = {entry["version_id"] for entry in answer["history"]}
            missing = want - found
            assert not missing, f"read of doc{i} via {node} missed acknowledged {missing}"
            self.reads += 1

    async def run(self, rounds: int, first: int) -> None:
        for r in range(rounds):
            await self.write(first + r)
            await self.write(self.rng.randrange(first + r + 1))  # a new version of an old one
            await self.read_all()
            await trio.sleep(0.2)


async def settle(
    log: SharedLog, rebalancers: Sequence[RebalanceService], nodes: Sequence[str]
) -> None:
    """Wait (simulated time) until the layout is steady and every node's cleanup ran."""
    with trio.fail_after(600):
        while True:
            layout = layout_of(log.state)
            done = [r for r in rebalancers if r.service.name in nodes]
            if not layout.in_transition and all(r._cleaned == layout.epoch for r in done):
                return
            await trio.sleep(1)


def watch_streaming(sim: SimCluster, log: SharedLog, work: Workload) -> list[bool]:
    """When the transition ends, every new-only owner of a context holds each version
    acknowledged before it began (streaming, not cleanup, moved them); appends True."""
    before = {i: set(vids) for i, vids in work.acked.items()}
    checked: list[bool] = []

    def check() -> None:
        old, new = sim.nodes["n1"].service.placement_rings()
        assert old is not new
        for i, vids in before.items():
            ctx = parse(address(i)).context()
            old_list = old.preference_list(ctx.key(), N)
            for owner in new.preference_list(ctx.key(), N):
                if owner not in old_list:
                    assert vids <= set(sim.nodes[owner].store.versions.version_ids(ctx))
        checked.append(True)

    log.on_transition_end.append(check)
    return checked


def check_replicas(sim: SimCluster, work: Workload, ring_names: Sequence[str]) -> None:
    """Exactly the N owners of the ring hold each context, each with every acked version."""
    ring = sim.nodes[ring_names[0]].service._current_ring()
    assert tuple(m.node_id for m in ring.members) == tuple(sorted(ring_names))
    for i, want in work.acked.items():
        ctx: ContextName = parse(address(i)).context()
        owners = set(ring.preference_list(ctx.key(), N))
        holders = {n for n in ring_names if sim.nodes[n].store.versions.version_ids(ctx)}
        assert holders == owners, f"doc{i}: held by {sorted(holders)}, owned by {sorted(owners)}"
        for owner in owners:
            assert want <= set(sim.nodes[owner].store.versions.version_ids(ctx))


@pytest.mark.parametrize("seed", range(2))
async def test_a_fourth_node_joins_while_writes_continue(
    tmp_path: Path, seed: int, autojump_clock: trio.testing.MockClock
) -> None:
    async with (
        open_sim_cluster(tmp_path, size=4, seed=seed, antientropy=QUIET) as sim,
        trio.open_nursery() as nursery,
    ):
        log, rebalancers = await start(sim, nursery, ["n1", "n2", "n3"])
        work = Workload(sim, seed, ["n1", "n2", "n3"])
        for i in range(20):
            await work.write(i)
        assert all(not sim.nodes["n4"].store.versions.version_ids(parse(address(i)).context())
                   for i in range(20))  # fmt: skip
        checked = watch_streaming(sim, log, work)
        await log.propose(cmd_member_add(member_of(sim, "n4", "joining")))
        assert layout_of(log.state).in_transition
        work.coordinators = ["n1", "n2", "n3", "n4"]
        await work.run(rounds=12, first=20)
        await settle(log, rebalancers, ["n1", "n2", "n3", "n4"])
        assert layout_of(log.state).new == ("n1", "n2", "n3", "n4")
        await work.read_all()
        check_replicas(sim, work, ["n1", "n2", "n3", "n4"])
        assert any(r.drops for r in rebalancers), "the join moved ranges away from someone"
        assert rebalancers[3].stats.streamed_bytes == 0  # n4 held nothing to stream
        assert checked == [True]
        assert sum(r.stats.streamed_bytes for r in rebalancers) > 0
        assert work.reads > 0
        status = (await sim.call("n1", "node.status", {}))["rebalance"]
        assert status["epoch"] == layout_of(log.state).epoch
        assert status["in_transition"] is False
        assert status["pending_ranges"] == 0
        assert status["contexts_left"] == 0
        assert status["streamed_bytes"] == rebalancers[0].stats.streamed_bytes
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("seed", range(2))
async def test_a_node_leaves_while_writes_continue(
    tmp_path: Path, seed: int, autojump_clock: trio.testing.MockClock
) -> None:
    async with (
        open_sim_cluster(tmp_path, size=4, seed=seed, antientropy=QUIET) as sim,
        trio.open_nursery() as nursery,
    ):
        names = ["n1", "n2", "n3", "n4"]
        log, rebalancers = await start(sim, nursery, names)
        work = Workload(sim, seed, names)
        for i in range(20):
            await work.write(i)
        n4 = sim.nodes["n4"].store.keyring.node_id
        checked = watch_streaming(sim, log, work)
        await log.propose(cmd_member_state(n4, "leaving"))
        assert layout_of(log.state).in_transition
        await work.run(rounds=12, first=20)
        await settle(log, rebalancers, names)
        assert log.state.members[n4].state == "removed"
        assert checked == [True]
        await work.read_all()
        check_replicas(sim, work, ["n1", "n2", "n3"])
        assert rebalancers[3].drops, "the leaving node handed its ranges off and dropped them"
        left = [
            i
            for i in work.acked
            if sim.nodes["n4"].store.versions.version_ids(parse(address(i)).context())
        ]
        assert left == []  # fmt: skip
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("seed", range(2))
async def test_survivors_restore_n_after_a_forget(
    tmp_path: Path, seed: int, autojump_clock: trio.testing.MockClock
) -> None:
    async with (
        open_sim_cluster(tmp_path, size=5, seed=seed, antientropy=QUIET) as sim,
        trio.open_nursery() as nursery,
    ):
        names = ["n1", "n2", "n3", "n4", "n5"]
        log, rebalancers = await start(sim, nursery, names)
        work = Workload(sim, seed, names)
        for i in range(24):
            await work.write(i)
        sim.network.partition(["n5"], ["n1", "n2", "n3", "n4", "client"])  # n5 is gone
        survivors = ["n1", "n2", "n3", "n4"]
        work.coordinators = survivors
        await trio.sleep(3)  # failure detection notices
        n5 = sim.nodes["n5"].store.keyring.node_id
        await log.propose(cmd_member_state(n5, "removed"))  # forget: straight to removed
        assert not layout_of(log.state).in_transition
        await work.run(rounds=6, first=24)
        await settle(log, rebalancers, survivors)
        await work.read_all()
        check_replicas(sim, work, survivors)
        restored = sum(r.stats.streamed_bytes for r in rebalancers[:4])
        assert restored > 0, "the survivors copied n5's replicas to their new owners"
        nursery.cancel_scope.cancel()


async def test_versions_reaching_a_non_owner_after_its_cleanup_are_dropped_again(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Sim seed 7095: a restarted node, still routing by an older ring, pushed a context to
    a node that had already cleaned up for the settled epoch; the copy stayed for good (a
    4th replica). The rebalancer now cleans up such arrivals too, once the owners hold them."""
    async with (
        open_sim_cluster(tmp_path, size=4, seed=0, antientropy=QUIET) as sim,
        trio.open_nursery() as nursery,
    ):
        names = ["n1", "n2", "n3", "n4"]
        log, rebalancers = await start(sim, nursery, ["n1", "n2", "n3"])
        work = Workload(sim, 0, ["n1", "n2", "n3"])
        for i in range(12):
            await work.write(i)
        await log.propose(cmd_member_add(member_of(sim, "n4", "joining")))
        await settle(log, rebalancers, names)
        check_replicas(sim, work, names)
        ring = sim.nodes["n1"].service._current_ring()
        i, want = next(iter(sorted(work.acked.items())))
        ctx = parse(address(i)).context()
        owners = ring.preference_list(ctx.key(), N)
        outsider = next(name for name in names if name not in owners)
        rows = sim.nodes[owners[0]].store.versions.versions(ctx)
        stored, _ = sim.nodes[outsider].service.replica.apply([row.data for row in rows])
        assert any(stored)  # the stale push arrived after the cleanup
        assert want <= set(sim.nodes[outsider].store.versions.version_ids(ctx))
        before = list(rebalancers[names.index(outsider)].drops)
        await trio.sleep(2)  # a few polls
        assert sim.nodes[outsider].store.versions.version_ids(ctx) == []
        assert rebalancers[names.index(outsider)].drops == [*before, ctx.canonical()]
        check_replicas(sim, work, names)
        nursery.cancel_scope.cancel()


class HeldStores:
    """Holds the next ``rep.store`` on some replicas until released, and fails it on others
    (each once): a write kept in flight across a layout change."""

    def __init__(self, sim: SimCluster, held: Sequence[str], failed: Sequence[str]) -> None:
        self.arrived = {name: trio.Event() for name in held}
        self.release = trio.Event()
        for name in held:
            self._hold(sim, name)
        for name in failed:
            self._fail(sim, name)

    def _hold(self, sim: SimCluster, name: str) -> None:
        side = sim.nodes[name].service.local
        real = side._rep_store

        async def held(peer: Peer, args: dict[str, Any]) -> dict[str, Any]:
            del side._rep_store  # once: back to the real method
            self.arrived[name].set()
            await self.release.wait()
            return await real(peer, args)

        side._rep_store = held  # type: ignore[method-assign]

    def _fail(self, sim: SimCluster, name: str) -> None:
        side = sim.nodes[name].service.local

        async def failed(peer: Peer, args: dict[str, Any]) -> dict[str, Any]:
            del side._rep_store
            raise Unavailable(f"{name}: disk busy (test)")

        side._rep_store = failed  # type: ignore[method-assign]


def owners_of(ring: Ring, i: int) -> list[str]:
    return ring.preference_list(parse(address(i)).context().key(), N)


def joined_ring(sim: SimCluster, names: Sequence[str]) -> Ring:
    vnodes = sim.nodes[names[0]].service.config.vnodes
    return Ring([RingMember(name) for name in names], vnodes=vnodes)


async def test_a_write_in_flight_across_a_join_reaches_the_new_owner_by_the_walk(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A write routed by the old layout, acknowledged only after the join: its
    coordinator's epoch_seen waits for it (the write tracker), so the walks start after it
    and offer it to the new owner. Without the wait the walks passed before it was
    acknowledged; the displaced owner missed it (its store failed), so neither cleanup nor
    an arrival carried it to the joiner: only anti-entropy could (off here, and so is
    hinted handoff, which would redirect its hint)."""
    founders = ["n1", "n2", "n3"]
    async with (
        open_sim_cluster(tmp_path, size=4, seed=0, antientropy=QUIET,
                         handoff=HandoffConfig(enabled=False)) as sim,
        trio.open_nursery() as nursery,
    ):  # fmt: skip
        log, rebalancers = await start(sim, nursery, founders)
        work = Workload(sim, 0, founders)
        for i in range(6):
            await work.write(i)
        new_ring = joined_ring(sim, [*founders, "n4"])
        i = next(i for i in range(6, 60) if "n4" in owners_of(new_ring, i))
        ctx = parse(address(i)).context()
        staying = [n for n in new_ring.preference_list(ctx.key(), N) if n != "n4"]
        [displaced] = [n for n in founders if n not in staying]
        stores = HeldStores(sim, held=staying, failed=[displaced])
        acked: list[str] = []
        answered = trio.Event()

        async def put() -> None:  # through n4: it owns nothing yet, so it holds no copy
            body = {"address": address(i), "record": {"summary": "in flight"}}
            acked.append((await sim.call("n4", "ctx.put", body))["ref"]["version_id"])
            answered.set()

        nursery.start_soon(put)
        for event in stores.arrived.values():
            await event.wait()
        walks = [r.stats.walks for r in rebalancers]
        await log.propose(cmd_member_add(member_of(sim, "n4", "joining")))
        epoch = layout_of(log.state).epoch
        await trio.sleep(0.8)  # the replicas hold the write (inside its 1 s inner timeout)
        n4 = sim.nodes["n4"].store.keyring.node_id
        assert log.state.seen.get(n4, 0) < epoch, "n4 marked epoch_seen with its write open"
        assert layout_of(log.state).in_transition
        assert [r.stats.walks for r in rebalancers] == walks  # no walk started yet
        stores.release.set()
        await answered.wait()
        await trio.sleep(2)  # a few polls: the walks (with the fix), cleanups, arrivals
        await settle(log, rebalancers, [*founders, "n4"])
        [vid] = acked
        work.acked.setdefault(i, set()).add(vid)
        assert vid in sim.nodes["n4"].store.versions.version_ids(ctx)
        assert vid not in sim.nodes[displaced].store.versions.version_ids(ctx)
        check_replicas(sim, work, [*founders, "n4"])
        assert sum(r.stats.drain_timeouts for r in rebalancers) == 0
        assert sim.nodes["n4"].service.writes.in_flight() == 0
        nursery.cancel_scope.cancel()


async def test_a_read_during_a_join_repairs_the_new_owner_too(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A read in transition asks the new-only owner as well (not counted toward R) and
    repairs it, also when its answer comes after the read was answered; R still counts
    in the old list only. No streaming, no anti-entropy, no handoff: only reads move data."""
    founders, everyone = ["n1", "n2", "n3"], ["n1", "n2", "n3", "n4"]
    async with open_sim_cluster(tmp_path, size=4, seed=1, antientropy=QUIET,
                                handoff=HandoffConfig(enabled=False)) as sim:  # fmt: skip
        for node in sim.nodes.values():
            node.service.set_layout(Layout.steady(1, founders))
        work = Workload(sim, 1, founders)
        for i in range(12):
            await work.write(i)
        new_ring = joined_ring(sim, everyone)
        moving = [i for i in work.acked if "n4" in owners_of(new_ring, i)]
        assert moving
        n4 = sim.nodes["n4"]
        assert all(not n4.store.versions.version_ids(parse(address(i)).context())
                   for i in work.acked)  # fmt: skip
        for node in sim.nodes.values():
            node.service.set_layout(Layout(2, tuple(founders), tuple(everyone)))
        real = n4.service.local._rep_versions
        late: list[int] = []

        async def slow(peer: Peer, args: dict[str, Any]) -> dict[str, Any]:
            await trio.sleep(0.3)  # after the old list's answers: the read is answered
            late.append(1)
            return await real(peer, args)

        n4.service.local._rep_versions = slow  # type: ignore[method-assign]
        work.coordinators = everyone  # n4 reads itself on time; the others hear it late
        await work.read_all()
        await trio.sleep(1)  # the background repairs
        assert late, "n4 was asked"
        for i in moving:
            held = set(n4.store.versions.version_ids(parse(address(i)).context()))
            assert work.acked[i] <= held, f"doc{i}: the read did not repair the new owner"
        for i in set(work.acked) - set(moving):  # not n4's: never sent there
            assert not n4.store.versions.version_ids(parse(address(i)).context())
        sim.network.partition(["n2", "n3"], ["n1", "n4", "client"])
        with pytest.raises(RemoteError) as refused:
            await sim.call("n1", "ctx.history", {"address": address(moving[0]), "r": 2})
        assert refused.value.code == "UCXL-503-UNAVAILABLE"  # n1 and n4 answered: n4 is
        assert "read: 1 of 2 needed" in str(refused.value)  # not counted toward R
