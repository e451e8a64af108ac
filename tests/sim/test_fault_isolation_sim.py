"""Requests are parsed before they run; after parsing, a bug answers 500 and stops nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from node.cluster.replication import Merged
from node.errors import RemoteError
from tests.sim.harness import open_sim_cluster

A = "ucxl://claude:backend_developer@chorus:faults/*^/a.md"


@pytest.mark.parametrize(
    ("method", "body", "field"),
    [
        ("ctx.put", {"address": 7, "record": {}}, "address"),
        ("ctx.put", {"address": A, "record": {"summary": 3}}, "summary"),
        ("ctx.put", {"address": A, "record": {}, "w": "two"}, "w"),
        ("ctx.put", {"address": A, "record": {}, "w": 9}, "w"),
        ("ctx.put_batch", {"items": "nope"}, "items"),
        ("ctx.get", {"address": A, "r": 0}, "r"),
        ("ctx.get_batch", {"addresses": [1]}, "addresses"),
        ("ctx.search", {"query": "x", "tags": "t"}, "tags"),
        ("ctx.ls", {}, "pattern"),
        ("ctx.nothing", {}, "method"),
    ],
)
async def test_bad_input_answers_400_naming_the_field(
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    method: str,
    body: dict[str, Any],
    field: str,
) -> None:
    async with open_sim_cluster(tmp_path) as sim:
        with pytest.raises(RemoteError) as caught:
            await sim.call("n1", method, body)
        assert caught.value.code == "UCXL-400-INVALID_PAYLOAD"
        assert caught.value.field == field
        await sim.call("n1", "ctx.put", {"address": A, "record": {"summary": "still serving"}})


@pytest.mark.parametrize(
    ("method", "body", "field"),
    [
        ("rep.tree", {}, "partitions"),
        ("rep.tree", {"partitions": ["x"]}, "partitions"),
        ("rep.tree", {"partitions": [10**9]}, "partitions"),  # outside the tree
        ("rep.digests", {"segments": [[0]]}, "segments"),
        ("rep.ids", {"contexts": [7]}, "contexts"),
        ("rep.fetch", {"context": "nope", "ids": []}, "context"),
        ("rep.hint", {"target": "", "context": "x", "envelopes": []}, "target"),
        ("rep.hint", {"target": "n3", "context": "x", "envelopes": []}, "context"),
    ],
)
async def test_bad_replica_bodies_of_handoff_and_anti_entropy_answer_400(
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    method: str,
    body: dict[str, Any],
    field: str,
) -> None:
    """Their bodies are parsed like every other method's: the caller's fault, never a 500."""
    async with open_sim_cluster(tmp_path) as sim:
        async with sim.network.open_client("n2", "n1") as peer:  # a cluster node's identity
            with pytest.raises(RemoteError) as caught:
                await peer.call(method, body, timeout_s=1)
        assert caught.value.code == "UCXL-400-INVALID_PAYLOAD"
        assert caught.value.field == field
        assert sim.nodes["n1"].service.faults.internal_errors == {}


async def test_an_internal_bug_answers_500_is_counted_and_the_node_keeps_serving(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_sim_cluster(tmp_path) as sim:
        await sim.call("n1", "ctx.put", {"address": A, "record": {"summary": "v1"}})
        service = sim.nodes["n1"].service

        def broken_repair(ctx: Any, merged: Merged) -> None:
            raise KeyError("a bug of ours")

        monkeypatch.setattr(service, "_repair", broken_repair)
        with pytest.raises(RemoteError) as caught:
            await sim.call("n1", "ctx.get", {"address": A})
        assert caught.value.code == "UCXL-500-INTERNAL"
        assert service.faults.internal_errors == {"ctx.get": 1}
        monkeypatch.undo()
        got = await sim.call("n1", "ctx.get", {"address": A})
        assert got["version"]["fields"]["summary"] == "v1"


async def test_a_bug_in_one_replica_attempt_fails_only_that_replica(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A TypeError while handling one replica's answer fails that replica, not the node."""
    async with open_sim_cluster(tmp_path) as sim:
        service = sim.nodes["n1"].service
        real_on = service.fanout.on

        async def flaky_on(node: str, method: str, body: Any, local: Any) -> Any:
            if node == "n3" and method == "rep.store":
                raise TypeError("a bug while talking to n3")
            return await real_on(node, method, body, local)

        monkeypatch.setattr(service.fanout, "on", flaky_on)
        ref = await sim.call("n1", "ctx.put", {"address": A, "record": {"summary": "ok"}})
        assert ref["ref"]["version"] == 1
        await trio.sleep(5)
        assert service.faults.internal_errors.get("write") == 1
        status = await sim.call("n1", "node.status", {})
        assert status["faults"]["internal_errors"] == 1
