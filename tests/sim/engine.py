"""The simulation engine: runs one ``Schedule`` on a whole cluster inside one trio run.

Owns: simulated nodes (a real ``NodeService`` over a real ``ContextStore`` whose LevelDB is
a ``MemoryKV`` behind a fault-injecting wrapper), their crash and restart, the nemesis
steps, the client operations, the quiet period and the invariant checks of
``tests.sim.model``. Used by ``scripts/sim`` (``tests.sim.run``) and by pytest.

Crash and restart: the node's ``MemoryKV`` and its data directory (keys, index files)
survive; the ``ContextStore`` (cache, clock, index writer), the ``NodeService``, the peer
pool, the failure detector, the server and every extra service are torn down (the index
is closed, as the index directory lock must be released in one process) and built again.

Per-node services: ``EXTRA_SERVICES`` (or ``run_schedule(..., extra_services=...)``) lists
factories ``(SimNodeContext) -> service``; each service's ``run(task_status=...)`` is
started in the node's nursery and restarted with the node. By default every node runs
hinted handoff and anti-entropy (the real ``HandoffService`` and ``AntiEntropyService``,
with short intervals), and ``CONVERGENCE_REQUIRED`` demands identical replicas after the
quiet period, with no reads.

Membership: ``names`` are every node directory (the founders, bootstrapped, then the
spares, which carry the join marker and start at a ``Join`` step). The replicas, the
final reads and the control plane's end state are those of the final ring (the members
joining or normal in the most advanced applied metadata); a forgotten node stays down and
its store, like a removed node's, is not counted. A schedule with a membership change
waits after ``QUIET_S`` until the transitions settled and every ring member cleaned up
(at most ``SETTLE_MAX_S``), then ``QUIET_S`` again.
"""

from __future__ import annotations

import random
import shutil
import tempfile
import traceback
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import trio
import trio.testing

from node.cluster.antientropy import AntiEntropyConfig
from node.cluster.antientropy_service import AntiEntropyService
from node.cluster.handoff import HandoffService
from node.cluster.handoff_plan import HandoffConfig
from node.cluster.layout import layout_of
from node.cluster.liveness import FailureDetector, StaticCluster
from node.cluster.replication import Quorum, place
from node.cluster.service import NodeService, ServiceConfig
from node.rpc.memory_transport import MemoryNetwork
from node.rpc.peers import PeerPool
from node.rpc.transport import Caller
from storage.address import ContextName, parse
from storage.context_store import ContextStore
from storage.hints import HintStore
from storage.version_store import VersionStore
from tests.sim import memory_index, model
from tests.sim.control_parts import ControlObserver, control_plane
from tests.sim.node_parts import (
    CrashingDialer,
    FaultyKV,
    SimNode,
    abandon,
    leaves,
    ring_of,
    share_ring,
    sim_clock_ms,
    template,
)
from tests.sim.ops import ClientOps
from tests.sim.schedule import CONTEXTS, Schedule

CLIENT = "client"
CONVERGENCE_REQUIRED = True  # hinted handoff + anti-entropy run in every node (EXTRA_SERVICES)
HANDOFF_INTERVAL_S = 0.5
ANTIENTROPY_INTERVAL_S = 2.0
# simulated seconds of a fault-free network after the last step: failure detection sees every
# node up, hints drain, and anti-entropy passes run (on start, on member up, at 2 s)
QUIET_S = 2 * ANTIENTROPY_INTERVAL_S
SETTLE_MAX_S = 30.0  # simulated seconds a change gets to settle after QUIET_S
SETTLE_POLL_S = 0.5


class SimService(Protocol):
    """An extra per-node service (hinted handoff, anti-entropy)."""

    async def run(self, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled."""


@dataclass
class SimNodeContext:
    """What a service factory gets to build one node's extra service."""

    name: str
    store: ContextStore
    service: NodeService
    cluster: StaticCluster
    pool: PeerPool
    network: MemoryNetwork
    names: Sequence[str]
    seed: int  # the schedule's
    life: int  # 1 for the first start, +1 per restart
    observer: ControlObserver  # the simulation's record of the control plane


ServiceFactory = Callable[[SimNodeContext], SimService]


def handoff_service(context: SimNodeContext) -> SimService:
    """Hinted handoff over the node's durable store (hints survive a crash)."""
    settings = HandoffConfig(interval_s=HANDOFF_INTERVAL_S)
    hints = HintStore(
        context.store.kv, max_bytes=settings.max_bytes, clock_ms=context.store.clock_ms
    )
    service = HandoffService(context.service, hints, settings)
    context.cluster.on_up.append(service.wake)
    return service


def antientropy_service(context: SimNodeContext) -> SimService:
    """Active anti-entropy (its hash tree is rebuilt from the durable store at each start)."""
    return AntiEntropyService(context.service, AntiEntropyConfig(interval_s=ANTIENTROPY_INTERVAL_S))


EXTRA_SERVICES: list[ServiceFactory] = [handoff_service, antientropy_service, control_plane]


class Simulation:
    """One cluster running one schedule; see the module docstring."""

    def __init__(
        self,
        root: Path,
        schedule: Schedule,
        extra_services: Sequence[ServiceFactory],
        *,
        quorum: Quorum | None = None,
    ) -> None:
        self.schedule = schedule
        self.names = schedule.all_names  # every node directory
        self.founders = schedule.names
        self.joined: set[str] = set()  # spares a Join step started
        self.forgotten: set[str] = set()  # crashed for good by a Forget step
        self.final: list[str] = []  # the final ring, once checked
        self.quorum = quorum or Quorum()
        self.extra_services = list(extra_services)
        self.network = MemoryNetwork(random.Random(schedule.seed))
        self.network.set_identity(CLIENT, kind="client", roles=("admin",))
        for name in self.names:
            self.network.set_identity(name, kind="node", roles=())
        made = template(schedule.nodes, schedule.spares)
        source, self._signers = made.root, made.signers
        for name in self.names:  # config and the (unopened) db are only read: link them
            (root / name / "index").mkdir(parents=True)
            for part in ("config.toml", "db"):
                (root / name / part).symlink_to(source / name / part)
            # keys are copied: a re-share of the admin key writes and deletes share files
            shutil.copytree(source / name / "keys", root / name / "keys", symlinks=True)
        self.nodes = {name: SimNode(name, root / name) for name in self.names}
        self.spares = made.spares
        for node in self.nodes.values():
            memory_index.use_memory_index(node.root, node.index_docs)
            if node.name in self.founders:
                node.durable.write(made.control_rows)  # Raft bootstrap + admin split record
            else:
                node.durable.write(made.join_rows)  # the join marker
        self.history = model.History()
        self.control = ControlObserver(self)
        self._nursery: trio.Nursery | None = None

    # -- node lifecycle -------------------------------------------------------------------

    async def start(self, name: str) -> None:
        """Start ``name`` (no-op when it runs); returns once its server is up.

        A start while another is under way (a ``Restart`` step right after the ``Join``
        that starts a spare) waits for that one instead of starting a second life."""
        node = self.nodes[name]
        while node.starting is not None:
            await node.starting.wait()
        if node.running and node.scope is not None and node.scope.cancel_called:
            assert node.stopped is not None
            await node.stopped.wait()  # it is dying (crashed mid-write): restart it after
        if node.running:
            return
        assert self._nursery is not None
        node.starting = starting = trio.Event()
        try:
            await self._nursery.start(self._node_main, node)
        finally:
            node.starting = None
            starting.set()

    async def crash(self, name: str) -> None:
        """Kill ``name`` now; returns once its tasks are gone."""
        node = self.nodes[name]
        if node.running:
            assert node.scope is not None
            assert node.stopped is not None
            node.scope.cancel()
            await node.stopped.wait()

    async def _node_main(self, node: SimNode, *, task_status: trio.TaskStatus[None]) -> None:
        node.stopped = trio.Event()
        node.lives += 1
        store = ContextStore.open(node.root, kv=FaultyKV(node.durable, node), clock_ms=sim_clock_ms)
        for key in self._signers:
            store.trust_signer(key)
        node.store = store
        started = False
        try:
            with trio.CancelScope() as scope:
                node.scope = scope
                cluster = StaticCluster(node.name, self.present())  # until the metadata

                def connect(peer: str) -> AbstractAsyncContextManager[Caller]:
                    return self.network.open_client(node.name, peer)

                pool = PeerPool(connect, on_result=cluster.mark)
                config = ServiceConfig(
                    quorum=self.quorum, timeout_s=1.0,
                    blocking_in_threads=self.schedule.threaded,
                )  # fmt: skip
                service = NodeService(store, cluster, CrashingDialer(pool, node), config)
                share_ring(service, self.founders)
                node.service = service
                detector = FailureDetector(cluster, pool, interval_s=0.5, timeout_s=0.5)
                context = SimNodeContext(
                    node.name, store, service, cluster, pool, self.network, self.names,
                    self.schedule.seed, node.lives, self.control,
                )  # fmt: skip
                try:
                    async with trio.open_nursery() as nursery:
                        await nursery.start(pool.run)
                        await nursery.start(service.run)
                        await nursery.start(self.network.server(node.name, service.handle).run)
                        await nursery.start(detector.run)
                        for factory in self.extra_services:
                            await nursery.start(factory(context).run)
                        started = True
                        task_status.started()
                except* Exception as group:  # a node that stops by itself breaks an invariant
                    if not scope.cancel_called:  # (errors while it is being killed do not)
                        for exc in leaves(group):
                            node.failures.append(
                                f"{node.name} stopped: {type(exc).__name__}: {exc}"
                                f" (at {raised_at(exc)})"
                            )
                    else:
                        node.teardown_errors += len(leaves(group))
        finally:
            abandon(store)
            node.service = None
            node.stopped.set()
            if not started:  # crashed (or failed) while starting: the start is over all the same
                task_status.started()

    # -- running a schedule ---------------------------------------------------------------

    async def run(self) -> list[str]:
        """Run the schedule, the quiet period and the checks; the violations found."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for name in self.founders:
                await self.start(name)
            nursery.start_soon(partial(self.control.sampler, threaded=self.schedule.threaded))
            await trio.sleep(0.6)  # nodes started before their peers re-probe them
            ops = ClientOps(self)
            async with trio.open_nursery() as clients:
                for step in self.schedule.steps:
                    await ops.step(clients, step)
            await self.quiet()
            problems = self.check()
            problems += await ops.final_reads()
            problems += await self.check_control()
            nursery.cancel_scope.cancel()
        for node in self.nodes.values():
            problems += node.failures
            memory_index.forget(node.root)
        return problems

    async def quiet(self) -> None:
        """Faults stop: links healed, disks fixed, crashed nodes back (and those whose
        control plane halted on a failed disk write restarted); then ``QUIET_S``."""
        self.network.heal()
        self.network.drop = self.network.duplicate = self.network.max_delay_s = 0.0
        for node in self.nodes.values():
            node.disk_failing = False
            node.crash_after_sends = None
        for name in self.control.halted():  # as the operator would, told by its status
            await self.crash(name)
        for name in self.present():
            await self.start(name)
        await trio.sleep(QUIET_S)
        states = self.member_states()  # (read once the nodes are back: they may all be down)
        for name in sorted(self.forgotten):  # a forget that did not happen: it comes back
            if name in states:
                self.forgotten.discard(name)
                await self.start(name)
        if self.schedule.changes:
            with trio.move_on_after(SETTLE_MAX_S):
                while not self.settled():  # noqa: ASYNC110 (polled: no event to wait for)
                    await trio.sleep(SETTLE_POLL_S)
            await trio.sleep(QUIET_S)

    def present(self) -> list[str]:
        """The nodes the simulation runs: the founders and the joined spares, less the
        forgotten."""
        return [
            n for n in self.names
            if (n in self.founders or n in self.joined) and n not in self.forgotten
        ]  # fmt: skip

    def final_members(self) -> list[str]:
        """The final ring: the members joining or normal in the most advanced applied
        metadata (the running nodes when no node applied any)."""
        meta = self.control.metadata()
        if meta is None:
            return self.present()
        return list(layout_of(meta).new)

    def member_states(self) -> dict[str, str]:
        """name -> member state in the most advanced applied metadata."""
        meta = self.control.metadata()
        if meta is None:
            return {}
        return {m.name: m.state for m in meta.members.values() if m.state != "removed"}

    def settled(self) -> bool:
        """No member joining or leaving, and every running ring member places by the
        final epoch and cleaned up for it."""
        meta = self.control.metadata()
        if meta is None or model.settled(self.member_states()):
            return False
        for name in self.final_members():
            plane = self.control.live.get(name)
            layout = None if plane is None else plane.control.service.layout
            if plane is None or layout is None or layout.epoch != meta.ring.epoch:
                return False
            if plane.rebalance._cleaned != meta.ring.epoch:  # (sim-only reach-in)
                return False
        return True

    def snapshot(self) -> dict[str, model.NodeSnapshot]:
        """Every node's durable version sets (straight from its KV, no RPC, no repair)."""
        snaps = {}
        for name, node in self.nodes.items():
            versions = VersionStore(node.durable)
            snap = model.NodeSnapshot()
            for ctx in range(CONTEXTS):
                name_ = context_name(ctx)
                snap.versions[ctx] = {row.version_id for row in versions.versions(name_)}
                marker = versions.purge_marker(name_)
                snap.purge_upto[ctx] = None if marker is None else marker.upto
            snaps[name] = snap
        return snaps

    def check(self) -> list[str]:
        """The invariants over the history and the durable state after the quiet period."""
        self.final = self.final_members()
        ring = set(self.final)
        snaps = {name: snap for name, snap in self.snapshot().items() if name in ring}
        problems = model.acked_writes_kept(self.history, snaps)
        problems += model.reads_were_written(self.history)
        problems += model.purged_stay_purged(self.history, snaps, everywhere=CONVERGENCE_REQUIRED)
        if CONVERGENCE_REQUIRED:
            problems += model.converged(self.replicas(), snaps)
        if self.schedule.changes:
            problems += model.settled(self.member_states())
            problems += model.exact_replicas(self.replicas(), snaps)
        problems += self.control.drop_problems
        problems += self.writes_in_flight()
        return problems

    def writes_in_flight(self) -> list[str]:
        """Every write a running node coordinated has ended (its write tracker is empty):
        the client operations are over and the quiet period outlasts any replica attempt,
        so a write still counted is a leaked token, which would hold ``epoch_seen`` back."""
        problems = []
        for name in self.present():
            service = self.nodes[name].service
            if service is not None and service.writes.in_flight():
                problems.append(
                    f"{name} counts {service.writes.in_flight()} writes in flight after the"
                    " quiet period"
                )
        return problems

    async def check_control(self) -> list[str]:
        """The control plane's invariants: those recorded along the way, the end state,
        and the fenced orders after the quiet period."""
        if control_plane not in self.extra_services:
            return []
        problems = self.control.end_problems()
        if not problems:  # a leader to send the leader's orders from
            await self.control.fenced_final()
        return problems + self.control.record.problems

    def replicas(self) -> dict[int, list[str]]:
        """The N replicas of each context in the final ring with every node up."""
        names = self.final_members()
        ring = ring_of(names)
        return {
            ctx: list(place(ring, context_name(ctx).key(), self.quorum.n, names).replicas)
            for ctx in range(CONTEXTS)
        }


def address(ctx: int) -> str:
    """The latest-version address of simulated context ``ctx``."""
    return f"ucxl://agent{ctx}:backend_developer@sim:t{ctx}/*^/doc{ctx}.md"


def context_name(ctx: int) -> ContextName:
    """The ``ContextName`` of simulated context ``ctx``."""
    return parse(address(ctx)).context()


async def run_schedule(
    schedule: Schedule,
    root: Path,
    *,
    extra_services: Sequence[ServiceFactory] | None = None,
) -> list[str]:
    """Run ``schedule`` in the current trio run (under a MockClock); the violations."""
    sim = Simulation(root, schedule, EXTRA_SERVICES if extra_services is None else extra_services)
    return await sim.run()


def run_schedule_sync(
    schedule: Schedule, *, extra_services: Sequence[ServiceFactory] | None = None
) -> list[str]:
    """Run ``schedule`` in its own trio run and temporary directory; the violations.

    Trio's scheduler shuffles ready tasks with its own random stream; it is seeded from
    the schedule so that a replay runs the same interleaving. Threaded schedules use an
    autojump threshold so the mock clock waits briefly for a worker thread before jumping.
    """
    trio._core._run._r.seed(schedule.seed)
    clock = trio.testing.MockClock(autojump_threshold=0.005 if schedule.threaded else 0)
    with tempfile.TemporaryDirectory(prefix="slurp-sim-") as tmp:
        return trio.run(
            lambda: run_schedule(schedule, Path(tmp), extra_services=extra_services), clock=clock
        )


def raised_at(exc: BaseException) -> str:
    """Where ``exc`` was raised: the innermost frames, ``file:line in function`` each."""
    frames = traceback.extract_tb(exc.__traceback__)[-3:]
    return (
        " <- ".join(f"{Path(f.filename).name}:{f.lineno} in {f.name}" for f in reversed(frames))
        or "unknown"
    )
