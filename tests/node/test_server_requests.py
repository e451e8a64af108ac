"""The server's request workers (``RpcServer`` over an in-memory stream, trio's mock clock):
a worker's cancel scope outlives a request that exceeded its deadline, an answer that
returned in time is sent even when the deadline passed after the handler's last yield, and
an answer the peer never reads closes the connection after ``send_timeout_s``."""

from __future__ import annotations

from typing import Any

import trio
import trio.testing

from node.rpc.transport import FramedStream, Peer, RpcServer
from node.rpc.wire import (
    MAX_FRAME_BYTES,
    Error,
    Handshake,
    Hello,
    Message,
    Request,
    Response,
    encode,
)
from tests.node.conftest import Pki

PEER = Peer(name="node-b", kind="node", roles=(), fingerprint="00")


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
    """slow (deadline exceeded), then fast and late on the same connection: every request
    is answered, the late one (deadline passed after its handler's last yield) with its
    response, and the counters say so."""

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
        await right.aclose()
    assert isinstance(slow, Error)
    assert slow.message == "deadline exceeded"
    assert (fast, late, again) == (
        Response(2, {"method": "fast"}),
        Response(3, {"method": "late"}),
        Response(4, {"method": "fast"}),
    )
    stats = server.statistics()
    assert (stats.requests, stats.errors, stats.deadline_exceeded) == (4, 1, 1)


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
