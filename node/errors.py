"""Errors of the node layer: the wire protocol, the RPC transport and talking to peers.

Owns: the ``NodeError`` hierarchy. Each subclass says whose fault it is:

- ``ProtocolError``: the other side broke the wire protocol (``node.rpc.wire``); the
  connection that carried it is closed. ``FrameTooLarge`` is the oversized-frame case.
- ``RemoteError``: the peer understood the request and answered with an error; it carries
  the peer's UCXL code (shared/UCXL.md), message and field.
- ``PeerUnavailable``: no answer: the peer could not be reached, refused the connection
  (TLS), timed out, or the connection was lost. Whether the request ran is unknown.

Must not know: sockets, trio, storage. Invariant: messages name what went wrong, never
payloads, secrets or stored values.
"""

from __future__ import annotations


class NodeError(Exception):
    """Base of every error the node layer raises on purpose."""


class ProtocolError(NodeError):
    """The peer broke the wire protocol; ``reason`` says how, in one sentence."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class FrameTooLarge(ProtocolError):
    """A frame's length prefix (or an outgoing frame) exceeds the frame limit."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"frame of {size} bytes exceeds the limit of {limit} bytes")
        self.size = size
        self.limit = limit


class RemoteError(NodeError):
    """The peer answered with an error.

    Attributes:
        code: The peer's UCXL code, e.g. ``UCXL-404-NOT_FOUND``.
        message: The peer's sentence naming what is wrong.
        field: The offending field, or None.
    """

    def __init__(self, code: str, message: str, field: str | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.field = field

    @property
    def status(self) -> int:
        """The HTTP-style status number embedded in the code (500 if unreadable)."""
        try:
            return int(self.code.split("-")[1])
        except (IndexError, ValueError):
            return 500


class PeerUnavailable(NodeError):
    """No answer from the peer: unreachable, refused, timed out or connection lost."""


class CallTimedOut(PeerUnavailable):
    """No answer to one call in time: the peer may be slow rather than gone, so the
    connection is kept (``node.rpc.peers.PeerPool``) and other calls on it go on."""
