"""The node's small HTTP/1.1 endpoint (ARCHITECTURE.md §7): health and Prometheus metrics.

Owns: ``HealthServer``, a trio service answering

- ``GET /health``: ``{"live": true, "ready": <bool>, "checks": {...}}``, 200 when ready,
  else 503 (``health_fn`` decides; if it raises, 500 and the error is logged);
- ``GET /health/live``: 200 ``{"live": true}`` while the server runs;
- ``GET /metrics``: the node's metrics, ``text/plain; version=0.0.4``;

``HEAD`` works like ``GET`` without the body; other methods get 405, other paths 404.
One request per connection (``Connection: close``); a request body is never read.

Must not know: what the health checks mean, storage, the cluster. Invariants (a port that
anyone may probe): the request line and headers are read within ``head_timeout_s`` and
``max_head_bytes`` (else 408 / 431), a response is sent within ``send_timeout_s``, at most
``max_connections`` are handled at once (more get 503), and nothing a client sends can
stop the server: malformed requests get 400 and the connection is closed.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import trio
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from node.daemon.config import ListenConfig
from node.daemon.metrics import NodeMetrics

logger = logging.getLogger(__name__)

HealthFn = Callable[[], tuple[bool, Mapping[str, object]]]
JSON_CONTENT_TYPE = "application/json"
_END_OF_HEAD = re.compile(rb"\r?\n\r?\n")
_REQUEST_LINE = re.compile(r"^([A-Z]{1,16}) (/[\x21-\x7e]*) HTTP/1\.[01]$")
_HEADER = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+:[\t\x20-\x7e]*$")
_DRAIN_BYTES = 64 * 1024
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


@dataclass(frozen=True)
class HttpLimits:
    """What one client may cost the server (defaults suit a health/metrics port)."""

    max_head_bytes: int = 8 * 1024
    head_timeout_s: float = 5.0
    send_timeout_s: float = 5.0
    max_connections: int = 64


@dataclass(frozen=True)
class HttpStatistics:
    """A snapshot of the server: connections being handled now."""

    connections_active: int


@dataclass(frozen=True)
class _Response:
    status: int
    body: bytes
    content_type: str = JSON_CONTENT_TYPE
    extra_headers: tuple[tuple[str, str], ...] = ()


class _BadRequest(Exception):
    """The client sent something that is not a request we accept (its fault)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


class HealthServer:
    """Serves ``/health``, ``/health/live`` and ``/metrics`` for one node.

    Args:
        config: Where to listen (the node's ``[http]`` table); port 0 picks a free port.
        health_fn: Returns ``(ready, checks)``; called on every ``/health`` request, so it
            must be quick and must not block. Values in ``checks`` that JSON cannot hold are
            shown with ``str``.
        metrics: The node's metrics, rendered on every ``/metrics`` request.
        limits: Per-connection limits (default ``HttpLimits()``).

    Attributes:
        port: The bound port once ``run`` has started (``None`` before).
    """

    def __init__(
        self,
        config: ListenConfig,
        health_fn: HealthFn,
        metrics: NodeMetrics,
        limits: HttpLimits | None = None,
    ) -> None:
        self._config = config
        self._health_fn = health_fn
        self._metrics = metrics
        self._limits = limits or HttpLimits()
        self._slots = trio.CapacityLimiter(self._limits.max_connections)
        self.port: int | None = None

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen, report the bound port through ``task_status``, serve until cancelled."""
        listeners = await trio.open_tcp_listeners(self._config.port, host=self._config.host)
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)

    def statistics(self) -> HttpStatistics:
        """Connections being handled now (at most ``limits.max_connections``)."""
        return HttpStatistics(connections_active=int(self._slots.borrowed_tokens))

    async def _handle(self, stream: trio.SocketStream) -> None:
        """One connection: read a request head, answer, close. Never raises."""
        async with stream:
            try:
                self._slots.acquire_nowait()
            except trio.WouldBlock:
                await self._send(stream, _error(503, "too many connections"), head_only=False)
                return
            try:
                response, head_only = await self._answer(stream)
                if response is not None:
                    await self._send(stream, response, head_only)
            except trio.BrokenResourceError:
                pass  # the client went away; nothing to answer
            finally:
                self._slots.release()

    async def _answer(self, stream: trio.SocketStream) -> tuple[_Response | None, bool]:
        """The response to the request on ``stream`` (None: the client sent nothing)."""
        with trio.move_on_after(self._limits.head_timeout_s):
            try:
                head = await _read_head(stream, self._limits.max_head_bytes)
                if head is None:
                    return None, False
                method, path = _parse_head(head)
            except _BadRequest as exc:
                logger.debug("bad HTTP request: %s", exc)
                return _error(exc.status, str(exc)), False
            return self._route(method, path), method == "HEAD"
        return _error(408, "request head not received in time"), False

    def _route(self, method: str, path: str) -> _Response:
        routes = {
            "/health": self._health,
            "/health/live": lambda: _json(200, {"live": True}),
            "/metrics": self._render_metrics,
        }
        if path not in routes:
            return _error(404, "not found")
        if method not in ("GET", "HEAD"):
            return _Response(
                405, b'{"error": "use GET"}\n', extra_headers=(("Allow", "GET, HEAD"),)
            )
        try:
            return routes[path]()
        except Exception:  # a bug in a health check must not take the endpoint down
            logger.exception("HTTP %s failed", path)
            return _json(500, {"live": True, "ready": False, "error": "internal error"})

    def _health(self) -> _Response:
        ready, checks = self._health_fn()
        body = {"live": True, "ready": bool(ready), "checks": dict(checks)}
        return _json(200 if ready else 503, body)

    def _render_metrics(self) -> _Response:
        return _Response(200, self._metrics.render(), content_type=CONTENT_TYPE_PLAIN_0_0_4)

    async def _send(self, stream: trio.SocketStream, response: _Response, head_only: bool) -> None:
        """Send ``response``, then half-close and drain, so the client reads it before FIN."""
        head = [
            f"HTTP/1.1 {response.status} {_REASONS[response.status]}",
            f"Content-Type: {response.content_type}",
            f"Content-Length: {len(response.body)}",
            "Cache-Control: no-store",
            "Connection: close",
            *(f"{name}: {value}" for name, value in response.extra_headers),
        ]
        data = ("\r\n".join(head) + "\r\n\r\n").encode("ascii")
        with trio.move_on_after(self._limits.send_timeout_s):
            try:
                await stream.send_all(data if head_only else data + response.body)
                await stream.send_eof()
                drained = 0
                while drained < _DRAIN_BYTES and (chunk := await stream.receive_some(4096)):
                    drained += len(chunk)
            except trio.BrokenResourceError:
                return


async def _read_head(stream: trio.SocketStream, limit: int) -> bytes | None:
    """The request line and headers (None if the client closed before sending any).

    Raises:
        _BadRequest: 431 past ``limit`` bytes, 400 if the client closed mid-head.
    """
    buffer = bytearray()
    while (end := _END_OF_HEAD.search(buffer)) is None:
        if len(buffer) > limit:
            raise _BadRequest(431, f"request head exceeds {limit} bytes")
        chunk = await stream.receive_some(limit + 4 - len(buffer) + 1)
        if not chunk:
            if buffer:
                raise _BadRequest(400, "connection closed inside the request head")
            return None
        buffer += chunk
    if end.start() > limit:
        raise _BadRequest(431, f"request head exceeds {limit} bytes")
    return bytes(buffer[: end.start()])


def _parse_head(head: bytes) -> tuple[str, str]:
    """``(method, path)`` of a request head; the query string is ignored.

    Raises:
        _BadRequest: 400 for anything that is not ASCII HTTP/1.x with well-formed headers.
    """
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        raise _BadRequest(400, "request head is not ASCII") from None
    request_line, *headers = [line.removesuffix("\r") for line in text.split("\n")]
    match = _REQUEST_LINE.match(request_line)
    if match is None:
        raise _BadRequest(400, "malformed request line")
    if not all(_HEADER.match(header) for header in headers):
        raise _BadRequest(400, "malformed header line")
    method, target = match.groups()
    return method, target.split("?", 1)[0]


def _json(status: int, body: Mapping[str, object]) -> _Response:
    return _Response(status, (json.dumps(body, default=str) + "\n").encode("utf-8"))


def _error(status: int, message: str) -> _Response:
    return _json(status, {"error": message})
