"""``slurp audit``: read and verify the hash-chained audit log."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from cli import render
from cli.common import CliError, JsonOpt, fail, opened, run
from crypto.audit import AuditLog
from crypto.errors import AuditChainBroken
from storage.views import iso_ms

app = typer.Typer(help="The hash-chained audit log.", no_args_is_help=True)


@app.command("tail")
def tail(
    n: Annotated[int, typer.Option("-n", help="How many entries.")] = 20,
    as_json: JsonOpt = False,
) -> None:
    """The newest N entries, oldest first."""
    with opened(as_json) as store:
        if store.audit is None:
            fail(_broken(store.audit_error), as_json)
        log = store.audit
        entries = run(as_json, lambda: log.tail(n))
    if as_json:
        render.print_json([entry.to_json() for entry in entries])
        return
    table = Table("seq", "time", "actor", "op", "address", "outcome")
    for e in entries:
        table.add_row(str(e.seq), iso_ms(e.ts_ms), e.actor, e.op, e.address or "", e.outcome)
    render.out.print(table)


@app.command("verify")
def verify(as_json: JsonOpt = False) -> None:
    """Check the whole chain; names the first entry that breaks it."""
    with opened(as_json) as store:
        if store.audit is None:
            fail(_broken(store.audit_error), as_json)
        log = store.audit
        count = run(as_json, lambda: _verified(log))
    if as_json:
        render.print_json({"verified": count, "ok": True})
    else:
        render.out.print(f"audit log intact: {count} entries verified", markup=False)


def _verified(log: AuditLog) -> int:
    try:
        return log.verify()
    except AuditChainBroken as exc:
        raise _broken(exc) from None


def _broken(error: AuditChainBroken | None) -> CliError:
    where = "" if error is None else f" at entry {error.seq} ({error.reason})"
    return CliError(
        "UCXL-500-AUDIT_BROKEN", f"the audit log is broken{where}: {error}", field="audit"
    )
