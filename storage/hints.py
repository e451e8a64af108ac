"""Durable hints for hinted handoff: versions held for a replica that could not take them.

Owns the ``H/`` rows of the node's LevelDB (format in ``storage.schema``): adding a hint
with a synced write, listing a target's hints oldest first, deleting them once delivered,
and the byte bound. Must not know about RPC, the ring or who is up (``node.cluster.handoff``
decides when to deliver; ``node.cluster.handoff_plan`` decides who holds a hint).

Invariants:
- ``add`` returns only after the hint is on disk (synced), so a caller may count it toward
  a sloppy write quorum.
- ``bytes`` is the sum of key + value sizes of every stored hint; it is rebuilt by a scan
  at open, so it survives restarts exactly.
- The bound: after ``add``, ``bytes <= max_bytes``. The oldest hints (lowest sequence
  number, over every target) are dropped first, in the same atomic batch as the new one,
  and counted in ``dropped``; anti-entropy repairs what a dropped hint carried. A hint
  larger than the bound by itself is not stored (counted as dropped, ``add`` returns None).
- Sequence numbers grow monotonically across restarts (the next one is one past the
  largest found at open).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from storage.errors import CorruptRecord
from storage.kv import KV
from storage.schema import HINT_PREFIX, HintRow, hint_key, hints_prefix, split_hint_key


@dataclass(frozen=True)
class Hint:
    """One stored hint: versions of one context for one target replica."""

    seq: int
    target: str
    context: str
    created_ms: int
    envelopes: tuple[bytes, ...]
    size: int  # bytes it takes in the store (key + value)


@dataclass(frozen=True)
class HintStats:
    """Counters of one hint store (since this process opened it, except hints/bytes)."""

    hints: int
    hint_bytes: int
    hints_dropped: int
    hints_delivered: int


class HintStore:
    """The ``H/`` hints of one node, bounded in bytes; thread-safe."""

    def __init__(self, kv: KV, *, max_bytes: int, clock_ms: Callable[[], int]) -> None:
        """Open the hints in ``kv``, rebuilding the byte accounting by a scan.

        Args:
            kv: The node's key-value store.
            max_bytes: The bound on the stored size of every hint together (> 0).
            clock_ms: Wall-clock milliseconds, for ``created_ms``.

        Raises:
            ValueError: ``max_bytes`` is not positive.
        """
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, not {max_bytes}")
        self._kv = kv
        self.max_bytes = max_bytes
        self._clock_ms = clock_ms
        self._lock = threading.Lock()
        self._sizes: dict[int, tuple[bytes, int]] = {}  # seq -> (key, size), oldest first
        self._bytes = 0
        self._dropped = 0
        self._delivered = 0
        found: list[tuple[int, bytes, int]] = []
        for key, value in kv.scan(HINT_PREFIX):
            try:
                _, seq = split_hint_key(key)
            except CorruptRecord:
                continue  # not one of ours: never counted, never dropped
            found.append((seq, key, len(key) + len(value)))
        for seq, key, size in sorted(found):
            self._sizes[seq] = (key, size)
            self._bytes += size
        self._next_seq = max(self._sizes, default=0) + 1

    def add(self, target: str, context: str, envelopes: Sequence[bytes]) -> Hint | None:
        """Store a hint durably (synced), dropping the oldest hints beyond the bound.

        Args:
            target: The replica the versions are for.
            context: The canonical context name they belong to.
            envelopes: The encoded versions.

        Returns:
            The stored hint, or None when it alone exceeds the bound (counted as dropped).
        """
        with self._lock:
            seq = self._next_seq
            self._next_seq += 1
            created = self._clock_ms()
            key = hint_key(target, seq)
            value = HintRow(target, context, created, tuple(envelopes)).encode()
            size = len(key) + len(value)
            if size > self.max_bytes:
                self._dropped += 1
                return None
            drops: list[int] = []
            total = self._bytes + size
            for old_seq, (_, old_size) in self._sizes.items():
                if total <= self.max_bytes:
                    break
                drops.append(old_seq)
                total -= old_size
            self._kv.write([(key, value)], [self._sizes[s][0] for s in drops], sync=True)
            for old_seq in drops:
                del self._sizes[old_seq]
            self._dropped += len(drops)
            self._sizes[seq] = (key, size)
            self._bytes = total
            return Hint(seq, target, context, created, tuple(envelopes), size)

    def targets(self) -> list[str]:
        """Every target that has at least one hint, sorted."""
        with self._lock:
            keys = [key for key, _ in self._sizes.values()]
        return sorted({split_hint_key(key)[0] for key in keys})

    def pending(
        self, target: str, *, limit: int | None = None, after: int | None = None
    ) -> list[Hint]:
        """The hints for ``target``, oldest first (at most ``limit``; with ``after``, only
        those whose sequence number is greater: a delivery round resumes past the hints it
        kept).

        A damaged row is skipped (and left for ``discard`` by sequence number to clean).
        """
        hints: list[Hint] = []
        resume = None if after is None else hint_key(target, after)
        for key, value in self._kv.scan(hints_prefix(target), after=resume):
            if limit is not None and len(hints) >= limit:
                break
            try:
                _, seq = split_hint_key(key)
                row = HintRow.decode(value)
            except CorruptRecord:
                continue
            size = len(key) + len(value)
            hints.append(Hint(seq, row.target, row.context, row.created_ms, row.envelopes, size))
        return hints

    def delete(self, hints: Sequence[Hint], *, delivered: bool) -> None:
        """Remove hints (synced): ``delivered`` ones were acknowledged durably by the
        target; the others were refused for good (a purge marker or a bad signature) and
        count as dropped."""
        with self._lock:
            gone = [h for h in hints if h.seq in self._sizes]
            self._kv.write([], [self._sizes[h.seq][0] for h in gone], sync=True)
            for hint in gone:
                self._bytes -= self._sizes.pop(hint.seq)[1]
            if delivered:
                self._delivered += len(gone)
            else:
                self._dropped += len(gone)

    def stats(self) -> HintStats:
        """How many hints and bytes are held, and how many were dropped and delivered."""
        with self._lock:
            return HintStats(len(self._sizes), self._bytes, self._dropped, self._delivered)
