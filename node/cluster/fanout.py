"""Calls from a coordinating node to replicas, with fault isolation (a trio shell).

Owns: running one call per replica until a quorum decides (``quorum``), asking every live
node (``everyone``), bounded best-effort background sends (``background``, e.g. read
repair), the time budget each inner call gets (``timeout``), and the fault counters.

Fault isolation: every task this module starts catches everything at its boundary. A
replica that is down, answers an error, answers something malformed (``MalformedAnswer``)
or trips a bug of ours counts as that replica failing; the bug is logged with its
traceback and counted (``internal_errors``). Nothing reaches the service nursery, so
nothing a request, a peer or a record does can stop the node.

Budgets: ``deadline`` (a context variable, set per request from the transport's deadline)
holds the client's absolute trio deadline; tasks started while handling a request inherit
it. ``timeout`` is ``coordinator.inner_timeout`` of it; background sends run without one.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import trio

from node.cluster.answers import MalformedAnswer
from node.cluster.coordinator import inner_timeout
from node.cluster.replication import Outcome, QuorumTracker
from node.cluster.thread_hop import ThreadHop
from node.errors import NodeError, PeerUnavailable
from storage.errors import StorageError, Unavailable

log = logging.getLogger(__name__)
T = TypeVar("T")
Body = dict[str, Any]
deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("deadline", default=None)


class Dialer(Protocol):
    """Calls to other nodes."""

    async def call(
        self, name: str, method: str, body: dict[str, Any], *, timeout_s: float
    ) -> dict[str, Any]:
        """Call ``method`` on node ``name`` (PeerUnavailable / RemoteError on failure)."""
        ...


class FaultSink(Protocol):
    """Where faults are reported (``node.daemon.metrics.NodeMetrics`` implements it)."""

    def internal_error(self, where: str) -> None:
        """A bug of ours, caught at ``where`` (a method name or task kind)."""

    def peer_answer_malformed(self, method: str) -> None:
        """A peer's answer to ``method`` did not parse."""

    def refused_busy(self) -> None:
        """A request was refused because the node is at its in-flight limit."""

    def repair_dropped(self, count: int = 1) -> None:
        """Background repair sends dropped at the fan-out bound."""


class NoFaultSink:
    """Discards fault reports (the default, and the simulation's)."""

    def internal_error(self, where: str) -> None:
        """Discard."""

    def peer_answer_malformed(self, method: str) -> None:
        """Discard."""

    def refused_busy(self) -> None:
        """Discard."""

    def repair_dropped(self, count: int = 1) -> None:
        """Discard."""


@dataclass
class FaultCounters:
    """Fault counts since start (also reported through ``node.status`` as ``faults``)."""

    internal_errors: dict[str, int] = field(default_factory=dict)
    malformed_answers: int = 0
    refused_busy: int = 0
    repairs_dropped: int = 0

    def to_wire(self) -> Body:
        """The ``faults`` map of ``node.status``."""
        return {
            "internal_errors": sum(self.internal_errors.values()),
            "malformed_answers": self.malformed_answers,
            "refused_busy": self.refused_busy,
            "repairs_dropped": self.repairs_dropped,
        }


class Fanout:
    """Replica calls of one node; ``nursery`` is set by ``NodeService.run``."""

    def __init__(
        self,
        name: str,
        dialer: Dialer,
        *,
        timeout_s: float,
        blocking_in_threads: bool,
        max_background: int,
    ) -> None:
        self.name = name
        self.dialer = dialer
        self.timeout_s = timeout_s
        self.blocking_in_threads = blocking_in_threads
        self.threads = ThreadHop()
        self.max_background = max_background
        self.faults = FaultCounters()
        self.sink: FaultSink = NoFaultSink()
        self.nursery: trio.Nursery | None = None
        self._background = 0

    # -- faults -------------------------------------------------------------------------

    def internal(self, where: str) -> None:
        """Log the exception being handled with its traceback, and count it."""
        log.exception("internal error in %s", where)
        self.faults.internal_errors[where] = self.faults.internal_errors.get(where, 0) + 1
        self.sink.internal_error(where)

    def failed(self, method: str, node: str, exc: BaseException) -> str:
        """Account for a replica call that failed (called inside ``except``); a short, safe
        description of why (for a quorum error)."""
        if isinstance(exc, MalformedAnswer):
            log.warning("%s answered a malformed %s: %s", node, method, exc.what)
            self.faults.malformed_answers += 1
            self.sink.peer_answer_malformed(method)
            return "malformed answer"
        if isinstance(exc, NodeError | StorageError):
            log.debug("%s on %s failed: %s", method, node, exc)
            return str(exc)[:200]
        self.internal(method)
        return f"internal error ({type(exc).__name__})"

    # -- calls --------------------------------------------------------------------------

    def timeout(self) -> float:
        """The time an inner call may take now (the client's budget, less a margin)."""
        end = deadline.get()
        remaining = None if end is None else end - trio.current_time()
        return inner_timeout(self.timeout_s, remaining)

    async def blocking(self, fn: Callable[[], T]) -> T:
        """Run local storage work (in a thread unless the simulation runs us)."""
        if self.blocking_in_threads:
            return await self.threads.run_sync(fn)
        return fn()

    async def on(self, node: str, method: str, body: Body, local: Callable[[], Body]) -> Body:
        """Run ``method`` on ``node``: locally for this node, else over RPC."""
        if node == self.name:
            return await self.blocking(local)
        budget = self.timeout()
        if budget <= 0:
            raise PeerUnavailable(f"{method}: the request's deadline leaves no time")
        return await self.dialer.call(node, method, body, timeout_s=budget)

    async def quorum(
        self,
        live: Sequence[str],
        tracker: QuorumTracker,
        one: Callable[[str], Awaitable[object]],
        *,
        op: str,
        settled: Callable[[], None] | None = None,
    ) -> None:
        """Run ``one`` on every live replica; return once the tracker has decided.

        The attempts run in the service nursery (they finish after the answer); each
        catches everything, so a failing replica or a bug fails that replica only.
        ``settled`` is called once, when every attempt has ended (at once when there is
        none; also when starting them failed): the write tracker's end of a write.
        """
        decided = trio.Event()
        left = len(live)

        def ended() -> None:
            nonlocal left
            left -= 1
            if left == 0 and settled is not None:
                settled()

        async def attempt(node: str) -> None:
            success = False
            reason = ""
            try:
                try:
                    await one(node)
                    success = True
                except Exception as exc:
                    reason = self.failed(op, node, exc)
                try:
                    if tracker.record(node, success, reason) is not Outcome.PENDING:
                        decided.set()
                except Exception:
                    self.internal(f"{op}.tracker")
                    decided.set()
            finally:
                ended()

        assert self.nursery is not None, "NodeService.run must be running"
        if not live and settled is not None:
            settled()
        started = 0
        try:
            for node in live:
                self.nursery.start_soon(attempt, node)
                started += 1
        finally:
            for _ in range(len(live) - started):  # the nursery closed: they never run
                ended()
        with trio.move_on_after(self.timeout()):
            await decided.wait()

    async def everyone(
        self, nodes: Sequence[str], method: str, call: Callable[[str], Awaitable[T]]
    ) -> list[T]:
        """``call`` on every node; the answers of those that answered well.

        Raises:
            Unavailable: no node answered.
        """
        answers: list[T] = []

        async def ask(node: str) -> None:
            try:
                answers.append(await call(node))
            except Exception as exc:
                self.failed(method, node, exc)

        async with trio.open_nursery() as nursery:
            for node in nodes:
                nursery.start_soon(ask, node)
        if not answers:
            raise Unavailable(f"{method}: no node answered")
        return answers

    def background(self, what: str, send: Callable[[], Awaitable[object]]) -> bool:
        """Start a best-effort send (read repair) unless ``max_background`` are running.

        Returns:
            Whether it started; a dropped send is counted (anti-entropy covers it).
        """
        if self.nursery is None or self._background >= self.max_background:
            self.faults.repairs_dropped += 1
            self.sink.repair_dropped()
            return False
        self._background += 1
        self.nursery.start_soon(self._run_background, what, send)
        return True

    async def _run_background(self, what: str, send: Callable[[], Awaitable[object]]) -> None:
        deadline.set(None)  # repair is not bound by the request that caused it
        try:
            await send()
        except Exception as exc:
            self.failed(what, "background", exc)
        finally:
            self._background -= 1
