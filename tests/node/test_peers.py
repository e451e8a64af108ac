"""PeerPool: a slow answer keeps the connection; a lost one, or silence, drops it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from node.errors import CallTimedOut, PeerUnavailable
from node.rpc.peers import MAX_TIMEOUTS_IN_A_ROW, PeerPool


class FakeClient:
    """Answers ``ok``, or fails as its script says, one entry per call."""

    def __init__(self, script: list[str]) -> None:
        self.script = script

    async def call(self, method: str, body: dict[str, Any], *, timeout_s: float) -> dict[str, Any]:
        await trio.lowlevel.checkpoint()
        step = self.script.pop(0) if self.script else "ok"
        if step == "slow":
            raise CallTimedOut(f"{method}: no answer in {timeout_s} s")
        if step == "lost":
            raise trio.BrokenResourceError("reset")
        return {"ok": True}


async def run_pool(script: list[str], calls: int) -> tuple[int, list[tuple[str, bool]], list[str]]:
    """Make ``calls`` calls; (connections opened, liveness reports, outcomes)."""
    opened = 0
    reports: list[tuple[str, bool]] = []
    outcomes: list[str] = []

    @asynccontextmanager
    async def connect(name: str) -> AsyncIterator[FakeClient]:
        nonlocal opened
        opened += 1
        yield FakeClient(script)

    pool = PeerPool(connect, on_result=lambda name, up: reports.append((name, up)))  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        for _ in range(calls):
            try:
                await pool.call("peer", "rep.ping", {}, timeout_s=1)
                outcomes.append("ok")
            except CallTimedOut:
                outcomes.append("slow")
            except PeerUnavailable:
                outcomes.append("lost")
        nursery.cancel_scope.cancel()
    return opened, reports, outcomes


@pytest.mark.trio
async def test_one_slow_answer_keeps_the_connection_and_reports_nothing() -> None:
    opened, reports, outcomes = await run_pool(["slow"], 2)
    assert outcomes == ["slow", "ok"]
    assert opened == 1
    assert reports == [("peer", True)]


@pytest.mark.trio
async def test_silence_in_a_row_drops_the_connection_and_reports_down() -> None:
    opened, reports, outcomes = await run_pool(["slow"] * MAX_TIMEOUTS_IN_A_ROW, 4)
    assert outcomes == ["slow"] * MAX_TIMEOUTS_IN_A_ROW + ["ok"]
    assert opened == 2
    assert reports == [("peer", False), ("peer", True)]


@pytest.mark.trio
async def test_an_answer_resets_the_count_of_silent_calls() -> None:
    script = (
        ["slow"] * (MAX_TIMEOUTS_IN_A_ROW - 1) + ["ok"] + ["slow"] * (MAX_TIMEOUTS_IN_A_ROW - 1)
    )
    opened, reports, _ = await run_pool(script, len(script))
    assert opened == 1
    assert ("peer", False) not in reports


@pytest.mark.trio
async def test_a_lost_connection_is_dropped_at_once() -> None:
    opened, reports, outcomes = await run_pool(["lost"], 2)
    assert outcomes == ["lost", "ok"]
    assert opened == 2
    assert reports == [("peer", False), ("peer", True)]


async def one_race() -> list[str]:
    """Two callers race on a fresh pool whose first call loses the connection."""

    @asynccontextmanager
    async def connect(name: str) -> AsyncIterator[FakeClient]:
        yield FakeClient(["lost"])

    pool = PeerPool(connect)  # type: ignore[arg-type]
    outcomes: list[str] = []

    async def caller() -> None:
        try:
            await pool.call("peer", "rep.ping", {}, timeout_s=1)
            outcomes.append("ok")
        except PeerUnavailable:
            outcomes.append("lost")

    async def eager() -> None:
        while "peer" not in pool._clients:
            await trio.lowlevel.checkpoint()
        await caller()

    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        async with trio.open_nursery() as callers:
            callers.start_soon(eager)
            callers.start_soon(caller)
        nursery.cancel_scope.cancel()
    return outcomes


@pytest.mark.trio
async def test_a_connection_dropped_as_it_opens_fails_no_caller_with_a_key_error() -> None:
    """Caller A opens the connection; before A runs again, caller B uses it, loses it and
    drops it. A used to look the client up by name then (KeyError, out of a node's task).
    The race depends on trio's scheduling order, so it is tried many times."""
    for _ in range(30):
        assert sorted(await one_race()) == ["lost", "ok"]
