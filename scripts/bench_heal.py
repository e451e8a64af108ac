"""Self-healing benchmark: anti-entropy and hinted-handoff catch-up, simulation speed.

Not a timed test.

Three nodes run in one process over the in-memory network (``node.rpc.memory_transport``),
each a real ``NodeService`` over a real ``ContextStore`` on LevelDB, with the real
``AntiEntropyService``. Figures:

- idle: ``--contexts`` contexts per node (default 100,000) whose version rows are written
  straight into each store (same ids everywhere, so the trees agree; anti-entropy reads
  only keys of an idle store). Reported: the tree build at start (keys-only scan) and the
  process CPU time of one idle pass of one node against both peers (both sides' work, as
  they share the process), as a share of one core at the default 60 s interval;
- catch-up: node3 is cut off while ``--writes`` writes (default 10,000) are acknowledged
  through node1 (``ctx.put_batch``, real encryption and signatures), the cut heals, and
  node3's passes alone (no reads) run until it holds every version. Reported: the time
  and versions/s, with ``max_repairs_per_exchange`` raised to the write count and the
  default ``bytes_per_s`` throttle;
- hinted handoff: the same cut-off node, the same writes, now with ``HandoffService`` on
  every node (anti-entropy off): the coordinator keeps a durable hint per write for node3
  (with three nodes and N = 3 it is its own fallback) and delivers them when node3 is seen
  up again. Reported: hints stored, the time until node3 holds every version, versions/s;
- simulation: ``scripts/sim`` schedules per minute with two processes on disjoint seeds
  (one per core), and what ten minutes buy at that speed.

Output: a table on stdout and Markdown between ``<!-- bench:heal:start -->`` and
``<!-- bench:heal:end -->`` in BENCHMARKS.md. Scratch data goes to a temporary directory.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import trio
from bench_report import git_revision, write_section  # scripts/, on sys.path

from crypto.roles import DEFAULT_ROLES
from node.cluster.antientropy import AntiEntropyConfig
from node.cluster.antientropy_service import AntiEntropyService
from node.cluster.handoff import HandoffService
from node.cluster.handoff_plan import HandoffConfig
from node.cluster.liveness import StaticCluster
from node.cluster.service import NodeService, ServiceConfig
from node.rpc.memory_transport import MemoryNetwork
from node.rpc.peers import PeerPool
from node.rpc.transport import Caller
from storage.address import parse
from storage.context_store import ContextStore
from storage.hints import HintStore
from storage.schema import version_key

ROOT = Path(__file__).resolve().parent.parent
START_MARKER = "<!-- bench:heal:start -->"
END_MARKER = "<!-- bench:heal:end -->"
NAMES = ["n1", "n2", "n3"]
DEFAULT_INTERVAL_S = AntiEntropyConfig().interval_s


@dataclass
class Node:
    store: ContextStore
    service: NodeService
    cluster: StaticCluster
    healer: AntiEntropyService
    handoff: HandoffService | None


def _init(root: Path) -> None:
    ContextStore.init(root / NAMES[0], DEFAULT_ROLES)
    with ContextStore.open(root / NAMES[0]) as store:
        ids = {r.name: store.keyring.current_identity(r.name) for r in DEFAULT_ROLES}
    for name in NAMES[1:]:
        ContextStore.init(root / name, DEFAULT_ROLES, role_identities=ids)


def _ctx_key(i: int) -> bytes:
    return (
        parse(f"ucxl://agent{i % 7}:backend_developer@bench:t{i % 13}/*^/doc{i}.md").context().key()
    )


@asynccontextmanager
async def _cluster(
    root: Path,
    network: MemoryNetwork,
    config: AntiEntropyConfig,
    stores: dict[str, ContextStore],
    handoff: HandoffConfig | None = None,
) -> AsyncIterator[dict[str, Node]]:
    nodes: dict[str, Node] = {}
    network.set_identity("client", kind="client", roles=("admin",))
    async with trio.open_nursery() as nursery:
        for name in NAMES:
            network.set_identity(name, kind="node", roles=())
            cluster = StaticCluster(name, NAMES)

            def connect(peer: str, me: str = name) -> AbstractAsyncContextManager[Caller]:
                return network.open_client(me, peer)

            pool = PeerPool(connect, on_result=cluster.mark)
            service = NodeService(stores[name], cluster, pool, ServiceConfig(timeout_s=30.0))
            healer = AntiEntropyService(service, config)
            hinter = None
            if handoff is not None:
                hints = HintStore(
                    stores[name].kv, max_bytes=handoff.max_bytes, clock_ms=stores[name].clock_ms
                )
                hinter = HandoffService(service, hints, handoff)
                cluster.on_up.append(hinter.wake)
            await nursery.start(pool.run)
            await nursery.start(service.run)
            await nursery.start(network.server(name, service.handle).run)
            if hinter is not None:
                await nursery.start(hinter.run)
            nodes[name] = Node(stores[name], service, cluster, healer, hinter)
        yield nodes
        nursery.cancel_scope.cancel()


def _open(root: Path) -> dict[str, ContextStore]:
    stores = {name: ContextStore.open(root / name) for name in NAMES}
    for store in stores.values():
        for other in stores.values():
            store.trust_signer(other.keyring.signer.public_key)
    return stores


async def bench_idle(root: Path, contexts: int) -> dict[str, float]:
    _init(root)
    stores = _open(root)
    try:
        for store in stores.values():  # identical version rows everywhere (keys matter only)
            for start in range(0, contexts, 5000):
                rows = [
                    (version_key(_ctx_key(i), f"{i + 1:012x}-000000-bench"), b"-")
                    for i in range(start, min(contexts, start + 5000))
                ]
                store.kv.write(rows, sync=False)
        network = MemoryNetwork(random.Random(0))
        started = time.perf_counter()
        cpu = time.process_time()
        async with _cluster(root, network, AntiEntropyConfig(enabled=False), stores) as nodes:
            build_s = (time.perf_counter() - started) / len(NAMES)
            build_cpu = (time.process_time() - cpu) / len(NAMES)
            healer = nodes["n1"].healer
            await healer.run_pass()  # warm connections
            rounds = 5
            cpu = time.process_time()
            wall = time.perf_counter()
            for _ in range(rounds):
                await healer.run_pass()
            pass_cpu = (time.process_time() - cpu) / rounds
            pass_wall = (time.perf_counter() - wall) / rounds
            if healer.stats.versions_repaired or healer.stats.exchanges_failed:
                raise RuntimeError("the idle trees were expected to agree")
        return {
            "contexts": contexts,
            "build_s": build_s,
            "build_cpu_s": build_cpu,
            "pass_cpu_s": pass_cpu,
            "pass_wall_s": pass_wall,
            "idle_share": pass_cpu / DEFAULT_INTERVAL_S,
        }
    finally:
        for store in stores.values():
            store.close()


async def bench_catch_up(root: Path, writes: int) -> dict[str, float]:
    _init(root)
    stores = _open(root)
    config = AntiEntropyConfig(enabled=False, max_repairs_per_exchange=writes)
    try:
        network = MemoryNetwork(random.Random(0))
        async with _cluster(root, network, config, stores) as nodes:
            await _write_while_cut_off(network, nodes, writes)
            network.heal()
            n3 = nodes["n3"]
            wall = time.perf_counter()
            passes = 0
            while n3.healer.stats.versions_repaired < writes and passes < 20:
                await n3.healer.run_pass()
                passes += 1
            elapsed = time.perf_counter() - wall
            held = n3.store.versions.count_contexts()
            return {
                "writes": writes,
                "held": held,
                "seconds": elapsed,
                "rate": n3.healer.stats.versions_repaired / elapsed,
                "passes": passes,
                "mib": n3.healer.stats.bytes_received / 2**20,
            }
    finally:
        for store in stores.values():
            store.close()


async def _write_while_cut_off(network: MemoryNetwork, nodes: dict[str, Node], writes: int) -> None:
    """Cut node3 off and acknowledge ``writes`` writes through node1 (W=2)."""
    network.partition(["n3"], ["n1", "n2", "client"])
    nodes["n1"].cluster.mark("n3", False)
    nodes["n2"].cluster.mark("n3", False)
    async with network.open_client("client", "n1") as client:
        for start in range(0, writes, 200):
            items = [
                {"address": f"ucxl://a{i % 5}:backend_developer@bench:heal/*^/d{i}.md",
                 "record": {"summary": f"write {i}"}}
                for i in range(start, min(writes, start + 200))
            ]  # fmt: skip
            await client.call("ctx.put_batch", {"items": items, "w": 2}, timeout_s=300)


async def _until(condition: Callable[[], bool]) -> None:
    """Poll ``condition`` every 50 ms (the services run in the same trio loop)."""
    while True:
        if condition():
            return
        await trio.sleep(0.05)


async def bench_hints(root: Path, writes: int) -> dict[str, float]:
    _init(root)
    stores = _open(root)
    healer = AntiEntropyConfig(enabled=False)
    handoff = HandoffConfig(interval_s=0.5)
    try:
        network = MemoryNetwork(random.Random(0))
        async with _cluster(root, network, healer, stores, handoff) as nodes:
            await _write_while_cut_off(network, nodes, writes)
            hinter = nodes["n1"].handoff
            assert hinter is not None
            stored = hinter.hints.stats().hints
            n3 = nodes["n3"]
            network.heal()
            wall = time.perf_counter()
            nodes["n1"].cluster.mark("n3", True)  # failure detection sees n3 again: wake
            await _until(lambda: n3.store.versions.count_contexts() >= writes)
            elapsed = time.perf_counter() - wall
            await _until(lambda: hinter.hints.stats().hints == 0)  # deleted after the acks
            return {
                "writes": writes,
                "hints": stored,
                "seconds": elapsed,
                "rate": writes / elapsed,
            }
    finally:
        for store in stores.values():
            store.close()


def bench_sim(schedules: int) -> dict[str, float]:
    """``scripts/sim --jobs 2``: two processes (one per core) on disjoint seed ranges."""
    total = 2 * schedules
    command = [sys.executable, "-m", "tests.sim.run", "--schedules", str(total), "--jobs", "2"]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    found = re.search(
        rf"^{total} schedules .*, 0 failed, ([\d.]+) s, (\d+) schedules/minute$",
        done.stdout,
        re.MULTILINE,
    )
    if done.returncode or found is None:
        raise RuntimeError(f"the simulation failed:\n{done.stdout}{done.stderr}")
    return {"schedules": total, "seconds": float(found[1]), "per_minute": float(found[2])}


def report(
    idle: dict[str, float],
    catch: dict[str, float],
    hints: dict[str, float],
    sim: dict[str, float],
) -> str:
    return "\n".join(
        [
            "## Self-healing: anti-entropy, hinted handoff, simulation (`scripts/bench heal`)",
            "",
            f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC · commit {git_revision()} · "
            f"{os.cpu_count()} cores · Python {sys.version.split()[0]} · three nodes in one "
            "process over the in-memory network, LevelDB stores",
            "",
            "| figure | value |",
            "|---|---|",
            f"| contexts per node (idle) | {idle['contexts']:,} |",
            f"| tree build at start, per node (keys-only scan) | {idle['build_s']:.2f} s wall, "
            f"{idle['build_cpu_s']:.2f} s CPU |",
            f"| one idle pass (1 node vs 2 peers, both sides) | {idle['pass_cpu_s'] * 1000:.0f} ms "
            f"CPU, {idle['pass_wall_s'] * 1000:.0f} ms wall |",
            f"| idle CPU at interval {DEFAULT_INTERVAL_S:.0f} s | "
            f"{idle['idle_share'] * 100:.3f} % of one core (goal < 2 %) |",
            f"| catch-up: versions missed by one node | {catch['writes']:,} |",
            f"| catch-up time, anti-entropy alone | {catch['seconds']:.1f} s in "
            f"{catch['passes']:.0f} passes ({catch['held']:,} contexts held after) |",
            f"| catch-up rate | {catch['rate']:,.0f} versions/s, {catch['mib']:.1f} MiB fetched |",
            f"| catch-up by hinted handoff alone: hints stored | {hints['hints']:,.0f} for "
            f"{hints['writes']:,.0f} writes |",
            f"| catch-up time, hints alone | {hints['seconds']:.1f} s "
            f"({hints['rate']:,.0f} versions/s) |",
            f"| simulation, 2 processes x 1 core | {sim['per_minute']:,.0f} schedules/minute "
            f"({sim['schedules']:,.0f} in {sim['seconds']:.0f} s): "
            f"{sim['per_minute'] * 10:,.0f} per 10 minutes (target 10,000) |",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contexts", type=int, default=100_000)
    parser.add_argument("--writes", type=int, default=10_000)
    parser.add_argument("--schedules", type=int, default=300, help="per simulation process")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="bench-heal-"))
    try:
        idle = trio.run(bench_idle, scratch / "idle", args.contexts)
        catch = trio.run(bench_catch_up, scratch / "catch", args.writes)
        hints = trio.run(bench_hints, scratch / "hints", args.writes)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    sim = bench_sim(args.schedules)
    body = report(idle, catch, hints, sim)
    print(body)
    if not args.no_write:
        write_section(args.out, body, START_MARKER, END_MARKER)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
