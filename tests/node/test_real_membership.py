"""Real tier: membership changes of a running 3-node cluster (``cluster add/remove/forget``).

Invariants checked: a fourth node joins (starts empty, receives the leader's snapshot,
becomes normal) and a founding node is decommissioned while a writer keeps writing, and
every acknowledged write is readable at the end; a SIGKILLed node is forgotten (refused
while it answers) and the survivors hold N replicas of every context again. After each,
the admin key was re-shared to exactly the members left (a new custody epoch, every one
of them a holder) and the leader holds the admin identity: an admin-only context written
before the change is still readable as admin.

These need the data plane of issue 9 (streaming, ``streamed`` in the metadata); without
it transitions complete at once (``node.control.membership``) and anti-entropy moves
the data, so the replica counts are awaited, not assumed.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from node.daemon.ops import (
    ClusterError,
    LocalNode,
    add_nodes,
    cluster_status,
    forget_node,
    remove_node,
)
from node.errors import NodeError
from storage.errors import StorageError
from tests.node.real_cluster import call, held_by, tls

pytestmark = pytest.mark.slow
BASE = "ucxl://dev:backend_developer@slurp:membership/*^/"
SETTLE_S = 180.0


class Writer:
    """Writes numbered contexts through the live nodes until stopped; keeps what was
    acknowledged."""

    def __init__(self, root: Path, ports: list[int]) -> None:
        self.root = root
        self.ports = ports
        self.acked: dict[str, str] = {}  # address -> version id
        self.failed = 0
        self.stop = trio.Event()

    async def run(self) -> None:
        number = 0
        while not self.stop.is_set():
            address = f"{BASE}w{number}.md"
            port = self.ports[number % len(self.ports)]
            body = {"address": address, "record": {"summary": f"write {number}"}, "w": 2}
            try:
                answer = await call(port, tls(self.root, "client"), "ctx.put", body)
                self.acked[address] = answer["ref"]["version_id"]
            except (NodeError, StorageError, OSError):
                self.failed += 1
            number += 1
            await trio.sleep(0.05)


SECRET = "ucxl://ceo:admin@slurp:membership/*^/secret.md"


async def _custody_settles(root: Path, ports: list[int], epoch_at_least: int) -> None:
    """Every node of ``ports`` holds a share of one custody epoch >= ``epoch_at_least`` with
    exactly those nodes as holders, and a leader holds the admin identity."""
    deadline = time.monotonic() + 60
    seen: list[Any] = []
    while time.monotonic() < deadline:
        seen = []
        for port in ports:
            try:
                seen.append(await call(port, tls(root, "client"), "node.status", {}))
            except (NodeError, StorageError, OSError):
                seen.append(None)
        custody = [s and s.get("admin_custody") for s in seen]
        if (
            all(c and c["holder"] and c["holders"] == len(ports) for c in custody)
            and len({c["epoch"] for c in custody if c}) == 1
            and custody[0]["epoch"] >= epoch_at_least
            and any(s and s.get("admin_key_held") for s in seen)
        ):
            return
        await trio.sleep(1.0)
    raise AssertionError(
        f"admin custody did not settle: {[s and s.get('admin_custody') for s in seen]}"
    )


async def _admin_read(root: Path, port: int) -> str:
    get = {"address": SECRET, "as_role": "admin"}
    answer = await call(port, tls(root, "client"), "ctx.get", get)
    return str(answer["version"]["fields"]["summary"])


async def _read(root: Path, port: int, address: str) -> str | None:
    try:
        answer = await call(port, tls(root, "client"), "ctx.get", {"address": address, "r": 2})
    except (NodeError, StorageError, OSError):
        return None
    return str(answer["version"]["version_id"])


async def test_add_a_fourth_node_then_remove_one_while_writes_continue(
    cluster: tuple[Path, list[LocalNode]],
) -> None:
    root, members = cluster
    writer = Writer(root, [m.rpc_port for m in members if m.name != "node2"])
    secret = {"address": SECRET, "record": {"summary": "admin only"}, "readers": ["admin"]}
    await call(members[0].rpc_port, tls(root, "client"), "ctx.put", {**secret, "w": 3})
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.run)
        await trio.sleep(1.0)
        added = await trio.to_thread.run_sync(lambda: add_nodes(root, 1, timeout_s=SETTLE_S))
        assert added["added"] == ["node4"]
        status = await trio.to_thread.run_sync(lambda: cluster_status(root))
        states = {n["name"]: n["state"] for n in status["nodes"]}
        assert states == {"node1": "normal", "node2": "normal", "node3": "normal",
                          "node4": "normal"}  # fmt: skip
        await _custody_settles(root, [n["rpc_port"] for n in status["nodes"]], 1)
        removed = await trio.to_thread.run_sync(
            lambda: remove_node(root, "node2", timeout_s=SETTLE_S)
        )
        assert removed == {"removed": "node2", "stopped": True}
        await trio.sleep(1.0)
        writer.stop.set()
    assert len(writer.acked) > 20
    survivors = [n for n in status["nodes"] if n["name"] != "node2"]
    ports = [n["rpc_port"] for n in survivors]
    missing = []
    for number, (address, version_id) in enumerate(sorted(writer.acked.items())):
        if await _read(root, ports[number % len(ports)], address) != version_id:
            missing.append(address)
    assert missing == [], f"{len(missing)} acknowledged writes not readable: {missing[:5]}"
    await _custody_settles(root, ports, 2)  # add: epoch 1; remove node2: epoch 2
    assert await _admin_read(root, ports[-1]) == "admin only"


async def test_forget_a_sigkilled_node_and_the_survivors_restore_n_replicas(
    cluster: tuple[Path, list[LocalNode]],
) -> None:
    root, _ = cluster
    await trio.to_thread.run_sync(lambda: add_nodes(root, 1, timeout_s=SETTLE_S))
    status = await trio.to_thread.run_sync(lambda: cluster_status(root))
    nodes = {n["name"]: LocalNode(n["name"], n["rpc_port"], n["http_port"], n["dht_port"],
                                  n["pid"]) for n in status["nodes"]}  # fmt: skip
    addresses = [f"{BASE}f{i}.md" for i in range(30)]
    for i, address in enumerate(addresses):
        body = {"address": address, "record": {"summary": f"forget {i}"}, "w": 3}
        await call(nodes["node1"].rpc_port, tls(root, "client"), "ctx.put", body)
    with pytest.raises(ClusterError, match="alive"):
        await trio.to_thread.run_sync(lambda: forget_node(root, "node3"))
    os.kill(nodes["node3"].pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while True:  # the survivors' failure detectors see it down first
        try:
            answer: dict[str, Any] = await trio.to_thread.run_sync(
                lambda: forget_node(root, "node3")
            )
            break
        except ClusterError:
            if time.monotonic() > deadline:
                raise
            await trio.sleep(1.0)
    assert answer["state"] == "removed"
    survivors = [nodes[n] for n in ("node1", "node2", "node4")]
    await _custody_settles(root, [m.rpc_port for m in survivors], 2)  # without node3
    deadline = time.monotonic() + SETTLE_S
    counts: dict[str, int] = {}
    while time.monotonic() < deadline:
        counts = {a: 0 for a in addresses}
        for address in addresses:
            for member in survivors:
                counts[address] += bool(await held_by(root, member, [address]))
        if all(count == 3 for count in counts.values()):
            break
        await trio.sleep(2.0)
    assert all(count == 3 for count in counts.values()), counts
