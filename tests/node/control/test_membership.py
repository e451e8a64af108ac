"""Membership changes through the control log, over the simulation's in-memory network.

Four real ``NodeService``s (``tests.sim.harness``), each with a real ``ControlService``
(Raft over ``raft.msg``) and the membership shell (``Transitions``), under trio's
autojumping ``MockClock``. n1..n3 are bootstrapped from one snapshot, as
``node.daemon.cluster_init`` does; n4 carries the join marker and starts from an empty
Raft state. ``streamed`` is a dict the test controls (the data plane's record).
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from node.control.bootstrap import (
    cluster_snapshot,
    join_pending,
    key_epochs_of,
    mark_join,
    member_of,
)
from node.control.log_store import write_bootstrap
from node.control.membership import Transitions
from node.control.metadata import ClusterMetadata
from node.control.raft_types import Message, MessageType
from node.control.service import ControlConfig, ControlService
from node.errors import RemoteError
from tests.sim.harness import SimCluster, open_sim_cluster
from tests.sim.node_parts import sim_clock_ms

FOUNDERS = ("n1", "n2", "n3")
JOINER = "n4"
CONFIG = ControlConfig(duties_interval_s=3600.0)


@dataclass
class World:
    sim: SimCluster
    control: dict[str, ControlService]
    transitions: dict[str, Transitions]
    scopes: dict[str, trio.CancelScope]
    streamed: dict[str, int] = field(default_factory=dict)

    def node_id(self, name: str) -> str:
        return self.sim.nodes[name].store.keyring.node_id

    def leader(self) -> str | None:
        for name, control in self.control.items():
            if name in self.scopes and control.leader_term() is not None:
                return name
        return None

    async def until(self, what: Callable[[], bool], within_s: float = 60.0) -> None:
        with trio.fail_after(within_s):
            while not what():  # noqa: ASYNC110 (polls state that no event announces)
                await trio.sleep(0.05)

    async def call(self, node: str, method: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self.sim.call(node, method, body, timeout_s=30.0)

    def metadata(self, name: str) -> ClusterMetadata:
        state = self.control[name].metadata
        assert state is not None
        return state

    def kill(self, name: str) -> None:
        """The node's control plane stops and the network loses it."""
        self.scopes.pop(name).cancel()
        others = [n for n in self.sim.nodes if n != name]
        self.sim.network.partition([name], others)


@asynccontextmanager
async def open_world(tmp: Path) -> AsyncIterator[World]:
    async with open_sim_cluster(tmp / "nodes", size=4) as sim:
        stores = {name: sim.nodes[name].store for name in sim.nodes}
        founding = [member_of(stores[n].keyring, n, "127.0.0.1", 7000 + i)
                    for i, n in enumerate(FOUNDERS, start=1)]  # fmt: skip
        snapshot = cluster_snapshot(
            founding, None, key_epochs_of(stores["n1"].keyring), cluster_id="c1"
        )
        for name in FOUNDERS:
            write_bootstrap(stores[name].kv, snapshot)
        mark_join(stores[JOINER].kv)
        world = World(sim, {}, {}, {})
        async with trio.open_nursery() as nursery:
            for number, (name, node) in enumerate(sorted(sim.nodes.items())):
                control = ControlService(
                    node.service, CONFIG, rng=random.Random(number), clock_ms=sim_clock_ms
                )
                transitions = Transitions(
                    control, interval_s=0.2, streamed_of=lambda _state: world.streamed
                )
                node.service.status_fields.append(control.status)  # as the daemon does
                world.control[name], world.transitions[name] = control, transitions
                scope = trio.CancelScope()
                world.scopes[name] = scope

                async def serve(
                    c: ControlService = control, t: Transitions = transitions,
                    s: trio.CancelScope = scope,
                ) -> None:  # fmt: skip
                    with s:
                        async with trio.open_nursery() as inner:
                            await inner.start(c.run)
                            await inner.start(t.run)

                nursery.start_soon(serve)
            await world.until(lambda: world.leader() is not None)
            yield world
            nursery.cancel_scope.cancel()


def _add_body(world: World, name: str) -> dict[str, Any]:
    keyring = world.sim.nodes[name].store.keyring
    return {"name": name, "node_id": keyring.node_id, "recipient": keyring.node_recipient,
            "signing_key": keyring.signer.public_key, "rpc_host": "127.0.0.1",
            "rpc_port": 7004}  # fmt: skip


def _all_streamed(world: World) -> None:
    leader = world.leader()
    assert leader is not None
    epoch = world.metadata(leader).ring.epoch
    for name in world.sim.nodes:
        world.streamed[world.node_id(name)] = epoch


async def test_a_joiner_starting_empty_gets_the_snapshot_and_becomes_a_voter(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_world(tmp_path) as world:
        joiner = world.control[JOINER]
        assert joiner.metadata is None
        assert joiner.joining
        follower = next(n for n in FOUNDERS if n != world.leader())
        answer = await world.call(follower, "ctl.member_add", _add_body(world, JOINER))
        assert answer["state"] == "joining"
        assert answer["node_id"] == world.node_id(JOINER)
        await world.until(lambda: joiner.metadata is not None)
        assert not joiner.joining
        assert not join_pending(world.sim.nodes[JOINER].store.kv)
        me = world.node_id(JOINER)
        await world.until(lambda: me in joiner.conf().voters)
        leader = world.leader()
        assert leader is not None
        assert me in world.control[leader].conf().voters
        assert world.metadata(JOINER).members[me].state == "joining"  # waits for streaming
        _all_streamed(world)
        await world.until(lambda: world.metadata(JOINER).members[me].state == "normal")
        status = await world.call(JOINER, "node.status", {})
        assert status["member_state"] == "normal"
        assert JOINER in status["raft"]["voters"]


async def test_remove_moves_leaving_to_removed_only_after_streaming(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_world(tmp_path) as world:
        leader = world.leader()
        assert leader is not None
        gone = next(n for n in FOUNDERS if n != leader)
        gone_id = world.node_id(gone)
        answer = await world.call(leader, "ctl.member_remove", {"name": gone})
        assert answer["state"] == "leaving"
        await trio.sleep(10.0)  # nobody streamed: it stays leaving and a voter
        assert world.metadata(leader).members[gone_id].state == "leaving"
        assert gone_id in world.control[leader].conf().voters
        _all_streamed(world)
        await world.until(lambda: world.metadata(leader).members[gone_id].state == "removed")
        await world.until(lambda: gone_id not in world.control[leader].conf().voters)
        assert world.control[leader].conf().voters == {world.node_id(n)
                                                       for n in FOUNDERS if n != gone}  # fmt: skip


async def test_forget_of_a_dead_voter_and_refusal_of_a_live_one(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_world(tmp_path) as world:
        leader = world.leader()
        assert leader is not None
        victim = next(n for n in FOUNDERS if n != leader)
        with pytest.raises(RemoteError) as refused:
            await world.call(leader, "ctl.member_forget", {"name": victim})
        assert "alive" in str(refused.value)
        world.kill(victim)
        answer = await world.call(leader, "ctl.member_forget", {"name": victim})
        assert answer["state"] == "removed"
        victim_id = world.node_id(victim)
        await world.until(lambda: victim_id not in world.control[leader].conf().voters)
        survivors = {world.node_id(n) for n in FOUNDERS if n != victim}
        assert world.control[leader].conf().voters == survivors
        assert victim not in world.metadata(leader).ring_members()


async def test_member_methods_need_the_admin_role_and_parse_their_fields(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_world(tmp_path) as world:
        body = _add_body(world, JOINER)
        with pytest.raises(RemoteError) as bad:
            await world.call("n1", "ctl.member_add", {**body, "rpc_port": 0})
        assert bad.value.code == "UCXL-400-INVALID_PAYLOAD"
        assert bad.value.field == "rpc_port"
        with pytest.raises(RemoteError) as taken:
            await world.call("n1", "ctl.member_add", {**body, "name": "n2"})
        assert "taken" in str(taken.value)
        world.sim.network.set_identity("reader", kind="client", roles=("observer",))
        async with world.sim.network.open_client("reader", "n1") as client:
            with pytest.raises(RemoteError) as forbidden:
                await client.call("ctl.member_remove", {"name": "n2"}, timeout_s=5.0)
        assert forbidden.value.code == "UCXL-403-FORBIDDEN"


async def test_raft_messages_from_a_member_the_metadata_does_not_list_yet_are_taken(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A node that was down while a member joined restarts with metadata that does not
    list it, and that member may lead by then: its messages are stepped (its node
    certificate proves its name; the id is bound to that name on first sight) and this
    node can answer it. A known member's certificate cannot speak for another id."""
    async with open_world(tmp_path) as world:
        leader = world.leader()
        assert leader is not None
        target = next(n for n in FOUNDERS if n != leader)
        other = next(n for n in FOUNDERS if n not in (leader, target))
        control = world.control[target]
        newcomer = world.node_id(JOINER)
        assert newcomer not in world.metadata(target).members  # stale: n4 is not listed
        heartbeat = Message(
            MessageType.HEARTBEAT, src=newcomer, dst=control.node_id, term=1
        ).to_wire()  # a stale term: stepped, then ignored by the core
        async with world.sim.network.open_client(JOINER, target) as caller:
            answer = await caller.call("raft.msg", {"msgs": [heartbeat]}, timeout_s=2)
        assert answer == {"stepped": 1}
        assert control.name_of(newcomer) == JOINER  # so it can answer n4
        async with world.sim.network.open_client(other, target) as caller:
            taken = await caller.call("raft.msg", {"msgs": [heartbeat]}, timeout_s=2)
            assert taken == {"stepped": 0}  # n4's id is bound to n4's certificate
            invented = Message(
                MessageType.HEARTBEAT, src="f" * 16, dst=control.node_id, term=1
            ).to_wire()
            taken = await caller.call("raft.msg", {"msgs": [invented]}, timeout_s=2)
            assert taken == {"stepped": 0}  # a member's certificate speaks for its own id
        assert control.name_of("f" * 16) is None
