"""Hypothesis stateful testing of the simulated cluster: rules are client operations and
nemesis steps, so a failing schedule shrinks to a minimal one.

The rules build a schedule; ``teardown`` runs it on a fresh cluster under trio's mock
clock and asserts every invariant (``tests.sim.model``). Hypothesis shrinks the rule
sequence, i.e. the schedule, and prints the minimal one.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, rule

from tests.sim.engine import run_schedule_sync
from tests.sim.schedule import (
    CONTEXTS,
    Block,
    Crash,
    CrashMidWrite,
    DiskFail,
    Faults,
    FencedOrder,
    Get,
    Heal,
    KillLeader,
    Partition,
    Purge,
    Put,
    Restart,
    Schedule,
    Sleep,
    Step,
    node_names,
)

NAMES = node_names(3)
nodes = st.sampled_from(NAMES)
contexts = st.integers(0, CONTEXTS - 1)


class ClusterMachine(RuleBasedStateMachine):
    """Every acknowledged write survives any sequence of operations and faults."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[Step] = []

    @rule(node=nodes, ctx=contexts)
    def put(self, node: str, ctx: int) -> None:
        self.steps += [Put(node, ctx), Sleep(0.01)]

    @rule(node=nodes, ctx=contexts)
    def get(self, node: str, ctx: int) -> None:
        self.steps += [Get(node, ctx), Sleep(0.01)]

    @rule(node=nodes, ctx=contexts)
    def purge(self, node: str, ctx: int) -> None:
        self.steps.append(Purge(node, ctx))

    @rule(seconds=st.sampled_from([0.1, 0.6, 1.2]))
    def sleep(self, seconds: float) -> None:
        self.steps.append(Sleep(seconds))

    @rule(node=nodes)
    def crash(self, node: str) -> None:
        self.steps.append(Crash(node))

    @rule(node=nodes)
    def restart(self, node: str) -> None:
        self.steps.append(Restart(node))

    @rule(node=nodes, ctx=contexts, sends=st.integers(0, 1))
    def crash_mid_write(self, node: str, ctx: int, sends: int) -> None:
        self.steps.append(CrashMidWrite(node, ctx, sends))

    @rule(src=nodes, dst=nodes)
    def block(self, src: str, dst: str) -> None:
        if src != dst:
            self.steps.append(Block(src, dst))

    @rule(node=nodes)
    def partition(self, node: str) -> None:
        self.steps.append(Partition((node,)))

    @rule()
    def heal(self) -> None:
        self.steps.append(Heal())

    @rule(
        drop=st.sampled_from([0.0, 0.05, 0.2]),
        duplicate=st.sampled_from([0.0, 0.1]),
        delay=st.sampled_from([0.0, 0.02]),
    )
    def faults(self, drop: float, duplicate: float, delay: float) -> None:
        self.steps.append(Faults(drop, duplicate, delay))

    @rule(node=nodes, failing=st.booleans())
    def disk(self, node: str, failing: bool) -> None:
        self.steps.append(DiskFail(node, failing))

    @rule(after=st.sampled_from([0.3, 1.0]))
    def kill_leader(self, after: float) -> None:
        self.steps.append(KillLeader(after))

    @rule(node=nodes)
    def fenced_order(self, node: str) -> None:
        self.steps.append(FencedOrder(node))

    def teardown(self) -> None:
        schedule = Schedule(3, 0, tuple(self.steps))
        problems = run_schedule_sync(schedule)
        assert not problems, "\n".join([*problems, schedule.describe()])


ClusterMachine.TestCase.settings = settings(
    max_examples=25,
    stateful_step_count=20,
    deadline=None,
    derandomize=True,  # a fixed example sequence: CI runs are reproducible
    suppress_health_check=[HealthCheck.too_slow],
)
test_cluster_machine = ClusterMachine.TestCase
