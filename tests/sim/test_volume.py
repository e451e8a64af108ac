"""CI volume of the simulation tier: 1,000 seeded random schedules, and a block of
membership schedules (join, decommission, forget mixed with the faults), every invariant
each.

The same runner as ``scripts/sim``; a failure names the seed and the one-line replay
command. The counts and the speeds are printed in pytest's terminal summary.
"""

from __future__ import annotations

import io
import logging

import pytest

from tests.sim.conftest import SCHEDULES_RUN
from tests.sim.run import changing_seeds, run_many

CI_SCHEDULES = 1000
# ``scripts/sim --membership --changes-only --seed 1000 --schedules 100``: of these seeds,
# the 28 schedules that change the membership (about 90 s on one busy core, measured:
# docs/simulation.md); the seeds without a change are plain random schedules, run above
MEMBERSHIP_FIRST_SEED = 1000
MEMBERSHIP_SEEDS = 100


@pytest.mark.slow
def test_a_thousand_random_schedules_keep_every_invariant() -> None:
    """No schedule of seeds 0..999 (3 nodes, every 10th threaded) breaks an invariant."""
    out = io.StringIO()
    logging.disable(logging.CRITICAL)
    try:
        summary = run_many(CI_SCHEDULES, 0, 3, out=out)
    finally:
        logging.disable(logging.NOTSET)
    SCHEDULES_RUN["random schedules"] = (
        f"{summary.schedules} run, {len(summary.failures)} failed, "
        f"{summary.per_minute:.0f} schedules/minute"
    )
    assert summary.schedules == CI_SCHEDULES
    assert not summary.failures, out.getvalue()


@pytest.mark.slow
def test_membership_schedules_keep_every_invariant() -> None:
    """No membership-changing schedule of seeds 1000..1099 breaks an invariant (every
    membership check included: settled, exactly N replicas, no early drop)."""
    expected = changing_seeds(MEMBERSHIP_SEEDS, MEMBERSHIP_FIRST_SEED, 3)
    assert len(expected) >= MEMBERSHIP_SEEDS // 5  # about one in four changes membership
    out = io.StringIO()
    logging.disable(logging.CRITICAL)
    try:
        summary = run_many(
            MEMBERSHIP_SEEDS, MEMBERSHIP_FIRST_SEED, 3, out=out,
            membership=True, changes_only=True,
        )  # fmt: skip
    finally:
        logging.disable(logging.NOTSET)
    SCHEDULES_RUN["membership schedules"] = (
        f"{summary.schedules} run, {len(summary.failures)} failed, "
        f"{summary.per_minute:.0f} schedules/minute"
    )
    assert summary.schedules == len(expected)
    assert not summary.failures, out.getvalue()
