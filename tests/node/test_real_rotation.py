"""Real tier: a cluster-wide key rotation survives the SIGKILL of a member in its re-seal walk.

Three node processes (``cluster_up``). About 60 contexts that ``backend_developer`` reads
are written (two versions each); ``keys.rotate`` is asked through the SDK
(``AsyncClient.rotate_role``); while ``node.status``'s ``rotation.phase`` is ``reseal``,
one follower is SIGKILLed, then restarted (``start_node``). Invariants checked once the
rotation reports ``done``: on EVERY node, straight from its store (``rep.versions`` under
a node certificate, no client read, so no read repair), every version of those contexts
opens with the role's new identity and none opens with the retired one; on every node's
disk (after the cluster is stopped) the keyring's current identity of the role is that new
one, its previous version is retired and its identity file is gone.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pyrage
import pytest
import trio
from pyrage import x25519

from crypto.keyfiles import parse_identity
from crypto.keyring import Keyring
from crypto.seal_format import age_file_of
from node.client import load_profile, open_client
from node.daemon.ops import LocalNode, cluster_down, start_node
from storage.envelope import Envelope
from tests.node.real_cluster import call, node_status, tls, versions_held

pytestmark = pytest.mark.slow
ROLE = "backend_developer"
BASE = "ucxl://dev:backend_developer@slurp:rotation/*^/"
CONTEXTS = 60
SETTLE_S = 180.0


def _keys_dir(root: Path, name: str) -> Path:
    return root / name / "data" / "keys"


async def _leader(root: Path, members: list[LocalNode]) -> str:
    deadline = time.monotonic() + SETTLE_S
    while time.monotonic() < deadline:
        for member in members:
            status = await node_status(root, member)
            if status is not None and status.get("role") == "leader":
                return str(status["name"])
        await trio.sleep(0.2)
    raise AssertionError("no leader was elected")


async def _all_up(root: Path, members: list[LocalNode]) -> None:
    """Wait until every node sees every member up (the writes below need W = 3)."""
    deadline = time.monotonic() + SETTLE_S
    while time.monotonic() < deadline:
        seen = [await node_status(root, member) for member in members]
        if all(
            s is not None
            and len(s["members"]) == len(members)
            and all(m["up"] for m in s["members"])
            for s in seen
        ):
            return
        await trio.sleep(0.2)
    raise AssertionError("the members never all saw each other up")


async def _write(root: Path, members: list[LocalNode]) -> list[str]:
    await _all_up(root, members)
    addresses = [f"{BASE}file{i}.md" for i in range(CONTEXTS)]
    for step in range(2):
        for i, addr in enumerate(addresses):
            body = {"address": addr, "record": {"summary": f"v{step} of {i}"}, "w": 3}
            port = members[i % len(members)].rpc_port
            await call(port, tls(root, "client"), "ctx.put", body)
    return addresses


async def _kill_during_reseal(root: Path, watch: LocalNode, victim: LocalNode) -> list[str]:
    """Poll ``watch``'s status until the rotation is in its re-seal walk; SIGKILL ``victim``
    then. Returns the phases seen (the last one is the phase at the kill)."""
    seen: list[str] = []
    deadline = time.monotonic() + SETTLE_S
    while time.monotonic() < deadline:
        status = await node_status(root, watch)
        rotation = None if status is None else status.get("rotation")
        phase = None if rotation is None else rotation.get("phase")
        if phase is not None and (not seen or seen[-1] != phase):
            seen.append(str(phase))
        if phase == "reseal":
            os.kill(victim.pid, signal.SIGKILL)
            return seen
        if phase in ("done", "failed") and len(seen) > 1:
            break
    raise AssertionError(f"the re-seal walk was never seen running: phases {seen}")


async def _wait_done(root: Path, members: list[LocalNode]) -> dict[str, Any]:
    deadline = time.monotonic() + SETTLE_S
    last: Any = None
    while time.monotonic() < deadline:
        for member in members:
            status = await node_status(root, member)
            last = None if status is None else status.get("rotation")
            if last is not None and last.get("role") == ROLE and last["phase"] == "done":
                return dict(last)
            if last is not None and last.get("phase") == "failed":
                raise AssertionError(f"the rotation failed: {last}")
        await trio.sleep(0.5)
    raise AssertionError(f"the rotation never finished: {last}")


async def _stored(root: Path, member: LocalNode, addresses: list[str]) -> list[Envelope]:
    """Every version ``member`` holds of ``addresses``, read from its store."""
    return [Envelope.decode(data) for _, data in await versions_held(root, member, addresses)]


def _opens(env: Envelope, identity: x25519.Identity) -> bool:
    try:
        pyrage.decrypt(age_file_of(env.ciphertext), [identity])
    except pyrage.DecryptError:
        return False
    return True


async def test_rotation_with_a_member_killed_in_its_walk_reseals_every_replica(
    cluster: tuple[Path, list[LocalNode]],
) -> None:
    root, members = cluster
    leader = await _leader(root, members)
    addresses = await _write(root, members)
    old_text = (_keys_dir(root, "node1") / f"{ROLE}.key").read_text()
    old = parse_identity(old_text, "the retired identity")
    victim = next(m for m in members if m.name != leader)
    watch = next(m for m in members if m.name == leader)

    async with open_client(load_profile(root / "client.toml")) as client:
        started = await client.rotate_role(ROLE)
    assert started["role"] == ROLE
    phases = await _kill_during_reseal(root, watch, victim)
    assert phases[-1] == "reseal"
    await trio.sleep(1.0)  # the leader meets the dead member in its walk
    restarted = start_node(root, victim.name, timeout_s=60)
    live = [restarted if m.name == victim.name else m for m in members]
    final = await _wait_done(root, live)
    assert final["role"] == ROLE

    held = {m.name: await _stored(root, m, addresses) for m in live}
    cluster_down(root)
    new: x25519.Identity | None = None
    for member in live:
        keys = _keys_dir(root, member.name)
        keyring = Keyring.open(keys)
        identity = keyring.current_identity(ROLE)
        new = new or identity
        assert str(identity.to_public()) == str(new.to_public())  # one identity everywhere
        listing = next(r for r in keyring.listing()["roles"] if r["name"] == ROLE)
        assert listing["current"] == 2
        assert listing["rotation"] is None
        assert [v["retired_at"] is not None for v in listing["versions"]] == [True, False]
        assert not (keys / f"{ROLE}.v1.key").exists()
        assert [p.name for p in keys.iterdir() if p.read_text(errors="ignore") == old_text] == []
    assert new is not None
    assert str(new.to_public()) != str(old.to_public())
    for name, envs in held.items():
        assert len(envs) == 2 * CONTEXTS, name  # N = 3 of 3 nodes: every node holds all
        stale = [e.version_id for e in envs if not _opens(e, new)]
        assert stale == [], f"{name}: {len(stale)} versions do not open with the new key"
        retired = [e.version_id for e in envs if _opens(e, old)]
        assert retired == [], f"{name}: {len(retired)} versions still open with the old key"
        assert all(e.seal_epoch > 0 for e in envs), name
