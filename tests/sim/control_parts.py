"""The control plane in the simulation: its per-node service, the observer, the nemesis.

Owns: ``control_plane`` (the ``EXTRA_SERVICES`` factory that runs the real
``ControlService``, ``AdminCustody`` and ``Maintenance`` in each life of a node, with a
fast ``ControlConfig`` and an election rng seeded from the schedule seed, the node name
and its life, so a replay is exact), ``ControlObserver`` (feeds ``control_model`` through
the ``on_change`` / ``on_apply`` hooks, samples every running node's custody state every
``SAMPLE_S`` of simulated time, and checks the end state), killing the current leader, and
the fenced leader-only orders (``ctl.maintain`` with a stale and with the leader's term).

Must not know: Raft's rules, the invariants themselves (``tests.sim.control_model``).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from crypto.roles import ADMIN_ROLE
from node.control.custody import AdminCustody
from node.control.maintenance import Maintenance
from node.control.raft_types import Entry, Role
from node.control.service import ControlConfig, ControlService
from node.errors import PeerUnavailable, RemoteError
from tests.sim import control_model
from tests.sim.node_parts import sim_clock_ms

if TYPE_CHECKING:
    from tests.sim.engine import SimNodeContext, Simulation

# election timeout 5 ticks of 100 ms, randomized in [0.5 s, 1 s); the lease is 4.5 ticks
CONTROL_CONFIG = ControlConfig(
    tick_s=0.1, heartbeat_ticks=1, election_ticks=5, election_jitter_ticks=5
)
SAMPLE_S = 0.02  # custody is sampled every 20 simulated ms (and at every leadership change)
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
        Maintenance(self.control, self.custody.fence, max_key_age_days=36500)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the control plane and custody; observed while they run."""
        self.control.on_change.append(self._leadership)
        self.control.on_apply.append(self._applied)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.control.run)
                await nursery.start(self.custody.run)
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

    def _applied(self, entry: Entry) -> None:
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
        return control_model.EndState(
            self.control.leader_term(), self.control.leader_name(), self.custody.held(),
            self.custody.held_term(), 0 if node is None else node.applied_index,
        )  # fmt: skip

    def floor(self) -> int:
        """``max(current term, persisted fence)``: the lowest term a fenced order may carry."""
        return max(self.control.term, self.custody.fence.value())


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
        states = {name: plane.end_state() for name, plane in sorted(self.live.items())}
        missing = sorted(set(self.sim.names) - set(states))
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
        for name in self.sim.names:
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
