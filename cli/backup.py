"""``slurp backup create|verify|list``, ``slurp restore``, ``slurp export``, ``slurp import``.

Embedded (a node's data directory), except two commands with ``--node``/``--profile``:
``restore`` (``cli.cluster_restore``: a merge into a running cluster through its leader)
and ``backup create``, which asks the cluster's leader for a cluster backup and downloads
it (``backup.create`` / ``backup.read``, node.control.cluster_backup).
Argument parsing, progress bars (stderr) and rendering; ``storage.backup_io`` and
``storage.export`` do the work. Formats: docs/backup.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from pyrage import x25519
from rich.progress import Progress

from cli import render
from cli.backend import connect
from cli.cluster_restore import restore_cluster
from cli.common import STATE, JsonOpt, fail, opened, passphrase_source, run
from cli.keys import identity_file
from storage import backup_io, export, restore
from storage.backup import Backup
from storage.context_store import ContextStore
from storage.errors import InvalidPayload

app = typer.Typer(help="Encrypted, verified backups of this node.", no_args_is_help=True)

IdentityOpt = Annotated[
    list[Path] | None,
    typer.Option(
        "--identity",
        help="An age identity file that opens the backup (repeatable; default: this "
        "node's admin identity).",
    ),
]
Step = Callable[[int, int], None]


@contextmanager
def _progress(as_json: bool, label: str) -> Iterator[Step | None]:
    """A progress bar on stderr (none with --json)."""
    if as_json:
        yield None
        return
    with Progress(console=render.err, transient=True) as bar:
        task = bar.add_task(label, total=None)

        def step(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield step


def cluster_id_of(store: ContextStore) -> str:
    """The id a backup of this node carries: its node id (embedded part of issue 11).

    A cluster member's backups will carry the cluster id of its control plane; reading it
    is the cluster part's (the CLI may not reach into ``node.control``).
    """
    return store.keyring.node_id


def _identities(paths: list[Path] | None, as_json: bool) -> list[x25519.Identity]:
    return [identity_file(path, as_json) for path in paths or []]


def _opener(store: ContextStore | None, ids: list[x25519.Identity]) -> backup_io.Opener:
    return backup_io.Opener(
        identities=ids,
        keyring=None if store is None else store.keyring,
        passphrase=passphrase_source(),
    )


@app.command("create")
def create(
    out: Annotated[
        Path | None, typer.Option("--out", help="Backup file [default: DATA_DIR/backups/].")
    ] = None,
    since: Annotated[
        Path | None, typer.Option("--since", help="Incremental: what is newer than FILE's cut.")
    ] = None,
    recipient: Annotated[
        list[str] | None,
        typer.Option("--recipient", help="Also encrypt to this age1... recipient (repeatable)."),
    ] = None,
    with_keys: Annotated[
        bool, typer.Option("--with-keys", help="Include the role identities (secret).")
    ] = False,
    identity: IdentityOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Back up this node: an age file to admin (+ recipients) holding a verified tar.

    With --profile/--node: the cluster's leader takes the backup (a quorum read of every
    range at an HLC cut) into its backup directory, and it is downloaded to --out.
    """
    if STATE.remote.given:
        _create_cluster(out, recipient or [], with_keys, as_json, since)
        return
    ids = _identities(identity, as_json)
    with opened(as_json, "backup create") as store, _progress(as_json, "backing up") as step:
        target = out or backup_io.default_path(store)
        made = run(
            as_json,
            lambda: backup_io.create(
                store,
                target,
                cluster_id=cluster_id_of(store),
                recipients=recipient or [],
                since=since,
                with_keys=with_keys,
                opener=_opener(store, ids),
                progress=step,
            ),
        )
    if as_json:
        render.print_json(made.to_json())
        return
    counts = made.manifest.counts
    render.out.print(
        f"wrote {made.file} ({made.manifest.kind}, cut {made.manifest.cut}, "
        f"{counts['versions']} versions, {made.bytes} bytes)",
        markup=False,
    )


def _create_cluster(
    out: Path | None,
    recipients: list[str],
    with_keys: bool,
    as_json: bool,
    since_file: Path | None,
) -> None:
    """``backup create`` against a cluster: the leader takes it, we download it; with
    ``since_file`` an incremental after its cut (cut and cluster id from its sidecar)."""
    STATE.refused = None  # the one backup command that goes to a cluster
    since, since_cluster = None, None
    if since_file is not None:
        since, since_cluster = run(as_json, lambda: backup_io.sidecar_cut(since_file))
        if since is None:
            fail(InvalidPayload(f"{since_file} has no cut (it holds nothing): take a full "
                                "backup (leave --since out)", field="since"), as_json)  # fmt: skip
    remote = run(as_json, lambda: connect(STATE.remote))
    try:
        client = remote.client
        with Progress(console=render.err, disable=as_json) as bar:
            task = bar.add_task("the leader is backing up the cluster", total=None)
            made = run(
                as_json,
                lambda: client.backup_create(
                    recipients, with_keys=with_keys, since=since, since_cluster=since_cluster
                ),
            )
            target = out or Path(str(made["name"]))
            bar.update(task, description=f"downloading {made['name']}", total=made["bytes"])
            run(
                as_json,
                lambda: backup_io.download(
                    lambda name, offset: client.backup_read(name, offset, str(made["leader"])),
                    str(made["name"]), target, str(made["sha256"]),
                    progress=lambda done: bar.update(task, completed=done),
                ),
            )  # fmt: skip
    finally:
        remote.close()
    backup_io.write_sidecar(target, {**made["manifest"], "file_sha256": made["sha256"]})
    if as_json:
        render.print_json({"file": str(target), "leader_file": made["name"],
                           "leader": made["leader"], "bytes": made["bytes"],
                           "sha256": made["sha256"], **made["manifest"]})  # fmt: skip
        return
    counts = made["manifest"]["counts"]
    render.out.print(
        f"wrote {target} ({made['manifest']['kind']} cluster backup by {made['leader']}, "
        f"cut {made['manifest']['cut']}, "
        f"{counts['versions']} versions, {made['bytes']} bytes)",
        markup=False,
    )


@app.command("verify")
def verify(file: Path, identity: IdentityOpt = None, as_json: JsonOpt = False) -> None:
    """Check every member's hash, every signature and, with keys, every decrypt."""
    ids = _identities(identity, as_json)
    with _maybe_opened(as_json) as store, _progress(as_json, "verifying") as step:
        found: Backup = run(
            as_json, lambda: backup_io.verify(file, _opener(store, ids), progress=step)
        )
    summary = {"file": str(file), "ok": True, **backup_io.summary_json(found.manifest)}
    if as_json:
        render.print_json(summary)
    else:
        render.out.print(
            f"{file}: intact ({found.manifest.kind}, cut {found.manifest.cut}, "
            f"{found.manifest.counts['versions']} versions)",
            markup=False,
        )


@contextmanager
def _maybe_opened(as_json: bool) -> Iterator[ContextStore | None]:
    """The data directory's store when it holds a node, else None."""
    if not restore.holds_node(STATE.data_dir):
        yield None
        return
    with opened(as_json) as store:
        yield store


@app.command("list")
def list_backups(as_json: JsonOpt = False) -> None:
    """The backups in DATA_DIR/backups with their kinds and cuts (from their sidecars)."""
    found = run(as_json, lambda: backup_io.list_backups(STATE.data_dir / "backups"))
    if as_json:
        render.print_json(found)
        return
    for entry in found:
        kind = entry.get("kind", "?")
        render.out.print(
            f"{entry['file']}  {kind}  cut={entry.get('cut')}  {entry.get('error', '')}",
            markup=False,
        )


def restore_cmd(
    files: Annotated[list[Path], typer.Argument(help="A full backup, then its incrementals.")],
    data_dir: Annotated[
        Path | None, typer.Option("--data-dir", help="The node to restore into.")
    ] = None,
    identity: IdentityOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Restore backups into a node (merge) or into a fresh directory (new node); with
    --node/--profile, merge them into the running cluster through its leader.

    Every file is verified in full before the first write; restoring twice changes
    nothing; a purge marker in the target or the backup wins.
    """
    if STATE.remote.given:  # --node/--profile: a merge into the running cluster
        if data_dir is not None or identity:
            fail(
                InvalidPayload(
                    "a cluster restore (--node/--profile) takes neither --data-dir nor "
                    "--identity: the leader opens the backup with the admin identity it holds",
                    field="data_dir" if data_dir is not None else "identity",
                ),
                as_json,
            )
        restore_cluster(files, as_json)
        return
    root = data_dir or STATE.data_dir
    STATE.data_dir = root
    ids = _identities(identity, as_json)
    result = restore.Restored(root, [str(f) for f in files], created_node=False)
    source = passphrase_source()
    if restore.holds_node(root):
        with opened(as_json, "restore") as store, _progress(as_json, "restoring") as step:
            chain = run(
                as_json,
                lambda: restore.load_chain(
                    files,
                    _opener(store, ids),
                    target_cluster=cluster_id_of(store),
                    trusted=store.reader.trusted,
                ),
            )
            run(as_json, lambda: restore.apply(store, chain, step, result))
    else:
        if not ids:
            fail(
                InvalidPayload(
                    "restoring into a fresh directory needs --identity FILE "
                    "(the admin identity, or one the backup was encrypted to)",
                    field="identity",
                ),
                as_json,
            )
        chain = run(
            as_json,
            lambda: restore.load_chain(
                files, _opener(None, ids), target_cluster=None, trusted=None
            ),
        )
        with _progress(as_json, "restoring") as step:
            run(as_json, lambda: restore.restore_fresh(root, chain, source, step, result))
    if as_json:
        render.print_json(result.to_json())
    else:
        render.out.print(
            f"restored into {root}: {result.added} versions added, {result.skipped} already "
            f"there, {result.purges_applied} purge markers applied (cut {result.cut})",
            markup=False,
        )


def export_cmd(
    pattern: str,
    out: Annotated[Path, typer.Option("--out", help="The export file (age).")],
    recipient: Annotated[
        list[str], typer.Option("--recipient", help="Encrypt to this age1... (repeatable).")
    ],
    history: Annotated[bool, typer.Option("--history", help="Every version, not the latest.")] = (
        False
    ),
    as_role: Annotated[str | None, typer.Option("--as", help="Export what ROLE may read.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Export the records matching PATTERN as age-encrypted JSON lines."""
    with opened(as_json, "export") as store, _progress(as_json, "exporting") as step:
        records, skipped = run(
            as_json,
            lambda: export.export_records(
                store, pattern, history=history, as_role=as_role, progress=step
            ),
        )
    sealed = run(as_json, lambda: export.seal(records, recipient))
    if out.exists():
        fail(InvalidPayload(f"{out} exists", field="out"), as_json)
    out.write_bytes(sealed)
    summary: dict[str, Any] = {"file": str(out), "records": len(records), "skipped": skipped}
    if as_json:
        render.print_json(summary)
    else:
        render.out.print(
            f"exported {len(records)} records to {out} ({skipped} skipped)", markup=False
        )


def import_cmd(
    file: Path,
    as_role: Annotated[
        str | None, typer.Option("--as", help="Write as ROLE (default: each address's role).")
    ] = None,
    identity: Annotated[
        list[Path] | None,
        typer.Option("--identity", help="An age identity that opens FILE (repeatable)."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Import an export file: each record becomes a new version signed by this node."""
    ids = _identities(identity, as_json)
    data = run(as_json, lambda: export.read_file(file))
    with opened(as_json, "import") as store, _progress(as_json, "importing") as step:
        records = run(as_json, lambda: export.open_export(data, ids, store.keyring))
        refs = run(
            as_json, lambda: export.import_records(store, records, as_role=as_role, progress=step)
        )
    if as_json:
        render.print_json({"imported": len(refs), "refs": [ref.to_json() for ref in refs]})
    else:
        render.out.print(f"imported {len(refs)} records", markup=False)
