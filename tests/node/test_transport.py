"""The transport contract, run against TLS on 127.0.0.1 and the in-memory network; then
what only TLS can get wrong (certificates, bytes on the socket) and what only the
simulated network does (seeded drops, partitions)."""

from __future__ import annotations

import contextlib
import random
import socket
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from functools import partial
from typing import Any

import pytest
import trio

from crypto.tls import client_ssl_context, server_ssl_context
from node.errors import PeerUnavailable, RemoteError
from node.rpc.memory_transport import MemoryNetwork
from node.rpc.transport import Caller, Handler, Peer, RpcServer, ServerStatistics, open_rpc_client
from node.rpc.wire import Error, FrameDecoder, Hello, Message, Request, Response, Welcome, encode
from storage.errors import NotFound
from tests.node.conftest import CLIENT_ROLES, LONG_AGO, Pki

SEED = 20260101


async def echo(peer: Peer, method: str, body: dict[str, Any]) -> dict[str, Any]:
    return {"method": method, "body": body, "peer": peer.name}


# --- harnesses: one server, clients by name ---------------------------------------------


class TlsHarness:
    """``RpcServer`` of ``node-a`` on 127.0.0.1, port 0; clients by certificate name."""

    def __init__(self, pki: Pki, **server_options: Any) -> None:
        self.pki = pki
        self.options = server_options
        self.port = 0
        self.server: RpcServer | None = None

    async def serve(self, nursery: trio.Nursery, handler: Handler) -> trio.CancelScope:
        """Start a server in ``nursery``; cancel the returned scope to stop it."""
        scope: trio.CancelScope = await nursery.start(self._serve, handler)
        return scope

    async def _serve(
        self, handler: Handler, *, task_status: trio.TaskStatus[trio.CancelScope]
    ) -> None:
        with trio.CancelScope() as scope:
            self.server = RpcServer(handler, self.pki.files("node-a"), **self.options)
            async with trio.open_nursery() as nursery:
                self.port = await nursery.start(self.server.run)
                task_status.started(scope)

    def client(self, name: str = "alice") -> AbstractAsyncContextManager[Caller]:
        node = name if name.startswith("node-") else None
        return open_rpc_client("127.0.0.1", self.port, self.pki.files(name), node=node)

    def unreachable(self) -> AbstractAsyncContextManager[Caller]:
        with socket.socket() as s:  # a port nobody listens on (bound, then released)
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        return open_rpc_client("127.0.0.1", port, self.pki.files("alice"))

    def statistics(self) -> ServerStatistics:
        assert self.server is not None
        return self.server.statistics()


class MemoryHarness:
    """A ``MemoryNetwork`` with server ``node-a``; alice is a client with CLIENT_ROLES."""

    def __init__(self) -> None:
        self.network = MemoryNetwork(random.Random(SEED))
        self.network.set_identity("alice", kind="client", roles=CLIENT_ROLES)
        self.network.set_identity("node-b", kind="node")

    async def serve(self, nursery: trio.Nursery, handler: Handler) -> trio.CancelScope:
        scope: trio.CancelScope = await nursery.start(self._serve, handler)
        return scope

    async def _serve(
        self, handler: Handler, *, task_status: trio.TaskStatus[trio.CancelScope]
    ) -> None:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.network.server("node-a", handler).run)
                task_status.started(scope)

    def client(self, name: str = "alice") -> AbstractAsyncContextManager[Caller]:
        return self.network.open_client(name, "node-a")

    def unreachable(self) -> AbstractAsyncContextManager[Caller]:
        return self.network.open_client("alice", "nobody")


Harness = TlsHarness | MemoryHarness


@pytest.fixture(params=["tls", "memory"])
def harness(request: pytest.FixtureRequest) -> Harness:
    if request.param == "tls":
        return TlsHarness(request.getfixturevalue("pki"))
    return MemoryHarness()


@pytest.fixture
def tls(pki: Pki) -> TlsHarness:
    return TlsHarness(pki, handshake_timeout_s=0.3)


async def assert_serves(harness: Harness) -> None:
    """A good client still gets answers."""
    async with harness.client() as client:
        assert (await client.call("ping", {"n": 1}, timeout_s=5))["body"] == {"n": 1}


# --- the contract -----------------------------------------------------------------------


async def test_request_response(harness: Harness) -> None:
    """A call returns the handler's body; the client learns the server's identity."""
    async with trio.open_nursery() as nursery:
        await harness.serve(nursery, echo)
        async with harness.client() as client:
            reply = await client.call("store", {"a": [1, "x", b"\x00"]}, timeout_s=5)
            assert reply == {"method": "store", "body": {"a": [1, "x", b"\x00"]}, "peer": "alice"}
            assert (client.peer.name, client.peer.kind) == ("node-a", "node")
        nursery.cancel_scope.cancel()


async def test_concurrent_calls_are_routed_by_id(harness: Harness) -> None:
    """50 calls in flight at once on one client each get their own answer."""
    count = 50
    arrived, all_arrived = 0, trio.Event()

    async def gathered(peer: Peer, method: str, body: dict[str, Any]) -> dict[str, Any]:
        nonlocal arrived
        arrived += 1
        if arrived == count:
            all_arrived.set()
        await all_arrived.wait()  # every call is in flight before any answer
        return {"n": body["n"] * 2}

    results: dict[int, dict[str, Any]] = {}
    async with trio.open_nursery() as nursery:
        await harness.serve(nursery, gathered)
        async with harness.client() as client:

            async def one(n: int) -> None:
                results[n] = await client.call("double", {"n": n}, timeout_s=5)

            async with trio.open_nursery() as calls:
                for n in range(count):
                    calls.start_soon(one, n)
        nursery.cancel_scope.cancel()
    assert results == {n: {"n": 2 * n} for n in range(count)}


async def test_storage_error_becomes_remote_error_with_code_and_field(harness: Harness) -> None:
    """A handler's StorageError reaches the caller as RemoteError(code, message, field)."""

    async def missing(peer: Peer, method: str, body: dict[str, Any]) -> dict[str, Any]:
        raise NotFound("no such context", field="path")

    async with trio.open_nursery() as nursery:
        await harness.serve(nursery, missing)
        async with harness.client() as client:
            with pytest.raises(RemoteError) as caught:
                await client.call("retrieve", {}, timeout_s=5)
            assert (caught.value.code, caught.value.field) == ("UCXL-404-NOT_FOUND", "path")
            assert caught.value.message == "no such context"
        nursery.cancel_scope.cancel()


async def test_bug_in_handler_is_internal_error_and_server_survives(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """An unexpected exception answers UCXL-500-INTERNAL without its text, and is logged."""

    async def buggy(peer: Peer, method: str, body: dict[str, Any]) -> dict[str, Any]:
        if method == "boom":
            raise KeyError("secret-ish detail")
        return await echo(peer, method, body)

    async with trio.open_nursery() as nursery:
        await harness.serve(nursery, buggy)
        async with harness.client() as client:
            with pytest.raises(RemoteError) as caught:
                await client.call("boom", {}, timeout_s=5)
            assert caught.value.code == "UCXL-500-INTERNAL"
            assert "secret" not in caught.value.message
            assert (await client.call("ping", {}, timeout_s=5))["method"] == "ping"
        nursery.cancel_scope.cancel()
    assert "handler failed on 'boom'" in caplog.text


async def test_deadline_exceeded_is_unavailable(harness: Harness) -> None:
    """A handler that outlives the request's deadline is answered UCXL-503-UNAVAILABLE."""

    async def stuck(peer: Peer, method: str, body: dict[str, Any]) -> dict[str, Any]:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async with trio.open_nursery() as nursery:
        await harness.serve(nursery, stuck)
        async with harness.client() as client:
            with pytest.raises(RemoteError) as caught:
                await client.call("slow", {}, timeout_s=5, deadline_s=0.02)
            assert (caught.value.code, caught.value.message) == (
                "UCXL-503-UNAVAILABLE",
                "deadline exceeded",
            )
            with pytest.raises(PeerUnavailable, match="no answer"):
                await client.call("slow", {}, timeout_s=0.05)
        nursery.cancel_scope.cancel()


async def test_unreachable_peer_is_peer_unavailable(harness: Harness) -> None:
    """Nobody serving at the address: PeerUnavailable, at once."""
    with trio.fail_after(2), pytest.raises(PeerUnavailable):
        async with harness.unreachable():
            raise AssertionError("connected to nobody")


async def test_server_going_away_fails_calls_in_flight(harness: Harness) -> None:
    """A call waiting on a server that stops raises PeerUnavailable, and so do later calls."""
    entered = trio.Event()

    async def stuck(peer: Peer, method: str, body: dict[str, Any]) -> dict[str, Any]:
        entered.set()
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async with trio.open_nursery() as nursery:
        server = await harness.serve(nursery, stuck)
        async with harness.client() as client:
            async with trio.open_nursery() as calls:

                async def waiting() -> None:
                    with trio.fail_after(2), pytest.raises(PeerUnavailable):
                        await client.call("wait", {}, timeout_s=30)

                calls.start_soon(waiting)
                await entered.wait()
                server.cancel()
            with pytest.raises(PeerUnavailable):
                await client.call("again", {}, timeout_s=1)


async def test_handler_sees_the_peer_and_its_roles(harness: Harness, pki: Pki) -> None:
    """The handler gets the caller's name, kind and certificate roles."""
    seen: list[Peer] = []

    async def record(peer: Peer, method: str, body: dict[str, Any]) -> dict[str, Any]:
        seen.append(peer)
        return {}

    async with trio.open_nursery() as nursery:
        await harness.serve(nursery, record)
        for name in ("alice", "node-b"):
            async with harness.client(name) as client:
                await client.call("whoami", {}, timeout_s=5)
        nursery.cancel_scope.cancel()
    alice, node_b = seen
    assert (alice.name, alice.kind, alice.roles) == ("alice", "client", CLIENT_ROLES)
    assert (node_b.name, node_b.kind, node_b.roles) == ("node-b", "node", ())
    if isinstance(harness, TlsHarness):
        assert alice.fingerprint == pki.fingerprint("alice")


async def test_closed_client_refuses_calls(harness: Harness) -> None:
    """After aclose, call raises trio.ClosedResourceError (our doing, not the peer's)."""
    async with trio.open_nursery() as nursery:
        await harness.serve(nursery, echo)
        async with harness.client() as client:
            await client.aclose()
            with pytest.raises(trio.ClosedResourceError):
                await client.call("ping", {}, timeout_s=1)
        nursery.cancel_scope.cancel()


async def test_exception_in_the_client_block_comes_out_as_raised(harness: Harness) -> None:
    """The client's nursery does not wrap the block's own exception in a group."""
    async with trio.open_nursery() as nursery:
        await harness.serve(nursery, echo)
        with pytest.raises(KeyError, match="mine"):
            async with harness.client():
                raise KeyError("mine")
        await assert_serves(harness)
        nursery.cancel_scope.cancel()


# --- TLS only: who may connect, and what bytes do to the server ---------------------------


@asynccontextmanager
async def serving(tls: TlsHarness) -> AsyncIterator[TlsHarness]:
    async with trio.open_nursery() as nursery:
        await tls.serve(nursery, echo)
        yield tls
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def raw_tls(tls: TlsHarness, name: str = "alice") -> AsyncIterator[trio.SSLStream[Any]]:
    """A TLS connection that speaks no protocol until told to."""
    tcp = await trio.open_tcp_stream("127.0.0.1", tls.port)
    stream = trio.SSLStream(
        tcp, client_ssl_context(tls.pki.files(name)), server_hostname="127.0.0.1"
    )
    try:
        await stream.do_handshake()
        yield stream
    finally:
        await trio.aclose_forcefully(stream)


async def read_until_closed(stream: trio.abc.ReceiveStream, timeout_s: float = 3) -> list[Message]:
    """Every message the server sends before it closes the connection."""
    decoder, messages = FrameDecoder(), []
    with trio.fail_after(timeout_s):
        try:
            while data := await stream.receive_some():
                messages += decoder.feed(data)
        except trio.BrokenResourceError:
            pass  # reset, or TLS EOF without close_notify: closed either way
    return messages


async def test_foreign_ca_client_is_refused(tls: TlsHarness) -> None:
    """A certificate from another CA: PeerUnavailable for it, a counted TLS failure, and
    the server keeps serving."""
    async with serving(tls):
        with pytest.raises(PeerUnavailable):
            async with open_rpc_client("127.0.0.1", tls.port, tls.pki.foreign_files("mallory")):
                raise AssertionError("a foreign certificate got in")
        assert tls.statistics().tls_failures == 1
        await assert_serves(tls)


async def test_revoked_client_is_refused_even_after_the_server_started(tls: TlsHarness) -> None:
    """Revoking rewrites the CRL; the running server's next handshake uses it."""
    tls.pki.ca.issue_client("bob", ["observer"])
    async with serving(tls):
        async with tls.client("bob") as bob:
            await bob.call("ping", {}, timeout_s=5)
        tls.pki.ca.revoke("bob")
        with pytest.raises(PeerUnavailable):
            async with tls.client("bob"):
                raise AssertionError("a revoked certificate got in")
        assert tls.statistics().tls_failures == 1
        await assert_serves(tls)


async def test_expired_client_is_refused(tls: TlsHarness) -> None:
    """A certificate past its notAfter is refused in the handshake."""
    tls.pki.ca.issue_client("old", ["observer"], now=LONG_AGO)
    async with serving(tls):
        with pytest.raises(PeerUnavailable):
            async with tls.client("old"):
                raise AssertionError("an expired certificate got in")
        assert tls.statistics().tls_failures == 1
        await assert_serves(tls)


async def test_random_bytes_on_tcp_are_a_tls_failure(tls: TlsHarness) -> None:
    """Garbage instead of a ClientHello closes that connection only."""
    rng = random.Random(SEED)
    async with serving(tls):
        raw = await trio.open_tcp_stream("127.0.0.1", tls.port)
        async with raw:
            await raw.send_all(rng.randbytes(2000))
            await read_until_closed(raw)
        assert tls.statistics().tls_failures == 1
        await assert_serves(tls)


async def test_huge_length_prefix_closes_the_connection(tls: TlsHarness) -> None:
    """After a proper hello, a 0xFFFFFFFF prefix: an error frame, then closed; counted."""
    async with serving(tls), raw_tls(tls) as stream:
        await stream.send_all(encode(Hello(1, None)))
        decoder = FrameDecoder()
        assert decoder.feed(await stream.receive_some()) == [Welcome(1, "node-a")]
        await stream.send_all(b"\xff\xff\xff\xff")
        [refusal] = await read_until_closed(stream)
        assert isinstance(refusal, Error)
        assert (refusal.id, refusal.code) == (None, "UCXL-400-INVALID_PAYLOAD")
        assert "exceeds" in refusal.message
        stats = tls.statistics()
        assert (stats.oversized_frames, stats.protocol_errors) == (1, 1)
        await assert_serves(tls)


@pytest.mark.parametrize(
    ("opening", "reason"),
    [
        (encode(Hello(1, None)) + b"\x00\x00\x00\x03\xc1\xc1\xc1", "not valid msgpack"),
        (encode(Request(1, "store", 100, {})), "unexpected request in state await-hello"),
        (encode(Hello(99, None)), "unsupported protocol version 99"),
        (encode(Hello(1, "node-b")), "hello names node 'node-b'"),
    ],
    ids=["malformed-msgpack", "request-before-hello", "bad-version", "impostor-node"],
)
async def test_protocol_errors_close_the_connection(
    tls: TlsHarness, opening: bytes, reason: str
) -> None:
    """Bad frames or a bad opening: the server says why, closes, counts; others unaffected."""
    async with serving(tls), raw_tls(tls) as stream:
        await stream.send_all(opening)
        *_, refusal = await read_until_closed(stream)
        assert isinstance(refusal, Error)
        assert reason in refusal.message
        assert tls.statistics().protocol_errors == 1
        await assert_serves(tls)


async def test_half_open_connections_do_not_block_others_and_time_out(tls: TlsHarness) -> None:
    """A silent TCP peer and a silent TLS peer: others are served meanwhile; both are
    closed after the handshake timeout (0.3 s here)."""
    async with serving(tls):
        silent_tcp = await trio.open_tcp_stream("127.0.0.1", tls.port)
        async with silent_tcp, raw_tls(tls) as silent_tls:
            await assert_serves(tls)
            start = trio.current_time()
            assert await read_until_closed(silent_tcp) == []
            assert await read_until_closed(silent_tls) == []
            assert trio.current_time() - start < 1.5
        assert tls.statistics().handshake_timeouts == 2
        await assert_serves(tls)


async def test_statistics_count_requests_and_errors(tls: TlsHarness) -> None:
    """requests, errors and deadline_exceeded follow what the server answered."""

    async def flaky(peer: Peer, method: str, body: dict[str, Any]) -> dict[str, Any]:
        if method == "slow":
            await trio.sleep_forever()
        if method == "missing":
            raise NotFound("no such context")
        return {}

    async with trio.open_nursery() as nursery:
        await tls.serve(nursery, flaky)
        async with tls.client() as client:
            await client.call("ok", {}, timeout_s=5)
            with pytest.raises(RemoteError):
                await client.call("missing", {}, timeout_s=5)
            with pytest.raises(RemoteError):
                await client.call("slow", {}, timeout_s=5, deadline_s=0.01)
        nursery.cancel_scope.cancel()
    stats = tls.statistics()
    assert (stats.requests, stats.errors, stats.deadline_exceeded) == (3, 2, 1)
    assert (stats.connections_accepted, stats.tls_failures, stats.protocol_errors) == (1, 0, 0)


# --- memory only: seeded faults ---------------------------------------------------------


async def _outcomes(seed: int, calls: int = 30) -> list[bool]:
    """Whether each of ``calls`` sequential calls got an answer on a lossy network."""
    network = MemoryNetwork(random.Random(seed), drop=0.2, min_delay_s=0.001, max_delay_s=0.05)
    answered = []
    async with trio.open_nursery() as nursery:
        await nursery.start(network.server("node-a", echo).run)
        async with network.open_client("node-b", "node-a") as client:
            for n in range(calls):
                try:
                    await client.call("ping", {"n": n}, timeout_s=1)
                    answered.append(True)
                except PeerUnavailable:
                    answered.append(False)
        nursery.cancel_scope.cancel()
    return answered


async def test_seeded_drops_are_deterministic(autojump_clock: trio.testing.MockClock) -> None:
    """Same seed → the same calls time out; another seed → another pattern."""
    first = await _outcomes(SEED)
    assert not all(first), f"seed={SEED}: {first}"
    assert any(first), f"seed={SEED}: {first}"
    assert await _outcomes(SEED) == first, f"seed={SEED}"
    assert await _outcomes(SEED + 1) != first, f"seed={SEED + 1}"


async def test_partition_blocks_both_ways_until_heal(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A partition drops calls in both directions; other links work; heal restores."""
    network = MemoryNetwork(random.Random(SEED))
    async with trio.open_nursery() as nursery:
        for name in ("node-a", "node-b", "node-c"):
            await nursery.start(network.server(name, echo).run)

        async def reaches(a: str, b: str) -> bool:
            async with network.open_client(a, b) as client:
                try:
                    await client.call("ping", {}, timeout_s=1)
                    return True
                except PeerUnavailable:
                    return False

        network.partition({"node-a"}, {"node-b"})
        assert not await reaches("node-a", "node-b")
        assert not await reaches("node-b", "node-a")
        assert await reaches("node-a", "node-c")
        assert await reaches("node-c", "node-b")
        network.heal()
        assert await reaches("node-a", "node-b")
        assert await reaches("node-b", "node-a")
        nursery.cancel_scope.cancel()


async def test_one_way_block_drops_one_direction_only(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """block(a, b): a's requests to b are lost, b's requests to a are answered (but the
    answers of a request b received from a would be lost too); heal restores both."""
    network = MemoryNetwork(random.Random(SEED))
    runs = 0

    async def counting(peer: Peer, method: str, body: dict[str, Any]) -> dict[str, Any]:
        nonlocal runs
        runs += 1
        return {}

    async with trio.open_nursery() as nursery:
        for name in ("node-a", "node-b"):
            await nursery.start(network.server(name, counting).run)

        async def reaches(a: str, b: str) -> bool:
            async with network.open_client(a, b) as client:
                try:
                    await client.call("ping", {}, timeout_s=1)
                    return True
                except PeerUnavailable:
                    return False

        network.block("node-a", "node-b")
        assert not network.reachable("node-a", "node-b")
        assert network.reachable("node-b", "node-a")
        assert not await reaches("node-a", "node-b")
        assert runs == 0  # the request never arrived
        assert not await reaches("node-b", "node-a")  # the request arrives, the answer is lost
        assert runs == 1
        network.heal()
        assert await reaches("node-a", "node-b")
        assert await reaches("node-b", "node-a")
        nursery.cancel_scope.cancel()


async def test_duplicates_run_the_handler_twice_but_answer_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """duplicate=1.0 delivers every request twice; the caller sees one answer."""
    network = MemoryNetwork(random.Random(SEED), duplicate=1.0, max_delay_s=0.01)
    runs = 0

    async def counting(peer: Peer, method: str, body: dict[str, Any]) -> dict[str, Any]:
        nonlocal runs
        runs += 1
        return {"runs": runs}

    async with trio.open_nursery() as nursery:
        await nursery.start(network.server("node-a", counting).run)
        async with network.open_client("node-b", "node-a") as client:
            await client.call("ping", {}, timeout_s=1)
            with trio.move_on_after(0.1):
                await trio.sleep_forever()  # let the duplicate arrive (mock time)
        nursery.cancel_scope.cancel()
    assert runs == 2
    assert network.statistics().duplicated == 1


async def test_delays_are_paid_in_trio_time(autojump_clock: trio.testing.MockClock) -> None:
    """Each leg waits within [min_delay_s, max_delay_s] of trio's clock."""
    network = MemoryNetwork(random.Random(SEED), min_delay_s=0.5, max_delay_s=1.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(network.server("node-a", echo).run)
        async with network.open_client("node-b", "node-a") as client:
            start = trio.current_time()
            await client.call("ping", {}, timeout_s=5)
            assert 1.0 <= trio.current_time() - start <= 2.0
            with pytest.raises(PeerUnavailable):
                await client.call("ping", {}, timeout_s=0.9)
        nursery.cancel_scope.cancel()


def test_network_refuses_nonsense_settings() -> None:
    """Probabilities are in [0, 1]; delays 0 <= min <= max."""
    for options in ({"drop": 1.5}, {"duplicate": -0.1}, {"min_delay_s": 2.0, "max_delay_s": 1.0}):
        with pytest.raises(ValueError, match=r"probabilities|delays"):
            MemoryNetwork(random.Random(0), **options)


async def test_per_connection_concurrency_is_bounded(pki: Pki) -> None:
    """Beyond max_concurrent_per_conn the server stops reading; every call still completes."""
    tls = TlsHarness(pki, max_concurrent_per_conn=2)
    running, peak = 0, 0

    async def busy(peer: Peer, method: str, body: dict[str, Any]) -> dict[str, Any]:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await trio.sleep(0.01)
        running -= 1
        return {}

    async with trio.open_nursery() as nursery:
        await tls.serve(nursery, busy)
        async with tls.client() as client, trio.open_nursery() as calls:
            for _ in range(6):
                calls.start_soon(partial(client.call, "work", {}, timeout_s=5))
        nursery.cancel_scope.cancel()
    assert peak == 2
    assert tls.statistics().requests == 6


async def test_client_survives_a_misbehaving_server(pki: Pki) -> None:
    """A late answer (unknown id) is dropped; a garbage frame fails the call with
    PeerUnavailable, and the client refuses further calls the same way."""

    async def rogue(stream: trio.SSLStream[trio.SocketStream]) -> None:
        decoder = FrameDecoder()
        with contextlib.suppress(trio.BrokenResourceError):
            assert decoder.feed(await stream.receive_some()) == [Hello(1, None)]
            await stream.send_all(encode(Welcome(1, "node-a")))
            for reply in (b"", b"\x00\x00\x00\x01\xc1"):
                [request] = decoder.feed(await stream.receive_some())
                assert isinstance(request, Request)
                late = encode(Response(request.id + 1000, {"late": True}))
                await stream.send_all(late + (reply or encode(Response(request.id, {"ok": 1}))))
            await stream.receive_some()

    context = server_ssl_context(pki.files("node-a"))
    async with trio.open_nursery() as nursery:
        [listener] = await nursery.start(
            partial(trio.serve_ssl_over_tcp, rogue, 0, context, host="127.0.0.1")
        )
        port = listener.transport_listener.socket.getsockname()[1]
        async with open_rpc_client("127.0.0.1", port, pki.files("alice")) as client:
            assert await client.call("first", {}, timeout_s=5) == {"ok": 1}
            with pytest.raises(PeerUnavailable, match="not valid msgpack"):
                await client.call("second", {}, timeout_s=5)
            with pytest.raises(PeerUnavailable):
                await client.call("third", {}, timeout_s=5)
        nursery.cancel_scope.cancel()
