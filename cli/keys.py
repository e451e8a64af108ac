"""``slurp keys``: split, combine, list, rotate and protect the keyring."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from pyrage import x25519
from rich.progress import Progress
from rich.table import Table

from cli import render
from cli.backend import connect
from cli.common import PASSPHRASE_ENV, STATE, JsonOpt, opened, run
from crypto.keyfiles import identity_file_text, write_secret_file
from crypto.keyring import read_identity_file
from storage.admin_key import combine_admin, gather_shares, split_admin
from storage.errors import InvalidPayload
from storage.rotation import rotate_role

app = typer.Typer(help="Role keys: Shamir split of admin, rotation, listing.", no_args_is_help=True)
ShareFiles = Annotated[
    list[Path] | None,
    typer.Option("--share-file", help="An age-encrypted share file (repeatable)."),
]
Identities = Annotated[
    list[Path] | None,
    typer.Option("--identity", help="An age identity file that opens share files (repeatable)."),
]


def read_mnemonics(share_files: list[Path] | None) -> list[str]:
    """Mnemonics from stdin, one per line, when no share file is given and stdin is piped."""
    if share_files or sys.stdin.isatty():
        return []
    return [line for line in sys.stdin.read().splitlines() if line.strip()]


@app.command("split")
def split(
    threshold: Annotated[int, typer.Option(help="Shares needed to rebuild.")] = 3,
    shares: Annotated[int, typer.Option(help="Shares made.")] = 5,
    to: Annotated[
        list[str] | None,
        typer.Option("--to", help="Write share i age-encrypted to this recipient (one per share)."),
    ] = None,
    out_dir: Annotated[Path | None, typer.Option(help="Where share files go.")] = None,
    forget_admin: Annotated[
        bool, typer.Option("--forget-admin", help="Delete keys/admin.key; keep share 1 here.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Split the admin identity into SLIP-39 recovery shares (any THRESHOLD rebuild it)."""
    with opened(as_json) as store:
        outcome = run(
            as_json,
            lambda: split_admin(
                store, threshold=threshold, shares=shares, to=to or (), out_dir=out_dir,
                forget=forget_admin,
            ),
        )  # fmt: skip
    if as_json:
        render.print_json(outcome.to_json())
        return
    render.out.print(f"admin recipient: {outcome.admin_recipient}", markup=False)
    render.out.print(f"any {outcome.threshold} of these {len(outcome.shares)} shares rebuild it:")
    for number, share in enumerate(outcome.shares, 1):
        render.out.print(f"\nshare {number}:\n{share}", markup=False)
    for path in outcome.files:
        render.out.print(f"wrote {path}", markup=False)
    if outcome.forgot_admin:
        render.out.print("keys/admin.key deleted; this node keeps share 1 (keys/admin.share.age)")


@app.command("combine")
def combine(
    share_file: ShareFiles = None,
    identity: Identities = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Also write the rebuilt identity to this new file (0600; never overwrites). "
            "For disaster recovery: cluster up --restore FILE --identity OUT.",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Rebuild the admin identity from shares (stdin mnemonics or share files) and check it.

    This node's own share (keys/admin.share.age), if any, is always included. The rebuilt
    identity is verified against the admin recipient on record, then wiped from memory;
    with ``--out`` it is first written to a new 0600 file (recorded in the audit log).
    """
    mnemonics = read_mnemonics(share_file)
    with opened(as_json) as store:
        keys = [identity_file(path, as_json) for path in identity or []]
        found = run(as_json, lambda: gather_shares(store, mnemonics, share_file or [], keys))
        with run(as_json, lambda: combine_admin(store, found)) as rebuilt:
            recipient = rebuilt.recipient()
            if out is not None:
                text = identity_file_text(
                    rebuilt.identity(), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                )
                run(as_json, lambda: _write_new_secret(out, text))
                store.audit_event("keys.combine.out", str(out), "ok")
    if as_json:
        render.print_json({"recipient": recipient} | ({} if out is None else {"out": str(out)}))
    elif out is None:
        render.out.print(f"rebuilt the admin identity: {recipient} (verified, then wiped)")
    else:
        render.out.print(f"rebuilt the admin identity: {recipient} (verified), written to {out}")


def _write_new_secret(path: Path, text: str) -> None:
    """``text`` into a new 0600 file; an existing or unwritable path is a clear error."""
    try:
        write_secret_file(path, text)
    except FileExistsError:
        raise InvalidPayload(
            f"{path} already exists; --out never overwrites", field="out"
        ) from None
    except OSError as exc:
        raise InvalidPayload(f"cannot write {path}: {exc.strerror}", field="out") from None


def identity_file(path: Path, as_json: bool) -> x25519.Identity:
    return run(as_json, lambda: read_identity_file(path))


@app.command("list")
def list_keys(as_json: JsonOpt = False) -> None:
    """Roles, key versions, recipients, fingerprints, creation and retirement times."""
    with opened(as_json) as store:
        listing = store.keyring.listing()
    if as_json:
        render.print_json(listing)
        return
    table = Table("role", "authority", "version", "recipient", "fingerprint", "created", "retired")
    for role in listing["roles"]:
        for version in role["versions"]:
            current = " (current)" if version["version"] == role["current"] else ""
            table.add_row(
                role["name"], role["authority"], f"{version['version']}{current}",
                version["recipient"], version["fingerprint"], version["created_at"],
                version.get("retired_at") or "",
            )  # fmt: skip
    render.out.print(table)


@app.command("rotate")
def rotate(role: str, as_json: JsonOpt = False) -> None:
    """New key version for ROLE; re-encrypt what it reads; retire the old key (resumable).

    With --node/--profile the cluster's leader rotates it on every node (progress polled
    from ``node.status``'s ``rotation``)."""
    if STATE.remote.given:
        _rotate_cluster(role, as_json)
        return
    with opened(as_json) as store:
        if as_json:

            def line(done: int, total: int) -> None:
                print(json.dumps({"role": role, "done": done, "total": total}), flush=True)

            report = run(as_json, lambda: rotate_role(store, role, progress=line))
        else:
            with Progress(console=render.err) as bar:
                task = bar.add_task(f"rotating {role}", total=None)
                report = run(
                    as_json,
                    lambda: rotate_role(
                        store, role, progress=lambda d, t: bar.update(task, completed=d, total=t)
                    ),
                )
        store.audit_event("keys.rotate", None, "ok" if report.finished else "partial")
    if as_json:
        render.print_json(report.to_dict())
    else:
        render.out.print(
            f"{role}: key v{report.from_version} -> v{report.to_version}, "
            f"{report.rewritten} records re-encrypted, "
            + ("old key retired" if report.finished else "not finished: run it again"),
            markup=False,
        )


POLL_S = 1.0


def _rotate_cluster(role: str, as_json: bool) -> None:
    """Ask the leader to rotate ROLE cluster-wide and follow it until it finishes."""
    STATE.refused = None  # the one keys command that goes to a cluster
    started_ms = int(time.time() * 1000)
    remote = run(as_json, lambda: connect(STATE.remote))
    try:
        client = remote.client
        started = run(as_json, lambda: client.rotate_role(role))
        last: dict[str, Any] | None = None
        seen_running = False
        with Progress(console=render.err, disable=as_json) as bar:
            task = bar.add_task(f"rotating {role} cluster-wide", total=None)
            while True:
                found = run(as_json, client.status).get("rotation") or {}
                ended = found.get("role") == role and found.get("phase") in ("done", "failed")
                recent = seen_running or int(found.get("finished_ms", 0)) >= started_ms - 60_000
                if ended and recent:
                    last = found
                    break
                if found.get("role") != role or "rows_done" not in found:
                    time.sleep(POLL_S)
                    continue
                seen_running = True
                last = found
                bar.update(
                    task,
                    description=f"{role} v{found['version']}: {found['phase']}",
                    completed=found["rows_done"],
                    total=found["rows_total"] or None,
                )
                time.sleep(POLL_S)
    finally:
        remote.close()
    ok = (last or {}).get("phase") == "done"
    summary = {"role": role, "started": started, "result": last, "finished": ok}
    if as_json:
        render.print_json(summary)
    else:
        render.out.print(f"{role}: {(last or {}).get('message', '')}", markup=False)
    if not ok:
        raise typer.Exit(1)


def _new_passphrase() -> str:
    value = os.environ.get(PASSPHRASE_ENV)
    if value is None:
        if not sys.stdin.isatty():
            raise InvalidPayload(f"set {PASSPHRASE_ENV} or run in a terminal", field="passphrase")
        value = str(
            typer.prompt("new keyring passphrase", hide_input=True, confirmation_prompt=True)
        )
    if not value:
        raise InvalidPayload("the passphrase must not be empty", field="passphrase")
    return value


@app.command("protect")
def protect(as_json: JsonOpt = False) -> None:
    """Seal every key file with a passphrase (age scrypt; SLURP_PASSPHRASE or a prompt)."""
    passphrase = run(as_json, _new_passphrase)
    with opened(as_json) as store:
        run(as_json, lambda: store.keyring.protect(passphrase))
        store.audit_event("keys.protect", None, "ok")
    if as_json:
        render.print_json({"protected": True})
    else:
        render.out.print("keyring protected; `age -d` opens each key file with the passphrase")


@app.command("unprotect")
def unprotect(as_json: JsonOpt = False) -> None:
    """Remove the passphrase from every key file (they stay 0600)."""
    with opened(as_json) as store:
        run(as_json, store.keyring.unprotect)
        store.audit_event("keys.unprotect", None, "ok")
    if as_json:
        render.print_json({"protected": False})
    else:
        render.out.print("keyring unprotected")
