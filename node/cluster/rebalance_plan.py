"""Range streaming and cleanup decisions of a membership change (a pure core).

Owns: whether a node walks its contexts for a ring epoch and how (``walk_kind``), the
barrier a walk and a cleanup wait for (``barrier_met``), to whom each context is offered
(``targets``), what an offer sends (``offer``), when a node may drop what it no longer
owns (``cleanup_ready``, ``drops``), and the progress figures (``pending_ranges``).

Must not know: RPC, storage, the metadata log (the shell passes the marks it read from
the applied metadata as plain maps: name -> epoch), trio or a clock.

The protocol (research/self-healing.md: Cassandra's pending ranges, Garage's layout
versions and sync trackers):

1. A node applies ring epoch E and routes by it, waits until the writes it coordinates
   that were routed by an older layout ended (``node.cluster.inflight_writes``, bounded),
   then marks ``epoch_seen(E)``.
2. Once every live member of old ∪ new has seen E (no coordinator still writes by an
   older layout, and no such write is still in flight), a node that has not marked
   ``stream_done(E)`` walks what it holds:
   - "stream" (in transition): offer each context to its new-list owners that are not
     in its old list;
   - "restore" (not in transition, and this node does not know that it already walked
     the same ring: a forget, or a restart): offer each context to every other owner;
   - "report": nothing moved since this node's last walk (the transition's end).
   An offer asks the owner which versions it holds (``rep.ids``) and sends the rest
   (``rep.store``, durable) and a newer purge marker; ``rep.store`` is idempotent, so a
   walk restarted from the beginning is correct.
3. When its walk is complete the node marks ``stream_done(E)``; the leader ends the
   transition (joining -> normal, leaving -> removed) once every live member did.
4. After a transition ended (epoch F, not in transition), once every member of the ring
   has seen F and this node streamed F, it offers each context it no longer owns to all
   its owners and drops it only when every owner confirmed holding it.

Invariants: a context is dropped only when this node is not in its preference list of a
settled layout and every owner in that list durably holds each of its versions; nothing
here ever lowers a mark.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

from node.cluster.antientropy import ContextState, plan_exchange
from node.cluster.layout import Layout

STREAM = "stream"
RESTORE = "restore"
REPORT = "report"


def walk_kind(layout: Layout, streamed: int, walked: tuple[str, ...] | None) -> str | None:
    """How this node walks for ``layout.epoch``; None once it marked ``stream_done``.

    Args:
        layout: the layout the node routes by.
        streamed: this node's ``stream_done`` mark (0: none).
        walked: the ``new`` ring of this node's last complete walk (None: unknown).
    """
    if streamed >= layout.epoch:
        return None
    if layout.in_transition:
        return STREAM
    return REPORT if walked == layout.new else RESTORE


def barrier_met(names: Iterable[str], seen: Mapping[str, int], epoch: int) -> bool:
    """Whether every one of ``names`` has applied ``epoch`` (``epoch_seen``)."""
    return all(seen.get(name, 0) >= epoch for name in names)


def targets(kind: str, old: Sequence[str], new: Sequence[str], me: str) -> tuple[str, ...]:
    """The owners a context is offered to on a walk of ``kind``.

    Args:
        kind: STREAM or RESTORE.
        old: the context's old preference list.
        new: its new preference list.
        me: this node.
    """
    if kind == STREAM:
        return tuple(x for x in new if x not in old and x != me)
    return tuple(x for x in new if x != me)


@dataclass(frozen=True)
class Offer:
    """What an owner lacks of one context: version ids to send, and whether our marker."""

    push: tuple[str, ...]
    send_marker: bool

    @property
    def empty(self) -> bool:
        """Whether the owner already holds everything."""
        return not self.push and not self.send_marker


def offer(mine: ContextState, theirs: ContextState) -> Offer:
    """The part of the union merge (``antientropy.plan_exchange``) that flows to them."""
    plan = plan_exchange(mine, theirs)
    return Offer(plan.push, plan.send_marker)


def cleanup_ready(layout: Layout, seen: Mapping[str, int], streamed: int) -> bool:
    """Whether this node may drop what it does not own: the layout is settled, every ring
    member applied it, and this node's own walk for it is done."""
    if layout.in_transition or streamed < layout.epoch:
        return False
    return barrier_met(layout.new, seen, layout.epoch)


def drops(preference: Sequence[str], me: str) -> bool:
    """Whether a context with this preference list is not this node's to keep."""
    return me not in preference


def pending_ranges(arcs: Sequence[tuple[int, int]], cursor: int | None) -> int:
    """Moving arcs not yet walked past: all of them before the walk (``cursor`` None),
    those ending after the last walked key position during it."""
    if cursor is None:
        return len(arcs)
    return sum(1 for _, end in arcs if end > cursor)


def live_names(names: Iterable[str], up: Collection[str]) -> list[str]:
    """The names among ``names`` that are up."""
    return [name for name in names if name in up]
