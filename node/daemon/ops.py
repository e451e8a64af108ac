"""Operator entry points: run one node in the foreground; a local cluster on loopback.

What the ``slurp node`` and ``slurp cluster`` commands call (``cli`` imports only this
module and ``node.client`` from ``node``). A local cluster lives in one directory:

    D/ca/                 the cluster CA (ca.crt, ca.key, ca.crl, NAME.crt/.key, client.*)
    D/NAME/data/          a node's data directory (shared role identities; own node keys)
    D/NAME/node.toml      its configuration (free loopback ports)
    D/NAME/node.log       its output;  D/NAME/node.pid  its process id
    D/client.toml         a client profile (seeds and certificate paths) for --profile
    D/cluster.json        names, ports and pids of the nodes

The admin identity is Shamir-split across the nodes (threshold: a majority): each node
keeps only its own share, encrypted to its node identity.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from crypto.ca import CertificateAuthority
from crypto.keyfiles import write_secret_file
from crypto.roles import ADMIN_ROLE, DEFAULT_ROLES
from crypto.signing import private_key_from_pem
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
from node.daemon.lifecycle import NodeDaemon
from storage.admin_key import OWN_SHARE_FILE, split_admin
from storage.context_store import ContextStore
from storage.errors import StorageError

PASSPHRASE_ENV = "SLURP_PASSPHRASE"  # noqa: S105 - the variable's name, not a secret


# nodes this process started, kept so that their exit is collected through Popen
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


class ClusterError(Exception):
    """A local cluster could not be made, started or reached; the message says why."""


# -- one node ----------------------------------------------------------------------------------


def run_node(config_path: Path, env: Mapping[str, str] = os.environ) -> int:
    """Serve one node in the foreground until SIGINT/SIGTERM; returns the exit status.

    Errors are printed as ``CODE: message`` on stderr (exit 2 for a bad configuration,
    1 when the data directory is in use or the node cannot start).
    """
    try:
        config = load_node_config(config_path, env)
    except StorageError as exc:
        print(f"{exc.code}: {exc.message}", file=sys.stderr)
        return 2
    try:
        store = ContextStore.open(config.data_dir, passphrase=env.get(PASSPHRASE_ENV))
    except StorageError as exc:
        print(f"{exc.code}: {exc.message}", file=sys.stderr)
        return 1
    try:
        trio.run(_serve, config, store)
    except Exception as exc:
        print(f"UCXL-500-INTERNAL: the node stopped: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    return 0


async def _serve(config: NodeConfig, store: ContextStore) -> None:
    daemon = NodeDaemon(config, store)
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            ports = await nursery.start(daemon.run)
            print(f"{config.name}: rpc {ports.rpc}, http {ports.http}, dht {ports.discovery}",
                  flush=True)  # fmt: skip
            async for signum in signals:
                print(f"{config.name}: {signal.Signals(signum).name}, stopping", flush=True)
                nursery.cancel_scope.cancel()
                break


# -- a local cluster -----------------------------------------------------------------------------


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


def cluster_up(root: Path, nodes: int = 3, *, timeout_s: float = 60.0) -> list[LocalNode]:
    """Create (if new) and start a local cluster of ``nodes`` nodes; wait until healthy.

    Raises:
        ClusterError: ``root`` holds a running cluster, or a node did not become healthy.
    """
    root = root.absolute()  # node.toml paths are read relative to node.toml's directory
    if (root / "cluster.json").exists():
        running = [n for n in _load(root) if _alive(n.pid)]
        if running:
            raise ClusterError(f"a cluster is already running in {root} (slurp cluster down)")
        members = _load(root)
    else:
        members = _create(root, nodes)
    started = [_start(root, member) for member in members]
    _save(root, started)
    _wait_healthy(root, started, timeout_s)
    return started


def _create(root: Path, count: int) -> list[LocalNode]:
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


def _start(root: Path, member: LocalNode) -> LocalNode:
    home = root / member.name
    log = (home / "node.log").open("ab")
    cmd = [sys.executable, "-m", "cli.main", "node", "start", "--config", str(home / "node.toml")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURP_")}
    process = subprocess.Popen(  # the node outlives this command; `cluster down` stops it
        cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True, env=env,
    )  # fmt: skip
    log.close()
    _CHILDREN[process.pid] = process
    (home / "node.pid").write_text(f"{process.pid}\n")
    return LocalNode(member.name, member.rpc_port, member.http_port, member.dht_port, process.pid)


def start_node(root: Path, name: str, *, timeout_s: float = 30.0) -> LocalNode:
    """Start one stopped node of a local cluster again and wait until it is ready.

    Raises:
        ClusterError: no such node, it is already running, or it did not become ready.
    """
    members = _load(root)
    found = [m for m in members if m.name == name]
    if not found:
        raise ClusterError(f"no node {name!r} in {root}")
    if _alive(found[0].pid):
        raise ClusterError(f"{name} is already running (pid {found[0].pid})")
    started = _start(root, found[0])
    _save(root, [started if m.name == name else m for m in members])
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        answer = health(started)
        if answer and answer.get("ready"):
            return started
        if not _alive(started.pid):
            raise ClusterError(f"{name} exited during start")
        time.sleep(0.2)
    raise ClusterError(f"{name} not ready after {timeout_s} s")


def health(member: LocalNode, timeout_s: float = 1.0) -> dict[str, Any] | None:
    """The node's /health answer, or None when it does not answer."""
    url = f"http://127.0.0.1:{member.http_port}/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as answer:
            data = json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        data = json.loads(exc.read() or b"{}")
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _wait_healthy(root: Path, members: list[LocalNode], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    pending = {m.name for m in members}
    while pending and time.monotonic() < deadline:
        for member in members:
            if member.name not in pending:
                continue
            if not _alive(member.pid):
                log = (root / member.name / "node.log").read_text(errors="replace")[-2000:]
                raise ClusterError(f"{member.name} exited during start:\n{log}")
            answer = health(member)
            checks = (answer or {}).get("checks", {})
            if answer and answer.get("ready") and checks.get("members_up") == len(members):
                pending.discard(member.name)
        time.sleep(0.2)
    if pending:
        raise ClusterError(f"not healthy after {timeout_s} s: {', '.join(sorted(pending))}")


def cluster_status(root: Path) -> dict[str, Any]:
    """Every node: pid, up, health, ring ownership and the contexts it holds.

    The JSON of ``slurp cluster status``: ``{"dir", "profile", "nodes": [{"name",
    "address", "pid", "up", "ownership", "contexts", "health", ...}]}``.
    """
    members = _load(root)
    out = []
    for member in members:
        answer = health(member) if _alive(member.pid) else None
        up = answer is not None and bool(answer.get("ready"))
        status = _node_status(root, member) if up else {}
        ownership = status.get("ring", {}).get("ownership", {})
        out.append(
            {
                **asdict(member),
                "address": f"127.0.0.1:{member.rpc_port}",
                "up": up,
                "ownership": ownership.get(member.name),
                "contexts": status.get("contexts"),
                "health": answer,
            }
        )
    return {"dir": str(root), "nodes": out, "profile": str(root / "client.toml")}


def _node_status(root: Path, member: LocalNode) -> dict[str, Any]:
    """``node.status`` of one node through the SDK ({} when it does not answer)."""
    from node.client import Client  # the SDK is a client of the nodes, not a part of them

    ca = root / "ca"
    try:
        with Client.connect(
            [f"127.0.0.1:{member.rpc_port}"], cert=ca / "client.crt", key=ca / "client.key",
            ca=ca / "ca.crt",
        ) as client:  # fmt: skip
            return client.status()
    except StorageError:
        return {}


def cluster_down(root: Path, *, timeout_s: float = 15.0) -> list[str]:
    """Stop every node (SIGTERM, then SIGKILL after ``timeout_s``); returns the names stopped."""
    stopped = []
    members = _load(root)
    for member in members:
        if _alive(member.pid):
            os.kill(member.pid, signal.SIGTERM)
            stopped.append(member.name)
    deadline = time.monotonic() + timeout_s
    for member in members:
        while _alive(member.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(member.pid):
            os.kill(member.pid, signal.SIGKILL)
        _reap(member.pid)
    _save(root, [LocalNode(m.name, m.rpc_port, m.http_port, m.dht_port, 0) for m in members])
    return stopped


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    _reap(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _reap(pid: int) -> None:
    """Collect a child that exited (when this process started it)."""
    child = _CHILDREN.get(pid)
    if child is not None:
        if child.poll() is not None:
            del _CHILDREN[pid]
        return
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def _save(root: Path, members: list[LocalNode]) -> None:
    (root / "cluster.json").write_text(json.dumps([asdict(m) for m in members], indent=2))


def _load(root: Path) -> list[LocalNode]:
    try:
        data = json.loads((root / "cluster.json").read_text())
        return [LocalNode(**item) for item in data]
    except (OSError, ValueError, TypeError) as exc:
        raise ClusterError(f"no local cluster in {root} ({exc})") from None


__all__ = [
    "ClusterError",
    "LocalNode",
    "cluster_down",
    "cluster_status",
    "cluster_up",
    "health",
    "load_node_config",
    "run_node",
    "start_node",
]
