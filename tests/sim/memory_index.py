"""A full-text index in memory, standing in for tantivy in the simulation tier.

Owns: ``MemoryIndex`` (a ``BufferedIndex``: the same buffering, commit policy and closed
state as the real backends, so ``IndexSync``'s watermark and crash catch-up run for real)
and ``use_memory_index``, which makes ``ContextStore.open`` give a registered data
directory this index instead of opening tantivy files. Committed documents live in a
dict owned by the simulated node (they survive its crash, as index files would); staged
changes are lost with the process. Search is a plain filter (match-all or substring of
summary and content); the simulation checks replication, not ranking.

Why: a tantivy commit or writer shutdown costs 15-50 ms, several per schedule; the
simulation's budget is ~60 ms per whole schedule.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import storage.context_store as context_store
from storage.datadir import DataDir, StorageConfig
from storage.index import FullTextIndex, Hit, IndexConfig, IndexDoc, SearchQuery
from storage.index.base import BufferedIndex

_lock = threading.Lock()
_registry: dict[Path, dict[str, IndexDoc]] = {}
_original: Callable[[DataDir, StorageConfig], tuple[FullTextIndex, bool]] | None = None


class _NoLock:
    def release(self) -> None:
        """Nothing to release."""


class MemoryIndex(BufferedIndex):
    """See the module docstring."""

    backend = "memory"

    def __init__(self, committed: dict[str, IndexDoc], config: IndexConfig) -> None:
        super().__init__(config, lambda: 0.0, _NoLock())  # type: ignore[arg-type]
        self._committed = committed
        self._staged: list[tuple[str, IndexDoc | None]] = []

    def _stage_add(self, doc: IndexDoc) -> None:
        self._staged.append((doc.context, doc))

    def _stage_remove(self, context: str) -> None:
        self._staged.append((context, None))

    def _flush(self) -> None:
        for context, doc in self._staged:
            if doc is None:
                self._committed.pop(context, None)
            else:
                self._committed[context] = doc
        self._staged.clear()

    def _search(self, query: SearchQuery) -> list[Hit]:
        text = query.text.strip()
        hits = [
            Hit(doc.context, doc.version_id, 1.0)
            for doc in self._committed.values()
            if text in ("", "*") or text in doc.summary or text in doc.content
        ]
        return sorted(hits, key=lambda hit: hit.context)[: query.limit]

    def _doc_count(self) -> int:
        return len(self._committed)

    def _clear(self) -> None:
        self._staged.clear()
        self._committed.clear()

    def _release(self) -> None:
        self._staged.clear()


def _open(data_dir: DataDir, config: StorageConfig) -> tuple[FullTextIndex, bool]:
    with _lock:
        committed = _registry.get(data_dir.root.resolve())
    if committed is None:
        assert _original is not None
        return _original(data_dir, config)
    return MemoryIndex(committed, config.index), False


def use_memory_index(root: Path, committed: dict[str, IndexDoc]) -> None:
    """From now on, the store at ``root`` opens an in-memory index over ``committed``."""
    global _original
    with _lock:
        if _original is None:
            _original = context_store._open_or_reset_index
            context_store._open_or_reset_index = _open
        _registry[root.resolve()] = committed


def forget(root: Path) -> None:
    """``root`` opens its real index again."""
    with _lock:
        _registry.pop(root.resolve(), None)


def abandon(index: Any) -> None:
    """Drop a ``MemoryIndex`` as a dying process does: staged changes are lost."""
    index._closed = True
    index._release()
