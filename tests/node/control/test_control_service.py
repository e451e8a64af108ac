"""The control plane's trio shell (node/control/service.py) over the in-memory cluster.

Three real ``NodeService``s on ``MemoryNetwork`` under MockClock, one ``ControlService``
each, bootstrapped like ``cluster up`` does (one snapshot, every node a voter). Checked:
one leader is elected and every node names it; a proposal made on a follower commits and
applies on every node; a leader duty interrupted by the loss of its leader is resumed by
the next leader; a peer cannot speak for another node id; a malformed ``raft.msg`` gets 400
naming the field; a failed save halts the control plane while the data path keeps serving.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
import trio.testing

from node.control import metadata
from node.control.bootstrap import cluster_snapshot, key_epochs_of, member_of
from node.control.duties import DutyAction
from node.control.log_store import write_bootstrap
from node.control.raft_types import Message, MessageType, Role
from node.control.service import ControlConfig, ControlService
from node.errors import RemoteError
from node.rpc.transport import Peer
from tests.node.discovery_fixtures import wait_until
from tests.sim.harness import SimCluster, open_sim_cluster

CONFIG = ControlConfig(tick_s=0.05, heartbeat_ticks=2, election_ticks=6, election_jitter_ticks=6,
                       duties_interval_s=0.2)  # fmt: skip
ADDRESS = "ucxl://agent:backend_developer@p:t/*^/doc.md"


@dataclass
class Plane:
    """The cluster and each node's control plane, each in its own cancel scope."""

    sim: SimCluster
    nursery: trio.Nursery
    controls: dict[str, ControlService] = field(default_factory=dict)
    scopes: dict[str, trio.CancelScope] = field(default_factory=dict)

    async def start(self, name: str) -> ControlService:
        control = ControlService(
            self.sim.nodes[name].service, CONFIG, rng=random.Random(f"{name}-{len(self.scopes)}"),
            clock_ms=lambda: int(trio.current_time() * 1000),
        )  # fmt: skip
        self.controls[name] = control

        async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            with trio.CancelScope() as scope:
                self.scopes[name] = scope
                await control.run(task_status=task_status)

        await self.nursery.start(run)
        return control

    def stop(self, name: str) -> None:
        self.scopes[name].cancel()

    async def leader(self, among: list[str] | None = None, timeout_s: float = 30.0) -> str:
        """The one node every node in ``among`` names as leader, once they agree."""
        names = among or list(self.controls)
        with trio.fail_after(timeout_s):
            while True:
                seen = {self.controls[n].leader_name() for n in names}
                leaders = [n for n in names if self.controls[n].role() is Role.LEADER]
                if len(seen) == 1 and len(leaders) == 1 and seen == {leaders[0]}:
                    return leaders[0]
                await trio.sleep(0.05)


@asynccontextmanager
async def control_plane(tmp_path: Path) -> AsyncIterator[Plane]:
    async with open_sim_cluster(tmp_path) as sim:
        stores = {name: node.store for name, node in sim.nodes.items()}
        founding = [member_of(s.keyring, name, "127.0.0.1", 0) for name, s in stores.items()]
        any_store = next(iter(stores.values()))
        snapshot = cluster_snapshot(founding, None, key_epochs_of(any_store.keyring))
        for store in stores.values():
            write_bootstrap(store.kv, snapshot)
        async with trio.open_nursery() as nursery:
            plane = Plane(sim, nursery)
            for name in sim.nodes:
                await plane.start(name)
            yield plane
            nursery.cancel_scope.cancel()


async def test_one_leader_and_a_follower_proposal_applies_everywhere(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with control_plane(tmp_path) as plane:
        leader = await plane.leader()
        follower = next(n for n in plane.controls if n != leader)
        terms = {c.term for c in plane.controls.values()}
        assert len(terms) == 1
        assert terms.pop() >= 2  # bootstrap term 1, then an election
        result = await plane.controls[follower].propose(metadata.cmd_duty_schedule("extra", 30))
        assert result.ok, result.error
        with trio.fail_after(5):
            await wait_until(
                lambda: all(
                    c.metadata is not None and "extra" in c.metadata.duties
                    for c in plane.controls.values()
                )
            )
        applied = {c.status()["raft"]["applied_index"] for c in plane.controls.values()}
        assert len(applied) == 1


async def test_a_duty_interrupted_by_a_leader_change_is_resumed_by_the_next_leader(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    calls: list[tuple[str, str, int]] = []
    started = trio.Event()

    def handler_for(name: str) -> Callable[[DutyAction, int], Awaitable[str]]:
        async def sweep(action: DutyAction, term: int) -> str:
            calls.append((name, action.kind, term))
            if len(calls) == 1:
                started.set()
                await trio.sleep_forever()  # the first leader never finishes
            return "swept"

        return sweep

    async with control_plane(tmp_path) as plane:
        for name, control in plane.controls.items():
            control.duty_handlers["ttl_sweep"] = handler_for(name)
        first = await plane.leader()
        with trio.fail_after(10):
            await started.wait()
        plane.stop(first)
        survivors = [n for n in plane.controls if n != first]
        second = await plane.leader(survivors)
        with trio.fail_after(20):
            await wait_until(lambda: len(calls) >= 2)
        assert calls[0][:2] == (first, "start")
        assert calls[1][:2] == (second, "resume")
        assert calls[1][2] > calls[0][2]
        with trio.fail_after(10):
            while True:
                duty = plane.controls[second].metadata.duties["ttl_sweep"]  # type: ignore[union-attr]
                if not duty.running and duty.last_ok:
                    break
                await trio.sleep(0.05)
        assert duty.last_term == calls[1][2]


async def test_a_peer_cannot_speak_for_another_node_and_bad_bodies_are_named(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with control_plane(tmp_path) as plane:
        leader = await plane.leader()
        target = next(n for n in plane.controls if n != leader)
        impostor = next(n for n in plane.controls if n not in (leader, target))
        term_before = plane.controls[target].term
        forged = Message(
            MessageType.VOTE, src=plane.controls[leader].node_id,
            dst=plane.controls[target].node_id, term=term_before + 5,
        )  # fmt: skip
        async with plane.sim.network.open_client(impostor, target) as caller:
            answer = await caller.call("raft.msg", {"msgs": [forged.to_wire()]}, timeout_s=2)
            assert answer == {"stepped": 0}
            assert plane.controls[target].term == term_before
            with pytest.raises(RemoteError) as bad:
                await caller.call("raft.msg", {"msgs": [{"type": "vote"}]}, timeout_s=2)
        assert bad.value.code == "UCXL-400-INVALID_PAYLOAD"
        assert "msgs[0]" in bad.value.message
        with pytest.raises(RemoteError) as refused:  # a client may not send Raft messages
            await plane.sim.call(target, "raft.msg", {"msgs": []})
        assert refused.value.code == "UCXL-403-FORBIDDEN"


async def test_a_failed_save_halts_the_control_plane_and_the_data_path_serves(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with control_plane(tmp_path) as plane:
        leader = await plane.leader()
        victim = next(n for n in plane.controls if n != leader)
        control = plane.controls[victim]

        def failing_save(**_: object) -> None:
            raise OSError("EIO: fsync failed")

        control.log.save = failing_save  # type: ignore[method-assign]
        with trio.fail_after(30):  # the next Ready with entries or a hard state fails
            while control.halted is None:
                await plane.controls[leader].propose(metadata.cmd_duty_schedule("tick", 60))
        assert "fsync failed" in control.halted
        assert control.role() is None
        assert control.status()["role"] is None
        body = {"address": ADDRESS, "record": {"summary": "still"}}
        answer = await plane.sim.call(victim, "ctx.put", body)
        assert answer["ref"]["version_id"]


async def test_a_duty_cut_by_a_lapsed_lease_is_resumed_by_the_same_leader(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    calls: list[tuple[str, str, int]] = []
    running = trio.Event()

    async def sweep(action: DutyAction, term: int) -> str:
        calls.append(("sweep", action.kind, term))
        if len(calls) == 1:
            running.set()
            await trio.sleep_forever()  # cut short by the lapse below
        return "swept"

    async with control_plane(tmp_path) as plane:
        for control in plane.controls.values():
            control.duty_handlers["ttl_sweep"] = sweep
        leader = plane.controls[await plane.leader()]
        with trio.fail_after(10):
            await running.wait()
        term = leader.term
        real = leader.leader_term
        leader.leader_term = lambda: None  # type: ignore[method-assign]
        leader._notify()  # the lease lapsed: the run is cancelled
        await trio.sleep(0.1)
        leader.leader_term = real  # type: ignore[method-assign]
        with trio.fail_after(10):
            await wait_until(lambda: len(calls) >= 2)
        assert leader.term == term  # no election: the same leader, in the same term
        assert calls[1] == ("sweep", "resume", term)
        with trio.fail_after(10):
            await wait_until(
                lambda: (
                    leader.metadata is not None and not leader.metadata.duties["ttl_sweep"].running
                )
            )


async def test_a_non_member_certificate_binds_one_node_id_at_a_time(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Ids learned from certificates (a joiner's, before the metadata lists it) stay
    bounded: each certificate name holds one id, and a new id replaces its old one."""
    async with control_plane(tmp_path) as plane:
        await plane.leader()
        control = next(iter(plane.controls.values()))
        joiner = Peer(name="node9", kind="node", roles=(), fingerprint="00" * 32)
        other = Peer(name="node8", kind="node", roles=(), fingerprint="11" * 32)
        for i in range(50):
            assert control._from(joiner, f"id-{i}")
        assert control.name_of("id-49") == "node9"
        assert control.name_of("id-0") is None
        assert not control._from(other, "id-49")  # still bound to node9's certificate
        assert control._from(other, "id-0")  # released when node9 moved on
        assert control.name_of("id-0") == "node8"
        member = next(iter(control.metadata.members.values())) if control.metadata else None
        assert member is not None
        assert not control._from(joiner, member.node_id)  # a member's id is never rebound
