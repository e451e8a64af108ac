"""Keeps the derived full-text index in step with LevelDB.

Owns: turning versions into index documents, batched commits, the index watermark
(``index/WATERMARK``), the queue of stale contexts that replicated writes leave behind
(``storage.index_queue``, with its durable ``i/`` rows), draining that queue in batches,
catch-up after a crash, and full rebuilds. Must not know how records are encrypted: it is
handed decrypted fields by its caller (``DocSource``, one decrypt per version).

Two ways in:

- Local writes (``ContextStore.store``, the embedded mode) index at once (``add``,
  buffered) and commit by the refresh policy, as before.
- Replicated writes (``storage.replica.Replica.apply``) do not index on the
  acknowledgement path: the writer calls ``begin`` (which gives the durable stale rows to
  write in the versions' own synced batch) and ``end`` (which queues the contexts that
  changed). ``drain`` indexes the queued heads in batches and commits once; the daemon
  runs it every ``refresh_interval_s / 2`` (``node.daemon.lifecycle``), ``commit`` and
  ``close`` drain everything first, and a search drains first when the oldest queued
  write is older than ``refresh_interval_s``.

Locks: the queue has its own lock, held for dict operations only; the index (and the
watermark) has another, held across commits and searches. So ``begin``/``end`` on a
replica's acknowledgement path never wait for an index commit (tens of ms) or a search.

Consistency: LevelDB is the truth. A search sees a write at most ``refresh_interval_s``
after it (plus the time to index the backlog, visible as ``lag_s``). After every commit
the watermark records that every head updated at or before ``indexed_through_ms`` is
indexed; ``close`` marks it clean. On open, a clean watermark needs nothing; an unclean
one (crash) re-indexes the heads updated since it; a missing or corrupt index is rebuilt
from every head; and every ``i/`` row left by a crash is queued again (with the time it
was first marked), to be drained once the node runs: not during ``recover``, because the
keys of the other nodes that signed those versions are trusted only after open.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from storage.address import ContextName
from storage.envelope import Envelope
from storage.errors import CorruptRecord, StorageError
from storage.index import FullTextIndex, Hit, IndexDoc, SearchQuery
from storage.index_queue import IndexQueue
from storage.kv import KV
from storage.schema import INDEX_DIRTY_PREFIX, Head, head_key, index_dirty_key
from storage.version_store import VersionStore

log = logging.getLogger(__name__)
WATERMARK_FILE = "WATERMARK"
DRAIN_BATCH = 256  # contexts indexed between two looks at the queue (one commit per drain)
REFILL_ROUNDS = 16  # extra batches an unbounded drain allows when the memory queue overflowed
DocSource = Callable[[ContextName, Head], tuple[Envelope, dict[str, Any]] | None]


class NotYetIndexable(Exception):
    """Raised by a ``DocSource``: the context cannot be indexed now but may be later (its
    signer is not trusted yet). Its stale row stays; ``retry_deferred`` queues it again."""


Progress = Callable[[int, int], None]


def make_doc(ctx: ContextName, env: Envelope, fields: dict[str, Any]) -> IndexDoc:
    """The index document of a context's latest version."""
    content = fields.get("content", "")
    insights = fields.get("insights", [])
    return IndexDoc(
        context=ctx.canonical(),
        version_id=env.version_id,
        project=ctx.project,
        task=ctx.task,
        agent=ctx.agent,
        role=ctx.role,
        path=ctx.path,
        summary=str(fields.get("summary", "")),
        purpose=str(fields.get("purpose", "")),
        insights=tuple(str(item) for item in insights) if isinstance(insights, list) else (),
        content=content if isinstance(content, str) else "",
        tags=env.tags,
        technologies=env.technologies,
        readers=env.readers,
        created_at_ms=env.created_at_ms,
    )


class IndexSync:
    """The index plus the bookkeeping that lets it be trusted after a crash."""

    def __init__(
        self,
        index: FullTextIndex,
        directory: Path,
        source: DocSource,
        *,
        kv: KV,
        clock_ms: Callable[[], int],
        refresh_interval_s: float,
        queue: IndexQueue | None = None,
    ) -> None:
        self._index = index
        self._watermark_path = directory / WATERMARK_FILE
        self._source = source
        self._kv = kv
        self._clock_ms = clock_ms
        self._refresh_ms = int(refresh_interval_s * 1000)
        # two locks, always taken in this order when both are held: ``_index_lock`` guards
        # the index, ``_pending_max_ms`` and the watermark (held across commits and
        # searches, which take milliseconds); ``_lock`` guards the queue (held for set and
        # dict operations only), so a replicated write's ``begin``/``end`` never waits
        # for an index commit or a search
        self._index_lock = threading.Lock()
        self._lock = threading.Lock()
        self._drain_lock = threading.Lock()  # one drain at a time
        self._queue = queue if queue is not None else IndexQueue()
        self._pending_max_ms = 0
        self._indexed_through_ms = self._read_watermark()[0]
        self._closed = False

    # -- the replicated write path (queued) -------------------------------------------------

    def begin(self, contexts: Iterable[ContextName]) -> list[tuple[bytes, bytes]]:
        """A writer is about to store versions of ``contexts``: the durable stale rows to
        write in the same synced batch. Call ``end`` afterwards, also when the write fails.
        """
        keys = [ctx.key() for ctx in contexts]
        now = str(self._clock_ms()).encode("ascii")
        with self._lock:
            self._queue.begin(keys)
        return [(index_dirty_key(key), now) for key in keys]

    def end(self, changed: Iterable[ContextName], unchanged: Iterable[ContextName]) -> None:
        """The write ``begin`` announced is done: queue the contexts that ``changed``;
        the stale rows of the ``unchanged`` ones (nothing new stored) are dropped when no
        other work waits on them."""
        now = self._clock_ms()
        with self._lock:
            idle = self._queue.end([c.key() for c in changed], [c.key() for c in unchanged], now)
        self._delete_rows(idle)

    def drain(self, *, max_batches: int | None = None) -> int:
        """Index the heads of queued contexts in batches, then commit once.

        Args:
            max_batches: stop after this many batches of ``DRAIN_BATCH`` (None: as many as
                it takes to index what is queued when the drain starts; writers that keep
                writing never keep a drain going for ever).

        Returns:
            Contexts taken from the queue.
        """
        with self._drain_lock:
            if max_batches is None:
                with self._lock:
                    queued = self._queue.pending()
                    refills = REFILL_ROUNDS if self._queue.overflowed else 0
                max_batches = queued // DRAIN_BATCH + 1 + refills
            taken = batches = 0
            while batches < max_batches:
                done = self._index_batch()
                if not done:
                    break
                taken += done
                batches += 1
            if taken:
                with self._index_lock:
                    self._index.commit()
                    self._advance(self._pending_max_ms, clean=False)
                with self._lock:  # a write that ended since is queued again: its row stays
                    released = self._queue.settle()
                self._delete_rows(released)
            return taken

    def _index_batch(self) -> int:
        with self._lock:
            keys = self._queue.take(DRAIN_BATCH)
            if not keys and self._queue.overflowed:
                self._refill()
                keys = self._queue.take(DRAIN_BATCH)
        if not keys:
            return 0
        found = []
        deferred = []
        for key in keys:
            ctx = ContextName.from_key(key)
            try:
                found.append((ctx, self._doc_of(ctx)))  # outside the lock: decrypts
            except NotYetIndexable:
                deferred.append(key)
        with self._index_lock:  # held from the ``wanted`` check to the add: ``remove`` waits
            with self._lock:
                for key in deferred:
                    self._queue.defer(key)
                found = [(ctx, doc) for ctx, doc in found if self._queue.wanted(ctx.key())]
            for ctx, doc in found:  # not removed (purged) since it was taken
                if doc is None:
                    self._index.remove(ctx.canonical())
                else:
                    self._index.add(make_doc(ctx, *doc))
                    self._pending_max_ms = max(self._pending_max_ms, doc[0].created_at_ms)
        return len(keys)

    def _doc_of(self, ctx: ContextName) -> tuple[Envelope, dict[str, Any]] | None:
        head = self._versions_head(ctx)
        return None if head is None else self._source(ctx, head)

    def _versions_head(self, ctx: ContextName) -> Head | None:
        data = self._kv.get(head_key(ctx.key()))
        try:
            return None if data is None else Head.decode(data)
        except CorruptRecord:  # a damaged head row: nothing of it is indexed
            return None

    def _refill(self) -> None:
        """Read durable stale rows back into the memory queue (under ``_lock``)."""
        rows: list[tuple[bytes, int]] = []
        limit = DRAIN_BATCH * REFILL_ROUNDS
        for key, value in self._kv.scan(INDEX_DIRTY_PREFIX):
            rows.append((key[len(INDEX_DIRTY_PREFIX) :], _since(value)))
            if len(rows) > limit:
                break
        self._queue.refill(rows[:limit], complete=len(rows) <= limit)

    def _queue_later(self, ctx: ContextName) -> None:
        """A context the source cannot index now: a durable row and a deferred entry."""
        key = ctx.key()
        try:
            self._kv.write(
                [(index_dirty_key(key), str(self._clock_ms()).encode("ascii"))], sync=False
            )
        except StorageError as exc:  # derived data: the memory entry still retries it
            log.warning("cannot record a context to index later (%s); retried in memory", exc)
        with self._lock:
            self._queue.mark(key, self._clock_ms())
            self._queue.defer(key)

    def _delete_rows(self, keys: Sequence[bytes]) -> None:
        """Unsynced: a row that outlives a crash only costs one more indexing on open."""
        if not keys:
            return
        try:
            self._kv.write([], [index_dirty_key(key) for key in keys], sync=False)
        except StorageError as exc:  # the rows stay: the next open indexes them once more
            log.warning("cannot drop %d stale-index rows (%s)", len(keys), exc)

    def retry_deferred(self) -> None:
        """Queue again what could not be indexed yet (call when a signer became trusted)."""
        with self._lock:
            self._queue.retry_deferred()

    def lag(self) -> dict[str, Any]:
        """``{"pending": contexts waiting, "lag_s": age of the oldest}`` (``node.status``)."""
        now = self._clock_ms()
        with self._lock:
            return {
                "pending": self._queue.pending(),
                "lag_s": self._queue.lag_ms(now) / 1000,
            }

    # -- the write path ------------------------------------------------------------------

    def add(self, ctx: ContextName, env: Envelope, fields: dict[str, Any]) -> None:
        """Index the new latest version of ``ctx`` (buffered)."""
        with self._index_lock:
            self._index.add(make_doc(ctx, env, fields))
            self._pending_max_ms = max(self._pending_max_ms, env.created_at_ms)

    def remove(self, ctx: ContextName) -> None:
        """Drop ``ctx`` from the index (buffered)."""
        with self._index_lock:
            with self._lock:
                self._queue.forget(ctx.key())
            self._index.remove(ctx.canonical())

    def refresh_context(self, ctx: ContextName, head: Head | None) -> None:
        """Re-index ``ctx`` from its current head (or drop it)."""
        try:
            found = self._source(ctx, head) if head is not None else None
        except NotYetIndexable:
            self._queue_later(ctx)
            return
        if found is None:
            self.remove(ctx)
        else:
            self.add(ctx, *found)

    def maybe_commit(self) -> None:
        """Commit if the batching policy says so, and advance the watermark."""
        with self._index_lock:
            through = self._pending_max_ms
            if self._index.maybe_commit():
                self._advance(through, clean=False)

    def commit(self) -> None:
        """Drain the queue, then commit now (a search then sees every write so far)."""
        self.drain()
        with self._index_lock:
            self._index.commit()
            self._advance(self._pending_max_ms, clean=False)

    def search(
        self,
        text: str,
        *,
        project: str | None,
        task: str | None,
        tags: tuple[str, ...],
        as_role: str | None,
        since_ms: int | None,
        until_ms: int | None,
        limit: int,
    ) -> list[Hit]:
        """Ranked hits (see ``storage.index.SearchQuery``)."""
        with self._lock:
            lag_ms = self._queue.lag_ms(self._clock_ms())
            due = self._queue.pending() > 0 and lag_ms >= self._refresh_ms
        if due:  # the background drain fell behind the freshness bound: catch up first
            self.drain()
        query = SearchQuery(
            text=text,
            project=project,
            task=task,
            tags=tags,
            readable_by=None if as_role is None else (as_role,),
            since_ms=since_ms,
            until_ms=until_ms,
            limit=limit,
        )
        with self._index_lock:
            return self._index.search(query)

    # -- recovery -----------------------------------------------------------------------

    def recover(self, versions: VersionStore, *, rebuild: bool) -> int:
        """Bring the index up to date after open; returns documents (re)indexed."""
        through, clean = self._read_watermark()
        if rebuild or through < 0:
            done = self.rebuild(versions)
        elif clean:
            self._advance(through, clean=False)
            done = 0
        else:
            done = self._reindex(versions, since_ms=through)
        with self._lock:  # drained later: the signers' trust is set up after open
            self._refill()
        return done

    def rebuild(self, versions: VersionStore, progress: Progress | None = None) -> int:
        """Drop everything and index every live head."""
        with self._index_lock:
            self._index.clear()
        return self._reindex(versions, since_ms=None, progress=progress)

    def _reindex(
        self, versions: VersionStore, *, since_ms: int | None, progress: Progress | None = None
    ) -> int:
        heads = [
            (ctx, head)
            for ctx, head in versions.heads(ContextName("any", "any", "any", "any", ""))
            if since_ms is None or head.updated_ms >= since_ms
        ]
        done = 0
        for i, (ctx, head) in enumerate(heads, start=1):
            try:
                found = self._source(ctx, head)
            except NotYetIndexable:  # e.g. on open, before the peers' keys are trusted
                self._queue_later(ctx)
                continue
            if found is None:
                self.remove(ctx)
            else:
                self.add(ctx, *found)
                done += 1
            if progress is not None:
                progress(i, len(heads))
        self.commit()
        return done

    # -- bookkeeping ----------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Backend, committed documents, and the watermark."""
        with self._index_lock:
            return {
                "backend": self._index.backend,
                "documents": self._index.doc_count(),
                "indexed_through_ms": self._indexed_through_ms,
            }

    def close(self) -> None:
        """Commit, mark the watermark clean and close the index (idempotent)."""
        if self._closed:
            return
        while self.drain():  # nobody writes any more: until the queue is empty
            pass
        with self._index_lock:
            self._index.close()
            self._advance(self._pending_max_ms, clean=True)
            self._closed = True

    def _advance(self, through_ms: int, *, clean: bool) -> None:
        self._indexed_through_ms = max(self._indexed_through_ms, through_ms)
        tmp = self._watermark_path.with_suffix(".tmp")
        tmp.write_text(
            json.dumps({"indexed_through_ms": self._indexed_through_ms, "clean": clean}),
            encoding="utf-8",
        )
        tmp.replace(self._watermark_path)

    def _read_watermark(self) -> tuple[int, bool]:
        """(indexed_through_ms, clean); (-1, False) when missing or unreadable."""
        try:
            data = json.loads(self._watermark_path.read_text(encoding="utf-8"))
            return int(data["indexed_through_ms"]), bool(data["clean"])
        except (OSError, ValueError, KeyError, TypeError):
            return -1, False


def _since(value: bytes) -> int:
    """The time in a stale row (0 for a damaged one: it is indexed all the same)."""
    try:
        return int(value.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return 0
