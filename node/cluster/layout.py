"""The layout: which rings the data plane places by while membership changes (a pure core).

Owns: the ``Layout`` value derived from the applied cluster metadata (``layout_of``), the
placement of a write (``place_layout``) and of a read (``place_read``) under a layout,
and the arcs of the key space whose
replica set differs between the old and the new ring (``moving_arcs``).

Must not know: the metadata log, Raft, RPC, storage. ``layout_of`` reads any value shaped
like ``node.control.metadata.ClusterMetadata`` (members with ``name`` and ``state``, and
``ring.epoch``) without importing the control plane.

A layout has two rings (Garage's layout versions, research/self-healing.md; Cassandra's
pending ranges):

- ``old``: the names of the members in state normal or leaving. Every acknowledged write
  is on a quorum of it, so reads place by it while a change is under way.
- ``new``: the names in state normal or joining: where the data is going.

Invariants:
- ``in_transition`` exactly when ``old != new``; outside a transition a layout places
  every key as a ring over ``new`` alone, with no quorum groups (today's behaviour).
- In transition a write's placement is the union of both preference lists (old list
  first, then the new-only owners) with one quorum group per list: a write succeeds only
  with W acknowledgements in each group (Garage: a quorum in every active version).
- In transition a read asks the old list and the new-only owners, with one quorum group,
  the old list: R counts there only (it holds every acknowledged write); the new-only
  owners' answers join the merge and read repair, so a read makes them whole too.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from node.cluster.replication import Placement
from node.cluster.ring import Ring

OLD_STATES = frozenset({"normal", "leaving"})
NEW_STATES = frozenset({"normal", "joining"})


class _MemberLike(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def state(self) -> str: ...


class _RingLike(Protocol):
    @property
    def epoch(self) -> int: ...


class MetadataLike(Protocol):
    """What ``layout_of`` reads of the applied cluster metadata."""

    @property
    def members(self) -> Mapping[str, _MemberLike]: ...

    @property
    def ring(self) -> _RingLike: ...


@dataclass(frozen=True)
class Layout:
    """The rings of one ring epoch: ``old`` (reads place by it) and ``new`` (sorted names)."""

    epoch: int
    old: tuple[str, ...]
    new: tuple[str, ...]

    @property
    def in_transition(self) -> bool:
        """Whether ranges are moving (some member joining or leaving)."""
        return self.old != self.new

    @property
    def members(self) -> tuple[str, ...]:
        """Every name in either ring, sorted."""
        return tuple(sorted(set(self.old) | set(self.new)))

    @classmethod
    def steady(cls, epoch: int, names: Iterable[str]) -> Layout:
        """A layout not in transition."""
        ring = tuple(sorted(set(names)))
        return cls(epoch, ring, ring)


def layout_of(metadata: MetadataLike) -> Layout:
    """The layout of the applied metadata (removed members are in neither ring)."""
    members = list(metadata.members.values())
    return Layout(
        metadata.ring.epoch,
        tuple(sorted(m.name for m in members if m.state in OLD_STATES)),
        tuple(sorted(m.name for m in members if m.state in NEW_STATES)),
    )


def place_layout(old: Ring, new: Ring, key: bytes, n: int, up: Collection[str]) -> Placement:
    """Where a write of ``key`` goes: both preference lists, one quorum group each.

    Returns the ordinary single-list placement when both lists are equal.
    """
    old_list = tuple(old.preference_list(key, n))
    new_list = tuple(new.preference_list(key, n))
    if old_list == new_list:
        return Placement(old_list, tuple(x for x in old_list if x in up))
    union = old_list + tuple(x for x in new_list if x not in old_list)
    return Placement(union, tuple(x for x in union if x in up), groups=(old_list, new_list))


def place_read(old: Ring, new: Ring, key: bytes, n: int, up: Collection[str]) -> Placement:
    """Where a read of ``key`` goes: the old list, whose answers count toward R (its one
    quorum group), then the new-only owners, asked for read repair only.

    Returns the ordinary single-list placement when both lists are equal.
    """
    old_list = tuple(old.preference_list(key, n))
    extra = tuple(x for x in new.preference_list(key, n) if x not in old_list)
    if not extra:
        return Placement(old_list, tuple(x for x in old_list if x in up))
    union = old_list + extra
    return Placement(union, tuple(x for x in union if x in up), groups=(old_list,))


def moving_arcs(old: Ring, new: Ring, n: int) -> list[tuple[int, int]]:
    """Arcs ``[start, end)`` whose replica set differs between ``old`` and ``new``.

    Neighbouring differing sub-arcs with the same pair of replica sets are one arc; the
    count is the ``pending_ranges`` figure of a walk not yet started.
    """
    a, b = old.ranges(n), new.ranges(n)
    out: list[tuple[int, int]] = []
    last: tuple[frozenset[str], frozenset[str]] | None = None
    i = j = 0
    start = 0
    while i < len(a) and j < len(b):
        end = min(a[i][1], b[j][1])
        pair = (frozenset(a[i][2]), frozenset(b[j][2]))
        if end > start and pair[0] != pair[1]:
            if out and last == pair and out[-1][1] == start:
                out[-1] = (out[-1][0], end)
            else:
                out.append((start, end))
            last = pair
        start = end
        if a[i][1] == end:
            i += 1
        if b[j][1] == end:
            j += 1
    return out
