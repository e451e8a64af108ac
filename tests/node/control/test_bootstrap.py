"""node.control.bootstrap and cluster_init: every founding node starts from one snapshot."""

from __future__ import annotations

from pathlib import Path

import pytest

from crypto.roles import DEFAULT_ROLES
from node.control.bootstrap import bootstrap_single, clear_join, join_pending, mark_join
from node.control.log_store import RaftLogStore, RaftStateExists, write_bootstrap
from node.control.metadata import DEFAULT_DUTIES, decode_state
from node.control.raft_types import HardState
from node.daemon.cluster_init import create_cluster_dir
from storage.admin_key import split_admin
from storage.context_store import ContextStore


def test_a_local_cluster_starts_from_one_snapshot_with_every_node_a_voter(tmp_path: Path) -> None:
    nodes = create_cluster_dir(tmp_path, 3)
    loaded = []
    ids = {}
    for node in nodes:
        with ContextStore.open(tmp_path / node.name / "data") as store:
            loaded.append(RaftLogStore(store.kv).load())
            ids[node.name] = store.keyring.node_id
            admin_recipient = store.keyring.recipient("admin")
            observer = store.keyring.recipient("observer")
    assert all(state == loaded[0] for state in loaded)
    persisted = loaded[0]
    assert persisted.hard_state == HardState(1, None, 1)
    assert persisted.entries == ()
    snapshot = persisted.snapshot
    assert snapshot is not None
    assert (snapshot.meta.index, snapshot.meta.term) == (1, 1)
    assert snapshot.meta.conf.voters == frozenset(ids.values())
    state = decode_state(snapshot.data)
    assert state.applied_index == 1
    assert len(state.cluster_id) == 32
    assert state.ring_members() == ("node1", "node2", "node3")
    assert state.names() == {node_id: name for name, node_id in ids.items()}
    for node in nodes:
        member = state.members[ids[node.name]]
        assert member.state == "normal"
        assert (member.rpc_host, member.rpc_port) == ("127.0.0.1", node.rpc_port)
        assert member.age_recipient.startswith("age1")
    assert state.custody is not None
    assert (state.custody.threshold, state.custody.shares) == (2, 3)
    assert state.custody.admin_recipient == admin_recipient
    assert dict(state.custody.holders) == {ids["node1"]: 1, ids["node2"]: 2, ids["node3"]: 3}
    assert set(state.key_epochs) == {role.name for role in DEFAULT_ROLES}
    assert state.key_epochs["observer"].recipient == observer
    assert state.key_epochs["observer"].version == 1
    assert state.key_epochs["observer"].since_ms > 1_600_000_000_000
    assert {name: d.interval_s for name, d in state.duties.items()} == dict(DEFAULT_DUTIES)
    with ContextStore.open(tmp_path / "node2" / "data") as store, pytest.raises(RaftStateExists):
        write_bootstrap(store.kv, snapshot)


def test_a_standalone_node_bootstraps_itself_once(tmp_path: Path) -> None:
    ContextStore.init(tmp_path / "solo", DEFAULT_ROLES)
    with ContextStore.open(tmp_path / "solo") as store:
        split_admin(store, threshold=1, shares=1, forget=True)
        snapshot = bootstrap_single(store, "solo", "10.0.0.9", 7400)
        assert snapshot is not None
        assert bootstrap_single(store, "solo", "10.0.0.9", 7400) is None
        node_id = store.keyring.node_id
        assert RaftLogStore(store.kv).load().snapshot == snapshot
    assert snapshot.meta.conf.voters == frozenset({node_id})
    state = decode_state(snapshot.data)
    assert state.ring_members() == ("solo",)
    assert state.members[node_id].rpc_port == 7400
    assert state.custody is not None
    assert dict(state.custody.holders) == {node_id: 1}
    assert (state.custody.threshold, state.custody.shares) == (1, 1)


def test_a_standalone_node_without_a_split_has_no_custody(tmp_path: Path) -> None:
    ContextStore.init(tmp_path / "solo", DEFAULT_ROLES)
    with ContextStore.open(tmp_path / "solo") as store:
        snapshot = bootstrap_single(store, "solo", "", 0)
    assert snapshot is not None
    assert decode_state(snapshot.data).custody is None


def test_a_node_marked_to_join_is_never_bootstrapped(tmp_path: Path) -> None:
    ContextStore.init(tmp_path / "joiner", DEFAULT_ROLES)
    with ContextStore.open(tmp_path / "joiner") as store:
        mark_join(store.kv)
        assert join_pending(store.kv)
        assert bootstrap_single(store, "joiner", "", 0) is None
        assert not RaftLogStore(store.kv).has_state()
        clear_join(store.kv)
        assert not join_pending(store.kv)
        assert bootstrap_single(store, "joiner", "", 0) is not None
        with pytest.raises(ValueError, match="already has Raft state"):
            mark_join(store.kv)
