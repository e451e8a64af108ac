"""The backup archive: its members, its manifest, building it and verifying it (issue 11).

Owns the format inside a backup file (``BACKUP_FORMAT``; docs/backup.md is the user's
version of this docstring). A backup file is an age file; inside it is a POSIX tar
archive (stdlib ``tarfile``) of these members, in this order:

=================================  =======================================================
member                             content
=================================  =======================================================
``manifest.json``                  ``Manifest``: format, kind (full/incremental), cluster
                                   id, node id, creation time, the HLC cut (the highest
                                   version id included) and the cut it continues
                                   (``since``), counts, and the SHA-256 of every other
                                   member
``versions/NNNNNN.jsonl``          JSON lines, one version each, in (context, id) order:
                                   ``{"context", "version_id", "envelope"}``; ``envelope``
                                   is the stored envelope (``storage.envelope``) exactly
                                   as it was in LevelDB, base64; tombstones included
``purges.jsonl``                   JSON lines ``{"context", "upto", "purged_ms", "by"}``:
                                   every purge marker of the store
``audit.jsonl``                    JSON lines, the audit log (``AuditEntry.to_json``)
``keys/keyring.json``              the keyring metadata: roles and the public recipient of
                                   every key version (no secret)
``keys/signers.json``              a cluster backup only: ``{"signers": [hex]}``, the raw
                                   Ed25519 signing keys of the cluster's members (public)
``keys/secret/<file>``             only with ``--with-keys``: the keys directory's secret
                                   files byte for byte (role identities, node identity,
                                   signing key; sealed when the keyring is protected)
=================================  =======================================================

``storage.backup_manifest`` holds the manifest, the row types and the errors.
Must not know: files, LevelDB, the clock, age (``storage.backup_io`` is the shell that
collects a store's rows, encrypts and writes). Pure: bytes in, bytes or errors out.

**Overlap.** A version id is issued before its batch is committed, so a write in flight
while a backup scans can commit *after* the scan with an id *below* the cut. An incremental
therefore holds every version whose id is above ``since`` minus ``overlap_ms`` of HLC wall
time (``lower_bound``), not above ``since`` alone: a restore is idempotent, so the few
versions held twice cost nothing, and a write that commits within ``OVERLAP_MS`` of being
issued is never missed by a chain (group commit takes milliseconds).

Invariants: a member the manifest does not list, a listed member that is missing, a hash
that does not match, or any member that does not parse is refused with ``BackupInvalid``
naming that member, before anything is returned; every envelope decodes, carries a valid
signature by a key ``trusted`` accepts and lies in the manifest's range (see Overlap);
the audit log's hash chain links; counts match the manifest.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import tarfile
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from crypto.audit import AuditEntry, entry_hash
from crypto.errors import KeyringError
from crypto.key_versions import parse_meta
from storage.backup_manifest import (
    AUDIT,
    KEYRING,
    MANIFEST,
    OVERLAP_MS,
    PURGES,
    SECRET_KEYS_DIR,
    SIGNERS,
    VERSIONS_DIR,
    VERSIONS_PER_CHUNK,
    Backup,
    BackupForeign,
    BackupInvalid,
    Contents,
    Manifest,
    PurgeRow,
    Trusted,
    VersionRow,
    chunk_name,
    lower_bound,
)
from storage.backup_manifest import (
    count as _count,
)
from storage.backup_manifest import (
    text as _text,
)
from storage.envelope import Envelope, kind_of
from storage.errors import CorruptRecord
from storage.schema import PurgeMarker
from storage.versions import VersionId


def build(
    contents: Contents,
    *,
    cluster_id: str,
    node_id: str,
    created_ms: int,
    since: str | None,
    incremental: bool,
) -> tuple[bytes, Manifest]:
    """The tar archive of ``contents`` with its manifest (nothing is encrypted here).

    Args:
        contents: the rows, in (context, version id) order.
        cluster_id: the cluster's id, or the node id of a node outside a cluster.
        node_id: the node that made the backup.
        created_ms: creation time (milliseconds since the epoch).
        since: an incremental's base cut; every version in ``contents`` is above
            ``lower_bound(since)``.
        incremental: whether this continues an earlier backup.

    Returns:
        The tar bytes and the manifest written into them.
    """
    members: list[tuple[str, bytes]] = []
    versions = list(contents.versions)
    for number, start in enumerate(range(0, len(versions), VERSIONS_PER_CHUNK), start=1):
        chunk = versions[start : start + VERSIONS_PER_CHUNK]
        members.append((chunk_name(number), _jsonl(_version_json(row) for row in chunk)))
    members.append((PURGES, _jsonl(_purge_json(row) for row in contents.purges)))
    members.append((AUDIT, _jsonl(contents.audit)))
    members.append((KEYRING, contents.keyring_json))
    for name in sorted(contents.secret_keys):
        members.append((SECRET_KEYS_DIR + name, contents.secret_keys[name]))
    ids = [VersionId.parse(row.version_id) for row in versions]
    cut = _cut(ids, since)
    manifest = Manifest(
        kind="incremental" if incremental else "full",
        cluster_id=cluster_id,
        node_id=node_id,
        created_ms=created_ms,
        cut=cut,
        since=since if incremental else None,
        overlap_ms=OVERLAP_MS if incremental else 0,
        with_keys=bool(contents.secret_keys),
        counts=counts_of(contents),
        members={name: hashlib.sha256(data).hexdigest() for name, data in members},
    )
    manifest_bytes = json.dumps(manifest.to_json(), indent=1, sort_keys=True).encode()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in [(MANIFEST, manifest_bytes), *members]:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), created_ms // 1000, 0o600
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue(), manifest


def _cut(ids: Sequence[VersionId], since: str | None) -> str | None:
    """The highest of the ids included and the base cut."""
    top = [*ids, *([] if since is None else [VersionId.parse(since)])]
    return str(max(top)) if top else None


def counts_of(contents: Contents) -> dict[str, int]:
    """The manifest's ``counts``."""
    tombstones = sum(1 for row in contents.versions if _kind_of(row) == "tombstone")
    return {
        "versions": len(contents.versions),
        "tombstones": tombstones,
        "contexts": len({row.context for row in contents.versions}),
        "purge_markers": len(contents.purges),
        "audit_entries": len(contents.audit),
        "key_files": len(contents.secret_keys),
    }


def read(archive: bytes, *, trusted: Trusted | None = None) -> Backup:
    """Parse and verify a decrypted backup (the tar bytes), member by member.

    Args:
        archive: the tar archive.
        trusted: whether a signing key is trusted; None: the node key recorded in the
            backup's own ``keys/keyring.json`` and, in a cluster backup, the member keys
            of ``keys/signers.json``.

    Raises:
        BackupInvalid: the first bad member, by name (see the module docstring).
    """
    found = _members(archive)
    if MANIFEST not in found:
        raise BackupInvalid("the archive has no manifest.json", field=MANIFEST)
    manifest = Manifest.from_json(found.pop(MANIFEST))
    for name in manifest.members:
        if name not in found:
            raise BackupInvalid(f"member {name} is missing", field=name)
    for name, data in found.items():
        expected = manifest.members.get(name)
        if expected is None:
            raise BackupInvalid(f"member {name} is not listed in the manifest", field=name)
        if hashlib.sha256(data).hexdigest() != expected:
            raise BackupInvalid(
                f"member {name} does not match its SHA-256 in the manifest", field=name
            )
    keyring_json = found.get(KEYRING)
    if keyring_json is None:
        raise BackupInvalid(f"member {KEYRING} is missing", field=KEYRING)
    vouched = (_node_signing_key(keyring_json), *_cluster_signers(found.get(SIGNERS)))
    signers = set(vouched)
    check = trusted if trusted is not None else (lambda key: key in signers)
    chunks = sorted(name for name in found if name.startswith(VERSIONS_DIR))
    versions: list[VersionRow] = []
    for name in chunks:
        versions.extend(_versions(name, found[name], manifest, check))
    contents = Contents(
        versions=versions,
        purges=[_purge(PURGES, line) for line in _lines(PURGES, found.get(PURGES, b""))],
        audit=_audit(found.get(AUDIT, b"")),
        keyring_json=keyring_json,
        secret_keys={
            name[len(SECRET_KEYS_DIR) :]: data
            for name, data in found.items()
            if name.startswith(SECRET_KEYS_DIR)
        },
        signers=tuple(dict.fromkeys(vouched)),
    )
    _check_summary(manifest, contents)
    return Backup(manifest, contents)


def check_chain(manifests: Sequence[tuple[str, Manifest]], cluster_id: str | None) -> None:
    """A restore's files are one full backup, then incrementals that follow each other.

    Args:
        manifests: (file name, manifest) in the order given.
        cluster_id: the target's cluster (or node) id; None for a fresh data directory.

    Raises:
        BackupForeign: another cluster's backup, or a chain out of order.
    """
    first_name, first = manifests[0]
    if first.kind != "full":
        raise BackupForeign(
            f"{first_name} is an incremental backup: restore starts from a full one",
            field="file",
        )
    previous = first
    for name, manifest in manifests:
        if manifest.cluster_id != first.cluster_id:
            raise BackupForeign(
                f"{name} is a backup of {manifest.cluster_id}, not of {first.cluster_id}",
                field="cluster_id",
            )
        if manifest is not first and manifest.kind == "full":
            raise BackupForeign(f"{name} is a second full backup in one chain", field="file")
        if manifest is not first and manifest.since != previous.cut:
            raise BackupForeign(
                f"{name} continues cut {manifest.since}, but the backup before it ends at "
                f"{previous.cut}: give the files in order",
                field="file",
            )
        previous = manifest
    if cluster_id is not None and first.cluster_id != cluster_id:
        raise BackupForeign(
            f"the backup is of {first.cluster_id}; this data directory belongs to {cluster_id}",
            field="cluster_id",
        )


def signers_of(backup: Backup) -> list[bytes]:
    """The signing keys a backup vouches for: its keyring's node key, then the member keys
    of ``keys/signers.json`` (a cluster backup's). ``read`` trusts exactly these when it is
    given no ``trusted``."""
    return list(backup.contents.signers)


def check_signers(backup: Backup, trusted: Trusted) -> None:
    """Every version of a verified backup is signed by a key ``trusted`` accepts.

    Raises:
        BackupInvalid: naming the chunk and version signed by another key.
    """
    for number, row in enumerate(backup.contents.versions):
        signer = Envelope.decode(row.envelope).signer
        if not trusted(signer):
            name = chunk_name(number // VERSIONS_PER_CHUNK + 1)
            raise BackupInvalid(
                f"{name}: version {row.version_id} is signed by a key this node does not trust",
                field=name,
            )


# -- members -----------------------------------------------------------------------------


def _members(archive: bytes) -> dict[str, bytes]:
    """Every regular member of the tar; a damaged or truncated tar names ``file``."""
    out: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:") as tar:
            for info in tar:
                if not info.isfile():
                    raise BackupInvalid(f"member {info.name} is not a file", field=info.name)
                if info.name in out:
                    raise BackupInvalid(f"member {info.name} appears twice", field=info.name)
                handle = tar.extractfile(info)
                data = b"" if handle is None else handle.read()
                if len(data) != info.size:
                    raise BackupInvalid(f"member {info.name} is truncated", field=info.name)
                out[info.name] = data
    except (tarfile.TarError, EOFError) as exc:
        where = f" after member {list(out)[-1]}" if out else ""
        raise BackupInvalid(
            f"the archive is truncated or damaged{where} ({type(exc).__name__})", field="file"
        ) from None
    return out


def _versions(name: str, data: bytes, manifest: Manifest, trusted: Trusted) -> list[VersionRow]:
    rows = []
    low = lower_bound(manifest.since, manifest.overlap_ms)
    high = None if manifest.cut is None else VersionId.parse(manifest.cut)
    for number, line in enumerate(_lines(name, data), start=1):
        where = f"{name} line {number}"
        try:
            context, vid = _text(line["context"]), _text(line["version_id"])
            raw = base64.b64decode(_text(line["envelope"]), validate=True)
            env = Envelope.decode(raw)
            env.check_signature()
            parsed = VersionId.parse(vid)
        except (KeyError, TypeError, ValueError, binascii.Error, CorruptRecord) as exc:
            reason = exc.message if isinstance(exc, CorruptRecord) else "a malformed line"
            raise BackupInvalid(f"{where}: {reason}", field=name) from None
        if env.context != context or env.version_id != vid:
            raise BackupInvalid(f"{where}: the envelope is of another version", field=name)
        if not trusted(env.signer):
            raise BackupInvalid(f"{where}: version {vid} is signed by an untrusted key", field=name)
        if (low is not None and parsed <= low) or high is None or parsed > high:
            raise BackupInvalid(f"{where}: version {vid} lies outside the backup's cut", field=name)
        rows.append(VersionRow(context, vid, raw))
    return rows


def _purge(name: str, line: Mapping[str, Any]) -> PurgeRow:
    try:
        marker = PurgeMarker(_text(line["upto"]), _count(line["purged_ms"]), _text(line["by"]))
        VersionId.parse(marker.upto)
        return PurgeRow(_text(line["context"]), marker)
    except (KeyError, TypeError, ValueError, CorruptRecord):
        raise BackupInvalid(f"{name}: a malformed purge marker", field=name) from None


def _audit(data: bytes) -> list[dict[str, Any]]:
    """The audit entries, with their hash chain checked (from the first entry kept)."""
    entries = _lines(AUDIT, data)
    prev: bytes | None = None
    for line in entries:
        try:
            entry = AuditEntry(
                seq=_count(line["seq"]),
                ts_ms=_count(line["ts_ms"]),
                actor=_text(line["actor"]),
                op=_text(line["op"]),
                address=None if line["address"] is None else _text(line["address"]),
                outcome=_text(line["outcome"]),
                prev=bytes.fromhex(_text(line["prev"])),
                hash=bytes.fromhex(_text(line["hash"])),
            )
        except (KeyError, TypeError, ValueError):
            raise BackupInvalid(f"{AUDIT}: a malformed entry", field=AUDIT) from None
        if entry_hash(entry) != entry.hash or (prev is not None and entry.prev != prev):
            raise BackupInvalid(f"{AUDIT}: the hash chain breaks at entry {entry.seq}", field=AUDIT)
        prev = entry.hash
    return entries


def _node_signing_key(keyring_json: bytes) -> bytes:
    try:
        meta, _ = parse_meta(keyring_json)
        return bytes.fromhex(_text(meta["node_signing_key"]))
    except (KeyringError, KeyError, TypeError, ValueError):
        raise BackupInvalid(f"{KEYRING} is not a keyring of format 2", field=KEYRING) from None


def _cluster_signers(data: bytes | None) -> list[bytes]:
    """The member keys of ``keys/signers.json`` (none when the member is absent)."""
    if data is None:
        return []
    try:
        raw = json.loads(data.decode("utf-8"))
        keys = [bytes.fromhex(_text(item)) for item in raw["signers"]]
    except (UnicodeDecodeError, ValueError, KeyError, TypeError):
        raise BackupInvalid(f"{SIGNERS} is not a list of signing keys", field=SIGNERS) from None
    if any(len(key) != 32 for key in keys):
        raise BackupInvalid(f"{SIGNERS} holds a key that is not 32 bytes", field=SIGNERS)
    return keys


def _check_summary(manifest: Manifest, contents: Contents) -> None:
    counts = counts_of(contents)
    for name, value in counts.items():
        if manifest.counts.get(name) != value:
            raise BackupInvalid(
                f"manifest.json counts {manifest.counts.get(name)} {name}; the members hold "
                f"{value}",
                field=MANIFEST,
            )
    if bool(contents.secret_keys) != manifest.with_keys:
        raise BackupInvalid("manifest.json's with_keys does not match the members", field=MANIFEST)
    ids = [VersionId.parse(row.version_id) for row in contents.versions]
    top = _cut(ids, manifest.since)
    if manifest.scope == "cluster" and manifest.cut is not None:
        # the HLC cut: at or above every id included (``_versions`` refuses one above it)
        if top is None or VersionId.parse(top) <= VersionId.parse(manifest.cut):
            return
        raise BackupInvalid("manifest.json's cut is below a version included", field=MANIFEST)
    if top != manifest.cut:
        raise BackupInvalid(
            "manifest.json's cut is not the highest version included", field=MANIFEST
        )


def _lines(name: str, data: bytes) -> list[dict[str, Any]]:
    out = []
    try:
        for line in data.decode("utf-8").splitlines():
            value = json.loads(line)
            if not isinstance(value, dict):
                raise ValueError("not an object")
            out.append(value)
    except (UnicodeDecodeError, ValueError):
        raise BackupInvalid(f"{name} is not JSON lines", field=name) from None
    return out


def jsonl(rows: Iterable[Mapping[str, Any]]) -> bytes:
    """JSON lines, as every ``.jsonl`` member is written."""
    return _jsonl(rows)


def version_json(row: VersionRow) -> dict[str, Any]:
    """A ``versions/`` line."""
    return _version_json(row)


def purge_json(row: PurgeRow) -> dict[str, Any]:
    """A ``purges.jsonl`` line."""
    return _purge_json(row)


def row_kind(row: VersionRow) -> str:
    """put, tombstone (or corrupt) of a stored version."""
    return _kind_of(row)


_LINE = json.JSONEncoder(sort_keys=True)  # json.dumps(row, sort_keys=True), built once


def _jsonl(rows: Iterable[Mapping[str, Any]]) -> bytes:
    return "".join(_LINE.encode(row) + "\n" for row in rows).encode()


def _version_json(row: VersionRow) -> dict[str, Any]:
    return {
        "context": row.context,
        "version_id": row.version_id,
        "envelope": base64.b64encode(row.envelope).decode("ascii"),
    }


def _purge_json(row: PurgeRow) -> dict[str, Any]:
    marker = row.marker
    return {
        "context": row.context,
        "upto": marker.upto,
        "purged_ms": marker.purged_ms,
        "by": marker.by,
    }


def _kind_of(row: VersionRow) -> str:
    try:
        return kind_of(row.envelope)
    except CorruptRecord:
        return "corrupt"


__all__ = [
    "AUDIT",
    "KEYRING",
    "MANIFEST",
    "OVERLAP_MS",
    "PURGES",
    "SECRET_KEYS_DIR",
    "SIGNERS",
    "VERSIONS_DIR",
    "VERSIONS_PER_CHUNK",
    "Backup",
    "BackupForeign",
    "BackupInvalid",
    "Contents",
    "Manifest",
    "PurgeRow",
    "Trusted",
    "VersionRow",
    "build",
    "check_chain",
    "check_signers",
    "chunk_name",
    "counts_of",
    "jsonl",
    "lower_bound",
    "purge_json",
    "read",
    "row_kind",
    "signers_of",
    "version_json",
]
