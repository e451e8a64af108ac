"""Real tier: the control plane of three node processes survives the loss of its leader.

Invariants checked: exactly one leader is elected and every node names it; the leader
rebuilds the admin identity, so an admin-only context is readable through every node
(followers forward to the leader); after SIGKILL of the leader a survivor leads in a
higher term and admin-only contexts are readable again through any live node; the old
leader, restarted, follows the new one in its term and does not hold the admin key.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from node.daemon.ops import LocalNode, start_node
from node.errors import NodeError
from storage.errors import StorageError
from tests.node.real_cluster import call, node_status, tls

pytestmark = pytest.mark.slow
SECRET = "ucxl://ceo:admin@chorus:board/*^/secret.md"
SETTLE_TIMEOUT_S = 60.0


async def settled_leader(
    root: Path, members: list[LocalNode], *, above_term: int = 0
) -> tuple[str, int]:
    """Wait until every given node names one leader (in one term above ``above_term``) and
    that leader holds the admin key; its name and term."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    seen: list[Any] = []
    while time.monotonic() < deadline:
        seen = [await node_status(root, m) for m in members]
        if all(s is not None for s in seen):
            leaders = {(s["leader"], s["term"]) for s in seen if s is not None}
            roles = [s["role"] for s in seen if s is not None]
            if len(leaders) == 1 and roles.count("leader") == 1:
                name, term = next(iter(leaders))
                leader = next(s for s in seen if s is not None and s["role"] == "leader")
                if name == leader["name"] and term > above_term and leader["admin_key_held"]:
                    return name, term
        await trio.sleep(0.2)
    raise AssertionError(f"no settled leader: {[(s or {}).get('role') for s in seen]}, {seen}")


async def read_secret(root: Path, member: LocalNode) -> str:
    body = {"address": SECRET, "as_role": "admin"}
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while True:
        try:
            answer = await call(member.rpc_port, tls(root, "client"), "ctx.get", body)
            return str(answer["version"]["fields"]["summary"])
        except (NodeError, StorageError) as exc:
            if time.monotonic() > deadline:
                raise AssertionError(f"{member.name} never served the admin context") from exc
            await trio.sleep(0.2)


async def test_sigkill_of_the_leader_elects_another_and_admin_reads_come_back(
    cluster: tuple[Path, list[LocalNode]],
) -> None:
    root, members = cluster
    by_name = {m.name: m for m in members}
    leader, term = await settled_leader(root, members)
    body = {"address": SECRET, "record": {"summary": "admin only"}, "w": 2}
    await call(members[0].rpc_port, tls(root, "client"), "ctx.put", body)
    for member in members:  # every node serves it: the leader itself, followers by forwarding
        assert await read_secret(root, member) == "admin only"
    statuses = [s for s in [await node_status(root, m) for m in members] if s is not None]
    assert [s["name"] for s in statuses if s["admin_key_held"]] == [leader]

    os.kill(by_name[leader].pid, signal.SIGKILL)
    survivors = [m for m in members if m.name != leader]
    new_leader, new_term = await settled_leader(root, survivors, above_term=term)
    assert new_leader != leader
    assert new_term > term
    for member in survivors:
        assert await read_secret(root, member) == "admin only"

    restarted = start_node(root, leader, timeout_s=60)
    again = [*survivors, restarted]
    final_leader, final_term = await settled_leader(root, again, above_term=term)
    status = await node_status(root, restarted)
    assert status is not None
    assert status["role"] == "follower"
    assert status["leader"] == final_leader
    assert status["term"] == final_term
    assert not status["admin_key_held"]
    # pre-vote: the returning node did not disrupt the leader it found
    assert (final_leader, final_term) == (new_leader, new_term)
