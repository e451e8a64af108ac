"""Real tier: a cluster backup with one node down (issue 11, "Cluster").

Three node processes; writes (some deleted, one context purged) acknowledged through the
cluster; one follower SIGKILLed; ``slurp --profile P backup create --out F --recipient R
--with-keys`` (a real CLI process) makes the leader read every range from a quorum of the
two live replicas and downloads the file. Then: the stock ``age -d`` with R's identity
opens it and ``tar -t`` lists ``manifest.json``; the backup verifies and holds every
acknowledged version (tombstones included) with the live nodes' exact envelopes, and the
purge marker; ``slurp restore F --data-dir X`` builds a fresh node holding the same
histories (version ids and signatures); and ``slurp --profile P restore F`` merges it
back into the running cluster, which already holds all of it. Then an incremental
(``backup create --since FULL``) after more writes and a delete: the chain restores.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import trio
from pyrage import x25519

from node.daemon.ops import LocalNode, cluster_down, start_cluster
from storage import backup_io
from storage.address import ContextName, parse
from storage.backup import read
from storage.context_store import ContextStore
from storage.envelope import Envelope
from tests.node.real_cluster import call_until_ok, node_status, versions_held

pytestmark = pytest.mark.slow
CONTEXTS = 12
DELETED = (3, 7, 9)
PURGED = 5
SLURP = str(Path(sys.executable).with_name("slurp"))


def address(i: int) -> str:
    return f"ucxl://claude:backend_developer@chorus:backup/*^/doc{i}.md"


def context_of(i: int) -> str:
    return parse(address(i)).context().canonical()


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
            answer = await call_until_ok(n1.rpc_port, root, "ctx.put", body)
            acked[answer["ref"]["version_id"]] = context_of(i)
    for i in DELETED:
        answer = await call_until_ok(
            n1.rpc_port, root, "ctx.delete", {"address": address(i), "w": 2}
        )
        acked[answer["ref"]["version_id"]] = context_of(i)
    await call_until_ok(n1.rpc_port, root, "ctx.purge", {"address": address(PURGED)})
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

    # the same file merges into the running cluster (the other engineer's restore.*): every
    # version is already held there, so nothing changes
    merged = await trio.to_thread.run_sync(
        lambda: _slurp("--profile", profile, "restore", str(out))
    )
    assert merged["versions_total"] == manifest.counts["versions"]
    assert merged["versions_sent"] == 0
    assert merged["already_held"] == merged["versions_total"]
    assert merged["purges_held"] == 1


async def test_an_incremental_cluster_backup_with_since_restores_as_one_chain(
    cluster: tuple[Path, list[LocalNode]], tmp_path: Path
) -> None:
    """A full cluster backup, more writes and a delete, ``backup create --since FULL`` (the
    CLI reads FULL's cut from its sidecar): ``slurp restore FULL INCR --data-dir X`` holds
    every acknowledged write with the same ids and envelopes (signatures), and the
    running cluster accepts the chain as a merge that changes nothing."""
    root, members = cluster
    n1 = members[0]
    profile = str(root / "client.toml")
    acked: dict[str, str] = {}  # version id -> context

    async def put(i: int, text: str) -> None:
        body = {"address": address(i), "record": {"summary": text}, "w": 2}
        answer = await call_until_ok(n1.rpc_port, root, "ctx.put", body)
        acked[answer["ref"]["version_id"]] = context_of(i)

    for i in range(6):
        await put(i, f"doc {i} before")
    key = x25519.Identity.generate()
    key_file = tmp_path / "test.key"
    key_file.write_text(str(key) + "\n", encoding="utf-8")
    key_file.chmod(0o600)
    full = tmp_path / "full.slurp-backup.age"
    made_full = await trio.to_thread.run_sync(lambda: _slurp(
        "--profile", profile, "backup", "create", "--out", str(full),
        "--recipient", str(key.to_public()), "--with-keys",
    ))  # fmt: skip
    assert made_full["kind"] == "full"
    before = set(acked)

    for i in range(3, 9):  # more writes after the full cut: new contexts and new versions
        await put(i, f"doc {i} after")
    gone = await call_until_ok(n1.rpc_port, root, "ctx.delete", {"address": address(4), "w": 2})
    acked[gone["ref"]["version_id"]] = context_of(4)
    after = set(acked) - before

    incr = tmp_path / "incr.slurp-backup.age"
    made = await trio.to_thread.run_sync(lambda: _slurp(
        "--profile", profile, "backup", "create", "--since", str(full), "--out", str(incr),
        "--recipient", str(key.to_public()),
    ))  # fmt: skip
    assert made["kind"] == "incremental"
    assert made["since"] == made_full["cut"]
    assert made["overlap_ms"] == 60_000
    assert backup_io.read_sidecar(backup_io.sidecar_of(incr))["kind"] == "incremental"
    opened = await trio.to_thread.run_sync(
        lambda: _run(["age", "-d", "-i", str(key_file), str(incr)], b"")
    )
    held = {row.version_id for row in read(opened).contents.versions}
    assert after <= held, f"missing {sorted(after - held)}"  # every write after the full cut

    expected: dict[str, bytes] = {}  # version id -> envelope, as the nodes hold it
    for member in members:
        expected.update(await versions_held(root, member, [address(i) for i in range(9)]))
    target = tmp_path / "restored"
    restored = await trio.to_thread.run_sync(lambda: _slurp(
        "restore", str(full), str(incr), "--data-dir", str(target), "--identity", str(key_file),
    ))  # fmt: skip
    assert restored["created_node"] is True
    assert restored["cut"] == made["cut"]
    with ContextStore.open(target) as store:
        for i in range(9):
            ctx = ContextName.from_canonical(context_of(i))
            rows = {row.version_id: bytes(row.data) for row in store.versions.versions(ctx)}
            assert rows == {v: expected[v] for v, c in acked.items() if c == context_of(i)}
    tombstone = Envelope.decode(expected[gone["ref"]["version_id"]])
    assert tombstone.tombstone

    merged = await trio.to_thread.run_sync(
        lambda: _slurp("--profile", profile, "restore", str(full), str(incr))
    )
    assert merged["versions_sent"] == 0  # the cluster holds all of it already
    assert merged["already_held"] == merged["versions_total"]


def _schedule(root: Path, names: list[str], schedule: str) -> None:
    for name in names:
        config = root / name / "node.toml"
        text = config.read_text(encoding="utf-8")
        lines = [
            f'schedule = "{schedule}"' if line.startswith("# schedule: unset") else line
            for line in text.splitlines()
        ]
        config.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        return str(answer.read().decode())


async def test_only_the_leader_takes_the_scheduled_backups_of_a_cluster(
    cluster: tuple[Path, list[LocalNode]],
) -> None:
    root, members = cluster
    names = [m.name for m in members]
    cluster_down(root)
    _schedule(root, names, "1h")
    started = await trio.to_thread.run_sync(lambda: start_cluster(root, 3, timeout_s=90).nodes)
    dirs = {name: root / name / "data" / "backups" for name in names}
    with trio.fail_after(120):
        while not any(backup_io.list_backups(d) for d in dirs.values()):  # noqa: ASYNC110
            await trio.sleep(0.5)
    taken = {name: backup_io.list_backups(d) for name, d in dirs.items()}
    entries = [entry for found in taken.values() for entry in found]
    # no node backed up its own store: every backup is a cluster backup of the duty
    assert {entry["scope"] for entry in entries} == {"cluster"}
    assert {entry["kind"] for entry in entries} == {"full"}
    # normally one node (the leader) holds one; an election under load may make two
    # leaders each take one in turn, never a follower on its own
    by_name = {m.name: m for m in started}
    node_ids = {n: (await node_status(root, by_name[n]) or {}).get("node_id") for n in names}
    for name, found in taken.items():
        assert all(entry["node_id"] == node_ids[name] for entry in found)
    leader, status = await _leader_status(root, started)
    with trio.fail_after(60):  # the duty's record reaches every node through the log
        while True:
            views = [await node_status(root, m) for m in started]
            if all(v is not None and v["backup"]["last_success_at"] for v in views):
                break
            await trio.sleep(0.5)
    leader, status = await _leader_status(root, started)
    backup = status["backup"]
    assert backup["scope"] == "cluster"
    assert backup["schedule_s"] == 3600
    assert backup["warning"] is None
    assert backup["failures"] == 0
    assert all(v is not None and v["backup"]["leader"] == leader for v in views)
    with trio.fail_after(30):  # the leader feeds the metrics every few seconds
        while True:
            text = await trio.to_thread.run_sync(lambda: _metrics(by_name[leader].http_port))
            if "slurp_backup_last_success_timestamp_seconds" in text:
                break
            await trio.sleep(0.5)
    assert "slurp_backup_failures_total 0" in text


async def _leader_status(root: Path, members: list[LocalNode]) -> tuple[str, dict[str, Any]]:
    """The current leader's name and ``node.status`` (waits through an election)."""
    with trio.fail_after(60):
        while True:
            for member in members:
                status = await node_status(root, member)
                if status is not None and status.get("role") == "leader":
                    return member.name, status
            await trio.sleep(0.5)
