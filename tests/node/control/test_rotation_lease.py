"""A rotation duty survives its leader's lease lapsing for a moment (found by the real
rotation test, tests/node/test_real_rotation.py).

The run of a duty is cancelled whenever ``leader_term()`` stops naming its term, which a
lapsed lease does; when the lease came back in the same term nothing resumed the duty
(``duties.due`` resumes only duties of an older term), so the rotation stayed "running"
in the log with no driver, forever. Here ``ClusterRotation`` runs on three in-memory
nodes (``tests.sim.harness``) under a stand-in control plane whose lease the test
switches off halfway through the re-seal walk and on again; the rotation must finish.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pyrage
import pytest
import trio
import trio.testing

from crypto.seal_format import age_file_of
from node.cluster.service import NodeService
from node.control.fence import Fence
from node.control.metadata import ApplyResult, ClusterMetadata
from node.control.rotation import ClusterRotation
from node.control.rotation_plan import WalkCursor
from node.control.service import ControlService
from tests.node.control.test_rotation import BE, DUTY, NAMES, Log, _populate, _rows, _state
from tests.sim.harness import SimCluster, open_sim_cluster

TERM = 3


class Config:
    propose_timeout_s = 2.0


class StandInControl:
    """What ``ClusterRotation`` uses of a ``ControlService``, over a shared ``Log``; the
    test decides whether this node leads and whether its lease holds."""

    def __init__(self, service: NodeService, log: Log, *, leads: bool) -> None:
        self.service = service
        self.log = log
        self.lease = leads
        self.config = Config()
        self.on_change: list[Callable[[], None]] = []
        self.duty_handlers: dict[str, Any] = {}
        self.self_reviving: set[str] = set()
        self.after_propose: Callable[[], None] = lambda: None

    @property
    def metadata(self) -> ClusterMetadata:
        return self.log.state

    def leader_term(self) -> int | None:
        return TERM if self.lease else None

    def leader_name(self) -> str:
        return "n1"

    async def propose(self, data: bytes) -> ApplyResult:
        result = await self.log.propose(data)
        self.after_propose()
        return result

    def _clock_ms(self) -> int:
        return 1_800_000_000_000

    def set_lease(self, holds: bool) -> None:
        self.lease = holds
        for hook in list(self.on_change):
            hook()


def _rotations(
    sim: SimCluster, log: Log
) -> tuple[dict[str, StandInControl], dict[str, ClusterRotation]]:
    """Every node's stand-in control plane (n1 leads) and its rotation, walking in small
    steps (a long walk, so a lease can lapse in the middle of it)."""
    controls = {n: StandInControl(sim.nodes[n].service, log, leads=n == "n1") for n in NAMES}
    rotations = {}
    for name in NAMES:
        fence = Fence(sim.nodes[name].store.kv, lambda: 0)
        rotation = ClusterRotation(cast(ControlService, controls[name]), fence)
        rotation.member.batch_size, rotation.member.max_batches = 4, 1
        rotations[name] = rotation
    return controls, rotations


def _cursor(log: Log) -> WalkCursor | None:
    data = log.state.duties[DUTY].cursor
    return WalkCursor.decode(data) if data else None


async def test_a_lapsed_lease_in_the_same_term_does_not_orphan_the_rotation(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_sim_cluster(tmp_path / "nodes") as sim:
        await _populate(sim, 30)
        old = sim.nodes["n1"].store.keyring.current_identity(BE)
        log = Log(_state(sim))
        controls, rotations = _rotations(sim, log)
        leader = controls["n1"]

        def lapse_halfway() -> None:
            now = _cursor(log)
            if now is not None and now.phase == "reseal" and len(now.rows) == len(NAMES):
                leader.after_propose = lambda: None
                leader.set_lease(False)  # the lease lapses halfway through the walk

        leader.after_propose = lapse_halfway
        assert (await rotations["n1"].start(BE))["started"]
        await trio.sleep(10)
        assert not leader.lease
        stalled = _cursor(log)
        assert stalled is not None
        assert stalled.phase == "reseal"
        assert DUTY not in rotations["n1"]._driving
        await trio.sleep(10)
        assert _cursor(log) == stalled  # nobody drives it while the lease is out
        controls["n1"].set_lease(True)  # back, in the same term

        finished = trio.Event()
        leader.after_propose = lambda: None if log.state.duties[DUTY].running else finished.set()
        with trio.fail_after(300):
            await finished.wait()
        duty = log.state.duties[DUTY]
        assert duty.last_ok, duty.last_message
        assert log.state.key_epochs[BE].version == 2
        new = sim.nodes["n1"].store.keyring.current_identity(BE)
        checked = 0
        for name in NAMES:
            assert sim.nodes[name].store.keyring.rotation_in_progress(BE) is None
            for env in _rows(sim, name):
                if env.tombstone or BE not in env.readers:
                    continue
                checked += 1
                pyrage.decrypt(age_file_of(env.ciphertext), [new])
                with pytest.raises(pyrage.DecryptError):
                    pyrage.decrypt(age_file_of(env.ciphertext), [old])
        assert checked >= 20 * 2


async def test_a_lease_back_before_the_cancelled_run_unwound_still_revives_it(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The lease lapses and is back before the cancelled run has unwound (in a real node
    its member call runs in a thread that cannot be interrupted): the notice that the lease
    is back finds the duty still driven and does not revive it; the run must revive it
    itself once unwound. Its cancellation then comes out of the walk's nursery as an
    exception group, not a bare ``trio.Cancelled``."""
    async with open_sim_cluster(tmp_path / "nodes") as sim:
        await _populate(sim, 30)
        log = Log(_state(sim))
        controls, rotations = _rotations(sim, log)
        leader = controls["n1"]
        flickers = [0]

        def flicker_halfway() -> None:
            now = _cursor(log)
            if (
                not flickers[0]
                and now is not None
                and now.phase == "reseal"
                and len(now.rows) == len(NAMES)
            ):
                flickers[0] += 1
                leader.set_lease(False)  # the run is cancelled ...
                leader.set_lease(True)  # ... and the lease is back before it unwound

        finished = trio.Event()

        def watch() -> None:
            flicker_halfway()
            duty = log.state.duties.get(DUTY)
            if duty is not None and not duty.running and duty.last_finished_ms > 0:
                finished.set()

        leader.after_propose = watch
        assert (await rotations["n1"].start(BE))["started"]
        with trio.fail_after(300):
            await finished.wait()
        assert flickers[0] == 1
        duty = log.state.duties[DUTY]
        assert duty.last_ok, duty.last_message
        assert log.state.key_epochs[BE].version == 2
        for name in NAMES:
            assert sim.nodes[name].store.keyring.rotation_in_progress(BE) is None
