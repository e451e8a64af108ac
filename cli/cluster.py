"""``slurp node`` and ``slurp cluster``: run a node; a local cluster on loopback."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import Progress, TaskID
from rich.table import Table

from cli import render
from cli.backend import RemoteOptions, connect
from cli.cluster_restore import restore_files
from cli.common import CliError, JsonOpt, fail, run
from cli.keys import identity_file
from node.daemon.ops import (
    ClusterError,
    FoundingKeys,
    add_nodes,
    cluster_down,
    cluster_status,
    forget_node,
    founding_keys,
    remove_node,
    run_node,
    start_cluster,
)
from storage.errors import InvalidPayload, StorageError, Unavailable

node_app = typer.Typer(help="Run a node daemon.", no_args_is_help=True)
cluster_app = typer.Typer(help="A local cluster on loopback, for trying slurp out.",
                          no_args_is_help=True)  # fmt: skip
RESTORE_WAIT_S = 120.0  # how long --restore waits for a leader that holds the admin key
DirOpt = Annotated[Path, typer.Option("--dir", help="The cluster directory.")]


@node_app.command("start")
def start(
    config: Annotated[Path, typer.Option("--config", help="The node's TOML configuration.")],
) -> None:
    """Serve a node in the foreground until SIGINT or SIGTERM."""
    raise typer.Exit(run_node(config, os.environ))


def _cluster_error(exc: ClusterError) -> CliError:
    return CliError("UCXL-503-UNAVAILABLE", str(exc), field="cluster")


@cluster_app.command("up")
def up(
    nodes: Annotated[int, typer.Option(help="How many nodes.")] = 3,
    directory: Annotated[Path, typer.Option("--dir", help="The cluster directory.")] = Path(
        ".slurp-cluster"
    ),
    restore: Annotated[
        Path | None,
        typer.Option(
            "--restore",
            help="Found a new cluster from this full backup, made "
            "--with-keys (its keys, then its data).",
        ),
    ] = None,
    identity: Annotated[
        list[Path] | None,
        typer.Option(
            "--identity",
            help="With --restore: an age identity file that opens "
            "the backup; the old admin identity (repeatable).",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Create and start a local cluster, or start the nodes of an existing one that are down;
    returns once every node is healthy. With --restore FILE: a new cluster founded with the
    backup's keys, holding its data."""
    if identity and restore is None:
        fail(InvalidPayload("--identity is used with --restore only", field="identity"), as_json)
    founding = None
    if restore is not None:
        keys = [identity_file(path, as_json) for path in identity or []]
        founding = run(as_json, lambda: founding_keys(restore, keys))
    try:
        result = start_cluster(directory, nodes, founding=founding)
    except ClusterError as exc:
        fail(_cluster_error(exc), as_json)
    restored = None
    if restore is not None and founding is not None:
        restored = _restore_into(directory, restore, founding, as_json)
    if as_json:
        render.print_json({"dir": str(directory), "profile": str(directory / "client.toml"),
                           "created": result.created, "started": result.started,
                           "nodes": [m.__dict__ for m in result.nodes],
                           **({} if restored is None else {"restore": restored})})  # fmt: skip
        return
    for member in result.nodes:
        render.out.print(
            f"{member.name}: rpc 127.0.0.1:{member.rpc_port}, http {member.http_port}, "
            f"pid {member.pid}",
            markup=False,
        )
    render.out.print(render.started_line(result.started, len(result.nodes), result.created),
                     markup=False)  # fmt: skip
    render.out.print(f"client profile: {directory / 'client.toml'} (slurp --profile ...)")
    if restored is not None:
        render.out.print(
            f"restored {restore}: {restored['versions_sent']} versions sent, "
            f"{restored['purges_applied']} purge markers applied (cut {restored['cut']}); "
            f"{len(restored['trusted_signers'])} trusted signer(s), admin identity from "
            f"{restored['admin_identity']}",
            markup=False,
        )


def _restore_into(
    directory: Path, path: Path, founding: FoundingKeys, as_json: bool
) -> dict[str, Any]:
    """Merge the backup into the new cluster through its leader (``restore.upload`` /
    ``restore.apply``, as ``slurp --profile P restore``), retrying while no leader holds
    the admin identity yet; answer the restore summary."""
    profile = directory / "client.toml"
    deadline = time.monotonic() + RESTORE_WAIT_S
    while True:
        try:
            with contextlib.closing(connect(RemoteOptions(profile=profile))) as remote:
                summary = restore_files(remote.client, [path], as_json)
            break
        except Unavailable as exc:  # an election, or the leader still rebuilds the admin key
            if time.monotonic() > deadline:
                fail(_restore_failed(exc, profile, path), as_json)
            time.sleep(1.0)
        except StorageError as exc:
            fail(_restore_failed(exc, profile, path), as_json)
    manifest = founding.backup.manifest
    return {
        **summary,
        "backup_cluster_id": manifest.cluster_id,
        "admin_identity": founding.admin_from,
        "trusted_signers": [key.hex() for key in founding.trusted_signers],
    }


def _restore_failed(exc: StorageError, profile: Path, path: Path) -> StorageError:
    """``exc`` with what is left: the cluster runs; the merge is idempotent, run it again."""
    return CliError(
        exc.code,
        f"{exc.message} (the new cluster is up with the backup's keys but its data is not all "
        f"in: run `slurp --profile {profile} restore {path}` to finish)",
        exc.field,
    )


@cluster_app.command("status")
def status(
    directory: Annotated[Path, typer.Option("--dir", help="The cluster directory.")] = Path(
        ".slurp-cluster"
    ),
    as_json: JsonOpt = False,
) -> None:
    """Members, up/down, health of each node."""
    try:
        data = cluster_status(directory)
    except ClusterError as exc:
        fail(_cluster_error(exc), as_json)
    if as_json:
        render.print_json(data)
        return
    table = Table("name", "address", "pid", "up", "state", "role", "term", "leader", "members up",
                  "ring share", "contexts",
                  "hints", "hint bytes", "repairs", "last AE pass", "AE repaired")  # fmt: skip
    for node in data["nodes"]:
        checks = (node["health"] or {}).get("checks", {})
        share = node["ownership"]
        backlog = node["backlog"] or {}
        antientropy = node["antientropy"] or {}
        table.add_row(
            node["name"], node["address"], str(node["pid"]), "up" if node["up"] else "down",
            node.get("state") or "-",
            (node["role"] or "-") + (" (admin key)" if node["admin_key_held"] else ""),
            render.figure(node["term"]), node["leader"] or "-",
            str(checks.get("members_up", "-")), "-" if share is None else f"{share:.1%}",
            render.figure(node["contexts"]),
            render.figure(backlog.get("hints")), render.figure(backlog.get("hint_bytes")),
            render.figure(backlog.get("repair_pending")),
            render.age(antientropy.get("last_pass_age_s")),
            render.figure(antientropy.get("versions_repaired")),
        )  # fmt: skip
    render.out.print(table)


@cluster_app.command("down")
def down(
    directory: Annotated[Path, typer.Option("--dir", help="The cluster directory.")] = Path(
        ".slurp-cluster"
    ),
    as_json: JsonOpt = False,
) -> None:
    """Stop every node of the local cluster."""
    try:
        stopped = cluster_down(directory)
    except ClusterError as exc:
        fail(_cluster_error(exc), as_json)
    if as_json:
        render.print_json({"stopped": stopped})
    else:
        render.out.print(f"stopped: {', '.join(stopped) or 'nothing was running'}")


class _Bars:
    """One rich progress line per node: its member state and what is left to stream (the
    node's ``rebalance`` figures from ``node.status``; unknown when it has none). The bar
    counts ring ranges still to stream against the most this node had pending."""

    def __init__(self, bar: Progress) -> None:
        self.bar = bar
        self.tasks: dict[str, TaskID] = {}
        self.peak: dict[str, int] = {}

    def __call__(self, seen: dict[str, dict[str, Any]]) -> None:
        for name, info in seen.items():
            rebalance = info.get("rebalance") or {}
            left = [f"{render.figure(rebalance.get(key))} {label}"
                    for key, label in (("pending_ranges", "ranges"),
                                       ("contexts_left", "contexts"), ("bytes_left", "bytes"))
                    if rebalance.get(key) is not None]  # fmt: skip
            text = f"{name}: {info.get('state') or 'unknown'}" + (
                f", left: {', '.join(left)}" if left else ""
            )
            pending = rebalance.get("pending_ranges")
            if name not in self.tasks:
                self.tasks[name] = self.bar.add_task(text, total=None)
            if isinstance(pending, int):
                peak = self.peak[name] = max(self.peak.get(name, 0), pending)
                self.bar.update(self.tasks[name], description=text, completed=peak - pending,
                                total=peak or None)  # fmt: skip
            else:
                self.bar.update(self.tasks[name], description=text)


def _with_bars(change: Callable[[_Bars | None], dict[str, Any]], as_json: bool) -> dict[str, Any]:
    """Run a membership change with a progress line per node on stderr (none with --json);
    a ClusterError ends the command with its message."""
    try:
        if as_json:
            return change(None)
        with Progress(console=render.err) as bar:
            return change(_Bars(bar))
    except ClusterError as exc:
        fail(_cluster_error(exc), as_json)


@cluster_app.command("add")
def add(
    directory: DirOpt = Path(".slurp-cluster"),
    count: Annotated[int, typer.Option("--count", help="How many nodes to add.")] = 1,
    as_json: JsonOpt = False,
) -> None:
    """Add nodes to the running local cluster: certificates, data directories and configs,
    start them, propose their join, and wait until each is normal."""
    result = _with_bars(lambda bars: add_nodes(directory, count, progress=bars), as_json)
    if as_json:
        render.print_json(result)
        return
    render.out.print(f"added: {', '.join(result['added'])}", markup=False)


@cluster_app.command("remove")
def remove(
    name: Annotated[str, typer.Argument(help="The node to decommission.")],
    directory: DirOpt = Path(".slurp-cluster"),
    as_json: JsonOpt = False,
) -> None:
    """Decommission a live node: its ranges stream to their new owners, then it is removed
    and its process stopped."""
    result = _with_bars(lambda bars: remove_node(directory, name, progress=bars), as_json)
    if as_json:
        render.print_json(result)
        return
    stopped = " (process stopped)" if result["stopped"] else ""
    render.out.print(f"removed: {name}{stopped}", markup=False)


@cluster_app.command("forget")
def forget(
    name: Annotated[str, typer.Argument(help="The dead node to drop.")],
    directory: DirOpt = Path(".slurp-cluster"),
    as_json: JsonOpt = False,
) -> None:
    """Drop a dead node at once (refused while it answers: use remove); the survivors
    re-replicate its ranges."""
    try:
        result = forget_node(directory, name)
    except ClusterError as exc:
        fail(_cluster_error(exc), as_json)
    if as_json:
        render.print_json(result)
        return
    render.out.print(f"forgotten: {name} (ring epoch {result['ring_epoch']})", markup=False)
