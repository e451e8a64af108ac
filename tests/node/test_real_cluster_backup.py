"""Real tier: a cluster backup with one node down (issue 11, "Cluster").

Three node processes; writes (some deleted, one context purged) acknowledged through the
cluster; one follower SIGKILLed; ``slurp --profile P backup create --out F --recipient R
--with-keys`` (a real CLI process) makes the leader read every range from a quorum of the
two live replicas and downloads the file. Then: the stock ``age -d`` with R's identity
opens it and ``tar -t`` lists ``manifest.json``; the backup verifies and holds every
acknowledged version (tombstones included) with the live nodes' exact envelopes, and the
purge marker; ``slurp restore F --data-dir X`` builds a fresh node holding the same
histories (version ids and signatures).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from pyrage import x25519

from node.daemon.ops import LocalNode
from node.errors import NodeError
from storage.address import ContextName, parse
from storage.backup import read
from storage.context_store import ContextStore
from storage.envelope import Envelope
from storage.errors import StorageError
from tests.node.real_cluster import call, node_status, tls, versions_held

pytestmark = pytest.mark.slow
CONTEXTS = 12
DELETED = (3, 7, 9)
PURGED = 5
SLURP = str(Path(sys.executable).with_name("slurp"))


def address(i: int) -> str:
    return f"ucxl://claude:backend_developer@chorus:backup/*^/doc{i}.md"


def context_of(i: int) -> str:
    return parse(address(i)).context().canonical()


async def _retry(port: int, root: Path, method: str, body: dict[str, object]) -> dict[str, object]:
    """``method`` until it succeeds (a purge waits for the leader's admin identity)."""
    last: Exception | None = None
    with trio.move_on_after(120):
        while True:
            try:
                return await call(port, tls(root, "client"), method, body)
            except (NodeError, StorageError) as exc:
                last = exc
                await trio.sleep(1.0)
    raise AssertionError(f"{method} never succeeded: {last}")


def _slurp(*args: str) -> dict[str, object]:
    done = subprocess.run([SLURP, *args, "--json"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"slurp {args[:4]} failed: {done.stdout} {done.stderr}"
    result: dict[str, object] = json.loads(done.stdout)
    return result


def _run(argv: list[str], stdin: bytes) -> bytes:
    return subprocess.run(argv, input=stdin, capture_output=True, timeout=60, check=True).stdout


async def test_a_cluster_backup_with_a_node_down_holds_every_acknowledged_write(
    cluster: tuple[Path, list[LocalNode]], tmp_path: Path
) -> None:
    root, members = cluster
    n1 = members[0]
    acked: dict[str, str] = {}  # version id -> context
    for i in range(CONTEXTS):
        for n in range(2):
            body = {"address": address(i), "record": {"summary": f"doc {i} v{n}"}, "w": 2}
            answer = await _retry(n1.rpc_port, root, "ctx.put", body)
            acked[answer["ref"]["version_id"]] = context_of(i)  # type: ignore[index]
    for i in DELETED:
        answer = await _retry(n1.rpc_port, root, "ctx.delete", {"address": address(i), "w": 2})
        acked[answer["ref"]["version_id"]] = context_of(i)  # type: ignore[index]
    await _retry(n1.rpc_port, root, "ctx.purge", {"address": address(PURGED)})
    purged_ids = {vid for vid, ctx in acked.items() if ctx == context_of(PURGED)}
    live_ids = set(acked) - purged_ids

    statuses = {m.name: await node_status(root, m) for m in members}
    follower = next(m for m in members if (statuses[m.name] or {}).get("role") == "follower")
    os.kill(follower.pid, signal.SIGKILL)
    up = [m for m in members if m is not follower]
    expected: dict[str, bytes] = {}  # version id -> envelope, as the live nodes hold it
    for member in up:
        expected.update(await versions_held(root, member, [address(i) for i in range(CONTEXTS)]))

    key = x25519.Identity.generate()
    key_file = tmp_path / "test.key"
    key_file.write_text(str(key) + "\n", encoding="utf-8")
    key_file.chmod(0o600)
    out = tmp_path / "cluster.slurp-backup.age"
    profile = str(root / "client.toml")
    made = await trio.to_thread.run_sync(
        lambda: _slurp(
            "--profile",
            profile,
            "backup",
            "create",
            "--out",
            str(out),
            "--recipient",
            str(key.to_public()),
            "--with-keys",
        )
    )
    assert made["file"] == str(out)
    assert made["scope"] == "cluster"

    opened = await trio.to_thread.run_sync(
        lambda: _run(["age", "-d", "-i", str(key_file), str(out)], b"")
    )
    listing = (await trio.to_thread.run_sync(lambda: _run(["tar", "-t"], opened))).decode()
    assert "manifest.json" in listing.splitlines()

    backup = read(opened)
    manifest = backup.manifest
    assert manifest.scope == "cluster"
    assert manifest.kind == "full"
    node_ids = {name: (status or {}).get("node_id") for name, status in statuses.items()}
    assert manifest.node_id == node_ids[str(made["leader"])]  # taken by the leader
    assert manifest.cluster_id not in node_ids.values()  # the cluster's id, not a node's
    held = {row.version_id: row for row in backup.contents.versions}
    assert live_ids <= set(held), f"missing {sorted(live_ids - set(held))}"
    assert not purged_ids & set(held)
    for vid in live_ids:
        assert held[vid].envelope == expected[vid]  # the envelope as stored, signature and all
    tombstones = {vid for vid, row in held.items() if Envelope.decode(row.envelope).tombstone}
    assert len(tombstones) == len(DELETED)
    (marker,) = backup.contents.purges
    assert marker.context == context_of(PURGED)
    assert max(purged_ids) <= marker.marker.upto
    assert manifest.counts["purge_markers"] == 1
    assert manifest.counts["tombstones"] == len(DELETED)

    target = tmp_path / "restored"
    restored = await trio.to_thread.run_sync(
        lambda: _slurp("restore", str(out), "--data-dir", str(target), "--identity", str(key_file))
    )
    assert restored["created_node"] is True
    with ContextStore.open(target) as store:
        for i in range(CONTEXTS):
            ctx = ContextName.from_canonical(context_of(i))
            rows = {row.version_id: bytes(row.data) for row in store.versions.versions(ctx)}
            if i == PURGED:
                assert rows == {}
                upto = store.versions.purge_marker(ctx)
                assert upto is not None
                assert upto.upto == marker.marker.upto
            else:
                assert rows == {v: expected[v] for v, c in acked.items() if c == context_of(i)}
