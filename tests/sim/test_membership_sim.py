"""Membership changes in the simulation: the generator's mix, the pure checks, and whole
schedules that join, decommission and forget nodes under the real control plane."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from tests.sim import engine, model
from tests.sim.schedule import (
    CLIENT_STEPS,
    MEMBERSHIP_STEPS,
    Crash,
    Decommission,
    DiskFail,
    Faults,
    Forget,
    Join,
    Put,
    Restart,
    Schedule,
    Sleep,
    Step,
    random_schedule,
)


@pytest.fixture(autouse=True)
def _quiet_logs() -> Iterator[None]:
    logging.disable(logging.CRITICAL)  # nodes log expected faults; invariants decide
    yield
    logging.disable(logging.NOTSET)


# -- the generator ------------------------------------------------------------------------


def test_about_one_schedule_in_four_changes_membership_join_first() -> None:
    schedules = [random_schedule(seed, 3) for seed in range(400)]
    changing = [s for s in schedules if s.changes]
    assert 60 <= len(changing) <= 140
    for schedule in changing:
        changes = [step for step in schedule.steps if isinstance(step, MEMBERSHIP_STEPS)]
        assert isinstance(changes[0], Join)
        assert changes[0].node == "n4"
        assert 1 <= len(changes) <= 3
        joined = {"n1", "n2", "n3"}
        for step in schedule.steps:  # client steps address founders and joined spares only
            if isinstance(step, Join):
                joined.add(step.node)
            elif isinstance(step, (*CLIENT_STEPS, Decommission, Forget)):
                assert step.node in joined, schedule.describe()
    assert random_schedule(7, 3) == random_schedule(7, 3)
    assert not random_schedule(7, 3, spares=0).changes


def test_schedules_without_changes_keep_their_steps() -> None:
    """Changes draw from their own stream: a schedule without one is as before."""
    for seed in range(40):
        plain = random_schedule(seed, 3, spares=0)
        mixed = random_schedule(seed, 3)
        if not mixed.changes:
            assert mixed.steps == plain.steps


# -- the pure checks ------------------------------------------------------------------------


def snap(versions: dict[int, set[str]]) -> model.NodeSnapshot:
    return model.NodeSnapshot(versions=versions, purge_upto={ctx: None for ctx in versions})


def test_settled_names_members_still_moving() -> None:
    assert model.settled({"n1": "normal", "n4": "normal"}) == []
    [problem] = model.settled({"n1": "normal", "n4": "joining", "n2": "leaving"})
    assert "n4" in problem
    assert "n2" in problem


def test_exact_replicas_wants_the_owners_and_nobody_else() -> None:
    owners = {0: ["n1", "n3", "n4"], 1: ["n1", "n2", "n3"]}
    good = {"n1": snap({0: {"a"}, 1: set()}), "n2": snap({0: set(), 1: set()}),
            "n3": snap({0: {"a"}, 1: set()}), "n4": snap({0: {"a"}, 1: set()})}  # fmt: skip
    assert model.exact_replicas(owners, good) == []  # ctx 1 held nowhere: nothing to say
    extra = {**good, "n2": snap({0: {"a"}, 1: set()})}
    [problem] = model.exact_replicas(owners, extra)
    assert "ctx 0" in problem
    assert "'n2'" in problem
    short = {**good, "n4": snap({0: set(), 1: set()})}
    assert len(model.exact_replicas(owners, short)) == 1


def test_drop_problems_wants_every_owner_to_hold_or_have_purged() -> None:
    held = {"n1": ({"v1", "v2"}, None), "n3": ({"v2"}, "v1")}  # n3 purged up to v1
    assert model.drop_problems("n2", "ctx", {"v1", "v2"}, held) == []
    [problem] = model.drop_problems("n2", "ctx", {"v1", "v2", "v3"}, {"n1": held["n1"]})
    assert "n2 dropped ctx" in problem
    assert "n1" in problem
    assert "v3" in problem


# -- whole schedules ----------------------------------------------------------------------


def run(steps: list[Step], seed: int) -> tuple[list[str], engine.Simulation]:
    schedule = Schedule(3, seed, tuple(steps), spares=2)
    trio._core._run._r.seed(seed)
    made: list[engine.Simulation] = []

    async def main(root: Path) -> list[str]:
        sim = engine.Simulation(root, schedule, engine.EXTRA_SERVICES)
        made.append(sim)
        return await sim.run()

    import tempfile

    with tempfile.TemporaryDirectory(prefix="slurp-sim-") as tmp:
        problems = trio.run(main, Path(tmp), clock=trio.testing.MockClock(autojump_threshold=0))
    return problems, made[0]


WRITES: list[Step] = [Put("n1", 0), Put("n2", 1), Put("n3", 2), Sleep(0.3)]


def test_a_join_then_a_decommission_settle_with_n_replicas() -> None:
    steps = [*WRITES, Join("n4"), Put("n2", 0), Sleep(0.6), Put("n4", 1), Put("n3", 2),
             Sleep(1.2), Decommission("n1"), Put("n2", 1), Sleep(0.6), Put("n3", 0)]  # fmt: skip
    problems, sim = run(steps, 3)
    assert problems == []
    outcomes = dict(sim.history.changes)
    assert outcomes["add n4"].startswith("ok")
    assert outcomes["remove n1"].startswith("ok")
    assert sim.final == ["n2", "n3", "n4"]
    assert sum(1 for put in sim.history.puts if put.version_id) >= 6


def test_a_forgotten_founder_stays_down_and_the_survivors_restore_n() -> None:
    steps = [*WRITES, Join("n4"), Put("n1", 0), Sleep(1.2), Put("n4", 2), Sleep(1.2),
             Forget("n1"), Put("n2", 1), Sleep(0.6), Put("n3", 0)]  # fmt: skip
    problems, sim = run(steps, 5)
    assert problems == []
    assert dict(sim.history.changes)["forget n1"].startswith("ok")
    assert sim.forgotten == {"n1"}
    assert sim.nodes["n1"].lives == 1  # not restarted by the quiet period
    assert sim.final == ["n2", "n3", "n4"]


def test_a_change_that_would_leave_fewer_than_n_members_is_skipped() -> None:
    problems, sim = run([*WRITES, Decommission("n2"), Forget("n3"), Sleep(0.6)], 9)
    assert problems == []
    outcomes = dict(sim.history.changes)
    assert outcomes["remove n2"].startswith("skipped")
    assert outcomes["forget n3"].startswith("skipped")
    assert sim.forgotten == set()  # n3 was never crashed
    assert sim.final == ["n1", "n2", "n3"]


def test_a_node_halted_while_a_member_joined_follows_that_member_as_leader() -> None:
    """Seed 7029's first 12 steps: n3's control plane halts (a failed disk) before n4
    joins; in the quiet period n3 restarts with metadata that does not list n4, and n4
    leads. n3 must take n4's Raft messages (its node certificate proves its name) and
    answer them, or it never catches up and n4 never becomes normal."""
    steps: list[Step] = [Restart("n1"), DiskFail("n3", True), Join("n4"), Sleep(1.2), Restart("n2"),
             Faults(0.0, 0.1, 0.05), Forget("n3"), Put("n4", 0), Crash("n2"), Put("n3", 1),
             Forget("n1"), Put("n3", 1)]  # fmt: skip
    problems, sim = run(steps, 7029)
    assert problems == []
    assert dict(sim.history.changes)["add n4"].startswith("ok")
    assert sim.nodes["n3"].lives == 2  # restarted after its control plane halted
    assert sim.final == ["n1", "n2", "n3", "n4"]
    last_term = max(sim.control.record.leaders)
    assert sim.control.record.leaders[last_term] == {"n4"}


def test_a_spare_whose_disk_fails_before_its_first_start_does_not_break_the_engine() -> None:
    """Seeds 9050 and 9135: the join starts in the background, so ``DiskFail(n4)`` lands
    before n4's first start. Its store must already hold the storage format row, as
    ``slurp init`` writes it; it held none, and opening the store raised out of the engine."""
    steps: list[Step] = [*WRITES, Join("n4"), DiskFail("n4", True), Sleep(1.2), Put("n1", 0)]
    problems, sim = run(steps, 11)
    assert problems == []
    assert sim.nodes["n4"].lives >= 1
    assert sim.nodes["n4"].disk_failures >= 1  # it did start on the failing disk


def test_a_restart_right_after_a_join_does_not_start_the_spare_twice() -> None:
    """Sim seed 273 (``--membership``): ``Restart(n5)`` came while ``Join(n5)`` was
    starting the spare; seeing it not running yet, the restart started a second life
    beside the first ("n5 is already serving": the node stopped by itself). A start now
    waits for one under way."""
    steps = [Join("n4"), Restart("n4"), *WRITES, Put("n4", 0), Sleep(0.6)]
    problems, sim = run(steps, 0)  # seed 0 interleaves them that way (273 did not, here)
    assert problems == []
    assert sim.nodes["n4"].lives == 1  # the join's start; the restart found it running
    assert not sim.nodes["n4"].failures
    assert dict(sim.history.changes)["add n4"].startswith("ok")
