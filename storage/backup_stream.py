"""A backup file written as a stream: members spooled to disk, then tar, then age (issue 11).

Owns writing the backup format of ``storage.backup`` (docs/backup.md) without holding its
versions in memory: rows go to spool files in a private temporary directory as they
come (``ArchiveSpool``), each member's SHA-256 is computed while it is written, and
``finish`` writes ``manifest.json`` first and then every member into a tar file, which is
age-encrypted into place with ``pyrage.encrypt_io`` (both streamed). Memory is one
versions chunk's line at a time, whatever the number of versions.
Must not know: where the rows come from (a cluster's quorum read, ``node.control.
cluster_backup``), RPC, trio.

Invariants: the file is the same format ``storage.backup.read`` verifies (members, their
order and their hashes); ``out`` appears only complete (tmp + fsync + rename), never
overwritten; the spool directory is removed whatever happens.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import pyrage

from storage.backup import (
    AUDIT,
    KEYRING,
    MANIFEST,
    OVERLAP_MS,
    PURGES,
    SECRET_KEYS_DIR,
    SIGNERS,
    VERSIONS_PER_CHUNK,
    Manifest,
    PurgeRow,
    VersionRow,
    chunk_name,
    jsonl,
    purge_json,
    row_kind,
    version_json,
)
from storage.errors import InvalidPayload

SPOOL_BLOCK = 1 << 20


class _Member:
    """One member being spooled: its file and running hash."""

    def __init__(self, name: str, path: Path) -> None:
        self.name = name
        self.path = path
        self.handle: IO[bytes] = path.open("wb")
        self.digest = hashlib.sha256()

    def write(self, data: bytes) -> None:
        self.handle.write(data)
        self.digest.update(data)

    def close(self) -> None:
        self.handle.close()


class ArchiveSpool:
    """Collects a backup's rows on disk; ``finish`` writes the encrypted file.

    Use as a context manager (the spool directory is removed on exit). Versions are
    added in any order, each context's versions together (``contexts`` counts changes of
    context); purge markers, the audit log and the key files at any time before
    ``finish``.
    """

    def __init__(self, parent: Path) -> None:
        parent.mkdir(parents=True, exist_ok=True)
        self.root = Path(tempfile.mkdtemp(prefix=".spool-", dir=parent))
        self._members: list[_Member] = []
        self._chunk: _Member | None = None
        self._in_chunk = 0
        self._last_context: str | None = None
        self.counts = {
            "versions": 0, "tombstones": 0, "contexts": 0, "purge_markers": 0,
            "audit_entries": 0, "key_files": 0,
        }  # fmt: skip
        self._purges = self._open(PURGES)

    def __enter__(self) -> ArchiveSpool:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close and remove the spool."""
        for member in self._members:
            if not member.handle.closed:
                member.close()
        shutil.rmtree(self.root, ignore_errors=True)

    def _open(self, name: str) -> _Member:
        member = _Member(name, self.root / f"{len(self._members):06d}")
        self._members.append(member)
        return member

    def add_version(self, row: VersionRow) -> None:
        """One stored version (envelope bytes as stored)."""
        if self._chunk is None or self._in_chunk >= VERSIONS_PER_CHUNK:
            if self._chunk is not None:
                self._chunk.close()
            number = sum(1 for m in self._members if m.name.startswith("versions/")) + 1
            self._chunk = self._open(chunk_name(number))
            self._in_chunk = 0
        self._chunk.write(jsonl([version_json(row)]))
        self._in_chunk += 1
        self.counts["versions"] += 1
        if row_kind(row) == "tombstone":
            self.counts["tombstones"] += 1
        if row.context != self._last_context:
            self.counts["contexts"] += 1
            self._last_context = row.context

    def add_purge(self, row: PurgeRow) -> None:
        """One context's purge marker."""
        self._purges.write(jsonl([purge_json(row)]))
        self.counts["purge_markers"] += 1

    def set_audit(self, entries: Iterable[Mapping[str, Any]]) -> None:
        """The audit log (``AuditEntry.to_json`` objects, in order)."""
        member = self._open(AUDIT)
        for entry in entries:
            member.write(jsonl([entry]))
            self.counts["audit_entries"] += 1
        member.close()

    def set_keys(
        self, keyring_json: bytes, signers: Sequence[bytes], secret: Mapping[str, bytes]
    ) -> None:
        """``keys/keyring.json``, ``keys/signers.json`` and (``--with-keys``) the secrets."""
        for name, data in [
            (KEYRING, keyring_json),
            (SIGNERS, json.dumps({"signers": sorted(k.hex() for k in signers)}).encode()),
            *[(SECRET_KEYS_DIR + n, secret[n]) for n in sorted(secret)],
        ]:
            member = self._open(name)
            member.write(data)
            member.close()
        self.counts["key_files"] = len(secret)

    def finish(
        self,
        out: Path,
        recipients: Sequence[pyrage.x25519.Recipient],
        *,
        cluster_id: str,
        node_id: str,
        created_ms: int,
        cut: str,
        since: str | None = None,
    ) -> tuple[Manifest, int, str]:
        """Write the encrypted backup to ``out`` (tmp + rename): a full backup, or with
        ``since`` an incremental continuing that cut (the caller spooled only versions
        above ``lower_bound(since)``, and every purge marker).

        Returns:
            The manifest, the file's size and its SHA-256 (hex).

        Raises:
            InvalidPayload: ``out`` exists (field ``out``).
        """
        if out.exists():
            raise InvalidPayload(f"{out} exists; backups are never overwritten", field="out")
        for member in self._members:
            if not member.handle.closed:
                member.close()
        order = self._ordered()
        manifest = Manifest(
            kind="full" if since is None else "incremental",
            cluster_id=cluster_id,
            node_id=node_id,
            created_ms=created_ms,
            cut=cut,
            since=since,
            overlap_ms=0 if since is None else OVERLAP_MS,
            with_keys=self.counts["key_files"] > 0,
            counts=dict(self.counts),
            members={m.name: m.digest.hexdigest() for m in order},
            scope="cluster",
        )
        manifest_bytes = json.dumps(manifest.to_json(), indent=1, sort_keys=True).encode()
        tar_path = self.root / "archive.tar"
        with tarfile.open(tar_path, mode="w", format=tarfile.PAX_FORMAT) as tar:
            info = _info(MANIFEST, len(manifest_bytes), created_ms)
            tar.addfile(info, io.BytesIO(manifest_bytes))
            for member in order:
                info = _info(member.name, member.path.stat().st_size, created_ms)
                with member.path.open("rb") as handle:
                    tar.addfile(info, handle)
        tmp = out.with_name(out.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as sink, tar_path.open("rb") as source:
            pyrage.encrypt_io(source, sink, list(recipients))
            sink.flush()
            os.fsync(sink.fileno())
        tmp.rename(out)
        digest = hashlib.sha256()
        with out.open("rb") as handle:
            for block in iter(lambda: handle.read(SPOOL_BLOCK), b""):
                digest.update(block)
        return manifest, out.stat().st_size, digest.hexdigest()

    def _ordered(self) -> list[_Member]:
        """Members in the embedded order: versions chunks, purges, audit, keys."""
        rank = {PURGES: 1, AUDIT: 2, KEYRING: 3, SIGNERS: 4}

        def key(member: _Member) -> tuple[int, str]:
            if member.name.startswith("versions/"):
                return (0, member.name)
            return (rank.get(member.name, 5), member.name)

        return sorted(self._members, key=key)


def _info(name: str, size: int, created_ms: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, created_ms // 1000, 0o600
    return info
