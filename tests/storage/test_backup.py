"""Backups of one node (issue 11): round trip, incremental chains, idempotent restore,
purge markers, the age/tar layers, and every kind of tampering refused before a write."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import threading
from pathlib import Path

import pyrage
import pytest
from pyrage import x25519

from crypto.roles import DEFAULT_ROLES
from storage import backup_io
from storage.address import ContextName, parse
from storage.backup import MANIFEST, OVERLAP_MS, PURGES, BackupForeign, BackupInvalid, chunk_name
from storage.backup_io import BackupUnreadable, Opener
from storage.context_store import ContextStore, WriteRequest
from storage.envelope import Envelope
from storage.errors import StorageError
from storage.record import ContextRecord
from storage.restore import Restored, apply, holds_node, load_chain, restore_fresh
from storage.versions import VersionId
from tests.storage.backup_helpers import (
    address,
    admin_identity,
    populate,
    reseal,
    rows,
    tar_members,
)
from tests.storage.conftest import FakeClock


def backup(store: ContextStore, out: Path, **kwargs: object) -> backup_io.Created:
    return backup_io.create(store, out, cluster_id=store.keyring.node_id, **kwargs)  # type: ignore[arg-type]


def restore(paths: list[Path], target: Path, identity: x25519.Identity) -> Restored:
    """Restore like the CLI does: into the node at ``target``, or a fresh one there."""
    result = Restored(target, [str(p) for p in paths], created_node=False)
    if holds_node(target):
        with ContextStore.open(target) as store:
            chain = load_chain(
                paths,
                Opener([identity], store.keyring),
                target_cluster=store.keyring.node_id,
                trusted=store.reader.trusted,
            )
            apply(store, chain, None, result)
    else:
        chain = load_chain(paths, Opener([identity]), target_cluster=None, trusted=None)
        restore_fresh(target, chain, None, None, result)
    return result


def ids_of(store: ContextStore, path: Path) -> set[str]:
    """The version ids a backup holds."""
    found = backup_io.verify(path, Opener(keyring=store.keyring))
    return {row.version_id for row in found.contents.versions}


def snapshot(root: Path) -> dict[bytes, bytes]:
    with ContextStore.open(root) as store:
        return rows(store)


def test_round_trip_keeps_every_version_signature_and_purge(
    store: ContextStore, data_dir: Path, tmp_path: Path
) -> None:
    populate(store, 600)
    out = tmp_path / "full.slurp-backup.age"
    made = backup(store, out, with_keys=True)
    expected = rows(store)
    histories = {address(i): store.history(address(i)) for i in range(0, 600, 50) if i != 3}
    assert made.manifest.counts["versions"] == len(expected) - 1  # one purge marker
    assert made.manifest.counts["purge_markers"] == 1
    assert made.manifest.counts["tombstones"] == 86
    result = restore([out], tmp_path / "restored", admin_identity(data_dir))
    assert result.created_node
    assert result.added == len(expected) - 1
    with ContextStore.open(tmp_path / "restored") as again:
        assert rows(again) == expected
        for addr, history in histories.items():
            assert again.history(addr) == history
        assert again.retrieve(address(6)).fields["summary"].startswith("v2 ")
        assert again.keyring.node_id == store.keyring.node_id
        assert again.search("s10", limit=5)  # the index was rebuilt


@pytest.mark.slow
def test_round_trip_of_ten_thousand_contexts(
    store: ContextStore, data_dir: Path, tmp_path: Path
) -> None:
    populate(store, 10_000)
    out = tmp_path / "full.age"
    backup(store, out, with_keys=True)
    expected = rows(store)
    result = restore([out], tmp_path / "restored", admin_identity(data_dir))
    assert result.added == len(expected) - 1
    with ContextStore.open(tmp_path / "restored") as again:
        assert rows(again) == expected


def test_restore_twice_and_over_a_partial_store_changes_nothing(
    store: ContextStore, data_dir: Path, tmp_path: Path
) -> None:
    populate(store, 60)
    out = tmp_path / "b.age"
    backup(store, out, with_keys=True)
    target = tmp_path / "t"
    first = restore([out], target, admin_identity(data_dir))
    before = snapshot(target)
    second = restore([out], target, admin_identity(data_dir))
    assert second.added == 0
    assert second.skipped == first.added
    assert snapshot(target) == before


def test_incremental_chain(
    store: ContextStore, data_dir: Path, tmp_path: Path, clock: FakeClock
) -> None:
    populate(store, 30)
    full = backup(store, tmp_path / "1.age", with_keys=True)
    clock.advance(OVERLAP_MS + 1)
    store.store(address(100), ContextRecord.from_fields({"summary": "later"}))
    inc1 = backup(store, tmp_path / "2.age", since=tmp_path / "1.age")
    clock.advance(OVERLAP_MS + 1)
    store.delete(address(100))
    store.purge(address(6))
    inc2 = backup(store, tmp_path / "3.age", since=tmp_path / "2.age")
    assert inc1.manifest.kind == "incremental"
    assert inc1.manifest.since == full.manifest.cut
    assert inc2.manifest.since == inc1.manifest.cut
    full_ids, ids1, ids2 = (ids_of(store, p) for p in (full.file, inc1.file, inc2.file))
    assert len(ids1 - full_ids) == 1  # "later"; the rest is the overlap
    assert len(ids2 - ids1 - full_ids) == 1  # the tombstone
    files = [tmp_path / "1.age", tmp_path / "2.age", tmp_path / "3.age"]
    restore(files, tmp_path / "t", admin_identity(data_dir))
    assert snapshot(tmp_path / "t") == rows(store)
    with pytest.raises(BackupForeign, match="give the files in order"):
        restore([files[0], files[2]], tmp_path / "u", admin_identity(data_dir))
    with pytest.raises(BackupForeign, match="starts from a full one"):
        restore(files[1:], tmp_path / "u", admin_identity(data_dir))
    assert not (tmp_path / "u").exists()


def test_since_without_sidecar_opens_the_backup_with_the_admin_identity(
    store: ContextStore, tmp_path: Path, clock: FakeClock
) -> None:
    populate(store, 10)
    clock.advance(OVERLAP_MS + 1)
    store.store(address(50), ContextRecord.from_fields({"summary": "late"}))
    full = backup(store, tmp_path / "1.age")
    full.sidecar.unlink()
    inc = backup(store, tmp_path / "2.age", since=tmp_path / "1.age")
    assert inc.manifest.since == full.manifest.cut
    assert inc.manifest.cut == full.manifest.cut
    assert inc.manifest.counts["versions"] == 1  # the overlap: within OVERLAP_MS of the cut


def test_a_write_in_flight_during_a_backup_is_in_the_next_incremental(
    store: ContextStore, tmp_path: Path, clock: FakeClock
) -> None:
    """A version whose id was issued before a backup's cut but committed after the scan."""
    populate(store, 10)
    clock.advance(OVERLAP_MS * 2)
    request = WriteRequest(address(70), ContextRecord.from_fields({"summary": "in flight"}))
    (in_flight,) = store.seal_prepared([store.prepare(request)], lambda _ctx: None)
    clock.advance(5)
    store.store(address(71), ContextRecord.from_fields({"summary": "committed first"}))
    full = backup(store, tmp_path / "1.age")
    store.versions.append([in_flight])
    assert VersionId.parse(in_flight.version_id) < VersionId.parse(str(full.manifest.cut))
    backup(store, tmp_path / "2.age", since=tmp_path / "1.age")
    found = backup_io.verify(tmp_path / "2.age", Opener(keyring=store.keyring))
    assert in_flight.version_id in {row.version_id for row in found.contents.versions}


def test_every_write_acknowledged_before_a_backup_is_in_it(data_dir: Path, tmp_path: Path) -> None:
    """Writes continue in another thread while the backup scans (wall clock)."""
    acknowledged: list[str] = []
    stop = threading.Event()
    with ContextStore.open(data_dir) as store:
        populate(store, 20)

        def writer() -> None:
            for i in range(10_000):
                if stop.is_set():
                    return
                ref = store.store(
                    address(200 + i % 50), ContextRecord.from_fields({"summary": "w"})
                )
                acknowledged.append(ref.version_id)

        thread = threading.Thread(target=writer)
        thread.start()
        while len(acknowledged) < 5:
            store.store(address(999), ContextRecord.from_fields({"summary": "wait"}))
        before = list(acknowledged)
        made = backup(store, tmp_path / "b.age")
        stop.set()
        thread.join()
        found = backup_io.verify(made.file, Opener(keyring=store.keyring))
    held = {row.version_id for row in found.contents.versions}
    assert set(before) <= held


def test_a_sidecar_of_another_file_is_refused(store: ContextStore, tmp_path: Path) -> None:
    populate(store, 5)
    a, b = backup(store, tmp_path / "a.age"), backup(store, tmp_path / "b.age")
    shutil.copy(b.sidecar, a.sidecar)
    with pytest.raises(BackupInvalid, match="does not belong"):
        backup(store, tmp_path / "c.age", since=a.file)


def test_a_purge_marker_in_the_target_wins(
    store: ContextStore, data_dir: Path, tmp_path: Path
) -> None:
    populate(store, 20)
    backup(store, tmp_path / "b.age", with_keys=True)
    target = tmp_path / "t"
    restore([tmp_path / "b.age"], target, admin_identity(data_dir))
    with ContextStore.open(target) as there:
        there.purge(address(9))
    restore([tmp_path / "b.age"], target, admin_identity(data_dir))
    with ContextStore.open(target) as there:
        assert there.versions.head(_ctx(9)) is None


def test_a_purge_marker_in_the_backup_wins_and_newer_versions_stay(
    store: ContextStore, data_dir: Path, tmp_path: Path, clock: FakeClock
) -> None:
    populate(store, 20)
    backup(store, tmp_path / "old.age", with_keys=True)
    target = tmp_path / "t"
    restore([tmp_path / "old.age"], target, admin_identity(data_dir))
    store.purge(address(12))
    clock.advance(10)
    store.store(address(12), ContextRecord.from_fields({"summary": "after purge"}))
    backup(store, tmp_path / "new.age")
    restore([tmp_path / "new.age"], target, admin_identity(data_dir))
    with ContextStore.open(target) as there:
        assert there.retrieve(address(12)).fields["summary"] == "after purge"
        assert len(there.history(address(12))) == 1


@pytest.mark.skipif(
    shutil.which("age") is None or shutil.which("tar") is None, reason="needs age and tar"
)
def test_age_and_tar_open_a_backup(store: ContextStore, data_dir: Path, tmp_path: Path) -> None:
    populate(store, 5)
    out = tmp_path / "b.age"
    backup(store, out)
    key = data_dir / "keys" / "admin.key"
    plain = subprocess.run(["age", "-d", "-i", str(key), str(out)], capture_output=True, check=True)
    listing = subprocess.run(["tar", "-t"], input=plain.stdout, capture_output=True, check=True)
    names = listing.stdout.decode().split()
    assert names[0] == MANIFEST
    assert chunk_name(1) in names
    assert PURGES in names


def test_extra_recipient_opens_the_backup(store: ContextStore, tmp_path: Path) -> None:
    populate(store, 5)
    other = x25519.Identity.generate()
    backup(store, tmp_path / "b.age", recipients=[str(other.to_public())])
    found = backup_io.verify(tmp_path / "b.age", Opener([other]))
    assert found.manifest.counts["versions"] == len(rows(store)) - 1


# -- tampering: detected, located, and nothing written -----------------------------------


def _tamper_cases(path: Path, identity: x25519.Identity) -> dict[str, tuple[str, str]]:
    """Each kind of damage applied to its own copy: name -> (file, member the error names)."""
    members = tar_members(bytes(pyrage.decrypt(path.read_bytes(), [identity])))
    chunk = chunk_name(1)
    flipped = bytearray(members[chunk])
    flipped[len(flipped) // 2] ^= 0x01
    manifest = json.loads(members[MANIFEST])
    manifest["members"][PURGES] = "0" * 64
    cases: dict[str, tuple[dict[str, bytes | None], str]] = {
        "flipped": ({chunk: bytes(flipped)}, chunk),
        "missing": ({PURGES: None}, PURGES),
        "manifest": ({MANIFEST: json.dumps(manifest).encode()}, PURGES),
        "inserted": ({"extra.bin": b"x"}, "extra.bin"),
        "no-manifest": ({MANIFEST: None}, MANIFEST),
    }
    out = {}
    for name, (edit, member) in cases.items():
        copy = path.with_name(f"{name}.age")
        shutil.copy(path, copy)
        reseal(copy, identity, edit)
        out[name] = (str(copy), member)
    truncated = path.with_name("truncated.age")
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    out["truncated"] = (str(truncated), "file")
    return out


def test_each_kind_of_tampering_is_located_and_writes_nothing(
    store: ContextStore, data_dir: Path, tmp_path: Path
) -> None:
    populate(store, 40)
    good = tmp_path / "good.age"
    backup(store, good, with_keys=True)
    identity = admin_identity(data_dir)
    target = tmp_path / "t"
    restore([good], target, identity)
    with ContextStore.open(target) as there:
        there.purge(address(0))  # the target now differs from the backup
    before = snapshot(target)
    for name, (file, member) in _tamper_cases(good, identity).items():
        with pytest.raises(StorageError) as raised:
            backup_io.verify(Path(file), Opener([identity]))
        assert raised.value.field == member, (name, raised.value)
        with pytest.raises(StorageError) as again:
            restore([Path(file)], target, identity)
        assert again.value.field == member, name
        assert Path(file).name in again.value.message
        with pytest.raises(StorageError):
            restore([Path(file)], tmp_path / f"fresh-{name}", identity)
        assert not (tmp_path / f"fresh-{name}").exists()
    assert snapshot(target) == before


def test_wrong_key_is_named(store: ContextStore, tmp_path: Path) -> None:
    populate(store, 5)
    backup(store, tmp_path / "b.age")
    with pytest.raises(BackupUnreadable, match="wrong key"):
        backup_io.verify(tmp_path / "b.age", Opener([x25519.Identity.generate()]))
    with pytest.raises(BackupUnreadable, match="wrong key"):
        restore([tmp_path / "b.age"], tmp_path / "fresh", x25519.Identity.generate())
    assert not (tmp_path / "fresh").exists()


def test_a_foreign_backup_is_refused(store: ContextStore, data_dir: Path, tmp_path: Path) -> None:
    populate(store, 10)
    backup(store, tmp_path / "b.age")
    other = tmp_path / "other"
    ContextStore.init(other, DEFAULT_ROLES)
    before = snapshot(other)
    with pytest.raises(BackupForeign) as raised:
        restore([tmp_path / "b.age"], other, admin_identity(data_dir))
    assert raised.value.field == "cluster_id"
    assert snapshot(other) == before


def test_a_backup_without_keys_is_refused_for_a_fresh_directory(
    store: ContextStore, data_dir: Path, tmp_path: Path
) -> None:
    populate(store, 5)
    backup(store, tmp_path / "b.age")
    with pytest.raises(StorageError, match="--with-keys"):
        restore([tmp_path / "b.age"], tmp_path / "fresh", admin_identity(data_dir))
    assert not (tmp_path / "fresh").exists()


def test_a_forged_version_signed_by_another_key_is_refused(
    store: ContextStore, data_dir: Path, tmp_path: Path, clock: FakeClock
) -> None:
    populate(store, 5)
    out = tmp_path / "b.age"
    backup(store, out, with_keys=True)
    forger_dir = tmp_path / "forger"
    ContextStore.init(forger_dir, DEFAULT_ROLES)
    with ContextStore.open(forger_dir, clock_ms=clock) as forger:
        forger.store(address(1), ContextRecord.from_fields({"summary": "forged"}))
        forged = rows(forger)
    identity = admin_identity(data_dir)
    members = tar_members(bytes(pyrage.decrypt(out.read_bytes(), [identity])))
    chunk = members[chunk_name(1)].decode().splitlines()
    (env,) = forged.values()
    line = json.loads(chunk[0])
    line["envelope"] = base64.b64encode(env).decode()
    decoded = Envelope.decode(env)
    line["context"], line["version_id"] = decoded.context, decoded.version_id
    chunk[0] = json.dumps(line)
    new_chunk = ("\n".join(chunk) + "\n").encode()
    manifest = json.loads(members[MANIFEST])
    manifest["members"][chunk_name(1)] = hashlib.sha256(new_chunk).hexdigest()
    reseal(out, identity, {chunk_name(1): new_chunk, MANIFEST: json.dumps(manifest).encode()})
    with pytest.raises(BackupInvalid, match=r"untrusted key|outside the backup's cut") as raised:
        backup_io.verify(out, Opener([identity]))
    assert raised.value.field == chunk_name(1)


def _ctx(i: int) -> ContextName:
    return parse(address(i)).context()
