"""Fixtures of the CLI tests: a fresh node per test, and a runner bound to its data dir."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from cli.main import app
from crypto.roles import DEFAULT_ROLES
from storage.context_store import ContextStore, wall_clock_ms
from storage.record import ContextRecord
from storage.views import StoredRef

DEV = "ucxl://claude:backend_developer@chorus:auth/*^/src/auth/jwt.py"
"""A concrete address of the default role ``backend_developer``."""

JAN_1_2025_MS = 1_735_689_600_000
DAY_MS = 86_400_000


class SteppingClock:
    """A clock that returns ``now_ms`` and moves only when told."""

    def __init__(self, now_ms: int = JAN_1_2025_MS) -> None:
        self.now_ms = now_ms

    def __call__(self) -> int:
        return self.now_ms


@dataclass
class Slurp:
    """The ``slurp`` command run in-process against one data directory."""

    data_dir: Path
    runner: CliRunner

    def run(self, *args: str, input: str | None = None) -> Result:
        """``slurp --data-dir DATA_DIR ARGS...``, with ``input`` on stdin."""
        return self.runner.invoke(app, ["--data-dir", str(self.data_dir), *args], input=input)

    def ok(self, *args: str, input: str | None = None) -> Result:
        """Run; it must succeed."""
        result = self.run(*args, input=input)
        assert result.exception is None, result.exc_info
        assert result.exit_code == 0, (result.stdout, result.stderr)
        return result

    def json(self, *args: str, input: str | None = None) -> Any:
        """Run with ``--json``; it must succeed; the parsed stdout."""
        return json.loads(self.ok(*args, "--json", input=input).stdout)

    def error(self, *args: str, code: str, exit_code: int, input: str | None = None) -> Any:
        """Run with ``--json``; it must fail the documented way; the ``error`` object.

        The documented way: exit ``exit_code`` (no crash), ``{"error": {...}}`` alone on
        stdout, and one ``CODE: message`` line on stderr.
        """
        result = self.run(*args, "--json", input=input)
        assert isinstance(result.exception, SystemExit), result.exc_info
        assert result.exit_code == exit_code, (result.stdout, result.stderr)
        document = json.loads(result.stdout)
        assert set(document) == {"error"}
        error = document["error"]
        assert set(error) == {"code", "message", "field"}
        assert error["code"] == code, error
        assert result.stderr == f"{code}: {error['message']}\n"
        assert "Traceback" not in result.stderr
        return error

    def seed(
        self,
        writes: Sequence[tuple[str, Mapping[str, Any]]],
        *,
        clock: SteppingClock | None = None,
        step_ms: int = DAY_MS,
    ) -> list[StoredRef]:
        """Store records through the ContextStore API (faster than one command per write).

        With ``clock``, the writes happen at ``clock.now_ms``, ``step_ms`` apart.
        """
        refs = []
        with ContextStore.open(self.data_dir, clock_ms=clock or wall_clock_ms) as store:
            for address, fields in writes:
                refs.append(store.store(address, ContextRecord.from_fields(fields)))
                if clock is not None:
                    clock.now_ms += step_ms
        return refs


@pytest.fixture
def node_dir(tmp_path: Path) -> Path:
    """An initialised data directory with the default roles."""
    root = tmp_path / "node"
    ContextStore.init(root, DEFAULT_ROLES)
    return root


@pytest.fixture
def slurp(node_dir: Path) -> Slurp:
    """The CLI bound to ``node_dir``."""
    return Slurp(node_dir, CliRunner())
