"""Admin-key custody by the leader, forwarding of admin operations, fencing by term.

Three real ``NodeService``s over real ``ContextStore``s on the simulation's in-memory
network (``tests.sim.harness``), the admin identity Shamir-split across them as
``node.daemon.cluster_init`` does (2 of 3, the record on n1 only), each with an
``AdminCustody`` driven by a fake ``Leadership`` the test controls, under trio's
autojumping ``MockClock``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from pyrage import x25519

from crypto.roles import ADMIN_ROLE, DEFAULT_ROLES
from crypto.shamir import decrypt_share
from node.control.custody import AdminCustody
from node.control.fence import Fence, StaleTerm
from node.errors import RemoteError
from storage.address import ContextName, parse
from storage.admin_key import OWN_SHARE_FILE, split_admin
from storage.context_store import ContextStore
from storage.schema import META_FENCE
from tests.sim.harness import SimCluster, open_sim_cluster

SECRET = "ucxl://ceo:admin@p:t/*^/secret.md"
OTHER = "ucxl://ceo:admin@p:t/*^/other.md"
NAMES = ("n1", "n2", "n3")


@dataclass
class FakeLeadership:
    """What one node believes about leadership; the test moves it."""

    name: str
    term: int = 0
    leader: str | None = None
    lease: bool = True
    on_change: list[Callable[[], None]] = field(default_factory=list)

    def leader_name(self) -> str | None:
        return self.leader

    def leader_term(self) -> int | None:
        return self.term if self.leader == self.name and self.lease else None

    def custody_params(self) -> tuple[int, str] | None:
        return None  # the local split record (these nodes have no cluster metadata)

    def custody_epoch(self) -> int:
        return 0

    def notify(self) -> None:
        for callback in list(self.on_change):
            callback()


@dataclass
class World:
    """The cluster, each node's custody and leadership view."""

    sim: SimCluster
    custody: dict[str, AdminCustody]
    views: dict[str, FakeLeadership]

    def elect(self, leader: str, term: int) -> None:
        """Every node learns that ``leader`` leads ``term``."""
        for view in self.views.values():
            view.term, view.leader = term, leader
            view.notify()

    async def node_call(self, src: str, dst: str, method: str, body: dict[str, Any]) -> Any:
        """A request from node ``src`` (its node certificate) to ``dst``."""
        async with self.sim.network.open_client(src, dst) as client:
            return await client.call(method, body, timeout_s=3.0)


def _split(sim: SimCluster, tmp: Path) -> None:
    """The admin identity split 2-of-3 across the nodes; each keeps only its own share."""
    stores = {name: sim.nodes[name].store for name in NAMES}
    recipients = [stores[name].keyring.node_recipient for name in NAMES]
    out = tmp / "shares"
    split_admin(stores["n1"], threshold=2, shares=3, to=recipients, out_dir=out)
    for number, name in enumerate(NAMES, start=1):
        keyring = stores[name].keyring
        (keyring.keys_dir / OWN_SHARE_FILE).write_bytes((out / f"share-{number}.age").read_bytes())
        keyring.forget(ADMIN_ROLE)
        assert not keyring.has_identity(ADMIN_ROLE)


@asynccontextmanager
async def open_world(tmp: Path) -> AsyncIterator[World]:
    async with open_sim_cluster(tmp / "nodes") as sim:
        _split(sim, tmp)
        views = {name: FakeLeadership(name) for name in NAMES}
        custody = {
            name: AdminCustody(sim.nodes[name].service, views[name], check_interval_s=0.1)
            for name in NAMES
        }
        async with trio.open_nursery() as nursery:
            for name in NAMES:
                await nursery.start(custody[name].run)
            yield World(sim, custody, views)
            nursery.cancel_scope.cancel()
        for name in NAMES:  # stopping wipes
            assert not custody[name].held()
            assert not sim.nodes[name].store.keyring.has_identity(ADMIN_ROLE)


def _holders(world: World) -> dict[str, int | None]:
    return {name: c.held_term() for name, c in world.custody.items() if c.held()}


async def _put_secret(world: World, summary: str = "admin only") -> None:
    body = {"address": SECRET, "record": {"summary": summary}, "readers": [ADMIN_ROLE]}
    await world.sim.call("n3", "ctx.put", body)


async def test_the_leader_collects_shares_and_holds_the_identity(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_world(tmp_path) as world:
        await trio.sleep(1)
        assert _holders(world) == {}  # no leader: nobody collects
        world.elect("n2", 1)
        await trio.sleep(1)
        assert _holders(world) == {"n2": 1}
        assert world.sim.nodes["n2"].store.keyring.has_identity(ADMIN_ROLE)
        assert not world.sim.nodes["n1"].store.keyring.has_identity(ADMIN_ROLE)
        assert world.custody["n2"].collections == 1
        assert world.custody["n2"].status() == {"held": True, "held_term": 1}


async def test_a_followers_admin_read_is_forwarded_to_the_leader(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_world(tmp_path) as world:
        await _put_secret(world)
        get = {"address": SECRET, "as_role": ADMIN_ROLE}
        with pytest.raises(RemoteError, match="no leader known") as caught:
            await world.sim.call("n3", "ctx.get", get)
        assert caught.value.code == "UCXL-503-UNAVAILABLE"
        world.elect("n1", 1)
        await trio.sleep(1)
        got = await world.sim.call("n3", "ctx.get", get)
        assert got["version"]["fields"]["summary"] == "admin only"
        assert not world.custody["n3"].held()  # n3 never held it: n1 answered
        batch = await world.sim.call("n2", "ctx.get_batch", {"addresses": [SECRET], **get})
        assert batch["results"][0]["version"]["fields"]["summary"] == "admin only"
        history = await world.sim.call("n2", "ctx.history", get)
        assert len(history["history"]) == 1
        plain = await world.sim.call("n3", "ctx.ls", {"pattern": SECRET})  # not forwarded
        assert len(plain["contexts"]) == 1


async def test_the_leader_refuses_forwarded_work_until_it_holds_the_key(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_world(tmp_path) as world:
        await _put_secret(world)
        world.views["n3"].term, world.views["n3"].leader = 1, "n1"  # n3 believes n1 leads
        forward = {
            "method": "ctx.get",
            "body": {"address": SECRET, "as_role": ADMIN_ROLE},
            "client": {"name": "client", "roles": [ADMIN_ROLE]},
        }
        with pytest.raises(RemoteError, match="not the leader") as caught:
            await world.node_call("n3", "n1", "admin.forward", forward)  # n1 does not lead
        assert caught.value.code == "UCXL-503-UNAVAILABLE"
        world.views["n1"].term, world.views["n1"].leader = 1, "n1"  # leads, not notified
        with pytest.raises(RemoteError, match="does not hold the admin key yet"):
            await world.node_call("n3", "n1", "admin.forward", forward)
        world.views["n1"].notify()
        await trio.sleep(1)
        got = await world.node_call("n3", "n1", "admin.forward", forward)
        assert got["version"]["fields"]["summary"] == "admin only"
        # a forwarded request is never forwarded again: n2 (no key, not the leader) refuses
        world.views["n2"].term, world.views["n2"].leader = 1, "n1"
        with pytest.raises(RemoteError, match="not the leader"):
            await world.node_call("n3", "n2", "admin.forward", forward)
        with pytest.raises(RemoteError, match="for cluster nodes only") as refused:
            await world.sim.call("n1", "admin.forward", forward)  # a client may not
        assert refused.value.code == "UCXL-403-FORBIDDEN"


async def test_a_new_leader_takes_custody_and_the_old_one_wipes_at_once(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_world(tmp_path) as world:
        await _put_secret(world)
        world.elect("n1", 1)
        await trio.sleep(1)
        assert _holders(world) == {"n1": 1}
        world.elect("n2", 2)  # synchronously, before any task runs
        assert _holders(world) == {}
        assert not world.sim.nodes["n1"].store.keyring.has_identity(ADMIN_ROLE)
        await trio.sleep(1)
        assert _holders(world) == {"n2": 2}
        got = await world.sim.call("n1", "ctx.get", {"address": SECRET, "as_role": ADMIN_ROLE})
        assert got["version"]["fields"]["summary"] == "admin only"
        world.views["n2"].lease = False  # lease lapses: wiped on the change ...
        world.views["n2"].notify()
        assert _holders(world) == {}
        world.views["n2"].lease = True  # ... and collected again when it holds
        world.views["n2"].notify()
        await trio.sleep(1)
        assert _holders(world) == {"n2": 2}
        world.views["n2"].term = 3  # a higher term seen without a callback: the periodic check
        await trio.sleep(0.15)
        assert _holders(world) == {}  # (the others are still in term 2: they refuse shares)
        assert world.custody["n2"].wipes == 2
        world.elect("n2", 3)
        await trio.sleep(1)
        assert _holders(world) == {"n2": 3}


async def test_a_leader_retries_until_enough_shares_answer(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_world(tmp_path) as world:
        world.views["n1"].term, world.views["n1"].leader = 1, "n1"
        world.views["n1"].notify()  # n2 and n3 know no leader yet: they refuse their shares
        await trio.sleep(3)
        assert _holders(world) == {}
        refused = world.custody["n1"]._failures
        assert refused >= 3
        world.views["n3"].term, world.views["n3"].leader = 1, "n1"
        await trio.sleep(3)  # at most MAX_RETRY_S later
        assert _holders(world) == {"n1": 1}


async def test_admin_share_is_given_only_to_the_leader_for_the_current_term(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_world(tmp_path) as world:
        world.views["n2"].term, world.views["n2"].leader = 4, "n1"
        key = x25519.Identity.generate()
        ask = {"term": 4, "recipient": str(key.to_public())}
        with pytest.raises(RemoteError, match="n3 is not the leader I know") as caught:
            await world.node_call("n3", "n2", "admin.share", ask)
        assert caught.value.code == "UCXL-403-FORBIDDEN"
        with pytest.raises(RemoteError, match="stale term 3 < 4"):
            await world.node_call("n1", "n2", "admin.share", {**ask, "term": 3})
        with pytest.raises(RemoteError, match="ahead of mine"):
            await world.node_call("n1", "n2", "admin.share", {**ask, "term": 5})
        with pytest.raises(RemoteError, match="for cluster nodes only"):
            await world.sim.call("n2", "admin.share", ask)
        answer = await world.node_call("n1", "n2", "admin.share", ask)
        share = decrypt_share(answer["share"], key)  # sealed to the asked recipient only
        assert len(share.split()) >= 20
        assert share.encode() not in answer["share"]
        (world.sim.nodes["n2"].store.keyring.keys_dir / OWN_SHARE_FILE).unlink()
        with pytest.raises(RemoteError, match="holds no admin share") as missing:
            await world.node_call("n1", "n2", "admin.share", ask)
        assert missing.value.code == "UCXL-404-NOT_FOUND"


async def test_a_purge_with_a_stale_term_is_refused_by_the_replicas(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_world(tmp_path) as world:
        await _put_secret(world)
        world.elect("n1", 1)
        await trio.sleep(1)
        for name in ("n2", "n3"):  # they have seen a leader of term 3 since
            world.custody[name].fence.admit(3)
        with pytest.raises(RemoteError) as caught:
            await world.sim.call("n2", "ctx.purge", {"address": SECRET})  # forwarded to n1
        assert caught.value.code == "UCXL-503-UNAVAILABLE"  # only n1 itself accepted
        n2 = world.sim.nodes["n2"].store
        assert n2.versions.purge_marker(_context(SECRET)) is None
        marker = world.sim.nodes["n1"].store.versions.purge_marker(_context(SECRET))
        assert marker is not None  # the deposed leader's own replica took it
        stale = {"context": _context(SECRET).canonical(), "marker": marker.encode(), "term": 1}
        with pytest.raises(RemoteError, match="stale leader term 1 < 3") as refused:
            await world.node_call("n1", "n3", "rep.purge", stale)
        assert refused.value.code == "UCXL-403-FORBIDDEN"
        assert refused.value.field == "term"
        world.views["n2"].term = 4  # its own Raft term is a floor too
        with pytest.raises(RemoteError, match="stale leader term 3 < 4"):
            await world.node_call("n1", "n2", "rep.purge", {**stale, "term": 3})
        # (the deposed leader's own replica applied it: like any write that failed its
        # quorum it may still spread by repair, which carries no term; see replica_side)
        repair = {k: v for k, v in stale.items() if k != "term"}
        assert await world.node_call("n1", "n2", "rep.purge", repair) == {"removed": 1}
        other = {"address": OTHER, "record": {"summary": "x"}, "readers": [ADMIN_ROLE]}
        await world.sim.call("n3", "ctx.put", other)
        world.elect("n1", 5)
        await trio.sleep(1)
        done = await world.sim.call("n3", "ctx.purge", {"address": OTHER})  # a current term
        assert done["versions"] == 1
        await trio.sleep(1)  # the sends after the quorum finish
        for name in NAMES:
            assert world.custody[name].fence.value() == 5
            assert world.sim.nodes[name].store.versions.purge_marker(_context(OTHER)) is not None


async def test_purge_off_the_leader_without_a_leader_is_unavailable(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_world(tmp_path) as world:
        await _put_secret(world)
        with pytest.raises(RemoteError, match="no leader known"):
            await world.sim.call("n1", "ctx.purge", {"address": SECRET})
        service = world.sim.nodes["n1"].service
        assert service.leader_term_for_ops is not None
        with pytest.raises(Exception, match="not the leader"):
            service.leader_term_for_ops()


@pytest.mark.parametrize(
    ("method", "body", "field_name"),
    [
        ("admin.share", {"recipient": "age1x"}, "term"),
        ("admin.share", {"term": "1", "recipient": "age1x"}, "term"),
        ("admin.share", {"term": -1, "recipient": "age1x"}, "term"),
        ("admin.share", {"term": 1}, "recipient"),
        ("admin.share", {"term": 1, "recipient": "age1notarecipient"}, "recipient"),
        ("admin.forward", {"body": {}, "client": {"name": "c", "roles": []}}, "method"),
        ("admin.forward", {"method": "ctx.put", "body": {}, "client": {}}, "method"),
        ("admin.forward", {"method": "ctx.get", "body": [], "client": {}}, "body"),
        ("admin.forward", {"method": "ctx.get", "body": {}}, "client"),
        ("admin.forward", {"method": "ctx.get", "body": {}, "client": {"roles": []}}, "client"),
        (
            "admin.forward",
            {"method": "ctx.get", "body": {}, "client": {"name": "c", "roles": [1]}},
            "client",
        ),
        (
            "rep.purge",
            {"context": parse(SECRET).context().canonical(), "marker": b"m", "term": "1"},
            "term",
        ),
    ],
)
async def test_a_malformed_body_is_answered_400_naming_the_field(
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    method: str,
    body: dict[str, Any],
    field_name: str,
) -> None:
    async with open_world(tmp_path) as world:
        with pytest.raises(RemoteError) as caught:
            await world.node_call("n1", "n2", method, body)
        assert (caught.value.code, caught.value.field) == ("UCXL-400-INVALID_PAYLOAD", field_name)


async def test_the_fence_persists_across_a_reopen(tmp_path: Path) -> None:
    ContextStore.init(tmp_path / "d", DEFAULT_ROLES)
    current = {"term": 2}
    with ContextStore.open(tmp_path / "d") as store:
        fence = Fence(store.kv, lambda: current["term"])
        assert fence.value() == 0
        fence.admit(7)
        fence.admit(7)  # the same term again is fine
        with pytest.raises(StaleTerm, match="stale leader term 6 < 7"):
            fence.admit(6)
    with ContextStore.open(tmp_path / "d") as store:
        fence = Fence(store.kv, lambda: current["term"])
        assert fence.value() == 7
        assert store.kv.get(META_FENCE) == b"7"
        with pytest.raises(StaleTerm):
            fence.admit(5)
        current["term"] = 9
        with pytest.raises(StaleTerm, match="8 < 9"):
            fence.admit(8)
        assert fence.value() == 7  # a refusal never moves the fence


def _context(address: str) -> ContextName:
    return parse(address).context()
