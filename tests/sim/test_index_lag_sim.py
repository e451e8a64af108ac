"""Simulation tier: replicated writes reach the index off the acknowledgement path.

Checked: a cluster write leaves the written context queued on every replica (``node.status``
``index`` and ``/metrics`` show it), and a search past ``index_refresh_s`` drains the queue
before it answers, and so sees the write. The index queues read trio's mock clock here
(the harness's stores keep the wall clock for their version ids).
"""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from node.daemon.exporter import MetricsExporter
from node.daemon.metrics import NodeMetrics
from tests.sim.harness import open_sim_cluster
from tests.sim.node_parts import sim_clock_ms

ADDRESS = "ucxl://claude:backend_developer@sim:lag/*^/doc.md"


def gauges(metrics: NodeMetrics) -> dict[str, float]:
    text = metrics.render().decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}


async def test_a_write_is_queued_then_searchable_within_the_bound(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_sim_cluster(tmp_path, seed=3) as sim:
        for node in sim.nodes.values():
            node.store.index._clock_ms = sim_clock_ms  # sim-only reach-in: the mock clock
        record = {"summary": "lyrebird"}
        await sim.call("n1", "ctx.put", {"address": ADDRESS, "record": record})
        await trio.sleep(0.5)  # every replica has it (W=2 acknowledged; the third follows)
        for name, node in sim.nodes.items():
            status = await sim.call(name, "node.status", {})
            assert status["index"]["pending"] == 1, name
            # one put, one rep.store frame to each of the 3 replicas (n1's own copy included)
            sent = {"frames": 3, "puts": 3, "largest_frame": 1} if name == "n1" else None
            assert status["store_batches"] == (sent or {"frames": 0, "puts": 0, "largest_frame": 0})
            assert 0.5 <= status["index"]["lag_s"] < 1.0, name
            metrics = NodeMetrics()
            MetricsExporter(metrics, node.service, tmp_path, clock=trio.current_time).export()
            got = gauges(metrics)
            assert got["slurp_index_pending"] == 1
            assert got["slurp_index_lag_seconds"] == node.store.index.lag()["lag_s"]
            sealed_here = 1 if name == "n1" else 0  # the coordinator sealed the one record
            assert got["slurp_records_sealed_total"] == sealed_here, name
            assert got["slurp_data_keys_issued_total"] == sealed_here, name
        assert (await sim.call("n2", "ctx.search", body()))["hits"] == []  # not yet due
        refresh_s = sim.nodes["n1"].store.config.index.refresh_interval_s
        await trio.sleep(refresh_s)  # past the freshness bound: a search drains first
        hits = (await sim.call("n2", "ctx.search", body()))["hits"]
        assert [hit["context"] for hit in hits] == [ADDRESS]
        status = await sim.call("n2", "node.status", {})
        assert status["index"]["pending"] == 0


def body() -> dict[str, object]:
    return {"query": "lyrebird", "project": None, "task": None, "tags": [], "as_role": None,
            "limit": 10}  # fmt: skip
