"""A write after a purge sorts after it, whatever the coordinator's clock says.

The purge marker covers every version id up to its ``upto``, which comes from the purging
node's hybrid logical clock. A later write coordinated by a node whose clock is behind
would get a smaller id: the replicas would skip it as purged and, before this fix, still
report it as held, so an acknowledged write vanished. Now the coordinator learns the
marker's ``upto`` from ``rep.head`` and sorts its version after it, replicas that apply a
purge move their clocks past it, and a replica never reports a purged version as stored.
"""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing

from storage.address import parse
from storage.schema import PurgeMarker
from storage.versions import VersionId
from tests.sim.harness import open_sim_cluster

A = "ucxl://claude:backend_developer@sim:purge/*^/doc.md"
HOUR_MS = 3_600_000


async def test_a_write_after_a_purge_from_a_clock_ahead_is_kept(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_sim_cluster(tmp_path) as sim:
        await sim.call("n1", "ctx.put", {"address": A, "record": {"summary": "old"}})
        ctx = parse(A).context()
        now = sim.nodes["n1"].store.next_id()
        ahead = VersionId(now.wall_ms + HOUR_MS, 0, now.node)  # a purger an hour ahead
        marker = PurgeMarker(str(ahead), now.wall_ms + HOUR_MS, "n-ahead")
        for node in sim.nodes.values():
            node.service.replica.apply_purge(ctx, marker)
        for node in sim.nodes.values():  # replicas moved their clocks past the marker
            assert node.store.next_id() > ahead
        ref = (await sim.call("n2", "ctx.put", {"address": A, "record": {"summary": "new"}}))["ref"]
        assert VersionId.parse(ref["version_id"]) > ahead
        got = (await sim.call("n3", "ctx.get", {"address": A}))["version"]
        assert got["fields"]["summary"] == "new"


async def test_a_replica_never_reports_a_purged_version_as_stored(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_sim_cluster(tmp_path) as sim:
        ref = (await sim.call("n1", "ctx.put", {"address": A, "record": {"summary": "x"}}))["ref"]
        ctx = parse(A).context()
        n2 = sim.nodes["n2"]
        blob = n2.store.versions.version(ctx, ref["version_id"])
        assert blob is not None
        marker = PurgeMarker(ref["version_id"], 0, "test")
        n2.service.replica.apply_purge(ctx, marker)
        stored, _ = n2.service.replica.apply([blob])
        assert stored == [None]  # refused as purged, not "already held"
