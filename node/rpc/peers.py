"""Connections from this node to its peers, kept open and reused (a trio shell).

Owns: one long-lived connection per peer (TLS or in-memory, through a ``Connector``),
opened on first use, dropped when it fails (lost, refused, or ``MAX_TIMEOUTS_IN_A_ROW``
calls in a row unanswered in time: one slow answer is not a lost connection, and dropping
it would fail every other call in flight on it); calls with a timeout; and feeding call
outcomes to failure detection (``on_result``; a single timeout is left to the detector's
pings). Every connection is held by a task of the
pool's own nursery (``run``), so nothing is detached.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import trio

from node.errors import CallTimedOut, NodeError, PeerUnavailable, RemoteError
from node.rpc.transport import Caller

log = logging.getLogger(__name__)
Connector = Callable[[str], AbstractAsyncContextManager[Caller]]
# Calls in a row to one peer that got no answer in time before its connection is dropped
# and the peer is reported down; fewer are a slow peer, not a gone one.
MAX_TIMEOUTS_IN_A_ROW = 3


class PeerPool:
    """Reusable connections to peers by name."""

    def __init__(
        self,
        connect: Connector,
        *,
        on_result: Callable[[str, bool], None] | None = None,
    ) -> None:
        self._connect = connect
        self._on_result = on_result or (lambda _name, _ok: None)
        self._clients: dict[str, Caller] = {}
        self._closers: dict[str, trio.Event] = {}
        self._opening: dict[str, trio.Event] = {}
        self._timeouts: dict[str, int] = {}
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hold the connections until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    async def call(
        self, name: str, method: str, body: dict[str, Any], *, timeout_s: float
    ) -> dict[str, Any]:
        """Call ``method`` on peer ``name``.

        Raises:
            PeerUnavailable: no connection, or no answer within ``timeout_s``.
            RemoteError: the peer answered with an error (the peer is still up).
        """
        try:
            client = await self._client(name)
            answer = await client.call(method, body, timeout_s=timeout_s)
        except RemoteError:
            self._answered(name)
            raise
        except CallTimedOut as exc:
            # A slow answer is not a lost connection: other calls on it go on, and the
            # failure detector's pings decide whether the peer is down, unless it stays
            # silent for several calls in a row.
            self._timeouts[name] = self._timeouts.get(name, 0) + 1
            if self._timeouts[name] >= MAX_TIMEOUTS_IN_A_ROW:
                self._lost(name)
            raise CallTimedOut(f"{name}: {exc}") from None
        except (PeerUnavailable, trio.ClosedResourceError, trio.BrokenResourceError) as exc:
            self._lost(name)
            raise PeerUnavailable(f"{name}: {exc}") from None
        self._answered(name)
        return answer

    def _answered(self, name: str) -> None:
        self._timeouts.pop(name, None)
        self._on_result(name, True)

    def _lost(self, name: str) -> None:
        self._timeouts.pop(name, None)
        self._drop(name)
        self._on_result(name, False)

    async def _client(self, name: str) -> Caller:
        while True:
            found = self._clients.get(name)
            if found is not None:
                return found
            opening = self._opening.get(name)
            if opening is None:
                break
            await opening.wait()
        if self._nursery is None:
            raise PeerUnavailable("the peer pool is not running")
        opening = self._opening[name] = trio.Event()
        try:
            # the client comes back from ``started``: by the time this task runs again,
            # another call may already have dropped it from ``_clients`` (a lookup there
            # raised KeyError out of a node's task); a dropped client fails its calls with
            # ClosedResourceError, which ``call`` handles
            client: Caller = await self._nursery.start(self._hold, name)
        except PeerUnavailable:
            raise
        except (OSError, RemoteError) as exc:
            raise PeerUnavailable(f"{name}: {exc}") from None
        finally:
            del self._opening[name]
            opening.set()
        return client

    async def _hold(self, name: str, *, task_status: trio.TaskStatus[Caller]) -> None:
        closer = trio.Event()
        started = False
        try:
            async with self._connect(name) as client:
                self._clients[name] = client
                self._closers[name] = closer
                task_status.started(client)
                started = True
                await closer.wait()
        except (NodeError, OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            if not started:
                raise
            log.debug("connection to %s ended: %s", name, type(exc).__name__)
        finally:
            if self._closers.get(name) is closer:
                self._clients.pop(name, None)
                del self._closers[name]

    def _drop(self, name: str) -> None:
        closer = self._closers.pop(name, None)
        self._clients.pop(name, None)
        if closer is not None:
            closer.set()
