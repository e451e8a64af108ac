"""Cluster membership as the node service sees it, and failure detection on the RPC channel.

``StaticCluster`` is a fixed member list with up/down state (the simulation tier, tests,
and the daemon before discovery has found anyone); ``FailureDetector`` is the trio shell
that pings members and marks them up or down. Call outcomes of ordinary requests feed the
same state (``PeerPool(on_result=cluster.mark)``), so a dead peer is noticed at once.

A lost or refused connection is a dead peer: one such ping marks it down. A ping that only
timed out is suspicion, not proof (a node streaming a rebalance or re-sealing on a busy
machine can miss one deadline and answer the next): the detector marks a peer down after
``suspect_after`` timed-out pings in a row. Marking a busy peer down fails writes that need
it (a write during a layout change needs W in the new owner list too), which is how 2 of
1,501 writes failed during the 100,000-context join (docs/cluster.md).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Literal, Protocol

import trio

from node.errors import CallTimedOut, PeerUnavailable, RemoteError

log = logging.getLogger(__name__)


class StaticCluster:
    """A member list with up/down state; every member starts up."""

    def __init__(self, name: str, members: Iterable[str]) -> None:
        self.name = name
        self._members = sorted(set(members) | {name})
        self._down: set[str] = set()
        self.on_up: list[Callable[[str], None]] = []  # called when a down member is back

    def member_names(self) -> Sequence[str]:
        """Every member, this node included."""
        return tuple(self._members)

    def set_members(self, members: Iterable[str]) -> None:
        """Replace the member list (discovery found or lost nodes)."""
        self._members = sorted(set(members) | {self.name})
        self._down &= set(self._members)

    def is_up(self, name: str) -> bool:
        """Whether ``name`` is believed up (this node always is)."""
        return name == self.name or (name in self._members and name not in self._down)

    def mark(self, name: str, up: bool) -> None:
        """Record the outcome of talking to ``name``."""
        if name == self.name:
            return
        if up:
            if name in self._down:
                log.info("%s: %s is up", self.name, name)
                self._down.discard(name)
                for listener in self.on_up:
                    listener(name)
        elif name not in self._down:
            log.info("%s: %s is down", self.name, name)
            self._down.add(name)


class Pinger(Protocol):
    """What the failure detector needs to reach a peer."""

    async def call(
        self, name: str, method: str, body: dict[str, object], *, timeout_s: float
    ) -> dict[str, object]:
        """Call a peer."""
        ...


SUSPECT_AFTER = 2  # timed-out pings in a row before a peer is marked down
PingOutcome = Literal["answered", "timed_out", "lost"]


class FailureDetector:
    """Pings every other member every ``interval_s``; outcomes mark them up or down (a
    timed-out ping only after ``suspect_after`` in a row: module docstring)."""

    def __init__(
        self,
        cluster: StaticCluster,
        pinger: Pinger,
        *,
        interval_s: float,
        timeout_s: float,
        suspect_after: int = SUSPECT_AFTER,
    ) -> None:
        if suspect_after < 1:
            raise ValueError(f"suspect_after must be >= 1, not {suspect_after}")
        self.cluster = cluster
        self.pinger = pinger
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.suspect_after = suspect_after
        self._missed: dict[str, int] = {}  # peer -> timed-out pings in a row

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Probe forever."""
        task_status.started()
        while True:
            async with trio.open_nursery() as nursery:
                for name in self.cluster.member_names():
                    if name != self.cluster.name:
                        nursery.start_soon(self._probe, name)
            await trio.sleep(self.interval_s)

    async def _probe(self, name: str) -> None:
        outcome: PingOutcome = "answered"
        try:
            await self.pinger.call(name, "rep.ping", {}, timeout_s=self.timeout_s)
        except CallTimedOut:
            outcome = "timed_out"
        except (PeerUnavailable, RemoteError):
            outcome = "lost"
        missed, up = ping_verdict(self._missed.get(name, 0), outcome, self.suspect_after)
        self._missed[name] = missed
        if up is None:
            log.info("%s: %s missed a ping (%d in a row)", self.cluster.name, name, missed)
        else:
            self.cluster.mark(name, up)


def ping_verdict(missed: int, outcome: PingOutcome, suspect_after: int) -> tuple[int, bool | None]:
    """The failure detector's rule (pure): from the timed-out pings in a row before this
    one and this ping's outcome, the new count and the verdict (True up, False down, None
    no change yet: a timeout short of ``suspect_after`` in a row)."""
    if outcome == "answered":
        return 0, True
    if outcome == "lost":
        return 0, False
    missed += 1
    return missed, (False if missed >= suspect_after else None)
