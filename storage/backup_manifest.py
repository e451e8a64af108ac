"""The backup manifest and the rows a backup holds (issue 11; ``storage.backup`` builds
and verifies archives of them).

Owns: the member names, ``manifest.json``'s fields and their validation, the row types
(versions as stored, purge markers, audit entries, key files), the backup errors, and the
incremental overlap (``lower_bound``, see ``storage.backup``). Pure: no I/O, no clock.
Must not know: tar, age, files, LevelDB.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from storage.errors import CorruptRecord, StorageError
from storage.schema import PurgeMarker
from storage.versions import VersionId

BACKUP_FORMAT = 1
FORMAT_NAME = "slurp-backup"
MANIFEST = "manifest.json"
VERSIONS_DIR = "versions/"
PURGES = "purges.jsonl"
AUDIT = "audit.jsonl"
KEYRING = "keys/keyring.json"
SIGNERS = "keys/signers.json"  # a cluster backup's member signing keys (public)
SECRET_KEYS_DIR = "keys/secret/"  # noqa: S105 - a member name, not a secret
VERSIONS_PER_CHUNK = 2000
OVERLAP_MS = 60_000
Kind = Literal["full", "incremental"]
Trusted = Callable[[bytes], bool]


class BackupInvalid(StorageError):
    """A backup that is truncated, corrupted, tampered with or not a backup.

    ``field`` names the first bad member (``manifest.json``, ``versions/000001.jsonl``...),
    or ``file`` when the file as a whole does not open.
    """

    code = "UCXL-400-BACKUP_INVALID"


class BackupForeign(StorageError):
    """A backup of another cluster (or node), or a chain whose pieces do not follow."""

    code = "UCXL-400-BACKUP_FOREIGN"


@dataclass(frozen=True)
class VersionRow:
    """One stored version: its context (canonical), id and envelope bytes as stored."""

    context: str
    version_id: str
    envelope: bytes


@dataclass(frozen=True)
class PurgeRow:
    """One purge marker of a context (canonical name)."""

    context: str
    marker: PurgeMarker


@dataclass(frozen=True)
class Contents:
    """What a backup holds besides its manifest."""

    versions: Sequence[VersionRow]
    purges: Sequence[PurgeRow]
    audit: Sequence[Mapping[str, Any]]
    keyring_json: bytes
    secret_keys: Mapping[str, bytes] = field(default_factory=dict)  # file name -> bytes
    # read back only (``storage.backup.read``): the keyring's node key, then the keys of
    # ``keys/signers.json`` (a cluster backup's members); never written from here
    signers: tuple[bytes, ...] = ()


@dataclass(frozen=True)
class Manifest:
    """``manifest.json``."""

    kind: Kind
    cluster_id: str
    node_id: str
    created_ms: int
    cut: str | None  # the highest version id included (None: nothing yet, full only)
    since: str | None  # an incremental's base cut (None for a full backup)
    overlap_ms: int  # an incremental also holds versions this much (HLC wall) before since
    with_keys: bool
    counts: Mapping[str, int]
    members: Mapping[str, str]  # member name -> SHA-256 hex
    # "node": one store's backup (cut = the highest id included); "cluster": the leader's
    # quorum read of every range (cut = the HLC cut, >= every id included). Written only
    # when "cluster", so a node backup's manifest is unchanged.
    scope: Literal["node", "cluster"] = "node"

    def to_json(self) -> dict[str, Any]:
        """The manifest as written."""
        extra: dict[str, Any] = {} if self.scope == "node" else {"scope": self.scope}
        return {
            **extra,
            "format": FORMAT_NAME,
            "format_version": BACKUP_FORMAT,
            "kind": self.kind,
            "cluster_id": self.cluster_id,
            "node_id": self.node_id,
            "created_ms": self.created_ms,
            "cut": self.cut,
            "since": self.since,
            "overlap_ms": self.overlap_ms,
            "with_keys": self.with_keys,
            "counts": dict(self.counts),
            "members": dict(self.members),
        }

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        """Parse ``manifest.json``.

        Raises:
            BackupInvalid: not JSON, another format, or a field of the wrong type.
        """
        try:
            raw = json.loads(data.decode("utf-8"))
            if raw["format"] != FORMAT_NAME or raw["format_version"] != BACKUP_FORMAT:
                raise ValueError("format")
            kind = raw["kind"]
            if kind not in ("full", "incremental"):
                raise ValueError("kind")
            scope = raw.get("scope", "node")
            if scope not in ("node", "cluster"):
                raise ValueError("scope")
            manifest = cls(
                kind=kind,
                cluster_id=text(raw["cluster_id"]),
                node_id=text(raw["node_id"]),
                created_ms=count(raw["created_ms"]),
                cut=_vid_or_none(raw["cut"]),
                since=_vid_or_none(raw["since"]),
                overlap_ms=count(raw["overlap_ms"]),
                with_keys=bool(raw["with_keys"]),
                counts={text(k): count(v) for k, v in dict(raw["counts"]).items()},
                members={text(k): text(v) for k, v in dict(raw["members"]).items()},
                scope=scope,
            )
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, CorruptRecord):
            raise BackupInvalid(
                "manifest.json is not a slurp backup manifest of format 1", field=MANIFEST
            ) from None
        return manifest


@dataclass(frozen=True)
class Backup:
    """A verified backup: its manifest and contents."""

    manifest: Manifest
    contents: Contents


def lower_bound(since: str | None, overlap_ms: int = OVERLAP_MS) -> VersionId | None:
    """Versions above this id belong in an incremental continuing ``since`` (Overlap)."""
    if since is None:
        return None
    return VersionId(max(0, VersionId.parse(since).wall_ms - overlap_ms), 0, "")


def chunk_name(number: int) -> str:
    """The member name of versions chunk ``number`` (1-based)."""
    return f"{VERSIONS_DIR}{number:06d}.jsonl"


def text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("expected a string")
    return value


def count(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise TypeError("expected a whole number")
    return value


def _vid_or_none(value: Any) -> str | None:
    if value is None:
        return None
    VersionId.parse(text(value))
    return str(value)
