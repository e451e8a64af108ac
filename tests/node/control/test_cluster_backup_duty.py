"""The ``backup`` duty's base on the leader (node/control/cluster_backup.py,
``ClusterBackup._duty_since``): the cluster backups in the leader's own directory, read
through their sidecars, decide full or incremental (``storage.backup_plan.next_step``,
``cluster_backup_plan.duty_base``)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from node.control.cluster_backup import ClusterBackup
from node.control.cluster_backup_plan import backup_name
from storage import backup_io

CLUSTER = "cluster-a"


def _leader(directory: Path, incremental: int) -> Any:
    """Just what ``_duty_since`` reads of a ``ClusterBackup``."""
    shell = SimpleNamespace(
        directory=directory,
        incremental=incremental,
        control=SimpleNamespace(metadata=SimpleNamespace(cluster_id=CLUSTER)),
        store=SimpleNamespace(keyring=None),
    )
    shell._taken = lambda: ClusterBackup._taken(shell)  # type: ignore[arg-type]
    return shell


def _file(directory: Path, created_ms: int, kind: str, cut: str | None, **extra: Any) -> Path:
    """A backup file with its sidecar, as the leader writes them."""
    path = directory / backup_name(created_ms)
    path.write_bytes(f"age-encryption.org/v1\n{created_ms}".encode())
    sidecar = {"scope": "cluster", "kind": kind, "created_ms": created_ms, "cut": cut,
               "cluster_id": CLUSTER, "file_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
               **extra}  # fmt: skip
    backup_io.write_sidecar(path, sidecar)
    return path


def test_a_leader_without_backups_takes_a_full_one(tmp_path: Path) -> None:
    assert ClusterBackup._duty_since(_leader(tmp_path, 6)) is None


def test_incrementals_follow_the_newest_sidecars_cut_until_n_of_them(tmp_path: Path) -> None:
    _file(tmp_path, 1_000, "full", "000000000001-000000-n1")
    _file(tmp_path, 2_000, "incremental", "000000000002-000000-n1", since="000000000001-000000-n1")
    leader = _leader(tmp_path, 2)
    assert ClusterBackup._duty_since(leader) == "000000000002-000000-n1"
    _file(tmp_path, 3_000, "incremental", "000000000003-000000-n1", since="000000000002-000000-n1")
    assert ClusterBackup._duty_since(leader) is None  # two incrementals: a full one now
    assert ClusterBackup._duty_since(_leader(tmp_path, 0)) is None  # every one full


def test_a_base_that_is_not_this_clusters_or_not_its_files_gives_a_full_one(
    tmp_path: Path,
) -> None:
    _file(tmp_path, 1_000, "full", "000000000001-000000-n1", cluster_id="cluster-b")
    assert ClusterBackup._duty_since(_leader(tmp_path, 6)) is None  # another cluster's
    other = tmp_path / "other"
    other.mkdir()
    path = _file(other, 1_000, "full", "000000000001-000000-n1")
    path.write_bytes(b"age-encryption.org/v1\nchanged")  # the sidecar no longer belongs
    assert ClusterBackup._duty_since(_leader(other, 6)) is None
    node = tmp_path / "node"
    node.mkdir()
    backup_io.write_sidecar(node / backup_name(1_000), {"kind": "full", "created_ms": 1_000})
    (node / backup_name(1_000)).write_bytes(b"x")  # a node backup: not the cluster's chain
    assert ClusterBackup._duty_since(_leader(node, 6)) is None
