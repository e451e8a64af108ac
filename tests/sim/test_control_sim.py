"""The control plane in the simulation: the invariants of ``tests.sim.control_model``
catch planted violations, and the engine's control steps do what they say."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import trio
import trio.testing

from node.control.custody import AdminCustody
from tests.sim import engine
from tests.sim.control_model import (
    ControlRecord,
    CustodySample,
    EndState,
    end_state,
    fenced_verdict,
)
from tests.sim.engine import Simulation
from tests.sim.schedule import FencedOrder, Heal, KillLeader, Partition, Put, Schedule, Sleep

# -- the pure record ------------------------------------------------------------------------


def test_two_leaders_in_one_term_are_caught_but_one_leader_per_term_is_fine() -> None:
    record = ControlRecord()
    record.leader("n1", 2)
    record.leader("n1", 2)  # told twice
    record.leader("n2", 3)
    assert record.problems == []
    record.leader("n3", 3)
    assert record.problems == ["two leaders in term 3: ['n2', 'n3']"]


def test_applied_entries_must_agree_across_nodes_and_lives_and_come_in_order() -> None:
    record = ControlRecord()
    for node in ("n1", "n2"):
        for index in (2, 3):
            record.apply(node, 1, index, 2, f"d{index}")
    record.apply("n1", 2, 2, 2, "d2")  # a restart re-applies the same entries
    record.apply("n1", 2, 3, 2, "d3")
    assert record.problems == []
    record.apply("n3", 1, 2, 3, "d2")  # another term at index 2
    record.apply("n2", 1, 5, 2, "d5")  # 4 skipped
    record.apply("n2", 2, 9, 2, "d9")  # a new life starting past what it applied
    assert len(record.problems) == 3
    assert "applied (term 3, data d2) at index 2" in record.problems[0]
    assert "out of order" in record.problems[1]
    assert "entries were skipped" in record.problems[2]


def test_custody_samples_catch_two_holders_a_stale_hold_and_a_hidden_key() -> None:
    good = {
        "n1": CustodySample(4, True, 4, True),
        "n2": CustodySample(None, False, None, False),
    }
    record = ControlRecord()
    record.sample(good)
    assert record.problems == []
    record.sample({**good, "n2": CustodySample(None, True, 3, True)})
    record.sample({**good, "n2": CustodySample(None, False, None, True)})
    record.sample({**good, "n1": CustodySample(5, True, 4, True)})
    assert record.problems == [
        "the admin identity is held by ['n1', 'n2'] at once",
        "n2 holds the admin identity for term 3 while its leader term is None",
        "n2: custody says held=False but the keyring holds the admin identity",
        "n1 holds the admin identity for term 4 while its leader term is 5",
    ]


def test_the_end_state_needs_one_known_leader_holding_the_key_with_every_entry() -> None:
    record = ControlRecord()
    record.apply("n2", 1, 2, 2, "x")
    good = {
        "n1": EndState(3, "n1", True, 3, 2),
        "n2": EndState(None, "n1", False, None, 2),
    }
    assert end_state(record, good) == []
    assert "not one" in end_state(record, {**good, "n2": EndState(3, "n2", False, None, 2)})[0]
    assert (
        "these nodes know {'n2': None}"
        in end_state(record, {**good, "n2": EndState(None, None, False, None, 2)})[0]
    )
    assert (
        "does not hold" in end_state(record, {**good, "n1": EndState(3, "n1", False, None, 2)})[0]
    )
    assert "lost entries" in end_state(record, {**good, "n1": EndState(3, "n1", True, 3, 1)})[0]
    holder = EndState(None, "n1", False, None, 2, custody_epoch=2, holder=True, share_epochs=(2,))
    assert end_state(record, {**good, "n2": holder}) == []
    missing = replace(holder, share_epochs=())
    assert "no share file of it" in end_state(record, {**good, "n2": missing})[0]
    stale = replace(holder, holder=False, share_epochs=(0, 3))  # 3: a re-share in progress
    assert "retired epochs [0]" in end_state(record, {**good, "n2": stale})[0]


@pytest.mark.parametrize(
    ("refused", "floor", "stale", "bad"),
    [
        (True, 5, True, False),
        (False, 5, True, True),  # a stale order obeyed
        (False, 4, False, False),
        (True, 4, False, True),  # the leader's order refused by a node that saw no newer term
        (True, 6, False, False),  # refused: the receiver moved on meanwhile
    ],
)
def test_fenced_verdicts(refused: bool, floor: int, stale: bool, bad: bool) -> None:
    assert (fenced_verdict(4, refused, floor, stale=stale) is not None) is bad


# -- the engine -----------------------------------------------------------------------------


async def _run(tmp_path: Path, *steps: object) -> tuple[Simulation, list[str]]:
    sim = Simulation(tmp_path, Schedule(3, 5, tuple(steps)), engine.EXTRA_SERVICES)  # type: ignore[arg-type]
    return sim, await sim.run()


async def test_killing_the_leader_elects_another_which_takes_the_admin_key(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    sim, problems = await _run(
        tmp_path, Sleep(1.5), KillLeader(0.5), Sleep(1.5), Put("n1", 0), FencedOrder("n2"),
        Sleep(0.5),
    )  # fmt: skip
    assert problems == []
    record = sim.control.record
    assert len({min(nodes) for nodes in record.leaders.values()}) >= 2  # another one led
    assert sum(node.lives for node in sim.nodes.values()) == 4  # the killed one came back
    assert record.fenced_checks >= 2 + 3  # the step's and the final orders
    assert record.samples > 100
    assert record.applied  # each leader's no-op at least


async def test_a_key_kept_past_the_lease_is_caught(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Custody that never wipes: whichever node leads is cut off in turn, its lease lapses
    and it keeps the key: the sampler reports it."""
    monkeypatch.setattr(AdminCustody, "_wipe", lambda self, why: None)
    _, problems = await _run(
        tmp_path, Sleep(1.5), Partition(("n1",)), Sleep(1.5), Partition(("n2",)), Sleep(1.5),
        Partition(("n3",)), Sleep(1.5), Heal(),
    )  # fmt: skip
    assert any("while its leader term is None" in p for p in problems), problems
