"""The failover phase of ``scripts/bench cluster`` (scripts/bench_failover.py): its figures
and its probe, without a cluster.

Invariants checked: the longest gap spans the kill and runs to the writer's end; the
baseline only counts gaps before the kill; failures count only when they end after the kill;
a round without a failover makes the summary NaN (it cannot vanish from the max); the probe
reports the first success measured from the kill, at the probe's grain, and NaN when nothing
succeeds before the deadline. Time is trio's MockClock: nothing sleeps on the wall clock.
"""

from __future__ import annotations

import math

import pytest
import trio
import trio.testing

from tests.bench_scripts import load_script

bf = load_script("bench_failover")


def test_write_figures_span_the_kill_and_run_to_the_writers_end() -> None:
    writes = bf.Writes()
    # (start, end, ok): successes at 0.1, 0.2, 0.5 (before the kill at 1.0), a failure that
    # ended before it, one that ended after it, then successes at 1.8 and 2.0; end at 2.4
    writes.calls = [
        (0.0, 0.1, True), (0.1, 0.2, True), (0.2, 0.3, False), (0.3, 0.5, True),
        (0.5, 1.5, False), (1.5, 1.8, True), (1.8, 2.0, True),
    ]  # fmt: skip
    writes.ended = 2.4
    longest, baseline, failed, after = bf.write_figures(writes, 1.0)
    assert longest == pytest.approx(1.3)  # 0.5 -> 1.8
    assert baseline == pytest.approx(0.3)  # 0.2 -> 0.5
    assert failed == 1
    assert after == 2


def test_a_writer_that_never_succeeds_again_shows_the_rest_of_the_window() -> None:
    writes = bf.Writes()
    writes.calls = [(0.0, 0.4, True), (0.4, 0.9, True), (0.9, 1.9, False), (1.9, 2.9, False)]
    writes.ended = 2.9
    longest, _, failed, after = bf.write_figures(writes, 1.0)
    assert longest == pytest.approx(2.0)
    assert (failed, after) == (2, 0)


def test_summary_is_nan_when_a_round_never_failed_over() -> None:
    done = bf.Round("a", "b", 0.2, 0.1, 0.05, 0, 10)
    late = bf.Round("b", "c", 0.6, 0.1, 0.05, 0, 10)
    never = bf.Round("c", "a", math.nan, 3.0, 0.05, 5, 0)
    assert bf.summary([done, late], lambda r: r.failover_s) == (pytest.approx(0.4), 0.6)
    assert all(math.isnan(v) for v in bf.summary([done, never], lambda r: r.failover_s))


def test_figures_give_median_and_max_lines_with_verdicts() -> None:
    rounds = [bf.Round("a", "b", 0.5, 0.2, 0.05, 0, 10), bf.Round("b", "c", 0.9, 0.3, 0.05, 0, 9)]
    lines = bf.figures({"slurp": rounds})
    first = lines[0]
    assert first[0].startswith("leader failover")
    assert "median" in first[0]
    assert first[1] == pytest.approx(700.0)
    assert first[2] is None  # no etcd rounds
    assert first[4] == 1000.0
    assert [line[5] for line in lines].count(True) == 2  # the failed-writes lines are counts
    assert bf.figures({}) == []


async def test_first_success_is_measured_from_the_kill_at_the_probes_grain(
    autojump_clock: trio.testing.MockClock,
) -> None:
    since = trio.current_time()
    ready_at = since + 0.25

    async def attempt(number: int) -> None:
        await trio.sleep(0.002)
        if trio.current_time() < ready_at:
            raise RuntimeError("no leader yet")

    took = await bf.first_success(attempt, since)
    assert 0.25 <= took <= 0.25 + bf.POLL_S + 0.002 + 1e-9


async def test_first_success_is_nan_when_nothing_succeeds(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def attempt(number: int) -> None:
        await trio.sleep_forever()  # every attempt hangs until its own timeout

    assert math.isnan(await bf.first_success(attempt, trio.current_time()))
