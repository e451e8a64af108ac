"""ThreadHop: blocking calls in worker threads, with to_thread's cancellation rules."""

from __future__ import annotations

import threading

import pytest
import trio
import trio.testing

from node.cluster.thread_hop import ThreadHop


async def test_returns_the_result_from_another_thread() -> None:
    hop = ThreadHop()
    here = threading.get_ident()
    assert await hop.run_sync(lambda: threading.get_ident()) != here
    assert await hop.run_sync(lambda: 6 * 7) == 42
    assert hop.calls == 2


async def test_raises_the_calls_exception_and_frees_its_slot() -> None:
    hop = ThreadHop(limit=1)

    def fail() -> None:
        raise KeyError("inside")

    for _ in range(2):  # a slot leaked by the first failure would hang the second call
        with pytest.raises(KeyError, match="inside"):
            await hop.run_sync(fail)
    assert await hop.run_sync(lambda: "after") == "after"


async def test_a_cancelled_caller_starts_nothing() -> None:
    hop = ThreadHop()
    ran: list[int] = []
    with trio.CancelScope() as scope:
        scope.cancel()
        await hop.run_sync(lambda: ran.append(1))
    assert scope.cancelled_caught
    assert ran == []
    assert hop.calls == 0


async def test_a_started_call_is_waited_for_even_when_cancelled() -> None:
    """Cancelling the caller mid-call neither abandons the call nor loses its effect."""
    hop = ThreadHop()
    started, release = threading.Event(), threading.Event()
    done: list[str] = []
    returned: list[bool] = []

    def slow() -> None:
        started.set()
        release.wait()
        done.append("written")

    async def caller(scope: trio.CancelScope) -> None:
        with scope:
            await hop.run_sync(slow)  # returns its result: as to_thread, no Cancelled here
            returned.append(True)
            await trio.lowlevel.checkpoint()  # the cancellation lands at the next checkpoint

    scope = trio.CancelScope()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(caller, scope)
        await trio.to_thread.run_sync(started.wait)
        scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert done == []  # still waiting for the call, not abandoned
        release.set()
    assert done == ["written"]
    assert returned == [True]
    assert scope.cancelled_caught


async def test_at_most_limit_calls_run_at_once() -> None:
    hop = ThreadHop(limit=2)
    release, entered = threading.Event(), threading.Semaphore(0)
    lock = threading.Lock()
    running, most = [0], [0]

    def call() -> None:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        entered.release()
        release.wait()
        with lock:
            running[0] -= 1

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(hop.run_sync, call)
        for _ in range(2):  # both admitted calls are inside ``call`` now
            await trio.to_thread.run_sync(entered.acquire)
        await trio.testing.wait_all_tasks_blocked()
        assert hop.calls == 2  # three wait for a slot
        assert most[0] == 2
        release.set()
    assert most[0] == 2
    assert hop.calls == 5


def test_a_limit_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="limit"):
        ThreadHop(limit=0)
