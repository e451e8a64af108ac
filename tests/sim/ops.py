"""The client side and the nemesis of a simulation: carries out one schedule step at a time.

Owns: turning ``tests.sim.schedule`` steps into client calls (in the background, recorded
in the engine's ``History`` with start and end ticks) and into faults on the network,
the disks and the nodes (killing the leader and restarting it later; fenced orders, through
``tests.sim.control_parts``); and the final quorum reads through every node after the quiet
period. The simulated client holds the admin role.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any

import trio

from node.errors import PeerUnavailable, RemoteError
from tests.sim import model
from tests.sim.schedule import (
    Block,
    Crash,
    CrashMidWrite,
    DiskFail,
    Faults,
    FencedOrder,
    Get,
    Heal,
    KillLeader,
    Partition,
    Purge,
    Put,
    Restart,
    Sleep,
    Step,
)

if TYPE_CHECKING:
    from tests.sim.engine import Simulation

CLIENT_TIMEOUT_S = 3.0
NOT_FOUND = "UCXL-404-NOT_FOUND"


class ClientOps:
    """Runs steps against a ``Simulation``."""

    def __init__(self, sim: Simulation) -> None:
        self.sim = sim
        self.history: model.History = sim.history
        self._writes = itertools.count(1)
        self._restarts: list[tuple[float, str]] = []  # (when, node) of killed leaders

    async def _due_restarts(self) -> None:
        """Restart the killed leaders whose time has come (the quiet period restarts the
        rest)."""
        now = trio.current_time()
        for when, name in [r for r in self._restarts if r[0] <= now]:
            self._restarts.remove((when, name))
            await self.sim.start(name)

    async def step(self, clients: trio.Nursery, step: Step) -> None:
        """Carry out ``step``: client operations start in ``clients`` and run on."""
        sim, net = self.sim, self.sim.network
        await self._due_restarts()
        match step:
            case Put(node, ctx):
                clients.start_soon(self.put, node, ctx)
            case Get(node, ctx):
                clients.start_soon(self.get, node, ctx)
            case Purge(node, ctx):
                clients.start_soon(self.purge, node, ctx)
            case CrashMidWrite(node, ctx, sends):
                if sim.nodes[node].running:
                    sim.nodes[node].crash_after_sends = sends
                    clients.start_soon(self.put, node, ctx)
            case Crash(node):
                await sim.crash(node)
            case Restart(node):
                sim.nodes[node].crash_after_sends = None
                await sim.start(node)
            case Block(src, dst):
                net.block(src, dst)
            case Partition(side):
                net.partition(side, [n for n in sim.names if n not in side])
            case Heal():
                net.heal()
            case Faults(drop, duplicate, max_delay_s):
                net.drop, net.duplicate, net.max_delay_s = drop, duplicate, max_delay_s
            case DiskFail(node, failing):
                sim.nodes[node].disk_failing = failing
            case Sleep(seconds):
                await trio.sleep(seconds)
            case KillLeader(after_s):
                killed = await sim.control.kill_leader()
                if killed is not None:
                    self._restarts.append((trio.current_time() + after_s, killed))
            case FencedOrder(node):
                clients.start_soon(sim.control.fenced_step, node)
        await trio.lowlevel.checkpoint()

    async def call(self, node: str, method: str, body: dict[str, Any]) -> dict[str, Any]:
        """One client request to ``node``."""
        async with self.sim.network.open_client("client", node) as client:
            return await client.call(method, body, timeout_s=CLIENT_TIMEOUT_S)

    async def put(self, node: str, ctx: int) -> None:
        """Write a new version with a unique summary; record whether it was acknowledged."""
        from tests.sim.engine import address

        record = model.PutRecord(ctx, f"w{next(self._writes)}", self.history.now())
        self.history.puts.append(record)
        body = {"address": address(ctx), "record": {"summary": record.summary}}
        try:
            answer = await self.call(node, "ctx.put", body)
        except (RemoteError, PeerUnavailable) as exc:
            record.error = type(exc).__name__ if isinstance(exc, PeerUnavailable) else exc.code
            return  # end stays None: the write may or may not have happened
        record.end = self.history.now()
        record.version_id = str(answer["ref"]["version_id"])

    async def get(self, node: str, ctx: int) -> None:
        """Read the latest version; record what came back."""
        from tests.sim.engine import address

        start = self.history.now()
        try:
            answer = await self.call(node, "ctx.get", {"address": address(ctx)})
        except (RemoteError, PeerUnavailable):
            return
        version = answer["version"]
        self.history.reads.append(
            model.ReadRecord(
                ctx, node, start, self.history.now(),
                str(version["fields"].get("summary")), str(version["version_id"]),
            )
        )  # fmt: skip

    async def purge(self, node: str, ctx: int) -> None:
        """Purge the context; record when it finished and whether it was acknowledged."""
        from tests.sim.engine import address

        record = model.PurgeRecord(ctx, self.history.now())
        self.history.purges.append(record)
        try:
            await self.call(node, "ctx.purge", {"address": address(ctx)})
            record.acked = True
        except RemoteError as exc:
            if exc.code == NOT_FOUND:  # nothing to purge: it certainly removed nothing
                record.end = self.history.now()
            return
        except PeerUnavailable:
            return  # end stays None: it may have happened, at any time
        record.end = self.history.now()

    async def final_reads(self) -> list[str]:
        """After the quiet period: a quorum history read of every context through every
        node returns every acknowledged, unpurged write."""
        from tests.sim.engine import address

        problems = []
        gone = model.must_be_gone(self.history)
        for name in self.sim.names:
            if not self.sim.nodes[name].running:
                problems.append(f"{name} is not running after the quiet period")
                continue
            for ctx in range(len(self.sim.replicas())):
                expected = {
                    put.version_id
                    for put in self.history.puts
                    if put.ctx == ctx and put.version_id and not self.history.exempt(put)
                }
                try:
                    answer = await self.call(name, "ctx.history", {"address": address(ctx)})
                    found = {str(entry["version_id"]) for entry in answer["history"]}
                except RemoteError as exc:
                    if exc.code != NOT_FOUND:
                        problems.append(f"final read of ctx {ctx} via {name} failed: {exc}")
                        continue
                    found = set()
                except PeerUnavailable as exc:
                    problems.append(f"final read of ctx {ctx} via {name} failed: {exc}")
                    continue
                if found & gone.get(ctx, set()):
                    problems.append(
                        f"final read of ctx {ctx} via {name} returns purged versions "
                        f"{sorted(found & gone[ctx])}"
                    )
                if expected - found:
                    problems.append(
                        f"final read of ctx {ctx} via {name} misses acknowledged writes "
                        f"{sorted(expected - found)}"
                    )
        return problems
