"""Operator entry points: run one node in the foreground; a local cluster on loopback.

What the ``slurp node`` and ``slurp cluster`` commands call (``cli`` imports only this
module and ``node.client`` from ``node``). A local cluster lives in one directory:

    D/ca/                 the cluster CA (ca.crt, ca.key, ca.crl, NAME.crt/.key, client.*)
    D/NAME/data/          a node's data directory (shared role identities; own node keys)
    D/NAME/node.toml      its configuration (free loopback ports)
    D/NAME/node.log       its output;  D/NAME/node.pid  its process id (see below)
    D/client.toml         a client profile (seeds and certificate paths) for --profile
    D/cluster.json        names and ports of the nodes (and the pids this tool started)

Pid files: a node writes its own, beside its configuration with the suffix ``.pid``
(``--config D/NAME/node.toml`` -> ``D/NAME/node.pid``), once it holds its data
directory's lock, and removes it when it exits cleanly. So a node started by hand with
``slurp node start --config`` is found by ``slurp cluster status`` and ``cluster up``,
and a second daemon on the same data directory (refused by the lock) never overwrites
the first one's file. A node killed with SIGKILL leaves its file behind: the pid in it is
then not alive and the node counts as down. (A stale pid reused by an unrelated process
would count as alive; ``cluster status`` still shows such a node down, since it does
not answer /health.)

The admin identity is Shamir-split across the nodes (threshold: a majority): each node
keeps only its own share, encrypted to its node identity.

Membership (docs/cluster.md): ``add_nodes`` creates nodes that join the running cluster
(``cluster_init.create_joiner_dirs``), starts them, asks the leader to add each
(``ctl.member_add`` through any live node) and waits until each is "normal";
``remove_node`` asks for a decommission (``ctl.member_remove``), waits until the node is
"removed", then stops its process; ``forget_node`` drops a dead node
(``ctl.member_forget``). A removed or forgotten node leaves ``cluster.json``. Progress is
reported through a callback (``Progress``): the CLI draws it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import trio

from node.daemon.cluster_init import (
    ClusterError,
    Joiner,
    LocalNode,
    create_cluster_dir,
    create_joiner_dirs,
)
from node.daemon.config import NodeConfig, load_node_config
from node.daemon.lifecycle import NodeDaemon
from node.daemon.pidfile import pid_file_for, read_pid_file, remove_pid_file, write_pid_file
from node.daemon.restore_seed import FoundingKeys, founding_keys
from storage.context_store import ContextStore
from storage.errors import StorageError

PASSPHRASE_ENV = "SLURP_PASSPHRASE"  # noqa: S105 - the variable's name, not a secret


# nodes this process started, kept so that their exit is collected through Popen
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


# -- one node ----------------------------------------------------------------------------------


def run_node(config_path: Path, env: Mapping[str, str] = os.environ) -> int:
    """Serve one node in the foreground until SIGINT/SIGTERM; returns the exit status.

    Writes ``pid_file_for(config_path)`` once the data directory is locked and removes it
    on exit. Errors are printed as ``CODE: message`` on stderr (exit 2 for a bad
    configuration, 1 when the data directory is in use or the node cannot start).
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
    pid_file = pid_file_for(config_path)
    try:
        write_pid_file(pid_file)
        trio.run(_serve, config, store)
    except Exception as exc:
        print(f"UCXL-500-INTERNAL: the node stopped: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
        remove_pid_file(pid_file)
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
class ClusterUp:
    """What ``start_cluster`` did: every node (with its pid), and which it started."""

    nodes: list[LocalNode]
    started: list[str]
    created: bool


def cluster_up(root: Path, nodes: int = 3, *, timeout_s: float = 60.0) -> list[LocalNode]:
    """``start_cluster(...).nodes``: every node of the (now healthy) cluster."""
    return start_cluster(root, nodes, timeout_s=timeout_s).nodes


def start_cluster(
    root: Path,
    nodes: int = 3,
    *,
    timeout_s: float = 60.0,
    founding: FoundingKeys | None = None,
) -> ClusterUp:
    """Create (if new) a local cluster of ``nodes`` nodes, start those that are down, and
    wait until every node is healthy.

    On an existing cluster directory ``nodes`` is ignored: the nodes are those of
    ``cluster.json``; a node whose pid file names a live process is left running.
    ``founding`` (``cluster up --restore``) founds a new cluster with a backup's keys
    (``node.daemon.cluster_init``); it needs a directory that holds no cluster yet.

    Raises:
        ClusterError: a node exited during start, or did not become healthy in time; or
            ``founding`` with a directory that already holds a cluster.
    """
    root = root.absolute()  # node.toml paths are read relative to node.toml's directory
    created = not (root / "cluster.json").exists()
    if founding is not None and (not created or (root.exists() and any(root.iterdir()))):
        raise ClusterError(
            f"{root} is not empty: --restore founds a new cluster in a new directory (to "
            "merge a backup into a running cluster: slurp --profile P restore FILE)"
        )
    members = create_cluster_dir(root, nodes, founding=founding) if created else _load(root)
    down = [m for m in members if not _alive(m.pid)]
    started = {m.name: _start(root, m) for m in down}
    members = [started.get(m.name, m) for m in members]
    _save(root, members)
    _wait_healthy(root, members, timeout_s)
    return ClusterUp(members, [m.name for m in down], created)


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
    _CHILDREN[process.pid] = process  # the node writes its own pid file (run_node)
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
    """Every node: pid (from its pid file), up, health, ring ownership, contexts held,
    backlog and anti-entropy.

    The JSON of ``slurp cluster status``: ``{"dir", "profile", "nodes": [{"name",
    "address", "pid", "up", "ownership", "contexts", "backlog": {"hints", "hint_bytes",
    "repair_pending"}, "antientropy": {"last_pass_age_s", "versions_repaired"}, "role",
    "term", "leader", "admin_key_held", "rebalance", "pending_ranges", "bytes_left",
    "index": {"pending", "lag_s"}, "health", ...}]}``. ``rebalance`` is the node's
    range-streaming status (``{epoch, in_transition, contexts_left, bytes_left,
    pending_ranges, streamed_bytes}``); ``pending_ranges`` and ``bytes_left`` repeat two of
    its figures. ``backlog``, ``antientropy``, ``index`` (the index queue), ``role``
    ("leader", "follower", "candidate"), ``term``, ``leader`` (a node name) and
    ``admin_key_held`` are the node's own ``node.status`` fields (null when the node is
    down, and each figure null when the node does not know it); ``state`` is its member
    state ("joining", "normal", "leaving", "removed"; null: down or unknown).
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
                "backlog": status.get("backlog"),
                "antientropy": status.get("antientropy"),
                "index": status.get("index"),
                "role": status.get("role"),
                "term": status.get("term"),
                "leader": status.get("leader"),
                "admin_key_held": status.get("admin_key_held"),
                "state": status.get("member_state"),
                "rebalance": status.get("rebalance"),
                "pending_ranges": (status.get("rebalance") or {}).get("pending_ranges"),
                "bytes_left": (status.get("rebalance") or {}).get("bytes_left"),
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


# -- membership ------------------------------------------------------------------------------

# name -> {"state": member state or None, "rebalance": node.status's rebalance or None}
Progress = Callable[[dict[str, dict[str, Any]]], None]


def _client_for(root: Path, members: list[LocalNode]) -> Any:
    from node.client import Client  # the SDK is a client of the nodes, not a part of them

    ca = root / "ca"
    seeds = [f"127.0.0.1:{m.rpc_port}" for m in members]
    return Client.connect(seeds, cert=ca / "client.crt", key=ca / "client.key", ca=ca / "ca.crt")


def _propose(root: Path, members: list[LocalNode], call: Callable[[Any], Any],
             timeout_s: float) -> Any:  # fmt: skip
    """``call(client)`` through the live nodes, retried while the cluster is unavailable
    (no leader yet). A refusal (400/403/404) is a ``ClusterError`` saying why."""
    live = [m for m in members if _alive(m.pid)]
    if not live:
        raise ClusterError(f"no node of {root} is running: start them with `cluster up`")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with _client_for(root, live) as client:
                return call(client)
        except StorageError as exc:
            if exc.code != "UCXL-503-UNAVAILABLE" or time.monotonic() > deadline:
                raise ClusterError(exc.message) from None
        time.sleep(0.5)


def _states(root: Path, members: list[LocalNode], names: list[str]) -> dict[str, dict[str, Any]]:
    """name -> {state, rebalance} as the live nodes see it (a node's own status first)."""
    seen: dict[str, dict[str, Any]] = {n: {"state": None, "rebalance": None} for n in names}
    own: set[str] = set()
    for member in members:
        if not _alive(member.pid):
            continue
        status = _node_status(root, member)
        states = status.get("member_states") or {}
        for name in names:
            if name == member.name:  # a node's own view wins: it must know its own state
                seen[name]["rebalance"] = status.get("rebalance")
                seen[name]["state"] = status.get("member_state")
                own.add(name)
            elif name not in own and name in states:
                seen[name]["state"] = states[name]
    return seen


def _wait_states(root: Path, members: list[LocalNode], wanted: dict[str, str],
                 progress: Progress | None, timeout_s: float) -> None:  # fmt: skip
    deadline = time.monotonic() + timeout_s
    while True:
        seen = _states(root, members, list(wanted))
        if progress is not None:
            progress(seen)
        pending = [n for n, state in wanted.items() if seen[n]["state"] != state]
        if not pending:
            return
        if time.monotonic() > deadline:
            raise ClusterError(
                f"not {'/'.join(sorted(set(wanted.values())))} after {timeout_s} s: "
                + ", ".join(f"{n} is {seen[n]['state']}" for n in sorted(pending))
            )
        time.sleep(0.5)


def add_nodes(root: Path, count: int = 1, *, progress: Progress | None = None,
              timeout_s: float = 300.0) -> dict[str, Any]:  # fmt: skip
    """Grow the running local cluster by ``count`` nodes; returns once each is "normal".

    Returns:
        {"added": [names], "nodes": [every node of cluster.json, as ``cluster up`` lists]}
    Raises:
        ClusterError: no running node, a refusal, or a node did not become normal in time.
    """
    root = root.absolute()
    members = _load(root)
    if not any(_alive(m.pid) for m in members):
        raise ClusterError(f"no node of {root} is running: start them with `cluster up`")
    joiners: list[Joiner] = create_joiner_dirs(root, members, count)
    started = [_start(root, j.node) for j in joiners]
    everyone = members + started
    _save(root, everyone)
    for joiner in joiners:

        def add(client: Any, j: Joiner = joiner) -> Any:
            n = j.node
            return client.member_add(
                n.name, j.node_id, j.recipient, j.signing_key, "127.0.0.1", n.rpc_port
            )

        _propose(root, members, add, timeout_s=60.0)
    _wait_states(root, everyone, {j.node.name: "normal" for j in joiners}, progress, timeout_s)
    return {"added": [j.node.name for j in joiners], "nodes": [asdict(m) for m in _load(root)]}


def remove_node(root: Path, name: str, *, progress: Progress | None = None,
                timeout_s: float = 300.0) -> dict[str, Any]:  # fmt: skip
    """Decommission ``name``: its ranges stream away, it becomes "removed", then its process
    is stopped and it leaves cluster.json.

    Returns:
        {"removed": name, "stopped": bool (its process was running and is stopped)}
    """
    root = root.absolute()
    members = _load(root)
    if name not in {m.name for m in members}:
        raise ClusterError(f"no node {name!r} in {root}")
    others = [m for m in members if m.name != name]
    _propose(root, members, lambda c: c.member_remove(name), timeout_s=60.0)
    _wait_states(root, others, {name: "removed"}, progress, timeout_s)
    stopped = _stop(next(m for m in members if m.name == name))
    _save(root, others)
    return {"removed": name, "stopped": stopped}


def forget_node(root: Path, name: str) -> dict[str, Any]:
    """Drop the dead node ``name`` from the cluster (refused while it answers); it leaves
    cluster.json. The survivors re-replicate its ranges.

    Returns:
        {"forgotten": name, "state": "removed", "ring_epoch": int}
    """
    root = root.absolute()
    members = _load(root)
    if name not in {m.name for m in members}:
        raise ClusterError(f"no node {name!r} in {root}")
    others = [m for m in members if m.name != name]
    answer = _propose(root, others, lambda c: c.member_forget(name), timeout_s=60.0)
    _save(root, others)
    return {"forgotten": name, "state": answer.get("state"), "ring_epoch": answer.get("ring_epoch")}


def _stop(member: LocalNode, timeout_s: float = 15.0) -> bool:
    if not _alive(member.pid):
        return False
    os.kill(member.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while _alive(member.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(member.pid):
        os.kill(member.pid, signal.SIGKILL)
    _reap(member.pid)
    return True


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
    """Whether ``pid`` is a running slurp node (not another process that reused the pid)."""
    if pid <= 0:
        return False
    child = _CHILDREN.get(pid)
    if child is not None:  # ours: it may not have exec'd yet, so ask Popen, not /proc
        if child.poll() is None:
            return True
        del _CHILDREN[pid]
        return False
    _reap(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return _is_node_process(pid)


def _is_node_process(pid: int) -> bool:
    """Where /proc tells (Linux): the process runs ``... node start ...``; else assume so."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return not Path("/proc/self").exists()  # no /proc here: trust the pid
    return any(args[i : i + 2] == [b"node", b"start"] for i in range(len(args)))


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
    """The nodes of ``cluster.json``, each with the pid its own pid file names (0: none).

    A node this process started and whose pid file is not written yet keeps its pid.
    """
    try:
        data = json.loads((root / "cluster.json").read_text())
        members = [LocalNode(**item) for item in data]
    except (OSError, ValueError, TypeError) as exc:
        raise ClusterError(f"no local cluster in {root} ({exc})") from None
    out = []
    for member in members:
        pid = read_pid_file(root / member.name / "node.pid")
        if not pid and member.pid in _CHILDREN and _alive(member.pid):
            pid = member.pid  # started by this process, not yet past opening its store
        out.append(LocalNode(member.name, member.rpc_port, member.http_port, member.dht_port,
                             pid))  # fmt: skip
    return out


__all__ = [
    "ClusterError",
    "ClusterUp",
    "FoundingKeys",
    "LocalNode",
    "Progress",
    "add_nodes",
    "cluster_down",
    "cluster_status",
    "cluster_up",
    "forget_node",
    "founding_keys",
    "health",
    "load_node_config",
    "pid_file_for",
    "remove_node",
    "run_node",
    "start_cluster",
    "start_node",
]
