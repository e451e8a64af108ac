"""The Raft log as the core sees it: a snapshot, the entries after it, and what is durable.

A pure core (ARCHITECTURE.md §2): no I/O, no clock, no randomness. ``node.control.raft``
owns one ``RaftLog``; the shell never touches it (it persists what ``Ready`` hands it).

Owns: the entries after the latest snapshot (``offset``: the snapshot's index, whose term
is kept for matching, Raft §5.3), the commit and applied indexes, which entries are
stable (handed to the shell in an earlier ``Ready`` and advanced), the snapshot waiting
to be persisted and applied, and the latest configuration in the log (thesis §4.1: a
configuration takes effect when appended and falls back when its entry is truncated).

Must not know: roles, terms of office, peers, messages.

Invariants:
- ``entries[k].index == offset + 1 + k`` and terms never decrease along the log;
- ``applied <= committed <= last_index()``; committed entries are never truncated
  (``append`` refuses, the caller ignores the peer input that asked for it);
- ``conf`` is the configuration of the last CONF entry in the log, else the snapshot's.
"""

from __future__ import annotations

from collections.abc import Sequence

from node.control.raft_types import (
    ConfState,
    Entry,
    EntryKind,
    PersistedState,
    Snapshot,
    SnapshotMeta,
)

EMPTY_CONF = ConfState(frozenset())


class RaftLog:
    """A snapshot plus the entries after it; ``stable`` marks what the shell has persisted."""

    def __init__(self, state: PersistedState) -> None:
        """Load what the shell read from disk (raises ValueError if it is not a log)."""
        snap = state.snapshot
        self.snapshot: Snapshot | None = snap
        self.offset = snap.meta.index if snap is not None else 0
        self.offset_term = snap.meta.term if snap is not None else 0
        self.entries: list[Entry] = [e for e in state.entries if e.index > self.offset]
        for k, e in enumerate(self.entries):
            prev_term = self.entries[k - 1].term if k else self.offset_term
            if e.index != self.offset + 1 + k or e.term < prev_term:
                raise ValueError(f"persisted entries are not a log at index {e.index}")
        self.stable = self.last_index()
        self.committed = min(max(state.hard_state.commit, self.offset), self.last_index())
        self.applied = self.offset
        self.pending_snapshot: Snapshot | None = None
        self.conf = EMPTY_CONF
        self.conf_index = 0
        self._rescan_conf()

    # -- reading ------------------------------------------------------------------------

    def first_index(self) -> int:
        return self.offset + 1

    def last_index(self) -> int:
        return self.entries[-1].index if self.entries else self.offset

    def last_term(self) -> int:
        return self.entries[-1].term if self.entries else self.offset_term

    def term(self, index: int) -> int | None:
        """The term at ``index``; None when compacted away or beyond the log."""
        if index == self.offset:
            return self.offset_term
        if self.offset < index <= self.last_index():
            return self.entries[index - self.offset - 1].term
        return None

    def match_term(self, index: int, term: int) -> bool:
        return self.term(index) == term

    def is_up_to_date(self, index: int, term: int) -> bool:
        """Raft §5.4.1: a log ending at (index, term) is at least as up to date as ours."""
        return term > self.last_term() or (term == self.last_term() and index >= self.last_index())

    def slice(self, lo: int, limit: int) -> list[Entry]:
        """Up to ``limit`` entries from index ``lo`` (which must be > offset)."""
        start = lo - self.offset - 1
        return self.entries[start : start + limit] if start >= 0 else []

    def between(self, lo: int, hi: int) -> list[Entry]:
        """The entries with lo < index <= hi that are still in the log."""
        return [e for e in self.entries if lo < e.index <= hi]

    def unstable(self) -> list[Entry]:
        return [e for e in self.entries if e.index > self.stable]

    def conf_at(self, index: int) -> ConfState:
        """The configuration in force at ``index`` (the last CONF entry at or before it)."""
        for e in reversed(self.between(self.offset, index)):
            if e.conf is not None:
                return e.conf
        return self.snapshot.meta.conf if self.snapshot is not None else EMPTY_CONF

    # -- writing ------------------------------------------------------------------------

    def append(self, entries: Sequence[Entry]) -> bool:
        """Append, truncating a conflicting suffix first (Raft §5.3). False (nothing changed)
        if the entries do not follow the log or would overwrite a committed entry."""
        if not entries:
            return True
        first = entries[0].index
        if first <= self.offset or first > self.last_index() + 1:
            return False
        new = list(entries)
        while new and self.term(new[0].index) == new[0].term:
            new.pop(0)  # already held (Log Matching: the rest of the prefix too)
        if not new:
            return True
        at = new[0].index
        if at <= self.committed:
            return False
        if at <= self.last_index():
            del self.entries[at - self.offset - 1 :]
            self.stable = min(self.stable, at - 1)
            if at <= self.conf_index:
                self._rescan_conf()
        self.entries.extend(new)
        for e in new:
            if e.kind is EntryKind.CONF and e.conf is not None:
                self.conf, self.conf_index = e.conf, e.index
        return True

    def commit_to(self, index: int) -> bool:
        index = min(index, self.last_index())
        if index <= self.committed:
            return False
        self.committed = index
        return True

    def restore(self, snap: Snapshot) -> None:
        """Install a snapshot from the leader: the log becomes just the snapshot."""
        self.snapshot = snap
        self.pending_snapshot = snap
        self.offset, self.offset_term = snap.meta.index, snap.meta.term
        self.entries = []
        self.stable = self.offset
        self.committed = self.offset
        self.conf, self.conf_index = snap.meta.conf, snap.meta.index

    def compact(self, index: int, data: bytes) -> Snapshot:
        """The application's snapshot at ``index`` (<= applied); drops entries <= index."""
        term = self.term(index)
        if index <= self.offset or index > self.applied or term is None:
            raise ValueError(f"cannot compact at {index}: log {self.offset}..{self.applied}")
        snap = Snapshot(SnapshotMeta(index, term, self.conf_at(index)), data)
        del self.entries[: index - self.offset]
        self.snapshot, self.offset, self.offset_term = snap, index, term
        if self.conf_index < index:
            self.conf_index = index
        return snap

    def stable_to(self, last: Entry) -> None:
        """The shell persisted entries up to ``last`` (ignored if since overwritten)."""
        if self.term(last.index) == last.term:
            self.stable = max(self.stable, last.index)

    def _rescan_conf(self) -> None:
        for e in reversed(self.entries):
            if e.conf is not None:
                self.conf, self.conf_index = e.conf, e.index
                return
        self.conf = self.snapshot.meta.conf if self.snapshot is not None else EMPTY_CONF
        self.conf_index = self.offset
