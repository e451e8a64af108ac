"""Real tier: no request, peer answer or record stops a node (three node processes).

Invariants checked: the largest record at each validation limit, stored through one node,
reads back intact through another (it replicates, nothing exceeds the frame limit); a
flood beyond ``max_inflight_requests`` is refused with UCXL-503-UNAVAILABLE "busy" while
the node keeps serving; a peer answering garbage to every replica method fails only that
replica, so W=2/R=2 requests still succeed through the other two and the garbage is
counted as malformed answers, never as internal errors.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from crypto.tls import TlsFiles
from node.daemon.ops import ClusterError, LocalNode, cluster_down, cluster_up, start_node
from node.errors import RemoteError
from node.rpc.transport import Peer, RpcServer, open_rpc_client
from tests.node.largest_records import BUILDERS
from tests.node.test_real_cluster import members_of, tls

pytestmark = pytest.mark.slow
SEED = 4193500
INFLIGHT_LIMIT = 4
BASE = "ucxl://claude:backend_developer@chorus:limits/*^/"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("faults")
    cluster_up(root, 3, timeout_s=120)
    try:
        node1 = members_of(root)[0]
        os.kill(node1.pid, signal.SIGTERM)  # node1 again, with a small in-flight limit
        config = root / "node1" / "node.toml"
        text = config.read_text().replace(
            "max_inflight_requests = 256", f"max_inflight_requests = {INFLIGHT_LIMIT}", 1
        )
        assert f"max_inflight_requests = {INFLIGHT_LIMIT}" in text
        config.write_text(text)
        trio.run(_wait_port_free, node1.rpc_port)
        for _ in range(100):  # until the stopped process has exited
            try:
                start_node(root, "node1", timeout_s=60)
                break
            except ClusterError as exc:
                if "already running" not in str(exc):
                    raise
                time.sleep(0.2)
        trio.run(_wait_all_up, root)
        yield root
    finally:
        cluster_down(root)


async def _wait_port_free(port: int) -> None:
    with trio.fail_after(30):
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                return
            await stream.aclose()
            await trio.sleep(0.2)


async def _wait_all_up(root: Path) -> None:
    with trio.fail_after(60):
        while True:
            status = await call(members_of(root)[0], tls(root), "node.status", {})
            if len(status["members"]) == 3 and all(m["up"] for m in status["members"]):
                return
            await trio.sleep(0.5)


async def call(node: LocalNode, files: TlsFiles, method: str, body: dict[str, Any]) -> Any:
    async with open_rpc_client("127.0.0.1", node.rpc_port, files, connect_timeout_s=10) as c:
        return await c.call(method, body, timeout_s=60)


def _plain(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


@pytest.mark.parametrize("limit", sorted(BUILDERS))
async def test_the_largest_record_at_each_limit_replicates_and_reads_back(
    cluster: Path, limit: str
) -> None:
    n1, n2, _ = members_of(cluster)
    fields = BUILDERS[limit](random.Random(SEED))
    address = f"{BASE}{limit}.bin"
    ref = await call(n1, tls(cluster), "ctx.put", {"address": address, "record": fields})
    got = (await call(n2, tls(cluster), "ctx.get", {"address": address, "r": 2}))["version"]
    assert got["version_id"] == ref["ref"]["version_id"]
    for name, value in fields.items():
        where = got if name in got and name != "fields" else got["fields"]
        if name == "ttl":
            continue
        assert _plain(where[name]) == _plain(value), name


async def test_a_flood_is_refused_busy_and_the_node_keeps_serving(cluster: Path) -> None:
    n1 = members_of(cluster)[0]
    files = tls(cluster)
    content = random.Random(SEED).randbytes(512 * 1024)
    outcomes: list[str] = []

    async with open_rpc_client("127.0.0.1", n1.rpc_port, files, connect_timeout_s=10) as client:

        async def one(i: int) -> None:
            body = {"address": f"{BASE}flood/{i}.bin", "record": {"content": content}}
            try:
                await client.call("ctx.put", body, timeout_s=60)
                outcomes.append("ok")
            except RemoteError as exc:
                busy = exc.code == "UCXL-503-UNAVAILABLE" and "busy" in exc.message
                outcomes.append("busy" if busy else f"unexpected {exc}")

        async with trio.open_nursery() as nursery:
            for i in range(40):
                nursery.start_soon(one, i)

    assert set(outcomes) == {"busy", "ok"}
    status = await call(n1, files, "node.status", {})
    assert status["faults"]["refused_busy"] >= outcomes.count("busy")
    assert status["faults"]["internal_errors"] == 0
    assert status["inflight"] == {"client": 0, "replica": 0}
    await call(n1, files, "ctx.put", {"address": f"{BASE}after-flood", "record": {}})


async def _garbage(peer: Peer, method: str, body: dict[str, Any]) -> dict[str, Any]:
    answers: dict[str, dict[str, Any]] = {
        "rep.ping": {"name": "node3"},
        "rep.store": {"stored": "all of them", "heads": []},
        "rep.versions": {"envelopes": [["not-an-id", b"\x93junk"]], "purge": b"\xc1"},
        "rep.head": {"latest": 42},
        "rep.heads": {"contexts": [{"context": 1}]},
        "rep.search": {"hits": "none"},
        "rep.purge": {"removed": "all"},
    }
    return answers.get(method, {"what": None})


async def test_a_peer_answering_garbage_fails_only_that_replica(cluster: Path) -> None:
    n1, n2, n3 = members_of(cluster)
    files = tls(cluster)
    os.kill(n3.pid, signal.SIGKILL)
    await _wait_port_free(n3.rpc_port)
    impostor = TlsFiles(
        ca_cert=cluster / "ca" / "ca.crt", cert=cluster / "ca" / "node3.crt",
        key=cluster / "ca" / "node3.key", crl=cluster / "ca" / "ca.crl",
    )  # fmt: skip
    address = f"{BASE}garbage-peer"
    async with trio.open_nursery() as nursery:
        await nursery.start(RpcServer(_garbage, impostor, "127.0.0.1", n3.rpc_port).run)
        with trio.fail_after(60):  # failure detection sees node3 answer pings again
            while True:
                status = await call(n1, files, "node.status", {})
                if all(m["up"] for m in status["members"]):
                    break
                await trio.sleep(0.5)
        before = status["faults"]["malformed_answers"]
        written = 0
        with trio.fail_after(120):  # every request succeeds while node3 answers garbage
            while written < 3 or status["faults"]["malformed_answers"] == before:
                body = {"address": address, "record": {"summary": f"v{written}"}, "w": 2}
                ref = await call(n1, files, "ctx.put", body)
                got = await call(n1, files, "ctx.get", {"address": address, "r": 2})
                assert got["version"]["version_id"] == ref["ref"]["version_id"]
                assert got["version"]["fields"]["summary"] == f"v{written}"
                written += 1
                listing = await call(n1, files, "ctx.ls", {"pattern": address})
                assert [info["context"] for info in listing["contexts"]] != []
                status = await call(n1, files, "node.status", {})
        history = await call(n2, files, "ctx.history", {"address": address, "r": 2})
        assert len(history["history"]) == written
        assert status["faults"]["malformed_answers"] > before
        assert status["faults"]["internal_errors"] == 0
        nursery.cancel_scope.cancel()
