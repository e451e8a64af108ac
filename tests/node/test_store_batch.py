"""The store batcher: concurrent puts share rep.store frames, each keeps its own outcome."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from node.cluster.answers import MalformedAnswer, StoreAnswer
from node.cluster.store_batch import Item, StoreBatcher, StoreOutcome, split_answer
from node.errors import PeerUnavailable

CTX_A = "ucxl://a:backend_developer@p:t/*^/a"
CTX_B = "ucxl://a:backend_developer@p:t/*^/b"
UPTO = "0000000003e8-000000-purger"


def vid(ms: int, node: str = "n1") -> str:
    return f"{ms:012x}-000000-{node}"


def item(ctx: str, ms: int) -> Item:
    version_id = vid(ms)
    return Item(ctx, version_id, f"{ctx}|{version_id}".encode())


class FakeReplica:
    """A replica behind ``send``: the first frame waits for ``release``; ``refuse`` holds
    version ids it refuses (as purged when ``purged`` is set); ``frames`` what it got."""

    def __init__(self) -> None:
        self.frames: list[list[bytes]] = []
        self.release = trio.Event()
        self.refuse: set[str] = set()
        self.purged = False
        self.broken = False
        self.counts: dict[str, int] = {}

    async def send(self, node: str, blobs: list[bytes]) -> dict[str, Any]:
        self.frames.append(list(blobs))
        if len(self.frames) == 1:
            await self.release.wait()
        if self.broken:
            raise PeerUnavailable(f"{node} is down")
        stored: list[bool | None] = []
        latest: dict[str, str] = {}
        purged: dict[str, str] = {}
        for blob in blobs:
            ctx, version_id = blob.decode().split("|")
            if version_id in self.refuse:
                stored.append(None)
                if self.purged:
                    purged[ctx] = UPTO
                continue
            stored.append(True)
            self.counts[ctx] = self.counts.get(ctx, 0) + 1
            latest[ctx] = max(latest.get(ctx, ""), version_id)
        heads = {ctx: self.counts[ctx] for ctx in latest}
        return {"stored": stored, "heads": heads, "latest": latest, "purged": purged}


async def _collect(
    batcher: StoreBatcher, node: str, items: list[Item], out: dict[str, Any], key: str
) -> None:
    try:
        out[key] = await batcher.store(node, items, 5.0)
    except Exception as exc:
        out[key] = exc


async def test_puts_queued_behind_a_frame_share_the_next_one() -> None:
    """While a frame is in flight, later puts queue and then go as one frame, in order."""
    replica = FakeReplica()
    out: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:
        batcher = StoreBatcher(replica.send, lambda: nursery, max_bytes=1 << 20)
        nursery.start_soon(_collect, batcher, "n2", [item(CTX_A, 1)], out, "first")
        await trio.testing.wait_all_tasks_blocked()
        for number in range(2, 6):
            nursery.start_soon(_collect, batcher, "n2", [item(CTX_B, number)], out, f"p{number}")
            await trio.testing.wait_all_tasks_blocked()  # submission order = id order
        replica.release.set()
    assert [len(frame) for frame in replica.frames] == [1, 4]
    assert replica.frames[1] == [item(CTX_B, n).blob for n in range(2, 6)]  # FIFO
    assert batcher.stats.frames == 2
    assert batcher.stats.puts == 5
    assert batcher.stats.largest_frame == 4
    for number in range(2, 6):
        outcome = out[f"p{number}"]
        assert isinstance(outcome, StoreOutcome)
        assert outcome.stored == (True,)
        # its own rank: the versions stored after it in the same frame are not counted
        assert outcome.heads == {CTX_B: number - 1}
        assert outcome.latest == {CTX_B: vid(5)}


async def test_a_refused_envelope_fails_only_its_own_put() -> None:
    """One put's refused envelope leaves the other puts of the frame stored."""
    replica = FakeReplica()
    replica.refuse = {vid(3)}
    replica.purged = True
    out: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:
        batcher = StoreBatcher(replica.send, lambda: nursery, max_bytes=1 << 20)
        nursery.start_soon(_collect, batcher, "n2", [item(CTX_A, 1)], out, "first")
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(_collect, batcher, "n2", [item(CTX_A, 2)], out, "ok")
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(_collect, batcher, "n2", [item(CTX_B, 3), item(CTX_B, 4)], out, "bad")
        await trio.testing.wait_all_tasks_blocked()
        replica.release.set()
    assert len(replica.frames) == 2
    assert len(replica.frames[1]) == 3
    assert out["ok"].stored == (True,)
    assert out["ok"].purged == {}
    assert out["bad"].stored == (None, True)
    assert out["bad"].purged == {CTX_B: UPTO}


async def test_a_cancelled_waiter_leaves_the_queue_and_the_others_go() -> None:
    """A put that stops waiting before its frame is sent is not sent; the rest are."""
    replica = FakeReplica()
    out: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:
        batcher = StoreBatcher(replica.send, lambda: nursery, max_bytes=1 << 20)
        nursery.start_soon(_collect, batcher, "n2", [item(CTX_A, 1)], out, "first")
        await trio.testing.wait_all_tasks_blocked()
        scope = trio.CancelScope()

        async def doomed() -> None:
            with scope:
                await batcher.store("n2", [item(CTX_A, 2)], 5.0)
            out["doomed"] = "cancelled" if scope.cancelled_caught else "done"

        nursery.start_soon(doomed)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(_collect, batcher, "n2", [item(CTX_A, 3)], out, "kept")
        await trio.testing.wait_all_tasks_blocked()
        scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        replica.release.set()
    assert out["doomed"] == "cancelled"
    assert replica.frames[1] == [item(CTX_A, 3).blob]
    assert out["kept"].stored == (True,)
    assert out["first"].stored == (True,)


async def test_a_failed_frame_fails_every_put_in_it_on_that_replica_only() -> None:
    """A frame that fails as a whole fails its puts for that replica; another replica's
    frames are unaffected."""
    down, up = FakeReplica(), FakeReplica()
    down.broken = True
    down.release.set()
    up.release.set()
    out: dict[str, Any] = {}

    async def send(node: str, blobs: list[bytes]) -> dict[str, Any]:
        return await (down if node == "n2" else up).send(node, blobs)

    async with trio.open_nursery() as nursery:
        batcher = StoreBatcher(send, lambda: nursery, max_bytes=1 << 20)
        for node in ("n2", "n3"):
            nursery.start_soon(_collect, batcher, node, [item(CTX_A, 1)], out, node)
    assert isinstance(out["n2"], PeerUnavailable)
    assert out["n3"].stored == (True,)


async def test_a_put_waits_no_longer_than_its_own_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A put whose frame does not come back in time raises PeerUnavailable."""
    replica = FakeReplica()
    async with trio.open_nursery() as nursery:
        batcher = StoreBatcher(replica.send, lambda: nursery, max_bytes=1 << 20)
        with pytest.raises(PeerUnavailable, match="no answer"):
            await batcher.store("n2", [item(CTX_A, 1)], 1.0)
        with pytest.raises(PeerUnavailable, match="no time"):
            await batcher.store("n2", [item(CTX_A, 2)], 0.0)
        replica.release.set()


async def test_frames_respect_the_byte_budget() -> None:
    """Queued puts beyond the byte budget wait for the frame after."""
    replica = FakeReplica()
    size = len(item(CTX_A, 2).blob)
    async with trio.open_nursery() as nursery:
        batcher = StoreBatcher(replica.send, lambda: nursery, max_bytes=2 * size)
        out: dict[str, Any] = {}
        nursery.start_soon(_collect, batcher, "n2", [item(CTX_A, 1)], out, "first")
        await trio.testing.wait_all_tasks_blocked()
        for number in range(2, 5):
            nursery.start_soon(_collect, batcher, "n2", [item(CTX_A, number)], out, str(number))
            await trio.testing.wait_all_tasks_blocked()
        replica.release.set()
    assert [len(frame) for frame in replica.frames] == [1, 2, 1]


def test_split_answer_gives_each_put_its_flags_and_rank() -> None:
    """Per put: its own flags, and the head count as of its own newest version."""
    puts = [[item(CTX_A, 1), item(CTX_B, 2)], [item(CTX_A, 3)], [item(CTX_A, 4)]]
    answer = StoreAnswer((True, True, None, True), {CTX_A: 7, CTX_B: 2}, {CTX_A: vid(4)})
    first, second, third = split_answer(puts, answer)
    assert first.stored == (True, True)
    assert first.heads == {CTX_A: 6, CTX_B: 2}
    assert second.stored == (None,)
    assert second.heads == {CTX_A: 6}
    assert third.heads == {CTX_A: 7}
    assert first.latest == {CTX_A: vid(4)}


async def test_a_malformed_answer_fails_the_frame() -> None:
    """An answer whose flags do not match the frame is a malformed answer for each put."""

    async def send(node: str, blobs: list[bytes]) -> dict[str, Any]:
        return {"stored": [True] * (len(blobs) + 1), "heads": {}}

    async with trio.open_nursery() as nursery:
        batcher = StoreBatcher(send, lambda: nursery, max_bytes=1 << 20)
        with pytest.raises(MalformedAnswer):
            await batcher.store("n2", [item(CTX_A, 1)], 5.0)
