"""Creating a local cluster directory: CA, node data directories, configs, admin shares.

Owns the layout ``node.daemon.ops`` documents (D/ca, D/NAME/data, D/NAME/node.toml,
D/client.toml) and the one-time setup: a CA, one data directory per node sharing the
role identities, node certificates issued for each node's signing key, free loopback
ports, the admin identity Shamir-split across the nodes (each keeps only its share), and
one Raft bootstrap snapshot of the cluster metadata (``node.control.bootstrap``: every node
a normal member and a voter) written into every node's store. A cluster founded from a
backup (``cluster up --restore``, ``node.daemon.restore_seed``) gets the backup's role and
admin identities instead of fresh ones, and its snapshot lists the backup's signers as
trusted signers.

Growing a cluster (``create_joiner_dirs``, for ``slurp cluster add``): a new node's data
directory gets the cluster's role identities (copied from an existing node's keyring; the
admin identity stays split: the new keyring records the cluster's admin recipient and
holds no admin identity), a node certificate of the cluster CA, a ``node.toml`` whose
discovery seeds are the existing nodes, and the join marker
(``node.control.bootstrap.mark_join``): it starts waiting for the leader's snapshot.
Must not start processes (``node.daemon.ops`` does).
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from crypto.ca import CertificateAuthority
from crypto.keyfiles import write_secret_file
from crypto.keyring import Keyring
from crypto.roles import ADMIN_ROLE, DEFAULT_ROLES
from crypto.signing import private_key_from_pem
from node.control.bootstrap import (
    cluster_snapshot,
    custody_of,
    key_epochs_of,
    mark_join,
    member_of,
)
from node.control.log_store import write_bootstrap
from node.control.reshare_plan import threshold_for
from node.daemon.config import (
    ClusterConfig,
    DiscoveryConfig,
    HostPort,
    ListenConfig,
    NodeConfig,
    TlsConfig,
    load_node_config,
    render_node_config,
)
from node.daemon.restore_seed import FoundingKeys
from storage.admin_key import OWN_SHARE_FILE, split_admin
from storage.context_store import ContextStore


class ClusterError(Exception):
    """A local cluster could not be made, started or reached; the message says why."""


@dataclass(frozen=True)
class LocalNode:
    """One node of a local cluster."""

    name: str
    rpc_port: int
    http_port: int
    dht_port: int
    pid: int = 0


def _free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _node_key(data_dir: Path) -> Ed25519PrivateKey:
    path = data_dir / "keys" / "node.ed25519"
    return private_key_from_pem(path.read_bytes(), str(path))


def create_cluster_dir(
    root: Path, count: int, *, founding: FoundingKeys | None = None
) -> list[LocalNode]:
    """Create the directory of a new local cluster of ``count`` nodes (module docstring).

    Args:
        root: the cluster directory.
        count: how many nodes.
        founding: for ``cluster up --restore``: every node gets these role identities (the
            admin one is split as usual) and the founding metadata records their trusted
            signers; None: fresh keys.

    Raises:
        ClusterError: ``count`` < 1.
    """
    if count < 1:
        raise ClusterError("a cluster needs at least one node")
    root.mkdir(parents=True, exist_ok=True)
    ca = CertificateAuthority.init(root / "ca", name="slurp local cluster CA")
    names = [f"node{i}" for i in range(1, count + 1)]
    members = [
        LocalNode(
            name,
            _free_port(socket.SOCK_STREAM),
            _free_port(socket.SOCK_STREAM),
            _free_port(socket.SOCK_DGRAM),
        )
        for name in names
    ]
    first = root / names[0] / "data"
    if founding is None:
        ContextStore.init(first, DEFAULT_ROLES)
        with ContextStore.open(first) as store:
            identities = {r.name: store.keyring.current_identity(r.name) for r in DEFAULT_ROLES}
    else:
        identities = dict(founding.identities)
        ContextStore.init(first, DEFAULT_ROLES, role_identities=identities)
    for name in names[1:]:
        ContextStore.init(root / name / "data", DEFAULT_ROLES, role_identities=identities)
    for member in members:
        data = root / member.name / "data"
        ca.issue_node(member.name, ["127.0.0.1", "localhost"], key=_node_key(data))
        config = NodeConfig(
            name=member.name,
            data_dir=data,
            tls=TlsConfig(
                ca=root / "ca" / "ca.crt",
                cert=root / "ca" / f"{member.name}.crt",
                key=root / "ca" / f"{member.name}.key",
                crl=root / "ca" / "ca.crl",
            ),
            rpc=ListenConfig("127.0.0.1", member.rpc_port),
            http=ListenConfig("127.0.0.1", member.http_port),
            discovery=DiscoveryConfig(
                "127.0.0.1",
                member.dht_port,
                tuple(HostPort("127.0.0.1", m.dht_port) for m in members if m is not member),
            ),
            cluster=ClusterConfig(n=min(3, count), w=min(2, count), r=min(2, count)),
        )
        (root / member.name / "node.toml").write_text(render_node_config(config))
    _split_admin(root, names)
    _bootstrap_raft(root, members, () if founding is None else founding.trusted_signers)
    ca.issue_client("client", [role.name for role in DEFAULT_ROLES])
    seeds = ", ".join(f'"127.0.0.1:{m.rpc_port}"' for m in members)
    (root / "client.toml").write_text(
        f'seeds = [{seeds}]\n\n[tls]\nca = "ca/ca.crt"\ncert = "ca/client.crt"\n'
        'key = "ca/client.key"\n'
    )
    return members


def _split_admin(root: Path, names: list[str]) -> None:
    """Split admin across the nodes (majority threshold); each keeps only its share."""
    recipients = []
    for name in names:
        meta = json.loads((root / name / "data" / "keys" / "keyring.json").read_text())
        recipients.append(str(meta["node_recipient"]))
    shares_dir = root / "ca" / "admin-shares"
    with ContextStore.open(root / names[0] / "data") as store:
        split_admin(
            store, threshold=threshold_for(len(names)),
            shares=len(names), to=recipients, out_dir=shares_dir,
        )  # fmt: skip
    for number, name in enumerate(names, start=1):
        keys = root / name / "data" / "keys"
        own = keys / OWN_SHARE_FILE
        own.unlink(missing_ok=True)
        write_secret_file(own, (shares_dir / f"share-{number}.age").read_bytes())
        with ContextStore.open(root / name / "data") as store:
            store.keyring.forget(ADMIN_ROLE)


def _bootstrap_raft(
    root: Path, members: list[LocalNode], trusted_signers: tuple[bytes, ...] = ()
) -> None:
    """Write one bootstrap snapshot (all nodes normal voters; ``trusted_signers`` trusted
    besides them) into every node's store.

    Share number i of the admin split is held by the i-th node (``_split_admin``).
    """
    founding = []
    for member in members:
        with ContextStore.open(root / member.name / "data") as store:
            founding.append(member_of(store.keyring, member.name, "127.0.0.1", member.rpc_port))
    with ContextStore.open(root / members[0].name / "data") as store:
        holders = {m.node_id: number for number, m in enumerate(founding, start=1)}
        snapshot = cluster_snapshot(
            founding, custody_of(store, holders), key_epochs_of(store.keyring),
            trusted_signers=trusted_signers,
        )  # fmt: skip
    for member in members:
        with ContextStore.open(root / member.name / "data") as store:
            write_bootstrap(store.kv, snapshot)


@dataclass(frozen=True)
class Joiner:
    """A node created to join a running local cluster: where it listens, and what the
    leader records of it (``ctl.member_add``)."""

    node: LocalNode
    node_id: str
    recipient: str
    signing_key: bytes


def _name_number(name: str) -> int:
    digits = name.removeprefix("node")
    return int(digits) if digits.isdigit() else 0


def create_joiner_dirs(root: Path, existing: list[LocalNode], count: int) -> list[Joiner]:
    """Create ``count`` new nodes (``nodeK``, K after the highest existing number) to join
    the cluster of ``existing`` (module docstring). Nothing is started or proposed.

    Raises:
        ClusterError: no existing node, or a role key was rotated (only version 1 is
            copied; not supported yet).
    """
    if count < 1:
        raise ClusterError("add at least one node")
    if not existing:
        raise ClusterError(f"no nodes in {root}: create the cluster with `cluster up`")
    source = root / existing[0].name / "data"
    src_meta = json.loads((source / "keys" / "keyring.json").read_text())
    if any(int(role["current"]) != 1 for role in src_meta["roles"]):
        raise ClusterError("a role key was rotated: cluster add copies version-1 keys only")
    keyring = Keyring.open(source / "keys")
    identities = {
        role.name: keyring.current_identity(role.name)
        for role in DEFAULT_ROLES
        if role.name != ADMIN_ROLE and keyring.has_identity(role.name)
    }
    base = load_node_config(root / existing[0].name / "node.toml")
    ca = CertificateAuthority.open(root / "ca")
    first = max(_name_number(m.name) for m in existing) + 1
    seeds = tuple(HostPort("127.0.0.1", m.dht_port) for m in existing)
    joiners = []
    for number in range(first, first + count):
        name = f"node{number}"
        node = LocalNode(name, _free_port(socket.SOCK_STREAM), _free_port(socket.SOCK_STREAM),
                         _free_port(socket.SOCK_DGRAM))  # fmt: skip
        data = root / name / "data"
        ContextStore.init(data, DEFAULT_ROLES, role_identities=identities)
        with ContextStore.open(data) as store:
            store.keyring.forget(ADMIN_ROLE)  # a fresh one was made: the cluster's is split
            mark_join(store.kv)
            node_id, recipient = store.keyring.node_id, store.keyring.node_recipient
            signing_key = store.keyring.signer.public_key
        meta_path = data / "keys" / "keyring.json"
        meta = json.loads(meta_path.read_text())
        meta["roles"] = src_meta["roles"]  # the cluster's recipients (admin's included)
        meta_path.write_text(json.dumps(meta, indent=2))
        ca.issue_node(name, ["127.0.0.1", "localhost"], key=_node_key(data))
        config = NodeConfig(
            name=name, data_dir=data,
            tls=TlsConfig(ca=root / "ca" / "ca.crt", cert=root / "ca" / f"{name}.crt",
                          key=root / "ca" / f"{name}.key", crl=root / "ca" / "ca.crl"),
            rpc=ListenConfig("127.0.0.1", node.rpc_port),
            http=ListenConfig("127.0.0.1", node.http_port),
            discovery=DiscoveryConfig("127.0.0.1", node.dht_port, seeds),
            cluster=base.cluster,
        )  # fmt: skip
        (root / name / "node.toml").write_text(render_node_config(config))
        joiners.append(Joiner(node, node_id, recipient, signing_key))
    return joiners
