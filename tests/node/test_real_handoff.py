"""Real tier: hinted handoff between three node processes (real LevelDB, TLS, SIGKILL).

Invariant, checked on the restarted node's own store (``rep.versions`` asked with a node
certificate, so no coordinator read and no read repair is involved): after node3 is
SIGKILLed, a run of writes is acknowledged through node1, and node3 is started again, node3
ends up holding every acknowledged version with no client read at all; the hints are
then gone (``status_sources["handoff"]`` through the coordinator's ``node.status``).
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from node.daemon.ops import LocalNode, cluster_down, cluster_up, start_node
from node.errors import PeerUnavailable, RemoteError
from tests.node.real_cluster import call, held_by, tls

pytestmark = pytest.mark.slow
WRITES = 40
CATCH_UP_TIMEOUT_S = 120


def address(i: int) -> str:
    return f"ucxl://claude:backend_developer@chorus:handoff/*^/doc{i}.md"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[Path, list[LocalNode]]]:
    root = tmp_path / "cluster"
    members = cluster_up(root, 3, timeout_s=120)
    try:
        yield root, members
    finally:
        cluster_down(root)


async def test_a_restarted_node_catches_up_by_hints_without_reads(
    cluster: tuple[Path, list[LocalNode]],
) -> None:
    root, (n1, _n2, n3) = cluster
    client = tls(root, "client")
    os.kill(n3.pid, signal.SIGKILL)
    acked: dict[str, str] = {}  # version id -> address
    for i in range(WRITES):
        body = {"address": address(i), "record": {"summary": f"written while node3 was down {i}"}}
        answer = await call(n1.rpc_port, client, "ctx.put", {**body, "w": 2})
        acked[answer["ref"]["version_id"]] = address(i)
    status = await call(n1.rpc_port, client, "node.status", {})
    assert status["contexts"] == WRITES

    restarted = await trio.to_thread.run_sync(lambda: start_node(root, "node3", timeout_s=90))
    addresses = sorted(set(acked.values()))
    held: set[str] = set()
    with trio.move_on_after(CATCH_UP_TIMEOUT_S):
        while not set(acked) <= held:
            with contextlib.suppress(PeerUnavailable, RemoteError):  # still starting
                held = await held_by(root, restarted, addresses)
            await trio.sleep(0.5)
    missing = set(acked) - held
    assert not missing, f"node3 lacks {len(missing)} of {len(acked)} acknowledged versions"
    answer = await call(restarted.rpc_port, client, "node.status", {})
    assert answer["contexts"] == WRITES
