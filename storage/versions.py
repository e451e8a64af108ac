"""Version ids, the hybrid logical clock, and temporal navigation (ARCHITECTURE.md §3).

Owns: how versions are named and ordered, and which version a temporal segment selects.
Pure: no I/O, no clock reads (time comes in as ``now_ms``/``clock_ms``).
Invariants: version ids are totally ordered by (wall_ms, logical, node); every replica
holding the same version set gives every version the same rank (1-based position in id
order); a clock never issues an id at or below one it issued or observed before.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from storage.address import Temporal
from storage.errors import CorruptRecord, TemporalOutOfRange

_VID = re.compile(r"^([0-9a-f]{12})-([0-9a-f]{6})-([0-9a-z]{1,64})$")
MAX_WALL_MS = 16**12 - 1
MAX_LOGICAL = 16**6 - 1


@dataclass(frozen=True, order=True)
class VersionId:
    """A version's stable id: hybrid-logical-clock timestamp plus the writer's node id."""

    wall_ms: int
    logical: int
    node: str

    def __str__(self) -> str:
        return f"{self.wall_ms:012x}-{self.logical:06x}-{self.node}"

    @classmethod
    def parse(cls, text: str) -> VersionId:
        """Parse the string form.

        Raises:
            CorruptRecord: ``text`` is not a version id.
        """
        match = _VID.match(text)
        if match is None:
            raise CorruptRecord(f"malformed version id {text[:80]!r}", field="version_id")
        return cls(int(match[1], 16), int(match[2], 16), match[3])


class HybridLogicalClock:
    """Kulkarni et al.'s HLC: ids that follow physical time but never go backwards."""

    def __init__(self, node: str, clock_ms: Callable[[], int], last: VersionId | None = None):
        self.node = node
        self._clock_ms = clock_ms
        self._wall = last.wall_ms if last else 0
        self._logical = last.logical if last else 0

    def next_id(self) -> VersionId:
        """A fresh id, greater than every id issued or observed so far (HLC send event)."""
        now = self._clock_ms()
        if now > self._wall:
            self._wall, self._logical = now, 0
        else:
            self._logical += 1
            if self._logical > MAX_LOGICAL:
                self._wall, self._logical = self._wall + 1, 0
        return VersionId(self._wall, self._logical, self.node)

    def observe(self, seen: VersionId) -> None:
        """Move past an id seen from elsewhere (HLC receive event)."""
        if (seen.wall_ms, seen.logical) > (self._wall, self._logical):
            self._wall, self._logical = seen.wall_ms, seen.logical

    @property
    def last(self) -> VersionId:
        """The last id issued or observed (persist it to stay monotonic across restarts)."""
        return VersionId(self._wall, self._logical, self.node)


@dataclass(frozen=True)
class VersionInfo:
    """What navigation needs to know of one version."""

    version_id: VersionId
    parent: VersionId | None
    created_at_ms: int
    tombstone: bool


def select(versions: Sequence[VersionInfo], temporal: Temporal, *, where: str) -> int:
    """The 0-based index in ``versions`` (sorted by id) that ``temporal`` selects.

    Args:
        versions: the context's versions in id order.
        temporal: the temporal segment.
        where: the address, for the error message.

    Raises:
        TemporalOutOfRange: the segment points outside the history.
    """
    count = len(versions)
    value = temporal.value
    number = value if isinstance(value, int) else 0
    index: int | None
    if temporal.kind == "latest":
        index = count - 1
    elif temporal.kind == "first":
        index = 0
    elif temporal.kind == "version":
        index = number - 1
    elif temporal.kind == "back":
        index = count - 1 - number
    elif temporal.kind == "forward":
        index = number
    else:
        index = _at_instant(versions, value)
    if index is None or not 0 <= index < count:
        raise TemporalOutOfRange(
            f"{temporal.render()} is outside the history of {where} ({count} versions)",
            field="temporal",
            input=where,
        )
    return index


def _at_instant(versions: Sequence[VersionInfo], value: object) -> int | None:
    assert isinstance(value, datetime)
    limit_ms = int(value.timestamp() * 1000)
    found = None
    for i, info in enumerate(versions):
        if info.created_at_ms <= limit_ms:
            found = i
    return found


def sibling_groups(versions: Sequence[VersionInfo]) -> dict[VersionId, int]:
    """For each version that has siblings (same parent), the size of its sibling group."""
    by_parent: dict[VersionId | None, list[VersionId]] = {}
    for info in versions:
        by_parent.setdefault(info.parent, []).append(info.version_id)
    out: dict[VersionId, int] = {}
    for group in by_parent.values():
        if len(group) > 1:
            for vid in group:
                out[vid] = len(group)
    return out
