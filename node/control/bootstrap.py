"""A new cluster's first Raft state: the bootstrap snapshot built from the nodes' keyrings.

Owns how the founding cluster metadata is read off the nodes (each member's keyring
``node_id`` and node recipient, the roles' current key versions, the recorded admin split;
for ``cluster up --restore``, the restored backup's signers as trusted signers)
and the bootstrap snapshot (index 1, term 1, every founding member a voter), written with
``node.control.log_store.write_bootstrap``. ``node.daemon.cluster_init`` calls it for a
local cluster (one snapshot, written into every node); ``bootstrap_single`` gives a
standalone node a one-voter cluster of its own.

A node created to join a running cluster is not bootstrapped: ``mark_join`` writes the
join marker (``storage.schema.META_JOIN``), and its control plane then starts from an
empty Raft state until the leader's snapshot arrives (``join_pending``, ``clear_join``).

Must not know Raft's rules or how the daemon starts. Invariant: every node of one cluster
is bootstrapped from the same snapshot (same bytes), never twice (``RaftStateExists``); a
node with the join marker is never bootstrapped.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime

from crypto.keyring import Keyring
from node.control.log_store import RaftLogStore, write_bootstrap
from node.control.metadata import (
    BOOTSTRAP_INDEX,
    ClusterMetadata,
    Custody,
    KeyEpoch,
    Member,
    bootstrap_state,
    encode_state,
)
from node.control.raft_types import ConfState, Snapshot, SnapshotMeta
from storage.admin_key import OWN_SHARE_FILE, split_record
from storage.context_store import ContextStore
from storage.kv import KV
from storage.schema import META_JOIN

BOOTSTRAP_TERM = 1


def new_cluster_id() -> str:
    """A fresh random cluster id (uuid4 hex)."""
    return uuid.uuid4().hex


def _iso_ms(text: str) -> int:
    """Milliseconds since the epoch of a keyring timestamp (``2024-05-01T10:00:00Z``)."""
    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000)


def key_epochs_of(keyring: Keyring) -> dict[str, KeyEpoch]:
    """role -> its current key version, recipient and creation time, from ``keyring``."""
    epochs = {}
    for keys in keyring.role_keys():
        current = keys.version(keys.current)
        epochs[keys.role.name] = KeyEpoch(
            current.version, current.recipient, _iso_ms(current.created_at)
        )
    return epochs


def member_of(keyring: Keyring, name: str, rpc_host: str, rpc_port: int) -> Member:
    """The founding (normal) member for the node whose keyring is ``keyring``."""
    return Member(
        keyring.node_id, name, "normal", keyring.node_recipient, rpc_host, rpc_port,
        signing_key=keyring.signer.public_key,
    )  # fmt: skip


def custody_of(store: ContextStore, holders: Mapping[str, int]) -> Custody | None:
    """The custody parameters of the admin split recorded in ``store``, or None (never split)."""
    record = split_record(store)
    if record is None:
        return None
    return Custody(
        int(record["threshold"]), int(record["shares"]), str(record["admin_recipient"]), holders
    )


def bootstrap_snapshot(state: ClusterMetadata) -> Snapshot:
    """The snapshot of ``state`` at the bootstrap index and term; its members not removed
    are the voters."""
    voters = frozenset(node_id for node_id in state.names())
    meta = SnapshotMeta(state.applied_index, BOOTSTRAP_TERM, ConfState(voters))
    return Snapshot(meta, encode_state(state))


def cluster_snapshot(
    members: Sequence[Member],
    custody: Custody | None,
    key_epochs: Mapping[str, KeyEpoch],
    *,
    cluster_id: str | None = None,
    trusted_signers: Sequence[bytes] = (),
) -> Snapshot:
    """The bootstrap snapshot of a new cluster of ``members`` (default duties, 64 vnodes);
    ``trusted_signers``: signing keys trusted besides the members' (a restored backup's)."""
    state = bootstrap_state(
        cluster_id or new_cluster_id(), list(members), custody, key_epochs,
        index=BOOTSTRAP_INDEX, trusted_signers=trusted_signers,
    )  # fmt: skip
    return bootstrap_snapshot(state)


def bootstrap_single(
    store: ContextStore, name: str, rpc_host: str, rpc_port: int
) -> Snapshot | None:
    """Make ``store``'s node a one-voter cluster, unless it already has Raft state.

    Custody comes from the recorded admin split, if any; this node holds share 1 when it
    kept its own share file (``split_admin(forget=True)``).

    Returns:
        The snapshot written, or None when the node already had Raft state or waits to
        join a cluster (nothing done).
    """
    if RaftLogStore(store.kv).has_state() or join_pending(store.kv):
        return None
    keyring = store.keyring
    own_share = (keyring.keys_dir / OWN_SHARE_FILE).exists()
    custody = custody_of(store, {keyring.node_id: 1} if own_share else {})
    snapshot = cluster_snapshot(
        [member_of(keyring, name, rpc_host, rpc_port)], custody, key_epochs_of(keyring)
    )
    write_bootstrap(store.kv, snapshot)
    return snapshot


def mark_join(kv: KV) -> None:
    """Mark a node that has no Raft state as waiting to join a running cluster.

    Raises:
        ValueError: the node already has Raft state (it is or was a cluster's member).
    """
    if RaftLogStore(kv).has_state():
        raise ValueError("this node already has Raft state; it cannot join another cluster")
    kv.write([(META_JOIN, b"1")], sync=True)


def join_pending(kv: KV) -> bool:
    """Whether the node waits to join a cluster (the join marker is set)."""
    return kv.get(META_JOIN) is not None


def clear_join(kv: KV) -> None:
    """Drop the join marker (the leader's snapshot is saved)."""
    kv.write([], [META_JOIN], sync=True)
