"""``MemberKeys.reseal`` (``keys.reseal``): a call works its time budget, then answers.

A call writes synced batches until the member's clock says the budget is spent (checked
after each batch, so at least one is always written) or ``max_batches`` are written, and
the walk resumes from the member's cursor on the next call.
"""

from __future__ import annotations

from pathlib import Path

from pyrage import x25519

from crypto.roles import DEFAULT_ROLES
from node.control.fence import Fence
from node.control.rotation import MemberKeys
from storage.context_store import ContextStore
from storage.record import ContextRecord
from tests.storage.conftest import FakeClock

BE = "backend_developer"


class StepClock:
    """A monotonic clock that moves ``step_s`` each time it is read."""

    def __init__(self, step_s: float) -> None:
        self.now = 0.0
        self.step_s = step_s

    def __call__(self) -> float:
        self.now += self.step_s
        return self.now


def _member(tmp_path: Path, **kwargs: object) -> tuple[MemberKeys, ContextStore]:
    clock = FakeClock()
    ContextStore.init(tmp_path / "n", DEFAULT_ROLES)
    store = ContextStore.open(tmp_path / "n", clock_ms=clock)
    for i in range(40):
        address = f"ucxl://a{i}:{BE}@p:t/*^/f{i:02d}.md"
        store.store(address, ContextRecord.from_fields({"summary": f"s{i}"}))
        clock.advance(10)
    clock.advance(120_000)
    store.keyring.install_rotation(BE, x25519.Identity.generate(), 2)
    return MemberKeys(store, Fence(store.kv, lambda: 0), **kwargs), store  # type: ignore[arg-type]


def test_a_call_stops_after_the_batch_that_spends_its_budget(tmp_path: Path) -> None:
    # the clock is read once when the call starts, then once after each batch: 0.4 s a read,
    # so the budget of 1 s is spent after the third batch
    member, store = _member(
        tmp_path, batch_size=4, max_batches=40, budget_s=1.0, clock=StepClock(0.4)
    )
    try:
        answers = [member.reseal(1, BE, 2) for _ in range(4)]
        assert [a["scanned"] for a in answers] == [12, 24, 36, 40]
        assert [a["done"] for a in answers] == [False, False, False, True]
        assert sum(int(a["rewritten"]) for a in answers) == 40
    finally:
        store.close()


def test_without_a_budget_max_batches_bounds_a_call(tmp_path: Path) -> None:
    member, store = _member(tmp_path, batch_size=4, max_batches=3, budget_s=None)
    try:
        first = member.reseal(1, BE, 2)
        assert (first["scanned"], first["done"]) == (12, False)
    finally:
        store.close()
