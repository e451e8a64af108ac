"""The append-only, hash-chained audit log (ARCHITECTURE.md §5, "Audit log").

Owns: the audit rows in a LevelDB key range and their format (``AUDIT_FORMAT`` 1):

- entry rows: key ``prefix + b"%016x" % seq`` (lower-case hex, so keys sort by seq); value
  the msgpack map ``{"v": 1, "seq", "ts_ms", "actor", "op", "address", "outcome", "prev",
  "hash"}``, where ``prev`` is the previous entry's hash (32 zero bytes for seq 0) and
  ``hash`` is SHA-256 over the msgpack of every other field as a map with sorted keys;
- the head row: key ``prefix + b"head"``, value ``{"v": 1, "seq": last seq, "hash": last
  hash}``, written in the same batch as each entry, so deleting the *last* entry is
  detected too. No head row means an empty log.

Must not know: what the operations mean, records, nodes. It only needs a LevelDB-like
object (``AuditDB``; a plyvel ``DB`` or ``PrefixedDB`` fits).

Invariants and limits: entries are never rewritten; ``verify`` names the first entry where
the chain breaks. The chain is unkeyed: whoever can write the DB *and* recompute SHA-256
can rewrite a suffix including the head without detection. Detecting that needs the head
hash anchored elsewhere (peers, a signed checkpoint); this module does not do that.

Durability: rows are written with ``sync=False``, like LevelDB's default. They reach the
OS when the call returns (a process crash loses nothing) but an OS crash or power loss may
lose the newest entries; since an entry and the head row share one atomic batch, what is
lost is a clean suffix and the chain still verifies. Measured: an append costs ~15 us, a
put's age encryption alone ~500 us (2 KB, 3 recipients), an fsync ~1.2 ms; syncing every
entry would break the 10% write-latency budget. Writes that must be durable pass their own ``batch``
(the audit rows then commit atomically with the data, at the data's sync setting, at no
extra write).
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import msgpack

from crypto.errors import AuditChainBroken, AuditError

AUDIT_FORMAT = 1
GENESIS_PREV = bytes(32)
HEAD_KEY = b"head"
# Entry keys lie in [b"0", b"g"). The start is deliberately shorter than any entry key:
# plyvel 1.5.1's reverse iterator yields nothing when its first row equals ``start``.
_ENTRY_START = b"0"
_ENTRY_KEY = re.compile(rb"[0-9a-f]{16}")
_ENTRY_STOP = b"g"  # hex keys sort below b"g"; b"head" sorts above it
_FIELDS = {"v", "seq", "ts_ms", "actor", "op", "address", "outcome", "prev", "hash"}


class WriteBatchLike(Protocol):
    """A write batch of the same database (plyvel's ``WriteBatch``)."""

    def put(self, key: bytes, value: bytes) -> None: ...


class OwnBatch(WriteBatchLike, Protocol):
    """A batch the log writes itself."""

    def write(self) -> None: ...


class AuditDB(Protocol):
    """What the log needs of a LevelDB handle (plyvel ``DB`` or ``PrefixedDB``)."""

    def get(self, key: bytes) -> bytes | None: ...

    def write_batch(self, *, sync: bool = ...) -> OwnBatch: ...

    def iterator(
        self, *, reverse: bool = ..., start: bytes | None = ..., stop: bytes | None = ...
    ) -> Iterator[tuple[bytes, bytes]]: ...


@dataclass(frozen=True)
class AuditEntry:
    """One audit entry; ``hash`` commits to every other field, ``prev`` included."""

    seq: int
    ts_ms: int
    actor: str
    op: str
    address: str | None
    outcome: str
    prev: bytes
    hash: bytes

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (hashes as hex) for ``slurp audit tail --json``."""
        return {
            "seq": self.seq,
            "ts_ms": self.ts_ms,
            "actor": self.actor,
            "op": self.op,
            "address": self.address,
            "outcome": self.outcome,
            "prev": self.prev.hex(),
            "hash": self.hash.hex(),
        }


def _fields(entry: AuditEntry) -> dict[str, Any]:
    """Every field but ``hash``, as a map with sorted keys (the canonical order)."""
    return {
        "actor": entry.actor,
        "address": entry.address,
        "op": entry.op,
        "outcome": entry.outcome,
        "prev": entry.prev,
        "seq": entry.seq,
        "ts_ms": entry.ts_ms,
        "v": AUDIT_FORMAT,
    }


def _digest(fields: dict[str, Any]) -> bytes:
    return hashlib.sha256(msgpack.packb(fields, use_bin_type=True)).digest()


def entry_hash(entry: AuditEntry) -> bytes:
    """SHA-256 over the canonical msgpack of every field but ``hash``."""
    return _digest(_fields(entry))


def _entry(fields: dict[str, Any], digest: bytes) -> AuditEntry:
    """The entry ``fields`` (as ``_entry_fields`` made them) describe."""
    return AuditEntry(
        fields["seq"], fields["ts_ms"], fields["actor"], fields["op"], fields["address"],
        fields["outcome"], fields["prev"], digest,
    )  # fmt: skip


def _decode(value: bytes) -> AuditEntry | None:
    """The entry in ``value``, or None if it is not a well-formed format-1 entry."""
    try:
        m = msgpack.unpackb(value, raw=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
        return None
    if not isinstance(m, dict) or set(m) != _FIELDS or m["v"] != AUDIT_FORMAT:
        return None
    types_ok = (
        all(isinstance(m[k], int) for k in ("seq", "ts_ms"))
        and all(isinstance(m[k], str) for k in ("actor", "op", "outcome"))
        and (m["address"] is None or isinstance(m["address"], str))
        and all(isinstance(m[k], bytes) and len(m[k]) == 32 for k in ("prev", "hash"))
    )
    if not types_ok:
        return None
    return AuditEntry(**{k: v for k, v in m.items() if k != "v"})


def _seq_of(key: bytes) -> int | None:
    """The seq a row key names, or None for a key that is not ``%016x``."""
    return int(key, 16) if _ENTRY_KEY.fullmatch(key) else None


class AuditLog:
    """The audit log in one key range of a LevelDB database; safe to share between threads.

    ``lock`` (an ``RLock``) serializes appends. A caller that passes ``batch`` to ``append``
    and writes batches from several threads should hold ``lock`` around ``append`` *and*
    ``batch.write()``, so batches reach the disk in seq order; and it must not drop a batch
    it gave to ``append``, or ``verify`` will later report that entry as deleted.
    """

    def __init__(self, db: AuditDB, *, clock_ms: Callable[[], int], prefix: bytes = b"") -> None:
        """Open the log, continuing the chain from its head row.

        Args:
            db: The database (or prefixed database).
            clock_ms: Wall-clock milliseconds for ``ts_ms``.
            prefix: Prepended to every key this log reads or writes. Use it when the log
                shares ``db`` with data rows and you want the two in one batch: batches
                given to ``append`` must come from ``db`` itself.

        Raises:
            AuditChainBroken: Entries exist but the head row is missing or unreadable.
        """
        self.lock = threading.RLock()
        self._db = db
        self._clock_ms = clock_ms
        self._prefix = prefix
        head = self._read_head()
        if head is None:
            last = next(self._entries(reverse=True), None)
            if last is not None:
                seq = (_seq_of(last[0]) or 0) + 1
                raise AuditChainBroken("head row missing", seq=seq, reason="deleted")
            self._next_seq, self._last_hash = 0, GENESIS_PREV
        else:
            self._next_seq, self._last_hash = head[0] + 1, head[1]

    def _key(self, seq: int) -> bytes:
        return self._prefix + b"%016x" % seq

    def _entries(
        self, *, reverse: bool = False, start: bytes = _ENTRY_START
    ) -> Iterator[tuple[bytes, bytes]]:
        """(row key without prefix, value) over the entry key range; snapshot taken now."""
        rows = self._db.iterator(
            reverse=reverse, start=self._prefix + start, stop=self._prefix + _ENTRY_STOP
        )
        cut = len(self._prefix)
        return ((key[cut:], value) for key, value in rows)

    def _read_head(self) -> tuple[int, bytes] | None:
        raw = self._db.get(self._prefix + HEAD_KEY)
        if raw is None:
            return None
        try:
            head = msgpack.unpackb(raw, raw=False)
            seq, digest = head["seq"], head["hash"]
        except (ValueError, TypeError, KeyError, msgpack.ExtraData, msgpack.FormatError):
            raise AuditChainBroken("head row unreadable", seq=0, reason="edited") from None
        if not isinstance(seq, int) or not isinstance(digest, bytes):
            raise AuditChainBroken("head row unreadable", seq=0, reason="edited")
        return seq, digest

    def append(
        self,
        actor: str,
        op: str,
        address: str | None,
        outcome: str,
        *,
        batch: WriteBatchLike | None = None,
    ) -> AuditEntry:
        """Append one entry.

        Args:
            actor: Who acted, e.g. ``"backend_developer@node-1"`` or ``"client:alice"``.
            op: What was done: ``"store"``, ``"retrieve"``, ``"keys.combine"``, ...
            address: The UCXL address concerned, if any.
            outcome: ``"ok"`` or an error code.
            batch: A write batch of ``db`` to add the rows to; the caller writes it. Without
                one, the rows are written now (``sync=False``, see the module docstring).

        Returns:
            The entry as stored.

        Raises:
            AuditError: An empty ``actor``, ``op`` or ``outcome``.
        """
        with self.lock:
            seq, ts_ms = self._next_seq, int(self._clock_ms())
            fields, digest = self._entry_fields(actor, op, address, outcome, seq, ts_ms)
            if batch is None:
                own = self._db.write_batch(sync=False)
                self._put_rows(own, fields, digest)
                own.write()
            else:
                self._put_rows(batch, fields, digest)
            self._next_seq, self._last_hash = seq + 1, digest
        return _entry(fields, digest)

    def append_many(self, entries: Sequence[tuple[str, str, str | None, str]]) -> list[AuditEntry]:
        """Append ``(actor, op, address, outcome)`` entries in one write (a batch of writes
        is audited in one LevelDB batch, not one per record); nothing is appended unless
        every entry is valid and the write succeeds.

        Raises:
            AuditError: An entry with an empty ``actor``, ``op`` or ``outcome``.
        """
        out: list[AuditEntry] = []
        with self.lock:
            seq, prev, ts_ms = self._next_seq, self._last_hash, int(self._clock_ms())
            own = self._db.write_batch(sync=False)
            for actor, op, address, outcome in entries:
                fields, digest = self._entry_fields(actor, op, address, outcome, seq, ts_ms, prev)
                self._put_rows(own, fields, digest)
                out.append(_entry(fields, digest))
                seq, prev = seq + 1, digest
            if out:
                own.write()
                self._next_seq, self._last_hash = seq, prev
        return out

    def _entry_fields(
        self, actor: str, op: str, address: str | None, outcome: str, seq: int, ts_ms: int,
        prev: bytes | None = None,
    ) -> tuple[dict[str, Any], bytes]:  # fmt: skip
        """An entry's hashed fields and digest (``prev``: the chain so far by default)."""
        if not (actor and op and outcome):
            raise AuditError("actor, op and outcome must not be empty")
        fields = {
            "actor": actor,
            "address": address,
            "op": op,
            "outcome": outcome,
            "prev": self._last_hash if prev is None else prev,
            "seq": seq,
            "ts_ms": ts_ms,
            "v": AUDIT_FORMAT,
        }
        return fields, _digest(fields)

    def _put_rows(self, batch: WriteBatchLike, fields: dict[str, Any], digest: bytes) -> None:
        head = {"v": AUDIT_FORMAT, "seq": fields["seq"], "hash": digest}
        batch.put(
            self._key(fields["seq"]), msgpack.packb({**fields, "hash": digest}, use_bin_type=True)
        )
        batch.put(self._prefix + HEAD_KEY, msgpack.packb(head, use_bin_type=True))

    def entries(self) -> Iterator[AuditEntry]:
        """Every entry, oldest first, one at a time (a snapshot taken now).

        Raises:
            AuditError: An entry is unreadable (run ``verify``).
        """
        for key, value in self._entries():
            entry = _decode(value)
            if entry is None:
                raise AuditError(f"audit row {key.decode('ascii', 'replace')} is unreadable")
            yield entry

    def tail(self, n: int = 20) -> list[AuditEntry]:
        """The last ``n`` entries, oldest first.

        Raises:
            AuditError: An entry among them is unreadable (run ``verify``).
        """
        entries: list[AuditEntry] = []
        for key, value in self._entries(reverse=True):
            if len(entries) >= n:
                break
            entry = _decode(value)
            if entry is None:
                raise AuditError(f"audit row {key.decode('ascii', 'replace')} is unreadable")
            entries.append(entry)
        return entries[::-1]

    def verify(self) -> int:
        """Walk the whole chain.

        Returns:
            The number of entries verified.

        Raises:
            AuditChainBroken: ``seq`` is the first entry that breaks the chain; ``reason``
                is ``"edited"`` (an entry's content or hash changed, or an entry was
                replaced by a forgery), ``"deleted"`` (an entry is missing, also the last
                one), ``"inserted"`` (a row that was never appended) or ``"reordered"``
                (an entry sits at another entry's position).
        """
        with self.lock:  # head and iterator snapshot agree
            head = self._read_head()
            rows = _Peekable(self._entries())
        expected, prev = 0, GENESIS_PREV
        for key, value in rows:
            seq = _seq_of(key)
            if seq is None:
                raise AuditChainBroken(
                    "a row that is not an entry", seq=expected, reason="inserted"
                )
            if seq > expected:
                raise self._missing(expected, key)
            if head is not None and seq > head[0]:
                raise AuditChainBroken("an entry beyond the head", seq=seq, reason="inserted")
            entry = _decode(value)
            if entry is None or entry.hash != entry_hash(entry):
                raise AuditChainBroken("entry content changed", seq=seq, reason="edited")
            if entry.seq > seq:
                raise self._missing(seq, key)
            if entry.seq < seq:
                raise AuditChainBroken(
                    f"entry {entry.seq} appears again at {seq}", seq=entry.seq, reason="inserted"
                )
            if entry.prev != prev:
                raise self._unlinked(entry, rows.peek(), head)
            expected, prev = seq + 1, entry.hash
        if head is None and expected:
            raise AuditChainBroken("head row missing", seq=expected, reason="deleted")
        if head is not None and head[0] >= expected:
            raise AuditChainBroken(
                "entries before the head are missing", seq=expected, reason="deleted"
            )
        if head is not None and head[1] != prev:
            raise AuditChainBroken(
                "last entry does not match the head", seq=expected - 1, reason="edited"
            )
        return expected

    def _missing(self, seq: int, from_key: bytes) -> AuditChainBroken:
        """Entry ``seq`` is not where it belongs: moved elsewhere, or gone?"""
        for _, value in self._entries(start=from_key):
            entry = _decode(value)
            if entry is not None and entry.seq == seq:
                return AuditChainBroken(f"entry {seq} is out of place", seq=seq, reason="reordered")
        return AuditChainBroken(f"entry {seq} is missing", seq=seq, reason="deleted")

    @staticmethod
    def _unlinked(
        entry: AuditEntry, following: tuple[bytes, bytes] | None, head: tuple[int, bytes] | None
    ) -> AuditChainBroken:
        """``entry`` is intact but does not link to its predecessor: which one is forged?"""
        successor = _decode(following[1]) if following is not None else None
        if successor is not None and successor.seq == entry.seq:
            return AuditChainBroken("a forged entry was inserted", seq=entry.seq, reason="inserted")
        if successor is not None:
            entry_is_original = successor.prev == entry.hash
        else:
            entry_is_original = head is not None and head[1] == entry.hash
        forged = entry.seq - 1 if entry_is_original else entry.seq
        return AuditChainBroken(f"entry {forged} was replaced", seq=forged, reason="edited")


class _Peekable:
    """An iterator of rows with one row of lookahead."""

    def __init__(self, rows: Iterator[tuple[bytes, bytes]]) -> None:
        self._rows = rows
        self._next: tuple[bytes, bytes] | None = None

    def __iter__(self) -> _Peekable:
        return self

    def __next__(self) -> tuple[bytes, bytes]:
        if self._next is not None:
            row, self._next = self._next, None
            return row
        return next(self._rows)

    def peek(self) -> tuple[bytes, bytes] | None:
        if self._next is None:
            self._next = next(self._rows, None)
        return self._next
