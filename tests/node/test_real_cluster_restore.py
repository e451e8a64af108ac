"""Real tier: ``slurp --profile P restore FILE`` merges a backup into a running 3-node
cluster through its leader (issue 11, "Restore into a running cluster").

The backup is an embedded-format one of node1's data directory, taken while the cluster
is stopped (``storage.backup_io.create``, encrypted to the cluster's admin recipient).
Versions are then lost on every node (removed without a purge marker, as a lost disk
would), one context is purged through the cluster, and the restore must bring back every
lost version on all three replicas with the same ids and bytes (so the same signatures)
while writes continue (and keep those writes), keep the purged context purged, change
nothing the second time, and write nothing for a tampered file or one signed by a key the
cluster does not trust.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyrage
import pytest
import trio
from pyrage import x25519

from crypto.roles import DEFAULT_ROLES
from node.client import load_profile, open_client
from node.daemon.ops import LocalNode, cluster_down, start_cluster
from storage import backup_io
from storage.address import parse
from storage.backup import build
from storage.context_store import ContextStore, WriteRequest
from storage.envelope import Envelope
from storage.record import ContextRecord
from tests.node.real_cluster import node_status, versions_held
from tests.storage.backup_helpers import tar_members, tar_of

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
CONTEXTS = 12
LOST = range(0, 6)  # contexts whose every version is lost on every node
PURGED = 7  # purged through the cluster after the backup: the cluster's marker wins
WRITES_DURING = 60  # the most puts made while the restore runs (at least 3)


def _address(i: int) -> str:
    return f"ucxl://claude:backend_developer@chorus:restore/*^/src/mod{i:03d}.py"


def _slurp(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURP_")}
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300, check=False,
    )  # fmt: skip


async def _write(root: Path) -> None:
    async with open_client(load_profile(root / "client.toml")) as client:
        for i in range(CONTEXTS):
            await client.put(_address(i), {"summary": f"first {i}"})
        for i in range(0, CONTEXTS, 2):
            await client.put(_address(i), {"summary": f"second {i}"})
        await client.delete(_address(5))


async def _holdings(root: Path, members: list[LocalNode]) -> dict[str, dict[str, bytes]]:
    addresses = [_address(i) for i in range(CONTEXTS)]
    return {m.name: dict(await versions_held(root, m, addresses)) for m in members}


async def _wait_admin_held(root: Path, members: list[LocalNode]) -> None:
    with trio.fail_after(60):
        while True:
            for member in members:
                status = await node_status(root, member)
                if status is not None and status.get("admin_key_held"):
                    return
            await trio.sleep(0.2)


def _lose(data_dir: Path) -> None:
    """Remove every version of the LOST contexts (no purge marker: a lost disk)."""
    with ContextStore.open(data_dir) as store:
        for i in LOST:
            ctx = parse(_address(i)).context()
            ids = [row.version_id for row in store.versions.versions(ctx)]
            store.versions.remove_versions(ctx, ids)


def _tampered(data_dir: Path, out: Path) -> None:
    """A backup of ``data_dir`` with one envelope byte flipped (hashes left as they were)."""
    with ContextStore.open(data_dir) as store:
        recipient = store.keyring.recipient("admin")
        archive, _ = build(
            backup_io.collect(store), cluster_id="c", node_id="n", created_ms=1,
            since=None, incremental=False,
        )  # fmt: skip
    members = tar_members(archive)
    name = next(n for n in members if n.startswith("versions/"))
    data = bytearray(members[name])
    data[len(data) // 2] ^= 0x01
    members[name] = bytes(data)
    out.write_bytes(pyrage.encrypt(tar_of(members), [x25519.Recipient.from_str(recipient)]))


def _foreign(tmp: Path, recipient: str, out: Path) -> None:
    """A backup of another store (another signing key), encrypted to this cluster's admin."""
    ContextStore.init(tmp, DEFAULT_ROLES)
    with ContextStore.open(tmp) as store:
        store.store_batch(
            [WriteRequest(_address(99), ContextRecord.from_fields({"summary": "foreign"}))]
        )
        archive, _ = build(
            backup_io.collect(store), cluster_id="c", node_id="n", created_ms=1,
            since=None, incremental=False,
        )  # fmt: skip
    out.write_bytes(pyrage.encrypt(archive, [x25519.Recipient.from_str(recipient)]))


def _restore(root: Path, path: Path) -> dict[str, Any]:
    done = _slurp("--profile", str(root / "client.toml"), "restore", str(path), "--json")
    assert done.returncode == 0, done.stderr + done.stdout
    summary: dict[str, Any] = json.loads(done.stdout)
    return summary


async def test_restore_into_a_running_cluster(
    cluster: tuple[Path, list[LocalNode]], tmp_path: Path
) -> None:
    root, members = cluster
    await _write(root)
    with trio.fail_after(60):  # every write on every replica (N = 3)
        while True:
            before = await _holdings(root, members)
            if len({len(held) for held in before.values()}) == 1:
                break
            await trio.sleep(0.2)
    written = before["node1"]
    assert len(written) == CONTEXTS + CONTEXTS // 2 + 1

    cluster_down(root)
    backup = tmp_path / "full.slurp-backup.age"
    with ContextStore.open(root / "node1" / "data") as store:
        made = backup_io.create(store, backup, cluster_id="cluster")
        recipient = store.keyring.recipient("admin")
    assert made.manifest.counts["versions"] == len(written)
    tampered = tmp_path / "tampered.slurp-backup.age"
    _tampered(root / "node1" / "data", tampered)
    foreign = tmp_path / "foreign.slurp-backup.age"
    _foreign(tmp_path / "foreign", recipient, foreign)
    for member in members:
        _lose(root / member.name / "data")
    members = start_cluster(root, 3, timeout_s=90).nodes
    await _wait_admin_held(root, members)
    async with open_client(load_profile(root / "client.toml")) as client:
        await client.purge(_address(PURGED))
    purged_ids = {vid for vid, env in written.items() if _context_of(env) == PURGED}
    expected = {
        vid: env
        for vid, env in written.items()
        if vid not in purged_ids and _context_of(env) not in LOST
    }
    with trio.fail_after(60):  # W replicas acknowledged the purge; the third may follow
        while True:
            damaged = await _holdings(root, members)
            if all(held == expected for held in damaged.values()):
                break
            await trio.sleep(0.2)

    bad = _slurp("--profile", str(root / "client.toml"), "restore", str(tampered), "--json")
    assert bad.returncode != 0
    error = json.loads(bad.stdout)["error"]
    assert error["code"] == "UCXL-400-BACKUP_INVALID", error
    assert error["field"].startswith("versions/")
    alien = _slurp("--profile", str(root / "client.toml"), "restore", str(foreign), "--json")
    assert alien.returncode != 0
    assert "untrusted key" in json.loads(alien.stdout)["error"]["message"]
    assert await _holdings(root, members) == damaged  # neither wrote anything

    new_ids: set[str] = set()  # versions written through the cluster while it restores
    first: dict[str, Any] = {}
    restored = trio.Event()

    async def keep_writing() -> None:
        async with open_client(load_profile(root / "client.toml")) as client:
            for n in range(WRITES_DURING):
                if restored.is_set() and n >= 3:
                    return
                i = n % CONTEXTS
                if i != PURGED:
                    ref = await client.put(_address(i), {"summary": f"during the restore {n}"})
                    new_ids.add(ref.version_id)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(keep_writing)
        first.update(await trio.to_thread.run_sync(_restore, root, backup))
        restored.set()
    assert new_ids
    assert first["versions_total"] == len(written)
    assert first["versions_sent"] == _count_lost(written)
    assert first["purged"] == len(purged_ids)
    assert first["already_held"] == len(written) - _count_lost(written) - len(purged_ids)
    with trio.fail_after(60):  # W acknowledged at once; the third replica may follow
        while True:
            after = await _holdings(root, members)
            want = len(written) - len(purged_ids) + len(new_ids)
            if all(len(held) == want for held in after.values()):
                break
            await trio.sleep(0.2)
    for held in after.values():  # the backup's versions byte for byte, and every new write
        assert {vid: held[vid] for vid in held if vid not in new_ids} == {
            vid: env for vid, env in written.items() if vid not in purged_ids
        }
        assert new_ids <= set(held)

    second = _restore(root, backup)
    assert second["versions_sent"] == 0
    assert second["purges_applied"] == 0
    assert second["already_held"] == len(written) - len(purged_ids)
    assert await _holdings(root, members) == after


def _context_of(envelope: bytes) -> int:
    ctx = Envelope.decode(envelope).context
    return int(ctx.rsplit("mod", 1)[1].split(".")[0])


def _count_lost(written: dict[str, bytes]) -> int:
    return sum(1 for env in written.values() if _context_of(env) in LOST)
