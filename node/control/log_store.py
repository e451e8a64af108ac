"""Raft persistence over the node's KV: hard state, the latest snapshot, the log after it.

Owns the ``r/`` rows of ``storage.schema`` (``r/hs``, ``r/snap``, ``r/e/`` + index) and
how a ``Ready`` is made durable (etcd-io/raft's Storage, written by the shell): every
``save`` is ONE ``kv.write`` batch, so a crash leaves either all of a Ready's state or
none of it, and ``sync=True`` (the Ready's ``must_sync``) returns only once it is on disk.
A failed write raises (``storage.errors.Unavailable``); the caller must treat it as fatal
and never retry (research/control-plane.md §3, "fsyncgate").

Must not know the metadata inside a snapshot, or the Raft rules beyond the log's shape.

Invariants:
- the stored entries are contiguous, from the snapshot's index + 1 (from 1 without one);
- ``save`` discards stored entries >= the index of the first entry it writes (Raft §5.3);
- a snapshot discards the entries it covers; a *received* snapshot (``save``) keeps the
  entries after it only when the stored entry at its index has its term (thesis §5.1),
  else it discards the whole log; ``compact`` (a local snapshot) keeps the tail;
- ``load`` returns a validated ``PersistedState`` or raises ``CorruptRecord`` naming the
  row (a damaged row, a gap, an entry stored under another index, a commit past the log).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise
from typing import Any

import msgpack

from node.control.raft_types import (
    MAX_ID_LENGTH,
    Entry,
    HardState,
    MalformedRaftData,
    PersistedState,
    Snapshot,
    entry_from_wire,
    snapshot_from_wire,
)
from node.errors import NodeError
from storage.errors import CorruptRecord
from storage.kv import KV
from storage.schema import (
    RAFT_ENTRY_PREFIX,
    RAFT_HARD_STATE,
    RAFT_PREFIX,
    RAFT_SCHEMA,
    RAFT_SNAPSHOT,
    raft_entry_key,
    split_raft_entry_key,
)


class RaftStoreError(NodeError):
    """The caller asked for something that would break the stored log (a bug upstream)."""


class RaftStateExists(RaftStoreError):
    """A bootstrap was asked for on a node that already has Raft state."""


def _pack(row: dict[str, Any]) -> bytes:
    return bytes(msgpack.packb({"v": RAFT_SCHEMA, **row}, use_bin_type=True))


def _corrupt(key: bytes, why: str) -> CorruptRecord:
    return CorruptRecord(f"raft row {key.decode('ascii', 'backslashreplace')}: {why}", field="raft")


def _unpack(key: bytes, data: bytes) -> dict[Any, Any]:
    try:
        row = msgpack.unpackb(data, raw=False)
    except (ValueError, TypeError, msgpack.FormatError, msgpack.StackError):
        raise _corrupt(key, "does not decode") from None
    if not isinstance(row, dict):
        raise _corrupt(key, "not a map")
    if row.get("v") != RAFT_SCHEMA:
        raise _corrupt(key, f"schema is not {RAFT_SCHEMA}")
    return row


def _hard_state(data: bytes) -> HardState:
    row = _unpack(RAFT_HARD_STATE, data)
    term, commit = (_count(row.get(name), name) for name in ("term", "commit"))
    vote = row.get("vote")
    if vote is not None and not (isinstance(vote, str) and 0 < len(vote) <= MAX_ID_LENGTH):
        raise _corrupt(RAFT_HARD_STATE, "vote is not a node id")
    return HardState(term, vote, commit)


def _count(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise _corrupt(RAFT_HARD_STATE, f"{name} is not a non-negative integer")
    return value


def _snapshot(data: bytes) -> Snapshot:
    try:
        return snapshot_from_wire(_unpack(RAFT_SNAPSHOT, data))
    except MalformedRaftData as exc:
        raise _corrupt(RAFT_SNAPSHOT, str(exc)) from None


def _entry(key: bytes, data: bytes) -> Entry:
    if not key.startswith(RAFT_ENTRY_PREFIX) or len(key) != len(RAFT_ENTRY_PREFIX) + 8:
        raise _corrupt(key, "not an entry key")
    index = split_raft_entry_key(key)
    try:
        entry = entry_from_wire(_unpack(key, data))
    except MalformedRaftData as exc:
        raise _corrupt(key, str(exc)) from None
    if entry.index != index:
        raise _corrupt(key, f"holds the entry at index {entry.index}")
    return entry


class RaftLogStore:
    """The Raft rows of one node's KV (LevelDB in production, MemoryKV in simulation)."""

    def __init__(self, kv: KV) -> None:
        self._kv = kv

    def has_state(self) -> bool:
        """Whether any Raft row exists (a bootstrapped or running node)."""
        return next(iter(self._kv.scan_keys(RAFT_PREFIX)), None) is not None

    def load(self) -> PersistedState:
        """The hard state, the snapshot and the entries after it, validated.

        Raises:
            CorruptRecord: a row is damaged, the entries have a gap or do not follow the
                snapshot, or the commit index lies past the log; the message names the row.
        """
        hs_data = self._kv.get(RAFT_HARD_STATE)
        hard_state = HardState() if hs_data is None else _hard_state(hs_data)
        snap_data = self._kv.get(RAFT_SNAPSHOT)
        snapshot = None if snap_data is None else _snapshot(snap_data)
        expected = 1 if snapshot is None else snapshot.meta.index + 1
        entries = []
        for key, data in self._kv.scan(RAFT_ENTRY_PREFIX):
            entry = _entry(key, data)
            if entry.index != expected:
                raise _corrupt(key, f"the log has a gap: expected the entry at {expected}")
            entries.append(entry)
            expected += 1
        if hard_state.commit > expected - 1:
            raise _corrupt(RAFT_HARD_STATE, f"commit {hard_state.commit} is past the log")
        return PersistedState(hard_state, snapshot, tuple(entries))

    def _stored_snapshot_index(self) -> int:
        data = self._kv.get(RAFT_SNAPSHOT)
        return 0 if data is None else _snapshot(data).meta.index

    def _entry_keys(self) -> list[bytes]:
        return list(self._kv.scan_keys(RAFT_ENTRY_PREFIX))

    def _last_index(self, entry_keys: list[bytes], snapshot_index: int) -> int:
        return split_raft_entry_key(entry_keys[-1]) if entry_keys else snapshot_index

    def _keeps_tail(self, snapshot: Snapshot) -> bool:
        """Whether the log after a received snapshot stays (thesis §5.1)."""
        data = self._kv.get(raft_entry_key(snapshot.meta.index))
        if data is not None:
            return _entry(raft_entry_key(snapshot.meta.index), data).term == snapshot.meta.term
        stored = self._kv.get(RAFT_SNAPSHOT)
        return stored is not None and _snapshot(stored).meta == snapshot.meta

    def save(
        self,
        *,
        snapshot: Snapshot | None = None,
        entries: Sequence[Entry] = (),
        hard_state: HardState | None = None,
        sync: bool,
    ) -> None:
        """Make one Ready's snapshot, entries and hard state durable in one batch.

        Args:
            snapshot: a snapshot received from the leader (replaces the log it covers).
            entries: contiguous entries; the first discards stored entries at and after it.
            hard_state: the new hard state.
            sync: the Ready's ``must_sync``: return only once the batch is on disk.

        Raises:
            RaftStoreError: the entries are not contiguous, or would leave a gap after the
                stored log or the snapshot, or start inside the snapshot.
            CorruptRecord: a stored row needed to decide is damaged.
            storage.errors.Unavailable: the write failed (fatal: never retry).
        """
        puts: list[tuple[bytes, bytes]] = []
        deletes: list[bytes] = []
        keys = self._entry_keys()
        snap_index = self._stored_snapshot_index()
        if snapshot is not None:
            snap_index = snapshot.meta.index
            keep = self._keeps_tail(snapshot)
            deletes += [k for k in keys if not keep or split_raft_entry_key(k) <= snap_index]
            keys = [k for k in keys if keep and split_raft_entry_key(k) > snap_index]
            puts.append((RAFT_SNAPSHOT, _pack(snapshot.to_wire())))
        if entries:
            self._check_entries(entries, snap_index, self._last_index(keys, snap_index))
            start = entries[0].index
            deletes += [k for k in keys if split_raft_entry_key(k) >= start]
            puts += [(raft_entry_key(e.index), _pack(e.to_wire())) for e in entries]
        if hard_state is not None:
            row = {"term": hard_state.term, "vote": hard_state.vote, "commit": hard_state.commit}
            puts.append((RAFT_HARD_STATE, _pack(row)))
        if puts or deletes:
            self._kv.write(puts, deletes, sync=sync)

    @staticmethod
    def _check_entries(entries: Sequence[Entry], snapshot_index: int, last_index: int) -> None:
        for before, after in pairwise(entries):
            if after.index != before.index + 1:
                raise RaftStoreError(f"entries are not contiguous at {after.index}")
        start = entries[0].index
        if start <= snapshot_index:
            raise RaftStoreError(f"entry {start} lies inside the snapshot at {snapshot_index}")
        if start > last_index + 1:
            raise RaftStoreError(f"entry {start} would leave a gap after {last_index}")

    def compact(self, snapshot: Snapshot) -> None:
        """Replace the log up to ``snapshot``'s index by the snapshot (a local snapshot of
        applied state); the entries after it stay. One synced batch.

        Raises:
            RaftStoreError: the snapshot is older than the stored one or past the log.
            storage.errors.Unavailable: the write failed.
        """
        keys = self._entry_keys()
        stored = self._stored_snapshot_index()
        index = snapshot.meta.index
        if index < stored or index > self._last_index(keys, stored):
            raise RaftStoreError(f"cannot compact to {index}: the log holds {stored}..")
        dropped = [k for k in keys if split_raft_entry_key(k) <= index]
        self._kv.write([(RAFT_SNAPSHOT, _pack(snapshot.to_wire()))], dropped, sync=True)


def write_bootstrap(kv: KV, snapshot: Snapshot) -> None:
    """Give a fresh node its initial Raft state: ``snapshot`` and a hard state at its term
    and index (no vote), in one synced batch.

    Raises:
        RaftStateExists: the node already has Raft state (never bootstrap twice: a second
            bootstrap could make a node forget a vote or a committed entry).
    """
    store = RaftLogStore(kv)
    if store.has_state():
        raise RaftStateExists("this node already has Raft state; refusing to bootstrap")
    meta = snapshot.meta
    store.save(snapshot=snapshot, hard_state=HardState(meta.term, None, meta.index), sync=True)
