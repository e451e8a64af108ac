"""``ControlService.on_change`` fires when the leader's lease lapses, not only at step-down.

Three real ``ControlService``s over the simulation's in-memory cluster
(``tests.sim.harness``), bootstrapped from one snapshot as ``node.daemon.cluster_init``
does, under trio's autojumping ``MockClock``. Custody relies on ``on_change`` to wipe the
admin identity the moment ``leader_term()`` stops being its term (``Leadership``: "called
after role/term/leader/lease changes"); a lease lapses at ``lease_ratio * election_ticks``
ticks without a quorum, before check-quorum steps the leader down.
"""

from __future__ import annotations

import random
from pathlib import Path

import trio
import trio.testing

from node.control.bootstrap import cluster_snapshot, key_epochs_of, member_of
from node.control.log_store import write_bootstrap
from node.control.raft_types import Role
from node.control.service import ControlConfig, ControlService
from tests.sim.harness import open_sim_cluster

CONFIG = ControlConfig(tick_s=0.05, heartbeat_ticks=1, election_ticks=10, election_jitter_ticks=10)


async def test_a_lapsing_lease_is_announced_while_still_in_the_leader_role(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_sim_cluster(tmp_path) as sim:
        names = sorted(sim.nodes)
        stores = [sim.nodes[name].store for name in names]
        founding = [
            member_of(s.keyring, n, "127.0.0.1", 0) for n, s in zip(names, stores, strict=True)
        ]
        snapshot = cluster_snapshot(
            founding, None, key_epochs_of(stores[0].keyring), cluster_id="t"
        )
        for store in stores:
            write_bootstrap(store.kv, snapshot)
        controls = {
            name: ControlService(
                sim.nodes[name].service, CONFIG, rng=random.Random(name), clock_ms=lambda: 0
            )
            for name in names
        }
        seen: list[tuple[int | None, Role | None]] = []
        async with trio.open_nursery() as nursery:
            for control in controls.values():
                await nursery.start(control.run)
            with trio.fail_after(10):
                while not any(c.leader_term() is not None for c in controls.values()):  # noqa: ASYNC110
                    await trio.sleep(CONFIG.tick_s)
            leader = next(n for n, c in controls.items() if c.leader_term() is not None)
            mine = controls[leader]
            mine.on_change.append(lambda: seen.append((mine.leader_term(), mine.role())))
            sim.network.partition([leader], [n for n in names if n != leader])
            with trio.fail_after(10):
                while mine.role() is Role.LEADER:  # noqa: ASYNC110
                    await trio.sleep(CONFIG.tick_s / 5)
            nursery.cancel_scope.cancel()
    # the lapse was announced on its own, while the node still had the leader role
    assert (None, Role.LEADER) in seen
    assert seen[-1][1] is not Role.LEADER  # and then it stepped down
