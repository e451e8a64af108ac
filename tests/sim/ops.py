"""The client side and the nemesis of a simulation: carries out one schedule step at a time.

Owns: turning ``tests.sim.schedule`` steps into client calls (in the background, recorded
in the engine's ``History`` with start and end ticks) and into faults on the network,
the disks and the nodes (killing the leader and restarting it later; fenced orders, through
``tests.sim.control_parts``); membership changes (``ctl.member_add`` / ``member_remove`` /
``member_forget`` through a running member, one at a time, each outcome recorded in
``History.changes``: a refusal or an unanswered request is an outcome, not a violation);
and the final quorum reads through every member of the final ring after the quiet period.
The simulated client holds the admin role.
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
    Decommission,
    DiskFail,
    Faults,
    FencedOrder,
    Forget,
    Get,
    Heal,
    Join,
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
CHANGE_TIMEOUT_S = 5.0  # a follower forwards a change to the leader, which commits it
CHANGE_ATTEMPTS = 5  # tries of a change, each through the next running member, 1 s apart
N = 3  # replicas per context: a change never leaves the ring with fewer members
NOT_FOUND = "UCXL-404-NOT_FOUND"


class ClientOps:
    """Runs steps against a ``Simulation``."""

    def __init__(self, sim: Simulation) -> None:
        self.sim = sim
        self.history: model.History = sim.history
        self._writes = itertools.count(1)
        self._restarts: list[tuple[float, str]] = []  # (when, node) of killed leaders
        self._change: trio.Event | None = None  # set when the change under way is answered

    async def _due_restarts(self) -> None:
        """Restart the killed leaders whose time has come (the quiet period restarts the
        rest)."""
        now = trio.current_time()
        for when, name in [r for r in self._restarts if r[0] <= now]:
            self._restarts.remove((when, name))
            if name in self.sim.present():
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
                if node in sim.present():
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
            case Join(node) | Decommission(node) | Forget(node):
                if self._change is not None:  # one change at a time
                    await self._change.wait()
                self._change = trio.Event()
                clients.start_soon(self._changing, step, self._change)
        await trio.lowlevel.checkpoint()

    # -- membership changes ---------------------------------------------------------------

    async def _changing(self, step: Join | Decommission | Forget, done: trio.Event) -> None:
        try:
            match step:
                case Join(node):
                    await self.join(node)
                case Decommission(node):
                    await self.change("ctl.member_remove", node)
                case Forget(node):
                    await self.forget(node)
        finally:
            done.set()

    def _record(self, what: str, outcome: str) -> str:
        self.history.changes.append((what, outcome))
        return outcome

    def _too_few(self, node: str) -> str | None:
        """Why removing ``node`` is not tried: it is no member, or the ring would keep
        fewer than N members."""
        states = self.sim.member_states()
        if node not in states:
            return f"{node} is not a member"
        ring = [n for n, state in states.items() if state in ("normal", "joining")]
        if len([n for n in ring if n != node]) < N:
            return f"the ring {sorted(ring)} would keep fewer than N={N} members"
        return None

    async def join(self, node: str) -> None:
        """Start the spare ``node`` (empty, join marker) and ask a member to add it."""
        spare = self.sim.spares[node]
        self.sim.joined.add(node)
        await self.sim.start(node)
        body = {
            "name": node, "node_id": spare.node_id, "recipient": spare.recipient,
            "signing_key": spare.signing_key, "rpc_host": "127.0.0.1", "rpc_port": 1,
        }  # fmt: skip
        await self.change("ctl.member_add", node, body, check=False)

    async def forget(self, node: str) -> None:
        """Crash ``node`` for good and ask a member to forget it; it comes back only when
        the forget is refused (else the quiet period decides by the metadata)."""
        why = self._too_few(node)
        if why is not None:
            self._record(f"forget {node}", f"skipped: {why}")
            return
        self.sim.forgotten.add(node)
        await self.sim.crash(node)
        outcome = await self.change("ctl.member_forget", node, check=False)
        if outcome.startswith("refused"):
            self.sim.forgotten.discard(node)
            await self.sim.start(node)

    async def change(
        self, method: str, node: str, body: dict[str, Any] | None = None, *, check: bool = True
    ) -> str:
        """Ask a running member (not ``node``) to carry out ``method``; the outcome."""
        what = f"{method.removeprefix('ctl.member_')} {node}"
        why = self._too_few(node) if check else None
        if why is not None:
            return self._record(what, f"skipped: {why}")
        outcome = "failed: no running member to ask"
        for attempt in range(CHANGE_ATTEMPTS):
            if attempt:
                await trio.sleep(1.0)
            members = self.sim.final_members()
            running = [n for n in members if n != node and self.sim.nodes[n].running]
            if not running:
                continue
            via = running[attempt % len(running)]
            try:
                async with self.sim.network.open_client("client", via) as client:
                    answer = await client.call(
                        method, body or {"name": node}, timeout_s=CHANGE_TIMEOUT_S
                    )
            except RemoteError as exc:
                if exc.code.startswith("UCXL-400"):
                    return self._record(what, f"refused via {via}: {exc}")
                outcome = f"failed via {via}: {exc}"
                continue
            except PeerUnavailable as exc:
                outcome = f"failed via {via}: {exc}"
                continue
            return self._record(what, f"ok via {via}: {answer.get('state')}")
        return self._record(what, outcome)

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
        for name in self.sim.final_members():
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
