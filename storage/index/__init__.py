"""The local full-text index: one interface (``FullTextIndex``), two backends.

Owns: the index directory (``DATA_DIR/index/``) and its ``FORMAT`` file, a small JSON
``{"format": "slurp-index", "backend": ..., "schema_version": ...}`` that says which backend
and field layout wrote the files; ``open_index`` and ``reset_index``.

Must not know: LevelDB, encryption, the ContextStore. The index is derived data: when
``open_index`` raises ``IndexCorrupt`` the caller runs ``reset_index`` and rebuilds the index
from LevelDB, losing nothing.

Refresh bound (near-real-time): changes are buffered and committed in batches, never one
commit per ``add``. A search sees a write at most ``IndexConfig.refresh_interval_s`` after
it, or at once after ``commit()``; a write also becomes visible once ``max_pending`` changes
are buffered. Buffered changes are committed by the next ``add``/``remove``/``search``/
``maybe_commit`` call that finds them due, and by ``close()``; a process that dies first loses
them from the index (not from LevelDB).

The directory may also hold files of the caller (``IndexSync``'s ``WATERMARK``); the backends
ignore them and ``reset_index`` removes them with the rest.

Invariants: one open index per directory (``DirLock``, a lock on the directory itself);
``FORMAT`` is written only after the
backend created its files, and ``reset_index`` removes it first, so a crash at any point
leaves a directory that ``open_index`` either opens or reports as ``IndexCorrupt``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from storage.index.base import (
    SCHEMA_VERSION,
    BufferedIndex,
    DirLock,
    FullTextIndex,
    Hit,
    IndexConfig,
    IndexCorrupt,
    IndexDoc,
    SearchQuery,
)
from storage.index.tantivy_backend import create_tantivy, open_tantivy
from storage.index.whoosh_backend import create_whoosh, open_whoosh

__all__ = [
    "FORMAT_FILE",
    "SCHEMA_VERSION",
    "FullTextIndex",
    "Hit",
    "IndexConfig",
    "IndexCorrupt",
    "IndexDoc",
    "SearchQuery",
    "open_index",
    "reset_index",
]

FORMAT_FILE = "FORMAT"
_FORMAT_NAME = "slurp-index"

_Opener = Callable[[Path, IndexConfig, Callable[[], float], DirLock], BufferedIndex]
_CREATE: dict[str, _Opener] = {"tantivy": create_tantivy, "whoosh": create_whoosh}
_OPEN: dict[str, _Opener] = {"tantivy": open_tantivy, "whoosh": open_whoosh}


def open_index(
    path: Path, config: IndexConfig, *, clock: Callable[[], float] = time.monotonic
) -> FullTextIndex:
    """Open the index in ``path``, creating the directory and an empty index if needed.

    Args:
        path: the index directory (``DATA_DIR/index``).
        config: backend and batching settings.
        clock: monotonic seconds, for the refresh bound (inject a fake one in tests).

    Returns:
        The open index; the caller must ``close()`` it.

    Raises:
        IndexCorrupt: the directory holds something this build cannot open: no or a bad
            FORMAT, another backend's index, an older schema, or damaged files.
        DataDirInUse: the index is already open (in this process or another).
    """
    if path.exists() and not path.is_dir():
        raise IndexCorrupt(f"index path {path} is not a directory")
    path.mkdir(parents=True, exist_ok=True)
    lock = DirLock(path)
    try:
        if _is_empty(path):
            opened = _CREATE[config.backend](path, config, clock, lock)
            try:
                _write_format(path, config.backend)
            except BaseException:
                opened.close()
                raise
        else:
            _check_format(path, config.backend)
            opened = _OPEN[config.backend](path, config, clock, lock)
    except BaseException:
        lock.release()
        raise
    return opened


def reset_index(path: Path) -> None:
    """Delete everything in the index directory, keeping the directory.

    ``FORMAT`` goes first, so an interrupted reset leaves a directory ``open_index`` rejects
    (and the caller resets again). Symlinks inside are removed, never followed. A missing
    ``path`` is fine; a file at ``path`` is removed.

    Args:
        path: the index directory.

    Raises:
        DataDirInUse: the index is open (its lock is held).
    """
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_dir():
        path.unlink()
        return
    lock = DirLock(path)
    try:
        (path / FORMAT_FILE).unlink(missing_ok=True)
        for entry in path.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    finally:
        lock.release()


def _is_empty(path: Path) -> bool:
    return next(path.iterdir(), None) is None


def _write_format(path: Path, backend: str) -> None:
    """Write FORMAT atomically (temp file, fsync, rename)."""
    body = {"format": _FORMAT_NAME, "backend": backend, "schema_version": SCHEMA_VERSION}
    tmp = path / f"{FORMAT_FILE}.tmp"
    with tmp.open("w", encoding="utf-8") as f:
        json.dump(body, f)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path / FORMAT_FILE)


def _check_format(path: Path, backend: str) -> None:
    """Raise IndexCorrupt unless FORMAT says this backend and this schema version."""
    try:
        body = json.loads((path / FORMAT_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise IndexCorrupt(f"index directory {path} has no FORMAT file") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IndexCorrupt(f"index FORMAT file in {path} is unreadable") from exc
    if not isinstance(body, dict) or body.get("format") != _FORMAT_NAME:
        raise IndexCorrupt(f"index FORMAT file in {path} is not a slurp index format")
    found_backend = body.get("backend")
    if found_backend != backend:
        raise IndexCorrupt(f"index was built by backend {found_backend!r}, not {backend!r}")
    found_version = body.get("schema_version")
    if found_version != SCHEMA_VERSION:
        raise IndexCorrupt(
            f"index schema version is {found_version!r}, this build needs {SCHEMA_VERSION}"
        )
