"""The leader duties scheduler: which duties the leader should start or resume now.

A pure core (ARCHITECTURE.md §2, §6): no I/O, no clock, no randomness. The leader's shell
calls ``due`` with the applied metadata, its own clock reading and its term, proposes
``cmd_duty_started`` for each action, and runs a duty only once that entry has applied
with result "start" or "resume" (so two leaders never both think they run it: the
state machine fences by term, ``node.control.metadata``).

Rules (a duty's schedule and last run live in the log, so they survive leader changes):

========================================  =================================
duty                                      action
========================================  =================================
not running, never started                ``start`` at once
not running, now >= started + interval    ``start``
running under an older term               ``resume`` from its cursor
running under this term (or a newer one)  nothing (this leader runs it)
========================================  =================================

Must not know what a duty does, or Raft. Invariant: ``due`` is a function of its
arguments; actions come in duty-name order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from node.control.metadata import ClusterMetadata, Duty

ActionKind = Literal["start", "resume"]


@dataclass(frozen=True)
class DutyAction:
    """Start duty ``name`` afresh, or resume it from ``cursor`` (b"" when starting)."""

    name: str
    kind: ActionKind
    cursor: bytes = b""


def _next_start_ms(duty: Duty) -> int:
    """When a duty that is not running is next due (0: at once)."""
    if duty.last_term == 0:
        return 0
    return duty.last_started_ms + duty.interval_s * 1000


def due(state: ClusterMetadata, now_ms: int, term: int) -> list[DutyAction]:
    """The duties the leader of ``term`` should start or resume at ``now_ms``.

    Args:
        state: the metadata the leader has applied.
        now_ms: the leader's wall clock, in ms (the clock the duty times in the log use).
        term: the leader's current term.

    Returns:
        One action per due duty, sorted by name.
    """
    actions = []
    for name, duty in sorted(state.duties.items()):
        if duty.running:
            if duty.last_term < term:
                actions.append(DutyAction(name, "resume", duty.cursor))
        elif now_ms >= _next_start_ms(duty):
            actions.append(DutyAction(name, "start"))
    return actions


def next_due_ms(state: ClusterMetadata, term: int) -> int | None:
    """The earliest time some duty becomes due for the leader of ``term`` (None: none will
    until the state changes, e.g. every duty runs under this term). A duty due now or one
    to resume gives 0."""
    times = []
    for duty in state.duties.values():
        if duty.running:
            if duty.last_term < term:
                times.append(0)
        else:
            times.append(_next_start_ms(duty))
    return min(times, default=None)
