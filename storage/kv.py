"""Ordered key-value stores under the version store: LevelDB (plyvel) and in-memory.

Owns: opening LevelDB safely (a clear error when another process holds it), durable
writes with group commit, ordered prefix scans. The in-memory store serves the
simulation tier and passes the same contract tests (tests/storage/test_kv_contract.py).
Must not know what the keys mean (``storage.schema`` does).

Group commit: ``write(..., sync=True)`` from several threads at once is folded into one
LevelDB write batch and one fsync. The first writer to arrive becomes the leader: it takes
every queued batch, writes them in arrival order with ``sync=True``, and wakes the
followers. A writer returns only after its own batch is on disk (or raises).
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import plyvel

from storage.errors import DataDirInUse, Internal, StorageError, Unavailable

Puts = Sequence[tuple[bytes, bytes]]
Deletes = Sequence[bytes]


class KV(Protocol):
    """An ordered byte-key store."""

    def get(self, key: bytes) -> bytes | None:
        """The value of ``key``, or None."""

    def write(self, puts: Puts, deletes: Deletes = (), *, sync: bool = True) -> None:
        """Apply deletes then puts atomically; durable before returning when ``sync``."""

    def scan(
        self, prefix: bytes, *, reverse: bool = False, after: bytes | None = None
    ) -> Iterator[tuple[bytes, bytes]]:
        """Every (key, value) whose key starts with ``prefix``, in key order.

        ``after`` (forward scans only) resumes a scan: only keys greater than it.
        """

    def scan_keys(self, prefix: bytes) -> Iterator[bytes]:
        """Every key that starts with ``prefix``, in key order, without reading values."""

    def compact(self) -> None:
        """Reclaim space from deleted and overwritten rows."""

    def close(self) -> None:
        """Release the store; further use is an error."""


@dataclass
class _Pending:
    puts: Puts
    deletes: Deletes
    done: bool = False
    error: BaseException | None = None


@dataclass
class GroupCommitStats:
    """How many synced writes were asked for and how many fsyncs served them."""

    writes: int = 0
    syncs: int = 0
    largest_group: int = 0


class LevelDBKV:
    """LevelDB through plyvel, with group commit for synced writes."""

    def __init__(self, path: Path, *, create: bool = True, lru_cache_bytes: int = 32 << 20):
        try:
            self._db = plyvel.DB(
                str(path),
                create_if_missing=create,
                lru_cache_size=lru_cache_bytes,
                paranoid_checks=True,
            )
        except plyvel.IOError as exc:
            if "lock" in str(exc).lower():
                raise DataDirInUse(
                    f"the database {path} is in use by another process (a running node or "
                    "another slurp command); stop it or use a different --data-dir",
                    field="data_dir",
                ) from None
            raise StorageError(
                f"cannot open the database {path}: {exc}", field="data_dir"
            ) from None
        except plyvel.Error as exc:
            raise StorageError(
                f"cannot open the database {path}: {exc}", field="data_dir"
            ) from None
        self._cv = threading.Condition()
        self._queue: list[_Pending] = []
        self._leader_busy = False
        self.group_stats = GroupCommitStats()

    def get(self, key: bytes) -> bytes | None:
        """The value of ``key``, or None."""
        value: bytes | None = self._db.get(key)
        return value

    def write(self, puts: Puts, deletes: Deletes = (), *, sync: bool = True) -> None:
        """Apply a batch; with ``sync``, return once it is on disk (group commit)."""
        if not sync:
            self._apply([_Pending(puts, deletes)], sync=False)
            return
        mine = _Pending(puts, deletes)
        with self._cv:
            self._queue.append(mine)
            while self._leader_busy and not mine.done:
                self._cv.wait()
            if mine.done:
                self._raise_if_failed(mine)
                return
            self._leader_busy = True
            group, self._queue = self._queue, []
        try:
            self._apply(group, sync=True)
        except BaseException as exc:  # every follower in the group must learn of it
            for pending in group:
                pending.error = exc
            raise
        finally:
            with self._cv:
                for pending in group:
                    pending.done = True
                self.group_stats.writes += len(group)
                self.group_stats.syncs += 1
                self.group_stats.largest_group = max(self.group_stats.largest_group, len(group))
                self._leader_busy = False
                self._cv.notify_all()

    @staticmethod
    def _raise_if_failed(pending: _Pending) -> None:
        if isinstance(pending.error, StorageError):
            raise Unavailable(f"group commit failed: {pending.error.message}", field="data_dir")
        if pending.error is not None:
            raise Internal(f"group commit failed: {type(pending.error).__name__}")

    def _apply(self, group: list[_Pending], *, sync: bool) -> None:
        """Write one batch.

        Raises:
            Unavailable: LevelDB refused the write (disk full, I/O error); nothing of the
                batch is applied, and the node keeps serving.
        """
        try:
            with self._db.write_batch(sync=sync) as batch:
                for pending in group:
                    for key in pending.deletes:
                        batch.delete(key)
                    for key, value in pending.puts:
                        batch.put(key, value)
        except plyvel.Error as exc:
            raise Unavailable(f"the database write failed: {exc}", field="data_dir") from None

    def scan(
        self, prefix: bytes, *, reverse: bool = False, after: bytes | None = None
    ) -> Iterator[tuple[bytes, bytes]]:
        """Every (key, value) under ``prefix``, in key order (or reversed), past ``after``."""
        if after is None:
            with self._db.iterator(prefix=prefix, reverse=reverse) as it:
                yield from it
            return
        _check_after(reverse)
        start, include_start = (after, False) if after >= prefix else (prefix, True)
        with self._db.iterator(start=start, include_start=include_start) as it:
            for key, value in it:
                if not key.startswith(prefix):
                    return
                yield key, value

    def scan_keys(self, prefix: bytes) -> Iterator[bytes]:
        """Every key under ``prefix``, in key order (values are not read)."""
        with self._db.iterator(prefix=prefix, include_value=False) as it:
            yield from it

    def compact(self) -> None:
        """Compact the whole key range."""
        self._db.compact_range()

    @property
    def raw(self) -> Any:
        """The plyvel database itself, for the audit log's own batches (same process)."""
        return self._db

    def property(self, name: str) -> str:
        """A LevelDB property such as ``leveldb.stats`` (empty when unknown)."""
        value = self._db.get_property(name.encode())
        return value.decode() if value else ""

    def close(self) -> None:
        """Close the database (idempotent)."""
        if not self._db.closed:
            self._db.close()


@dataclass
class MemoryKV:
    """An in-memory ordered store for the simulation tier (no durability)."""

    _keys: list[bytes] = field(default_factory=list)
    _values: dict[bytes, bytes] = field(default_factory=dict)
    _closed: bool = False

    def get(self, key: bytes) -> bytes | None:
        """The value of ``key``, or None."""
        self._check()
        return self._values.get(key)

    def write(self, puts: Puts, deletes: Deletes = (), *, sync: bool = True) -> None:
        """Apply deletes then puts."""
        self._check()
        for key in deletes:
            if key in self._values:
                del self._values[key]
                self._keys.pop(bisect.bisect_left(self._keys, key))
        for key, value in puts:
            if key not in self._values:
                bisect.insort(self._keys, key)
            self._values[key] = bytes(value)

    def scan(
        self, prefix: bytes, *, reverse: bool = False, after: bytes | None = None
    ) -> Iterator[tuple[bytes, bytes]]:
        """Every (key, value) under ``prefix``, in key order (or reversed), past ``after``."""
        self._check()
        start = bisect.bisect_left(self._keys, prefix)
        if after is not None:
            _check_after(reverse)
            start = max(start, bisect.bisect_right(self._keys, after))
        keys = []
        for key in self._keys[start:]:
            if not key.startswith(prefix):
                break
            keys.append(key)
        for key in reversed(keys) if reverse else keys:
            yield key, self._values[key]

    def scan_keys(self, prefix: bytes) -> Iterator[bytes]:
        """Every key under ``prefix``, in key order."""
        for key, _ in self.scan(prefix):
            yield key

    def compact(self) -> None:
        """Nothing to reclaim."""
        self._check()

    def close(self) -> None:
        """Mark closed."""
        self._closed = True

    def _check(self) -> None:
        if self._closed:
            raise Internal("the store is closed")


def _check_after(reverse: bool) -> None:
    if reverse:
        raise ValueError("scan(after=...) resumes forward scans only")
