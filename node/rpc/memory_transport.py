"""The RPC transport in memory: the same server and client interface, over a simulated network.

Owns: ``MemoryNetwork`` (named endpoints, seeded faults, partitions), ``MemoryServer`` (the
``RpcServer`` interface: ``run(task_status=...)``, ``statistics()``) and ``MemoryClient``
(the ``Caller`` interface). Used by the simulation tier (ARCHITECTURE.md §9) with trio's
``MockClock``: every wait is a trio sleep or timeout, so an autojumping clock runs it fast.

Semantics, chosen to match the TLS transport where it matters to callers:

- Every request and answer is encoded and decoded with ``node.rpc.wire``: bodies must be
  msgpack-encodable and the receiver gets its own copy, as over a socket.
- Requests run through the same ``transport.answer`` (deadline, UCXL error mapping).
- Connectionless: ``open_client`` fails with ``PeerUnavailable`` only when no server of
  that name is running; a partition does not break a client, it drops its messages.
  A call to a name that is not serving (and not cut off) fails at once ("refused"); a
  server that stops fails the calls it holds ("connection lost"); a dropped message
  makes the call time out.
- Faults are drawn per message from a random stream per directed link (client → server),
  seeded from the network's ``rng``; each call draws the same six numbers whatever the
  configuration. So the outcome of the calls on one link depends only on the seed and
  their order on that link, not on how trio schedules other links.
- A partition cuts both directions between two sets of names until ``heal()``; ``block``
  cuts one direction only (a -> b dropped, b -> a delivered: an asymmetric partition, so
  a request may arrive while its answer is lost). Both are checked when each leg of a call
  is sent (request at the call, answer when ready).

Must not know: sockets, TLS, what methods mean.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math
import random
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

import trio

from node.errors import CallTimedOut, PeerUnavailable
from node.rpc.transport import Handler, Peer, ServerStatistics, answer
from node.rpc.wire import MAX_FRAME_BYTES, Error, Request, Response, decode_frame, encode


@dataclass
class NetworkStatistics:
    """Counters of one network: messages sent, dropped, duplicated; calls refused."""

    sent: int = 0
    dropped: int = 0
    duplicated: int = 0
    refused: int = 0


@dataclass(frozen=True)
class _Fate:
    """What the network does to one call, drawn when the call is sent."""

    drop_request: bool
    duplicate: bool
    request_delays_s: tuple[float, float]
    drop_answer: bool
    answer_delay_s: float


@dataclass(eq=False)
class _Call:
    done: trio.Event = dataclasses.field(default_factory=trio.Event)
    outcome: dict[str, Any] | Exception | None = None

    def finish(self, outcome: dict[str, Any] | Exception) -> None:
        if not self.done.is_set():
            self.outcome = outcome
            self.done.set()


def _memory_peer(name: str, kind: Literal["node", "client"], roles: tuple[str, ...]) -> Peer:
    fingerprint = hashlib.sha256(f"memory:{name}".encode()).hexdigest()
    return Peer(name=name, kind=kind, roles=roles, fingerprint=fingerprint)


class MemoryNetwork:
    """A simulated network between named endpoints; see the module docstring."""

    def __init__(
        self,
        rng: random.Random,
        *,
        drop: float = 0.0,
        duplicate: float = 0.0,
        min_delay_s: float = 0.0,
        max_delay_s: float = 0.0,
    ) -> None:
        """Args: rng seeds every fault; drop/duplicate are per-message probabilities;
        each message is delayed uniformly in [min_delay_s, max_delay_s].

        Raises:
            ValueError: A probability outside [0, 1] or delays not 0 <= min <= max.
        """
        if not (0.0 <= drop <= 1.0 and 0.0 <= duplicate <= 1.0):
            raise ValueError("drop and duplicate are probabilities in [0, 1]")
        if not 0.0 <= min_delay_s <= max_delay_s:
            raise ValueError("delays must satisfy 0 <= min_delay_s <= max_delay_s")
        self.drop = drop
        self.duplicate = duplicate
        self.min_delay_s = min_delay_s
        self.max_delay_s = max_delay_s
        self._seed = rng.getrandbits(64)
        self._links: dict[tuple[str, str], random.Random] = {}
        self._servers: dict[str, MemoryServer] = {}
        self._identities: dict[str, Peer] = {}
        self._partitions: list[tuple[frozenset[str], frozenset[str]]] = []
        self._blocked: set[tuple[str, str]] = set()
        self._stats = NetworkStatistics()

    def statistics(self) -> NetworkStatistics:
        """A snapshot of the counters."""
        return dataclasses.replace(self._stats)

    def set_identity(
        self, name: str, *, kind: Literal["node", "client"] = "client", roles: Sequence[str] = ()
    ) -> None:
        """What servers see as ``name``'s certificate (default: a node without roles)."""
        self._identities[name] = _memory_peer(name, kind, tuple(roles))

    def peer(self, name: str) -> Peer:
        """The ``Peer`` that ``name`` appears as."""
        return self._identities.get(name) or _memory_peer(name, "node", ())

    def partition(self, a_names: Iterable[str], b_names: Iterable[str]) -> None:
        """Cut every link between a name in ``a_names`` and one in ``b_names``, both ways."""
        self._partitions.append((frozenset(a_names), frozenset(b_names)))

    def block(self, from_name: str, to_name: str) -> None:
        """Drop every message from ``from_name`` to ``to_name`` (one direction only)."""
        self._blocked.add((from_name, to_name))

    def heal(self) -> None:
        """Remove every partition and one-way block."""
        self._partitions.clear()
        self._blocked.clear()

    def reachable(self, a: str, b: str) -> bool:
        """Whether a message from ``a`` to ``b`` can pass the partitions and blocks now."""
        if (a, b) in self._blocked:
            return False
        return not any(
            (a in left and b in right) or (a in right and b in left)
            for left, right in self._partitions
        )

    def server(self, name: str, handler: Handler) -> MemoryServer:
        """A server for ``name``; it is reachable while its ``run`` runs."""
        return MemoryServer(self, name, handler)

    @asynccontextmanager
    async def open_client(self, from_name: str, to_name: str) -> AsyncIterator[MemoryClient]:
        """A client from ``from_name`` to the server ``to_name``.

        Raises:
            PeerUnavailable: No server named ``to_name`` is running.
        """
        await trio.lowlevel.checkpoint()
        if to_name not in self._servers:
            self._stats.refused += 1
            raise PeerUnavailable(f"{to_name} is not serving")
        client = MemoryClient(self, from_name, to_name)
        try:
            yield client
        finally:
            await client.aclose()

    def _fate(self, from_name: str, to_name: str) -> _Fate:
        link = (from_name, to_name)
        if link not in self._links:
            self._links[link] = random.Random(f"{self._seed}:{from_name}->{to_name}")
        rng = self._links[link]
        low, high = self.min_delay_s, self.max_delay_s
        return _Fate(
            drop_request=rng.random() < self.drop,
            duplicate=rng.random() < self.duplicate,
            request_delays_s=(rng.uniform(low, high), rng.uniform(low, high)),
            drop_answer=rng.random() < self.drop,
            answer_delay_s=rng.uniform(low, high),
        )

    def _send(self, from_name: str, to_name: str, frame: bytes, call: _Call) -> None:
        """Put one request on the wire: dropped, refused, or delivered (maybe twice)."""
        fate = self._fate(from_name, to_name)
        self._stats.sent += 1
        if fate.drop_request or not self.reachable(from_name, to_name):
            self._stats.dropped += 1
            return
        server = self._servers.get(to_name)
        if server is None:
            self._stats.refused += 1
            call.finish(PeerUnavailable(f"{to_name} is not serving"))
            return
        server._accept(frame, from_name, call, fate, fate.request_delays_s[0])
        if fate.duplicate:
            self._stats.duplicated += 1
            server._accept(frame, from_name, call, fate, fate.request_delays_s[1])

    def _deliver_answer(self, from_name: str, to_name: str, fate: _Fate) -> bool:
        self._stats.sent += 1
        if fate.drop_answer or not self.reachable(from_name, to_name):
            self._stats.dropped += 1
            return False
        return True


class MemoryServer:
    """``RpcServer``'s interface on a ``MemoryNetwork``."""

    def __init__(self, network: MemoryNetwork, name: str, handler: Handler) -> None:
        """Use ``MemoryNetwork.server``."""
        self.name = name
        self._network = network
        self._handler = handler
        self._nursery: trio.Nursery | None = None
        self._holding: set[_Call] = set()
        self._stats = ServerStatistics()

    def statistics(self) -> ServerStatistics:
        """A snapshot of the counters (the TLS and frame counters stay 0)."""
        return dataclasses.replace(self._stats)

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Join the network under ``name``, report the name, serve until cancelled.

        Raises:
            RuntimeError: A server of that name is already running.
        """
        if self.name in self._network._servers:
            raise RuntimeError(f"{self.name} is already serving")
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._network._servers[self.name] = self
                task_status.started(self.name)
                try:
                    await trio.sleep_forever()
                finally:  # no new calls while the held ones wind down
                    self._leave()
        finally:
            self._nursery = None
            self._leave()
            for call in self._holding:
                call.finish(PeerUnavailable(f"connection to {self.name} lost"))
            self._holding.clear()

    def _leave(self) -> None:
        if self._network._servers.get(self.name) is self:
            del self._network._servers[self.name]

    def _accept(self, frame: bytes, from_name: str, call: _Call, fate: _Fate, delay: float) -> None:
        assert self._nursery is not None
        self._stats.connections_accepted += 1
        self._holding.add(call)
        self._nursery.start_soon(self._serve, frame, from_name, call, fate, delay)

    async def _serve(
        self, frame: bytes, from_name: str, call: _Call, fate: _Fate, delay: float
    ) -> None:
        await trio.sleep(delay)
        request = decode_frame(frame)
        assert isinstance(request, Request)
        peer = self._network.peer(from_name)
        reply = await answer(self._handler, peer, request, self._stats)
        if self._network._deliver_answer(self.name, from_name, fate):
            await trio.sleep(fate.answer_delay_s)
            message = decode_frame(reply)
            if isinstance(message, Error):
                call.finish(message.to_exception())
            elif isinstance(message, Response):
                call.finish(message.body)
        self._holding.discard(call)


class MemoryClient:
    """``RpcClient``'s interface on a ``MemoryNetwork`` (connectionless)."""

    def __init__(self, network: MemoryNetwork, from_name: str, to_name: str) -> None:
        """Use ``MemoryNetwork.open_client``."""
        self.peer = network.peer(to_name)
        self._network = network
        self._from = from_name
        self._to = to_name
        self._ids = itertools.count(1)
        self._calls: set[_Call] = set()
        self._closed = False

    async def call(
        self,
        method: str,
        body: dict[str, Any],
        *,
        timeout_s: float,
        deadline_s: float | None = None,
    ) -> dict[str, Any]:
        """Same contract as ``RpcClient.call``.

        Raises:
            RemoteError: The server answered with an error.
            PeerUnavailable: No answer in time (dropped, partitioned, slow), refused, or the
                server stopped.
            FrameTooLarge: The request exceeds the frame limit.
            trio.ClosedResourceError: This client was closed.
        """
        if self._closed:
            raise trio.ClosedResourceError("this client is closed")
        budget_s = timeout_s if deadline_s is None else min(deadline_s, timeout_s)
        deadline_ms = max(0, math.ceil(budget_s * 1000))
        request = Request(next(self._ids), method, deadline_ms, body)
        frame = encode(request, max_frame_bytes=MAX_FRAME_BYTES)
        call = _Call()
        self._calls.add(call)
        try:
            self._network._send(self._from, self._to, frame, call)
            with trio.move_on_after(timeout_s):
                await call.done.wait()
        finally:
            self._calls.discard(call)
        if call.outcome is None:
            raise CallTimedOut(f"{method}: no answer from {self._to} in {timeout_s} s")
        if isinstance(call.outcome, Exception):
            raise call.outcome
        return call.outcome

    async def aclose(self) -> None:
        """Close; waiting calls raise ``trio.ClosedResourceError``."""
        self._closed = True
        for call in self._calls:
            call.finish(trio.ClosedResourceError("this client was closed"))
        await trio.lowlevel.checkpoint()
