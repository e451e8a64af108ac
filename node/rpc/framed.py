"""Whole frames over one trio stream: serialized, bounded sends and decoded receives.

Owns: ``FramedStream``, the one place a connection's bytes are written and read, for the
TLS transport (``node.rpc.transport``) on both sides.

Sends: one at a time per stream, without a lock. A send that finds the stream idle goes
out at once; sends that arrive meanwhile queue into one batch, which the first of their
callers to wake sends as one ``send_all`` when the send before it ends (one TLS record and
one syscall for many small frames; the bytes on the wire are the frames, unchanged, in queue
order). A frame whose caller is cancelled while it is queued is withdrawn. A send in
progress is not cancellable (a cancelled ``SSLStream.send_all`` breaks the stream): ``send``
shields it under a scope of its own bounded by ``send_timeout_s``; ``send_in_scope`` leaves
that to the caller's own scope (a scope costs as much as the rest of a small send). A send
cut by its bound closes the stream, and every later send fails.

Must not know: messages' meaning, requests, deadlines of calls, TLS. Invariants: frames are
sent whole and in the order their sends were queued; a frame is sent at most once, and not
at all if its caller was cancelled before its turn; after a failed send nothing more is
sent.
"""

from __future__ import annotations

from collections import deque
from contextlib import suppress

import trio

from node.rpc.wire import FrameDecoder, Message

RECEIVE_CHUNK_BYTES = 64 * 1024
CLOSE_TIMEOUT_S = 1.0


class _Batch:
    """Frames queued while another send is in progress; they go out together, next."""

    __slots__ = ("claimed", "frames", "turn")

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.turn = trio.Event()  # set when the send before this batch ended
        self.claimed = False  # one of its senders took it and sends it


class FramedStream:
    """Whole frames over one trio stream: serialized, bounded sends (batched as the module
    docstring says); decoded receives."""

    def __init__(self, stream: trio.abc.Stream, *, max_frame_bytes: int, send_timeout_s: float):
        """Args: the stream, the receive limit and the bound on one send."""
        self.stream = stream
        self._decoder = FrameDecoder(max_frame_bytes)
        self._received: deque[Message] = deque()
        self._send_timeout_s = send_timeout_s
        self._busy = False  # a send_all is in progress (or a woken batch is about to start)
        self._queued: _Batch | None = None  # frames waiting for the send in progress
        self._send_error: type[trio.BrokenResourceError | trio.ClosedResourceError] | None = None

    @property
    def send_timeout_s(self) -> float:
        """The bound on one send."""
        return self._send_timeout_s

    async def send(self, frame: bytes, *, timeout_s: float | None = None) -> None:
        """Send one frame whole; waiting for our turn is cancellable, the send is not.

        A frame queued behind a send in progress is withdrawn if its caller is cancelled
        before its batch's turn; once its batch is taken, it is sent whole (and the call
        returns as soon as it is taken unless its caller is the one sending the batch).

        Raises:
            trio.BrokenResourceError: The peer is gone, or a send timed out (the stream is
                then closed: a partly sent frame cannot be taken back).
            trio.ClosedResourceError: We closed the stream.
        """
        await self._send(frame, timeout_s, None)

    @property
    def idle(self) -> bool:
        """Whether a send now would go out at once (no send in progress to queue behind)."""
        return not self._busy

    async def send_in_scope(self, frame: bytes, scope: trio.CancelScope) -> None:
        """``send`` without a cancel scope of its own: the caller's ``scope`` (the innermost,
        already entered) bounds the send with its deadline, and shields it if it must be.

        A scope costs as much as the rest of a small send. When the send is cut, the stream
        is closed (a partly sent frame cannot be taken back) and ``Cancelled`` propagates;
        a frame still queued is withdrawn instead. Raises as ``send``.
        """
        if not self._busy:  # the usual case, inline: one coroutine layer less per send
            self._busy = True
            await self._send_now(frame, None, scoped=False)
        else:
            await self._send(frame, None, scope)

    async def _send(
        self, frame: bytes, timeout_s: float | None, scope: trio.CancelScope | None
    ) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        if not self._busy:
            self._busy = True
            await self._send_now(frame, timeout_s, scoped=scope is None)
            return
        batch = self._queued
        if batch is None:
            batch = self._queued = _Batch()
        batch.frames.append(frame)
        try:
            await batch.turn.wait()
        except trio.Cancelled:
            _withdraw(batch.frames, frame)
            if self._queued is batch:  # not its turn yet: nothing of ours was sent
                if not batch.frames:
                    self._queued = None
            elif not batch.claimed:  # its turn came as we were cancelled: send the rest
                batch.claimed = True
                with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await self._send_now(b"".join(batch.frames), timeout_s, scoped=True)
            raise
        if not batch.claimed:
            batch.claimed = True
            # A scope already cancelled (woken just as its deadline passed) cannot bound
            # the send: it would cut it at its first checkpoint. Send under our own.
            scoped = scope is None or scope.cancel_called
            await self._send_now(b"".join(batch.frames), timeout_s, scoped=scoped)
        elif self._send_error is not None:
            raise self._send_error("the connection failed while this frame was queued")

    @property
    def send_failed(self) -> bool:
        """Whether a send failed (the stream is then unusable for sending)."""
        return self._send_error is not None

    async def _send_now(self, data: bytes, timeout_s: float | None, *, scoped: bool) -> None:
        """Send ``data`` (``_busy`` is set), then hand the turn to the queued batch."""
        try:
            if self._send_error is not None:
                raise self._send_error("the connection failed while this frame was queued")
            if not data:
                return
            if not scoped:
                try:
                    await self.stream.send_all(data)
                except trio.Cancelled:
                    self._send_error = trio.BrokenResourceError
                    await trio.aclose_forcefully(self.stream)
                    raise
                return
            deadline = trio.current_time() + (timeout_s or self._send_timeout_s)
            with trio.CancelScope(shield=True, deadline=deadline) as scope:
                await self.stream.send_all(data)
            if scope.cancelled_caught:
                await trio.aclose_forcefully(self.stream)
                raise trio.BrokenResourceError("send timed out; connection closed")
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._send_error = type(exc)
            raise
        finally:
            following = self._queued
            if following is None:
                self._busy = False
            else:  # stay busy: the first of that batch's senders to wake sends it
                self._queued = None
                following.turn.set()

    async def receive(self) -> Message | None:
        """The next message, or None when the peer closed the stream.

        Raises:
            ProtocolError: The peer sent a bad frame (``FrameTooLarge`` for an oversized one).
            trio.BrokenResourceError: The connection broke (including TLS errors).
            trio.ClosedResourceError: We closed the stream.
        """
        while not self._received:
            data = await self.stream.receive_some(RECEIVE_CHUNK_BYTES)
            if not data:
                return None
            self._received.extend(self._decoder.feed(data))
        return self._received.popleft()

    async def aclose(self, *, graceful: bool) -> None:
        """Close; ``graceful`` sends TLS close_notify (only after a completed handshake)."""
        if graceful:
            # Another task may force the stream closed meanwhile (the peer hung up).
            with (
                trio.move_on_after(CLOSE_TIMEOUT_S),
                suppress(trio.BrokenResourceError, trio.ClosedResourceError),
            ):
                await self.stream.aclose()
        await trio.aclose_forcefully(self.stream)


def _withdraw(frames: list[bytes], frame: bytes) -> None:
    """Remove ``frame`` (the object itself) from ``frames`` if it is there."""
    for index, queued in enumerate(frames):
        if queued is frame:
            del frames[index]
            return
