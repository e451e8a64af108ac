"""The queue of contexts whose index document is stale (a pure core: no I/O, no clock).

Owns: which contexts wait for the background indexer, since when (for the lag figures),
which of them a running drain has taken, and when the durable "stale" row of a context
(``schema.index_dirty_key``) may be deleted. Must not know the index, LevelDB, trio or
what a context holds; ``storage.index_sync`` is its shell (one lock around every call).

A replica acknowledges a replicated write once its versions are durable; indexing them
happens later, in batches (``storage.index_sync``). The life of one context here:

    begin(ctx)       a writer is about to write its versions and its durable stale row
    end(ctx, now)    the write is done: the context is queued (if it changed)
    take(limit)      a drain takes the oldest queued contexts and indexes their heads
    forget(ctx)      the context was removed from the index (purge): a drain that took it
                     must not index it
    defer(ctx)       the drain cannot index it yet (its signer is not trusted yet): it
                     waits, out of the figures, until ``retry_deferred`` (a key became
                     trusted) or the next open; its durable row stays
    settle()         the drain's index commit is done: the stale rows it may delete

Invariants:
    - A stale row is released by ``settle`` (or ``end``) only for a context that is neither
      queued, nor being written (between ``begin`` and ``end``), nor taken by a drain that
      has not committed, nor deferred: every durable row whose version is not yet in a
      committed index document stays, so a crash loses no queued work (rows are re-read
      on open).
    - A drain indexes the head it reads *after* ``take``; a write that ends after that is
      queued again, so the next drain sees it. Nothing is dropped, at worst indexed twice.
    - At most ``max_contexts`` contexts are held in memory. Past that, ``overflowed`` is set
      and the durable rows are the queue: the shell refills from them when the memory
      queue runs empty (``refill``). ``pending`` is then a lower bound.
    - ``lag_ms`` is the age of the oldest context queued or taken, 0 when there is none.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

MAX_QUEUED_CONTEXTS = 65_536


class IndexQueue:
    """See the module docstring. Context keys are ``ContextName.key()`` bytes."""

    def __init__(self, max_contexts: int = MAX_QUEUED_CONTEXTS) -> None:
        if max_contexts < 1:
            raise ValueError(f"max_contexts must be >= 1, not {max_contexts}")
        self._max = max_contexts
        self._queued: dict[bytes, int] = {}  # key -> first marked (ms); FIFO by insertion
        self._writing: dict[bytes, int] = {}  # key -> writers between begin and end
        self._taken: dict[bytes, tuple[int, bool]] = {}  # key -> (since, still to index)
        self._deferred: dict[bytes, int] = {}  # key -> since; not indexable yet
        self.overflowed = False

    # -- writers ---------------------------------------------------------------------------

    def begin(self, keys: Iterable[bytes]) -> None:
        """A writer is about to write versions (and stale rows) of ``keys``."""
        for key in keys:
            self._writing[key] = self._writing.get(key, 0) + 1

    def end(self, changed: Iterable[bytes], unchanged: Iterable[bytes], now_ms: int) -> list[bytes]:
        """The write that ``begin`` announced is durable.

        Args:
            changed: keys that got a new (or re-sealed) version: queued.
            unchanged: the other keys of that write (every version already held).
            now_ms: the time of the write, for the lag.

        Returns:
            Keys of ``unchanged`` whose stale row the write may delete at once (no other
            work waits on it).
        """
        changed, unchanged = list(changed), list(unchanged)
        for key in (*changed, *unchanged):
            left = self._writing.get(key, 0) - 1
            if left > 0:
                self._writing[key] = left
            else:
                self._writing.pop(key, None)
        for key in changed:
            self.mark(key, now_ms)
        return [key for key in unchanged if self._idle(key)]

    def mark(self, key: bytes, now_ms: int) -> None:
        """Queue ``key`` (a no-op when it is queued already: its first time is kept)."""
        if key in self._queued:
            return
        if len(self._queued) >= self._max:
            self.overflowed = True  # its durable row stays; ``refill`` brings it back
            return
        self._queued[key] = now_ms

    def forget(self, key: bytes) -> None:
        """``key`` left the index (purge): not queued any more, and a drain that took it
        must not index it."""
        self._queued.pop(key, None)
        if key in self._taken:
            self._taken[key] = (self._taken[key][0], False)

    # -- the drain ---------------------------------------------------------------------------

    def take(self, limit: int) -> list[bytes]:
        """Take up to ``limit`` of the oldest queued keys for indexing."""
        out: list[bytes] = []
        for key in self._queued:
            if len(out) >= limit:
                break
            out.append(key)
        for key in out:
            since = self._queued.pop(key)
            self._taken[key] = (min(since, self._taken.get(key, (since, True))[0]), True)
        return out

    def defer(self, key: bytes) -> None:
        """A taken (or queued) ``key`` cannot be indexed yet: it waits for
        ``retry_deferred``."""
        since: int | None = None
        if key in self._taken:
            since = self._taken.pop(key)[0]
        elif key in self._queued:
            since = self._queued.pop(key)
        if since is not None:
            self._deferred[key] = min(since, self._deferred.get(key, since))

    def retry_deferred(self) -> None:
        """Queue the deferred keys again (something that made them unindexable changed)."""
        deferred, self._deferred = self._deferred, {}
        for key, since in deferred.items():
            if key not in self._queued:
                if len(self._queued) >= self._max:
                    self.overflowed = True  # their rows remain
                    continue
                self._queued[key] = since

    def wanted(self, key: bytes) -> bool:
        """Whether a taken ``key`` is still to be indexed (not forgotten since)."""
        return self._taken.get(key, (0, False))[1]

    def settle(self) -> list[bytes]:
        """The drain's index commit is done: forget what it took; return the keys whose
        stale rows may be deleted (taken, and neither queued again nor being written)."""
        taken, self._taken = self._taken, {}
        return [key for key in taken if self._idle(key)]

    def refill(self, rows: Sequence[tuple[bytes, int]], *, complete: bool) -> None:
        """Queue durable stale rows (key, since ms) read back after an overflow or on open.

        ``complete``: ``rows`` are every row there is (clears ``overflowed``).
        """
        for key, since in rows:
            if key not in self._queued and key not in self._taken and key not in self._deferred:
                if len(self._queued) >= self._max:
                    self.overflowed = True
                    return
                self._queued[key] = since
        if complete:
            self.overflowed = False

    # -- figures -------------------------------------------------------------------------------

    def pending(self) -> int:
        """Contexts queued or being indexed (a lower bound while ``overflowed``; deferred
        ones are not counted: they wait for a trust change, not for the indexer)."""
        return len(self._queued) + len(self._taken)

    def lag_ms(self, now_ms: int) -> int:
        """Age of the oldest context queued or being indexed; 0 when there is none."""
        oldest = min(
            (*self._queued.values(), *(since for since, _ in self._taken.values())),
            default=None,
        )
        return 0 if oldest is None else max(0, now_ms - oldest)

    def _idle(self, key: bytes) -> bool:
        return not (
            key in self._queued
            or key in self._writing
            or key in self._taken
            or key in self._deferred
        )
