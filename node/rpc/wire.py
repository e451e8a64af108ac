"""The node wire protocol, version 1: frames, messages and the opening handshake.

Owns: the byte format of every RPC connection (ARCHITECTURE.md §6, wire protocol) and the
rules of its opening exchange. A pure core in the h11 style: bytes in (``FrameDecoder.feed``),
typed messages out; messages in (``Handshake.receive``), messages to send out. No I/O, no
clock, no randomness; ``node.rpc.transport`` and ``node.rpc.memory_transport`` are its shells.

Frame: a 4-byte big-endian unsigned length, then that many bytes of msgpack holding one
map. The length is checked against the receiver's limit (``MAX_FRAME_BYTES`` by default) from
the prefix alone, before any of the body is buffered. Every map has a ``kind``:

===========  ==============================================================  =============
kind         fields                                                          direction
===========  ==============================================================  =============
hello        protocol: int, node: str | nil (a node dialing; nil: a client)  client→server
welcome      protocol: int, node: str (the server's name)                    server→client
request      id: int, method: str, deadline_ms: int, body: map               client→server
response     id: int, body: map                                              server→client
error        id: int | nil, code: str ``UCXL-NNN-NAME``, message: str,       server→client
             field: str | nil
===========  ==============================================================  =============

- ``id``: chosen by the client, 0 <= id < 2**63, unique among its requests in flight on
  the connection; a response or error carries the id of the request it answers. An
  ``error`` with a nil id is about the connection itself and is sent just before closing.
- ``deadline_ms``: the relative time budget the server has for the request (>= 0); the
  server answers ``UCXL-503-UNAVAILABLE`` "deadline exceeded" when it runs out.
- ``method``: 1 to ``MAX_METHOD_LENGTH`` characters; bodies are maps with string keys.
- Keys a message does not define are ignored, so version 1 can gain optional fields. A
  new required field or a changed meaning is a new ``PROTOCOL_VERSION``.

Handshake (one state machine per side, transitions in ``Handshake``): the client's first
frame is ``hello``; the server answers ``welcome`` if it speaks that protocol version and,
when ``hello.node`` is set, the name matches the peer's node certificate. Only then may the
client send requests. Anything else is a ``ProtocolError``, and the connection closes.

Frame limit (``MAX_FRAME_BYTES``, 16 MiB), sized so that every record validation accepts
travels in one frame (asserted by tests/node/test_wire_limits.py, which builds the largest
record): the encrypted part of a record (``storage.record.MAX_SECRET_BYTES`` = 8 MiB, the
envelope's ``MAX_DECOMPRESSED_BYTES``: 4 MiB content + texts, insights, metadata) is stored
zstd-compressed only when that shrinks it, so the payload is <= 8 MiB; age adds 16 bytes per
64 KiB chunk + a header of ~130 bytes per reader role (<= 2.2 KiB + 35 KiB for 256 roles);
the clear header holds at most 2 x 256 labels of 128 characters (UTF-8: <= 512 bytes each,
~264 KiB), 2 x 256 influence addresses of <= 2048 ASCII characters (~1.05 MiB), the address
and writer (<= 2 x 2 KiB); signature and msgpack framing add < 1 KiB. The largest envelope
is thus < 9.5 MiB, a ``ctx.put`` body or ``ctx.get`` answer (the same fields in clear) is
no larger, and 16 MiB leaves > 6 MiB of margin. Several versions travel in batches of at
most ``MAX_BATCH_BYTES`` (``node.cluster.replication.batches_by_bytes``); one envelope
larger than that travels alone, so a frame carrying versions is at most
max(``MAX_BATCH_BYTES``, largest envelope) + framing.

Must not know: sockets, TLS, trio, storage, what methods mean. Invariant: every message a
decoder returns satisfies the table above; malformed input raises ``ProtocolError`` and
never anything else.
"""

from __future__ import annotations

import enum
import re
import threading
from dataclasses import dataclass, fields
from typing import Any, Literal

import msgpack

from node.errors import FrameTooLarge, ProtocolError, RemoteError

PROTOCOL_VERSION = 1
SUPPORTED_PROTOCOLS = frozenset({PROTOCOL_VERSION})
MAX_FRAME_BYTES = 16 * 1024 * 1024
MAX_BATCH_BYTES = (
    4 * 1024 * 1024
)  # versions per rep.store batch, rep.versions page, get_batch answer
MAX_METHOD_LENGTH = 128
MAX_REQUEST_ID = 2**63 - 1
LENGTH_PREFIX_BYTES = 4
PROTOCOL_ERROR_CODE = "UCXL-400-INVALID_PAYLOAD"
_CODE = re.compile(r"UCXL-[0-9]{3}-[A-Z_]+")


def _check_int(value: object, name: str, *, low: int = 0, high: int = MAX_REQUEST_ID) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}]")


def _is_id(value: object) -> bool:
    """Whether ``value`` is an integer in [0, MAX_REQUEST_ID] (the hot path of _check_int)."""
    return type(value) is int and 0 <= value <= MAX_REQUEST_ID


def _check_str(value: object, name: str, *, optional: bool = False) -> None:
    if not (isinstance(value, str) or (optional and value is None)):
        raise ValueError(f"{name} must be a string" + (" or nil" if optional else ""))


_ONLY_STR = frozenset({str})


def _check_body(value: object) -> None:
    # The set of key types, built in C, is {str} (or empty) for every body we send.
    if type(value) is dict and set(map(type, value)) <= _ONLY_STR:
        return
    if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
        raise ValueError("body must be a map with string keys")


@dataclass(frozen=True)
class Hello:
    """The client's first frame: the protocol version it speaks and, for a node, its name."""

    protocol: int
    node: str | None

    def __post_init__(self) -> None:
        _check_int(self.protocol, "protocol")
        _check_str(self.node, "node", optional=True)


@dataclass(frozen=True)
class Welcome:
    """The server accepts the hello: the version in use and the server's name."""

    protocol: int
    node: str

    def __post_init__(self) -> None:
        _check_int(self.protocol, "protocol")
        _check_str(self.node, "node")


@dataclass(frozen=True)
class Request:
    """A call: ``method`` with ``body``, to be answered within ``deadline_ms``."""

    id: int
    method: str
    deadline_ms: int
    body: dict[str, Any]

    def __post_init__(self) -> None:
        if not _is_id(self.id):
            _check_int(self.id, "id")
        _check_str(self.method, "method")
        if not 1 <= len(self.method) <= MAX_METHOD_LENGTH:
            raise ValueError(f"method must be 1 to {MAX_METHOD_LENGTH} characters")
        if not _is_id(self.deadline_ms):
            _check_int(self.deadline_ms, "deadline_ms")
        _check_body(self.body)


@dataclass(frozen=True)
class Response:
    """The successful answer to request ``id``."""

    id: int
    body: dict[str, Any]

    def __post_init__(self) -> None:
        if not _is_id(self.id):
            _check_int(self.id, "id")
        _check_body(self.body)


@dataclass(frozen=True)
class Error:
    """A failed request (``id`` set) or a refused connection (``id`` nil)."""

    id: int | None
    code: str
    message: str
    field: str | None

    def __post_init__(self) -> None:
        if self.id is not None:
            _check_int(self.id, "id")
        _check_str(self.code, "code")
        if not _CODE.fullmatch(self.code):
            raise ValueError("code must look like UCXL-NNN-NAME")
        _check_str(self.message, "message")
        _check_str(self.field, "field", optional=True)

    def to_exception(self) -> RemoteError:
        """The ``RemoteError`` a caller raises for this answer."""
        return RemoteError(self.code, self.message, self.field)


Message = Hello | Welcome | Request | Response | Error
_KINDS: dict[str, type[Message]] = {
    "hello": Hello,
    "welcome": Welcome,
    "request": Request,
    "response": Response,
    "error": Error,
}
_KIND_OF: dict[type[Message], str] = {cls: kind for kind, cls in _KINDS.items()}
_FIELD_NAMES: dict[type[Message], tuple[str, ...]] = {
    cls: tuple(f.name for f in fields(cls)) for cls in _KINDS.values()
}
# One msgpack Packer per thread (a Packer is not thread-safe; building one per frame, as
# msgpack.packb does, costs more than packing a small frame). Same bytes as packb.
_packers = threading.local()


def _pack(raw: dict[str, Any]) -> bytes:
    try:
        packer = _packers.packer
    except AttributeError:
        packer = _packers.packer = msgpack.Packer(use_bin_type=True)
    packed: bytes = packer.pack(raw)
    return packed


def _as_map(msg: Message) -> dict[str, Any]:
    """``msg`` as the map its frame holds: ``kind`` first, then the fields in order."""
    if type(msg) is Request:
        return {
            "kind": "request",
            "id": msg.id,
            "method": msg.method,
            "deadline_ms": msg.deadline_ms,
            "body": msg.body,
        }
    if type(msg) is Response:
        return {"kind": "response", "id": msg.id, "body": msg.body}
    raw: dict[str, Any] = {"kind": _KIND_OF[type(msg)]}
    raw.update((name, getattr(msg, name)) for name in _FIELD_NAMES[type(msg)])
    return raw


def encode(msg: Message, *, max_frame_bytes: int = MAX_FRAME_BYTES) -> bytes:
    """One frame holding ``msg``: length prefix and msgpack map.

    Args:
        msg: The message; its fields were validated when it was built.
        max_frame_bytes: Refuse to produce a frame whose body is larger than this.

    Returns:
        The frame's bytes.

    Raises:
        FrameTooLarge: The encoded body exceeds ``max_frame_bytes``.
        TypeError: A body holds a value msgpack cannot encode (the caller's bug).
    """
    body = _pack(_as_map(msg))
    if len(body) > max_frame_bytes:
        raise FrameTooLarge(len(body), max_frame_bytes)
    return len(body).to_bytes(LENGTH_PREFIX_BYTES, "big") + body


def _refuse_ext(code: int, data: bytes) -> object:
    raise ValueError(f"msgpack extension type {code} is not part of the protocol")


def _decode_body(body: bytes | bytearray) -> Message:
    try:
        raw = msgpack.unpackb(body, raw=False, strict_map_key=True, ext_hook=_refuse_ext)
    except (ValueError, msgpack.UnpackException):
        raise ProtocolError("frame body is not valid msgpack") from None
    if not isinstance(raw, dict):
        raise ProtocolError("frame body is not a map")
    kind = raw.get("kind")
    cls = _KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message kind {str(kind)[:32]!r}")
    names = _FIELD_NAMES[cls]
    try:
        values = [raw[name] for name in names]
    except KeyError:
        missing = [name for name in names if name not in raw]
        raise ProtocolError(f"{kind} lacks {', '.join(missing)}") from None
    try:
        return cls(*values)
    except ValueError as exc:
        raise ProtocolError(f"bad {kind}: {exc}") from None


class FrameDecoder:
    """Incremental frame parser: feed it bytes as they arrive, get whole messages back.

    Buffers at most one frame body (bounded by ``max_frame_bytes``) plus whatever follows
    it in the bytes already fed. After it raises, it stays failed: the stream is unusable,
    and messages completed by the same ``feed`` call before the bad frame are dropped
    with it (the connection closes anyway).
    """

    def __init__(self, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        """Args: max_frame_bytes: the largest frame body accepted."""
        if max_frame_bytes < 1:
            raise ValueError("max_frame_bytes must be positive")
        self.max_frame_bytes = max_frame_bytes
        self._buffer = bytearray()
        self._expected: int | None = None
        self._failed: ProtocolError | None = None

    @property
    def buffered_bytes(self) -> int:
        """Bytes received but not yet returned as messages (0 between frames)."""
        return len(self._buffer) + (LENGTH_PREFIX_BYTES if self._expected is not None else 0)

    def feed(self, data: bytes | bytearray) -> list[Message]:
        """Add received bytes; return the messages they complete, in order.

        Raises:
            FrameTooLarge: A length prefix exceeds ``max_frame_bytes``.
            ProtocolError: A body is not msgpack, not a map, of an unknown kind, or lacks or
                mistypes a field; or the decoder already failed.
        """
        if self._failed is not None:
            raise ProtocolError(f"stream already failed: {self._failed.reason}")
        buffer = self._buffer
        buffer += data
        available = len(buffer)
        offset = 0  # bytes of ``buffer`` consumed; removed once, at the end
        expected = self._expected
        messages: list[Message] = []
        try:
            while True:
                if expected is None:
                    if available - offset < LENGTH_PREFIX_BYTES:
                        break
                    expected = int.from_bytes(buffer[offset : offset + LENGTH_PREFIX_BYTES], "big")
                    if expected > self.max_frame_bytes:
                        raise FrameTooLarge(expected, self.max_frame_bytes)
                    offset += LENGTH_PREFIX_BYTES
                if available - offset < expected:
                    break
                end = offset + expected
                messages.append(_decode_body(buffer[offset:end]))
                offset, expected = end, None
        except ProtocolError as exc:
            self._failed = exc
            self._buffer = bytearray()
            self._expected = None
            raise
        del buffer[:offset]
        self._expected = expected
        return messages


def decode_frame(frame: bytes, *, max_frame_bytes: int = MAX_FRAME_BYTES) -> Message:
    """The one message in ``frame`` (exactly one complete frame, as ``encode`` returns).

    Raises:
        ProtocolError: ``frame`` is not exactly one valid frame.
    """
    decoder = FrameDecoder(max_frame_bytes)
    messages = decoder.feed(frame)
    if len(messages) != 1 or decoder.buffered_bytes:
        raise ProtocolError("expected exactly one complete frame")
    return messages[0]


def connection_error(exc: ProtocolError) -> Error:
    """The ``error`` frame a server sends before closing a connection for ``exc``."""
    return Error(id=None, code=PROTOCOL_ERROR_CODE, message=exc.reason, field="frame")


class HandshakeState(enum.Enum):
    """Where one side of a connection is in the opening exchange."""

    IDLE = "idle"  # client, before start()
    AWAIT_WELCOME = "await-welcome"  # client, hello sent
    AWAIT_HELLO = "await-hello"  # server, nothing received yet
    ESTABLISHED = "established"  # requests may flow
    FAILED = "failed"  # a ProtocolError or RemoteError was raised; close the connection


class Handshake:
    """The opening exchange of one connection, for one side. Transitions:

    ======  =============  ==========================================  ===========
    side    state          input                                        next state
    ======  =============  ==========================================  ===========
    client  IDLE           ``start()`` → hello to send                  AWAIT_WELCOME
    client  AWAIT_WELCOME  welcome with the version sent                ESTABLISHED
    client  AWAIT_WELCOME  error (raises ``RemoteError``)               FAILED
    server  AWAIT_HELLO    hello, supported version, honest node name   ESTABLISHED
                           → welcome to send
    any     any            anything else (raises ``ProtocolError``)     FAILED
    ======  =============  ==========================================  ===========

    Once established, ``expect_request`` (server) and ``expect_reply`` (client) check
    which kinds may flow.
    """

    def __init__(
        self,
        side: Literal["client", "server"],
        *,
        node: str | None,
        peer_name: str | None = None,
        peer_kind: str | None = None,
        supported: frozenset[int] = SUPPORTED_PROTOCOLS,
    ) -> None:
        """Use ``Handshake.client`` or ``Handshake.server``."""
        self.side = side
        self.node = node
        self.peer_name = peer_name
        self.peer_kind = peer_kind
        self.supported = supported
        self.protocol: int | None = None
        self.peer_node: str | None = None
        self.state = HandshakeState.IDLE if side == "client" else HandshakeState.AWAIT_HELLO

    @classmethod
    def client(cls, *, node: str | None = None) -> Handshake:
        """The dialing side; ``node`` is our node name, or None for a client."""
        return cls("client", node=node)

    @classmethod
    def server(
        cls,
        *,
        node: str,
        peer_name: str,
        peer_kind: str,
        supported: frozenset[int] = SUPPORTED_PROTOCOLS,
    ) -> Handshake:
        """The accepting side, told who the peer's (verified) certificate names."""
        return cls(
            "server", node=node, peer_name=peer_name, peer_kind=peer_kind, supported=supported
        )

    @property
    def established(self) -> bool:
        """Whether requests may flow."""
        return self.state is HandshakeState.ESTABLISHED

    def start(self) -> Hello:
        """The client's hello, to send first.

        Raises:
            RuntimeError: Not a client in state IDLE (a bug in the shell).
        """
        if self.side != "client" or self.state is not HandshakeState.IDLE:
            raise RuntimeError(f"start() in state {self.state.value} on the {self.side} side")
        self.state = HandshakeState.AWAIT_WELCOME
        return Hello(protocol=PROTOCOL_VERSION, node=self.node)

    def receive(self, msg: Message) -> Welcome | None:
        """Take one message of the opening exchange.

        Returns:
            The welcome to send (server), or None (client).

        Raises:
            ProtocolError: ``msg`` is not what this state expects.
            RemoteError: The server refused us with an ``error`` (client).
        """
        try:
            return self._step(msg)
        except (ProtocolError, RemoteError):
            self.state = HandshakeState.FAILED
            raise

    def _step(self, msg: Message) -> Welcome | None:
        state = self.state
        if state is HandshakeState.AWAIT_HELLO and isinstance(msg, Hello):
            if msg.protocol not in self.supported:
                raise ProtocolError(f"unsupported protocol version {msg.protocol}")
            if msg.node is not None and (msg.node != self.peer_name or self.peer_kind != "node"):
                raise ProtocolError(f"hello names node {msg.node!r}, the certificate does not")
            self.protocol, self.peer_node = msg.protocol, msg.node
            self.state = HandshakeState.ESTABLISHED
            assert self.node is not None
            return Welcome(protocol=msg.protocol, node=self.node)
        if state is HandshakeState.AWAIT_WELCOME and isinstance(msg, Welcome):
            if msg.protocol != PROTOCOL_VERSION:
                raise ProtocolError(f"welcome for protocol {msg.protocol}, not {PROTOCOL_VERSION}")
            self.protocol, self.peer_node = msg.protocol, msg.node
            self.state = HandshakeState.ESTABLISHED
            return None
        if state is HandshakeState.AWAIT_WELCOME and isinstance(msg, Error):
            raise msg.to_exception()
        raise ProtocolError(f"unexpected {_KIND_OF[type(msg)]} in state {state.value}")

    def expect_request(self, msg: Message) -> Request:
        """A server's check on a message after the handshake: only requests may come.

        Raises:
            ProtocolError: Not established, or ``msg`` is not a request.
        """
        if self.side == "server" and self.established and isinstance(msg, Request):
            return msg
        self.state = HandshakeState.FAILED
        raise ProtocolError(f"unexpected {_KIND_OF[type(msg)]} from a client")

    def expect_reply(self, msg: Message) -> Response | Error:
        """A client's check on a message after the handshake: only answers may come.

        Raises:
            ProtocolError: Not established, or ``msg`` is not a response or error.
        """
        if self.side == "client" and self.established and isinstance(msg, Response | Error):
            return msg
        self.state = HandshakeState.FAILED
        raise ProtocolError(f"unexpected {_KIND_OF[type(msg)]} from a server")
