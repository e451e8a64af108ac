"""Cluster-wide key rotation through the leader, over the simulation's in-memory cluster.

Three real ``NodeService``s over real ``ContextStore``s (``tests.sim.harness``), each with
the member methods ``keys.install/reseal/retire`` and a persisted fence; the leader's
``RotationDriver`` runs against a metadata log applied in the test (the state machine of
``node.control.metadata``), under trio's autojumping ``MockClock``. The leader is
cancelled halfway through the re-encryption walk (as a deposed leader's duty is); a new
leader in a higher term resumes from the cursor in the log.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyrage
import pytest
import trio
import trio.testing
from pyrage import x25519

from crypto.roles import ADMIN_ROLE, DEFAULT_ROLES
from crypto.seal_format import age_file_of
from node.control import metadata
from node.control.duties import DutyAction
from node.control.fence import Fence, StaleTerm
from node.control.metadata import ApplyResult, ClusterMetadata, KeyEpoch, Member, bootstrap_state
from node.control.metadata_types import frozen_map
from node.control.rotation import (
    MemberKeys,
    RotationDriver,
    register_member_methods,
    seal_identity,
)
from node.control.rotation_plan import CursorTooLarge, WalkCursor, duty_name
from node.errors import RemoteError
from storage.context_store import ContextStore
from storage.envelope import Envelope
from storage.errors import InvalidPayload
from storage.kv import MemoryKV
from storage.schema import VERSION_PREFIX
from tests.sim.harness import SimCluster, open_sim_cluster

BE = "backend_developer"
NAMES = ("n1", "n2", "n3")
DUTY = duty_name(BE)


@dataclass
class Log:
    """The metadata log, applied in order (every node applies the same)."""

    state: ClusterMetadata
    entries: list[bytes] = field(default_factory=list)

    async def propose(self, data: bytes) -> ApplyResult:
        self.entries.append(data)
        self.state, result = metadata.apply(self.state, self.state.applied_index + 1, data)
        return result


def _state(sim: SimCluster) -> ClusterMetadata:
    members = [
        Member(
            sim.nodes[name].store.keyring.node_id,
            name,
            "normal",
            sim.nodes[name].store.keyring.node_recipient,
        )
        for name in NAMES
    ]
    keyring = sim.nodes["n1"].store.keyring
    epochs = {role: KeyEpoch(1, keyring.recipient(role), 0) for role in (ADMIN_ROLE, BE)}
    return bootstrap_state("c0ffee", members, None, epochs)


def _rows(sim: SimCluster, name: str) -> Iterator[Envelope]:
    for _, data in sim.nodes[name].store.kv.scan(VERSION_PREFIX):
        yield Envelope.decode(data)


def _driver(
    sim: SimCluster, log: Log, leader: str, members: dict[str, MemberKeys]
) -> RotationDriver:
    ids = {sim.nodes[n].store.keyring.node_id: n for n in NAMES}

    def member_list() -> dict[str, tuple[str, str]]:
        return {
            m.node_id: (m.name, m.age_recipient)
            for m in log.state.members.values()
            if m.state != "removed"
        }

    async def call(name: str, method: str, body: dict[str, Any]) -> dict[str, Any]:
        if name == leader:
            return await sim.nodes[leader].service.fanout.on(
                name, method, body, lambda: _local(members[leader], method, body)
            )
        async with sim.network.open_client(leader, name) as client:
            answer: dict[str, Any] = await client.call(method, body, timeout_s=2.0)
            return answer

    assert set(ids.values()) == set(NAMES)
    return RotationDriver(
        sim.nodes[leader].store,
        members=member_list,
        call=call,
        propose=log.propose,
        now_ms=lambda: 1_800_000_000_000,
        retry_s=0.5,
    )


def _local(member: MemberKeys, method: str, body: dict[str, Any]) -> dict[str, Any]:
    if method == "keys.install":
        return member.install(body["term"], body["role"], body["version"], body["identity"])
    if method == "keys.reseal":
        return member.reseal(body["term"], body["role"], body["version"])
    return member.retire(body["term"], body["role"], body["version"])


async def _populate(sim: SimCluster, count: int) -> None:
    for i in range(count):
        role = BE if i % 3 else "observer"
        address = f"ucxl://agent{i}:{role}@p:t{i % 4}/*^/file{i}.md"
        await sim.call(
            NAMES[i % 3], "ctx.put", {"address": address, "record": {"summary": f"s{i}"}}
        )


async def test_rotation_through_the_leader_survives_a_leader_change_and_a_member_down(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_sim_cluster(tmp_path / "nodes") as sim:
        await _populate(sim, 30)
        old_identity = sim.nodes["n1"].store.keyring.current_identity(BE)
        fences = {n: Fence(sim.nodes[n].store.kv, lambda: 0) for n in NAMES}
        members = {
            n: MemberKeys(sim.nodes[n].store, fences[n], batch_size=4, max_batches=1) for n in NAMES
        }
        for name in NAMES:
            register_member_methods(sim.nodes[name].service, members[name])
        log = Log(_state(sim))
        assert (await log.propose(metadata.cmd_duty_schedule(DUTY, 10**9))).ok
        started = await log.propose(metadata.cmd_duty_started(DUTY, 1, 1))
        assert started.value == "start"

        # term 1: n1 leads; n3 is unreachable while the key is installed
        sim.network.partition(["n1"], ["n3"])
        reseal_calls = 0
        first = _driver(sim, log, "n1", members)
        first_call = first.call

        async def counting(name: str, method: str, body: dict[str, Any]) -> dict[str, Any]:
            nonlocal reseal_calls
            if method == "keys.reseal":
                reseal_calls += 1
                if reseal_calls == 4:
                    scope.cancel()  # n1 is deposed halfway through the walk
            return await first_call(name, method, body)

        first.call = counting
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(first.run, DutyAction(DUTY, "start"), 1)
                await trio.sleep(3)
                cursor = WalkCursor.decode(log.state.duties[DUTY].cursor)
                assert cursor.phase == "install"  # n3 is down: the key epoch waits for it
                assert BE not in [
                    r for r in log.state.key_epochs if log.state.key_epochs[r].version > 1
                ]
                sim.network.heal()
                with trio.fail_after(60):
                    await trio.sleep_forever()
        assert scope.cancelled_caught
        halfway = WalkCursor.decode(log.state.duties[DUTY].cursor)
        assert halfway.phase == "reseal"
        assert log.state.key_epochs[BE].version == 2
        new_recipient = halfway.recipient
        assert log.state.duties[DUTY].running

        # term 2: n2 leads and resumes from the cursor in the log
        resumed = await log.propose(metadata.cmd_duty_started(DUTY, 2, 2))
        assert resumed.value == "resume"
        second = _driver(sim, log, "n2", members)
        message = await second.run(DutyAction(DUTY, "resume", log.state.duties[DUTY].cursor), 2)
        assert (await log.propose(metadata.cmd_duty_finished(DUTY, 2, 3, True, message))).ok
        assert not log.state.duties[DUTY].running

        new_identity = sim.nodes["n2"].store.keyring.current_identity(BE)
        assert str(new_identity.to_public()) == new_recipient
        checked = 0
        for name in NAMES:
            store = sim.nodes[name].store
            assert store.keyring.recipient(BE) == new_recipient
            assert not (store.keyring.keys_dir / f"{BE}.v1.key").exists()
            assert store.keyring.rotation_in_progress(BE) is None
            assert fences[name].value() == 2
            for env in _rows(sim, name):
                if env.tombstone or BE not in env.readers:
                    continue
                checked += 1
                pyrage.decrypt(age_file_of(env.ciphertext), [new_identity])
                with pytest.raises(pyrage.DecryptError):
                    pyrage.decrypt(age_file_of(env.ciphertext), [old_identity])
        assert checked >= 20 * 2  # 20 of BE's contexts, on at least two replicas each
        # reads through the cluster still work
        answer = await sim.call(
            "n3",
            "ctx.get",
            {"address": "ucxl://agent1:backend_developer@p:t1/*^/file1.md"},
        )
        assert answer["version"]["fields"]["summary"] == "s1"
        for name in NAMES:  # and every replica opens it as the rotated role
            store = sim.nodes[name].store
            if store.keyring.has_identity(BE):
                view = store.retrieve(
                    "ucxl://agent1:backend_developer@p:t1/*^/file1.md", as_role=BE
                )
                assert view.summary == "s1"
        # the deposed leader's late order is refused everywhere
        async with sim.network.open_client("n1", "n3") as client:
            with pytest.raises(RemoteError):
                await client.call(
                    "keys.retire", {"term": 1, "role": BE, "version": 1}, timeout_s=2.0
                )
        with pytest.raises(StaleTerm):
            members["n2"].retire(1, BE, 1)


def test_the_cursor_round_trips_and_its_phases_wait_for_every_member() -> None:
    ids = ("a", "b", "c")
    cursor = WalkCursor(BE, 2, 1, "age1x", sealed=frozen_map({"a": b"s"}))
    assert WalkCursor.decode(cursor.encode()) == cursor
    assert cursor.pending(ids) == ids
    partial = cursor.with_done("a").with_done("b").advanced(ids)
    assert partial.phase == "install"
    epoch = partial.with_done("c").advanced(ids)
    assert (epoch.phase, epoch.sealed, epoch.done) == ("epoch", {}, frozenset())
    reseal = epoch.advanced(ids)
    assert reseal.phase == "reseal"
    counted = reseal.with_rows("a", 5, 10).with_rows("b", 10, 10).with_done("b")
    assert counted.status(ids) == {
        "role": BE, "version": 2, "phase": "reseal", "members_done": 1,
        "members_total": 3, "rows_done": 15, "rows_total": 20,
    }  # fmt: skip
    done = (
        counted.with_done("a")
        .with_done("c")
        .advanced(ids)
        .with_done("a")
        .with_done("b")
        .with_done("c")
        .advanced(ids)
    )
    assert done.phase == "done"
    assert done.advanced(ids) == done
    big = WalkCursor(BE, 2, 1, "age1x", sealed=frozen_map({str(i): b"x" * 300 for i in range(20)}))
    with pytest.raises(CursorTooLarge):
        big.encode()


def test_an_identity_sealed_to_another_node_is_refused(tmp_path: Path) -> None:
    ContextStore.init(tmp_path / "n", DEFAULT_ROLES)
    store = ContextStore.open(tmp_path / "n", kv=MemoryKV())
    try:
        member = MemberKeys(store, Fence(store.kv, lambda: 0))
        identity = x25519.Identity.generate()
        stranger = x25519.Identity.generate()
        with pytest.raises(InvalidPayload):
            member.install(1, BE, 2, seal_identity(identity, str(stranger.to_public())))
        assert store.keyring.rotation_in_progress(BE) is None
        sealed = seal_identity(identity, store.keyring.node_recipient)
        assert member.install(1, BE, 2, sealed) == {"version": 2}
        assert member.install(1, BE, 2, sealed) == {"version": 2}  # a retried install
        assert store.keyring.recipient(BE) == str(identity.to_public())
    finally:
        store.close()
