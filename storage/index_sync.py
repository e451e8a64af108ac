"""Keeps the derived full-text index in step with LevelDB.

Owns: turning versions into index documents, batched commits, the index watermark
(``index/WATERMARK``), catch-up after a crash, and full rebuilds. Must not know how
records are encrypted: it is handed decrypted fields by its caller.

Consistency: LevelDB is the truth; the index may lag by at most the refresh interval
(``IndexConfig.refresh_interval_s``). After every commit the watermark records that every
head updated at or before ``indexed_through_ms`` is indexed; ``close`` marks it clean.
On open, a clean watermark needs nothing; an unclean one (crash) re-indexes the heads
updated since it; a missing or corrupt index is rebuilt from every head.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from storage.address import ContextName
from storage.envelope import Envelope
from storage.index import FullTextIndex, Hit, IndexDoc, SearchQuery
from storage.schema import Head
from storage.version_store import VersionStore

WATERMARK_FILE = "WATERMARK"
DocSource = Callable[[ContextName, Head], tuple[Envelope, dict[str, Any]] | None]
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

    def __init__(self, index: FullTextIndex, directory: Path, source: DocSource) -> None:
        self._index = index
        self._watermark_path = directory / WATERMARK_FILE
        self._source = source
        self._lock = threading.Lock()
        self._pending_max_ms = 0
        self._indexed_through_ms = self._read_watermark()[0]
        self._closed = False

    # -- the write path ------------------------------------------------------------------

    def add(self, ctx: ContextName, env: Envelope, fields: dict[str, Any]) -> None:
        """Index the new latest version of ``ctx`` (buffered)."""
        with self._lock:
            self._index.add(make_doc(ctx, env, fields))
            self._pending_max_ms = max(self._pending_max_ms, env.created_at_ms)

    def remove(self, ctx: ContextName) -> None:
        """Drop ``ctx`` from the index (buffered)."""
        with self._lock:
            self._index.remove(ctx.canonical())

    def refresh_context(self, ctx: ContextName, head: Head | None) -> None:
        """Re-index ``ctx`` from its current head (or drop it)."""
        found = self._source(ctx, head) if head is not None else None
        if found is None:
            self.remove(ctx)
        else:
            self.add(ctx, *found)

    def maybe_commit(self) -> None:
        """Commit if the batching policy says so, and advance the watermark."""
        with self._lock:
            through = self._pending_max_ms
            if self._index.maybe_commit():
                self._advance(through, clean=False)

    def commit(self) -> None:
        """Commit now."""
        with self._lock:
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
        with self._lock:
            return self._index.search(query)

    # -- recovery -----------------------------------------------------------------------

    def recover(self, versions: VersionStore, *, rebuild: bool) -> int:
        """Bring the index up to date after open; returns documents (re)indexed."""
        through, clean = self._read_watermark()
        if rebuild or through < 0:
            return self.rebuild(versions)
        if clean:
            self._advance(through, clean=False)
            return 0
        return self._reindex(versions, since_ms=through)

    def rebuild(self, versions: VersionStore, progress: Progress | None = None) -> int:
        """Drop everything and index every live head."""
        with self._lock:
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
            found = self._source(ctx, head)
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
        with self._lock:
            return {
                "backend": self._index.backend,
                "documents": self._index.doc_count(),
                "indexed_through_ms": self._indexed_through_ms,
            }

    def close(self) -> None:
        """Commit, mark the watermark clean and close the index (idempotent)."""
        if self._closed:
            return
        with self._lock:
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
