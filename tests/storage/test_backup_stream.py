"""The streamed backup writer (storage/backup_stream.py): the file it writes is the
embedded format ``storage.backup.read`` verifies, with the cluster scope's HLC cut and the
members' signing keys; and the paged download (``backup_io.download``)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import pyrage
import pytest
from pyrage import x25519

from crypto.roles import DEFAULT_ROLES
from storage import backup_io
from storage.backup import (
    MANIFEST,
    SIGNERS,
    BackupForeign,
    BackupInvalid,
    VersionRow,
    check_chain,
    chunk_name,
    read,
)
from storage.backup_manifest import OVERLAP_MS, VERSIONS_PER_CHUNK, lower_bound
from storage.backup_stream import ArchiveSpool
from storage.context_store import ContextStore
from storage.errors import InvalidPayload
from storage.versions import VersionId
from tests.storage.backup_helpers import populate, tar_members


def _spool_of(
    store: ContextStore,
    out: Path,
    identity: x25519.Identity,
    *,
    extra: Sequence[VersionRow] = (),
    signers: list[bytes] | None = None,
    cut: str | None = None,
) -> tuple[int, str]:
    contents = backup_io.collect(store)
    rows = sorted([*contents.versions, *extra], key=lambda r: (r.context, r.version_id))
    top = max(VersionId.parse(r.version_id) for r in rows)
    with ArchiveSpool(out.parent) as spool:
        for row in rows:
            spool.add_version(row)
        for purge in contents.purges:
            spool.add_purge(purge)
        spool.set_audit(contents.audit)
        spool.set_keys(contents.keyring_json, signers or [], {})
        _, size, sha = spool.finish(
            out, [identity.to_public()], cluster_id="cluster-x", node_id=store.keyring.node_id,
            created_ms=1_000, cut=cut or str(VersionId(top.wall_ms + 5, 0, "n")),
        )  # fmt: skip
    assert not list(out.parent.glob(".spool-*"))  # the spool is gone
    return size, sha


def test_a_streamed_backup_reads_back_with_every_row(store: ContextStore, tmp_path: Path) -> None:
    populate(store, 40)
    identity = x25519.Identity.generate()
    out = tmp_path / "b" / "x.slurp-backup.age"
    size, _sha = _spool_of(store, out, identity)
    assert out.stat().st_size == size
    backup = read(bytes(pyrage.decrypt(out.read_bytes(), [identity])))
    contents = backup_io.collect(store)
    assert sorted(r.envelope for r in backup.contents.versions) == sorted(
        r.envelope for r in contents.versions
    )
    assert backup.contents.purges == contents.purges
    assert backup.manifest.scope == "cluster"
    assert backup.manifest.cluster_id == "cluster-x"
    assert VersionId.parse(backup.manifest.cut or "") > max(
        VersionId.parse(r.version_id) for r in contents.versions
    )
    assert backup.manifest.counts["purge_markers"] == 1


def test_versions_go_in_chunks(store: ContextStore, tmp_path: Path) -> None:
    populate(store, VERSIONS_PER_CHUNK + 5)
    identity = x25519.Identity.generate()
    out = tmp_path / "x.slurp-backup.age"
    _spool_of(store, out, identity)
    members = tar_members(bytes(pyrage.decrypt(out.read_bytes(), [identity])))
    assert next(iter(members)) == MANIFEST
    assert chunk_name(2) in members
    assert chunk_name(3) not in members


def test_another_nodes_versions_are_trusted_only_through_signers(
    store: ContextStore, tmp_path: Path
) -> None:
    populate(store, 5)
    other_dir = tmp_path / "other"
    ContextStore.init(other_dir, DEFAULT_ROLES)
    with ContextStore.open(other_dir) as other:
        populate(other, 5, seed=9)
        extra = list(backup_io.collect(other).versions)
        key = other.keyring.signer.public_key
    identity = x25519.Identity.generate()
    trusted = tmp_path / "a" / "x.slurp-backup.age"
    _spool_of(store, trusted, identity, extra=extra, signers=[key])
    backup = read(bytes(pyrage.decrypt(trusted.read_bytes(), [identity])))
    assert len(backup.contents.versions) == len(backup_io.collect(store).versions) + len(extra)
    assert json.loads(
        tar_members(bytes(pyrage.decrypt(trusted.read_bytes(), [identity])))[SIGNERS]
    ) == {"signers": [key.hex()]}
    untrusted = tmp_path / "b" / "x.slurp-backup.age"
    _spool_of(store, untrusted, identity, extra=extra, signers=[])
    with pytest.raises(BackupInvalid, match="untrusted key"):
        read(bytes(pyrage.decrypt(untrusted.read_bytes(), [identity])))


def test_a_version_above_the_cut_is_refused(store: ContextStore, tmp_path: Path) -> None:
    populate(store, 5)
    identity = x25519.Identity.generate()
    out = tmp_path / "x.slurp-backup.age"
    _spool_of(store, out, identity, cut=str(VersionId(1, 0, "n")))
    with pytest.raises(BackupInvalid, match="outside the backup's cut"):
        read(bytes(pyrage.decrypt(out.read_bytes(), [identity])))


def test_an_incremental_continues_the_full_cut_and_forms_a_chain(
    store: ContextStore, tmp_path: Path
) -> None:
    """``finish(since=)`` writes an incremental manifest that ``read`` verifies (every
    version above ``lower_bound(since)``) and ``check_chain`` accepts after its full one,
    as it accepts an embedded chain."""
    populate(store, 12)
    identity = x25519.Identity.generate()
    full_out = tmp_path / "full.slurp-backup.age"
    _spool_of(store, full_out, identity, cut=str(store.next_id()))  # the HLC cut, as a leader's
    full = read(bytes(pyrage.decrypt(full_out.read_bytes(), [identity])))
    base = full.manifest.cut or ""
    populate(store, 20, seed=8)  # more writes (and deletes) after the full cut
    low = lower_bound(base)
    assert low is not None
    contents = backup_io.collect(store)
    newer = sorted((r for r in contents.versions if VersionId.parse(r.version_id) > low),
                   key=lambda r: (r.context, r.version_id))  # fmt: skip
    assert any(VersionId.parse(r.version_id) > VersionId.parse(base) for r in newer)
    out = tmp_path / "incr.slurp-backup.age"
    with ArchiveSpool(tmp_path) as spool:
        for row in newer:
            spool.add_version(row)
        for purge in contents.purges:
            spool.add_purge(purge)
        spool.set_audit(contents.audit)
        spool.set_keys(contents.keyring_json, [], {})
        manifest, _size, _sha = spool.finish(
            out, [identity.to_public()], cluster_id="cluster-x", node_id=store.keyring.node_id,
            created_ms=2_000, cut=str(store.next_id()), since=base,
        )  # fmt: skip
    assert (manifest.kind, manifest.since, manifest.overlap_ms) == ("incremental", base, OVERLAP_MS)
    incr = read(bytes(pyrage.decrypt(out.read_bytes(), [identity])))
    assert incr.manifest == manifest
    assert {r.version_id for r in incr.contents.versions} == {r.version_id for r in newer}
    assert incr.contents.purges == contents.purges  # every purge marker, old ones too
    check_chain([("full", full.manifest), ("incr", incr.manifest)], "cluster-x")
    with pytest.raises(BackupForeign, match="continues cut"):
        check_chain([("full", full.manifest), ("incr", incr.manifest), ("again", manifest)],
                    "cluster-x")  # fmt: skip


def test_finish_never_overwrites(store: ContextStore, tmp_path: Path) -> None:
    populate(store, 5)
    out = tmp_path / "x.slurp-backup.age"
    out.write_bytes(b"taken")
    with pytest.raises(InvalidPayload) as caught:
        _spool_of(store, out, x25519.Identity.generate())
    assert caught.value.field == "out"
    assert out.read_bytes() == b"taken"


def _pager(data: bytes, page: int) -> Callable[[str, int], tuple[bytes, bool]]:
    def read_page(name: str, offset: int) -> tuple[bytes, bool]:
        chunk = data[offset : offset + page]
        return chunk, offset + len(chunk) >= len(data)

    return read_page


def test_download_pages_checks_the_hash_and_renames(tmp_path: Path) -> None:
    data = bytes(range(256)) * 41
    out = tmp_path / "got.age"
    seen: list[int] = []
    size = backup_io.download(_pager(data, 1000), "n", out, hashlib.sha256(data).hexdigest(),
                              progress=seen.append)  # fmt: skip
    assert size == len(data)
    assert out.read_bytes() == data
    assert seen[-1] == len(data)
    assert len(seen) == 11
    with pytest.raises(InvalidPayload):
        backup_io.download(_pager(data, 1000), "n", out, "0" * 64)
    bad = tmp_path / "bad.age"
    with pytest.raises(BackupInvalid, match="do not match"):
        backup_io.download(_pager(data, 1000), "n", bad, "0" * 64)
    assert not bad.exists()
    assert not list(tmp_path.glob("*.tmp"))
