"""Restore: verified backups carried into a node's data directory (issue 11).

Owns the order of a restore and what it writes. Must not know: the CLI, the backup
format (``storage.backup``), how ciphertexts are sealed (envelopes are stored as they
came, through ``VersionStore``'s public methods).

Invariants: every file is decrypted and verified in full (``storage.backup.read``,
``check_chain``, then the target's signer trust) before the first write. Into a data
directory that holds a node, every step is idempotent: version sets are grow-only
(``VersionStore.append`` skips versions already there or covered by a purge marker),
and a purge marker is applied only when it covers more than the target's (the larger
marker wins; versions newer than it are kept), so running a restore again after a crash
finishes it and running it twice changes nothing. Into a fresh directory, the node
(layout, the backup's keys, an empty database) is built in a staging directory beside it
and renamed into place before the merge.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crypto.keyfiles import PassphraseSource
from storage.address import ContextName
from storage.backup import Backup, Trusted, check_chain, check_signers, read
from storage.backup_io import Opener, Progress, write_keys
from storage.cache import envelope_digest
from storage.context_store import ContextStore
from storage.datadir import DataDir
from storage.envelope import Envelope
from storage.errors import InvalidPayload, NotFound, StorageError
from storage.kv import LevelDBKV
from storage.schema import FORMAT_VERSION, META_FORMAT, META_HLC, PurgeMarker
from storage.versions import VersionId

APPEND_BATCH = 500


@dataclass
class Restored:
    """What ``restore`` did."""

    data_dir: Path
    files: list[str]
    created_node: bool
    added: int = 0
    skipped: int = 0
    purges_applied: int = 0
    cut: str | None = None

    def to_json(self) -> dict[str, Any]:
        """``restore --json``."""
        return {
            "data_dir": str(self.data_dir),
            "files": self.files,
            "created_node": self.created_node,
            "versions_added": self.added,
            "versions_skipped": self.skipped,
            "purges_applied": self.purges_applied,
            "cut": self.cut,
        }


def load_chain(
    paths: Sequence[Path],
    opener: Opener,
    *,
    target_cluster: str | None,
    trusted: Trusted | None,
) -> list[Backup]:
    """Decrypt and verify every file, and check they form one chain of ``target_cluster``
    (None: a fresh directory, which needs keys in the full backup).

    Raises:
        BackupUnreadable, BackupInvalid, BackupForeign: naming the file and member.
    """
    backups = []
    for path in paths:
        try:
            backups.append(read(opener.decrypt(path)))
        except StorageError as exc:
            raise type(exc)(f"{path.name}: {exc.message}", field=exc.field) from None
    check_chain([(p.name, b.manifest) for p, b in zip(paths, backups, strict=True)], target_cluster)
    if trusted is not None:  # the target's own trust, once the chain is known to be its
        for path, found in zip(paths, backups, strict=True):
            try:
                check_signers(found, trusted)
            except StorageError as exc:
                raise type(exc)(f"{path.name}: {exc.message}", field=exc.field) from None
    if target_cluster is None and not backups[0].manifest.with_keys:
        raise InvalidPayload(
            f"the target holds no node and {paths[0].name} has no keys (made without "
            "--with-keys): restore into the node it came from",
            field="data_dir",
        )
    return backups


def build_node(root: Path, full: Backup) -> None:
    """Create a node at ``root`` from the keys of ``full`` (staging dir, then rename).

    Raises:
        InvalidPayload: ``root`` exists and is not empty.
    """
    if root.exists() and any(root.iterdir()):
        raise InvalidPayload(f"{root} is not empty and holds no slurp node", field="data_dir")
    staging = root.with_name(f".{root.name}.restoring")
    if staging.exists():
        shutil.rmtree(staging)  # left by an interrupted restore: never a live node
    data_dir = DataDir(staging)
    data_dir.create_layout()
    write_keys(data_dir.keys, full.contents)
    kv = LevelDBKV(data_dir.db, create=True)
    try:
        kv.write([(META_FORMAT, str(FORMAT_VERSION).encode())], sync=True)
    finally:
        kv.close()
    if root.exists():
        root.rmdir()
    staging.rename(root)


def newest_markers(backups: Sequence[Backup]) -> dict[str, PurgeMarker]:
    """Per canonical context, the purge marker covering the most among ``backups``."""
    markers: dict[str, PurgeMarker] = {}
    for backup in backups:
        for row in backup.contents.purges:
            held = markers.get(row.context)
            if held is None or VersionId.parse(row.marker.upto) > VersionId.parse(held.upto):
                markers[row.context] = row.marker
    return markers


def apply(
    store: ContextStore, backups: Sequence[Backup], progress: Progress | None, result: Restored
) -> None:
    """Merge verified backups into ``store`` (idempotent; see the module docstring)."""
    markers = newest_markers(backups)
    touched: set[ContextName] = set()
    for context, marker in markers.items():
        ctx = ContextName.from_canonical(context)
        if _apply_purge(store, ctx, marker):
            result.purges_applied += 1
            touched.add(ctx)
    rows = [row for backup in backups for row in backup.contents.versions]
    checked = {(row.context, row.version_id): row.envelope for row in rows}
    for start in range(0, len(rows), APPEND_BATCH):
        envs = [Envelope.decode(row.envelope) for row in rows[start : start + APPEND_BATCH]]
        added = store.versions.append(envs)
        result.added += sum(added)
        result.skipped += len(added) - sum(added)
        touched.update(
            ContextName.from_canonical(env.context)
            for env, new in zip(envs, added, strict=True)
            if new
        )
        if progress is not None:
            progress(min(start + APPEND_BATCH, len(rows)), len(rows))
    cut = backups[-1].manifest.cut
    result.cut = cut
    if cut is not None:
        store.observe(cut)
        last = store.kv.get(META_HLC)
        if last is None or VersionId.parse(last.decode()) < VersionId.parse(cut):
            store.versions.append([], meta=[(META_HLC, cut.encode())])
    _refresh(store, touched, checked)
    store.audit_event("backup.restore", None, "ok")


def _refresh(
    store: ContextStore, touched: set[ContextName], checked: Mapping[tuple[str, str], bytes]
) -> None:
    """Drop the cached views of the contexts a restore changed and re-index them.

    ``checked``: the envelopes ``storage.backup.read`` verified, by (context, id); a head
    stored byte for byte as verified there is not verified a second time to be indexed.
    """
    for ctx in sorted(touched, key=ContextName.canonical):
        store.cache.invalidate_context(ctx.key())
        head = store.versions.head(ctx)
        if head is not None:
            data = checked.get((ctx.canonical(), head.latest))
            if data is not None:  # the digest matches only the very bytes stored
                store.reader.verified.add(envelope_digest(data))
        store.index.refresh_context(ctx, head)
        store.index.maybe_commit()
    store.index.commit()


def _apply_purge(store: ContextStore, ctx: ContextName, marker: PurgeMarker) -> bool:
    """Apply a backup's purge marker unless the target's covers as much (the larger wins);
    versions newer than the marker are kept."""
    held = store.versions.purge_marker(ctx)
    upto = VersionId.parse(marker.upto)
    if held is not None and VersionId.parse(held.upto) >= upto:
        return False
    newer = [
        Envelope.decode(row.data)
        for row in store.versions.versions(ctx)
        if VersionId.parse(row.version_id) > upto
    ]
    store.versions.purge(ctx, marker)
    if newer:
        store.versions.append(newer)
    return True


def holds_node(root: Path) -> bool:
    """Whether ``root`` holds an initialised node."""
    return DataDir(root).exists()


def restore_fresh(
    root: Path,
    backups: Sequence[Backup],
    passphrase: PassphraseSource | None,
    progress: Progress | None,
    result: Restored,
) -> None:
    """Build a node from the full backup's keys, then merge every backup into it."""
    build_node(root, backups[0])
    result.created_node = True
    try:
        store = ContextStore.open(root, passphrase=passphrase)
    except StorageError:
        raise NotFound(f"the node restored at {root} does not open", field="data_dir") from None
    with store:
        apply(store, backups, progress, result)
