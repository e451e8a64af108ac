"""The control plane in the simulation: its per-node service, the observer, the nemesis.

Owns: ``control_plane`` (the ``EXTRA_SERVICES`` factory that runs the real
``ControlService``, ``AdminCustody``, ``Maintenance``, ``Transitions`` (``ctl.member_*``
and the leader's transition driver) and ``RebalanceService`` in each life of a node, with a
fast ``ControlConfig`` and an election rng seeded from the schedule seed, the node name
and its life, so a replay is exact; the node places by the applied metadata's layout as
the daemon's ``_sync_members`` does, and every drop of a context by the rebalancer is
checked first against the owners' durable stores), ``ControlObserver`` (feeds
``control_model`` through the ``on_change`` / ``on_apply`` hooks, samples every running
node's custody state every ``SAMPLE_S`` of simulated time, and checks the end
state), killing the current leader, and the fenced leader-only orders (``ctl.maintain``
with a stale and with the leader's term).

Must not know: Raft's rules, the invariants themselves (``tests.sim.control_model``).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from crypto.roles import ADMIN_ROLE
from node.cluster.layout import layout_of
from node.cluster.rebalance import RebalanceConfig, RebalanceService, _Item
from node.control.custody import AdminCustody
from node.control.maintenance import Maintenance
from node.control.membership import Transitions
from node.control.metadata import ClusterMetadata
from node.control.raft_types import Entry, Role
from node.control.reshare import AdminReshare
from node.control.service import ControlConfig, ControlService
from node.errors import PeerUnavailable, RemoteError
from storage.admin_key import share_epochs
from storage.version_store import VersionStore
from tests.sim import control_model, model
from tests.sim.node_parts import sim_clock_ms

if TYPE_CHECKING:
    from tests.sim.engine import SimNodeContext, Simulation

# election timeout 5 ticks of 100 ms, randomized in [0.5 s, 1 s); the lease is 4.5 ticks
CONTROL_CONFIG = ControlConfig(
    tick_s=0.1, heartbeat_ticks=1, election_ticks=5, election_jitter_ticks=5
)
SAMPLE_S = 0.02  # custody is sampled every 20 simulated ms (and at every leadership change)
SYNC_S = 0.5  # the layout is also looked at this often (a joiner's snapshot applies no entry)
TRANSITION_S = 0.5  # the transition driver's interval
RESHARE_S = 0.5  # the admin re-share loop's interval
REBALANCE = RebalanceConfig(bytes_per_s=64 * 1024 * 1024, poll_s=0.5)
FENCED_TIMEOUT_S = 1.0
STALE_TERM = "stale leader term"


class ControlPlane:
    """One life of one node's control plane (an extra service of the simulation)."""

    def __init__(self, context: SimNodeContext) -> None:
        self.name = context.name
        self.life = context.life
        self.observer: ControlObserver = context.observer
        rng = random.Random(f"slurp-sim-raft:{context.seed}:{context.name}:{context.life}")
        self.control = ControlService(
            context.service, CONTROL_CONFIG, rng=rng, clock_ms=sim_clock_ms
        )
        self.custody = AdminCustody(context.service, self.control)
        self.reshare = AdminReshare(self.control, self.custody, context.service,
                                    interval_s=RESHARE_S)  # fmt: skip
        Maintenance(self.control, self.custody.fence, max_key_age_days=36500)
        self.transitions = Transitions(self.control, interval_s=TRANSITION_S)
        self.rebalance = CheckedRebalance(context.service, self.control, REBALANCE)
        self.rebalance.observer = self.observer
        self.cluster = context.cluster
        self._placed: int | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the control plane, custody, the transition driver and the rebalancer;
        observed while they run."""
        self.control.on_change.append(self._leadership)
        self.control.on_apply.append(self._applied)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.control.run)
                self.sync()
                await nursery.start(self.custody.run)
                await nursery.start(self.reshare.run)
                await nursery.start(self.transitions.run)
                await nursery.start(self.rebalance.run)
                nursery.start_soon(self._sync_loop)
                # after custody's own hook: a change is sampled once custody has reacted
                self.control.on_change.append(self.observer.sample)
                self.observer.live[self.name] = self
                task_status.started()
                await trio.sleep_forever()
        finally:
            if self.observer.live.get(self.name) is self:
                del self.observer.live[self.name]

    def _leadership(self) -> None:
        if self.control.role() is Role.LEADER:
            self.observer.record.leader(self.name, self.control.term)

    def sync(self) -> None:
        """Place by the applied metadata's layout once its ring epoch is new (as the
        daemon's ``_sync_members``: joining members are written to as well)."""
        applied = self.control.metadata
        if applied is None or applied.ring.epoch == self._placed:
            return
        self._placed = applied.ring.epoch
        layout = layout_of(applied)
        self.control.service.set_layout(layout)
        self.cluster.set_members(layout.members)

    async def _sync_loop(self) -> None:
        while True:
            await trio.sleep(SYNC_S)
            self.sync()

    def _applied(self, entry: Entry) -> None:
        self.sync()
        self.rebalance.wake()
        digest = hashlib.sha256(entry.kind.name.encode() + b"/" + entry.data).hexdigest()[:12]
        if entry.conf is not None:
            digest += ":" + ",".join(sorted(entry.conf.voters))
        self.observer.record.apply(self.name, self.life, entry.index, entry.term, digest)

    def custody_sample(self) -> control_model.CustodySample:
        """This node's custody state now."""
        return control_model.CustodySample(
            self.control.leader_term(), self.custody.held(), self.custody.held_term(),
            self.control.service.store.keyring.has_identity(ADMIN_ROLE),
        )  # fmt: skip

    def end_state(self) -> control_model.EndState:
        """This node's view for the end-of-run check."""
        node = self.control._node  # the applied index (sim-only reach-in)
        applied = self.control.metadata
        custody = None if applied is None else applied.custody
        keyring = self.custody.keyring
        return control_model.EndState(
            self.control.leader_term(), self.control.leader_name(), self.custody.held(),
            self.custody.held_term(), 0 if node is None else node.applied_index,
            custody_epoch=None if custody is None else custody.epoch,
            holder=custody is not None and keyring.node_id in custody.holders,
            share_epochs=tuple(sorted(share_epochs(keyring.keys_dir))),
        )  # fmt: skip

    def floor(self) -> int:
        """``max(current term, persisted fence)``: the lowest term a fenced order may carry."""
        return max(self.control.term, self.custody.fence.value())


class CheckedRebalance(RebalanceService):
    """The real rebalancer; before each drop, the owners' durable stores are checked
    (``model.drop_problems``) and the drop is recorded."""

    observer: ControlObserver

    async def _drop(self, items: Sequence[_Item]) -> None:
        if items:
            _, ring = self.service.placement_rings()
            n = self.service.config.quorum.n
            for item in items:
                owners = ring.preference_list(item.ctx.key(), n)
                self.observer.dropped(self.service.name, item.ctx, item.state.version_ids, owners)
        await super()._drop(items)


def control_plane(context: SimNodeContext) -> ControlPlane:
    """The ``EXTRA_SERVICES`` factory of the control plane."""
    return ControlPlane(context)


@dataclass
class _Order:
    """A fenced order about to be sent."""

    sender: str
    receiver: str
    term: int
    stale: bool
    life: int


class ControlObserver:
    """The simulation-wide observer of every node's control plane."""

    def __init__(self, sim: Simulation) -> None:
        self.sim = sim
        self.record = control_model.ControlRecord()
        self.live: dict[str, ControlPlane] = {}
        self.drops = 0  # contexts the rebalancers dropped
        self.drop_problems: list[str] = []

    def dropped(
        self, name: str, ctx: Any, version_ids: frozenset[str], owners: Sequence[str]
    ) -> None:
        """``name`` is about to drop ``version_ids`` of ``ctx``: every owner must hold them
        durably (or have purged them) now."""
        held = {}
        for owner in owners:
            versions = VersionStore(self.sim.nodes[owner].durable)
            marker = versions.purge_marker(ctx)
            held[owner] = (set(versions.version_ids(ctx)), None if marker is None else marker.upto)
        self.drops += 1
        self.drop_problems += model.drop_problems(name, ctx.canonical(), version_ids, held)

    def metadata(self) -> ClusterMetadata | None:
        """The most advanced cluster metadata any running node applied (None: none)."""
        found = [p.control.metadata for p in self.live.values() if p.control.metadata is not None]
        return max(found, key=lambda m: m.applied_index, default=None)

    def sample(self) -> None:
        """Check every running node's custody state now."""
        self.record.sample({name: plane.custody_sample() for name, plane in self.live.items()})

    async def sampler(self, *, threaded: bool) -> None:
        """Sample every ``SAMPLE_S`` until cancelled; not in threaded schedules (there
        every wake-up costs the autojump threshold in wall time: they are sampled at every
        leadership change only)."""
        if threaded:
            return
        while True:
            self.sample()
            await trio.sleep(SAMPLE_S)

    def halted(self) -> list[str]:
        """The running nodes whose control plane halted (a Raft log write failed)."""
        return sorted(name for name, plane in self.live.items() if plane.control.halted)

    def leader(self) -> ControlPlane | None:
        """The running node that leads with a lease now (None: none)."""
        for plane in self.live.values():
            if plane.control.leader_term() is not None:
                return plane
        return None

    def end_problems(self) -> list[str]:
        """The end-of-run control invariants (every node is running)."""
        ring = set(self.sim.final_members())
        states = {
            name: plane.end_state() for name, plane in sorted(self.live.items()) if name in ring
        }
        missing = sorted(ring - set(states))
        if missing:
            return [f"after the quiet period {missing} run no control plane"]
        return control_model.end_state(self.record, states)

    # -- fenced orders --------------------------------------------------------------------

    def orders(self, receiver: str) -> list[_Order]:
        """The fenced orders to send ``receiver`` now: one with a stale term (if its term
        allows one) and one from the current leader with its term (if there is a leader)."""
        plane = self.live.get(receiver)
        if plane is None:
            return []
        life, term = plane.life, plane.control.term
        sender = next(n for n in self.sim.names if n != receiver)
        found = [_Order(sender, receiver, term - 1, True, life)] if term >= 2 else []
        leader = self.leader()
        if leader is not None and leader.name != receiver:
            leader_term = leader.control.term
            stale = leader_term < term
            found.append(_Order(leader.name, receiver, leader_term, stale, life))
        return found

    async def send(self, order: _Order, *, strict: bool) -> None:
        """Send ``order`` (``ctl.maintain``) and check the answer; with ``strict`` (after
        the quiet period), no answer at all is a violation too."""
        what = f"ctl.maintain to {order.receiver} from {order.sender} with term {order.term}"
        body: dict[str, Any] = {"duty": "ttl_sweep", "term": order.term}
        refused = False
        try:
            async with self.sim.network.open_client(order.sender, order.receiver) as client:
                await client.call("ctl.maintain", body, timeout_s=FENCED_TIMEOUT_S)
        except RemoteError as exc:
            if STALE_TERM not in str(exc):
                if strict:
                    self.record.fenced(what, f"failed: {exc}")
                return  # no verdict: the disk failed, the node stopped...
            refused = True
        except PeerUnavailable as exc:
            if strict:
                self.record.fenced(what, f"failed: {exc}")
            return
        plane = self.live.get(order.receiver)
        if plane is None or plane.life != order.life:
            return  # it restarted meanwhile: an undurable term may have been lost
        verdict = control_model.fenced_verdict(
            order.term, refused, plane.floor(), stale=order.stale
        )
        self.record.fenced(what, verdict)

    async def fenced_step(self, receiver: str) -> None:
        """The schedule step: ``receiver`` gets a stale order and the leader's (if any)."""
        for order in self.orders(receiver):
            await self.send(order, strict=False)

    async def fenced_final(self) -> None:
        """After the quiet period: every follower refuses a stale order and obeys the
        leader's (every node must answer)."""
        for name in self.sim.final_members():
            for order in self.orders(name):
                await self.send(order, strict=True)

    async def kill_leader(self) -> str | None:
        """Crash the node that leads now (with a lease, else the one with the leader role)."""
        plane = self.leader()
        if plane is None:
            roles = [p for p in self.live.values() if p.control.role() is Role.LEADER]
            plane = roles[0] if roles else None
        if plane is None:
            return None
        await self.sim.crash(plane.name)
        return plane.name
