"""Tests of storage.cache: TTL, byte bound, LRU eviction, invalidation, stats.

The stateful test runs random operation sequences against a slow, obvious reference model
(an OrderedDict in LRU order with expiry times) and checks every observable result.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import pytest
from cachetools import Cache
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from storage.cache import CacheConfig, CacheStats, RecordCache

Value = tuple[int, int]  # (serial, size): sizeof reads the size


def size_of(value: Value) -> int:
    return value[1]


class FakeClock:
    """A clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make(max_bytes: int = 100, ttl_s: float = 10.0) -> tuple[RecordCache[Value], FakeClock]:
    clock = FakeClock()
    cache: RecordCache[Value] = RecordCache(
        CacheConfig(max_bytes=max_bytes, ttl_s=ttl_s), sizeof=size_of, clock=clock
    )
    return cache, clock


# --- basics ---------------------------------------------------------------------------------


def test_put_then_get_returns_the_same_object_and_counts() -> None:
    cache, _ = make()
    value = (1, 10)
    assert cache.get(b"ctx", "v1", "dev") is None
    cache.put(b"ctx", "v1", "dev", value)
    assert cache.get(b"ctx", "v1", "dev") is value
    assert cache.get(b"ctx", "v1", "admin") is None  # the role is part of the key
    assert cache.get(b"ctx", "v2", "dev") is None
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.entries, stats.bytes) == (1, 3, 1, 10)


def test_ttl_expiry_by_the_injected_clock() -> None:
    cache, clock = make(ttl_s=10.0)
    cache.put(b"ctx", "v1", "dev", (1, 10))
    clock.advance(9.999)
    assert cache.get(b"ctx", "v1", "dev") == (1, 10)  # a get does not extend the TTL
    clock.advance(0.001)
    assert cache.get(b"ctx", "v1", "dev") is None
    stats = cache.stats()
    assert (stats.entries, stats.bytes, stats.expirations, stats.evictions) == (0, 0, 1, 0)


def test_a_new_put_restarts_the_ttl() -> None:
    cache, clock = make(ttl_s=10.0)
    cache.put(b"ctx", "v1", "dev", (1, 10))
    clock.advance(8)
    cache.put(b"ctx", "v1", "dev", (2, 10))
    clock.advance(8)
    assert cache.get(b"ctx", "v1", "dev") == (2, 10)


def test_byte_bound_evicts_least_recently_used_first() -> None:
    cache, _ = make(max_bytes=30)
    for serial, version in enumerate(("a", "b", "c")):
        cache.put(b"ctx", version, "dev", (serial, 10))
    assert cache.get(b"ctx", "a", "dev") is not None  # "a" is now the most recent
    cache.put(b"ctx", "d", "dev", (3, 10))
    assert cache.get(b"ctx", "b", "dev") is None  # "b" was least recently used
    assert [cache.get(b"ctx", v, "dev") is not None for v in "acd"] == [True] * 3
    stats = cache.stats()
    assert (stats.evictions, stats.entries, stats.bytes, stats.max_bytes) == (1, 3, 30, 30)


def test_one_put_may_evict_several_entries() -> None:
    cache, _ = make(max_bytes=30)
    for version in "abc":
        cache.put(b"ctx", version, "dev", (0, 10))
    cache.put(b"ctx", "big", "dev", (1, 25))
    stats = cache.stats()
    assert (stats.evictions, stats.entries, stats.bytes) == (3, 1, 25)


def test_expired_entries_are_not_counted_as_evictions() -> None:
    cache, clock = make(max_bytes=30, ttl_s=10.0)
    cache.put(b"ctx", "a", "dev", (0, 20))
    clock.advance(10)
    cache.put(b"ctx", "b", "dev", (1, 20))
    stats = cache.stats()
    assert (stats.evictions, stats.expirations, stats.entries) == (0, 1, 1)


def test_a_value_larger_than_max_bytes_is_not_cached() -> None:
    cache, _ = make(max_bytes=30)
    cache.put(b"ctx", "a", "dev", (0, 10))
    cache.put(b"ctx", "big", "dev", (1, 31))
    assert cache.get(b"ctx", "big", "dev") is None
    assert cache.get(b"ctx", "a", "dev") is not None  # nothing was evicted for it
    cache.put(b"ctx", "a", "dev", (2, 31))  # an oversize re-put drops the old entry
    assert cache.get(b"ctx", "a", "dev") is None
    cache.put(b"ctx", "exact", "dev", (3, 30))
    assert cache.get(b"ctx", "exact", "dev") == (3, 30)
    assert cache.stats().evictions == 0


def test_re_put_with_another_size_updates_bytes() -> None:
    cache, _ = make()
    cache.put(b"ctx", "a", "dev", (0, 10))
    cache.put(b"ctx", "a", "dev", (1, 40))
    stats = cache.stats()
    assert (stats.entries, stats.bytes) == (1, 40)


def test_replacing_an_entry_is_not_an_eviction() -> None:
    cache, _ = make(max_bytes=100)
    cache.put(b"ctx", "a", "dev", (0, 0))
    cache.put(b"ctx", "b", "dev", (1, 6))
    cache.put(b"ctx", "a", "dev", (2, 95))  # "a" is least recently used, yet only "b" goes
    stats = cache.stats()
    assert (stats.evictions, stats.entries, stats.bytes) == (1, 1, 95)


def test_negative_size_is_refused() -> None:
    cache, _ = make()
    with pytest.raises(ValueError, match="negative"):
        cache.put(b"ctx", "a", "dev", (0, -1))


# --- invalidation and clear -----------------------------------------------------------------


def test_invalidation_drops_all_versions_and_roles_of_one_context_only() -> None:
    cache, _ = make(max_bytes=1000)
    for ctx in (b"chorus\x00auth", b"chorus\x00auth2", b"bzzz\x00auth"):
        for version in ("v1", "v2"):
            for role in ("dev", "admin"):
                cache.put(ctx, version, role, (0, 10))
    assert cache.invalidate_context(b"chorus\x00auth") == 4
    for version in ("v1", "v2"):
        for role in ("dev", "admin"):
            assert cache.get(b"chorus\x00auth", version, role) is None
            assert cache.get(b"chorus\x00auth2", version, role) is not None
            assert cache.get(b"bzzz\x00auth", version, role) is not None
    assert cache.invalidate_context(b"chorus\x00auth") == 0
    assert cache.invalidate_context(b"unknown") == 0
    stats = cache.stats()
    assert (stats.invalidations, stats.entries, stats.bytes) == (4, 8, 80)


def test_invalidation_counts_only_live_entries() -> None:
    cache, clock = make(ttl_s=10.0)
    cache.put(b"ctx", "old", "dev", (0, 10))
    clock.advance(5)
    cache.put(b"ctx", "new", "dev", (1, 10))
    clock.advance(5)  # "old" has expired, "new" has not
    assert cache.invalidate_context(b"ctx") == 1
    stats = cache.stats()
    assert (stats.invalidations, stats.expirations, stats.entries) == (1, 1, 0)


def test_clear_drops_entries_and_keeps_counters() -> None:
    cache, _ = make()
    cache.put(b"ctx", "a", "dev", (0, 10))
    assert cache.get(b"ctx", "a", "dev") is not None
    cache.clear()
    assert cache.get(b"ctx", "a", "dev") is None
    assert cache.invalidate_context(b"ctx") == 0
    assert cache.stats() == CacheStats(
        hits=1, misses=1, evictions=0, invalidations=0, entries=0, bytes=0, max_bytes=100
    )


# --- config and stats -----------------------------------------------------------------------


def test_config_defaults_and_validation() -> None:
    assert CacheConfig() == CacheConfig(max_bytes=64 * 1024 * 1024, ttl_s=300.0)
    with pytest.raises(ValueError, match="max_bytes"):
        CacheConfig(max_bytes=-1)
    with pytest.raises(ValueError, match="ttl_s"):
        CacheConfig(ttl_s=0)


def test_zero_max_bytes_holds_only_zero_sized_values() -> None:
    cache, _ = make(max_bytes=0)
    cache.put(b"ctx", "a", "dev", (0, 1))
    cache.put(b"ctx", "b", "dev", (1, 0))
    assert cache.get(b"ctx", "a", "dev") is None
    assert cache.get(b"ctx", "b", "dev") == (1, 0)


def test_stats_to_dict() -> None:
    cache, _ = make()
    assert cache.stats().to_dict() == {
        "hits": 0,
        "misses": 0,
        "evictions": 0,
        "invalidations": 0,
        "entries": 0,
        "bytes": 0,
        "max_bytes": 100,
        "expirations": 0,
    }


def test_concurrent_use_keeps_the_bound_and_the_index() -> None:
    cache, _ = make(max_bytes=200)

    def work(seed: int) -> None:
        for i in range(1500):
            ctx = b"c%d" % ((seed + i) % 5)
            cache.put(ctx, str(i % 7), "dev", (i, (i * seed) % 37))
            cache.get(ctx, str((i + 1) % 7), "dev")
            if i % 50 == 0:
                cache.invalidate_context(ctx)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(1, 5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    _check_consistent(cache)


def _check_consistent(cache: RecordCache[Value]) -> None:
    """Stats, bound and index agree (reads raw cachetools storage: no LRU reordering)."""
    inner = cache._cache
    stats = cache.stats()  # purges expired entries
    held = set(Cache.__iter__(inner))
    assert stats.bytes == sum(Cache.__getitem__(inner, k)[1] for k in held) <= stats.max_bytes
    assert stats.entries == len(held)
    assert {k for keys in inner.by_context.values() for k in keys} == held
    assert all(keys for keys in inner.by_context.values())
    assert all(k[0] == ctx for ctx, keys in inner.by_context.items() for k in keys)


# --- against a reference model --------------------------------------------------------------


@dataclass
class _Entry:
    value: Value
    expires: float


class ReferenceCache:
    """The slow, obvious version: LRU order in an OrderedDict, expiry purged where cachetools
    purges (before a put of a fitting value, before an eviction, on invalidate and stats)."""

    def __init__(self, max_bytes: int, ttl_s: float) -> None:
        self.max_bytes, self.ttl_s = max_bytes, ttl_s
        self.entries: OrderedDict[tuple[bytes, str, str], _Entry] = OrderedDict()
        self.hits = self.misses = self.evictions = self.invalidations = self.expirations = 0

    def used(self) -> int:
        return sum(e.value[1] for e in self.entries.values())

    def purge(self, now: float) -> None:
        for key in [k for k, e in self.entries.items() if e.expires <= now]:
            del self.entries[key]
            self.expirations += 1

    def get(self, key: tuple[bytes, str, str], now: float) -> Value | None:
        entry = self.entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self.entries.move_to_end(key)  # cachetools reorders even an expired entry
        if entry.expires <= now:
            self.misses += 1
            return None
        self.hits += 1
        return entry.value

    def put(self, key: tuple[bytes, str, str], value: Value, now: float) -> None:
        if value[1] > self.max_bytes:
            entry = self.entries.get(key)
            if entry is not None and entry.expires > now:
                del self.entries[key]
            return
        self.purge(now)
        self.entries.pop(key, None)
        while self.used() + value[1] > self.max_bytes:
            self.entries.popitem(last=False)
            self.evictions += 1
        self.entries[key] = _Entry(value, now + self.ttl_s)

    def invalidate(self, ctx: bytes, now: float) -> int:
        self.purge(now)
        keys = [k for k in self.entries if k[0] == ctx]
        for key in keys:
            del self.entries[key]
        self.invalidations += len(keys)
        return len(keys)


CONTEXTS = st.sampled_from([b"a\x00t", b"b\x00t", b"c\x00t"])
VERSIONS = st.sampled_from(["v1", "v2", "v3"])
ROLES = st.sampled_from(["dev", "admin"])


class CacheMachine(RuleBasedStateMachine):
    """Random put/get/invalidate/clear/time sequences: the cache behaves like ReferenceCache."""

    def __init__(self) -> None:
        super().__init__()
        self.cache, self.clock = make(max_bytes=100, ttl_s=10.0)
        self.model = ReferenceCache(max_bytes=100, ttl_s=10.0)
        self.serial = 0

    @rule(ctx=CONTEXTS, version=VERSIONS, role=ROLES, size=st.integers(0, 120))
    def put(self, ctx: bytes, version: str, role: str, size: int) -> None:
        self.serial += 1
        self.cache.put(ctx, version, role, (self.serial, size))
        self.model.put((ctx, version, role), (self.serial, size), self.clock.now)

    @rule(ctx=CONTEXTS, version=VERSIONS, role=ROLES)
    def get(self, ctx: bytes, version: str, role: str) -> None:
        expected = self.model.get((ctx, version, role), self.clock.now)
        assert self.cache.get(ctx, version, role) == expected

    @rule(ctx=CONTEXTS)
    def invalidate(self, ctx: bytes) -> None:
        expected = self.model.invalidate(ctx, self.clock.now)
        assert self.cache.invalidate_context(ctx) == expected

    @rule(seconds=st.sampled_from([0.5, 3.0, 9.999, 10.0]))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule()
    def clear(self) -> None:
        self.cache.clear()
        self.model.entries.clear()

    @rule()
    def stats_agree(self) -> None:
        model = self.model
        model.purge(self.clock.now)
        assert self.cache.stats() == CacheStats(
            hits=model.hits,
            misses=model.misses,
            evictions=model.evictions,
            invalidations=model.invalidations,
            entries=len(model.entries),
            bytes=model.used(),
            max_bytes=100,
            expirations=model.expirations,
        )
        _check_consistent(self.cache)

    @invariant()
    def bound_and_index_hold(self) -> None:
        # Raw cachetools views: they include expired entries not yet purged (no purge here).
        inner = self.cache._cache
        raw_keys = set(Cache.__iter__(inner))
        raw_bytes = sum(Cache.__getitem__(inner, key)[1] for key in raw_keys)
        assert raw_bytes == Cache.currsize.fget(inner) <= 100  # type: ignore[attr-defined]
        assert {k for keys in inner.by_context.values() for k in keys} == raw_keys
        assert all(key[3] == b"" for key in raw_keys)  # the model puts no variant
        assert set(self.model.entries) == {key[:3] for key in raw_keys}


CacheMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
TestCacheMachine = CacheMachine.TestCase
