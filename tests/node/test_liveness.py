"""node.cluster.liveness: the failure detector's verdicts.

Invariants checked: a lost or refused connection marks a peer down at the first ping; a
ping that only timed out marks it down after ``suspect_after`` in a row, and an answer in
between resets the count; an answer marks a down peer up again.
"""

from __future__ import annotations

import pytest
import trio

from node.cluster.liveness import FailureDetector, StaticCluster
from node.errors import CallTimedOut, PeerUnavailable


class ScriptedPinger:
    """Answers each ping with the next outcome of its peer's script (None: an answer)."""

    def __init__(self, script: dict[str, list[Exception | None]]) -> None:
        self.script = script

    async def call(
        self, name: str, method: str, body: dict[str, object], *, timeout_s: float
    ) -> dict[str, object]:
        assert method == "rep.ping"
        outcome = self.script[name].pop(0)
        if outcome is not None:
            raise outcome
        return {}


def _verdicts(script: list[Exception | None], suspect_after: int = 2) -> list[bool]:
    cluster = StaticCluster("a", ["a", "b"])
    steps = len(script)
    detector = FailureDetector(
        cluster, ScriptedPinger({"b": script}), interval_s=1.0, timeout_s=1.0,
        suspect_after=suspect_after,
    )  # fmt: skip
    seen = []

    async def main() -> None:
        for _ in range(steps):
            await detector._probe("b")
            seen.append(cluster.is_up("b"))

    trio.run(main)
    return seen


def test_a_lost_connection_marks_down_at_once() -> None:
    assert _verdicts([PeerUnavailable("connection lost"), None]) == [False, True]


def test_timeouts_mark_down_only_in_a_row() -> None:
    slow = CallTimedOut("no answer in 1 s")
    assert _verdicts([slow, None, slow, slow, None]) == [True, True, True, False, True]
    assert _verdicts([slow, slow, slow], suspect_after=3) == [True, True, False]
    assert _verdicts([slow], suspect_after=1) == [False]


def test_suspect_after_must_be_positive() -> None:
    with pytest.raises(ValueError, match="suspect_after"):
        FailureDetector(
            StaticCluster("a", ["a"]), ScriptedPinger({}), interval_s=1.0, timeout_s=1.0,
            suspect_after=0,
        )  # fmt: skip
