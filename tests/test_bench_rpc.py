"""``scripts/bench rpc`` (scripts/bench_rpc.py): its table from given passes, and one short
real run of both servers (child processes, mutual TLS on 127.0.0.1).

Invariants checked: each figure is the median over the rounds, every ratio is slurp / raw
of the medians, both in-flight levels are reported; a real run measures every (kind,
in flight) once per round, with positive CPU and call rates.
"""

from __future__ import annotations

from tests.bench_scripts import load_script

load_script("bench_report")  # bench_rpc imports it by name, as scripts/bench runs it
br = load_script("bench_rpc")


def test_the_table_holds_medians_and_their_ratios() -> None:
    results = {
        ("slurp", 1): [br.Pass(300, 290, 900), br.Pass(500, 510, 700), br.Pass(310, 300, 800)],
        ("raw", 1): [br.Pass(200, 210, 1500), br.Pass(150, 150, 2000), br.Pass(180, 190, 1800)],
        ("slurp", 16): [br.Pass(100, 110, 3000)],
        ("raw", 16): [br.Pass(80, 88, 4000)],
    }
    table = br.render(results, "header", "footer")
    assert "| 1 | server CPU per call | 310 µs | 180 µs | 1.72x |" in table
    assert "| 1 | client CPU per call | 300 µs | 190 µs | 1.58x |" in table
    assert "| 1 | calls/s (wall) | 800 /s | 1,800 /s | 0.44x |" in table
    assert "| 16 | server CPU per call | 100 µs | 80 µs | 1.25x |" in table
    assert "| 16 | client CPU per call | 110 µs | 88 µs | 1.25x |" in table
    assert table.splitlines()[2] == "header"
    assert table.splitlines()[-1] == "footer"


def test_a_short_real_run_measures_every_kind_and_level() -> None:
    results = br.run_bench(calls=40, rounds=1)
    assert sorted(results) == sorted((k, n) for k in br.KINDS for n in br.IN_FLIGHT)
    for passes in results.values():
        assert len(passes) == 1
        assert passes[0].client_us > 0
        assert passes[0].calls_per_s > 0
        assert passes[0].server_us >= 0  # 10 ms ticks: a short pass may see none
