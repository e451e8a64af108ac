"""The LevelDB key layout and row formats of one node (ARCHITECTURE.md §4).

Owns every key prefix and every value format written to ``DATA_DIR/db``. Anything that
reads or writes LevelDB goes through the helpers here, so an upgrade is visible in one
place. ``FORMAT_VERSION`` is stored under ``m/format``; opening a database written with
another version is refused.

Key layout (``ctx`` is ``ContextName.key()``: project NUL task NUL agent NUL role NUL path;
``SEP`` = 0x01 cannot occur in a context key, so a context's rows never share a prefix
with a longer path's):

======================================  ==================================================
key                                     value
======================================  ==================================================
``m/format``                            ASCII format version (``b"1"``)
``m/hlc``                               last hybrid-logical-clock id issued (ASCII)
``m/node_id``                           the node id (ASCII)
``m/fence``                             the highest leader (Raft) term whose leader-only
                                        operation this node accepted (ASCII decimal;
                                        never decreases; written synced;
                                        ``node.control.fence``)
``m/join``                              present (``b"1"``) on a node created to join a
                                        running cluster (``slurp cluster add``): its
                                        control plane starts from an empty Raft state and
                                        waits for the leader's snapshot instead of
                                        bootstrapping a cluster of its own; deleted once
                                        the snapshot is saved (``node.control.bootstrap``)
``m/rotation/`` role                    cursor of a key rotation in progress: msgpack
                                        {v, to_version, after, since_ms, scanned, rewritten}
``v/`` ctx SEP version-id               a version envelope (``storage.envelope``, msgpack)
``h/`` ctx                              head summary: msgpack {latest, count, live, updated_ms}
``t/`` expires-ms(8, big-endian) ctx    empty; the TTL index (ctx SEP version-id follows)
``p/`` ctx                              purge marker: msgpack {upto, purged_ms, by}
``i/`` ctx                              a context whose index document is stale (a
                                        replicated version arrived and is not yet
                                        indexed): ASCII decimal local milliseconds it
                                        was first marked. Written in the same synced
                                        batch as the versions; deleted (unsynced) once
                                        the index commit that covers it is done; every
                                        row left is re-indexed when the store opens
                                        (``storage.index_sync``). Optional: a database
                                        without any is fully indexed.
``a/``                                  the audit log (``crypto.audit`` owns the rows)
``H/`` target SEP seq(8, big-endian)     a hint (``storage.hints``): msgpack {v, target,
                                        context, created_ms, envelopes}; ``v`` is
                                        ``HINT_SCHEMA``; ``target`` the node name the
                                        versions are for; ``envelopes`` encoded versions
                                        of ``context`` (canonical name)
``r/hs``                                Raft hard state (``node.control.log_store``):
                                        msgpack {v, term, vote, commit}; ``vote`` a node
                                        id or nil
``r/snap``                              the latest Raft snapshot: msgpack
                                        ``Snapshot.to_wire()`` plus ``v``; its ``data`` is
                                        the cluster metadata (``node.control.metadata``)
``r/e/`` index(8, big-endian)           a Raft log entry after the snapshot: msgpack
                                        ``Entry.to_wire()`` plus ``v``; the ``r/e/`` rows
                                        are contiguous from snapshot index + 1
======================================  ==================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

from storage.errors import CorruptRecord

FORMAT_VERSION = 1
SEP = b"\x01"

META_FORMAT = b"m/format"
META_HLC = b"m/hlc"
META_NODE_ID = b"m/node_id"
META_ROTATION_PREFIX = b"m/rotation/"
META_FENCE = b"m/fence"
META_JOIN = b"m/join"
ROTATION_CURSOR_SCHEMA = 1
VERSION_PREFIX = b"v/"
HEAD_PREFIX = b"h/"
TTL_PREFIX = b"t/"
PURGE_PREFIX = b"p/"
INDEX_DIRTY_PREFIX = b"i/"
AUDIT_PREFIX = b"a/"
HINT_PREFIX = b"H/"
HINT_SCHEMA = 1
RAFT_PREFIX = b"r/"
RAFT_HARD_STATE = b"r/hs"
RAFT_SNAPSHOT = b"r/snap"
RAFT_ENTRY_PREFIX = b"r/e/"
RAFT_SCHEMA = 1


def version_key(ctx: bytes, version_id: str) -> bytes:
    """The key of one version row."""
    return VERSION_PREFIX + ctx + SEP + version_id.encode("ascii")


def versions_prefix(ctx: bytes) -> bytes:
    """The prefix shared by every version row of one context (and nothing else)."""
    return VERSION_PREFIX + ctx + SEP


def head_key(ctx: bytes) -> bytes:
    """The key of a context's head summary."""
    return HEAD_PREFIX + ctx


def purge_key(ctx: bytes) -> bytes:
    """The key of a context's purge marker."""
    return PURGE_PREFIX + ctx


def index_dirty_key(ctx: bytes) -> bytes:
    """The key of a context's "index document is stale" row."""
    return INDEX_DIRTY_PREFIX + ctx


def ttl_key(expires_ms: int, ctx: bytes, version_id: str) -> bytes:
    """The TTL index row of a version that expires at ``expires_ms``."""
    return TTL_PREFIX + expires_ms.to_bytes(8, "big") + ctx + SEP + version_id.encode("ascii")


def split_ttl_key(key: bytes) -> tuple[int, bytes, str]:
    """(expires_ms, ctx, version id) of a TTL index key."""
    body = key[len(TTL_PREFIX) :]
    ctx, _, vid = body[8:].rpartition(SEP)
    return int.from_bytes(body[:8], "big"), ctx, vid.decode("ascii")


@dataclass(frozen=True)
class Head:
    """A context's head summary: kept in step with its version rows in the same batch."""

    latest: str
    count: int
    live: bool
    updated_ms: int

    def encode(self) -> bytes:
        """The stored form."""
        row = {
            "latest": self.latest,
            "count": self.count,
            "live": self.live,
            "updated_ms": self.updated_ms,
        }
        return bytes(msgpack.packb(row))

    @classmethod
    def decode(cls, data: bytes) -> Head:
        """Parse the stored form.

        Raises:
            CorruptRecord: the row is damaged.
        """
        row = _unpack_dict(data, "head")
        try:
            return cls(
                str(row["latest"]), int(row["count"]), bool(row["live"]), int(row["updated_ms"])
            )
        except (KeyError, TypeError, ValueError):
            raise CorruptRecord("head row is damaged", field="head") from None


@dataclass(frozen=True)
class PurgeMarker:
    """Every version of the context with id <= ``upto`` was purged and must never return."""

    upto: str
    purged_ms: int
    by: str

    def encode(self) -> bytes:
        """The stored form."""
        return bytes(msgpack.packb({"upto": self.upto, "purged_ms": self.purged_ms, "by": self.by}))

    @classmethod
    def decode(cls, data: bytes) -> PurgeMarker:
        """Parse the stored form.

        Raises:
            CorruptRecord: the row is damaged.
        """
        row = _unpack_dict(data, "purge marker")
        try:
            return cls(str(row["upto"]), int(row["purged_ms"]), str(row["by"]))
        except (KeyError, TypeError, ValueError):
            raise CorruptRecord("purge marker is damaged", field="purge") from None


def rotation_cursor_key(role: str) -> bytes:
    """The key of the rotation cursor of ``role``."""
    return META_ROTATION_PREFIX + role.encode("ascii")


@dataclass(frozen=True)
class RotationCursor:
    """How far the rotation to key version ``to_version`` of a role has come.

    ``after`` is the last version-row key done (b"" before the first); ``since_ms`` the
    wall time from which rows are checked again at the end (``storage.rotation``);
    ``scanned`` and ``rewritten`` count rows over every run of this rotation; ``total`` is
    the number of version rows when the rotation began (for progress; None in a cursor
    written before the field existed, which still decodes).
    """

    to_version: int
    after: bytes
    since_ms: int
    scanned: int = 0
    rewritten: int = 0
    total: int | None = None

    def encode(self) -> bytes:
        """The stored form."""
        row = {
            "v": ROTATION_CURSOR_SCHEMA,
            "to_version": self.to_version,
            "after": self.after,
            "since_ms": self.since_ms,
            "scanned": self.scanned,
            "rewritten": self.rewritten,
            "total": self.total,
        }
        return bytes(msgpack.packb(row, use_bin_type=True))

    @classmethod
    def decode(cls, data: bytes) -> RotationCursor:
        """Parse the stored form.

        Raises:
            CorruptRecord: the row is damaged or of another schema.
        """
        row = _unpack_dict(data, "rotation cursor")
        try:
            if row["v"] != ROTATION_CURSOR_SCHEMA or not isinstance(row["after"], bytes):
                raise ValueError("schema")
            return cls(
                int(row["to_version"]),
                row["after"],
                int(row["since_ms"]),
                int(row["scanned"]),
                int(row["rewritten"]),
                None if row.get("total") is None else int(row["total"]),
            )
        except (KeyError, TypeError, ValueError):
            raise CorruptRecord("rotation cursor is damaged", field="rotation") from None


def raft_entry_key(index: int) -> bytes:
    """The key of the Raft log entry at ``index``."""
    return RAFT_ENTRY_PREFIX + index.to_bytes(8, "big")


def split_raft_entry_key(key: bytes) -> int:
    """The index of a Raft entry key.

    Raises:
        CorruptRecord: not a Raft entry key.
    """
    if not key.startswith(RAFT_ENTRY_PREFIX) or len(key) != len(RAFT_ENTRY_PREFIX) + 8:
        raise CorruptRecord("raft entry key is damaged", field="raft")
    return int.from_bytes(key[len(RAFT_ENTRY_PREFIX) :], "big")


def hints_prefix(target: str) -> bytes:
    """The prefix shared by every hint for ``target`` (a node name: no SEP in it)."""
    return HINT_PREFIX + target.encode("ascii") + SEP


def hint_key(target: str, seq: int) -> bytes:
    """The key of hint number ``seq`` for ``target``."""
    return hints_prefix(target) + seq.to_bytes(8, "big")


def split_hint_key(key: bytes) -> tuple[str, int]:
    """(target, seq) of a hint key.

    Raises:
        CorruptRecord: not a hint key.
    """
    body = key[len(HINT_PREFIX) :]
    target, sep, seq = body[:-9], body[-9:-8], body[-8:]  # seq bytes may hold SEP
    if not key.startswith(HINT_PREFIX) or sep != SEP or not target or not target.isascii():
        raise CorruptRecord("hint key is damaged", field="hint")
    return target.decode("ascii"), int.from_bytes(seq, "big")


@dataclass(frozen=True)
class HintRow:
    """The stored form of one hint: versions of ``context`` waiting for ``target``."""

    target: str
    context: str
    created_ms: int
    envelopes: tuple[bytes, ...]

    def encode(self) -> bytes:
        """The stored form."""
        row = {
            "v": HINT_SCHEMA,
            "target": self.target,
            "context": self.context,
            "created_ms": self.created_ms,
            "envelopes": list(self.envelopes),
        }
        return bytes(msgpack.packb(row, use_bin_type=True))

    @classmethod
    def decode(cls, data: bytes) -> HintRow:
        """Parse the stored form.

        Raises:
            CorruptRecord: the row is damaged or of another schema.
        """
        row = _unpack_dict(data, "hint")
        try:
            envelopes = row["envelopes"]
            if row["v"] != HINT_SCHEMA or not isinstance(envelopes, list):
                raise ValueError("schema")
            if not all(isinstance(env, bytes) for env in envelopes):
                raise ValueError("envelopes")
            return cls(
                str(row["target"]), str(row["context"]), int(row["created_ms"]), tuple(envelopes)
            )
        except (KeyError, TypeError, ValueError):
            raise CorruptRecord("hint row is damaged", field="hint") from None


def _unpack_dict(data: bytes, what: str) -> dict[str, Any]:
    try:
        row = msgpack.unpackb(data, raw=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
        raise CorruptRecord(f"{what} row does not decode", field=what) from None
    if not isinstance(row, dict):
        raise CorruptRecord(f"{what} row is not a map", field=what)
    return row
