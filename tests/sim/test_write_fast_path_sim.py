"""The write fast path (issue 10): no read before a write, shared rep.store frames.

A put sends its versions straight to the replicas (no ``rep.head`` round trip first). The
one thing that round trip guarded, that a new version sorts after the newest purge marker,
now holds by a retry: a replica holding the marker refuses the version and names the
marker's ``upto``; the coordinator re-seals after it and sends once more. Concurrent puts
share one ``rep.store`` frame per replica, and each is acknowledged from its own flags.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from node.errors import RemoteError
from storage.address import parse
from storage.envelope import Envelope
from storage.schema import PurgeMarker
from storage.versions import VersionId
from tests.sim.harness import open_sim_cluster

A = "ucxl://claude:backend_developer@sim:fast/*^/doc.md"
HOUR_MS = 3_600_000


async def test_a_put_behind_a_purge_is_resealed_after_it_and_kept(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A coordinator whose clock is behind the replicas' purge marker still writes: the
    replicas refuse its first version as purged, it re-seals after ``upto`` and retries."""
    async with open_sim_cluster(tmp_path) as sim:
        await sim.call("n1", "ctx.put", {"address": A, "record": {"summary": "old"}})
        ctx = parse(A).context()
        now = sim.nodes["n2"].store.next_id()
        ahead = VersionId(now.wall_ms + HOUR_MS, 0, "purger")  # a purger an hour ahead
        marker = PurgeMarker(str(ahead), now.wall_ms + HOUR_MS, "purger")
        for name in ("n1", "n3"):  # W = 2 of 3 hold the marker; n2 (the coordinator) not
            sim.nodes[name].service.replica.apply_purge(ctx, marker)
        coordinator = sim.nodes["n2"]
        assert coordinator.store.next_id() < ahead  # its clock is behind the marker
        put = {"address": A, "record": {"summary": "new"}}
        ref = (await sim.call("n2", "ctx.put", put))["ref"]
        assert VersionId.parse(ref["version_id"]) > ahead
        assert coordinator.service.purge_retries == 1
        for name in ("n1", "n3"):
            got = (await sim.call(name, "ctx.get", {"address": A}))["version"]
            assert got["fields"]["summary"] == "new"
            assert got["version_id"] == ref["version_id"]
        # a second put needs no retry: the coordinator's clock moved past the marker
        await sim.call("n2", "ctx.put", {"address": A, "record": {"summary": "newer"}})
        assert coordinator.service.purge_retries == 1


async def test_a_put_asks_no_replica_before_writing(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """With the default quorum a put sends rep.store only, never rep.head."""
    async with open_sim_cluster(tmp_path) as sim:
        service = sim.nodes["n1"].service
        methods: list[str] = []
        real_on = service.fanout.on

        async def on(node: str, method: str, body: Any, local: Any) -> Any:
            methods.append(method)
            return await real_on(node, method, body, local)

        service.fanout.on = on  # type: ignore[method-assign]
        await sim.call("n1", "ctx.put", {"address": A, "record": {"summary": "one"}})
        ref = (await sim.call("n1", "ctx.put", {"address": A, "record": {"summary": "two"}}))["ref"]
        assert ref["version"] == 2
        assert "rep.head" not in methods
        assert "rep.store" in methods
        # with w = 1 the write quorum does not meet every purge quorum: it reads first
        await sim.call("n1", "ctx.put", {"address": A, "record": {"summary": "3"}, "w": 1})
        assert "rep.head" in methods


async def test_puts_sharing_a_frame_are_acknowledged_each_by_its_own_flags(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Three puts share frames; one replica refuses one put's version: with W = 3 that put
    fails and the other two succeed."""
    async with open_sim_cluster(tmp_path) as sim:
        n1, n3 = sim.nodes["n1"], sim.nodes["n3"]
        refused = parse(A.replace("doc.md", "b")).context().canonical()
        real_apply = n3.service.replica.apply

        def apply(blobs: Any) -> tuple[list[bool | None], dict[str, int]]:
            keep = [blob for blob in blobs if Envelope.decode(blob).context != refused]
            flags, heads = real_apply(keep)
            kept = iter(flags)
            out = [None if Envelope.decode(b).context == refused else next(kept) for b in blobs]
            return out, heads

        n3.service.replica.apply = apply  # type: ignore[method-assign]
        batcher = n1.service.store_batcher
        real_send = batcher._send
        gate, held = trio.Event(), set()

        async def gated(node: str, blobs: list[bytes]) -> dict[str, Any]:
            if node not in held:  # the first frame to each replica waits for the gate
                held.add(node)
                await gate.wait()
            return await real_send(node, blobs)

        batcher._send = gated
        results: dict[str, Any] = {}

        async def put(name: str) -> None:
            body = {"address": A.replace("doc.md", name), "record": {"summary": name}, "w": 3}
            try:
                results[name] = (await sim.call("n1", "ctx.put", body))["ref"]
            except RemoteError as exc:
                results[name] = exc

        async with trio.open_nursery() as nursery:
            nursery.start_soon(put, "first")
            await trio.testing.wait_all_tasks_blocked()
            for name in ("a", "b", "c"):
                nursery.start_soon(put, name)
            await trio.testing.wait_all_tasks_blocked()
            gate.set()
        assert batcher.stats.largest_frame == 3  # a, b and c went together
        assert results["a"]["version"] == 1
        assert results["c"]["version"] == 1
        assert isinstance(results["b"], RemoteError)
        assert results["b"].code == "UCXL-503-UNAVAILABLE"
        for name in ("a", "c"):
            ctx = parse(A.replace("doc.md", name)).context()
            for node in sim.nodes.values():
                assert node.store.versions.head(ctx) is not None
        assert n3.store.versions.head(parse(A.replace("doc.md", "b")).context()) is None


async def test_a_put_behind_a_purge_on_replicas_of_an_older_release_is_resealed_too(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replicas of an older release refuse a purged version without naming the marker's
    ``upto``: the coordinator asks their heads once (``rep.head`` names it) and retries."""
    async with open_sim_cluster(tmp_path) as sim:
        await sim.call("n1", "ctx.put", {"address": A, "record": {"summary": "old"}})
        ctx = parse(A).context()
        now = sim.nodes["n2"].store.next_id()
        ahead = VersionId(now.wall_ms + HOUR_MS, 0, "purger")
        marker = PurgeMarker(str(ahead), now.wall_ms + HOUR_MS, "purger")
        for name in ("n1", "n3"):
            sim.nodes[name].service.replica.apply_purge(ctx, marker)
            monkeypatch.setattr(sim.nodes[name].service.local, "_purged_refusals",
                                lambda blobs, stored: {})  # fmt: skip
        coordinator = sim.nodes["n2"]
        ref = await sim.call("n2", "ctx.put", {"address": A, "record": {"summary": "new"}})
        assert VersionId.parse(ref["ref"]["version_id"]) > ahead
        assert coordinator.service.purge_retries == 1
        got = (await sim.call("n1", "ctx.get", {"address": A}))["version"]
        assert got["version_id"] == ref["ref"]["version_id"]
