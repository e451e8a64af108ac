"""The simulation engine: each nemesis step does what it says, the invariants catch
planted violations, and a seed replays the same run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from tests.sim import engine, model
from tests.sim.engine import SimNodeContext, Simulation
from tests.sim.schedule import (
    Block,
    Crash,
    CrashMidWrite,
    DiskFail,
    Get,
    Put,
    Restart,
    Schedule,
    Sleep,
    random_schedule,
)


async def _run(tmp_path: Path, *steps: Any, **kwargs: Any) -> tuple[Simulation, list[str]]:
    sim = Simulation(
        tmp_path, Schedule(3, 7, tuple(steps)), kwargs.get("extra", engine.EXTRA_SERVICES)
    )
    return sim, await sim.run()


def _acked(sim: Simulation) -> list[model.PutRecord]:
    return [put for put in sim.history.puts if put.version_id is not None]


async def test_writes_survive_a_crash_and_restart_of_every_node(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Durable KV survives a crash; the restarted cluster serves what was acknowledged."""
    sim, problems = await _run(
        tmp_path, Put("n1", 0), Put("n2", 1), Sleep(0.1),
        Crash("n1"), Crash("n2"), Crash("n3"), Restart("n1"), Restart("n2"), Restart("n3"),
        Sleep(1.0), Get("n3", 0), Sleep(0.1),
    )  # fmt: skip
    assert problems == []
    assert len(_acked(sim)) == 2
    assert [node.lives for node in sim.nodes.values()] == [2, 2, 2]
    assert [read.summary for read in sim.history.reads] == ["w1"]


async def test_a_full_disk_fails_that_replica_only_and_the_node_keeps_serving(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """n1's writes fail: puts through n1 still reach W=2 on n2 and n3; n1 never stops."""
    sim, problems = await _run(
        tmp_path, DiskFail("n1", True), Put("n1", 0), Put("n1", 1), Put("n1", 2), Sleep(0.5)
    )
    assert problems == []
    assert sim.nodes["n1"].disk_failures >= 1
    # the data path kept serving; its control plane halted on the failed Raft log write
    # (never retried: fsyncgate) and the quiet period restarted the node, as an operator would
    assert sim.nodes["n1"].lives == 2
    assert sim.nodes["n1"].failures == []
    assert len(_acked(sim)) == 3


@pytest.mark.parametrize("sends", [0, 1])
async def test_a_coordinator_dying_mid_write_loses_no_acknowledged_write(
    tmp_path: Path, sends: int, autojump_clock: trio.testing.MockClock
) -> None:
    """The coordinator dies after ``sends`` replica sends; the put is not acknowledged."""
    sim, problems = await _run(
        tmp_path, Put("n2", 0), Sleep(0.1), CrashMidWrite("n1", 0, sends), Sleep(0.5)
    )
    assert problems == []
    assert sim.nodes["n1"].lives == 2  # died mid-write, restarted for the quiet period
    assert sim.history.puts[1].version_id is None


async def test_a_one_way_block_is_survived(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """n1 cannot reach n2 (n2 still reaches n1): writes through either still succeed."""
    sim, problems = await _run(
        tmp_path, Block("n1", "n2"), Sleep(1.0), Put("n1", 0), Put("n2", 0), Sleep(0.5)
    )
    assert problems == []
    assert len(_acked(sim)) == 2


async def test_extra_services_start_with_every_life_of_a_node(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The integrator's hook: a factory per node, started again after each restart."""
    started: list[str] = []

    class Probe:
        def __init__(self, ctx: SimNodeContext) -> None:
            self.name = ctx.name
            assert ctx.store is ctx.service.store

        async def run(
            self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
        ) -> None:
            started.append(self.name)
            task_status.started()
            await trio.sleep_forever()

    _, problems = await _run(tmp_path, Crash("n2"), Restart("n2"), extra=[Probe])
    assert problems == []
    assert sorted(started) == ["n1", "n2", "n2", "n3"]


async def test_a_write_tracker_token_never_ended_is_a_violation(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Planted: n2 begins a write and never ends it (a leak that would hold its
    epoch_seen back); the check after the quiet period names it. The real writes of the
    schedule all ended."""

    class Leak:
        def __init__(self, ctx: SimNodeContext) -> None:
            self.service = ctx.service

        async def run(
            self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
        ) -> None:
            if self.service.name == "n2":
                self.service.writes.begin(0)
            task_status.started()
            await trio.sleep_forever()

    sim, problems = await _run(
        tmp_path, Put("n1", 0), Put("n2", 1), Sleep(0.5), extra=[*engine.EXTRA_SERVICES, Leak]
    )
    assert problems == ["n2 counts 1 writes in flight after the quiet period"]
    assert len(_acked(sim)) == 2


def test_a_seed_replays_the_same_run() -> None:
    """Two runs of one schedule see the same outcome of every operation."""

    def outcomes(seed: int) -> list[tuple[str, str | None, str | None]]:
        schedule = random_schedule(seed, 3)
        seen: list[tuple[str, str | None, str | None]] = []

        async def main() -> None:
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                sim = Simulation(Path(tmp), schedule, engine.EXTRA_SERVICES)
                assert await sim.run() == []
                seen.extend((p.summary, p.version_id, p.error) for p in sim.history.puts)

        trio._core._run._r.seed(seed)
        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
        return seen

    for seed in (3, 11):
        first = outcomes(seed)
        assert any(version for _, version, _ in first), f"seed={seed}: nothing acknowledged"
        assert outcomes(seed) == first, f"seed={seed}"


async def test_replicas_converge_after_a_quiet_period(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write made while n3 is down reaches n3 after the quiet period, with no reads."""
    monkeypatch.setattr(engine, "CONVERGENCE_REQUIRED", True)
    _, problems = await _run(tmp_path, Crash("n3"), Put("n1", 0), Put("n2", 1), Sleep(0.5))
    assert problems == []


# -- the invariants themselves, on planted histories ---------------------------------------


def _history() -> model.History:
    history = model.History()
    history.puts.append(model.PutRecord(0, "w1", start=1, end=2, version_id="a1"))
    history.puts.append(model.PutRecord(0, "w2", start=3, end=4, version_id="a2"))
    history.tick = 4
    return history


def test_a_lost_acknowledged_write_is_reported() -> None:
    history = _history()
    nodes = {"n1": model.NodeSnapshot({0: {"a1", "a2"}}), "n2": model.NodeSnapshot({0: {"a1"}})}
    assert model.acked_writes_kept(history, nodes) == [
        "acknowledged write w2 (a2) of ctx 0 is held by ['n1'], fewer than W=2"
    ]
    history.purges.append(model.PurgeRecord(0, start=5))  # unfinished purge: may remove it
    assert model.acked_writes_kept(history, nodes) == []


def test_a_read_of_something_never_written_or_purged_or_stale_is_reported() -> None:
    history = _history()
    history.reads.append(model.ReadRecord(0, "n1", 5, 6, "w9", "a9"))
    history.reads.append(model.ReadRecord(0, "n1", 5, 6, "w1", "a1"))  # older than w2's ack
    history.purges.append(model.PurgeRecord(0, start=7, end=8, acked=True))
    history.reads.append(model.ReadRecord(0, "n2", 9, 10, "w2", "a2"))  # purged at 8
    problems = model.reads_were_written(history)
    assert len(problems) == 3, problems
    assert "never written" in problems[0]
    assert "older than a2" in problems[1]
    assert "purged before the read began" in problems[2]


def test_purged_versions_back_on_a_store_are_reported() -> None:
    history = _history()
    history.purges.append(model.PurgeRecord(0, start=5, end=6, acked=True))
    history.tick = 6
    nodes = {
        "n1": model.NodeSnapshot({0: {"a2"}}, {0: "b"}),  # applied the purge, holds a2: bad
        "n2": model.NodeSnapshot({0: {"a1"}}, {0: None}),  # missed the purge
    }
    assert model.purged_stay_purged(history, nodes, everywhere=False) == [
        "purged version a2 of ctx 0 is back on n1"
    ]
    assert len(model.purged_stay_purged(history, nodes, everywhere=True)) == 2


def test_diverged_replicas_are_reported() -> None:
    nodes = {
        "n1": model.NodeSnapshot({0: {"a1"}}, {0: None}),
        "n2": model.NodeSnapshot({0: {"a1"}}, {0: None}),
        "n3": model.NodeSnapshot({0: set()}, {0: None}),
    }
    assert model.converged({0: ["n1", "n2"]}, nodes) == []
    assert len(model.converged({0: ["n1", "n2", "n3"]}, nodes)) == 1
