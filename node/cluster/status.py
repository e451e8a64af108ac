"""The operator-facing status figures of one node, composed from its status sources (pure).

Owns the contract of the ``backlog`` and ``antientropy`` fields of ``node.status`` (what
``slurp status --json`` and ``slurp cluster status --json`` print per node) and the reading
of ``NodeService.status_sources``. Must not know trio, clocks or where the figures come
from: each subsystem registers a callable under its name and this module only reads them.

Sources (the integrator's contract; each returns a dict):

    "handoff"      {"hints": int, "hint_bytes": int, "hints_dropped": int,
                    "hints_delivered": int}
    "antientropy"  {"last_pass_age_s": float | None, "versions_repaired": int, "passes": int,
                    "bytes_sent": int, "bytes_received": int}

Invariants: a figure is never invented. A source that is not registered, raises, returns
something other than a dict, or gives a field of the wrong type yields ``None`` for that
field (``null`` in JSON, absent in Prometheus); a broken source is logged, never allowed to
fail ``node.status`` or the metrics loop.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

log = logging.getLogger(__name__)

StatusSource = Callable[[], dict[str, Any]]
Snapshot = Mapping[str, Mapping[str, Any]]
HANDOFF = "handoff"
ANTIENTROPY = "antientropy"


def read_sources(sources: Mapping[str, StatusSource]) -> dict[str, dict[str, Any]]:
    """Call every registered source once; a source that fails is left out (and logged)."""
    out: dict[str, dict[str, Any]] = {}
    for name, source in sources.items():
        try:
            value = source()
        except Exception:
            log.exception("status source %r failed; its figures are reported as null", name)
            continue
        if not isinstance(value, dict):
            log.error("status source %r returned %s, not a dict", name, type(value).__name__)
            continue
        out[name] = value
    return out


def count(snapshot: Snapshot, source: str, key: str) -> int | None:
    """A non-negative integer figure, or None when unknown."""
    value = snapshot.get(source, {}).get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def seconds(snapshot: Snapshot, source: str, key: str) -> float | None:
    """A non-negative duration in seconds, or None when unknown (or never happened)."""
    value = snapshot.get(source, {}).get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        return None
    return float(value)


def backlog(snapshot: Snapshot, repair_pending: int) -> dict[str, int | None]:
    """The ``backlog`` field: hints waiting for their node, read repairs queued or in flight."""
    return {
        "hints": count(snapshot, HANDOFF, "hints"),
        "hint_bytes": count(snapshot, HANDOFF, "hint_bytes"),
        "repair_pending": repair_pending,
    }


def antientropy(snapshot: Snapshot) -> dict[str, float | int | None]:
    """The ``antientropy`` field: how long ago the last pass finished, versions it repaired."""
    return {
        "last_pass_age_s": seconds(snapshot, ANTIENTROPY, "last_pass_age_s"),
        "versions_repaired": count(snapshot, ANTIENTROPY, "versions_repaired"),
    }
