"""The rebalance and rotation phase of ``scripts/bench cluster`` (scripts/bench_rebalance.py):
its arithmetic, without a cluster.

Invariants checked: the streaming window runs from the first poll in transition to the first
poll (at or after it) that sees the new node "normal"; its bytes are the growth from the poll
before the window; an edge never seen gives no window; rates are NaN over an empty window;
percentiles are nearest-rank in ms; the figures carry the outcome's numbers; loaded values
are distinct per key and about VALUE_BYTES long.
"""

from __future__ import annotations

import math

import pytest

from tests.bench_scripts import load_script

br = load_script("bench_rebalance")


def test_window_runs_from_the_first_transition_to_normal_with_the_bytes_grown() -> None:
    polls = [
        br.Poll(0.0, False, None, 100),
        br.Poll(0.5, False, None, 100),
        br.Poll(1.0, True, None, 150),  # start; bytes counted from the poll before (100)
        br.Poll(1.5, True, None, 5_000),
        br.Poll(2.0, False, None, 9_000),  # between transitions: not the end yet
        br.Poll(2.5, False, "normal", 10_100),  # end
        br.Poll(3.0, False, "normal", 10_200),
    ]
    assert br.window(polls) == (1.0, 2.5, 10_000)


def test_window_counts_from_the_first_poll_when_it_already_sees_a_transition() -> None:
    polls = [br.Poll(0.0, True, None, 40), br.Poll(2.0, True, "normal", 240)]
    assert br.window(polls) == (0.0, 2.0, 200)


def test_no_window_without_a_transition_or_without_normal() -> None:
    assert br.window([]) is None
    assert br.window([br.Poll(0.0, False, "normal", 0)]) is None
    assert br.window([br.Poll(0.0, True, None, 0), br.Poll(1.0, False, None, 9)]) is None


def test_rates_and_an_empty_window() -> None:
    per_s, mb_s = br.rates(3_000, 6_000_000, 4.0)
    assert per_s == pytest.approx(750.0)
    assert mb_s == pytest.approx(1.5)
    assert all(math.isnan(v) for v in br.rates(3_000, 6_000_000, 0.0))
    assert all(math.isnan(v) for v in br.rates(3_000, 6_000_000, math.nan))


def test_percentiles_are_nearest_rank_in_ms() -> None:
    samples = [i / 1000 for i in range(1, 101)]  # 1..100 ms
    assert br.percentile_ms(samples, 50) == pytest.approx(50.0)
    assert br.percentile_ms(samples, 99) == pytest.approx(99.0)
    assert br.percentile_ms([0.004], 99) == pytest.approx(4.0)
    assert math.isnan(br.percentile_ms([], 50))


def test_figures_carry_the_outcome() -> None:
    out = br.Outcome(10_000, 20.0, rest_latencies_s=[0.002] * 10, move_latencies_s=[0.01] * 10)
    out.stream_s, out.moved_contexts, out.streamed_bytes = 5.0, 7_500, 12_500_000
    out.rotation_s = 40.0
    by_label = {label: value for label, value, _ in br.figures(out)}
    assert by_label["load rate (contexts/s)"] == pytest.approx(500.0)
    assert by_label["rebalance rate (contexts/s)"] == pytest.approx(1_500.0)
    assert by_label["rebalance rate (MB/s streamed)"] == pytest.approx(2.5)
    assert by_label["put p50 at rest, 1 writer (ms)"] == pytest.approx(2.0)
    assert by_label["put p99 during rebalance, 1 writer (ms)"] == pytest.approx(10.0)
    assert by_label["cluster-wide rotation of 10,000 contexts (s)"] == pytest.approx(40.0)
    assert by_label["rotation rate (contexts/s)"] == pytest.approx(250.0)
    counts = [label for label, _, count in br.figures(out) if count]
    assert counts == ["rebalance on join: contexts moved to the new node"]


def test_figures_without_a_rotation_are_nan_not_an_error() -> None:
    by_label = {label: value for label, value, _ in br.figures(br.Outcome(100, 1.0))}
    assert math.isnan(by_label["rotation rate (contexts/s)"])
    assert math.isnan(by_label["rebalance rate (contexts/s)"])
    assert math.isnan(by_label["put p50 during rebalance, 1 writer (ms)"])


def test_loaded_values_are_distinct_and_about_the_value_size() -> None:
    values = [br.fields(k) for k in range(200)]
    bodies = {v["summary"] + v["content"] for v in values}
    assert len(bodies) == 200
    assert all(abs(len(b) - br.VALUE_BYTES) <= 2 for b in bodies)
    assert br.load_address(7) != br.write_address(7)


def test_the_next_node_name_follows_the_highest_number() -> None:
    assert br.next_name(["node1", "node2", "node3"]) == "node4"
    assert br.next_name(["node3", "node10", "other"]) == "node11"
