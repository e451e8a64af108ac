"""Running a node's blocking storage calls in a worker thread, cheaply (a trio shell).

Owns: ``run_sync``, the one way node code hands a blocking call (a synced LevelDB batch, an
index drain) to a thread and waits for its result, and the bound on how many such calls
run at once (``MAX_THREADS``).

Why not ``trio.to_thread.run_sync``: per call it acquires a ``CapacityLimiter`` on behalf
of a placeholder, copies the context, names the OS thread after the calling task (a
``prctl`` and string formatting) and wraps the result twice; on this project's 2-core
machine that was 57 µs of CPU per call with 16 calls in flight and 243 µs one at a time,
against 37 and 42 µs for the bare ``trio.lowlevel.start_thread_soon`` hand-off used here
(3,000 empty calls, process CPU time, load 9). A cluster put makes several
such hand-offs (the coordinator's own durable copy, each replica's ``rep.store`` frame, the
index drains), so they showed up in the profile of a put's CPU (BENCHMARKS.md).

Must not know: what the call does. Invariants, the same as ``trio.to_thread.run_sync``
with ``abandon_on_cancel=False``:
    - a caller already cancelled raises ``Cancelled`` before anything starts;
    - once started, the call is not abandoned: the caller waits for it even when
      cancelled (a synced write is never left running unobserved), and gets its result or
      its exception;
    - at most ``MAX_THREADS`` calls run at once; the others wait their turn (FIFO);
    - the call runs in a worker thread with a fresh context: it must not rely on the
      caller's context variables (none of the storage calls do).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import outcome
import trio

T = TypeVar("T")
MAX_THREADS = 40  # trio's default thread limiter allows the same


class ThreadHop:
    """Hands blocking calls to trio's cached worker threads, at most ``limit`` at once."""

    def __init__(self, limit: int = MAX_THREADS) -> None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, not {limit}")
        self._slots = trio.Semaphore(limit)
        self.calls = 0  # calls handed over so far

    async def run_sync(self, fn: Callable[[], T]) -> T:
        """``fn()`` in a worker thread; its result, or its exception raised here.

        Raises:
            trio.Cancelled: only if the caller was cancelled before ``fn`` started.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._slots.value > 0:  # the common case: no wait, no extra checkpoint
            self._slots.acquire_nowait()
        else:
            await self._slots.acquire()
        try:
            self.calls += 1
            return await _hand_off(fn)
        finally:
            self._slots.release()


async def _hand_off(fn: Callable[[], T]) -> T:
    token = trio.lowlevel.current_trio_token()
    task = trio.lowlevel.current_task()

    def deliver(result: outcome.Outcome[T]) -> None:  # in the worker thread
        token.run_sync_soon(trio.lowlevel.reschedule, task, result)

    trio.lowlevel.start_thread_soon(fn, deliver)

    def abort(_: object) -> trio.lowlevel.Abort:
        return trio.lowlevel.Abort.FAILED  # never abandon a started call

    result: T = await trio.lowlevel.wait_task_rescheduled(abort)
    return result
