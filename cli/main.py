"""The ``slurp`` command: embedded (it opens the node's data directory directly) or remote.

Owns argument parsing, exit codes and choosing between text and ``--json`` output.
With ``--node HOST:PORT`` or ``--profile FILE`` the data commands (put, get, history, ls,
search, delete, purge; stats becomes the node's status) go to a running node through the
client SDK, with the same output and exit codes; the other commands are embedded-only.
Errors go to stderr as ``CODE: message``; exit 2 for bad input (4xx codes), 1 otherwise;
with ``--json`` the error is also printed on stdout as ``{"error": {code, message, field}}``.
"""

from __future__ import annotations

import json
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import Progress

from cli import audit, backup, ca, cluster, keys, render
from cli.backend import RemoteOptions
from cli.common import STATE, JsonOpt, backend, fail, opened, run
from crypto.errors import KeyringError
from crypto.roles import DEFAULT_ROLES, Role, parse_role_spec
from storage.address import parse
from storage.admin_key import admin_in_memory, gather_shares
from storage.context_store import ContextStore
from storage.datadir import default_data_dir
from storage.errors import InvalidPayload
from storage.record import ContextRecord

app = typer.Typer(
    name="slurp",
    help="slurp: a storage node for AI-agent context, addressed by UCXL.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
address_app = typer.Typer(help="Work with UCXL addresses.", no_args_is_help=True)
index_app = typer.Typer(help="The full-text index.", no_args_is_help=True)
app.add_typer(address_app, name="address")
app.add_typer(index_app, name="index")

app.add_typer(ca.app, name="ca")
app.add_typer(audit.app, name="audit")
app.add_typer(keys.app, name="keys")
app.add_typer(cluster.node_app, name="node")
app.add_typer(cluster.cluster_app, name="cluster")
app.add_typer(backup.app, name="backup")
app.command("restore")(backup.restore_cmd)
app.command("export")(backup.export_cmd)
app.command("import")(backup.import_cmd)


# commands that need the data directory itself (or, for ca, a CA directory)
EMBEDDED_ONLY = frozenset(
    {"init", "ca", "keys", "audit", "index", "compact", "backup", "restore", "export", "import"}
)


@app.callback()
def _global(
    ctx: typer.Context,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir",
            help="Node data directory [default: $SLURP_HOME or ~/.local/share/slurp].",
        ),
    ] = None,
    node: Annotated[
        str | None,
        typer.Option("--node", help="Send data commands to the running node at HOST:PORT."),
    ] = None,
    profile: Annotated[
        Path | None,
        typer.Option("--profile", help="Send data commands to the cluster of a client profile."),
    ] = None,
    ca: Annotated[Path | None, typer.Option("--ca", help="Cluster CA certificate.")] = None,
    cert: Annotated[Path | None, typer.Option("--cert", help="Client certificate.")] = None,
    key: Annotated[Path | None, typer.Option("--key", help="Client private key.")] = None,
) -> None:
    STATE.data_dir = data_dir if data_dir is not None else default_data_dir()
    STATE.remote = RemoteOptions(node=node, profile=profile, ca=ca, cert=cert, key=key)
    command = ctx.invoked_subcommand
    STATE.refused = command if STATE.remote.given and command in EMBEDDED_ONLY else None


def _roles(spec: str | None) -> tuple[Role, ...]:
    try:
        return parse_role_spec(spec) if spec else DEFAULT_ROLES
    except KeyringError as exc:
        raise InvalidPayload(str(exc), field="roles") from None


@app.command()
def init(
    roles: Annotated[
        str | None,
        typer.Option(help="Comma-separated roles, each name[:authority]; admin is always added."),
    ] = None,
    index_backend: Annotated[str, typer.Option(help="tantivy or whoosh.")] = "tantivy",
    as_json: JsonOpt = False,
) -> None:
    """Create a node: data directory, keyring (one age identity per role), database."""
    role_list = run(as_json, lambda: _roles(roles))
    if index_backend not in ("tantivy", "whoosh"):
        fail(
            InvalidPayload("--index-backend must be tantivy or whoosh", field="index_backend"),
            as_json,
        )
    run(as_json, lambda: ContextStore.init(STATE.data_dir, role_list, backend=index_backend))
    if as_json:
        render.print_json({"data_dir": str(STATE.data_dir), "roles": [r.name for r in role_list]})
    else:
        render.out.print(
            f"initialised {STATE.data_dir} with roles: {', '.join(r.name for r in role_list)}"
        )


def _record_fields(
    file: str | None, summary: str | None, content: str | None, tags: list[str], techs: list[str]
) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    if file is not None:
        text = sys.stdin.read() if file == "-" else Path(file).read_text(encoding="utf-8")
        try:
            loaded = json.loads(text)
        except ValueError as exc:
            raise InvalidPayload(f"--file is not valid JSON: {exc}", field="file") from None
        if not isinstance(loaded, dict):
            raise InvalidPayload("--file must hold a JSON object of record fields", field="file")
        fields.update(loaded)
    if summary is not None:
        fields["summary"] = summary
    if content is not None:
        fields["content"] = content
    if tags:
        fields["tags"] = [*fields.get("tags", []), *tags]
    if techs:
        fields["technologies"] = [*fields.get("technologies", []), *techs]
    return fields


@app.command()
def put(
    address: str,
    file: Annotated[
        str | None, typer.Option("--file", "-f", help="JSON object of record fields; - for stdin.")
    ] = None,
    summary: Annotated[str | None, typer.Option(help="The record's summary.")] = None,
    content: Annotated[str | None, typer.Option(help="The record's content text.")] = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", help="A tag (repeatable).")] = None,
    tech: Annotated[
        list[str] | None, typer.Option("--tech", help="A technology (repeatable).")
    ] = None,
    role: Annotated[
        list[str] | None, typer.Option("--role", help="A reader role (repeatable).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Store a new version of the context ADDRESS (temporal segment *^)."""
    fields = run(as_json, lambda: _record_fields(file, summary, content, tag or [], tech or []))
    run(as_json, lambda: ContextRecord.from_fields(fields))  # before opening anything
    with backend(as_json) as data:
        ref = run(as_json, lambda: data.put(address, fields, role or None))
    if as_json:
        render.print_json(ref.to_json())
    else:
        render.out.print(f"stored {ref.address} ({ref.version_id})", markup=False)


@app.command()
def get(
    address: str,
    as_role: Annotated[str | None, typer.Option("--as", help="Read as this role.")] = None,
    encrypted: Annotated[
        bool, typer.Option(help="Write the version as a standalone age file.")
    ] = False,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="File for --encrypted.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Show the version ADDRESS selects (temporal segments and wildcards work)."""
    if encrypted:
        with opened(as_json, "get --encrypted") as store:
            ref, ciphertext = run(as_json, lambda: store.retrieve_encrypted(address))
        if output is None:
            sys.stdout.buffer.write(ciphertext)
        else:
            output.write_bytes(ciphertext)
            if as_json:
                render.print_json({**ref.to_json(), "file": str(output), "bytes": len(ciphertext)})
        return
    with backend(as_json) as data:
        view = run(as_json, lambda: data.get(address, as_role))
    if as_json:
        render.print_json(view.to_json())
    else:
        render.version(view)


@app.command()
def history(address: str, as_json: JsonOpt = False) -> None:
    """List every version of a context, oldest first, with siblings marked."""
    with backend(as_json) as data:
        entries = run(as_json, lambda: data.history(address))
    if as_json:
        render.print_json([entry.to_json() for entry in entries])
    else:
        render.history(entries)


@app.command("ls")
def list_contexts(
    pattern: str,
    deleted: Annotated[bool, typer.Option("--deleted", help="Include deleted contexts.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """List contexts matching PATTERN (any-wildcards; its path matches as a prefix)."""
    with backend(as_json) as data:
        items = run(as_json, lambda: data.ls(pattern, deleted))
    if as_json:
        render.print_json([item.to_json() for item in items])
    else:
        render.contexts(items)


@app.command()
def search(
    query: str,
    project: Annotated[str | None, typer.Option(help="Only this project.")] = None,
    task: Annotated[str | None, typer.Option(help="Only this task.")] = None,
    tag: Annotated[
        list[str] | None, typer.Option("--tag", help="Required tag (repeatable).")
    ] = None,
    limit: Annotated[int, typer.Option(help="At most this many hits.")] = 20,
    as_role: Annotated[
        str | None, typer.Option("--as", help="Only records this role may read.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Full-text search over the latest version of every context."""
    with backend(as_json) as data:
        results = run(as_json, lambda: data.search(query, project, task, tag or [], limit, as_role))
    if as_json:
        render.print_json([hit.to_json() for hit in results])
    else:
        render.hits(results)


@app.command()
def delete(address: str, as_json: JsonOpt = False) -> None:
    """Delete a context (a tombstone version; its history stays)."""
    with backend(as_json) as data:
        ref = run(as_json, lambda: data.delete(address))
    if as_json:
        render.print_json(ref.to_json())
    else:
        render.out.print(f"deleted {ref.address}", markup=False)


@app.command()
def purge(
    address: str,
    yes: Annotated[
        bool, typer.Option("--yes", help="Confirm: every version is destroyed.")
    ] = False,
    share_file: keys.ShareFiles = None,
    identity: keys.Identities = None,
    shares_stdin: Annotated[
        bool, typer.Option("--shares-stdin", help="Read admin share mnemonics from stdin.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Destroy every version of a context for good (admin only).

    After `keys split --forget-admin`, give enough shares (this node's own share is added)
    to rebuild the admin identity in memory for this one operation.
    """
    if not yes:
        fail(
            InvalidPayload("purge destroys every version: pass --yes to confirm", field="yes"),
            as_json,
        )
    mnemonics = sys.stdin.read().splitlines() if shares_stdin else []
    if share_file or mnemonics:
        with opened(as_json, "purge --share-file/--shares-stdin") as store:
            ids = [keys.identity_file(path, as_json) for path in identity or []]
            found = run(as_json, lambda: gather_shares(store, mnemonics, share_file or [], ids))
            with ExitStack() as held:  # entering rebuilds the admin identity: may fail
                run(as_json, lambda: held.enter_context(admin_in_memory(store, found)))
                removed = run(as_json, lambda: store.purge(address))
    else:
        with backend(as_json) as data:
            removed = run(as_json, lambda: data.purge(address))
    if as_json:
        render.print_json({"purged": parse(address).context().canonical(), "versions": removed})
    else:
        render.out.print(f"purged {removed} versions", markup=False)


@app.command()
def stats(as_json: JsonOpt = False) -> None:
    """Counters: contexts, versions, cache, index, group commit, roles (remote: status)."""
    with backend(as_json) as data:
        counters = run(as_json, data.stats)  # embedded: config.toml [keys] is read here
    if as_json:
        render.print_json(counters)
    else:
        render.mapping(counters)


@app.command()
def status(as_json: JsonOpt = False) -> None:
    """The node's status: members, ring, quorum, contexts, backlog, anti-entropy (remote)."""
    if not STATE.remote.given:
        needs = InvalidPayload("status asks a running node: give --node or --profile", field="node")
        fail(needs, as_json)
    with backend(as_json) as data:
        found = run(as_json, data.stats)
    if as_json:
        render.print_json(found)
    else:
        render.node_status(found)


@app.command()
def compact(as_json: JsonOpt = False) -> None:
    """Sweep expired versions and compact LevelDB."""
    with opened(as_json) as store:
        run(as_json, store.compact)
    if as_json:
        render.print_json({"compacted": True})


@address_app.command("parse")
def address_parse(address: str, as_json: JsonOpt = False) -> None:
    """Parse, validate and normalise ADDRESS."""
    parsed = run(as_json, lambda: parse(address))
    if as_json:
        render.print_json(parsed.to_json())
    else:
        render.mapping(parsed.to_json())


@index_app.command("rebuild")
def index_rebuild(as_json: JsonOpt = False) -> None:
    """Rebuild the full-text index from LevelDB."""
    with opened(as_json) as store:
        if as_json:
            count = run(as_json, store.rebuild_index)
            render.print_json({"indexed": count})
            return
        with Progress(console=render.err, transient=False) as progress:
            task = progress.add_task("rebuilding index", total=None)

            def step(done: int, total: int) -> None:
                progress.update(task, completed=done, total=total)

            count = run(as_json, lambda: store.rebuild_index(step))
    render.out.print(f"indexed {count} contexts", markup=False)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
