"""Recovery of the derived index: what open_index reports on a damaged directory, and reset.

The ContextStore's recipe is: ``open_index``; on ``IndexCorrupt``, ``reset_index`` and open
again (then rebuild from LevelDB). These tests run that recipe on both backends.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Literal

import pytest

from storage.errors import DataDirInUse
from storage.index import (
    FORMAT_FILE,
    SCHEMA_VERSION,
    IndexConfig,
    IndexCorrupt,
    IndexDoc,
    SearchQuery,
    open_index,
    reset_index,
)

BACKENDS: tuple[Literal["tantivy", "whoosh"], ...] = ("tantivy", "whoosh")

DOC = IndexDoc(
    context="ucxl://claude:architect@chorus:auth/*^/src/auth/jwt.py",
    version_id="v1",
    project="chorus",
    task="auth",
    agent="claude",
    role="architect",
    path="src/auth/jwt.py",
    summary="jwt rotation",
    purpose="",
    insights=(),
    content="",
    tags=(),
    technologies=(),
    readers=("architect",),
    created_at_ms=1,
)


@pytest.fixture(params=[IndexConfig(backend=b) for b in BACKENDS], ids=BACKENDS)
def config(request: pytest.FixtureRequest) -> IndexConfig:
    assert isinstance(request.param, IndexConfig)
    return request.param


@pytest.fixture
def built(tmp_path: Path, config: IndexConfig) -> Path:
    """An index directory holding one committed doc, closed."""
    path = tmp_path / "index"
    ix = open_index(path, config)
    ix.add(DOC)
    ix.close()
    return path


def _recover(path: Path, config: IndexConfig) -> None:
    """The ContextStore recipe: reset, open, check the index is empty and usable."""
    reset_index(path)
    ix = open_index(path, config)
    try:
        assert ix.doc_count() == 0
        ix.add(DOC)
        ix.commit()
        assert [h.context for h in ix.search(SearchQuery(text="jwt"))] == [DOC.context]
    finally:
        ix.close()


def test_missing_directory_is_created_empty(tmp_path: Path, config: IndexConfig) -> None:
    path = tmp_path / "deep" / "index"
    ix = open_index(path, config)
    try:
        assert ix.doc_count() == 0
        format_body = json.loads((path / FORMAT_FILE).read_text())
        assert format_body["backend"] == config.backend
        assert format_body["schema_version"] == SCHEMA_VERSION
    finally:
        ix.close()


def test_deleted_directory_gives_a_fresh_index(built: Path, config: IndexConfig) -> None:
    shutil.rmtree(built)
    ix = open_index(built, config)
    try:
        assert ix.doc_count() == 0
    finally:
        ix.close()


def test_garbage_over_index_files_is_corrupt(built: Path, config: IndexConfig) -> None:
    for entry in built.iterdir():
        if entry.is_file() and entry.name != FORMAT_FILE:
            entry.write_bytes(b"\xde\xad\xbe\xef garbage " * 8)
    with pytest.raises(IndexCorrupt, match="cannot open"):
        open_index(built, config)
    _recover(built, config)


SEGMENT_SUFFIXES = {".seg", ".idx", ".term", ".store", ".fast", ".fieldnorm", ".pos"}


def test_garbage_over_segment_data_is_corrupt(built: Path, config: IndexConfig) -> None:
    """The table of contents (meta.json / _MAIN_n.toc) is intact; the segment data is not."""
    damaged = [entry for entry in built.iterdir() if entry.suffix in SEGMENT_SUFFIXES]
    assert damaged
    for entry in damaged:
        entry.write_bytes(b"garbage " * 16)
    with pytest.raises(IndexCorrupt, match="cannot open"):
        open_index(built, config)
    _recover(built, config)


def test_missing_format_is_corrupt(built: Path, config: IndexConfig) -> None:
    (built / FORMAT_FILE).unlink()
    with pytest.raises(IndexCorrupt, match="no FORMAT"):
        open_index(built, config)
    _recover(built, config)


@pytest.mark.parametrize("body", [b"{not json", b"\xff\xfe", b"[1, 2]", b'{"format": "x"}'])
def test_unreadable_format_is_corrupt(built: Path, config: IndexConfig, body: bytes) -> None:
    (built / FORMAT_FILE).write_bytes(body)
    with pytest.raises(IndexCorrupt, match="FORMAT"):
        open_index(built, config)
    _recover(built, config)


def test_other_backends_index_is_corrupt(built: Path, config: IndexConfig) -> None:
    other_config = IndexConfig(backend="whoosh" if config.backend == "tantivy" else "tantivy")
    with pytest.raises(IndexCorrupt, match="built by backend"):
        open_index(built, other_config)
    _recover(built, other_config)


def test_older_schema_version_is_corrupt(built: Path, config: IndexConfig) -> None:
    body = json.loads((built / FORMAT_FILE).read_text())
    body["schema_version"] = SCHEMA_VERSION - 1
    (built / FORMAT_FILE).write_text(json.dumps(body))
    with pytest.raises(IndexCorrupt, match="schema version"):
        open_index(built, config)
    _recover(built, config)


def test_format_without_backend_files_is_corrupt(built: Path, config: IndexConfig) -> None:
    """A crash inside reset_index (FORMAT kept by a buggy cleaner) is still detected."""
    for entry in built.iterdir():
        if entry.name != FORMAT_FILE:
            entry.unlink()
    with pytest.raises(IndexCorrupt, match="cannot open"):
        open_index(built, config)
    _recover(built, config)


def test_a_file_in_place_of_the_directory(tmp_path: Path, config: IndexConfig) -> None:
    path = tmp_path / "index"
    path.write_bytes(b"not a directory")
    with pytest.raises(IndexCorrupt, match="not a directory"):
        open_index(path, config)
    _recover(path, config)


def test_reset_refuses_an_open_index(built: Path, config: IndexConfig) -> None:
    ix = open_index(built, config)
    try:
        with pytest.raises(DataDirInUse):
            reset_index(built)
        assert ix.doc_count() == 1
    finally:
        ix.close()


def test_reset_of_a_missing_directory_is_a_no_op(tmp_path: Path) -> None:
    reset_index(tmp_path / "absent")
    assert not (tmp_path / "absent").exists()


def test_reset_removes_symlinks_without_following_them(built: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    (built / "link").symlink_to(outside, target_is_directory=True)
    (built / "subdir").mkdir()
    (built / "subdir" / "file").write_text("x")
    reset_index(built)
    assert list(built.iterdir()) == []
    assert (outside / "keep.txt").read_text() == "keep"
