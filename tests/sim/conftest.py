"""The simulation tier's report line: how many schedules ran, whatever ``-s`` says."""

from __future__ import annotations

from typing import Any

SCHEDULES_RUN: dict[str, Any] = {}


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print what the volume test recorded in ``SCHEDULES_RUN``."""
    if SCHEDULES_RUN:
        terminalreporter.write_sep("-", "simulation")
        for name, line in SCHEDULES_RUN.items():
            terminalreporter.write_line(f"{name}: {line}")
