"""Fixtures for storage tests: a fresh data directory with the default roles."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from crypto.roles import DEFAULT_ROLES
from storage.context_store import ContextStore


class FakeClock:
    """A settable millisecond clock, for TTLs and temporal navigation."""

    def __init__(self, start_ms: int = 1_767_225_600_000) -> None:  # 2026-01-01T00:00:00Z
        self.now_ms = start_ms

    def __call__(self) -> int:
        return self.now_ms

    def advance(self, ms: int) -> None:
        self.now_ms += ms


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    root = tmp_path / "node"
    ContextStore.init(root, DEFAULT_ROLES)
    return root


@pytest.fixture
def store(data_dir: Path, clock: FakeClock) -> Iterator[ContextStore]:
    opened = ContextStore.open(data_dir, clock_ms=clock)
    yield opened
    opened.close()
