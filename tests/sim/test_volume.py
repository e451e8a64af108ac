"""CI volume of the simulation tier: 1,000 seeded random schedules, every invariant each.

The same runner as ``scripts/sim``; a failure names the seed and the one-line replay
command. The count and the speed are printed in pytest's terminal summary.
"""

from __future__ import annotations

import io
import logging

import pytest

from tests.sim.conftest import SCHEDULES_RUN
from tests.sim.run import run_many

CI_SCHEDULES = 1000


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
