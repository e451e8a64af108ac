"""Re-sharing the admin key when the membership changes (node.control.reshare).

The harness of ``test_custody``: real ``NodeService``s over real ``ContextStore``s on the
simulation's in-memory network, the admin identity split 2-of-3 across n1..n3 as
``cluster up`` does, under trio's autojumping ``MockClock``. Here each node's leadership
view also reads one shared ``FakeLog``: the cluster metadata every node has applied
(a proposal applies at once everywhere, or fails when the test says so), and each node
runs an ``AdminCustody`` and an ``AdminReshare``.
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

from crypto.errors import CryptoError
from crypto.roles import ADMIN_ROLE
from crypto.shamir import combine_identity, decrypt_share, encrypt_share_to, split_identity
from node.control import metadata
from node.control.custody import AdminCustody
from node.control.membership_plan import forget_refusal
from node.control.metadata import ApplyResult, ClusterMetadata, Custody, Member
from node.control.raft_types import ConfState, Entry
from node.control.reshare import AdminReshare
from node.errors import RemoteError
from storage.admin_key import OWN_SHARE_FILE, share_epochs, share_file
from storage.errors import Unavailable
from tests.node.control.test_custody import NAMES, FakeLeadership, _split
from tests.sim.harness import SimCluster, open_sim_cluster


@dataclass
class FakeLog:
    """The metadata every node applied; ``refuse``: proposals fail (a leader that dies
    before its entry commits)."""

    state: ClusterMetadata
    hooks: list[Callable[[Entry], None]] = field(default_factory=list)
    refuse: bool = False

    def commit(self, data: bytes) -> ApplyResult:
        index = self.state.applied_index + 1
        self.state, result = metadata.apply(self.state, index, data)
        for hook in list(self.hooks):
            hook(Entry(index, 1, data=data))
        return result


@dataclass
class View(FakeLeadership):
    """One node's view: leadership as in test_custody, plus the shared log."""

    log: FakeLog | None = None
    on_apply: list[Callable[[Entry], None]] = field(default_factory=list)

    @property
    def metadata(self) -> ClusterMetadata | None:
        assert self.log is not None
        return self.log.state

    def applied(self, entry: Entry) -> None:
        for hook in list(self.on_apply):
            hook(entry)

    def custody_params(self) -> tuple[int, str] | None:
        custody = self.log.state.custody if self.log is not None else None
        return None if custody is None else (custody.threshold, custody.admin_recipient)

    def custody_epoch(self) -> int:
        custody = self.log.state.custody if self.log is not None else None
        return 0 if custody is None else custody.epoch

    def conf(self) -> ConfState:
        assert self.log is not None
        return ConfState(frozenset(self.log.state.names()))

    def commit_index(self) -> int:
        assert self.log is not None
        return self.log.state.applied_index

    async def propose(self, data: bytes) -> ApplyResult:
        assert self.log is not None
        if self.log.refuse:
            raise Unavailable("the leader died before its entry committed; retry")
        return self.log.commit(data)


@dataclass
class World:
    sim: SimCluster
    log: FakeLog
    views: dict[str, View]
    custody: dict[str, AdminCustody]
    reshare: dict[str, AdminReshare]
    down: set[str]
    ids: dict[str, str]  # name -> node id

    def elect(self, leader: str, term: int) -> None:
        for view in self.views.values():
            view.term, view.leader = term, leader
            view.notify()

    def custody_now(self) -> Custody:
        assert self.log.state.custody is not None
        return self.log.state.custody

    def share_files(self, name: str) -> dict[int, Path]:
        return share_epochs(self.sim.nodes[name].store.keyring.keys_dir)

    def share(self, name: str, epoch: int) -> str:
        keyring = self.sim.nodes[name].store.keyring
        return decrypt_share((keyring.keys_dir / share_file(epoch)).read_bytes(),
                             keyring.node_identity())  # fmt: skip

    def admin_recipient(self) -> str:
        return self.custody_now().admin_recipient

    async def node_call(self, src: str, dst: str, method: str, body: dict[str, Any]) -> Any:
        async with self.sim.network.open_client(src, dst) as client:
            return await client.call(method, body, timeout_s=3.0)


@asynccontextmanager
async def open_world(tmp: Path, *, fourth: str | None = "joining") -> AsyncIterator[World]:
    """n1..n3 normal holders of a 2-of-3 split; n4 a member in state ``fourth`` with no
    share (None: n4 runs but is no member)."""
    async with open_sim_cluster(tmp / "nodes", size=4) as sim:
        _split(sim, tmp)
        keyrings = {name: sim.nodes[name].store.keyring for name in (*NAMES, "n4")}
        ids = {name: keyring.node_id for name, keyring in keyrings.items()}
        keyrings["n4"].forget(ADMIN_ROLE)  # like n1..n3: only shares, never the identity
        members = [Member(ids[n], n, "normal", keyrings[n].node_recipient) for n in NAMES]
        if fourth is not None:
            members.append(Member(ids["n4"], "n4", fourth, keyrings["n4"].node_recipient))
        admin = keyrings["n1"].recipient(ADMIN_ROLE)
        holders = {ids[name]: number for number, name in enumerate(NAMES, start=1)}
        state = metadata.bootstrap_state("c", members, Custody(2, 3, admin, holders), {})
        log = FakeLog(state)
        down: set[str] = set()
        views = {name: View(name, log=log) for name in (*NAMES, "n4")}
        custody, reshare = {}, {}
        for name, view in views.items():
            service = sim.nodes[name].service
            custody[name] = AdminCustody(service, view, check_interval_s=0.1)
            reshare[name] = AdminReshare(view, custody[name], service, interval_s=0.5,
                                         is_live=lambda n: n not in down)  # fmt: skip
            log.hooks.append(view.applied)
        async with trio.open_nursery() as nursery:
            for name in views:
                await nursery.start(custody[name].run)
                await nursery.start(reshare[name].run)
            yield World(sim, log, views, custody, reshare, down, ids)
            nursery.cancel_scope.cancel()


def _combines(shares: list[str], recipient: str) -> bool:
    try:
        with combine_identity(shares, expected_recipient=recipient):
            return True
    except CryptoError:
        return False


async def test_a_member_that_became_normal_gets_a_share_of_a_new_epoch(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_world(tmp_path) as world:
        world.elect("n1", 1)
        await trio.sleep(2)
        assert world.custody["n1"].held_term() == 1
        assert world.custody_now().epoch == 0  # a joining member is not a target yet
        world.log.commit(metadata.cmd_member_state(world.ids["n4"], "normal"))
        await trio.sleep(2)
        custody = world.custody_now()
        assert (custody.epoch, custody.threshold, custody.shares, custody.lost) == (1, 3, 4, 0)
        assert set(custody.holders) == set(world.ids.values())
        assert world.reshare["n1"].reshares == 1
        status = world.reshare["n4"].status()["admin_custody"]
        assert status == {"epoch": 1, "threshold": 3, "holders": 4, "holder": True,
                          "last_reshare": None}  # fmt: skip
        assert "epoch 1 committed: 4 holders" in (world.reshare["n1"].last or "")
        for name in world.views:  # every member holds epoch 1 only: epoch 0 files are gone
            assert set(world.share_files(name)) == {1}
            assert not (world.sim.nodes[name].store.keyring.keys_dir / OWN_SHARE_FILE).exists()
        shares = [world.share(name, 1) for name in ("n2", "n3", "n4")]
        assert _combines(shares, world.admin_recipient())
        assert not _combines(shares[:2], world.admin_recipient())  # threshold 3 now
        world.elect("n4", 2)  # a new leader rebuilds the identity from epoch-1 shares
        await trio.sleep(2)
        assert not world.custody["n1"].held()
        assert world.custody["n4"].held_term() == 2
        assert world.reshare["n4"].reshares == 0  # nothing more to re-share
        assert world.sim.nodes["n4"].store.keyring.has_identity(ADMIN_ROLE)


async def test_a_leader_dying_between_delivery_and_commit_leaves_the_old_epoch(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_world(tmp_path) as world:
        world.elect("n1", 1)
        await trio.sleep(2)
        world.log.refuse = True  # n1's custody entry will never commit
        world.log.commit(metadata.cmd_member_state(world.ids["n4"], "normal"))
        await trio.sleep(2)
        assert world.custody_now().epoch == 0
        assert "died before its entry committed" in (world.reshare["n1"].last or "")
        for name in world.views:  # phase 1 happened: every member keeps a pending share
            assert 1 in world.share_files(name)
        for name in NAMES:
            assert 0 in world.share_files(name)
        old = [world.share(name, 0) for name in ("n2", "n3")]
        assert _combines(old, world.admin_recipient())  # the committed epoch still combines
        pending = {name: world.share(name, 1) for name in world.views}
        world.log.refuse = False
        world.elect("n2", 2)  # n1 "died"; n2 collects epoch-0 shares, then re-shares
        await trio.sleep(3)
        assert world.custody["n2"].held_term() == 2
        custody = world.custody_now()
        assert custody.epoch == 1
        assert set(custody.holders) == set(world.ids.values())
        assert world.reshare["n2"].reshares == 1
        fresh = {name: world.share(name, 1) for name in world.views}
        assert all(fresh[name] != pending[name] for name in fresh)  # n2's split replaced n1's
        assert _combines([fresh["n1"], fresh["n3"], fresh["n4"]], world.admin_recipient())
        for name in world.views:
            assert set(world.share_files(name)) == {1}


async def test_forgetting_a_holder_re_shares_without_it(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_world(tmp_path, fourth=None) as world:
        world.elect("n1", 1)
        await trio.sleep(2)
        dead = world.ids["n3"]
        old_share = world.share("n3", 0)
        world.down.add("n3")
        assert forget_refusal(world.log.state, "n3", answers=False) is None  # 2 of 3 stay
        world.log.commit(metadata.cmd_member_state(dead, "removed"))
        assert world.custody_now().lost == 1
        await trio.sleep(2)
        custody = world.custody_now()
        assert (custody.epoch, custody.threshold, custody.shares, custody.lost) == (1, 2, 2, 0)
        assert set(custody.holders) == {world.ids["n1"], world.ids["n2"]}
        assert dead not in custody.holders
        # the forgotten node's share no longer counts: it does not combine with the new ones
        assert not _combines([old_share, world.share("n1", 1)], world.admin_recipient())
        assert "admin share" in (forget_refusal(world.log.state, "n2", answers=False) or "")
        world.elect("n2", 2)
        await trio.sleep(2)
        assert world.custody["n2"].held_term() == 2
        assert world.reshare["n2"].reshares == 0


async def test_a_removed_members_share_is_handed_over_before_it_goes(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_world(tmp_path, fourth=None) as world:
        world.elect("n1", 1)
        await trio.sleep(2)
        world.log.commit(metadata.cmd_member_state(world.ids["n2"], "leaving"))
        await trio.sleep(2)
        custody = world.custody_now()
        assert custody.epoch == 1
        assert set(custody.holders) == {world.ids["n1"], world.ids["n3"]}
        assert set(world.share_files("n2")) == set()  # the leaving member kept nothing


async def test_admin_reshare_is_refused_from_a_non_leader_or_a_stale_term(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_world(tmp_path) as world:
        world.elect("n1", 4)
        recipient = world.sim.nodes["n2"].store.keyring.node_recipient
        key = x25519.Identity.generate()
        mnemonic = split_identity(str(key), 1, 1).shares[0]
        sealed = encrypt_share_to(mnemonic, recipient)
        offer = {"term": 4, "epoch": 1, "share": sealed}
        with pytest.raises(RemoteError, match="n3 is not the leader I know") as caught:
            await world.node_call("n3", "n2", "admin.reshare", offer)
        assert caught.value.code == "UCXL-403-FORBIDDEN"
        with pytest.raises(RemoteError, match="stale term 3 < 4"):
            await world.node_call("n1", "n2", "admin.reshare", {**offer, "term": 3})
        with pytest.raises(RemoteError, match="not above the committed custody epoch 0"):
            await world.node_call("n1", "n2", "admin.reshare", {**offer, "epoch": 0})
        with pytest.raises(RemoteError, match="for cluster nodes only"):
            await world.sim.call("n2", "admin.reshare", offer)
        other = encrypt_share_to(mnemonic, world.sim.nodes["n3"].store.keyring.node_recipient)
        with pytest.raises(RemoteError, match="does not open") as sealed_wrong:
            await world.node_call("n1", "n2", "admin.reshare", {**offer, "share": other})
        assert sealed_wrong.value.field == "share"
        assert 1 not in world.share_files("n2")  # nothing refused was written
        assert await world.node_call("n1", "n2", "admin.reshare", offer) == {"epoch": 1}
        assert world.share("n2", 1) == mnemonic
        assert world.custody_now().epoch == 0  # a delivered share alone commits nothing
        ask = {"term": 4, "recipient": str(key.to_public()), "epoch": 1}
        with pytest.raises(RemoteError, match="epoch 1 asked, 0 applied here"):
            await world.node_call("n1", "n2", "admin.share", ask)


@pytest.mark.parametrize(
    ("body", "field_name"),
    [
        ({"epoch": 1, "share": b"x"}, "term"),
        ({"term": 1, "share": b"x"}, "epoch"),
        ({"term": 1, "epoch": -1, "share": b"x"}, "epoch"),
        ({"term": 1, "epoch": True, "share": b"x"}, "epoch"),
        ({"term": 1, "epoch": 1}, "share"),
        ({"term": 1, "epoch": 1, "share": b""}, "share"),
        ({"term": 1, "epoch": 1, "share": "text"}, "share"),
        ({"term": 1, "epoch": 1, "share": b"x" * 5000}, "share"),
    ],
)
async def test_a_malformed_reshare_is_answered_400_naming_the_field(
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    body: dict[str, Any],
    field_name: str,
) -> None:
    async with open_world(tmp_path) as world:
        with pytest.raises(RemoteError) as caught:
            await world.node_call("n1", "n2", "admin.reshare", body)
        assert (caught.value.code, caught.value.field) == ("UCXL-400-INVALID_PAYLOAD", field_name)
