"""The decrypted-record cache, and the set of envelope digests already verified.

Owns: which decrypted values stay in memory, for how long, and the hit/miss/eviction counts.
Entries are keyed by (context key, version id, role, variant): a version is immutable, so
an entry only goes stale when its context is deleted, purged or re-sealed, and the store
then calls ``invalidate_context``. ``variant`` (default empty) names the exact stored copy
when the caller cannot rely on that invalidation: ``storage.replica`` passes the SHA-256
of the envelope bytes it decrypted, so a re-sealed copy (``storage.envelope``
``seal_epoch``) never meets the view of another copy. Must not know what a value is (only
its size, via ``sizeof``), nor log anything: the values are plaintext.

Also owns ``VerifiedDigests``: a bounded LRU set of SHA-256 digests of envelope bytes whose
signature was checked on this node (verify once, where a version enters the node). It
holds digests of bytes, never ids: other bytes under a known version id miss, and are
verified.

Built on ``cachetools.TTLCache`` (LRU order, per-entry TTL, ``getsizeof`` bound), subclassed
to count evictions and expirations and to keep a secondary index context key -> entry keys.

Invariants:
    - The sum of ``sizeof`` over held entries is at most ``max_bytes`` at all times; a value
      larger than ``max_bytes`` is never held.
    - ``sizeof`` is called once per ``put``, outside the lock, and never on ``get``.
    - The secondary index holds exactly the keys the cache holds (updated on put, eviction,
      expiry, invalidation and clear), so invalidation costs O(entries of that context).
    - An entry older than ``ttl_s`` (by the injected clock) is never returned.
    - Thread-safe: one lock around every operation; ``get`` does O(1) work under it, no copy.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Generic, TypeVar

from cachetools import LRUCache, TTLCache

V = TypeVar("V")

_Key = tuple[bytes, str, str, bytes]  # (context key, version id, role, variant)
MAX_VERIFIED_DIGESTS = 65_536  # ~100 bytes each: a few MB


@dataclass(frozen=True)
class CacheConfig:
    """The cache's bounds (the ``[storage]`` table's ``cache_max_bytes`` and ``cache_ttl_s``).

    Attributes:
        max_bytes: upper bound on the summed ``sizeof`` of held values (0 holds only
            zero-sized values).
        ttl_s: seconds an entry lives after its put, by the cache's clock.

    Raises:
        ValueError: ``max_bytes`` is negative or ``ttl_s`` is not positive.
    """

    max_bytes: int = 64 * 1024 * 1024
    ttl_s: float = 300.0

    def __post_init__(self) -> None:
        if self.max_bytes < 0:
            raise ValueError(f"cache max_bytes must be >= 0, not {self.max_bytes}")
        if not self.ttl_s > 0:
            raise ValueError(f"cache ttl_s must be > 0, not {self.ttl_s}")


@dataclass(frozen=True)
class CacheStats:
    """A snapshot of the cache's counters (counters run from construction, ``clear`` included).

    Attributes:
        hits: ``get`` calls that returned a value.
        misses: ``get`` calls that returned None (absent, evicted, expired or invalidated).
        evictions: entries pushed out, least recently used first, to make room for a put.
            Expired entries are not counted here but in ``expirations``.
        invalidations: entries dropped by ``invalidate_context`` (not ``clear``).
        entries: entries held now (expired entries are purged before counting).
        bytes: summed ``sizeof`` of the entries held now.
        max_bytes: the configured bound.
        expirations: entries removed because their TTL ran out.
    """

    hits: int
    misses: int
    evictions: int
    invalidations: int
    entries: int
    bytes: int
    max_bytes: int
    expirations: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape (every field by name)."""
        return asdict(self)


class _IndexedTTLCache(TTLCache[_Key, tuple[V, int]]):
    """A TTLCache of ``(value, size)`` pairs that counts evictions and expirations and keeps
    ``by_context``: context key -> the keys of that context it holds.

    cachetools removes entries through three paths, each overridden here: ``popitem`` (space
    eviction, which deletes through ``__delitem__``), ``expire`` (TTL, which bypasses
    ``__delitem__``) and ``clear``.
    """

    def __init__(self, max_bytes: int, ttl_s: float, clock: Callable[[], float]) -> None:
        super().__init__(max_bytes, ttl_s, clock, _entry_size)
        self.by_context: dict[bytes, set[_Key]] = {}
        self.evictions = 0
        self.expirations = 0

    def __setitem__(self, key: _Key, entry: tuple[V, int]) -> None:
        super().__setitem__(key, entry)  # may evict, even ``key`` itself, before storing
        self.by_context.setdefault(key[0], set()).add(key)

    def __delitem__(self, key: _Key) -> None:
        try:
            super().__delitem__(key)
        finally:  # TTLCache deletes an expired key, then raises KeyError
            self._unindex(key)

    def popitem(self) -> tuple[_Key, tuple[V, int]]:
        item = super().popitem()
        self.evictions += 1
        return item

    def expire(self, time: float | None = None) -> list[tuple[_Key, tuple[V, int]]]:
        expired = super().expire(time)
        for key, _ in expired:
            self._unindex(key)
        self.expirations += len(expired)
        return expired

    def clear(self) -> None:
        super().clear()
        self.by_context.clear()

    def drop_context(self, context_key: bytes) -> int:
        """Drop every live entry of ``context_key``; return how many."""
        with self.timer as now:  # one frozen instant: nothing expires half-way
            self.expire(now)
            keys = self.by_context.pop(context_key, set())
            for key in keys:
                del self[key]
        return len(keys)

    def _unindex(self, key: _Key) -> None:
        keys = self.by_context.get(key[0])
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self.by_context[key[0]]


def _entry_size(entry: tuple[Any, int]) -> int:
    return entry[1]


class RecordCache(Generic[V]):
    """Decrypted records in memory, bounded in bytes, with a TTL and LRU eviction.

    Args:
        config: the bounds.
        sizeof: the size in bytes a value is charged (called once per put).
        clock: seconds, monotonic; injected for tests.
    """

    def __init__(
        self,
        config: CacheConfig,
        *,
        sizeof: Callable[[V], int],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config
        self._sizeof = sizeof
        self._lock = threading.Lock()
        self._cache: _IndexedTTLCache[V] = _IndexedTTLCache(config.max_bytes, config.ttl_s, clock)
        self._hits = 0
        self._misses = 0
        self._invalidations = 0

    def get(
        self, context_key: bytes, version_id: str, role: str, *, variant: bytes = b""
    ) -> V | None:
        """The cached value of that version as read by ``role``, or None (counts a hit or miss).

        Args:
            context_key: ``ContextName.key()`` of the context.
            version_id: the version's id.
            role: the role the value was decrypted as.
            variant: which stored copy it was decrypted from (see the module docstring).

        Returns:
            The value put earlier (the same object, not a copy), or None.
        """
        with self._lock:
            try:
                entry = self._cache[(context_key, version_id, role, variant)]
            except KeyError:
                self._misses += 1
                return None
            self._hits += 1
            return entry[0]

    def put(
        self, context_key: bytes, version_id: str, role: str, value: V, *, variant: bytes = b""
    ) -> None:
        """Hold ``value``, evicting least recently used entries if needed.

        A value whose ``sizeof`` exceeds ``max_bytes`` is not held (and any entry under the
        same key is dropped).

        Raises:
            ValueError: ``sizeof(value)`` is negative.
        """
        size = self._sizeof(value)
        if size < 0:
            raise ValueError(f"sizeof returned a negative size ({size})")
        key = (context_key, version_id, role, variant)
        with self._lock:
            # Replace = remove + insert, so the old entry is never counted as an eviction.
            self._cache.pop(key, None)
            if size <= self._config.max_bytes:
                self._cache[key] = (value, size)

    def invalidate_context(self, context_key: bytes) -> int:
        """Drop every (version, role) entry of one context.

        Args:
            context_key: ``ContextName.key()`` of the context.

        Returns:
            How many live entries were dropped (counted in ``invalidations``).
        """
        with self._lock:
            dropped = self._cache.drop_context(context_key)
            self._invalidations += dropped
            return dropped

    def clear(self) -> None:
        """Drop every entry; the counters keep running."""
        with self._lock:
            self._cache.clear()

    def stats(self) -> CacheStats:
        """A snapshot of the counters and current occupancy (purges expired entries first)."""
        with self._lock:
            cache = self._cache
            cache.expire()
            return CacheStats(
                hits=self._hits,
                misses=self._misses,
                evictions=cache.evictions,
                invalidations=self._invalidations,
                entries=len(cache),
                bytes=int(cache.currsize),
                max_bytes=self._config.max_bytes,
                expirations=cache.expirations,
            )


def envelope_digest(data: bytes) -> bytes:
    """The SHA-256 of stored or received envelope bytes (the key of ``VerifiedDigests``)."""
    return hashlib.sha256(data).digest()


class VerifiedDigests:
    """Digests of envelope bytes whose signature this node checked: a bounded LRU set.

    Thread-safe. A digest in the set means only "these exact bytes decode to an envelope
    whose signature verifies against its embedded key"; whether that key is trusted, and
    whether the envelope sits under the right key, stay the caller's checks.

    Args:
        max_entries: how many digests are remembered (least recently used go first).
    """

    def __init__(self, max_entries: int = MAX_VERIFIED_DIGESTS) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, not {max_entries}")
        self._lock = threading.Lock()
        self._digests: LRUCache[bytes, bool] = LRUCache(maxsize=max_entries)
        self.hits = 0
        self.misses = 0

    def seen(self, digest: bytes) -> bool:
        """Whether the bytes of ``digest`` verified here before (counts a hit or miss)."""
        with self._lock:
            found = self._digests.get(digest, False)  # a hit moves it to the recent end
            if found:
                self.hits += 1
            else:
                self.misses += 1
            return found

    def add(self, digest: bytes) -> None:
        """Remember that the bytes of ``digest`` verified."""
        with self._lock:
            self._digests[digest] = True  # past max_entries, the least recent goes

    def discard(self, digest: bytes) -> None:
        """Forget ``digest`` (nothing happens when it is not held)."""
        with self._lock:
            self._digests.pop(digest, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._digests)
