"""The full-text index interface shared by every backend, and its batching policy.

Owns: the documents and queries the index speaks (``IndexDoc``, ``SearchQuery``, ``Hit``),
its configuration (``IndexConfig``), the ``FullTextIndex`` protocol, the ``IndexCorrupt``
error, the commit policy (``CommitPolicy``, a pure core: it is given ``now``, it never reads a
clock), the deterministic ranking rule (``rank_hits``) and ``BufferedIndex``, the base class
that turns the policy into the near-real-time behaviour every backend shares.

Must not know: tantivy or whoosh, LevelDB, encryption, or who may read what (``readers`` is
data the caller filled in; this package only filters on it).

Invariants:
    * One document per context: ``add`` is an upsert keyed by ``IndexDoc.context``.
    * Commits are batched, never one per ``add``. A search sees a write at most
      ``refresh_interval_s`` after it, or at once after ``commit()``; a write is also committed
      as soon as ``max_pending`` changes are buffered.
    * Free text has AND semantics in every backend: a document matches only if every term of
      the query occurs in at least one of ``TEXT_FIELDS``. Filters never change scores.
    * Hits are ordered by score descending, ties by context ascending (byte order), so equal
      inputs give equal outputs on both backends.
"""

from __future__ import annotations

import abc
import fcntl
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from storage.errors import DataDirInUse, Internal, InvalidPayload, StorageError

#: Version of the field layout both backends write; bump it (and FORMAT mismatches) on change.
SCHEMA_VERSION = 1

#: Fields searched by free text, with the boost each one gets (same in both backends).
FIELD_BOOSTS: dict[str, float] = {
    "summary": 3.0,
    "purpose": 2.0,
    "tags": 2.0,
    "technologies": 2.0,
    "insights": 1.5,
    "path": 1.5,
    "content": 1.0,
}
TEXT_FIELDS: tuple[str, ...] = tuple(FIELD_BOOSTS)

#: Score reported for every hit of a filter-only query (empty text): all hits tie.
FILTER_ONLY_SCORE = 1.0

#: tantivy's smallest per-thread writer budget; the whole budget must be at least this.
MIN_WRITER_HEAP_BYTES = 15_000_000


class IndexCorrupt(StorageError):
    """The index on disk cannot be opened or read; rebuild it from LevelDB.

    The store's own fault (or the disk's), never the caller's. The index is derived data:
    ``reset_index`` then a rebuild loses nothing.
    """

    code = "UCXL-500-INDEX_CORRUPT"


@dataclass(frozen=True)
class IndexDoc:
    """What the index holds for one context: its latest version's searchable fields.

    ``context`` is the canonical address without its temporal segment and is the unique key.
    ``readers`` lists the roles that may read the record.
    """

    context: str
    version_id: str
    project: str
    task: str
    agent: str
    role: str
    path: str
    summary: str
    purpose: str
    insights: tuple[str, ...]
    content: str
    tags: tuple[str, ...]
    technologies: tuple[str, ...]
    readers: tuple[str, ...]
    created_at_ms: int


@dataclass(frozen=True)
class SearchQuery:
    """A search: free text (AND of its terms; ``""`` or ``"*"`` match all) plus filters.

    ``tags`` must all be present; ``readable_by`` keeps docs whose readers intersect it;
    ``since_ms``/``until_ms`` bound ``created_at_ms`` inclusively.
    """

    text: str = ""
    project: str | None = None
    task: str | None = None
    agent: str | None = None
    role: str | None = None
    tags: tuple[str, ...] = ()
    readable_by: tuple[str, ...] | None = None
    since_ms: int | None = None
    until_ms: int | None = None
    limit: int = 20


@dataclass(frozen=True)
class Hit:
    """One search result: the context, the version that was indexed, its score."""

    context: str
    version_id: str
    score: float


@dataclass(frozen=True)
class IndexConfig:
    """Validated index settings.

    Attributes:
        backend: ``"tantivy"`` (default, fast) or ``"whoosh"`` (pure Python).
        refresh_interval_s: the longest a buffered change waits before a search commits it.
        max_pending: buffered changes that force a commit on the next add/remove/search.
        writer_heap_bytes: tantivy's indexing memory budget (ignored by whoosh).
    """

    backend: Literal["tantivy", "whoosh"] = "tantivy"
    refresh_interval_s: float = 1.0
    max_pending: int = 1000
    writer_heap_bytes: int = 64_000_000

    def __post_init__(self) -> None:
        if self.backend not in ("tantivy", "whoosh"):
            raise ValueError(f"unknown index backend {self.backend!r}")
        if not (math.isfinite(self.refresh_interval_s) and self.refresh_interval_s >= 0):
            raise ValueError("refresh_interval_s must be a finite number >= 0")
        if self.max_pending < 1:
            raise ValueError("max_pending must be >= 1")
        if self.writer_heap_bytes < MIN_WRITER_HEAP_BYTES:
            raise ValueError(f"writer_heap_bytes must be >= {MIN_WRITER_HEAP_BYTES}")


class FullTextIndex(Protocol):
    """A derived, rebuildable full-text index of contexts (one document per context)."""

    backend: str

    def add(self, doc: IndexDoc) -> None:
        """Buffer an upsert of ``doc`` (replaces any doc of the same context)."""

    def remove(self, context: str) -> None:
        """Buffer the deletion of ``context``'s doc."""

    def commit(self) -> None:
        """Make pending changes durable and visible to searches."""

    def maybe_commit(self) -> bool:
        """Commit if the batching policy says so; return whether it committed."""

    def search(self, query: SearchQuery) -> list[Hit]:
        """Run ``query`` (after ``maybe_commit``); best hit first."""

    def doc_count(self) -> int:
        """Number of committed docs."""

    def clear(self) -> None:
        """Drop every doc, committed or pending."""

    def close(self) -> None:
        """Commit pending changes and release the writer; idempotent."""


class DirLock:
    """An exclusive advisory lock (``flock``) on the directory ``path`` itself.

    One open index per directory: a second ``open_index`` or a ``reset_index`` of a directory
    in use, in this process or another, fails instead of damaging it. Locking the directory
    (not a lock file in it) leaves nothing behind, and the kernel drops the lock when the
    process dies, so a crash never leaves the directory locked.
    """

    def __init__(self, path: Path) -> None:
        """Take the lock.

        Raises:
            DataDirInUse: someone else holds it.
        """
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(fd)
            raise DataDirInUse(f"index directory {path} is already open") from exc
        self._fd: int | None = fd

    def release(self) -> None:
        """Drop the lock; releasing twice is a no-op."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


@dataclass
class CommitPolicy:
    """When to commit buffered changes (pure: the caller passes ``now``).

    Attributes:
        refresh_interval_s: commit once the oldest pending change is this old.
        max_pending: commit once this many changes are pending.
        pending: changes buffered since the last commit.
        oldest_at: ``now`` of the first of them, or None when nothing is pending.
    """

    refresh_interval_s: float
    max_pending: int
    pending: int = 0
    oldest_at: float | None = None

    def note_change(self, now: float) -> None:
        """Record one buffered change made at ``now``."""
        self.pending += 1
        if self.oldest_at is None:
            self.oldest_at = now

    def due(self, now: float) -> bool:
        """Whether buffered changes must be committed at ``now``."""
        if self.pending == 0 or self.oldest_at is None:
            return False
        too_many = self.pending >= self.max_pending
        too_old = now - self.oldest_at >= self.refresh_interval_s
        return too_many or too_old

    def committed(self) -> None:
        """Record that every pending change was committed (or dropped)."""
        self.pending = 0
        self.oldest_at = None


def is_match_all(text: str) -> bool:
    """Whether free text means "no text condition": empty, blank or a lone ``*``."""
    return text.strip() in ("", "*")


def rank_hits(fetch: Callable[[int], list[Hit]], limit: int) -> list[Hit]:
    """The ``limit`` best hits, score descending, ties broken by context ascending.

    A backend's top-n cut breaks ties by its own doc order, so when the n-th score ties with
    the next one the cut may drop a context that sorts earlier. This asks ``fetch`` for one
    more than ``limit`` (enough to see whether the cut falls inside a tie), then for twice as
    many while the last fetched score still ties the ``limit``-th one (or until results run out).

    Args:
        fetch: returns up to n hits in the backend's order (best first).
        limit: how many hits to return (>= 1).

    Returns:
        At most ``limit`` hits in deterministic order.
    """
    wanted = limit + 1
    while True:
        hits = sorted(fetch(wanted), key=lambda h: -h.score)
        if len(hits) < wanted or hits[-1].score < hits[limit - 1].score:
            break
        wanted *= 2
    return sorted(hits, key=lambda h: (-h.score, h.context))[:limit]


def validate_query(query: SearchQuery) -> None:
    """Reject queries no backend can run.

    Raises:
        InvalidPayload: ``limit`` below 1, ``since_ms`` after ``until_ms``, or text that is not
            valid Unicode (lone surrogates).
    """
    try:
        query.text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidPayload("search text is not valid Unicode", field="text") from exc
    if query.limit < 1:
        raise InvalidPayload("search limit must be >= 1", field="limit")
    since, until = query.since_ms, query.until_ms
    if since is not None and until is not None and since > until:
        raise InvalidPayload("since_ms is after until_ms", field="since_ms")


class BufferedIndex(abc.ABC):
    """The behaviour every backend shares: buffering, the commit policy, closed state.

    A backend implements the ``_stage_*``, ``_flush``, ``_search``, ``_doc_count``, ``_clear``
    and ``_release`` hooks; this class decides when they run. Not thread-safe: callers use
    one thread at a time (the ContextStore runs index work in one worker thread).
    """

    backend: str

    def __init__(self, config: IndexConfig, clock: Callable[[], float], lock: DirLock) -> None:
        self._config = config
        self._clock = clock
        self._lock = lock
        self._policy = CommitPolicy(config.refresh_interval_s, config.max_pending)
        self._closed = False

    # -- the FullTextIndex protocol --------------------------------------------------------

    def add(self, doc: IndexDoc) -> None:
        """Buffer an upsert of ``doc``; commits only if the policy says so.

        Raises:
            InvalidPayload: ``doc.context`` is empty.
            Internal: the index is closed.
        """
        self._check_open()
        if not doc.context:
            raise InvalidPayload("index doc has an empty context", field="context")
        self._stage_add(doc)
        self._changed()

    def remove(self, context: str) -> None:
        """Buffer the deletion of ``context``'s doc (a no-op if it has none).

        Raises:
            Internal: the index is closed.
        """
        self._check_open()
        self._stage_remove(context)
        self._changed()

    def commit(self) -> None:
        """Make pending changes durable and visible to searches at once.

        Raises:
            Internal: the index is closed.
        """
        self._check_open()
        if self._policy.pending:
            self._flush()
        self._policy.committed()

    def maybe_commit(self) -> bool:
        """Commit if ``max_pending`` changes are pending or the oldest is too old.

        Returns:
            Whether a commit happened.
        """
        self._check_open()
        if not self._policy.due(self._clock()):
            return False
        self.commit()
        return True

    def search(self, query: SearchQuery) -> list[Hit]:
        """Run ``query`` after ``maybe_commit()``; best hit first, ties by context.

        Raises:
            InvalidPayload: the query text cannot be parsed, or the query is invalid.
            IndexCorrupt: the index files cannot be read.
            Internal: the index is closed.
        """
        validate_query(query)
        self.maybe_commit()
        return self._search(query)

    def doc_count(self) -> int:
        """Number of committed docs (pending changes are not counted)."""
        self._check_open()
        return self._doc_count()

    def clear(self) -> None:
        """Drop every doc, committed or pending, and commit the empty index."""
        self._check_open()
        self._clear()
        self._policy.committed()

    def close(self) -> None:
        """Commit pending changes and release the writer; closing twice is a no-op."""
        if self._closed:
            return
        try:
            self.commit()
        finally:
            self._closed = True
            try:
                self._release()
            finally:
                self._lock.release()

    # -- helpers and backend hooks ---------------------------------------------------------

    def _changed(self) -> None:
        self._policy.note_change(self._clock())
        self.maybe_commit()

    def _check_open(self) -> None:
        if self._closed:
            raise Internal(f"{self.backend} index is closed")

    @abc.abstractmethod
    def _stage_add(self, doc: IndexDoc) -> None: ...

    @abc.abstractmethod
    def _stage_remove(self, context: str) -> None: ...

    @abc.abstractmethod
    def _flush(self) -> None: ...

    @abc.abstractmethod
    def _search(self, query: SearchQuery) -> list[Hit]: ...

    @abc.abstractmethod
    def _doc_count(self) -> int: ...

    @abc.abstractmethod
    def _clear(self) -> None: ...

    @abc.abstractmethod
    def _release(self) -> None: ...
