"""Replication planning: who holds a context, when a quorum is reached, what to repair.

A pure core (ARCHITECTURE.md §2, §6): no I/O, no clock, no randomness. The node service
(``node/cluster/service.py``) asks it what to do and carries it out over RPC.

- Placement: a context's replicas are the first N distinct members clockwise from its key
  on the ring (``node.cluster.ring``), whether they are up or not; a request goes to the live ones.
- Writes succeed after W durable acknowledgements and reads after R answers
  (``QuorumTracker``); once the answers still possible cannot reach the quorum, the
  request fails (``UCXL-503-UNAVAILABLE``), and nothing partial is reported as success.
- Listing and search are coverage queries: every live node answers for what it holds,
  and the answers are merged (``merge_listings``, ``merge_hits``).
- Reads merge version sets by union (``merge_version_sets``): versions are immutable and
  named by id, so the union is conflict-free; a purge marker removes every version at or
  before it. The one rewrite, a key rotation's re-seal, keeps the id: of two copies the
  one with the higher seal epoch is taken (``storage.envelope``). Replicas missing
  versions of the merged set, or holding an older seal of one, get them back (read repair).
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from node.cluster.ring import Ring
from storage.envelope import Envelope, seal_epoch_of
from storage.errors import StorageError
from storage.schema import PurgeMarker
from storage.versions import VersionId
from storage.views import ContextInfo, SearchResult


@dataclass(frozen=True)
class Quorum:
    """Replication factor N, write quorum W and read quorum R."""

    n: int = 3
    w: int = 2
    r: int = 2

    def __post_init__(self) -> None:
        if self.n < 1 or not 1 <= self.w <= self.n or not 1 <= self.r <= self.n:
            raise ValueError(f"need 1 <= w, r <= n, got n={self.n} w={self.w} r={self.r}")

    def override(self, *, w: int | None = None, r: int | None = None) -> Quorum:
        """This quorum with a per-request W or R.

        Raises:
            ValueError: the override is outside 1..N.
        """
        return Quorum(self.n, self.w if w is None else w, self.r if r is None else r)


@dataclass(frozen=True)
class Placement:
    """The replicas of one context, and which of them to ask now.

    ``groups``: during a membership change (``node.cluster.layout``), the old and the new
    preference list; a quorum then needs ``needed`` answers in every group. Empty: one
    group, ``replicas``.
    """

    replicas: tuple[str, ...]
    live: tuple[str, ...]
    groups: tuple[tuple[str, ...], ...] = ()

    def can_reach(self, needed: int) -> bool:
        """Whether enough replicas are up to possibly reach ``needed`` answers."""
        if not self.groups:
            return len(self.live) >= needed
        return all(sum(1 for x in group if x in self.live) >= needed for group in self.groups)


def place(ring: Ring, key: bytes, n: int, up: Collection[str]) -> Placement:
    """The N preferred replicas of ``key`` and the live ones among them (in ring order)."""
    replicas = tuple(ring.preference_list(key, n))
    return Placement(replicas, tuple(node for node in replicas if node in up))


class Outcome(enum.Enum):
    """Where a quorum request stands."""

    PENDING = "pending"
    REACHED = "reached"
    FAILED = "failed"


@dataclass
class QuorumTracker:
    """Counts answers from ``asked`` replicas until ``needed`` succeed or that is impossible.

    With ``groups`` (a membership change), ``needed`` must succeed within every group.
    """

    asked: Sequence[str]
    needed: int
    ok: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    groups: tuple[tuple[str, ...], ...] = ()
    reasons: dict[str, str] = field(default_factory=dict)  # failed node -> why

    def record(self, node: str, success: bool, reason: str = "") -> Outcome:
        """Record one answer (each asked node answers at most once) and say where we are."""
        if node not in self.asked or node in self.ok or node in self.failed:
            raise ValueError(f"unexpected answer from {node!r}")
        (self.ok if success else self.failed).append(node)
        if not success:
            self.reasons[node] = reason or "failed"
        return self.outcome

    def shortfall(self) -> str:
        """Why the quorum is not reached, per replica: what failed, and who never answered."""
        parts = [f"{node}: {self.reasons.get(node, 'failed')}" for node in self.failed]
        silent = [n for n in self.asked if n not in self.ok and n not in self.failed]
        if silent:
            parts.append("no answer from " + ", ".join(silent))
        return "; ".join(parts)

    @property
    def outcome(self) -> Outcome:
        """REACHED once ``needed`` succeeded (in every group); FAILED once that can no
        longer happen."""
        if not self.groups:
            if len(self.ok) >= self.needed:
                return Outcome.REACHED
            if len(self.asked) - len(self.failed) < self.needed:
                return Outcome.FAILED
            return Outcome.PENDING
        ok = [sum(1 for x in group if x in self.ok) for group in self.groups]
        if min(ok) >= self.needed:
            return Outcome.REACHED
        for group in self.groups:
            possible = sum(1 for x in group if x in self.asked and x not in self.failed)
            if possible < self.needed:
                return Outcome.FAILED
        return Outcome.PENDING

    @property
    def counted(self) -> int:
        """Successes that count toward ``needed``: with groups, those of the group that
        has fewest (an answer outside every group counts nowhere)."""
        if not self.groups:
            return len(self.ok)
        return min(sum(1 for x in group if x in self.ok) for group in self.groups)

    @property
    def reached(self) -> bool:
        """Whether the quorum is reached."""
        return self.outcome is Outcome.REACHED


@dataclass(frozen=True)
class VersionSet:
    """What one replica holds of a context: envelopes by version id, and its purge marker."""

    envelopes: Mapping[str, bytes]
    purge: PurgeMarker | None = None


@dataclass(frozen=True)
class Merged:
    """The union of several replicas' version sets, and what each replica lacks."""

    envelopes: tuple[tuple[str, bytes], ...]  # (version id, envelope), in id order
    purge: PurgeMarker | None
    missing: Mapping[str, tuple[str, ...]]  # replica -> ids it lacks or holds an older seal of
    stale_purge: tuple[str, ...]  # replicas that still hold versions the marker removes


def merge_version_sets(answers: Mapping[str, VersionSet]) -> Merged:
    """Union of version sets, minus what the newest purge marker covers (ARCHITECTURE §3);
    of several copies of one version, the one with the highest seal epoch."""
    markers = [vs.purge for vs in answers.values() if vs.purge is not None]
    purge = max(markers, key=lambda m: VersionId.parse(m.upto)) if markers else None
    limit = VersionId.parse(purge.upto) if purge else None
    union: dict[str, tuple[int, bytes]] = {}
    for name in sorted(answers):
        for vid, data in answers[name].envelopes.items():
            if limit is None or VersionId.parse(vid) > limit:
                epoch = seal_epoch_of(data)
                if vid not in union or epoch > union[vid][0]:
                    union[vid] = (epoch, data)
    ordered = tuple(
        sorted(
            ((vid, data) for vid, (_, data) in union.items()), key=lambda i: VersionId.parse(i[0])
        )
    )

    def lacks(vs: VersionSet, vid: str) -> bool:
        held = vs.envelopes.get(vid)
        return held is None or (union[vid][0] > 0 and seal_epoch_of(held) < union[vid][0])

    missing = {
        name: tuple(vid for vid, _ in ordered if lacks(vs, vid)) for name, vs in answers.items()
    }
    stale = tuple(
        sorted(
            name
            for name, vs in answers.items()
            if limit is not None and any(VersionId.parse(v) <= limit for v in vs.envelopes)
        )
    )
    return Merged(ordered, purge, {k: v for k, v in missing.items() if v}, stale)


def lacking(merged: Merged, node: str, held: VersionSet) -> Merged:
    """What one replica whose answer came after a read was merged lacks of it: the
    ``missing`` and ``stale_purge`` of ``node`` alone (read repair of a late answer).

    Versions only ``node`` holds are not taken into the read's result (it was answered).
    """
    both = merge_version_sets({"": VersionSet(dict(merged.envelopes), merged.purge), node: held})
    missing = {node: both.missing[node]} if node in both.missing else {}
    stale = tuple(name for name in both.stale_purge if name == node)
    return Merged(both.envelopes, both.purge, missing, stale)


def merge_listings(infos: Sequence[ContextInfo]) -> list[ContextInfo]:
    """One entry per context from several nodes' listings: the most advanced one (most
    versions, then latest update), in context order."""
    best: dict[str, ContextInfo] = {}
    for info in infos:
        old = best.get(info.context)
        if old is None or (info.versions, info.updated_at_ms) > (old.versions, old.updated_at_ms):
            best[info.context] = info
    return sorted(best.values(), key=lambda info: info.context)


def merge_hits(hits: Sequence[SearchResult], limit: int) -> list[SearchResult]:
    """One hit per context from several nodes' searches (its newest version), best score
    first (ties by context), at most ``limit``."""
    best: dict[str, SearchResult] = {}
    for hit in hits:
        if hit.context not in best or hit.version > best[hit.context].version:
            best[hit.context] = hit
    return sorted(best.values(), key=lambda h: (-h.score, h.context))[:limit]


def unexpired(blobs: Sequence[bytes], now_ms: int) -> list[bytes]:
    """The encoded versions whose TTL has not run out at ``now_ms`` (an expired version is
    never spread again); one that does not decode is kept: the receiver's verification
    refuses and counts it."""
    keep = []
    for blob in blobs:
        try:
            expires = Envelope.decode(blob).expires_at_ms
        except StorageError:
            keep.append(blob)
            continue
        if expires is None or expires > now_ms:
            keep.append(blob)
    return keep


def batches_by_bytes(blobs: Sequence[bytes], budget_bytes: int) -> Iterator[list[bytes]]:
    """Split envelopes, in order, into batches of at most ``budget_bytes`` each.

    A single blob larger than the budget travels alone (the frame limit is sized so that
    the largest valid envelope fits one frame). Every RPC that carries versions
    (``rep.store`` from writes, repair, hinted handoff and anti-entropy) sends them in
    these batches, so no request grows with the number of versions it carries.
    """
    batch: list[bytes] = []
    size = 0
    for blob in blobs:
        if batch and size + len(blob) > budget_bytes:
            yield batch
            batch, size = [], 0
        batch.append(blob)
        size += len(blob)
    if batch:
        yield batch
