"""Deadlines and send bounds over an in-memory stream with trio's mock clock: the server's
request workers (a worker's cancel scope outlives a request that exceeded its deadline; an
answer that returned in time is sent even when the deadline passed after the handler's
last yield; an answer the peer never reads closes the connection after
``send_timeout_s``), and the client's calls (a stuck send fails its call, a call queued
behind it times out on its own); context variables stay with their request."""

from __future__ import annotations

import contextvars
from typing import Any

import trio
import trio.testing

from node.errors import PeerUnavailable
from node.rpc.framed import FramedStream
from node.rpc.transport import Peer, RpcClient, RpcServer
from node.rpc.wire import (
    MAX_FRAME_BYTES,
    Error,
    Handshake,
    Hello,
    Message,
    Request,
    Response,
    Welcome,
    encode,
)
from tests.node.conftest import Pki

PEER = Peer(name="node-b", kind="node", roles=(), fingerprint="00")
MARK: contextvars.ContextVar[str] = contextvars.ContextVar("mark", default="unset")


def _framed(stream: trio.abc.Stream) -> FramedStream:
    return FramedStream(stream, max_frame_bytes=MAX_FRAME_BYTES, send_timeout_s=5.0)


def _established() -> Handshake:
    handshake = Handshake.server(node="node-a", peer_name="node-b", peer_kind="node")
    handshake.receive(Hello(protocol=1, node="node-b"))
    return handshake


async def _call(client: FramedStream, request_id: int, method: str, deadline_ms: int) -> Message:
    await client.send(encode(Request(request_id, method, deadline_ms, {})))
    answer = await client.receive()
    assert answer is not None
    return answer


async def test_a_worker_answers_after_a_request_that_outlived_its_deadline(
    pki: Pki, autojump_clock: trio.testing.MockClock
) -> None:
    """slow (deadline exceeded), then fast and late on the same connection, then fast after
    a minute idle: every request is answered, the late one (deadline passed after its
    handler's last yield) with its response, and the counters say so."""

    helpers: list[trio.Nursery] = []

    async def open_late(gate: trio.Event) -> None:
        autojump_clock.jump(1.0)  # the deadline expires with the handler already woken:
        gate.set()  # its scope is cancelled, and it returns without another yield

    async def handler(peer: Peer, method: str, body: dict[str, Any]) -> dict[str, Any]:
        if method == "slow":
            await trio.sleep(10)
        if method == "late":
            gate = trio.Event()
            helpers[0].start_soon(open_late, gate)
            await gate.wait()
            assert trio.current_effective_deadline() < trio.current_time()
        return {"method": method}

    server = RpcServer(handler, pki.files("node-a"))
    left, right = trio.testing.memory_stream_pair()
    client = _framed(right)
    async with trio.open_nursery() as nursery:
        helpers.append(nursery)
        nursery.start_soon(server._serve_requests, _framed(left), PEER, _established())
        slow = await _call(client, 1, "slow", 50)
        fast = await _call(client, 2, "fast", 50)
        late = await _call(client, 3, "late", 50)
        again = await _call(client, 4, "fast", 50)
        await trio.sleep(60)  # idle past the last send's bound (10 s): the worker stays
        after_idle = await _call(client, 5, "fast", 50)
        await right.aclose()
    assert isinstance(slow, Error)
    assert slow.message == "deadline exceeded"
    assert (fast, late, again, after_idle) == (
        Response(2, {"method": "fast"}),
        Response(3, {"method": "late"}),
        Response(4, {"method": "fast"}),
        Response(5, {"method": "fast"}),
    )
    stats = server.statistics()
    assert (stats.requests, stats.errors, stats.deadline_exceeded) == (5, 1, 1)


async def test_an_answer_the_peer_never_reads_closes_the_connection(
    pki: Pki, autojump_clock: trio.testing.MockClock
) -> None:
    """The peer sends a request and never reads: the answer's send is cut after
    send_timeout_s, the connection closes, and serving it ends (not gracefully)."""

    async def handler(peer: Peer, method: str, body: dict[str, Any]) -> dict[str, Any]:
        return {"pad": b"x" * 1000}

    server = RpcServer(handler, pki.files("node-a"), send_timeout_s=5.0)
    left, right = trio.testing.lockstep_stream_pair()
    client = _framed(right)
    outcome: list[bool] = []

    async def serve() -> None:
        outcome.append(await server._serve_requests(_framed(left), PEER, _established()))

    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        await client.send(encode(Request(1, "x", 1000, {})))
    assert outcome == [False]
    assert trio.current_time() - started >= 5.0
    assert server.statistics().requests == 1


async def test_a_call_whose_send_is_stuck_fails_and_one_queued_behind_it_times_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The peer never reads: the first call's frame (sent at once, shielded, bounded by
    send_timeout_s) is cut at 5 s and the call says the connection is lost; a call queued
    behind it gives up at its own 1 s timeout; a later call fails at once."""
    left, _peer_side = trio.testing.lockstep_stream_pair()  # never read
    handshake = Handshake.client()
    handshake.start()
    handshake.receive(Welcome(protocol=1, node="node-a"))
    client = RpcClient(_framed(left), handshake, PEER, MAX_FRAME_BYTES)
    outcomes: dict[str, tuple[str, float]] = {}

    async def call(name: str, timeout_s: float) -> None:
        try:
            await client.call("x", {"pad": b"x" * 1000}, timeout_s=timeout_s)
        except PeerUnavailable as exc:
            outcomes[name] = (type(exc).__name__, trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(call, "first", 60.0)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(call, "queued", 1.0)
    assert outcomes["queued"] == ("CallTimedOut", 1.0)
    assert outcomes["first"][0] == "PeerUnavailable"
    assert outcomes["first"][1] >= 5.0
    await call("later", 60.0)  # the connection is closed: fails at once
    assert outcomes["later"] == ("PeerUnavailable", outcomes["first"][1])


async def test_a_context_variable_a_handler_sets_stays_with_its_request(
    pki: Pki, autojump_clock: trio.testing.MockClock
) -> None:
    """Requests on one connection reuse worker tasks, yet each starts from the
    connection's context, as a task of its own would."""
    seen: list[str] = []

    async def handler(peer: Peer, method: str, body: dict[str, Any]) -> dict[str, Any]:
        seen.append(MARK.get())
        MARK.set(method)
        return {}

    server = RpcServer(handler, pki.files("node-a"))
    left, right = trio.testing.memory_stream_pair()
    client = _framed(right)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server._serve_requests, _framed(left), PEER, _established())
        for request_id, method in enumerate(["first", "second", "third"], start=1):
            assert await _call(client, request_id, method, 1000) == Response(request_id, {})
        await right.aclose()
    assert seen == ["unset", "unset", "unset"]
