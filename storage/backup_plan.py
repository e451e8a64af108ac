"""Scheduled backups of one node: when the next one is due, full or incremental, and which
old ones retention removes (issue 11, "Scheduled backups"; the ``[backup]`` table).

Owns: the schedule grammar (``parse``: an interval, or a five-field cron spec in UTC
read by ``cronsim``), when the next backup is due (``Policy.due_ms``), the decision table
below, retention (``to_prune``) and staleness (``stale``). Pure: times come in as
``now_ms``; nothing is read or written (``node.daemon.backup_service`` is the shell).
Must not know: the backup format, files, trio.

A cron spec's ``interval_s`` is the longest gap between two consecutive runs
(``longest_gap_s``; "older than twice the schedule" means twice that gap). Minute and
hour do not depend on the date in cron, so every day that runs has the same times of
day: the gap is the largest of the gaps within such a day and the gaps between
consecutive run days over ``GAP_HORIZON_DAYS`` from ``GAP_REFERENCE`` (eight years: two
leap days, every weekday alignment of a month).

Decision (``plan``), over the backups already taken (oldest first):

==========================================  ======================================
situation                                   step
==========================================  ======================================
no backup yet                               full, now
not due yet (``due_ms`` of the last one)    nothing (due at last + interval, or at
                                            the first cron run after the last one)
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
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from itertools import pairwise
from typing import Literal

from cronsim import CronSim, CronSimError

from storage.errors import InvalidPayload

ALIASES_S = {"@hourly": 3600, "@daily": 86_400, "@weekly": 7 * 86_400}
UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 7 * 86_400}
MIN_INTERVAL_S = 60
STALE_FACTOR = 2
_INTERVAL = re.compile(r"^([0-9]{1,9})([smhdw]?)$")
CRON_FIELDS = ("minute", "hour", "day-of-month", "month", "day-of-week")
GAP_REFERENCE = datetime(2024, 1, 1, tzinfo=UTC)
GAP_HORIZON_DAYS = 8 * 366


@dataclass(frozen=True)
class Schedule:
    """A parsed ``[backup] schedule``: an interval, or a cron spec and its longest gap."""

    interval_s: int  # the interval; for a cron spec the longest gap between two runs
    cron: str | None = None  # five fields, UTC (None: an interval)


@dataclass(frozen=True)
class Policy:
    """The validated ``[backup]`` table."""

    interval_s: int  # the interval; for a cron spec the longest gap between two runs
    keep: int = 7
    incremental: int = 6  # incrementals between two full backups (0: every one is full)
    cron: str | None = None  # backups are due at this spec's runs (UTC) instead

    def due_ms(self, last_ms: int) -> int:
        """When the backup after one taken at ``last_ms`` is due: an interval later, or
        at the first run of the cron spec strictly after ``last_ms``."""
        if self.cron is None:
            return last_ms + self.interval_s * 1000
        return next_run_ms(self.cron, last_ms)


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
    """The interval of a schedule in seconds (for a cron spec: its longest gap); see
    ``parse``."""
    return parse(text).interval_s


def parse(text: str) -> Schedule:
    """A schedule: ``90s``, ``15m``, ``6h``, ``1d``, ``1w``, a number of seconds,
    ``@hourly``/``@daily``/``@weekly``, or a cron spec of five fields (minute hour
    day-of-month month day-of-week, UTC; e.g. ``0 3 * * *``, ``*/30 * * * 1-5``).

    Raises:
        InvalidPayload: another form, a cron field that does not parse (named), or an
            interval under ``MIN_INTERVAL_S``; ``field`` is ``backup.schedule``.
    """
    spec = text.strip().lower()
    if len(spec.split()) > 1:
        return _parse_cron(text, " ".join(spec.split()))
    seconds = ALIASES_S.get(spec)
    match = _INTERVAL.match(spec)
    if seconds is None and match is not None:
        seconds = int(match[1]) * UNITS_S[match[2] or "s"]
    if seconds is None:
        raise InvalidPayload(
            f"backup.schedule {text!r} is not an interval (90s, 15m, 6h, 1d, 1w), "
            "@hourly/@daily/@weekly, or a cron spec of five fields (minute hour "
            "day-of-month month day-of-week, UTC)",
            field="backup.schedule",
        )
    if seconds < MIN_INTERVAL_S:
        raise InvalidPayload(
            f"backup.schedule must be at least {MIN_INTERVAL_S} seconds", field="backup.schedule"
        )
    return Schedule(seconds)


def _parse_cron(text: str, spec: str) -> Schedule:
    fields = spec.split(" ")
    if len(fields) != len(CRON_FIELDS):
        raise InvalidPayload(
            f"backup.schedule {text!r}: a cron spec has five fields (minute hour "
            f"day-of-month month day-of-week, UTC), not {len(fields)}",
            field="backup.schedule",
        )
    try:
        CronSim(spec, GAP_REFERENCE)
    except CronSimError as exc:
        reason = str(exc)
        named = next((n for n in CRON_FIELDS if n in reason.lower()), None)
        where = (
            f"its {named} field {fields[CRON_FIELDS.index(named)]!r} does not parse"
            if named is not None
            else reason
        )
        raise InvalidPayload(
            f"backup.schedule {text!r}: {where} (cron fields: minute hour day-of-month "
            "month day-of-week, UTC)",
            field="backup.schedule",
        ) from None
    return Schedule(longest_gap_s(spec), spec)


def next_run_ms(spec: str, after_ms: int) -> int:
    """The first run of the cron ``spec`` strictly after ``after_ms`` (UTC), in ms."""
    start = datetime.fromtimestamp(after_ms / 1000, tz=UTC)
    return int(next(CronSim(spec, start)).timestamp() * 1000)


@lru_cache(maxsize=64)
def longest_gap_s(spec: str) -> int:
    """The longest time between two consecutive runs of a valid cron ``spec``, in
    seconds (see the module docstring for how)."""
    end = GAP_REFERENCE + timedelta(days=GAP_HORIZON_DAYS)
    first = next(CronSim(spec, GAP_REFERENCE - timedelta(seconds=1)))
    times = [first]  # the times of the first run day (the same on every run day)
    for run in CronSim(spec, first):
        if run.date() != first.date():
            break
        times.append(run)
    minutes = [t.hour * 60 + t.minute for t in times]
    within = max((b - a for a, b in pairwise(minutes)), default=0)
    across = 0
    day = first
    while day < end:
        following = next(CronSim(spec, _day_start(day) + timedelta(days=1, seconds=-1)))
        gap_days = (following.date() - day.date()).days
        across = max(across, gap_days * 1440 - minutes[-1] + minutes[0])
        day = following
    return max(within, across) * 60


def _day_start(moment: datetime) -> datetime:
    return moment.replace(hour=0, minute=0, second=0, microsecond=0)


def plan(now_ms: int, taken: Sequence[Taken], policy: Policy) -> Step | None:
    """The backup due at ``now_ms``, or None (see the decision table)."""
    if not taken:
        return Step("full", None)
    if now_ms < policy.due_ms(taken[-1].created_ms):
        return None
    return next_step(taken, policy.incremental)


def next_step(taken: Sequence[Taken], incremental: int) -> Step:
    """Full or incremental, for a backup that is due (the decision table's last rows; the
    cluster's ``backup`` duty, whose timing the duties core decides, asks this alone)."""
    fulls = [i for i, item in enumerate(taken) if item.kind == "full"]
    if not fulls or incremental == 0:
        return Step("full", None)
    since_full = len(taken) - 1 - fulls[-1]
    if since_full >= incremental:
        return Step("full", None)
    return Step("incremental", taken[-1].file)


def due_in_ms(now_ms: int, taken: Sequence[Taken], policy: Policy) -> int:
    """Milliseconds until the next backup is due (0: now)."""
    if not taken:
        return 0
    return max(0, policy.due_ms(taken[-1].created_ms) - now_ms)


def to_prune(taken: Sequence[Taken], keep: int) -> list[str]:
    """The files retention removes: everything before the ``keep``-th newest full backup."""
    fulls = [i for i, item in enumerate(taken) if item.kind == "full"]
    if len(fulls) <= keep:
        return []
    first_kept = fulls[-keep]
    return [item.file for item in taken[:first_kept]]


def stale(now_ms: int, last_success_ms: int | None, interval_s: int) -> bool:
    """Whether the last good backup is older than ``STALE_FACTOR`` intervals (or missing
    after that long: ``last_success_ms`` is then the service's start); for a cron spec,
    ``interval_s`` is its longest gap (``Schedule.interval_s``)."""
    if last_success_ms is None:
        return False
    return now_ms - last_success_ms > STALE_FACTOR * interval_s * 1000


def stale_warning(
    now_ms: int,
    last_success_ms: int | None,
    started_ms: int,
    interval_s: int,
    *,
    kind: str = "backup",
    cron: str | None = None,
) -> str | None:
    """The ``warning`` of ``node.status``'s ``backup`` field: None unless the last good
    ``kind`` (or, before the first, ``started_ms``) is older than twice the schedule;
    ``cron``, when given, is named beside its longest gap ``interval_s``."""
    since = last_success_ms if last_success_ms is not None else started_ms
    if not stale(now_ms, since, interval_s):
        return None
    what = f"no {kind} has succeeded" if last_success_ms is None else f"the last good {kind} is"
    span = f"{interval_s} s" if cron is None else f"the longest gap of {cron!r}, {interval_s} s"
    return f"{what} older than twice the schedule ({span})"
