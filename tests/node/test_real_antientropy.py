"""Real tier: anti-entropy alone brings a node that missed a run of writes back in step.

Three node processes (``cluster_up``); node3 is SIGKILLed, writes go on through node1
(W=2), node3 restarts, and with no reads at all its local holdings (``rep.versions``
asked with a node certificate) converge to every acknowledged version.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from node.daemon.ops import LocalNode, cluster_down, cluster_up, start_node
from node.errors import PeerUnavailable
from tests.node.real_cluster import call, held_by, tls

pytestmark = pytest.mark.slow
WRITES = 40
CONVERGE_TIMEOUT_S = 120.0


def address(i: int) -> str:
    return f"ucxl://claude:backend_developer@chorus:heal/*^/doc{i}.md"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[Path, list[LocalNode]]]:
    root = tmp_path / "cluster"
    cluster_up(root, 3, timeout_s=90)
    cluster_down(root)
    for name in ("node1", "node2", "node3"):  # anti-entropy alone: no hints to deliver
        toml = root / name / "node.toml"
        head, sep, tail = toml.read_text().partition("[handoff]\nenabled = true")
        assert sep, f"{toml} has no [handoff] table"
        toml.write_text(head + "[handoff]\nenabled = false" + tail)
    members = cluster_up(root, 3, timeout_s=90)
    try:
        yield root, members
    finally:
        cluster_down(root)


async def test_a_restarted_node_converges_with_no_reads(
    cluster: tuple[Path, list[LocalNode]],
) -> None:
    root, (n1, _n2, n3) = cluster
    client = tls(root, "client")
    # a short schedule for the restarted node (its peers also start a pass when it comes up)
    toml = root / "node3" / "node.toml"
    text = toml.read_text()
    assert "interval_s = 60.0" in text
    toml.write_text(text.replace("interval_s = 60.0", "interval_s = 2.0"))

    os.kill(n3.pid, signal.SIGKILL)
    acked: dict[int, str] = {}
    for i in range(WRITES):
        body = {"address": address(i), "record": {"summary": f"missed {i}"}, "w": 2}
        answer = await call(n1.rpc_port, client, "ctx.put", body)
        acked[i] = answer["ref"]["version_id"]

    restarted = start_node(root, "node3", timeout_s=60)
    deadline = time.monotonic() + CONVERGE_TIMEOUT_S
    missing: dict[int, str] = dict(acked)
    while missing and time.monotonic() < deadline:
        for i in list(missing):
            try:
                if missing[i] in await held_by(root, restarted, [address(i)]):
                    del missing[i]
            except PeerUnavailable:
                break
        if missing:
            await trio.sleep(0.5)
    assert not missing, f"node3 never caught up on {len(missing)} of {WRITES} contexts"
    for i in (0, WRITES - 1):  # identical version sets on every replica
        sets = [await held_by(root, m, [address(i)]) for m in (n1, _n2, restarted)]
        assert sets[0] == sets[1] == sets[2] == {acked[i]}
    repaired = 0
    for member in (n1, _n2, restarted):
        status = await call(member.rpc_port, client, "node.status", {})
        repaired += int(status["antientropy"]["versions_repaired"])
        assert status["antientropy"]["last_pass_age_s"] is not None  # a pass has finished
    assert repaired >= WRITES
