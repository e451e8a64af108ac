"""Active anti-entropy, the pure core: hash trees over version sets, diffs, exchange plans.

A pure core (ARCHITECTURE.md §2): no I/O, no clock, no randomness. The trio shell
(``node.cluster.antientropy_service``) feeds it changes and carries its plans out over RPC.

Hashing (Riak's Tictac AAE, research/self-healing.md §1): every element of a context's
state hashes to a 128-bit value: a version as written to ``H("v", ctx, id)``, a re-sealed
copy of it (seal epoch e > 0, ``storage.envelope``) to ``H("s", ctx, id, e)``, a purge
marker to ``H("p", ctx, upto)``. A context's *digest* is the XOR of the hashes of the
versions it holds and of its purge marker; two replicas agree on a context exactly when
(but for a 2^-128 chance) they hold the same version ids at the same seal epochs and the
same marker. Because the digest is linear, adding or removing one version is one XOR, and
re-sealing one is two (out with the old epoch, in with the new), with no need to read the
others. A version as written hashes as it did before seal epochs existed, so trees of
nodes that never saw a rotation are unchanged.

Tree: the ring's key space is already cut into ``partitions`` equal arcs
(``node.cluster.ring``); each partition is split again into ``leaves`` equal segments. A
leaf is the XOR of the digests of the contexts whose key position falls in it, and a
partition's root the XOR of its leaves. Every change is applied as an XOR delta to one
context digest, one leaf and one root (``HashTree.apply``); the tree never needs a scan
after it was built once (``HashTree.rebuilt`` equals the incrementally kept tree).

Exchange (``plan_exchange``): version sets are grow-only and merge by union; a purge
marker covers every version with id <= ``upto`` and the higher marker wins on both sides,
so nothing it covers is ever pushed or pulled again. A version both sides hold at
different seal epochs moves from the higher to the lower (the receiver replaces its copy:
the higher seal epoch wins, ``Envelope.supersedes``); equal epochs never move.

Invariants:
- ``HashTree`` holds no zero digest, leaf or root (an empty context is absent);
- ``plan_exchange`` never moves a version covered by the winning marker, nor a copy to a
  side that holds the same version at an equal or higher seal epoch.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

from node.cluster.ring import KEY_BITS, Ring
from storage.versions import VersionId

HASH_BYTES = 16
MAX_ITEMS = 4096  # partitions, segments, contexts or ids in one anti-entropy request
DEFAULT_LEAVES = 16  # segments per ring partition: 4,096 x 16 leaves by default
_PERSON_VERSION = b"slurp-ae-version"  # <= 16 bytes (blake2b personalisation)
_PERSON_PURGE = b"slurp-ae-purge"
_PERSON_SEALED = b"slurp-ae-sealed"
_RING_PERSON = b"slurp-ring-key"  # the ring's own key-position hash (node.cluster.ring)


@dataclass(frozen=True)
class AntiEntropyConfig:
    """The ``[antientropy]`` settings (validated by ``node.daemon.config``)."""

    enabled: bool = True
    interval_s: float = 60.0
    bytes_per_s: int = 8 * 1024 * 1024
    max_repairs_per_exchange: int = 1000
    leaves: int = DEFAULT_LEAVES
    poll_s: float = 1.0  # how often liveness is looked at for members coming up


def key_position(ctx: bytes) -> int:
    """Where a context key sits on the ring (identical to ``Ring.key_position``)."""
    digest = hashlib.blake2b(ctx, digest_size=KEY_BITS // 8, person=_RING_PERSON).digest()
    return int.from_bytes(digest, "big")


def partitions_in(start: int, end: int, partitions: int) -> range:
    """The ring partitions an arc [start, end) of ``Ring.ranges`` covers."""
    if end <= start:
        return range(0)
    return range((start * partitions) >> KEY_BITS, (((end - 1) * partitions) >> KEY_BITS) + 1)


@functools.lru_cache(maxsize=32)
def shared_partitions(ring: Ring, n: int, me: str) -> Mapping[str, tuple[int, ...]]:
    """peer -> the partitions it and ``me`` both replicate (N replicas), in order.

    Cached per (ring, n, me): a ring is immutable, and walking every partition's
    preference list is the costly part of a pass that finds nothing to do.
    """
    shared: dict[str, set[int]] = {}
    for start, end, replicas in ring.ranges(n):
        if me in replicas:
            parts = partitions_in(start, end, ring.partitions)
            for peer in replicas:
                if peer != me:
                    shared.setdefault(peer, set()).update(parts)
    return {peer: tuple(sorted(parts)) for peer, parts in shared.items()}


def version_hash(ctx: bytes, version_id: str, seal_epoch: int = 0) -> int:
    """The 128-bit hash one version (at ``seal_epoch``) contributes to its context's digest."""
    data = len(ctx).to_bytes(4, "big") + ctx + version_id.encode("ascii")
    person = _PERSON_VERSION
    if seal_epoch:
        data += b"\x00" + seal_epoch.to_bytes(8, "big")
        person = _PERSON_SEALED
    return int.from_bytes(
        hashlib.blake2b(data, digest_size=HASH_BYTES, person=person).digest(), "big"
    )


def purge_hash(ctx: bytes, upto: str | None) -> int:
    """The 128-bit hash a purge marker contributes (0 for no marker)."""
    if upto is None:
        return 0
    data = len(ctx).to_bytes(4, "big") + ctx + upto.encode("ascii")
    return int.from_bytes(
        hashlib.blake2b(data, digest_size=HASH_BYTES, person=_PERSON_PURGE).digest(), "big"
    )


def context_digest(
    ctx: bytes,
    version_ids: Iterable[str],
    upto: str | None,
    epochs: Mapping[str, int] | None = None,
) -> int:
    """The digest of a context holding ``version_ids`` (at the seal epochs in ``epochs``;
    absent: 0) and a marker at ``upto``."""
    digest = purge_hash(ctx, upto)
    seals = epochs or {}
    for vid in version_ids:
        digest ^= version_hash(ctx, vid, seals.get(vid, 0))
    return digest


def change_delta(
    ctx: bytes,
    added: Iterable[str] = (),
    removed: Iterable[str] = (),
    old_upto: str | None = None,
    new_upto: str | None = None,
    epochs: Mapping[str, int] | None = None,
    resealed: Iterable[tuple[str, int, int]] = (),
) -> int:
    """The XOR delta of one change to a context: versions added/removed (at the seal
    epochs in ``epochs``; absent: 0), marker replaced, copies re-sealed (version id, old
    seal epoch, new seal epoch)."""
    delta = purge_hash(ctx, old_upto) ^ purge_hash(ctx, new_upto)
    seals = epochs or {}
    for vid in added:
        delta ^= version_hash(ctx, vid, seals.get(vid, 0))
    for vid in removed:
        delta ^= version_hash(ctx, vid, seals.get(vid, 0))
    for vid, old, new in resealed:
        delta ^= version_hash(ctx, vid, old) ^ version_hash(ctx, vid, new)
    return delta


class HashTree:
    """Per-partition hash trees of one node, kept by XOR deltas.

    Leaves are addressed by a *segment*: ``partition * leaves + leaf``.
    """

    def __init__(self, partitions: int, leaves: int = DEFAULT_LEAVES) -> None:
        if partitions < 1 or leaves < 1:
            raise ValueError(f"need partitions, leaves >= 1, got {partitions}, {leaves}")
        self.partitions = partitions
        self.leaves = leaves
        self._digests: dict[bytes, int] = {}
        self._members: dict[int, set[bytes]] = {}
        self._leaf: dict[int, int] = {}
        self._root: dict[int, int] = {}

    @classmethod
    def rebuilt(
        cls,
        partitions: int,
        leaves: int,
        contexts: Iterable[tuple[bytes, Collection[str], str | None]],
        epochs: Mapping[bytes, Mapping[str, int]] | None = None,
    ) -> HashTree:
        """A tree built from scratch from (ctx, version ids, marker upto) of every context
        (``epochs``: ctx -> the non-zero seal epochs of its versions)."""
        tree = cls(partitions, leaves)
        seals = epochs or {}
        for ctx, vids, upto in contexts:
            tree.apply(ctx, context_digest(ctx, vids, upto, seals.get(ctx)))
        return tree

    def segment(self, ctx: bytes) -> int:
        """The segment (partition * leaves + leaf) of a context key."""
        return (key_position(ctx) * self.partitions * self.leaves) >> KEY_BITS

    def partition_of(self, ctx: bytes) -> int:
        """The ring partition of a context key."""
        return self.segment(ctx) // self.leaves

    def apply(self, ctx: bytes, delta: int) -> None:
        """XOR ``delta`` into a context's digest, its leaf and its partition root."""
        if delta == 0:
            return
        segment = self.segment(ctx)
        digest = self._digests.get(ctx, 0) ^ delta
        if digest:
            self._digests[ctx] = digest
            self._members.setdefault(segment, set()).add(ctx)
        else:
            self._digests.pop(ctx, None)
            members = self._members.get(segment)
            if members is not None:
                members.discard(ctx)
                if not members:
                    del self._members[segment]
        _xor_into(self._leaf, segment, delta)
        _xor_into(self._root, segment // self.leaves, delta)

    def digest(self, ctx: bytes) -> int:
        """A context's digest (0 when it holds nothing)."""
        return self._digests.get(ctx, 0)

    def root(self, partition: int) -> int:
        """A partition's root (0 when empty)."""
        return self._root.get(partition, 0)

    def nonzero_roots(self) -> Mapping[int, int]:
        """partition -> root, for the partitions that hold something (a live view)."""
        return self._root

    def leaf_hashes(self, partition: int) -> dict[int, int]:
        """The non-zero leaves of a partition: leaf index -> hash."""
        base = partition * self.leaves
        return {
            leaf: self._leaf[base + leaf]
            for leaf in range(self.leaves)
            if base + leaf in self._leaf
        }

    def contexts_in(self, partition: int, leaf: int) -> dict[bytes, int]:
        """The contexts of one leaf: ctx -> digest."""
        members = self._members.get(partition * self.leaves + leaf, ())
        return {ctx: self._digests[ctx] for ctx in members}

    def __len__(self) -> int:
        return len(self._digests)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, HashTree):
            return NotImplemented
        return (self.partitions, self.leaves, self._digests, self._leaf, self._root) == (
            other.partitions,
            other.leaves,
            other._digests,
            other._leaf,
            other._root,
        )

    __hash__ = None  # type: ignore[assignment]


def _xor_into(table: dict[int, int], key: int, delta: int) -> None:
    value = table.get(key, 0) ^ delta
    if value:
        table[key] = value
    else:
        table.pop(key, None)


def differing(mine: Mapping[int, int], theirs: Mapping[int, int]) -> list[int]:
    """The keys (partitions or leaves) whose hashes differ; absent counts as 0."""
    return sorted(k for k in set(mine) | set(theirs) if mine.get(k, 0) != theirs.get(k, 0))


def differing_contexts(mine: Mapping[bytes, int], theirs: Mapping[bytes, int]) -> list[bytes]:
    """The contexts whose digests differ; absent counts as 0."""
    return sorted(k for k in set(mine) | set(theirs) if mine.get(k, 0) != theirs.get(k, 0))


@dataclass(frozen=True)
class ContextState:
    """One replica's state of a context: the version ids it holds, its marker, and the
    seal epochs of its re-sealed copies (version id -> epoch; absent means 0)."""

    version_ids: frozenset[str]
    upto: str | None = None
    epochs: Mapping[str, int] = field(default_factory=dict)

    def epoch(self, version_id: str) -> int:
        """The seal epoch of the copy held of ``version_id`` (0 when not re-sealed)."""
        return self.epochs.get(version_id, 0)


@dataclass(frozen=True)
class ContextPlan:
    """What to do for one context: push ``push`` and the marker, pull ``pull`` and theirs."""

    push: tuple[str, ...]
    pull: tuple[str, ...]
    send_marker: bool
    take_marker: bool

    @property
    def empty(self) -> bool:
        """Whether there is nothing to do."""
        return not (self.push or self.pull or self.send_marker or self.take_marker)


def winning_upto(a: str | None, b: str | None) -> str | None:
    """The marker that wins: the higher ``upto``."""
    if a is None or b is None:
        return a if b is None else b
    return a if VersionId.parse(a) >= VersionId.parse(b) else b


def covered(version_id: str, upto: str | None) -> bool:
    """Whether a marker at ``upto`` covers a version."""
    return upto is not None and VersionId.parse(version_id) <= VersionId.parse(upto)


def plan_exchange(mine: ContextState, theirs: ContextState) -> ContextPlan:
    """Union merge of two replicas of one context; the higher purge marker wins; of a
    version both hold, the copy with the higher seal epoch replaces the other."""
    upto = winning_upto(mine.upto, theirs.upto)
    both = mine.version_ids & theirs.version_ids
    newer_here = {v for v in both if mine.epoch(v) > theirs.epoch(v)}
    newer_there = {v for v in both if theirs.epoch(v) > mine.epoch(v)}
    push = sorted(
        v for v in (mine.version_ids - theirs.version_ids) | newer_here if not covered(v, upto)
    )
    pull = sorted(
        v for v in (theirs.version_ids - mine.version_ids) | newer_there if not covered(v, upto)
    )
    return ContextPlan(
        tuple(push),
        tuple(pull),
        send_marker=upto is not None and upto != theirs.upto,
        take_marker=upto is not None and upto != mine.upto,
    )


def apply_plan(
    mine: ContextState, theirs: ContextState, plan: ContextPlan
) -> tuple[ContextState, ContextState]:
    """Both states after carrying out ``plan`` (markers first, then versions; for tests
    and for reasoning: the shell does the same through the version store)."""
    upto = winning_upto(mine.upto, theirs.upto)
    mine_upto = upto if plan.take_marker else mine.upto
    theirs_upto = upto if plan.send_marker else theirs.upto

    def after(
        state: ContextState, source: ContextState, gained: Iterable[str], marker: str | None
    ) -> ContextState:
        got = set(gained)
        kept = {v for v in state.version_ids | got if not covered(v, marker)}
        epochs = {
            v: max(state.epoch(v), source.epoch(v)) if v in got else state.epoch(v) for v in kept
        }
        return ContextState(frozenset(kept), marker, {v: e for v, e in epochs.items() if e})

    return after(mine, theirs, plan.pull, mine_upto), after(theirs, mine, plan.push, theirs_upto)


class TokenBucket:
    """A bytes/s throttle: ``rate`` tokens per second, at most ``burst`` saved up.

    Time comes in as ``now`` (seconds, any monotonic origin). A request larger than the
    burst is allowed once the bucket is full and leaves it in debt, so it is never stuck.
    """

    def __init__(self, rate: float, burst: float, *, now: float) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError(f"need rate, burst > 0, got {rate}, {burst}")
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._at = now

    def _refill(self, now: float) -> None:
        if now > self._at:
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
            self._at = now

    def delay(self, amount: float, *, now: float) -> float:
        """Seconds to wait before ``amount`` may be spent (0 when it may be now)."""
        self._refill(now)
        need = min(amount, self.burst)
        return 0.0 if self._tokens >= need else (need - self._tokens) / self.rate

    def spend(self, amount: float, *, now: float) -> None:
        """Spend ``amount`` (the balance may go negative: later calls wait it off)."""
        self._refill(now)
        self._tokens -= amount
