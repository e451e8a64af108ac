"""Real tier: three node processes started through the CLI's cluster tooling.

Invariants checked, not log lines: a write acknowledged through one node is readable
through another; with one node SIGKILLed, W=2/R=2 writes and reads keep succeeding; with
two down, writes fail with UCXL-503-UNAVAILABLE and no failed write ever shows up as a
success; a restarted node serves again; a client certificate from another CA is refused;
a client whose certificate lacks a role cannot read that role's records.
"""

from __future__ import annotations

import json
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from crypto.ca import CertificateAuthority
from crypto.tls import TlsFiles
from node.daemon.ops import LocalNode, cluster_down, cluster_up, start_node
from node.errors import PeerUnavailable, RemoteError
from node.rpc.transport import open_rpc_client

pytestmark = pytest.mark.slow
A = "ucxl://claude:backend_developer@chorus:auth/*^/src/auth/jwt.py"
OBS = "ucxl://claude:observer@chorus:auth/*^/README.md"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, list[LocalNode]]]:
    root = tmp_path_factory.mktemp("cluster")
    members = cluster_up(root, 3, timeout_s=90)
    try:
        yield root, members
    finally:
        cluster_down(root)


def tls(root: Path, name: str = "client", ca_dir: Path | None = None) -> TlsFiles:
    ca = ca_dir or root / "ca"
    return TlsFiles(
        ca_cert=root / "ca" / "ca.crt", cert=ca / f"{name}.crt", key=ca / f"{name}.key",
        crl=root / "ca" / "ca.crl",
    )  # fmt: skip


async def call(port: int, files: TlsFiles, method: str, body: dict[str, Any]) -> dict[str, Any]:
    async with open_rpc_client("127.0.0.1", port, files, connect_timeout_s=5) as client:
        return await client.call(method, body, timeout_s=10)


def put(summary: str) -> dict[str, Any]:
    return {"address": A, "record": {"summary": summary}}


def members_of(root: Path) -> list[LocalNode]:
    return [LocalNode(**item) for item in json.loads((root / "cluster.json").read_text())]


async def test_cluster_scenario(cluster: tuple[Path, list[LocalNode]]) -> None:
    root, _ = cluster
    n1, n2, n3 = members_of(root)
    files = tls(root)
    acked: list[str] = []

    first = await call(n1.rpc_port, files, "ctx.put", put("v1"))
    acked.append(first["ref"]["version_id"])
    got = await call(n2.rpc_port, files, "ctx.get", {"address": A})
    assert got["version"]["fields"]["summary"] == "v1"
    assert got["version"]["version_id"] == acked[0]

    os.kill(n3.pid, signal.SIGKILL)  # one node down: W=2 and R=2 still reachable
    for i in range(3):
        answer = await call(n1.rpc_port, files, "ctx.put", {**put(f"one-down {i}"), "w": 2})
        acked.append(answer["ref"]["version_id"])
        got = await call(n2.rpc_port, files, "ctx.get", {"address": A, "r": 2})
        assert got["version"]["fields"]["summary"] == f"one-down {i}"

    os.kill(n2.pid, signal.SIGKILL)  # two down: no quorum
    with pytest.raises(RemoteError) as caught:
        await call(n1.rpc_port, files, "ctx.put", put("two-down"))
    assert caught.value.code == "UCXL-503-UNAVAILABLE"

    start_node(root, "node2")
    start_node(root, "node3")
    await trio.sleep(3)  # failure detection marks them up again
    history = await call(members_of(root)[1].rpc_port, files, "ctx.history", {"address": A})
    ids = [entry["version_id"] for entry in history["history"]]
    assert set(acked) <= set(ids), "an acknowledged write was lost"
    got = await call(members_of(root)[2].rpc_port, files, "ctx.get", {"address": A})
    assert got["version"]["version_id"] in ids


async def test_foreign_ca_client_is_refused(
    cluster: tuple[Path, list[LocalNode]], tmp_path: Path
) -> None:
    root, _members = cluster
    rogue = CertificateAuthority.init(tmp_path / "rogue")
    rogue.issue_client("mallory", ["admin"])
    files = TlsFiles(
        ca_cert=root / "ca" / "ca.crt", cert=tmp_path / "rogue" / "mallory.crt",
        key=tmp_path / "rogue" / "mallory.key", crl=root / "ca" / "ca.crl",
    )  # fmt: skip
    with pytest.raises(PeerUnavailable):
        await call(members_of(root)[0].rpc_port, files, "ctx.get", {"address": A})
    # the node keeps serving good clients
    await call(members_of(root)[0].rpc_port, tls(root), "node.status", {})


async def test_a_client_without_the_role_cannot_read(cluster: tuple[Path, list[LocalNode]]) -> None:
    root, _ = cluster
    ca = CertificateAuthority.open(root / "ca")
    ca.issue_client("watcher", ["observer"])
    node = members_of(root)[0]
    await call(node.rpc_port, tls(root), "ctx.put", put("for developers only"))
    await call(node.rpc_port, tls(root), "ctx.put", {"address": OBS, "record": {"summary": "hi"}})
    watcher = tls(root, "watcher")
    with pytest.raises(RemoteError) as caught:
        await call(node.rpc_port, watcher, "ctx.get", {"address": A})
    assert caught.value.code == "UCXL-403-FORBIDDEN"
    got = await call(node.rpc_port, watcher, "ctx.get", {"address": OBS})
    assert got["version"]["read_as"] == "observer"
    with pytest.raises(RemoteError) as write:
        await call(node.rpc_port, watcher, "ctx.put", put("not mine to write"))
    assert write.value.code == "UCXL-403-FORBIDDEN"


async def test_bad_traffic_does_not_stop_a_node(cluster: tuple[Path, list[LocalNode]]) -> None:
    root, _ = cluster
    node = members_of(root)[0]
    for payload in (os.urandom(512), b"\xff\xff\xff\xff" + b"x" * 64, b""):
        with socket.create_connection(("127.0.0.1", node.rpc_port), timeout=5) as sock:
            if payload:
                sock.sendall(payload)
    half_open = socket.create_connection(("127.0.0.1", node.rpc_port), timeout=5)
    try:
        status = await call(node.rpc_port, tls(root), "node.status", {})
        assert status["name"] == "node1"
    finally:
        half_open.close()
