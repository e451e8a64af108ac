"""Text rendering for the ``slurp`` command (the ``--json`` forms come from ``to_json``).

Owns how results look in a terminal. Must not compute anything.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from storage.views import ContextInfo, HistoryEntry, SearchResult, VersionView, iso_ms

out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def print_json(value: Any) -> None:
    """One JSON document on stdout."""
    print(json.dumps(value, ensure_ascii=False, sort_keys=False))


def version(view: VersionView) -> None:
    """A decrypted version, human-readable."""
    out.print(f"[bold]{view.address}[/bold]", markup=True)
    rows = [
        ("version", f"{view.version} ({view.version_id})"),
        ("created", f"{iso_ms(view.created_at_ms)} by {view.created_by}"),
        ("readers", ", ".join(view.readers)),
        ("read as", view.read_as),
        ("tags", ", ".join(view.tags)),
        ("technologies", ", ".join(view.technologies)),
        ("summary", view.summary),
        ("purpose", str(view.fields.get("purpose", ""))),
    ]
    for label, value in rows:
        if value:
            out.print(f"{label:>13}: {value}", markup=False)
    for insight in view.insights_list():
        out.print(f"{'insight':>13}: {insight}", markup=False)
    content = view.content
    if content:
        out.print("", markup=False)
        out.print(content if isinstance(content, str) else f"<{len(content)} bytes>", markup=False)


def history(entries: Sequence[HistoryEntry]) -> None:
    """A context's versions, oldest first."""
    table = Table("#", "version id", "kind", "created", "by", "parent", "siblings")
    for entry in entries:
        table.add_row(
            str(entry.version),
            entry.version_id,
            entry.kind,
            iso_ms(entry.created_at_ms) if entry.created_at_ms else "?",
            entry.created_by,
            entry.parent or "-",
            str(entry.siblings or ""),
        )
    out.print(table)


def contexts(items: Sequence[ContextInfo]) -> None:
    """A listing of contexts."""
    table = Table("address", "versions", "updated", "state")
    for item in items:
        table.add_row(
            item.address,
            str(item.versions),
            iso_ms(item.updated_at_ms),
            "live" if item.live else "deleted",
        )
    out.print(table)


def hits(results: Sequence[SearchResult]) -> None:
    """Ranked search hits."""
    table = Table("score", "address")
    for hit in results:
        table.add_row(f"{hit.score:.3f}", hit.address)
    out.print(table)


def mapping(data: dict[str, Any], indent: int = 0) -> None:
    """A nested mapping as indented ``key: value`` lines."""
    pad = " " * indent
    for key, value in data.items():
        if isinstance(value, dict):
            out.print(f"{pad}{key}:", markup=False)
            mapping(value, indent + 2)
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            out.print(f"{pad}{key}:", markup=False)
            for item in value:
                out.print(
                    f"{pad}  - " + ", ".join(f"{k}={v}" for k, v in item.items()), markup=False
                )
        else:
            out.print(f"{pad}{key}: {value}", markup=False)


def figure(value: Any) -> str:
    """A count, or ``-`` when it is unknown (null)."""
    return "-" if value is None else str(value)


def age(seconds: Any) -> str:
    """A duration in seconds, ``12s ago`` / ``3.5m ago`` / ``2.0h ago``; ``-`` when unknown."""
    if seconds is None:
        return "-"
    value = float(seconds)
    if value < 120:
        return f"{value:.0f}s ago"
    if value < 7200:
        return f"{value / 60:.1f}m ago"
    return f"{value / 3600:.1f}h ago"


def started_line(started: Sequence[str], total: int, created: bool) -> str:
    """What ``slurp cluster up`` did: which nodes it started."""
    if created:
        return f"created and started {total} nodes: {', '.join(started)}"
    if not started:
        return f"all {total} nodes were already up"
    return f"started {', '.join(started)} ({total - len(started)} of {total} were already up)"


def node_status(data: dict[str, Any]) -> None:
    """``node.status`` of one node: the mapping, with backlog and anti-entropy as figures."""
    rest = {k: v for k, v in data.items() if k not in ("backlog", "antientropy")}
    mapping(rest)
    backlog = data.get("backlog") or {}
    antientropy = data.get("antientropy") or {}
    out.print(
        f"backlog: hints {figure(backlog.get('hints'))}, "
        f"hint bytes {figure(backlog.get('hint_bytes'))}, "
        f"repairs pending {figure(backlog.get('repair_pending'))}",
        markup=False,
    )
    out.print(
        f"anti-entropy: last pass {age(antientropy.get('last_pass_age_s'))}, "
        f"versions repaired {figure(antientropy.get('versions_repaired'))}",
        markup=False,
    )
