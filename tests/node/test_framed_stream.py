"""``FramedStream``'s sends without a lock: concurrent frames arrive whole and in each
sender's order, frames queued during a send go out together after it, a cancelled queued
frame is never sent, and a failed send fails the frames queued behind it."""

from __future__ import annotations

import trio
import trio.testing

from node.rpc.framed import FramedStream
from node.rpc.wire import MAX_FRAME_BYTES, Message, Request, encode


def _frame(sender: int, seq: int) -> bytes:
    return encode(Request(sender * 1000 + seq, "test.frame", 1000, {"pad": b"x" * 300}))


def _framed(stream: trio.abc.Stream) -> FramedStream:
    return FramedStream(stream, max_frame_bytes=MAX_FRAME_BYTES, send_timeout_s=10.0)


async def _receive_all(framed: FramedStream, count: int) -> list[Message]:
    got: list[Message] = []
    while len(got) < count:
        msg = await framed.receive()
        assert msg is not None
        got.append(msg)
    return got


def _ids(messages: list[Message]) -> list[int]:
    return [msg.id for msg in messages if isinstance(msg, Request)]


async def test_concurrent_sends_arrive_whole_and_in_each_senders_order() -> None:
    """16 senders x 5 frames: every frame decodes, each sender's frames keep their order."""
    left, right = trio.testing.memory_stream_pair()
    sender, receiver = _framed(left), _framed(right)

    async def send_five(who: int) -> None:
        for seq in range(5):
            await sender.send(_frame(who, seq))

    async with trio.open_nursery() as nursery:
        for who in range(16):
            nursery.start_soon(send_five, who)
        got = _ids(await _receive_all(receiver, 80))
    assert sorted(got) == sorted(who * 1000 + seq for who in range(16) for seq in range(5))
    for who in range(16):
        mine = [i for i in got if i // 1000 == who]
        assert mine == sorted(mine)


async def test_frames_queued_during_a_send_go_out_together_and_a_cancelled_one_never() -> None:
    """A send in progress (the peer not reading) holds the turn; b is cancelled while
    queued, c and d queue behind it; once the peer reads: a, then c and d in one write."""
    left, right = trio.testing.lockstep_stream_pair()
    writes: list[int] = []
    original = left.send_all

    async def counting_send_all(data: bytes | bytearray | memoryview) -> None:
        writes.append(len(data))
        await original(data)

    left.send_all = counting_send_all  # type: ignore[method-assign]
    sender, receiver = _framed(left), _framed(right)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender.send, _frame(1, 0))
        await trio.testing.wait_all_tasks_blocked()
        b_scope = trio.CancelScope()
        nursery.start_soon(_send_in, sender, _frame(2, 0), b_scope)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(sender.send, _frame(3, 0))
        nursery.start_soon(sender.send, _frame(4, 0))
        await trio.testing.wait_all_tasks_blocked()
        b_scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        got = _ids(await _receive_all(receiver, 3))
    assert got[0] == 1000
    assert sorted(got[1:]) == [3000, 4000]
    assert writes == [len(_frame(1, 0)), 2 * len(_frame(3, 0))]


async def _send_in(framed: FramedStream, frame: bytes, scope: trio.CancelScope) -> None:
    with scope:
        await framed.send(frame)


async def test_a_failed_send_fails_the_frames_queued_behind_it() -> None:
    """The peer closes during a send: that send and the batch queued behind it raise
    ``BrokenResourceError``, and so does every later send."""
    left, right = trio.testing.lockstep_stream_pair()
    sender = _framed(left)
    failures: list[str] = []

    async def send(frame: bytes) -> None:
        try:
            await sender.send(frame)
        except trio.BrokenResourceError:
            failures.append("broken")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send, _frame(1, 0))
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(send, _frame(2, 0))
        await trio.testing.wait_all_tasks_blocked()
        await right.aclose()
    # The first sender and the one that woke to send the queued batch both saw it fail.
    assert failures == ["broken", "broken"]
    try:
        await sender.send(_frame(3, 0))
    except trio.BrokenResourceError:
        failures.append("later")
    assert failures[-1] == "later"
