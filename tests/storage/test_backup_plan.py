"""The scheduled-backup core: schedule grammar, the decision table, retention, staleness."""

from __future__ import annotations

import pytest

from storage.backup_plan import (
    Policy,
    Step,
    Taken,
    due_in_ms,
    parse,
    parse_schedule,
    plan,
    stale,
    stale_warning,
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


@pytest.mark.parametrize("text", ["soon", "10x", "", "30s", "0 3 * *", "0 3 * * * *"])
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


# -- cron specs ---------------------------------------------------------------------------

JAN_1_2026_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z, a Thursday
MINUTE_MS = 60_000
DAY_MS = 86_400_000


@pytest.mark.parametrize(
    ("spec", "field", "value"),
    [("61 * * * *", "minute", "61"), ("0 24 * * *", "hour", "24"),
     ("0 3 0 * *", "day-of-month", "0"), ("0 3 * 13 *", "month", "13"),
     ("0 3 * * 8", "day-of-week", "8"), ("0 3 31 2 *", "day-of-month", "31"),
     ("*/x 3 * * *", "minute", "*/x")],
)  # fmt: skip
def test_a_bad_cron_field_is_named(spec: str, field: str, value: str) -> None:
    with pytest.raises(InvalidPayload) as raised:
        parse(spec)
    assert raised.value.field == "backup.schedule"
    assert f"its {field} field {value!r} does not parse" in raised.value.message


def test_a_cron_spec_needs_five_fields() -> None:
    with pytest.raises(InvalidPayload) as raised:
        parse("0 3 * * * 2026")
    assert "five fields" in raised.value.message
    assert "not 6" in raised.value.message


@pytest.mark.parametrize(
    ("spec", "gap_s"),
    [("* * * * *", 60), ("*/15 * * * *", 900), ("0 3 * * *", 86_400),
     ("0 0,12 * * *", 43_200), ("0 9 * * 1-5", 3 * 86_400), ("30 2 1 * *", 31 * 86_400),
     ("0 0 29 2 *", 1461 * 86_400), ("0 0 13 * 5", 7 * 86_400),
     ("* * * 1 *", 335 * 86_400 + 60)],
)  # fmt: skip
def test_a_cron_spec_is_stale_after_twice_its_longest_gap(spec: str, gap_s: int) -> None:
    schedule = parse(f"  {spec} ")
    assert schedule.cron == spec
    assert schedule.interval_s == gap_s
    assert parse_schedule(spec) == gap_s
    assert not stale(JAN_1_2026_MS + 2 * gap_s * 1000, JAN_1_2026_MS, schedule.interval_s)
    assert stale(JAN_1_2026_MS + 2 * gap_s * 1000 + 1, JAN_1_2026_MS, schedule.interval_s)


@pytest.mark.parametrize(
    ("spec", "after_ms", "due_ms"),
    [("0 3 * * *", JAN_1_2026_MS, JAN_1_2026_MS + 3 * HOUR_MS),
     ("0 3 * * *", JAN_1_2026_MS + 3 * HOUR_MS, JAN_1_2026_MS + DAY_MS + 3 * HOUR_MS),
     ("0 3 * * *", JAN_1_2026_MS + 3 * HOUR_MS - 1, JAN_1_2026_MS + 3 * HOUR_MS),
     ("*/20 * * * *", JAN_1_2026_MS + 21 * MINUTE_MS, JAN_1_2026_MS + 40 * MINUTE_MS),
     ("0 9 * * 1-5", JAN_1_2026_MS + DAY_MS + 10 * HOUR_MS,  # Friday 10:00 -> Monday 09:00
      JAN_1_2026_MS + 4 * DAY_MS + 9 * HOUR_MS),
     ("0 0 1 */3 *", JAN_1_2026_MS, JAN_1_2026_MS + (31 + 28 + 31) * DAY_MS)],
)  # fmt: skip
def test_next_cron_run(spec: str, after_ms: int, due_ms: int) -> None:
    policy = Policy(parse(spec).interval_s, cron=spec)
    assert policy.due_ms(after_ms) == due_ms
    taken = [Taken("a", "full", after_ms)]
    assert due_in_ms(after_ms, taken, policy) == due_ms - after_ms
    assert plan(due_ms - 1, taken, policy) is None
    assert plan(due_ms, taken, policy) == Step("incremental", "a")


def test_stale_warning_names_what_is_stale_and_the_schedule() -> None:
    start, hour = 10 * HOUR_MS, 3600
    assert stale_warning(start + HOUR_MS, None, start, hour) is None  # not yet twice
    assert stale_warning(start + 3 * HOUR_MS, None, start, hour) == (
        "no backup has succeeded older than twice the schedule (3600 s)"
    )
    assert stale_warning(start + 3 * HOUR_MS, start + 2 * HOUR_MS, start, hour) is None
    assert stale_warning(start + 5 * HOUR_MS, start + 2 * HOUR_MS, start, hour,
                         kind="cluster backup") == (
        "the last good cluster backup is older than twice the schedule (3600 s)"
    )  # fmt: skip
    assert stale_warning(start + 3 * HOUR_MS, None, start, hour, cron="0 * * * *") == (
        "no backup has succeeded older than twice the schedule "
        "(the longest gap of '0 * * * *', 3600 s)"
    )
