"""The index-lag phase of ``scripts/bench cluster`` (scripts/bench_index_lag.py): its pure
parts, without a cluster.

Invariants checked: a probe word is letters only (tokenised whole) and distinct per (run,
key); a record holds its probe word and is about VALUE_BYTES long; percentiles are
nearest-rank; the figures carry the outcome's numbers (ms for visibility, NaN when no probe
answered).
"""

from __future__ import annotations

import math

from tests.bench_scripts import load_script

lag = load_script("bench_index_lag")


def test_probe_words_are_letters_and_distinct() -> None:
    words = {lag.probe_word(run, key) for run in (1, 2, 99_999) for key in range(2_000)}
    assert len(words) == 3 * 2_000
    assert all(word.isalpha() and word.islower() for word in words)


def test_a_record_holds_its_probe_word() -> None:
    record = lag.fields(7, 123)
    assert record["content"].split()[-1] == lag.probe_word(7, 123)
    size = len(record["summary"]) + len(record["content"])
    assert abs(size - lag.VALUE_BYTES) < 64
    assert lag.fields(7, 123) == record  # reproducible


def test_percentile_is_nearest_rank() -> None:
    assert lag.percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.0
    assert lag.percentile([3.0, 1.0, 2.0, 4.0], 99) == 4.0
    assert math.isnan(lag.percentile([], 50))


def test_figures_carry_the_outcome() -> None:
    out = lag.Outcome(seconds=4.0, puts=200, visible_s=[0.5, 0.25, 1.0], missing=1,
                      lag_s=[0.0, 0.75, 0.5], pending=[0, 12, 3])  # fmt: skip
    got = {label: value for label, value, _ in lag.figures(out)}
    assert got[f"index lag phase: puts/s, {lag.WRITERS} writers for 4 s"] == 50.0
    assert got["search sees an acknowledged put after, p50 (ms)"] == 500.0
    assert got["search sees an acknowledged put after, max (ms)"] == 1000.0
    assert got["probes not searchable within 10 s"] == 1.0
    assert got["node.status index.lag_s under load, max (s)"] == 0.75
    assert got["node.status index.pending under load, max (contexts)"] == 12.0
    empty = {label: value for label, value, _ in lag.figures(lag.Outcome(seconds=1.0))}
    assert math.isnan(empty["search sees an acknowledged put after, p50 (ms)"])
