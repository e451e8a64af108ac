"""Group commit across concurrent puts: one ``rep.store`` frame per replica at a time.

Owns: the per-destination queues of the write path. A put hands the envelopes it sends to
one replica to ``StoreBatcher.store``; while a frame to that replica is in flight, later
puts queue; when it returns, everything queued (up to ``max_bytes``) goes as the next
frame. No timers: the batch is exactly what arrived during one round trip. A put that
finds nothing in flight sends its own frame from its own task at once (one client alone
sees no added hop); queued frames go from the service's nursery. Many clients share
frames (and the replica's one synced LevelDB batch per frame,
``VersionStore.append_built``). Each put gets back *its own*
outcome: its per-envelope flags, the head counts as of its own newest version, and what
the replica said about its contexts (newest version id, purge marker ``upto``).

Must not know: quorums, hints, what W is (``node.cluster.service`` counts each put's
acknowledgements from its own flags, so W stays exact per put), how a frame travels
(``send`` does it: over RPC, or locally for this node).

Invariants:
    - Order: a replica receives the envelopes of one destination in submission order
      (FIFO across frames, and within a frame).
    - Isolation: a put's outcome is computed from its own slice of the answer; an envelope
      refused in a frame fails only the put it belongs to. A frame that fails as a whole
      (the replica is down, answered malformed) fails every put in it for that replica.
    - Cancellation: a put that stops waiting (cancelled, or out of time) is taken out of
      the queue if its frame was not sent yet; the others are not affected. A frame that
      holds other puts is sent from the service's nursery, never from a waiting put's
      task; a put sends from its own task only a frame that holds nothing but its own
      versions, and whatever queued meanwhile is handed to the nursery when it ends.
    - Deadline: a frame is sent under the latest deadline of the puts in it; each put
      still waits no longer than its own.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from node.cluster import answers
from node.cluster.fanout import deadline
from node.errors import PeerUnavailable

Body = dict[str, Any]
# (destination node, envelope blobs) -> the raw rep.store answer (deadline: the context var)
Send = Callable[[str, list[bytes]], Awaitable[Body]]
MAX_FRAME_ITEMS = 10_000  # envelopes in one frame (the replica accepts up to 100,000)


@dataclass(frozen=True)
class Item:
    """One envelope a put sends: its context, version id and encoded bytes."""

    context: str
    version_id: str
    blob: bytes


@dataclass(frozen=True)
class StoreOutcome:
    """One put's share of a ``rep.store`` answer.

    Attributes:
        stored: per item of the put: True stored, False already held, None refused.
        heads: context -> the version count the replica held right after this put's
            newest version of it (later versions of other puts in the frame not counted).
        latest: context -> the newest version id the replica holds (an HLC receive event).
        purged: context -> the ``upto`` of the replica's purge marker, for contexts where
            the replica refused a version as purged.
    """

    stored: tuple[bool | None, ...]
    heads: dict[str, int]
    latest: dict[str, str]
    purged: dict[str, str]


@dataclass(eq=False)
class _Waiter:
    items: Sequence[Item]
    deadline: float  # absolute trio time (inf: none)
    done: trio.Event = field(default_factory=trio.Event)
    outcome: StoreOutcome | BaseException | None = None

    @property
    def size(self) -> int:
        return sum(len(item.blob) for item in self.items)


@dataclass
class BatcherStats:
    """Frames sent and puts carried since start (puts / frames is the batching factor)."""

    frames: int = 0
    puts: int = 0
    largest_frame: int = 0


class StoreBatcher:
    """Per-destination ``rep.store`` queues; see the module docstring."""

    def __init__(
        self,
        send: Send,
        nursery: Callable[[], trio.Nursery | None],
        *,
        max_bytes: int,
        max_items: int = MAX_FRAME_ITEMS,
    ) -> None:
        self._send = send
        self._nursery = nursery
        self._max_bytes = max_bytes
        self._max_items = max_items
        self._queues: dict[str, deque[_Waiter]] = {}
        self._busy: set[str] = set()  # destinations with a frame in flight
        self.stats = BatcherStats()

    async def store(self, node: str, items: Sequence[Item], timeout_s: float) -> StoreOutcome:
        """Store ``items`` on ``node``, sharing a frame with concurrent puts.

        Raises:
            PeerUnavailable: no time left, or no answer within ``timeout_s``.
            Whatever sending the frame raised (the replica is down, answered an error or
            something malformed): every put in that frame gets it.
        """
        if timeout_s <= 0:
            raise PeerUnavailable(f"rep.store on {node}: the request's deadline leaves no time")
        if node not in self._busy:  # nothing in flight: send at once, from this task
            self._busy.add(node)
            try:
                with trio.move_on_after(timeout_s):
                    return await self._send_alone(node, items)
            finally:
                self._hand_off(node)
            raise PeerUnavailable(f"rep.store: no answer from {node} in {timeout_s:.3g} s")
        waiter = _Waiter(items, trio.current_time() + timeout_s)
        queue = self._queues.setdefault(node, deque())
        queue.append(waiter)
        try:
            with trio.move_on_after(timeout_s):
                await waiter.done.wait()
        finally:
            if not waiter.done.is_set() and waiter in queue:
                queue.remove(waiter)  # not sent yet: it leaves the queue, nothing else moves
        outcome = waiter.outcome
        if outcome is None:
            raise PeerUnavailable(f"rep.store: no answer from {node} in {timeout_s:.3g} s")
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def _send_alone(self, node: str, items: Sequence[Item]) -> StoreOutcome:
        """A frame of one put, sent from its own task (under its own deadline)."""
        self._count([items])
        blobs = [item.blob for item in items]
        answer = answers.parse_store(await self._send(node, blobs), len(blobs))
        return split_answer([items], answer)[0]

    def _hand_off(self, node: str) -> None:
        """After a frame: what queued meanwhile goes next, from the service's nursery."""
        if not self._queues.get(node):
            self._busy.discard(node)
            return
        nursery = self._nursery()
        assert nursery is not None, "NodeService.run must be running"
        nursery.start_soon(self._flush, node)

    async def _flush(self, node: str) -> None:
        """Send what is queued for ``node``, frame after frame, until the queue is empty."""
        queue = self._queues[node]
        try:
            while queue:
                frame = self._next_frame(queue)
                await self._send_frame(node, frame)
        finally:
            self._busy.discard(node)
            for waiter in queue:  # only on cancellation (the service is stopping)
                if not waiter.done.is_set():
                    waiter.outcome = PeerUnavailable(f"rep.store on {node}: node stopping")
                    waiter.done.set()
            if not queue:
                self._queues.pop(node, None)

    def _count(self, frame: Sequence[Sequence[Item]]) -> None:
        self.stats.frames += 1
        self.stats.puts += len(frame)
        self.stats.largest_frame = max(self.stats.largest_frame, len(frame))

    def _next_frame(self, queue: deque[_Waiter]) -> list[_Waiter]:
        """The oldest waiters that fit the budget (at least one)."""
        frame = [queue.popleft()]
        used, count = frame[0].size, len(frame[0].items)
        while queue:
            size, more = queue[0].size, len(queue[0].items)
            if used + size > self._max_bytes or count + more > self._max_items:
                break
            frame.append(queue.popleft())
            used, count = used + size, count + more
        return frame

    async def _send_frame(self, node: str, frame: list[_Waiter]) -> None:
        blobs = [item.blob for waiter in frame for item in waiter.items]
        latest_end = max(waiter.deadline for waiter in frame)
        deadline.set(None if math.isinf(latest_end) else latest_end)
        self._count([waiter.items for waiter in frame])
        outcomes: Sequence[StoreOutcome | BaseException]
        try:
            answer = answers.parse_store(await self._send(node, blobs), len(blobs))
            outcomes = split_answer([waiter.items for waiter in frame], answer)
        except Exception as exc:  # every put of the frame fails on this replica
            outcomes = [exc] * len(frame)
        for waiter, outcome in zip(frame, outcomes, strict=True):
            waiter.outcome = outcome
            waiter.done.set()


def split_answer(puts: Sequence[Sequence[Item]], answer: answers.StoreAnswer) -> list[StoreOutcome]:
    """Each put's share of one frame's answer (pure).

    A put's head count of a context is the frame's count less the versions of that context
    that other puts in the frame stored with a greater id than this put's newest one.
    """
    if len(puts) == 1:  # a frame of one put (every put sent alone): all of it is its own
        return [whole_answer(puts[0], answer)]
    return _split(puts, answer)


def whole_answer(items: Sequence[Item], answer: answers.StoreAnswer) -> StoreOutcome:
    """``split_answer`` of a frame that holds one put only (pure): no other put's
    versions to take off its head counts, so the answer is filtered, not recounted."""
    contexts = {item.context for item in items}
    stored = tuple(answer.stored)
    refused = {item.context for item, flag in zip(items, stored, strict=True) if flag is None}
    return StoreOutcome(
        stored=stored,
        heads={ctx: max(count, 0) for ctx, count in answer.heads.items() if ctx in contexts},
        latest={ctx: vid for ctx, vid in answer.latest.items() if ctx in contexts},
        purged={ctx: upto for ctx, upto in answer.purged.items() if ctx in refused},
    )


def _split(puts: Sequence[Sequence[Item]], answer: answers.StoreAnswer) -> list[StoreOutcome]:
    """``split_answer`` of any frame, one put or many."""
    flags = list(answer.stored)
    starts = [0]
    for items in puts:
        starts.append(starts[-1] + len(items))
    stored_by_ctx: dict[str, list[tuple[str, int]]] = {}  # context -> (id, put) stored
    for number, items in enumerate(puts):
        for item, flag in zip(items, flags[starts[number] : starts[number + 1]], strict=True):
            if flag is True:
                stored_by_ctx.setdefault(item.context, []).append((item.version_id, number))
    out = []
    for number, items in enumerate(puts):
        own = flags[starts[number] : starts[number + 1]]
        newest: dict[str, str] = {}
        for item in items:
            newest[item.context] = max(newest.get(item.context, ""), item.version_id)
        heads = {}
        for ctx, top in newest.items():
            if ctx in answer.heads:
                stored = stored_by_ctx.get(ctx, ())
                later = sum(1 for vid, owner in stored if owner != number and vid > top)
                heads[ctx] = max(answer.heads[ctx] - later, 0)
        refused = {item.context for item, flag in zip(items, own, strict=True) if flag is None}
        out.append(
            StoreOutcome(
                stored=tuple(own),
                heads=heads,
                latest={ctx: vid for ctx, vid in answer.latest.items() if ctx in newest},
                purged={ctx: upto for ctx, upto in answer.purged.items() if ctx in refused},
            )
        )
    return out
