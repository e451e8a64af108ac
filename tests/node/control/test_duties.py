"""node.control.duties: which leader duties are due, and resumption after a leader change."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from node.control.duties import DutyAction, due, next_due_ms
from node.control.metadata import (
    ClusterMetadata,
    apply,
    cmd_duty_finished,
    cmd_duty_progress,
    cmd_duty_started,
)
from tests.node.control.metadata_fixtures import three_node_state

ALL = ["compaction", "rotation_check", "ttl_sweep"]


def run(state: ClusterMetadata, *commands: bytes) -> ClusterMetadata:
    for data in commands:
        state, result = apply(state, state.applied_index + 1, data)
        assert result.ok, result.error
    return state


def test_never_started_duties_are_due_at_once_in_name_order() -> None:
    assert due(three_node_state(), 0, 1) == [DutyAction(name, "start") for name in ALL]
    assert next_due_ms(three_node_state(), 1) == 0


def test_a_finished_duty_is_due_again_one_interval_after_its_start() -> None:
    state = run(
        three_node_state(),
        cmd_duty_started("ttl_sweep", 2, 10_000),
        cmd_duty_finished("ttl_sweep", 2, 15_000, True, ""),
    )
    names = [a.name for a in due(state, 69_999, 2)]
    assert "ttl_sweep" not in names
    assert DutyAction("ttl_sweep", "start") in due(state, 70_000, 2)
    assert DutyAction("ttl_sweep", "start") in due(state, 70_000, 3)  # any later leader too


def test_a_duty_running_under_the_current_term_is_not_due() -> None:
    state = run(three_node_state(), cmd_duty_started("compaction", 2, 0))
    assert "compaction" not in [a.name for a in due(state, 10**12, 2)]


def test_a_new_leader_resumes_a_duty_from_the_cursor_its_predecessor_logged() -> None:
    state = run(
        three_node_state(),
        cmd_duty_started("rotation_check", 2, 1_000),
        cmd_duty_progress("rotation_check", 2, b"role=observer/after=k17"),
    )
    # the term-2 leader is gone; the term-3 leader sees the duty left running
    action = DutyAction("rotation_check", "resume", b"role=observer/after=k17")
    assert action in due(state, 1_001, 3)
    state, result = apply(
        state, state.applied_index + 1, cmd_duty_started("rotation_check", 3, 1_001)
    )
    assert result.value == "resume"
    assert "rotation_check" not in [a.name for a in due(state, 1_002, 3)]
    state = run(state, cmd_duty_finished("rotation_check", 3, 2_000, True, "ok"))
    assert "rotation_check" not in [a.name for a in due(state, 1_000 + 3_599_999, 3)]
    assert DutyAction("rotation_check", "start") in due(state, 1_000 + 3_600_000, 3)


def test_an_old_leader_still_acting_sees_nothing_to_resume() -> None:
    state = run(three_node_state(), cmd_duty_started("compaction", 5, 0))
    assert "compaction" not in [a.name for a in due(state, 10**9, 4)]


def test_next_due_is_the_earliest_start_or_none_when_all_run_here() -> None:
    state = three_node_state()
    for name in ALL:
        state = run(state, cmd_duty_started(name, 2, 1_000))
    assert next_due_ms(state, 2) is None
    assert next_due_ms(state, 3) == 0
    state = run(state, cmd_duty_finished("ttl_sweep", 2, 1_500, True, ""))
    assert next_due_ms(state, 2) == 61_000


@settings(max_examples=100, deadline=None, derandomize=True)
@given(st.integers(0, 10**7), st.integers(1, 5), st.integers(0, 10**7), st.integers(1, 5))
def test_due_agrees_with_next_due(started: int, run_term: int, now: int, term: int) -> None:
    """A duty is due at ``now`` exactly when next_due_ms(term) <= now."""
    state = run(
        three_node_state(),
        cmd_duty_started("ttl_sweep", run_term, started),
        cmd_duty_finished("ttl_sweep", run_term, started, True, ""),
        cmd_duty_started("compaction", run_term, started),
        cmd_duty_started("rotation_check", run_term, started),
        cmd_duty_finished("rotation_check", run_term, started, True, ""),
    )
    soonest = next_due_ms(state, term)
    assert bool(due(state, now, term)) == (soonest is not None and soonest <= now)
