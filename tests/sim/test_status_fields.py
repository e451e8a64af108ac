"""Simulation tier: ``node.status`` backlog/antientropy fields and /metrics tell the same truth.

Checked: with no status source registered the figures are null (never invented); a
registered source's figures appear unchanged in ``node.status`` and in the exported
metrics; a broken source makes its figures null without failing ``node.status``; and
``repair_pending`` counts a read repair exactly while it is in flight.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from node.cluster.antientropy_service import AntiEntropyConfig
from node.cluster.handoff_plan import HandoffConfig
from node.cluster.replication import Quorum
from node.cluster.service import Dialer
from node.daemon.exporter import MetricsExporter
from node.daemon.metrics import FEEDERS, NodeMetrics
from tests.sim.harness import open_sim_cluster

ADDRESS = "ucxl://claude:backend_developer@sim:status/*^/doc.md"
HANDOFF = {"hints": 4, "hint_bytes": 4096, "hints_dropped": 1, "hints_delivered": 9}
ANTIENTROPY = {
    "last_pass_age_s": 12.5,
    "versions_repaired": 3,
    "passes": 2,
    "bytes_sent": 700,
    "bytes_received": 800,
}
# what the daemon's RPC wrapper, membership sync and backup service feed; the exporter
# feeds the rest
ELSEWHERE = {"observe_request", "bad_frame", "tls_failure", "set_connections_open",
             "set_members", "set_index_documents", "set_backup"}  # fmt: skip
EXPORTER_FED = {name for name, method in FEEDERS.items() if method not in ELSEWHERE}


def samples(metrics: NodeMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = metrics.render().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_unregistered_sources_are_null(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_sim_cluster(tmp_path, size=1, quorum=Quorum(1, 1, 1)) as sim:
        sim.nodes["n1"].service.status_sources.clear()  # as if no subsystem had registered
        answer = await sim.call("n1", "node.status", {})
        assert answer["backlog"] == {"hints": None, "hint_bytes": None, "repair_pending": 0}
        assert answer["antientropy"] == {"last_pass_age_s": None, "versions_repaired": None}
        assert answer["contexts"] == 0
        metrics = NodeMetrics()
        MetricsExporter(
            metrics, sim.nodes["n1"].service, tmp_path, clock=trio.current_time
        ).export()
        names = {name for name, _ in samples(metrics)}
        assert "slurp_hints" not in names
        assert "slurp_antientropy_last_pass_age_seconds" not in names
        assert ("slurp_repair_pending", ()) in samples(metrics)


CONTROL = {
    "role": "leader", "term": 4, "leader": "n1", "admin_key_held": True,
    "raft": {"commit_index": 9, "applied_index": 8, "elections": 2},
}  # fmt: skip
REBALANCE = {
    "epoch": 3, "in_transition": True, "contexts_left": 5, "bytes_left": 4096,
    "pending_ranges": 7, "streamed_bytes": 1234,
}  # fmt: skip


async def test_sources_reach_status_and_metrics_alike(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_sim_cluster(tmp_path, size=1, quorum=Quorum(1, 1, 1)) as sim:
        service = sim.nodes["n1"].service
        service.status_sources["handoff"] = lambda: dict(HANDOFF)
        service.status_sources["antientropy"] = lambda: dict(ANTIENTROPY)
        service.status_fields.append(lambda: dict(CONTROL))
        service.status_fields.append(lambda: {"rebalance": dict(REBALANCE)})
        await sim.call("n1", "ctx.put", {"address": ADDRESS, "record": {"summary": "x"}})
        answer = await sim.call("n1", "node.status", {})
        assert {key: answer[key] for key in CONTROL} == CONTROL
        assert answer["backlog"] == {"hints": 4, "hint_bytes": 4096, "repair_pending": 0}
        assert answer["antientropy"] == {"last_pass_age_s": 12.5, "versions_repaired": 3}
        assert answer["contexts"] == 1

        metrics = NodeMetrics()
        MetricsExporter(metrics, service, tmp_path, clock=trio.current_time).export()
        got = samples(metrics)
        assert got[("slurp_hints", ())] == answer["backlog"]["hints"]
        assert got[("slurp_hint_bytes", ())] == answer["backlog"]["hint_bytes"]
        assert got[("slurp_repair_pending", ())] == answer["backlog"]["repair_pending"]
        assert got[("slurp_hints_dropped_total", ())] == HANDOFF["hints_dropped"]
        assert got[("slurp_hints_delivered_total", ())] == HANDOFF["hints_delivered"]
        age = answer["antientropy"]["last_pass_age_s"]
        assert got[("slurp_antientropy_last_pass_age_seconds", ())] == age
        repaired = answer["antientropy"]["versions_repaired"]
        assert got[("slurp_antientropy_versions_repaired_total", ())] == repaired
        assert got[("slurp_antientropy_bytes_total", (("direction", "sent"),))] == 700
        assert got[("slurp_antientropy_bytes_total", (("direction", "received"),))] == 800
        assert got[("slurp_store_contexts", ())] == answer["contexts"]
        assert got[("slurp_is_leader", ())] == 1
        assert got[("slurp_term", ())] == answer["term"]
        assert got[("slurp_admin_key_held", ())] == 1
        assert got[("slurp_elections_total", ())] == answer["raft"]["elections"]
        assert got[("slurp_raft_commit_index", ())] == answer["raft"]["commit_index"]
        assert got[("slurp_raft_applied_index", ())] == answer["raft"]["applied_index"]
        assert got[("slurp_replication_acks_total", (("outcome", "ok"),))] == 1
        assert answer["rebalance"] == REBALANCE
        assert got[("slurp_rebalance_pending_ranges", ())] == REBALANCE["pending_ranges"]
        assert got[("slurp_rebalance_bytes_left", ())] == REBALANCE["bytes_left"]
        assert got[("slurp_rebalance_streamed_bytes_total", ())] == REBALANCE["streamed_bytes"]
        # with every source registered, one pass feeds every metric the exporter owns
        text = metrics.render().decode()
        present = {family.name for family in text_string_to_metric_families(text)}
        assert {name.removesuffix("_total") for name in EXPORTER_FED} <= present


async def test_broken_sources_are_null_and_status_still_answers(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    def broken() -> dict[str, Any]:
        raise RuntimeError("source bug")

    async with open_sim_cluster(tmp_path, size=1, quorum=Quorum(1, 1, 1)) as sim:
        service = sim.nodes["n1"].service
        service.status_sources["handoff"] = broken
        service.status_sources["antientropy"] = lambda: {
            "last_pass_age_s": "soon", "versions_repaired": -1,
        }  # fmt: skip
        answer = await sim.call("n1", "node.status", {})
        assert answer["backlog"] == {"hints": None, "hint_bytes": None, "repair_pending": 0}
        assert answer["antientropy"] == {"last_pass_age_s": None, "versions_repaired": None}
        metrics = NodeMetrics()
        MetricsExporter(metrics, service, tmp_path, clock=trio.current_time).export()
        assert not any(name.startswith("slurp_hint") for name, _ in samples(metrics))


async def until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Poll ``condition`` on the (mock) clock; fail after ``timeout_s``."""
    for _ in range(int(timeout_s / 0.1)):
        if condition():
            return
        await trio.sleep(0.1)
    raise AssertionError(f"not true after {timeout_s} s")


class GatedDialer:
    """Holds every ``rep.store`` until ``release`` is set (read repair is such a send)."""

    def __init__(self, inner: Dialer) -> None:
        self.inner = inner
        self.release = trio.Event()

    async def call(
        self, name: str, method: str, body: dict[str, Any], *, timeout_s: float
    ) -> dict[str, Any]:
        if method == "rep.store":
            await self.release.wait()
        return await self.inner.call(name, method, body, timeout_s=timeout_s)


async def test_repair_pending_counts_repairs_in_flight(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    handoff, healer = HandoffConfig(enabled=False), AntiEntropyConfig(enabled=False)
    # only read repair heals n3
    async with open_sim_cluster(tmp_path, seed=7, handoff=handoff, antientropy=healer) as sim:
        n1, n3 = sim.nodes["n1"], sim.nodes["n3"]
        sim.network.partition(["n3"], ["n1", "n2"])
        await sim.call("n1", "ctx.put", {"address": ADDRESS, "record": {"summary": "v1"}})
        sim.network.heal()
        await until(lambda: n1.cluster.is_up("n3"))  # failure detection sees n3 again
        assert n3.store.versions.count_contexts() == 0
        gate = GatedDialer(n1.service.dialer)
        n1.service.dialer = gate
        await sim.call("n1", "ctx.get", {"address": ADDRESS, "r": 3})
        status = await sim.call("n1", "node.status", {})
        assert status["backlog"]["repair_pending"] == 1  # n3 lacked the version
        gate.release.set()
        await until(lambda: n1.service.repair_pending == 0)
        status = await sim.call("n1", "node.status", {})
        assert status["backlog"]["repair_pending"] == 0
        assert n3.store.versions.count_contexts() == 1  # the repair arrived
