"""``scripts/sim --jobs``: disjoint seed ranges in parallel processes, one total."""

from __future__ import annotations

import pytest

from tests.sim import run
from tests.sim.schedule import SPARES, random_schedule


def test_jobs_split_the_seeds_and_add_up(capsys: pytest.CaptureFixture[str]) -> None:
    assert run.main(["--schedules", "5", "--seed", "40", "--jobs", "2"]) == 0
    out = capsys.readouterr().out
    assert "3 schedules (3 nodes, seeds 40..42), 0 failed" in out
    assert "2 schedules (3 nodes, seeds 43..44), 0 failed" in out
    assert "5 schedules (3 nodes, seeds 40..44), 0 failed" in out


def test_changes_only_runs_the_schedules_that_change_membership(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Of seeds 0..7, only the schedules with a membership change run."""
    changing = [seed for seed in range(8) if random_schedule(seed, 3, spares=SPARES).changes]
    assert 0 < len(changing) < 8  # the filter has something to do
    assert run.changing_seeds(8, 0, 3) == changing
    assert run.main(["--schedules", "8", "--membership", "--changes-only"]) == 0
    assert f"{len(changing)} schedules (3 nodes, seeds 0..7), 0 failed" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        run.main(["--schedules", "8", "--changes-only"])  # needs --membership
    with pytest.raises(ValueError, match="membership"):
        run.run_many(1, 0, 3, changes_only=True)
