"""Hint delivery with redirects kept for later: one pass over the hints, never a spin.

A hint whose target no longer owns its context is redirected to the current owners, and
kept while one of them is down (``HandoffService._redirect`` returns 0). Delivery used to
fetch the same kept hints again and again in a loop that never yielded (a livelock in the
simulation, where storage work runs inline; a busy core on a real node).
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, TypeVar

import pytest
import trio

from node.cluster import handoff as handoff_module
from node.cluster.handoff import HandoffService
from node.cluster.handoff_plan import HandoffConfig
from storage.envelope import Envelope
from storage.hints import HintStore
from storage.kv import MemoryKV

T = TypeVar("T")
CTX = "ucxl://agent:backend_developer@chorus:task/*^/doc.md"


def envelope(n: int) -> bytes:
    return Envelope(
        context="chorus\x00task\x00agent\x00backend_developer\x00doc.md",
        version_id=f"{n:012x}-000000-a", parent=None, kind="put", created_at_ms=n,
        created_by="agent/backend_developer@a", readers=("backend_developer",), tags=(),
        technologies=(), influences=(), influenced_by=(), expires_at_ms=None,
        compression="none", ciphertext=b"sealed",
    ).encode()  # fmt: skip


class FakeService:
    """What HandoffService uses of NodeService: placement says n1..n3 own every context,
    and n3 is down."""

    def __init__(self) -> None:
        self.name = "n1"
        self.handoff: Any = None
        self.status_sources: dict[str, Any] = {}
        self.cluster = SimpleNamespace(is_up=lambda node: node != "n3")
        self.store = SimpleNamespace(versions=SimpleNamespace(purge_marker=lambda ctx: None))
        self.fanout = SimpleNamespace(blocking=self.blocking)
        self.sent: list[str] = []

    async def blocking(self, fn: Callable[[], T]) -> T:
        return fn()  # inline, as in the simulation: no checkpoint of its own

    def _placement(self, ctx: object) -> SimpleNamespace:
        return SimpleNamespace(replicas=("n1", "n2", "n3"))

    async def store_on(self, node: str, batch: list[bytes]) -> dict[str, Any]:
        self.sent.append(node)
        return {"stored": [True] * len(batch)}


@pytest.mark.trio
async def test_kept_redirects_end_the_round_and_stay_for_later(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(handoff_module, "HINTS_PER_ROUND", 2)
    service = FakeService()
    hints = HintStore(MemoryKV(), max_bytes=1 << 30, clock_ms=lambda: 1)
    for n in range(5):  # n4 left the ring: each hint must go to n1..n3, and n3 is down
        hints.add("n4", CTX, [envelope(n + 1)])
    handoff = HandoffService(service, hints, HandoffConfig())  # type: ignore[arg-type]
    with trio.fail_after(5):
        delivered = await handoff._deliver_to("n4")
    assert delivered == 0
    assert len(hints.pending("n4")) == 5  # every hint kept until n3 is back
    assert service.sent == []


def test_pending_resumes_after_a_sequence_number() -> None:
    hints = HintStore(MemoryKV(), max_bytes=1 << 30, clock_ms=lambda: 1)
    added = [hints.add("n4", CTX, [bytes([n])]) for n in range(4)]
    seqs = [h.seq for h in added if h is not None]
    assert [h.seq for h in hints.pending("n4", after=seqs[1])] == seqs[2:]
    assert [h.seq for h in hints.pending("n4", limit=1, after=seqs[0])] == [seqs[1]]
    assert hints.pending("n4", after=seqs[-1]) == []
