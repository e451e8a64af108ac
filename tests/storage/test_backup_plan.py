"""The scheduled-backup core: schedule grammar, the decision table, retention, staleness."""

from __future__ import annotations

import pytest

from storage.backup_plan import (
    Policy,
    Step,
    Taken,
    due_in_ms,
    parse_schedule,
    plan,
    stale,
    to_prune,
)
from storage.errors import InvalidPayload

HOUR_MS = 3_600_000


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("15m", 900), ("6h", 21_600), ("1d", 86_400), ("1w", 604_800),
     ("3600", 3600), ("@daily", 86_400), (" @Hourly ", 3600)],
)  # fmt: skip
def test_schedule_grammar(text: str, seconds: int) -> None:
    assert parse_schedule(text) == seconds


@pytest.mark.parametrize("text", ["0 3 * * *", "soon", "10x", "", "30s"])
def test_bad_schedules_name_the_key(text: str) -> None:
    with pytest.raises(InvalidPayload) as raised:
        parse_schedule(text)
    assert raised.value.field == "backup.schedule"


def history(*kinds: str) -> list[Taken]:
    """Backups taken an hour apart, starting at hour 0."""
    return [
        Taken(f"b{i}", "full" if kind == "f" else "incremental", i * HOUR_MS)
        for i, kind in enumerate(kinds)
    ]


def test_decision_table() -> None:
    policy = Policy(interval_s=3600, keep=2, incremental=2)
    assert plan(0, [], policy) == Step("full", None)
    taken = history("f")
    assert plan(HOUR_MS - 1, taken, policy) is None
    assert due_in_ms(HOUR_MS - 1, taken, policy) == 1
    assert plan(HOUR_MS, taken, policy) == Step("incremental", "b0")
    assert plan(2 * HOUR_MS, history("f", "i"), policy) == Step("incremental", "b1")
    assert plan(3 * HOUR_MS, history("f", "i", "i"), policy) == Step("full", None)
    assert plan(HOUR_MS, history("i"), policy) == Step("full", None)  # no full one left
    always_full = Policy(interval_s=3600, incremental=0)
    assert plan(2 * HOUR_MS, history("f", "f"), always_full) == Step("full", None)


def test_retention_keeps_whole_chains() -> None:
    taken = history("f", "i", "f", "i", "i", "f", "i")
    assert to_prune(taken, keep=2) == ["b0", "b1"]
    assert to_prune(taken, keep=3) == []
    assert to_prune(taken, keep=1) == ["b0", "b1", "b2", "b3", "b4"]


def test_stale_after_twice_the_interval() -> None:
    assert not stale(2 * HOUR_MS, 0, 3600)
    assert stale(2 * HOUR_MS + 1, 0, 3600)
    assert not stale(10 * HOUR_MS, None, 3600)
