"""Scheduled backups of one node: when the next one is due, full or incremental, and which
old ones retention removes (issue 11, "Scheduled backups"; the ``[backup]`` table).

Owns: the schedule grammar (``parse_schedule``), the decision table below, retention
(``to_prune``) and staleness (``stale``). Pure: times come in as ``now_ms``; nothing is
read or written (``node.daemon.backup_service`` is the shell).
Must not know: the backup format, files, trio.

Decision (``plan``), over the backups already taken (oldest first):

==========================================  ======================================
situation                                   step
==========================================  ======================================
no backup yet                               full, now
last one younger than the interval          nothing (due at last + interval)
no full one yet, or ``incremental`` is 0,   full
or ``incremental`` incrementals since the
last full one
otherwise                                   incremental after the newest backup
==========================================  ======================================

Retention keeps the newest ``keep`` full backups and every incremental taken after the
oldest of them (an incremental is useless without its full backup); everything older
goes. Invariants: a kept incremental's chain is always kept; ``keep`` >= 1.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from storage.errors import InvalidPayload

ALIASES_S = {"@hourly": 3600, "@daily": 86_400, "@weekly": 7 * 86_400}
UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 7 * 86_400}
MIN_INTERVAL_S = 60
STALE_FACTOR = 2
_INTERVAL = re.compile(r"^([0-9]{1,9})([smhdw]?)$")


@dataclass(frozen=True)
class Policy:
    """The validated ``[backup]`` table."""

    interval_s: int
    keep: int = 7
    incremental: int = 6  # incrementals between two full backups (0: every one is full)


@dataclass(frozen=True)
class Taken:
    """A backup already in the directory."""

    file: str
    kind: Literal["full", "incremental"]
    created_ms: int


@dataclass(frozen=True)
class Step:
    """The backup to take now: full, or incremental after ``since``."""

    kind: Literal["full", "incremental"]
    since: str | None


def parse_schedule(text: str) -> int:
    """The interval of a schedule, in seconds: ``90s``, ``15m``, ``6h``, ``1d``, ``1w``, a
    number of seconds, or ``@hourly``/``@daily``/``@weekly``.

    Raises:
        InvalidPayload: another form (cron's five fields are not supported yet), or an
            interval under ``MIN_INTERVAL_S``; ``field`` is ``backup.schedule``.
    """
    spec = text.strip().lower()
    seconds = ALIASES_S.get(spec)
    match = _INTERVAL.match(spec)
    if seconds is None and match is not None:
        seconds = int(match[1]) * UNITS_S[match[2] or "s"]
    if seconds is None:
        raise InvalidPayload(
            f"backup.schedule {text!r} is not an interval (90s, 15m, 6h, 1d, 1w) or "
            "@hourly/@daily/@weekly; cron specs are not supported yet",
            field="backup.schedule",
        )
    if seconds < MIN_INTERVAL_S:
        raise InvalidPayload(
            f"backup.schedule must be at least {MIN_INTERVAL_S} seconds", field="backup.schedule"
        )
    return seconds


def plan(now_ms: int, taken: Sequence[Taken], policy: Policy) -> Step | None:
    """The backup due at ``now_ms``, or None (see the decision table)."""
    if not taken:
        return Step("full", None)
    last = taken[-1]
    if now_ms - last.created_ms < policy.interval_s * 1000:
        return None
    fulls = [i for i, item in enumerate(taken) if item.kind == "full"]
    if not fulls or policy.incremental == 0:
        return Step("full", None)
    since_full = len(taken) - 1 - fulls[-1]
    if since_full >= policy.incremental:
        return Step("full", None)
    return Step("incremental", last.file)


def due_in_ms(now_ms: int, taken: Sequence[Taken], policy: Policy) -> int:
    """Milliseconds until the next backup is due (0: now)."""
    if not taken:
        return 0
    return max(0, taken[-1].created_ms + policy.interval_s * 1000 - now_ms)


def to_prune(taken: Sequence[Taken], keep: int) -> list[str]:
    """The files retention removes: everything before the ``keep``-th newest full backup."""
    fulls = [i for i, item in enumerate(taken) if item.kind == "full"]
    if len(fulls) <= keep:
        return []
    first_kept = fulls[-keep]
    return [item.file for item in taken[:first_kept]]


def stale(now_ms: int, last_success_ms: int | None, interval_s: int) -> bool:
    """Whether the last good backup is older than ``STALE_FACTOR`` intervals (or missing
    after that long: ``last_success_ms`` is then the service's start)."""
    if last_success_ms is None:
        return False
    return now_ms - last_success_ms > STALE_FACTOR * interval_s * 1000
