"""Backups of one node's store: create, open, verify and list (issue 11).

Owns the files: the age-encrypted backup (``storage.backup`` owns what is inside), its
clear sidecar ``FILE.json`` (the manifest without member hashes, plus the backup file's
SHA-256: no secret), and atomic writes. ``storage.restore`` carries a verified backup
into a data directory.
Must not know: the CLI, the network, how a ciphertext is sealed (envelopes are copied as
opaque bytes; decryption goes through ``VersionReader.decrypt_view``).

Why a sidecar: ``backup create --since FILE`` needs the cut of FILE, and FILE is
encrypted to the admin recipient, whose identity a node may no longer hold (after
``keys split --forget-admin``). The sidecar holds the cut in clear, and the SHA-256 of
FILE, so a sidecar that does not belong to FILE is refused. Without a sidecar, FILE is
opened with the admin identity if this node holds it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyrage
from pyrage import x25519

from crypto.errors import CryptoError, DecryptionError
from crypto.keyfiles import PassphraseSource
from crypto.keyring import KEYRING_FILE, Keyring
from crypto.roles import ADMIN_ROLE
from storage.address import ContextName
from storage.backup import (
    VERSIONS_PER_CHUNK,
    Backup,
    BackupInvalid,
    Contents,
    Manifest,
    PurgeRow,
    Trusted,
    VersionRow,
    build,
    chunk_name,
    lower_bound,
    read,
)
from storage.cache import CacheConfig, RecordCache
from storage.context_store import ContextStore
from storage.envelope import Envelope
from storage.errors import InvalidPayload, StorageError
from storage.kv import MemoryKV
from storage.reader import VersionReader
from storage.schema import (
    PURGE_PREFIX,
    SEP,
    VERSION_PREFIX,
    PurgeMarker,
)
from storage.version_store import VersionStore
from storage.versions import VersionId
from storage.views import VersionView

SUFFIX = ".slurp-backup.age"
SIDECAR_SUFFIX = ".json"
APPEND_BATCH = 500
Progress = Callable[[int, int], None]


class BackupUnreadable(StorageError):
    """The backup file does not open: wrong identity, or damaged/truncated age layer."""

    code = "UCXL-400-BACKUP_UNREADABLE"


@dataclass(frozen=True)
class Created:
    """What ``create`` wrote."""

    file: Path
    sidecar: Path
    manifest: Manifest
    bytes: int

    def to_json(self) -> dict[str, Any]:
        """``backup create --json``."""
        return {
            "file": str(self.file),
            "sidecar": str(self.sidecar),
            "bytes": self.bytes,
            **summary_json(self.manifest),
        }


@dataclass(frozen=True)
class Opener:
    """How to open backup files: age identities, and/or a keyring's admin identities."""

    identities: Sequence[x25519.Identity] = ()
    keyring: Keyring | None = None
    passphrase: PassphraseSource | None = None  # for a protected keyring inside a backup

    def decrypt(self, path: Path) -> bytes:
        """The tar inside ``path``.

        Raises:
            BackupUnreadable: missing, wrongly keyed, truncated or damaged.
        """
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise BackupUnreadable(f"{path}: {exc.strerror}", field="file") from None
        if not data.startswith(b"age-encryption.org/v1\n"):
            raise BackupUnreadable(f"{path} is not an age file", field="file")
        if self.identities:
            try:
                return bytes(pyrage.decrypt(data, list(self.identities)))
            except pyrage.DecryptError as exc:
                if self.keyring is None:
                    raise _unreadable(path, exc) from None
        if self.keyring is None:
            raise BackupUnreadable(f"{path}: no identity given to open it", field="identity")
        if not self.keyring.has_identity(ADMIN_ROLE):
            raise BackupUnreadable(
                f"{path}: this node does not hold the admin identity; give --identity FILE",
                field="identity",
            )
        try:
            return self.keyring.decrypt(data, ADMIN_ROLE)
        except DecryptionError as exc:
            raise _unreadable(path, exc) from None


def _unreadable(path: Path, exc: Exception) -> BackupUnreadable:
    text = str(exc).lower()
    if "no matching" in text or "no identity" in text or "not for" in text:
        reason = "it is not encrypted to this identity (wrong key)"
    else:
        reason = "its age layer is truncated or damaged"
    return BackupUnreadable(f"{path} does not open: {reason}", field="file")


# -- create ------------------------------------------------------------------------------


def default_path(store: ContextStore) -> Path:
    """``<data dir>/backups/<UTC timestamp>.slurp-backup.age``."""
    stamp = datetime.fromtimestamp(store.clock_ms() / 1000, tz=UTC)
    return store.data_dir.backups / f"{stamp.strftime('%Y%m%dT%H%M%S.%fZ')}{SUFFIX}"


def since_cut(path: Path, opener: Opener) -> tuple[str | None, str]:
    """(cut, cluster id) of an earlier backup: from its sidecar, else by opening it.

    Raises:
        BackupInvalid: the sidecar does not belong to ``path``.
        BackupUnreadable: no sidecar and the backup does not open here.
    """
    if sidecar_of(path).exists():
        return sidecar_cut(path)
    manifest = read(opener.decrypt(path)).manifest
    return manifest.cut, manifest.cluster_id


def sidecar_cut(path: Path) -> tuple[str | None, str]:
    """(cut, cluster id) of an earlier backup from its sidecar ``FILE.json`` alone (a
    client of a cluster, which cannot open the backup: ``backup create --since`` with
    ``--profile``).

    Raises:
        InvalidPayload: ``path`` or its sidecar is missing (field ``since``).
        BackupInvalid: the sidecar is unreadable or does not belong to ``path``.
    """
    side = sidecar_of(path)
    if not path.is_file():
        raise InvalidPayload(f"{path}: no such backup file", field="since")
    if not side.exists():
        raise InvalidPayload(
            f"{path} has no sidecar {side.name} (written beside every backup create makes or "
            "downloads): its cut is unknown; take a full backup (leave --since out)",
            field="since",
        )
    meta = read_sidecar(side)
    if meta.get("file_sha256") != _sha256_file(path):
        raise BackupInvalid(f"{side} does not belong to {path.name}", field="since")
    cut = meta.get("cut")
    return (None if cut is None else str(cut)), str(meta.get("cluster_id"))


def create(
    store: ContextStore,
    out: Path,
    *,
    cluster_id: str,
    recipients: Sequence[str] = (),
    since: Path | None = None,
    with_keys: bool = False,
    opener: Opener | None = None,
    progress: Progress | None = None,
) -> Created:
    """Write a backup of ``store`` to ``out`` (and its sidecar), atomically.

    Raises:
        InvalidPayload: a bad recipient, or ``out`` exists.
        BackupForeign / BackupInvalid / BackupUnreadable: from ``since``.
    """
    targets = [_recipient(store.keyring.recipient(ADMIN_ROLE))]
    targets += [_recipient(text) for text in recipients]
    if out.exists():
        raise InvalidPayload(f"{out} exists; backups are never overwritten", field="out")
    base: str | None = None
    if since is not None:
        base, base_cluster = since_cut(since, opener or Opener(keyring=store.keyring))
        if base_cluster != cluster_id:
            raise InvalidPayload(
                f"{since} is a backup of {base_cluster}, not of {cluster_id}", field="since"
            )
    contents = collect(store, since=base, with_keys=with_keys, progress=progress)
    archive, manifest = build(
        contents,
        cluster_id=cluster_id,
        node_id=store.keyring.node_id,
        created_ms=store.clock_ms(),
        since=base,
        incremental=since is not None,
    )
    sealed = bytes(pyrage.encrypt(archive, targets))
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(out, sealed)
    side = sidecar_of(out)
    sidecar = {**summary_json(manifest), "file_sha256": hashlib.sha256(sealed).hexdigest()}
    _write_atomic(side, json.dumps(sidecar, indent=1, sort_keys=True).encode() + b"\n")
    store.audit_event("backup.create", None, "ok")
    return Created(out, side, manifest, len(sealed))


def collect(
    store: ContextStore,
    *,
    since: str | None = None,
    with_keys: bool = False,
    progress: Progress | None = None,
) -> Contents:
    """The rows of a backup: versions newer than ``since`` as stored, every purge marker,
    the audit log, the keyring's public part and, with ``with_keys``, its secret files."""
    low = lower_bound(since)
    # the progress bar's total: a scan of every head, so only when a bar is drawn
    total = 0 if progress is None else sum(h.count for _, h in store.versions.heads(_ANY))
    versions: list[VersionRow] = []
    done = 0
    last_key, last_name = b"", ""
    for key, data in store.kv.scan(VERSION_PREFIX):
        ctx, _, raw_vid = key[len(VERSION_PREFIX) :].rpartition(SEP)
        vid = raw_vid.decode("ascii")
        done += 1
        if progress is not None and done % 1000 == 0:
            progress(done, total)
        if low is not None and VersionId.parse(vid) <= low:
            continue
        if ctx != last_key:  # rows come in context order: parse each context once
            last_key, last_name = ctx, ContextName.from_key(ctx).canonical()
        versions.append(VersionRow(last_name, vid, bytes(data)))
    purges = [
        PurgeRow(
            ContextName.from_key(key[len(PURGE_PREFIX) :]).canonical(), PurgeMarker.decode(data)
        )
        for key, data in store.kv.scan(PURGE_PREFIX)
    ]
    audit = [] if store.audit is None else [e.to_json() for e in store.audit.tail(2**62)]
    keyring_json, secret = key_files(store, with_keys=with_keys)
    if progress is not None:
        progress(total, total)
    return Contents(versions, purges, audit, keyring_json, secret)


def key_files(store: ContextStore, *, with_keys: bool) -> tuple[bytes, dict[str, bytes]]:
    """The keyring's public metadata and, with ``with_keys``, its secret files by name."""
    keys_dir = store.data_dir.keys
    secret = {}
    if with_keys:
        for path in sorted(keys_dir.iterdir()):
            if path.is_file() and path.name != KEYRING_FILE and not path.name.endswith(".tmp"):
                secret[path.name] = path.read_bytes()
    return (keys_dir / KEYRING_FILE).read_bytes(), secret


_ANY = ContextName("any", "any", "any", "any", "")


# -- verify ------------------------------------------------------------------------------


def verify(
    path: Path,
    opener: Opener,
    *,
    trusted: Trusted | None = None,
    progress: Progress | None = None,
) -> Backup:
    """Open and verify one backup: every member's hash, every signature, and with keys
    every decrypt (with the backup's own identities, through the read path).

    Raises:
        BackupUnreadable, BackupInvalid: the first problem, naming the member.
    """
    backup = read(opener.decrypt(path), trusted=trusted)
    if backup.manifest.with_keys:
        check_decrypts(backup, opener.passphrase, progress=progress)
    return backup


def check_decrypts(
    backup: Backup, passphrase: PassphraseSource | None, *, progress: Progress | None = None
) -> int:
    """Decrypt every put version with the keys inside ``backup``; returns how many.

    Raises:
        BackupInvalid: a version does not decrypt (names its member and id), or the keys
            do not open.
    """
    with tempfile.TemporaryDirectory(prefix="slurp-verify-") as tmp:
        keys_dir = Path(tmp) / "keys"
        write_keys(keys_dir, backup.contents)
        try:
            keyring = Keyring.open(keys_dir, passphrase)
        except CryptoError as exc:
            raise BackupInvalid(
                f"the keys in the backup do not open: {exc}", field="keys/secret/"
            ) from None
        reader = VersionReader(
            VersionStore(MemoryKV()),
            keyring,
            RecordCache[VersionView](CacheConfig(), sizeof=VersionView.approx_size),
            clock_ms=lambda: 0,
            trusted=lambda _key: True,
        )
        rows = backup.contents.versions
        checked = 0
        for number, row in enumerate(rows, start=1):
            if progress is not None and number % 500 == 0:
                progress(number, len(rows))
            env = Envelope.decode(row.envelope)
            if env.tombstone:
                continue
            role = next((r for r in (ADMIN_ROLE, *env.readers) if keyring.has_identity(r)), None)
            member = _member_of(number)
            if role is None:
                raise BackupInvalid(
                    f"{member}: no key in the backup may read {row.version_id}", field=member
                )
            try:
                reader.decrypt_view(ContextName.from_canonical(row.context), env, 1, role)
            except (StorageError, CryptoError):
                raise BackupInvalid(
                    f"{member}: version {row.version_id} does not decrypt", field=member
                ) from None
            checked += 1
    return checked


def _member_of(number: int) -> str:
    """The versions chunk that holds version ``number`` (1-based) of a backup."""
    return chunk_name((number - 1) // VERSIONS_PER_CHUNK + 1)


# -- list --------------------------------------------------------------------------------


def list_backups(directory: Path) -> list[dict[str, Any]]:
    """The backups in ``directory`` (by their sidecars; a backup without one is listed
    with ``cut`` unknown), oldest first."""
    if not directory.is_dir():
        return []
    out = []
    for path in sorted(directory.glob(f"*{SUFFIX}")):
        side = sidecar_of(path)
        entry: dict[str, Any] = {"file": str(path), "bytes": path.stat().st_size}
        if side.exists():
            try:
                entry.update(read_sidecar(side))
            except BackupInvalid:
                entry["error"] = f"{side.name} is unreadable"
        else:
            entry["cut"] = None
            entry["error"] = "no sidecar"
        out.append(entry)
    return out


def sidecar_of(path: Path) -> Path:
    """``FILE.json``."""
    return path.with_name(path.name + SIDECAR_SUFFIX)


def read_sidecar(path: Path) -> dict[str, Any]:
    """A sidecar's JSON.

    Raises:
        BackupInvalid: unreadable.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        raise BackupInvalid(f"{path} is not a backup sidecar", field="sidecar") from None
    if not isinstance(data, dict):
        raise BackupInvalid(f"{path} is not a backup sidecar", field="sidecar")
    return data


def write_sidecar(path: Path, data: dict[str, Any]) -> Path:
    """Write ``path``'s sidecar (atomically); returns its path."""
    side = sidecar_of(path)
    _write_atomic(side, json.dumps(data, indent=1, sort_keys=True).encode() + b"\n")
    return side


def download(
    read_page: Callable[[str, int], tuple[bytes, bool]],
    name: str,
    out: Path,
    sha256: str,
    *,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Fetch backup ``name`` page by page into ``out`` (tmp + fsync + rename), checking the
    SHA-256 the leader reported; returns its size.

    Raises:
        InvalidPayload: ``out`` exists.
        BackupInvalid: the bytes received do not match ``sha256`` (nothing is written).
    """
    if out.exists():
        raise InvalidPayload(f"{out} exists; backups are never overwritten", field="out")
    tmp = out.with_name(out.name + ".tmp")
    digest = hashlib.sha256()
    offset = 0
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            while True:
                data, eof = read_page(name, offset)
                handle.write(data)
                digest.update(data)
                offset += len(data)
                if progress is not None:
                    progress(offset)
                if eof:
                    break
                if not data:
                    raise BackupInvalid(f"{name}: the leader sent an empty page", field="file")
            handle.flush()
            os.fsync(handle.fileno())
        if digest.hexdigest() != sha256:
            raise BackupInvalid(
                f"{name}: the {offset} bytes received do not match the SHA-256 the leader reported",
                field="file",
            )
        tmp.rename(out)
    finally:
        tmp.unlink(missing_ok=True)
    return offset


def summary_json(manifest: Manifest) -> dict[str, Any]:
    """The manifest without member hashes (the sidecar, and ``--json`` summaries)."""
    out = manifest.to_json()
    out.pop("members")
    out["created_at"] = datetime.fromtimestamp(manifest.created_ms / 1000, tz=UTC).isoformat()
    return out


# -- helpers -----------------------------------------------------------------------------


def write_keys(keys_dir: Path, contents: Contents) -> None:
    keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    for name, data in {KEYRING_FILE: contents.keyring_json, **contents.secret_keys}.items():
        if "/" in name or name.startswith("."):
            raise BackupInvalid(f"keys/secret/{name} is not a key file name", field="keys")
        target = keys_dir / name
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)


def _recipient(text: str) -> x25519.Recipient:
    try:
        return x25519.Recipient.from_str(text)
    except pyrage.RecipientError:
        raise InvalidPayload(
            f"{text[:80]!r} is not an age X25519 recipient (age1...)", field="recipient"
        ) from None


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.rename(path)
