"""Fencing of leader-only operations by Raft term (Kleppmann's fencing token; Raft §5.1).

Owns: the rule a replica applies to an operation that only the leader may issue (purge
today; key rotation and backups later), and the durable "highest leader term seen" it is
checked against (LevelDB meta ``m/fence``, ``storage.schema.META_FENCE``).

The rule (``check_term``): an operation stamped with term ``T`` is refused when
``T < max(F, C)``, where ``F`` is the persisted fence and ``C`` this node's current Raft
term; an accepted ``T > F`` raises the fence, synced to disk before the operation runs. So
a deposed leader, however long it was paused, cannot have a stale command accepted by a
replica that has seen a newer leader (directly, or through a newer term of its own), even
after that replica restarts.

Must not know: which operation is fenced, Raft's internals (only the current term, read
through a callable), the network.

Invariants:
- The persisted fence never decreases.
- ``Fence.admit`` raises it (synced) before returning, so an operation accepted under term
  ``T`` is never followed by one accepted under a lower term, across restarts.
- Check-and-raise is atomic (one lock), so two threads cannot both pass a check that only
  one of them should.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from storage.errors import CorruptRecord, Forbidden
from storage.kv import KV
from storage.schema import META_FENCE

__all__ = ["Fence", "StaleTerm", "check_term"]


class StaleTerm(Forbidden):
    """A leader-only operation carries a term lower than one this node has seen."""

    def __init__(self, term: int, floor: int) -> None:
        super().__init__(
            f"stale leader term {term} < {floor}: a newer leader exists; this operation "
            "was issued by a deposed leader",
            field="term",
        )
        self.term = term
        self.floor = floor


def check_term(term: int, fence: int, current_term: int) -> int:
    """The fence after admitting an operation stamped ``term`` (pure).

    Args:
        term: the operation's leader term.
        fence: the highest leader term accepted so far (0: none).
        current_term: this node's current Raft term.

    Returns:
        The new fence: ``max(fence, term)``.

    Raises:
        StaleTerm: ``term < max(fence, current_term)``.
    """
    floor = max(fence, current_term)
    if term < floor:
        raise StaleTerm(term, floor)
    return max(fence, term)


class Fence:
    """This node's persisted fence over its KV store."""

    def __init__(self, kv: KV, current_term: Callable[[], int]) -> None:
        """``current_term``: this node's Raft term, read at each check."""
        self._kv = kv
        self._current_term = current_term
        self._lock = threading.Lock()

    def value(self) -> int:
        """The highest leader term accepted so far (0 if none).

        Raises:
            CorruptRecord: the stored fence is not a whole number.
        """
        data = self._kv.get(META_FENCE)
        if data is None:
            return 0
        try:
            value = int(data.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            raise CorruptRecord("the stored leader fence (m/fence) is damaged") from None
        if value < 0:
            raise CorruptRecord("the stored leader fence (m/fence) is negative")
        return value

    def admit(self, term: int) -> None:
        """Admit an operation stamped ``term``, raising the fence (synced) if it is higher.

        Raises:
            StaleTerm: the term is lower than the fence or this node's current term.
        """
        with self._lock:
            fence = self.value()
            raised = check_term(term, fence, self._current_term())
            if raised > fence:
                self._kv.write([(META_FENCE, str(raised).encode("ascii"))], sync=True)
