"""Creating a local cluster directory: CA, node data directories, configs, admin shares.

Owns the layout ``node.daemon.ops`` documents (D/ca, D/NAME/data, D/NAME/node.toml,
D/client.toml) and the one-time setup: a CA, one data directory per node sharing the
role identities, node certificates issued for each node's signing key, free loopback
ports, the admin identity Shamir-split across the nodes (each keeps only its share), and
one Raft bootstrap snapshot of the cluster metadata (``node.control.bootstrap``: every node
a normal member and a voter) written into every node's store.
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
from crypto.roles import ADMIN_ROLE, DEFAULT_ROLES
from crypto.signing import private_key_from_pem
from node.control.bootstrap import cluster_snapshot, custody_of, key_epochs_of, member_of
from node.control.log_store import write_bootstrap
from node.daemon.config import (
    ClusterConfig,
    DiscoveryConfig,
    HostPort,
    ListenConfig,
    NodeConfig,
    TlsConfig,
    render_node_config,
)
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


def create_cluster_dir(root: Path, count: int) -> list[LocalNode]:
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
    ContextStore.init(first, DEFAULT_ROLES)
    with ContextStore.open(first) as store:
        identities = {r.name: store.keyring.current_identity(r.name) for r in DEFAULT_ROLES}
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
    _bootstrap_raft(root, members)
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
            store, threshold=len(names) // 2 + 1 if len(names) > 1 else 1,
            shares=len(names), to=recipients, out_dir=shares_dir,
        )  # fmt: skip
    for number, name in enumerate(names, start=1):
        keys = root / name / "data" / "keys"
        own = keys / OWN_SHARE_FILE
        own.unlink(missing_ok=True)
        write_secret_file(own, (shares_dir / f"share-{number}.age").read_bytes())
        with ContextStore.open(root / name / "data") as store:
            store.keyring.forget(ADMIN_ROLE)


def _bootstrap_raft(root: Path, members: list[LocalNode]) -> None:
    """Write one bootstrap snapshot (all nodes normal voters) into every node's store.

    Share number i of the admin split is held by the i-th node (``_split_admin``).
    """
    founding = []
    for member in members:
        with ContextStore.open(root / member.name / "data") as store:
            founding.append(member_of(store.keyring, member.name, "127.0.0.1", member.rpc_port))
    with ContextStore.open(root / members[0].name / "data") as store:
        holders = {m.node_id: number for number, m in enumerate(founding, start=1)}
        snapshot = cluster_snapshot(
            founding, custody_of(store, holders), key_epochs_of(store.keyring)
        )
    for member in members:
        with ContextStore.open(root / member.name / "data") as store:
            write_bootstrap(store.kv, snapshot)
