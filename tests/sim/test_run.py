"""``scripts/sim --jobs``: disjoint seed ranges in parallel processes, one total."""

from __future__ import annotations

import pytest

from tests.sim import run


def test_jobs_split_the_seeds_and_add_up(capsys: pytest.CaptureFixture[str]) -> None:
    assert run.main(["--schedules", "5", "--seed", "40", "--jobs", "2"]) == 0
    out = capsys.readouterr().out
    assert "3 schedules (3 nodes, seeds 40..42), 0 failed" in out
    assert "2 schedules (3 nodes, seeds 43..44), 0 failed" in out
    assert "5 schedules (3 nodes, seeds 40..44), 0 failed" in out
