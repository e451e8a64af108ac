"""The RPC transport: ``node.rpc.wire`` frames over mutual TLS on TCP, as trio services.

Owns: ``RpcServer`` (accepts connections, authenticates them, runs each request under its
deadline and answers) and ``open_rpc_client`` / ``RpcClient`` (one connection, many
concurrent calls multiplexed by request id). Also the pieces the in-memory transport
shares: ``Peer``, ``Handler``, ``ServerStatistics`` and ``answer``.

Connection lifecycle (server side), all within ``handshake_timeout_s`` of the accept:
TLS handshake with the ``crypto.tls`` server context (TLS 1.3, client certificate from the
cluster CA required, CRL checked; the context is rebuilt when ``ca.crl`` changes on disk),
then the ``wire.Handshake`` (hello → welcome). Then requests run concurrently on worker
tasks in the connection's nursery (at most ``max_concurrent_per_conn``; beyond that the
server stops reading, which pushes back on the client), each under its deadline (see
``_Requests``).

Faults stay local: a TLS failure, a handshake timeout, a malformed or oversized frame closes
that one connection (after a best-effort ``error`` frame when TLS is up) and bumps a counter
in ``statistics()``; a handler's exception becomes an ``error`` answer. Nothing a peer sends
can stop the server.

Must not know: what methods mean, storage, membership. Invariants: frames on one connection
are sent whole and in order (one send at a time per connection; frames that arrive during a
send queue and go out together after it, see ``node.rpc.framed``; a send is shielded from
cancellation because a cancelled ``SSLStream.send_all`` breaks the stream, and bounded by
``send_timeout_s`` instead; a server's answers are exposed only to their connection's own
teardown); no task outlives the service or client that started it.
"""

from __future__ import annotations

import contextvars
import dataclasses
import enum
import itertools
import logging
import math
import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, cast

import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from crypto.certs import certificate_kind, certificate_roles, load_certificate
from crypto.errors import CertificateError
from crypto.tls import TlsFiles, client_ssl_context, peer_certificate, server_ssl_context
from node.errors import (
    CallTimedOut,
    FrameTooLarge,
    NodeError,
    PeerUnavailable,
    ProtocolError,
    RemoteError,
)
from node.rpc.framed import FramedStream
from node.rpc.wire import (
    MAX_FRAME_BYTES,
    Error,
    Handshake,
    Request,
    Response,
    connection_error,
    encode,
)
from storage.errors import StorageError

logger = logging.getLogger(__name__)

UNAVAILABLE_CODE = "UCXL-503-UNAVAILABLE"
INTERNAL_CODE = "UCXL-500-INTERNAL"
DEADLINE_EXCEEDED = "deadline exceeded"
REFUSAL_SEND_TIMEOUT_S = 0.5


@dataclass(frozen=True)
class Peer:
    """Who is on the other end, from its verified certificate.

    Attributes:
        name: The certificate's common name (the node or client name).
        kind: ``"node"`` (serverAuth certificate) or ``"client"``.
        roles: The roles a client certificate carries (nodes: empty).
        fingerprint: SHA-256 of the certificate, lower-case hex.
    """

    name: str
    kind: Literal["node", "client"]
    roles: tuple[str, ...]
    fingerprint: str

    @classmethod
    def from_certificate(cls, cert: x509.Certificate) -> Peer:
        """The peer a certificate names.

        Raises:
            CertificateError: A CA certificate, no common name, or a malformed roles extension.
        """
        kind = certificate_kind(cert)
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if kind == "ca" or not names:
            raise CertificateError("not a node or client certificate", reason="wrong-usage")
        return cls(
            name=str(names[0].value),
            kind=kind,
            roles=certificate_roles(cert),
            fingerprint=cert.fingerprint(hashes.SHA256()).hex(),
        )


Handler = Callable[[Peer, str, dict[str, Any]], Awaitable[dict[str, Any]]]


class Caller(Protocol):
    """A connection to one peer, as the rest of the node uses it (TLS or in memory)."""

    peer: Peer

    async def call(
        self,
        method: str,
        body: dict[str, Any],
        *,
        timeout_s: float,
        deadline_s: float | None = None,
    ) -> dict[str, Any]:
        """Call ``method``; see ``RpcClient.call`` for the semantics."""
        ...

    async def aclose(self) -> None:
        """Close; waiting calls raise ``trio.ClosedResourceError``."""
        ...


@dataclass
class ServerStatistics:
    """Counters of one server since it started (``handshake_timeouts``: TLS or hello)."""

    connections_accepted: int = 0
    connections_open: int = 0
    tls_failures: int = 0
    handshake_timeouts: int = 0
    protocol_errors: int = 0
    oversized_frames: int = 0
    requests: int = 0
    errors: int = 0
    deadline_exceeded: int = 0


def _error(request_id: int, code: str, message: str, field: str | None) -> Error:
    try:
        return Error(request_id, code, message, field)
    except ValueError:
        return Error(request_id, INTERNAL_CODE, "the handler raised a malformed error", None)


async def answer(
    handler: Handler,
    peer: Peer,
    request: Request,
    stats: ServerStatistics,
    *,
    max_frame_bytes: int = MAX_FRAME_BYTES,
) -> bytes:
    """Run ``request`` through ``handler`` under its deadline; the encoded answer frame.

    ``StorageError`` and ``RemoteError`` keep their UCXL code and field; ``PeerUnavailable``
    and an exceeded deadline become ``UCXL-503-UNAVAILABLE``; anything else is logged and
    answered ``UCXL-500-INTERNAL`` without its text. Never raises (except ``Cancelled``).
    """
    stats.requests += 1
    try:
        with trio.CancelScope(deadline=trio.current_time() + request.deadline_ms / 1000) as scope:
            body = await handler(peer, request.method, request.body)
        if not scope.cancelled_caught:
            return encode(Response(request.id, body), max_frame_bytes=max_frame_bytes)
        stats.deadline_exceeded += 1
        reply = Error(request.id, UNAVAILABLE_CODE, DEADLINE_EXCEEDED, None)
    except Exception as exc:
        reply = _error_reply(request, peer, exc)
    stats.errors += 1
    return encode(reply, max_frame_bytes=max_frame_bytes)


def _error_reply(request: Request, peer: Peer, exc: Exception) -> Error:
    """The error answer for a handler's exception (call it in the ``except`` block)."""
    if isinstance(exc, StorageError | RemoteError):
        return _error(request.id, exc.code, exc.message, exc.field)
    if isinstance(exc, PeerUnavailable):
        return Error(request.id, UNAVAILABLE_CODE, str(exc), None)
    if isinstance(exc, FrameTooLarge):
        return Error(request.id, INTERNAL_CODE, "the answer exceeds the frame limit", None)
    logger.exception("handler failed on %r from %s", request.method, peer.name)
    return Error(request.id, INTERNAL_CODE, "internal error", None)


def _peer_of(stream: trio.SSLStream[trio.SocketStream]) -> Peer:
    # SSLStream forwards getpeercert() to its SSLObject; that is all peer_certificate uses.
    return Peer.from_certificate(peer_certificate(cast(ssl.SSLObject, stream)))


def _certificate_name(path: Path) -> str:
    names = load_certificate(path.read_bytes()).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


class RpcServer:
    """Serves ``handler`` over mutual TLS; see the module docstring for the lifecycle."""

    def __init__(
        self,
        handler: Handler,
        tls: TlsFiles,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        handshake_timeout_s: float = 5.0,
        max_frame_bytes: int = MAX_FRAME_BYTES,
        max_concurrent_per_conn: int = 64,
        send_timeout_s: float = 10.0,
    ) -> None:
        """Build the server; nothing listens until ``run``.

        Raises:
            ValueError: A non-positive timeout or limit.
            ssl.SSLError, OSError: The TLS files cannot be loaded.
        """
        if min(handshake_timeout_s, send_timeout_s) <= 0:
            raise ValueError("timeouts must be positive")
        if min(max_frame_bytes, max_concurrent_per_conn) < 1:
            raise ValueError("limits must be positive")
        self._handler = handler
        self._tls = tls
        self._host = host
        self._port = port
        self._handshake_timeout_s = handshake_timeout_s
        self._max_frame_bytes = max_frame_bytes
        self._max_concurrent = max_concurrent_per_conn
        self._send_timeout_s = send_timeout_s
        self.name = _certificate_name(tls.cert)
        self._context = server_ssl_context(tls)
        self._crl_stamp = self._read_crl_stamp()
        self._stats = ServerStatistics()
        self.port: int | None = None

    def statistics(self) -> ServerStatistics:
        """A snapshot of the counters."""
        return dataclasses.replace(self._stats)

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Bind, report the bound port through ``task_status``, serve until cancelled.

        With port 0 and a host that resolves to several addresses, only the first is served
        (trio would give each address a different random port).
        """
        listeners = await trio.open_tcp_listeners(self._port, host=self._host)
        if self._port == 0:
            for extra in listeners[1:]:
                await extra.aclose()
            listeners = listeners[:1]
        self.port = int(listeners[0].socket.getsockname()[1])
        task_status.started(self.port)
        await trio.serve_listeners(self._serve_connection, listeners)

    def _read_crl_stamp(self) -> tuple[int, int, int] | None:
        if self._tls.crl is None:
            return None
        try:
            st = os.stat(self._tls.crl)
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _ssl_context(self) -> ssl.SSLContext:
        """The server context, rebuilt when the CRL file changed (a revocation)."""
        stamp = self._read_crl_stamp()
        if stamp is not None and stamp != self._crl_stamp:
            try:
                self._context = server_ssl_context(self._tls)
                self._crl_stamp = stamp
            except (ssl.SSLError, OSError) as exc:
                logger.warning("keeping the previous TLS context: CRL reload failed: %s", exc)
        return self._context

    async def _serve_connection(self, tcp: trio.SocketStream) -> None:
        self._stats.connections_accepted += 1
        self._stats.connections_open += 1
        stream = trio.SSLStream(tcp, self._ssl_context(), server_side=True)
        framed = FramedStream(
            stream, max_frame_bytes=self._max_frame_bytes, send_timeout_s=self._send_timeout_s
        )
        graceful = False
        try:
            graceful = await self._converse(framed, stream)
        except Exception:
            logger.exception("bug while serving a connection")
        finally:
            # Every counter is final before the peer can see the close.
            self._stats.connections_open -= 1
            await framed.aclose(graceful=graceful)

    async def _converse(
        self, framed: FramedStream, stream: trio.SSLStream[trio.SocketStream]
    ) -> bool:
        """Serve one connection; whether it ended cleanly (close gracefully then)."""
        with trio.move_on_after(self._handshake_timeout_s) as scope:
            established = await self._establish(framed, stream)
        if scope.cancelled_caught:
            self._stats.handshake_timeouts += 1
            logger.info("closing a connection: no handshake in %s s", self._handshake_timeout_s)
            return False
        if established is None:
            return False
        return await self._serve_requests(framed, *established)

    async def _establish(
        self, framed: FramedStream, stream: trio.SSLStream[trio.SocketStream]
    ) -> tuple[Peer, Handshake] | None:
        try:
            await stream.do_handshake()
            peer = _peer_of(stream)
        except (trio.BrokenResourceError, CertificateError) as exc:
            self._stats.tls_failures += 1
            logger.info("refused a TLS connection: %s", exc.__cause__ or exc)
            return None
        handshake = Handshake.server(node=self.name, peer_name=peer.name, peer_kind=peer.kind)
        try:
            while not handshake.established:
                msg = await framed.receive()
                if msg is None:
                    return None
                welcome = handshake.receive(msg)
                if welcome is not None:
                    await framed.send(encode(welcome))
        except ProtocolError as exc:
            await self._refuse(framed, exc)
            return None
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return None
        return peer, handshake

    async def _refuse(self, framed: FramedStream, exc: ProtocolError) -> None:
        """Count a protocol error and tell the peer why we close (best effort)."""
        self._stats.protocol_errors += 1
        if isinstance(exc, FrameTooLarge):
            self._stats.oversized_frames += 1
        logger.info("closing a connection: %s", exc.reason)
        with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await framed.send(encode(connection_error(exc)), timeout_s=REFUSAL_SEND_TIMEOUT_S)

    async def _serve_requests(self, framed: FramedStream, peer: Peer, handshake: Handshake) -> bool:
        graceful = False
        async with trio.open_nursery() as nursery:
            requests = _Requests(self, framed, peer, nursery)
            try:
                while (msg := await framed.receive()) is not None:
                    request = handshake.expect_request(msg)
                    if request.id in requests.in_flight:
                        raise ProtocolError(f"request id {request.id} is already in flight")
                    await requests.start(request)
                graceful = True
            except ProtocolError as exc:
                await self._refuse(framed, exc)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            nursery.cancel_scope.cancel()
        return graceful


class _Requests:
    """The requests of one connection, run by a pool of worker tasks in its nursery.

    At most ``max_concurrent_per_conn`` run at once; beyond that ``start`` waits (the
    reader stops reading: backpressure). A worker that finished parks until the next
    request instead of exiting, and keeps one cancel scope across the requests it runs,
    moving its deadline (the request's, then ``send_timeout_s`` for the answer's send)
    instead of entering new scopes: on a small call a task spawn and
    two cancel scopes cost more than the rest of the server's work. A scope that fired
    is replaced. Workers are cancelled with the connection; the answer's send is not
    shielded from that (the connection is closing, a cut frame cannot matter), only
    bounded, and a send cut by its bound closes the connection, as ``FramedStream.send``
    does. The answers are those of ``answer``.
    """

    def __init__(
        self, server: RpcServer, framed: FramedStream, peer: Peer, nursery: trio.Nursery
    ) -> None:
        """One connection's requests: answered by ``server``'s handler over ``framed``."""
        self.in_flight: set[int] = set()
        self._server = server
        self._framed = framed
        self._peer = peer
        self._nursery = nursery
        self._limit = server._max_concurrent
        self._running = 0
        self._idle: list[_Worker] = []
        self._reader: trio.lowlevel.Task | None = None  # parked in start(), at the limit

    async def start(self, request: Request) -> None:
        """Run ``request`` on an idle worker or a new one; first wait below the limit."""
        if self._running >= self._limit:
            self._reader = trio.lowlevel.current_task()
            await trio.lowlevel.wait_task_rescheduled(self._abort_reader)
        self._running += 1
        self.in_flight.add(request.id)
        if self._idle:
            worker = self._idle.pop()
            worker.request = request
            # A fresh copy of our context, as start_soon gives a new task: what a handler
            # sets in a context variable stays with its own request.
            worker.task.context = contextvars.copy_context()
            trio.lowlevel.reschedule(worker.task)
        else:
            self._nursery.start_soon(self._work, request)

    def _abort_reader(self, _: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
        self._reader = None
        return trio.lowlevel.Abort.SUCCEEDED

    def _finished(self, request: Request) -> None:
        self.in_flight.discard(request.id)
        self._running -= 1
        if self._reader is not None:
            reader, self._reader = self._reader, None
            trio.lowlevel.reschedule(reader)

    async def _next(self, worker: _Worker) -> Request:
        """Park ``worker`` until ``start`` hands it a request."""
        worker.request = None
        self._idle.append(worker)

        def abort(_: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
            self._idle.remove(worker)
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)
        assert worker.request is not None
        return worker.request

    async def _work(self, first: Request) -> None:
        worker = _Worker(trio.lowlevel.current_task())
        request: Request | None = first
        while True:
            late: bytes | None = None
            with trio.CancelScope() as scope:
                while True:
                    if request is None:
                        request = await self._next(worker)
                        if scope.cancel_called:  # the last send's bound, as we woke
                            break
                    late = await self._answer(scope, worker, request)
                    if late is not None:
                        break  # answer it outside this scope, which fired
                    self._finished(request)
                    request = None
            if worker.phase is _Phase.IDLE:
                continue  # the last send's bound fired while idle: a fresh scope
            assert request is not None
            try:
                if late is not None:
                    with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        await self._framed.send(late)
                elif worker.phase is _Phase.HANDLER:  # it outlived the request's deadline
                    stats = self._server._stats
                    stats.deadline_exceeded += 1
                    stats.errors += 1
                    reply = Error(request.id, UNAVAILABLE_CODE, DEADLINE_EXCEEDED, None)
                    with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        await self._framed.send(self._encode(reply))
                # else: the bound of the answer's send fired (sent: the connection is closed)
            finally:
                worker.phase = _Phase.IDLE
            self._finished(request)
            request = None

    def _encode(self, reply: Error) -> bytes:
        return encode(reply, max_frame_bytes=self._server._max_frame_bytes)

    async def _answer(
        self, scope: trio.CancelScope, worker: _Worker, request: Request
    ) -> bytes | None:
        """Answer ``request`` within ``scope``; the answer to send outside it if the scope
        fired after the handler's last yield (it returned in time, so it is answered).

        The scope's deadline is left at the send's bound afterwards (moving it costs as
        much as a good part of a small call): if it fires while the worker is idle, the
        worker just takes a fresh scope.
        """
        server = self._server
        stats = server._stats
        stats.requests += 1
        worker.phase = _Phase.HANDLER
        scope.deadline = trio.current_time() + request.deadline_ms / 1000
        try:
            body = await server._handler(self._peer, request.method, request.body)
            frame = encode(Response(request.id, body), max_frame_bytes=server._max_frame_bytes)
        except Exception as exc:
            stats.errors += 1
            frame = self._encode(_error_reply(request, self._peer, exc))
        if scope.cancel_called:
            return frame
        scope.deadline = trio.current_time() + server._send_timeout_s
        worker.phase = _Phase.SENDING
        # A broken connection: the reading loop sees it too.
        with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self._framed.send_in_scope(frame, scope)
        worker.phase = _Phase.IDLE
        return None


class _Phase(enum.Enum):
    """Where a worker is: what its cancel scope's deadline bounds."""

    IDLE = "idle"  # parked, or between requests (a stale bound may fire: harmless)
    HANDLER = "handler"  # the request's deadline
    SENDING = "sending"  # the answer's send bound


class _Worker:
    """A task of ``_Requests``: the request it was handed, and its phase."""

    __slots__ = ("phase", "request", "task")

    def __init__(self, task: trio.lowlevel.Task) -> None:
        self.task = task
        self.request: Request | None = None
        self.phase = _Phase.IDLE


class _Call:
    """One call waiting for its answer: a response body or the error to raise.

    The caller parks itself (``wait``) and the reply reader wakes it (``settle``): the
    plain ``trio.lowlevel`` pair that ``trio.Event`` is built on, without a parking lot.
    """

    __slots__ = ("done", "outcome", "task")

    def __init__(self) -> None:
        self.done = False
        self.outcome: dict[str, Any] | Exception | None = None
        self.task: trio.lowlevel.Task | None = None  # the caller, while parked

    def settle(self, outcome: dict[str, Any] | Exception) -> None:
        """Record the answer and wake the caller if it waits (once; later calls do nothing)."""
        if self.done:
            return
        self.done, self.outcome = True, outcome
        if self.task is not None:
            task, self.task = self.task, None
            trio.lowlevel.reschedule(task)

    async def wait(self) -> None:
        """Until ``settle``; cancellable (then the answer, if it comes, is dropped)."""
        if self.done:
            await trio.lowlevel.checkpoint()
            return
        self.task = trio.lowlevel.current_task()

        def abort(_: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
            self.task = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)


class RpcClient:
    """One TLS connection to a server; concurrent ``call``s share it. See ``open_rpc_client``."""

    def __init__(
        self, framed: FramedStream, handshake: Handshake, peer: Peer, max_frame_bytes: int
    ):
        """Use ``open_rpc_client``."""
        self.peer = peer
        self._framed = framed
        self._handshake = handshake
        self._max_frame_bytes = max_frame_bytes
        self._ids = itertools.count(1)
        self._calls: dict[int, _Call] = {}
        self._closed = False
        self._failure: Callable[[], NodeError] | None = None

    async def call(
        self,
        method: str,
        body: dict[str, Any],
        *,
        timeout_s: float,
        deadline_s: float | None = None,
    ) -> dict[str, Any]:
        """Call ``method`` on the server and wait for its answer.

        Args:
            method: The method name.
            body: A msgpack-encodable map.
            timeout_s: How long to wait for the answer; then nothing more is sent for this
                call and a late answer is dropped.
            deadline_s: The budget sent to the server (default and at most ``timeout_s``).

        Returns:
            The response body.

        Raises:
            RemoteError: The server answered with an error (its UCXL code, message, field).
            PeerUnavailable: No answer in time, or the connection is lost.
            FrameTooLarge: The request exceeds the frame limit (nothing was sent).
            trio.ClosedResourceError: This client was closed.
        """
        if self._closed:
            raise trio.ClosedResourceError("this client is closed")
        if self._failure is not None:
            raise self._failure()
        budget_s = timeout_s if deadline_s is None else min(deadline_s, timeout_s)
        request_id = next(self._ids)
        deadline_ms = max(0, math.ceil(budget_s * 1000))
        request = Request(request_id, method, deadline_ms, body)
        frame = encode(request, max_frame_bytes=self._max_frame_bytes)
        await trio.lowlevel.checkpoint_if_cancelled()  # the scope below shields the send
        pending = self._calls[request_id] = _Call()
        now = trio.current_time()
        call_deadline = now + timeout_s
        try:
            if self._framed.idle:
                # The frame goes out at once (no yield before it does): one scope for the
                # call, shielded and bounded by the send's bound while the frame goes out
                # (a cut frame would break the connection for every call on it), then
                # unshielded with the call's own deadline while the answer comes.
                send_bound = now + self._framed.send_timeout_s
                with trio.CancelScope(shield=True, deadline=send_bound) as scope:
                    await self._framed.send_in_scope(frame, scope)
                    scope.shield = False
                    scope.deadline = call_deadline
                    await pending.wait()
            else:  # it queues: its wait in the queue ends with the call's deadline
                with trio.CancelScope(deadline=call_deadline):
                    await self._framed.send(frame)
                    await pending.wait()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            if self._closed:
                raise trio.ClosedResourceError("this client is closed") from None
            raise PeerUnavailable(f"connection to {self.peer.name} lost") from exc
        finally:
            del self._calls[request_id]
        if pending.outcome is None and self._framed.send_failed:
            raise PeerUnavailable(f"connection to {self.peer.name} lost: a send timed out")
        if pending.outcome is None:
            raise CallTimedOut(f"{method}: no answer from {self.peer.name} in {timeout_s} s")
        if isinstance(pending.outcome, Exception):
            raise pending.outcome
        return pending.outcome

    async def aclose(self) -> None:
        """Close the connection; calls still waiting raise ``trio.ClosedResourceError``."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        self._fail(lambda: trio.ClosedResourceError("this client was closed"))
        await self._framed.aclose(graceful=self._failure is None)

    def _fail(self, error: Callable[[], Exception]) -> None:
        for pending in self._calls.values():
            if not pending.done:
                pending.settle(error())

    def _lost(self, why: str) -> Callable[[], NodeError]:
        return lambda: PeerUnavailable(f"connection to {self.peer.name} lost: {why}")

    async def _read_replies(self) -> None:
        """Route answers to waiting calls until the connection ends; never raises."""
        failure: Callable[[], NodeError]
        try:
            while (msg := await self._framed.receive()) is not None:
                reply = self._handshake.expect_reply(msg)
                if reply.id is None and isinstance(reply, Error):
                    failure = reply.to_exception
                    break
                pending = self._calls.get(reply.id) if reply.id is not None else None
                if pending is None or pending.done:
                    continue  # a late answer to a call that timed out
                pending.settle(reply.body if isinstance(reply, Response) else reply.to_exception())
            else:
                failure = self._lost("closed by the server")
        except ProtocolError as exc:
            failure = self._lost(f"protocol error: {exc.reason}")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            failure = self._lost("connection broken")
        if not self._closed:
            self._failure = self._lost("closed")
            self._fail(failure)
            await trio.aclose_forcefully(self._framed.stream)


async def _connect(
    host: str,
    port: int,
    tls: TlsFiles,
    *,
    node: str | None,
    max_frame_bytes: int,
    send_timeout_s: float,
) -> RpcClient:
    tcp = await trio.open_tcp_stream(host, port)
    stream = trio.SSLStream(tcp, client_ssl_context(tls), server_hostname=host)
    framed = FramedStream(stream, max_frame_bytes=max_frame_bytes, send_timeout_s=send_timeout_s)
    try:
        await stream.do_handshake()
        handshake = Handshake.client(node=node)
        await framed.send(encode(handshake.start()))
        while not handshake.established:
            msg = await framed.receive()
            if msg is None:
                raise trio.BrokenResourceError("closed during the handshake")
            handshake.receive(msg)
        return RpcClient(framed, handshake, _peer_of(stream), max_frame_bytes)
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise


@asynccontextmanager
async def open_rpc_client(
    host: str,
    port: int,
    tls: TlsFiles,
    *,
    node: str | None = None,
    connect_timeout_s: float = 5.0,
    max_frame_bytes: int = MAX_FRAME_BYTES,
    send_timeout_s: float = 10.0,
) -> AsyncIterator[RpcClient]:
    """Connect to the server at ``host:port`` over mutual TLS and say hello.

    Args:
        host: Address to dial; also the name checked against the server certificate's SAN.
        port: TCP port.
        tls: Our CA certificate, certificate, key and CRL.
        node: Our node name when a node dials (must match our certificate), else None.
        connect_timeout_s: Bound on TCP connect, TLS handshake and hello/welcome together.
        max_frame_bytes: Largest frame we send or accept.
        send_timeout_s: Bound on one frame's send.

    Yields:
        The client; it is closed when the block exits.

    Raises:
        PeerUnavailable: Refused, unreachable, timed out, or the server refused our
            certificate (with TLS 1.3 that shows only as a closed connection).
        RemoteError: The server answered the hello with an error (e.g. protocol version).
    """
    try:
        with trio.fail_after(connect_timeout_s):
            client = await _connect(
                host,
                port,
                tls,
                node=node,
                max_frame_bytes=max_frame_bytes,
                send_timeout_s=send_timeout_s,
            )
    except trio.TooSlowError:
        raise PeerUnavailable(f"{host}:{port}: no connection in {connect_timeout_s} s") from None
    except trio.BrokenResourceError as exc:
        # TLS 1.3: the server checks our certificate after our side of the handshake is
        # done, and trio closes without sending the alert, so a refusal looks like this.
        why = f"connection closed in the handshake ({exc.__cause__ or exc or 'EOF'})"
        raise PeerUnavailable(f"{host}:{port}: {why}; was our certificate refused?") from exc
    except (OSError, ProtocolError, CertificateError) as exc:
        raise PeerUnavailable(f"{host}:{port}: cannot connect: {exc}") from exc
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client._read_replies)
            try:
                yield client
            finally:
                await client.aclose()
    except BaseExceptionGroup as group:
        # trio wraps the block's own exception in a group; give it back as it was raised.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
