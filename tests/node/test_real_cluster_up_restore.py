"""Real tier: ``slurp cluster up --nodes 3 --dir B --restore F --identity ...`` founds a new
cluster from a cluster backup (issue 11, "Restore into a fresh cluster").

Cluster A (three node processes) takes writes: histories, tombstones, an admin-only
context, a purge. Its leader takes a ``--with-keys`` backup (a real CLI process, with a test
``--recipient``) and one without keys. A is stopped. The backup without keys is refused
with a clear error and leaves no cluster directory. The one with keys founds cluster B
with A's role keys and admin identity (rebuilt here from A's shares, as an operator would
with the recovery shares) and A's signers as trusted signers: every node of B then holds
every version with A's exact envelopes (same ids, same signatures), every context reads
back through B as it did through A (the admin-only one as admin), the purged context
stays purged; after node3 of B loses contexts (a lost disk) and restarts, anti-entropy
brings A's versions back to it (accepted because their signers are B's trusted signers);
and a new write to B is stored and replicated to every node.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import trio
from pyrage import x25519

from crypto.keyfiles import write_secret_file
from crypto.keyring import read_identity_file
from crypto.shamir import combine_identity, decrypt_share
from node.client import load_profile, open_client
from node.daemon.config import render_node_config
from node.daemon.ops import LocalNode, cluster_down, load_node_config, start_cluster
from storage.address import parse
from storage.backup import read, signers_of
from storage.backup_io import Opener
from storage.context_store import ContextStore
from storage.envelope import Envelope
from storage.errors import NotFound
from tests.node.real_cluster import call_until_ok, node_status, versions_held

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
CONTEXTS = 8
DELETED = (2, 5)
PURGED = 6
SECRET = 7  # readable by admin only
LOST = range(0, 4)  # contexts node3 of B loses after the restore


def address(i: int) -> str:
    return f"ucxl://claude:backend_developer@chorus:uprestore/*^/doc{i}.md"


def _slurp(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURP_")}
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args, "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=600,
        check=False,
    )


def _ok(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert done.returncode == 0, f"{done.args[3:6]} failed: {done.stdout} {done.stderr}"
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def _admin_key(root: Path, names: list[str], out: Path) -> None:
    """The cluster's admin identity, rebuilt from the nodes' shares, into ``out`` (0600)."""
    shares = []
    for name in names:
        keys = root / name / "data" / "keys"
        node_key = read_identity_file(keys / "node.key")
        shares.append(decrypt_share((keys / "admin.share.age").read_bytes(), node_key))
    with combine_identity(shares) as rebuilt:
        write_secret_file(out, (str(rebuilt.identity()) + "\n").encode())


def _index(envelope: bytes) -> int:
    """The context number of a version (its ``docN.md``)."""
    return int(Envelope.decode(envelope).context.rsplit("doc", 1)[1].split(".")[0])


def _lose(data_dir: Path, lost: range) -> None:
    """Remove every version of the ``lost`` contexts (no purge marker: a lost disk)."""
    with ContextStore.open(data_dir) as store:
        for i in lost:
            ctx = parse(address(i)).context()
            ids = [row.version_id for row in store.versions.versions(ctx)]
            store.versions.remove_versions(ctx, ids)
            assert ids
            assert list(store.versions.versions(ctx)) == []


def _fast_antientropy(config: Path) -> None:
    """Anti-entropy every second on the node of ``config`` (default: every minute)."""
    cfg = load_node_config(config)
    fast = replace(cfg, antientropy=replace(cfg.antientropy, interval_s=1.0))
    config.write_text(render_node_config(fast), encoding="utf-8")


async def _holdings(root: Path, members: list[LocalNode]) -> dict[str, dict[str, bytes]]:
    addresses = [address(i) for i in range(CONTEXTS)]
    return {m.name: dict(await versions_held(root, m, addresses)) for m in members}


async def _reads(profile: Path) -> dict[int, tuple[list[str], str | None]]:
    """context -> (its history's version ids, the latest summary or None when deleted or
    purged), read through a cluster's client."""
    out: dict[int, tuple[list[str], str | None]] = {}
    async with open_client(load_profile(profile)) as client:
        for i in range(CONTEXTS):
            try:
                ids = [entry.version_id for entry in await client.history(address(i))]
            except NotFound:
                ids = []
            try:
                view = await client.get(address(i), as_role="admin" if i == SECRET else None)
                summary: str | None = view.summary
            except NotFound:
                summary = None
            out[i] = (ids, summary)
    return out


async def test_cluster_up_restore_founds_a_cluster_that_holds_the_backup(
    cluster: tuple[Path, list[LocalNode]], tmp_path: Path
) -> None:
    root, members = cluster
    n1 = members[0]
    for i in range(CONTEXTS):
        for n in range(2):
            body: dict[str, Any] = {"address": address(i), "record": {"summary": f"doc {i} v{n}"},
                                    "w": 2}  # fmt: skip
            if i == SECRET:
                body["readers"] = ["admin"]
            await call_until_ok(n1.rpc_port, root, "ctx.put", body)
    for i in DELETED:
        await call_until_ok(n1.rpc_port, root, "ctx.delete", {"address": address(i), "w": 2})
    await call_until_ok(n1.rpc_port, root, "ctx.purge", {"address": address(PURGED)})
    with trio.fail_after(60):  # every node holds every version (N = 3), the purge included
        while True:
            before = await _holdings(root, members)
            if len({json.dumps(sorted(h)) for h in before.values()}) == 1:
                break
            await trio.sleep(0.3)
    expected = before[n1.name]
    assert expected
    assert not any(
        Envelope.decode(e).context.endswith(f"doc{PURGED}.md") for e in expected.values()
    )
    reads_a = await _reads(root / "client.toml")
    assert reads_a[SECRET][1] == f"doc {SECRET} v1"

    key = x25519.Identity.generate()
    test_key = tmp_path / "test.key"
    write_secret_file(test_key, (str(key) + "\n").encode())
    admin_key = tmp_path / "admin.key"
    _admin_key(root, [m.name for m in members], admin_key)
    profile = str(root / "client.toml")
    with_keys = tmp_path / "keys.slurp-backup.age"
    without = tmp_path / "nokeys.slurp-backup.age"
    for out, extra in ((with_keys, ["--with-keys"]), (without, [])):
        argv = ["--profile", profile, "backup", "create", "--out", str(out),
                "--recipient", str(key.to_public()), *extra]  # fmt: skip
        made = _ok(await trio.to_thread.run_sync(_slurp, *argv))
        assert made["scope"] == "cluster"
    cluster_down(root)

    refused_dir = tmp_path / "refused"

    async def refused_up(backup: Path) -> str:
        """``cluster up --restore backup`` fails before anything is made; its message."""
        argv = ["cluster", "up", "--nodes", "3", "--dir", str(refused_dir),
                "--restore", str(backup), "--identity", str(test_key)]  # fmt: skip
        done = await trio.to_thread.run_sync(_slurp, *argv)
        assert done.returncode != 0
        assert not refused_dir.exists()
        message: str = json.loads(done.stdout)["error"]["message"]
        return message

    assert "--with-keys" in await refused_up(without)
    assert "admin identity" in await refused_up(with_keys)

    b_root = tmp_path / "b"
    try:
        up = await trio.to_thread.run_sync(
            lambda: _ok(
                _slurp(
                    "cluster",
                    "up",
                    "--nodes",
                    "3",
                    "--dir",
                    str(b_root),
                    "--restore",
                    str(with_keys),
                    "--identity",
                    str(test_key),
                    "--identity",
                    str(admin_key),
                )
            )
        )
        restored = up["restore"]
        assert up["created"] is True
        assert restored["admin_identity"] == "identity"
        assert restored["versions_total"] == len(expected)
        assert restored["versions_sent"] == len(expected)
        assert restored["purges_applied"] == 1
        signer_keys = {Envelope.decode(e).signer.hex() for e in expected.values()}
        assert signer_keys <= set(restored["trusted_signers"])
        b_members = [LocalNode(**m) for m in up["nodes"]]
        statuses = [await node_status(b_root, m) for m in b_members]
        assert all(len(s["raft"]["voters"]) == 3 for s in statuses if s)  # not members

        with trio.fail_after(60):  # W owners acknowledged each context; the third follows
            while True:
                held = await _holdings(b_root, b_members)
                if all(h == expected for h in held.values()):
                    break
                await trio.sleep(0.3)
        assert await _reads(b_root / "client.toml") == reads_a  # same ids, same contents

        # a lost disk on node3 of B: anti-entropy brings A's versions back to it, signed by
        # keys that are no member's; node3 accepts them after a restart (the trusted
        # signers come back with its metadata)
        cluster_down(b_root)
        _lose(b_root / "node3" / "data", LOST)
        for member in b_members:
            _fast_antientropy(b_root / member.name / "node.toml")
        b_members = start_cluster(b_root, 3, timeout_s=90).nodes
        lost_ids = {vid for vid, env in expected.items() if _index(env) in LOST}
        assert lost_ids
        with trio.fail_after(90):
            while True:
                if (await _holdings(b_root, b_members))["node3"] == expected:
                    break
                await trio.sleep(0.5)

        async with open_client(load_profile(b_root / "client.toml")) as client:
            ref = await client.put(address(0), {"summary": "written to B"}, w=3)
            view = await client.get(address(0))
        assert view.version_id == ref.version_id
        assert view.summary == "written to B"
        assert view.parent == reads_a[0][0][-1]  # continues A's history
        ctx = parse(address(0)).context().canonical()
        for h in (await _holdings(b_root, b_members)).values():
            assert ref.version_id in h
            assert Envelope.decode(h[ref.version_id]).context == ctx

        # a backup of B lists A's signers too (they signed most of B's versions), so it
        # verifies by its own signers and founds a cluster in turn
        again = tmp_path / "b.slurp-backup.age"
        argv = ["--profile", str(b_root / "client.toml"), "backup", "create", "--out",
                str(again), "--recipient", str(key.to_public())]  # fmt: skip
        _ok(await trio.to_thread.run_sync(_slurp, *argv))
        of_b = read(Opener(identities=(key,)).decrypt(again))
        assert signer_keys <= {k.hex() for k in signers_of(of_b)}
        assert expected.keys() <= {row.version_id for row in of_b.contents.versions}
    finally:
        cluster_down(b_root)
