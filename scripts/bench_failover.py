"""The failover phase of ``scripts/bench cluster``: SIGKILL of the leader, K rounds.

Each round, for slurp and then for etcd:

1. A steady writer starts through a node (member) that is not the leader: one write at a
   time, at most one every ``POLL_S``, each bounded by ``WRITE_TIMEOUT_S``; slurp writes are
   ordinary data-path puts (W = 2 of 3), etcd's are ``/v3/kv/put``.
2. ``BEFORE_S`` later the leader (slurp: the node every ``node.status`` names; etcd: the
   member ``/v3/maintenance/status`` names) is killed with SIGKILL.
3. From that instant a probe starts one attempt every ``POLL_S`` (up to ``MAX_IN_FLIGHT`` at
   once, each bounded by ``PROBE_TIMEOUT_S``), alternating between the survivors, until one
   succeeds: slurp's attempt is an admin operation (a get of an admin-only context with
   ``as_role="admin"``, which needs a leader that has rebuilt the admin key), etcd's a write.
   Failover = the kill to the end of the first successful attempt.
4. The writer stops ``AFTER_S`` after the kill. Outage = the longest gap between consecutive
   successful writes from the last success before the kill to the writer's end; failed writes
   = those that ended after the kill. The baseline is the longest gap before the kill.
5. The killed node (member) is restarted and the round ends once it follows the new leader
   (slurp: and the leader holds the admin key).

Owns: the rounds, their timing and their figures (``Round``). Must not know: the table, the
Markdown (``bench_cluster.build_rows`` renders ``Round``s). Times are ``trio.current_time()``.
"""

from __future__ import annotations

import base64
import functools
import itertools
import math
import os
import signal
import statistics
import sys
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import trio

from node.client import AsyncClient, ClientConfig, open_client
from node.daemon.ops import ClusterError, LocalNode, start_node

if TYPE_CHECKING:  # bench_cluster imports this module; only the type checker goes back
    from bench_cluster import EtcdCluster, EtcdMember, HttpConnection

ADMIN_ADDRESS = "ucxl://ceo:admin@chorus:board/*^/secret.md"
ADMIN_ROLE = "admin"
DEFAULT_ROUNDS = 5
QUICK_ROUNDS = 2
POLL_S = 0.01  # the probe's grain, and the writer's shortest interval
MAX_IN_FLIGHT = 8  # probe attempts at once (so a hung attempt does not coarsen the grain)
PROBE_TIMEOUT_S = 0.5
WRITE_TIMEOUT_S = 1.0
CONNECT_TIMEOUT_S = 0.5
BEFORE_S = 1.0
AFTER_S = 3.0
FAILOVER_DEADLINE_S = 30.0
SETTLE_TIMEOUT_S = 90.0
RESTART_TIMEOUT_S = 60.0

Attempt = Callable[[int], Awaitable[None]]  # (attempt or write number)


def log(message: str) -> None:
    """Progress on stderr, as bench_cluster does."""
    print(f"[bench cluster] {message}", file=sys.stderr, flush=True)


# -- figures ------------------------------------------------------------------------------


@dataclass
class Round:
    """One kill of the leader, measured."""

    killed: str
    new_leader: str
    failover_s: float  # NaN when no attempt succeeded within FAILOVER_DEADLINE_S
    longest_gap_s: float  # across the kill, to the writer's end
    baseline_gap_s: float  # before the kill
    failed_writes: int  # that ended after the kill
    writes: int  # successful, after the kill
    errors: list[str] = field(default_factory=list)  # the first few failures, for the notes


@dataclass
class Writes:
    """What the steady writer saw: (start, end, ok) of every write and when it stopped."""

    calls: list[tuple[float, float, bool]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    ended: float = math.nan


def write_figures(writes: Writes, killed_at: float) -> tuple[float, float, int, int]:
    """(longest gap across the kill, longest gap before it, failures after it, successes
    after it) of one writer run."""
    ok = [end for _, end, good in writes.calls if good]
    before = [t for t in ok if t <= killed_at]
    after = [t for t in ok if t > killed_at]
    baseline = max((b - a for a, b in itertools.pairwise(before)), default=math.nan)
    marks = before[-1:] + after + [writes.ended]
    longest = max((b - a for a, b in itertools.pairwise(marks)), default=math.nan)
    failed = sum(1 for _, end, good in writes.calls if not good and end > killed_at)
    return longest, baseline, failed, len(after)


async def steady_writer(write: Attempt, writes: Writes, stop_at: float) -> None:
    """One write at a time (each bounded), at most one per POLL_S, until ``stop_at``."""
    number = 0
    while (start := trio.current_time()) < stop_at:
        good = True
        try:
            with trio.fail_after(WRITE_TIMEOUT_S):
                await write(number)
        except trio.TooSlowError:
            good = False
            if len(writes.errors) < 3:
                writes.errors.append(f"no answer within {WRITE_TIMEOUT_S:g} s")
        except Exception as exc:
            good = False
            if len(writes.errors) < 3:
                writes.errors.append(f"{type(exc).__name__}: {exc}"[:200])
        writes.calls.append((start, trio.current_time(), good))
        number += 1
        await trio.sleep_until(start + POLL_S)
    writes.ended = trio.current_time()


async def first_success(attempt: Attempt, since: float) -> float:
    """Seconds from ``since`` to the end of the first attempt that succeeds (NaN if none
    within FAILOVER_DEADLINE_S); an attempt starts every POLL_S, up to MAX_IN_FLIGHT."""
    done = trio.Event()
    found = [math.nan]
    slots = trio.Semaphore(MAX_IN_FLIGHT)

    async def one(number: int) -> None:
        try:
            with trio.fail_after(PROBE_TIMEOUT_S):
                await attempt(number)
        except Exception:
            return
        finally:
            slots.release()
        if not done.is_set():
            found[0] = trio.current_time() - since
            done.set()

    async with trio.open_nursery() as nursery:
        with trio.move_on_after(FAILOVER_DEADLINE_S):
            number = 0
            while not done.is_set():
                await slots.acquire()
                nursery.start_soon(one, number)
                number += 1
                with trio.move_on_after(POLL_S):
                    await done.wait()
        nursery.cancel_scope.cancel()
    return found[0]


async def measure_round(
    write: Attempt, kill: Callable[[], str], probe: Attempt
) -> tuple[str, float, Writes, float]:
    """Writer on, kill after BEFORE_S, probe until the first success, writer off AFTER_S
    after the kill; (killed, failover seconds, the writes, the kill's time)."""
    writes = Writes()
    async with trio.open_nursery() as nursery:
        begin = trio.current_time()
        nursery.start_soon(steady_writer, write, writes, begin + BEFORE_S + AFTER_S)
        await trio.sleep_until(begin + BEFORE_S)
        killed = kill()
        killed_at = trio.current_time()
        failover = await first_success(probe, killed_at)
    return killed, failover, writes, killed_at


def make_round(
    killed: str, new_leader: str, failover: float, writes: Writes, killed_at: float
) -> Round:
    """The figures of one measured round."""
    longest, baseline, failed, after = write_figures(writes, killed_at)
    return Round(killed, new_leader, failover, longest, baseline, failed, after, writes.errors)


def summary(rounds: Sequence[Round], pick: Callable[[Round], float]) -> tuple[float, float]:
    """(median, max) of a figure over the rounds; NaN if any round has none (a failover
    that never completed must not vanish from the max)."""
    values = [pick(r) for r in rounds]
    if not values or any(math.isnan(v) for v in values):
        return math.nan, math.nan
    return statistics.median(values), max(values)


Pick = Callable[[Round], float]
# label, unit, figure, goal, limit (slurp's figure at or below it; None: no verdict)
FIGURES: list[tuple[str, str, Pick, str, float | None]] = [
    (
        "leader failover to first admin op (slurp) / first write (etcd)", "ms",
        lambda r: r.failover_s * 1000, "≤ 1,000 ms", 1000.0,
    ),
    (
        "write outage during leader loss: longest gap between writes", "ms",
        lambda r: r.longest_gap_s * 1000, "0 s (≈ baseline)", None,
    ),
    ("writes failed during leader loss", "per round", lambda r: r.failed_writes, "0", 0.0),
    (
        "longest gap between writes in the second before the kill", "ms, baseline",
        lambda r: r.baseline_gap_s * 1000, "—", None,
    ),
]  # fmt: skip


def figures(
    failover: dict[str, list[Round]],
) -> list[tuple[str, float, float | None, str, float | None, bool]]:
    """The table's failover lines: (metric, slurp, etcd or None, goal, limit, is a count),
    median then max of each figure; none without slurp rounds."""
    if "slurp" not in failover:
        return []
    mine, theirs = failover["slurp"], failover.get("etcd")
    out: list[tuple[str, float, float | None, str, float | None, bool]] = []
    for label, unit, pick, goal, limit in FIGURES:
        ours = summary(mine, pick)
        other = summary(theirs, pick) if theirs else None
        for index, which in ((0, "median"), (1, "max")):
            out.append(
                (
                    f"{label}, {which} ({unit})",
                    ours[index],
                    None if other is None else other[index],
                    goal,
                    limit,
                    unit == "per round",
                )
            )
    return out


def describe(rounds: int) -> str:
    """How the failover lines were measured (a paragraph of BENCHMARKS.md)."""
    return (
        f"Failover lines: {rounds} rounds per system, median and max over the rounds (after"
        " the measurements above, on the same clusters). A round: a steady writer (one write at"
        f" a time, at most one per {POLL_S * 1000:.0f} ms, each bounded by"
        f" {WRITE_TIMEOUT_S:g} s) runs through a node/member that is not the leader; after"
        f" {BEFORE_S:g} s the leader (slurp: the node `node.status` names; etcd: the member"
        " `/v3/maintenance/status` names) gets SIGKILL; from that instant a probe starts an"
        f" attempt every {POLL_S * 1000:.0f} ms (up to {MAX_IN_FLIGHT} in flight, each"
        f" bounded by {PROBE_TIMEOUT_S:g} s), alternating between the 2 survivors, until one"
        " succeeds. Failover = the kill to the end of that first success: slurp's attempt is an"
        ' admin operation (`ctx.get` of an admin-only context with `as_role="admin"`, which'
        " needs a leader that has rebuilt the admin key from the shares; a follower forwards it"
        " to the leader), etcd's a `/v3/kv/put`. The writer stops"
        f" {AFTER_S:g} s after the kill; the longest gap runs from the last write that"
        " succeeded before the kill through each later success to the writer's end (a writer"
        " that never succeeds again shows the whole rest of the window); failed writes are"
        " those that ended after the kill; the baseline is the longest gap before the kill."
        " slurp's writes are data-path puts (W = 2), etcd's linearizable puts. The killed node"
        " (member) is restarted and the next round starts once it follows the new leader."
    )


# -- slurp --------------------------------------------------------------------------------


def node_config(base: ClientConfig, member: LocalNode, timeout_s: float) -> ClientConfig:
    """A client config whose only seed is ``member`` (no client-side failover)."""
    return replace(
        base,
        seeds=(("127.0.0.1", member.rpc_port),),
        timeout_s=timeout_s,
        connect_timeout_s=CONNECT_TIMEOUT_S,
    )


async def slurp_status(base: ClientConfig, member: LocalNode) -> dict[str, Any] | None:
    """``node.status`` of one node, or None when it does not answer."""
    try:
        with trio.fail_after(2.0):
            async with open_client(node_config(base, member, 1.0)) as client:
                return await client.status()
    except Exception:
        return None


async def slurp_settled(
    base: ClientConfig, members: Sequence[LocalNode], above_term: int = 0
) -> tuple[str, int]:
    """Wait until every node names one leader in one term above ``above_term``, that
    leader holds the admin key and the others follow it; (leader name, term)."""
    seen: list[dict[str, Any] | None] = []
    with trio.move_on_after(SETTLE_TIMEOUT_S):
        while True:
            seen = [await slurp_status(base, m) for m in members]
            answers = [s for s in seen if s is not None]
            if len(answers) == len(members):
                views = {(s["leader"], s["term"]) for s in answers}
                leaders = [s for s in answers if s["role"] == "leader"]
                if len(views) == 1 and len(leaders) == 1:
                    name, term = next(iter(views))
                    if (
                        name == leaders[0]["name"]
                        and term > above_term
                        and leaders[0]["admin_key_held"]
                        and all(s["role"] == "follower" for s in answers if s is not leaders[0])
                    ):
                        return str(name), int(term)
            await trio.sleep(0.1)
    roles = [(s or {}).get("role") for s in seen]
    raise ClusterError(f"slurp: no settled leader after {SETTLE_TIMEOUT_S} s: {roles}")


async def slurp_rounds(
    root: Any, members: list[LocalNode], base: ClientConfig, rounds: int, fields: Any
) -> list[Round]:
    """``rounds`` kills of slurp's leader (``members`` is updated with restarted pids);
    ``fields(i)`` are the record fields of the writer's i-th put."""
    out: list[Round] = []
    leader, term = await slurp_settled(base, members)
    async with open_client(node_config(base, members[0], 30.0)) as admin:
        await admin.put(ADMIN_ADDRESS, {"summary": "admin only", "content": "failover probe"})
    written = 0
    for number in range(rounds):
        by_name = {m.name: m for m in members}
        survivors = [m for m in members if m.name != leader]
        async with AsyncExitStack() as stack:
            writer = await stack.enter_async_context(
                open_client(node_config(base, survivors[0], WRITE_TIMEOUT_S))
            )
            probes = [
                await stack.enter_async_context(open_client(node_config(base, m, PROBE_TIMEOUT_S)))
                for m in survivors
            ]
            for probe_client in probes:  # the path works before the kill
                await probe_client.get(ADMIN_ADDRESS, as_role=ADMIN_ROLE)

            async def write(i: int, writer: AsyncClient = writer, base_key: int = written) -> None:
                key = base_key + i
                address = f"ucxl://bench:backend_developer@bench:failover/*^/w/k{key:07d}.txt"
                await writer.put(address, fields(key))

            async def probe(i: int, probes: list[AsyncClient] = probes) -> None:
                await probes[i % len(probes)].get(ADMIN_ADDRESS, as_role=ADMIN_ROLE)

            def kill(victim: LocalNode = by_name[leader]) -> str:
                os.kill(victim.pid, signal.SIGKILL)
                return victim.name

            killed, failover, writes, killed_at = await measure_round(write, kill, probe)
        written += len(writes.calls)
        new_leader, new_term = await slurp_settled(base, survivors, above_term=term)
        restarted = await trio.to_thread.run_sync(
            functools.partial(start_node, root, killed, timeout_s=RESTART_TIMEOUT_S)
        )
        members[:] = [restarted if m.name == killed else m for m in members]
        leader, term = await slurp_settled(base, members, above_term=term)
        result = make_round(killed, new_leader, failover, writes, killed_at)
        out.append(result)
        log(
            f"  slurp failover {number + 1}/{rounds}: killed {killed}, {new_leader} leads"
            f" (term {new_term}); first admin op after {result.failover_s * 1000:.0f} ms;"
            f" longest write gap {result.longest_gap_s * 1000:.0f} ms (before the kill"
            f" {result.baseline_gap_s * 1000:.0f} ms), {result.failed_writes} failed"
        )
    return out


# -- etcd ---------------------------------------------------------------------------------


async def etcd_status(etcd: EtcdCluster, member: EtcdMember) -> dict[str, Any] | None:
    """``/v3/maintenance/status`` of one member, or None when it does not answer."""
    try:
        with trio.fail_after(2.0):
            conn = await etcd.connect(member)
            try:
                answer: dict[str, Any] = await conn.request("POST", "/v3/maintenance/status", {})
                return answer
            finally:
                await trio.aclose_forcefully(conn.stream)
    except Exception:
        return None


async def etcd_settled(etcd: EtcdCluster, members: Sequence[EtcdMember]) -> EtcdMember:
    """Wait until every given member names the same leader, one of them; that member."""
    with trio.move_on_after(SETTLE_TIMEOUT_S):
        while True:
            seen = [await etcd_status(etcd, m) for m in members]
            if all(s is not None for s in seen):
                ids = [s["header"]["member_id"] for s in seen if s is not None]
                leaders = {s.get("leader") for s in seen if s is not None}
                if len(leaders) == 1 and (lead := leaders.pop()) in ids:
                    return members[ids.index(lead)]
            await trio.sleep(0.1)
    raise ClusterError(f"etcd: no settled leader after {SETTLE_TIMEOUT_S} s")


class EtcdPool:
    """Connections to one member: an attempt takes an idle one (or opens one) and gives it
    back only if its request completed (a cancelled request leaves the stream unusable)."""

    def __init__(self, etcd: EtcdCluster, member: EtcdMember) -> None:
        self.etcd = etcd
        self.member = member
        self.idle: list[HttpConnection] = []

    async def put(self, key: bytes, value: bytes) -> None:
        """``/v3/kv/put`` through this member."""
        conn = self.idle.pop() if self.idle else await self.etcd.connect(self.member)
        body = {
            "key": base64.b64encode(key).decode("ascii"),
            "value": base64.b64encode(value).decode("ascii"),
        }
        try:
            await conn.request("POST", "/v3/kv/put", body)
        except BaseException:
            await trio.aclose_forcefully(conn.stream)
            raise
        self.idle.append(conn)

    async def aclose(self) -> None:
        """Close every idle connection."""
        for conn in self.idle:
            await trio.aclose_forcefully(conn.stream)
        self.idle.clear()


async def etcd_rounds(etcd: EtcdCluster, rounds: int, value: Callable[[int], bytes]) -> list[Round]:
    """``rounds`` kills of etcd's leader; ``value(i)`` is the writer's i-th value."""
    out: list[Round] = []
    leader = await etcd_settled(etcd, etcd.members)
    written = 0
    for number in range(rounds):
        survivors = [m for m in etcd.members if m is not leader]
        pools = [EtcdPool(etcd, m) for m in survivors]
        try:
            writer, base_key = pools[0], written

            async def write(i: int, writer: EtcdPool = writer, base_key: int = base_key) -> None:
                key = base_key + i
                await writer.put(f"/bench/failover/k{key:07d}".encode("ascii"), value(key))

            async def probe(i: int, pools: list[EtcdPool] = pools) -> None:
                await pools[i % len(pools)].put(b"/bench/failover/probe", value(i))

            for pool_number in range(len(pools)):  # the path works before the kill
                await probe(pool_number)

            def kill(victim: EtcdMember = leader) -> str:
                assert victim.process is not None
                victim.process.send_signal(signal.SIGKILL)
                return victim.name

            killed, failover, writes, killed_at = await measure_round(write, kill, probe)
        finally:
            for pool in pools:
                await pool.aclose()
        written += len(writes.calls)
        new_leader = await etcd_settled(etcd, survivors)
        await trio.to_thread.run_sync(etcd.restart, leader)
        await etcd.wait_healthy(SETTLE_TIMEOUT_S)
        leader = await etcd_settled(etcd, etcd.members)
        result = make_round(killed, new_leader.name, failover, writes, killed_at)
        out.append(result)
        log(
            f"  etcd failover {number + 1}/{rounds}: killed {killed}, {new_leader.name} leads;"
            f" first write after {result.failover_s * 1000:.0f} ms; longest write gap"
            f" {result.longest_gap_s * 1000:.0f} ms (before the kill"
            f" {result.baseline_gap_s * 1000:.0f} ms), {result.failed_writes} failed"
        )
    return out
