"""The rebalance and rotation phase of ``scripts/bench cluster``: a node joins a loaded
cluster, then the cluster rotates a role key over the same contexts.

1. Load: N contexts of ~1 KB (``put_batch`` of ``BATCH`` items, ``LOAD_STREAMS`` batches in
   flight through different nodes), under the role the rest of the benchmark uses. A batch
   refused as Unavailable (W copies not made in time on a loaded machine) is sent again,
   up to ``LOAD_ATTEMPTS`` times, and counted in the notes.
2. At rest: a steady writer (one put at a time, at most one every ``WRITE_EVERY_S``, W = the
   cluster's) runs for ``REST_S``; its latencies are the baseline.
3. Join: ``node.daemon.ops.add_nodes`` (in a thread: it creates, starts and proposes the new
   node, then waits until it is "normal") while the same writer runs and every old node's
   ``node.status`` is polled every ``POLL_S``. The streaming window runs from the first poll
   that sees the ring in transition to the first that sees the new node "normal" (the leader
   ends the transition once every node has streamed). Rate = the new node's contexts at the
   end / the window (contexts/s) and the growth of the old nodes' ``streamed_bytes`` / the
   window (MB/s).
4. Rotation: ``AsyncClient.rotate_role(ROLE)`` (admin), then ``node.status``'s ``rotation``
   is polled until its phase is "done" (or "failed"); time = the call to that poll. It is
   waited for ``rotation_timeout_s(N)`` (300 s, or 40 ms a context for large N).

Owns: the phase's steps, timing and figures (``Outcome``, ``figures``). Must not know: the
table or the Markdown (``bench_cluster`` renders the figures). Wall times come from
``trio.current_time()``; the arithmetic (``window``, ``rates``, ``figures``) is pure.
"""

from __future__ import annotations

import functools
import math
import random
import string
import sys
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import trio

from node.client import AsyncClient, ClientConfig, open_client
from node.daemon.ops import ClusterError, LocalNode, add_nodes
from storage.errors import Unavailable

DEFAULT_CONTEXTS = 20_000
QUICK_CONTEXTS = 3_000
BATCH = 50  # items per put_batch (the node allows 1000; it writes them one context at a time)
LOAD_STREAMS = 4  # put_batch calls in flight, spread over the old nodes (12 overran the
# replicas' answer deadline on 2 cores once the store held ~70,000 contexts: 503s, retries)
VALUE_BYTES = 1024
ROLE = "backend_developer"
WRITE_EVERY_S = 0.05  # the steady writer's shortest interval
REST_S = 10.0
QUICK_REST_S = 5.0
POLL_S = 0.25
CALL_TIMEOUT_S = 60.0
LOAD_ATTEMPTS = 8  # put_batch calls per load batch before the load fails
JOIN_TIMEOUT_S = 1800.0
ROTATION_TIMEOUT_S = 300.0  # then the rotation is reported unfinished (NaN) with its state
ROTATION_TIMEOUT_PER_CONTEXT_S = 0.04  # ... or this per context, when that is longer
ROTATE_RETRY_S = 60.0
MB = 1_000_000


def log(message: str) -> None:
    """Progress on stderr, as bench_cluster does."""
    print(f"[bench cluster] {message}", file=sys.stderr, flush=True)


# -- figures (pure) -----------------------------------------------------------------------


@dataclass(frozen=True)
class Poll:
    """What one poll of the old nodes saw, at ``at`` (seconds, trio's clock)."""

    at: float
    in_transition: bool  # any old node routes by a ring in transition
    joiner_state: str | None  # the new node's member state as the old nodes see it
    streamed_bytes: int  # sum of the old nodes' streamed_bytes counters


def window(polls: Sequence[Poll]) -> tuple[float, float, int] | None:
    """(start, end, bytes streamed) of the streaming window: from the first poll that saw
    the ring in transition to the first later (or same) poll that saw the new node
    "normal"; bytes = the streamed_bytes growth from the last poll before the start to the
    end. None when either edge was never seen."""
    start = next((i for i, p in enumerate(polls) if p.in_transition), None)
    if start is None:
        return None
    end = next((i for i in range(start, len(polls)) if polls[i].joiner_state == "normal"), None)
    if end is None:
        return None
    before = polls[start - 1].streamed_bytes if start else polls[start].streamed_bytes
    return polls[start].at, polls[end].at, polls[end].streamed_bytes - before


def rates(contexts: int, streamed: int, seconds: float) -> tuple[float, float]:
    """(contexts/s, MB/s) over ``seconds`` (NaN for a window that is not positive)."""
    if not seconds > 0:
        return math.nan, math.nan
    return contexts / seconds, streamed / MB / seconds


def rotation_timeout_s(contexts: int) -> float:
    """How long the rotation of ``contexts`` contexts is waited for."""
    return max(ROTATION_TIMEOUT_S, contexts * ROTATION_TIMEOUT_PER_CONTEXT_S)


def percentile_ms(samples_s: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of samples in seconds, in milliseconds (NaN if none)."""
    if not samples_s:
        return math.nan
    ordered = sorted(samples_s)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1] * 1000


@dataclass
class Outcome:
    """What the phase measured."""

    contexts: int  # loaded
    load_s: float
    rest_latencies_s: list[float] = field(default_factory=list)
    move_latencies_s: list[float] = field(default_factory=list)
    write_errors: list[str] = field(default_factory=list)
    joined: str = ""
    add_s: float = math.nan  # add_nodes, whole call (node start-up included)
    stream_s: float = math.nan  # the streaming window
    moved_contexts: int = 0  # held by the new node at the end of the window
    streamed_bytes: int = 0
    rotation_s: float = math.nan
    rotation_phase: str = ""  # "done" or "failed" (or "" when it never ended)
    rotation_rows: int = 0  # rows_total of the running rotation (all members' rows)
    rotation_members: int = 0
    notes: list[str] = field(default_factory=list)


# (label, value, is a count)
Figure = tuple[str, float, bool]


def figures(out: Outcome) -> list[Figure]:
    """The table's lines of the phase."""
    per_s, mb_s = rates(out.moved_contexts, out.streamed_bytes, out.stream_s)
    load_rate = out.contexts / out.load_s if out.load_s > 0 else math.nan
    rotation_rate = out.contexts / out.rotation_s if out.rotation_s > 0 else math.nan
    return [
        (f"load: {out.contexts:,} contexts by put_batch (s)", out.load_s, False),
        ("load rate (contexts/s)", load_rate, False),
        ("rebalance on join: streaming window (s)", out.stream_s, False),
        ("rebalance on join: contexts moved to the new node", out.moved_contexts, True),
        ("rebalance rate (contexts/s)", per_s, False),
        ("rebalance rate (MB/s streamed)", mb_s, False),
        ("rebalance on join: whole `cluster add` (s)", out.add_s, False),
        ("put p50 at rest, 1 writer (ms)", percentile_ms(out.rest_latencies_s, 50), False),
        ("put p99 at rest, 1 writer (ms)", percentile_ms(out.rest_latencies_s, 99), False),
        ("put p50 during rebalance, 1 writer (ms)", percentile_ms(out.move_latencies_s, 50), False),
        ("put p99 during rebalance, 1 writer (ms)", percentile_ms(out.move_latencies_s, 99), False),
        (f"cluster-wide rotation of {out.contexts:,} contexts (s)", out.rotation_s, False),
        ("rotation rate (contexts/s)", rotation_rate, False),
    ]


def describe(out: Outcome, rest_s: float) -> str:
    """How the phase was measured (a paragraph of BENCHMARKS.md)."""
    return (
        f"Rebalance and rotation lines (last, on the same cluster): {out.contexts:,} contexts"
        f" of ~{VALUE_BYTES} B are loaded with `put_batch` ({BATCH} items a call,"
        f" {LOAD_STREAMS} calls in flight spread over the 3 nodes). A steady writer (one put"
        f" at a time, at most one per {WRITE_EVERY_S * 1000:.0f} ms, W = 2) runs {rest_s:g} s"
        " at rest, then through the whole join: `cluster add` (node.daemon.ops.add_nodes)"
        ' creates, starts and proposes a 4th node and returns once it is "normal". The'
        " streaming window runs from the first `node.status` poll (every"
        f" {POLL_S * 1000:.0f} ms, the 3 old nodes) that sees the ring in transition to the"
        ' first that sees the new node "normal". contexts/s = the contexts the new node'
        " holds at the end / the window (the few the writer added meanwhile included);"
        " MB/s = the growth of the old nodes' `streamed_bytes` (envelope bytes sent to new"
        " owners) / the window. Streaming is paced per node by `[antientropy] bytes_per_s`"
        " (default 8 MiB/s). The rotation: `rotate_role` of the role every context is"
        ' written for, on the 4 nodes, until `node.status`\'s `rotation` says "done"'
        " (install, re-seal of every member's rows, retire); it re-seals every row the role"
        " reads, including those of the earlier phases."
    )


# -- the data -----------------------------------------------------------------------------


@functools.cache
def _text(seed: int) -> str:
    rng = random.Random(seed)
    alphabet = string.ascii_lowercase + "      "
    return "".join(rng.choice(alphabet) for _ in range(4 * VALUE_BYTES))


def load_address(key: int) -> str:
    """The address of loaded context ``key``."""
    return f"ucxl://bench:{ROLE}@bench:rebalance/*^/load/k{key:07d}.txt"


def write_address(key: int) -> str:
    """The address of the steady writer's ``key``-th put."""
    return f"ucxl://bench:{ROLE}@bench:rebalance/*^/writes/k{key:07d}.txt"


def fields(key: int) -> dict[str, Any]:
    """~VALUE_BYTES of record fields, distinct per key, cheap to make."""
    text = _text(9)
    offset = (key * 131) % (len(text) - VALUE_BYTES)
    body = f"k{key:07d} " + text[offset : offset + VALUE_BYTES - 9]
    return {"summary": body[:100], "content": body[100:], "tags": ["bench", "rebalance"]}


# -- the run ------------------------------------------------------------------------------


def node_config(base: ClientConfig, member: LocalNode, timeout_s: float) -> ClientConfig:
    """A client config whose only seed is ``member``."""
    return replace(base, seeds=(("127.0.0.1", member.rpc_port),), timeout_s=timeout_s)


async def load(clients: Sequence[AsyncClient], contexts: int) -> tuple[float, int]:
    """Put ``contexts`` contexts through ``put_batch``; (seconds it took, batches sent
    again after an Unavailable)."""
    batches = iter(range(0, contexts, BATCH))
    done = [0]
    retried = [0]
    begin = trio.current_time()
    mark = [begin]

    async def stream(client: AsyncClient) -> None:
        for start in batches:
            items = [
                (load_address(k), fields(k)) for k in range(start, min(contexts, start + BATCH))
            ]
            await _put_retrying(client, items, retried)
            done[0] += len(items)
            if trio.current_time() - mark[0] > 10:
                mark[0] = trio.current_time()
                log(f"  loaded {done[0]:,}/{contexts:,}")

    async with trio.open_nursery() as nursery:
        for number in range(LOAD_STREAMS):
            nursery.start_soon(stream, clients[number % len(clients)])
    return trio.current_time() - begin, retried[0]


async def _put_retrying(
    client: AsyncClient, items: list[tuple[str, Any]], retried: list[int]
) -> None:
    """``put_batch``, sent again after an Unavailable (a loaded cluster may miss W in
    time; the contexts of a batch stored on fewer than W replicas then get a second
    version, which the rotation re-seals too)."""
    for attempt in range(LOAD_ATTEMPTS):
        try:
            await client.put_batch(items)
            return
        except Unavailable as exc:
            if attempt == LOAD_ATTEMPTS - 1:
                raise
            retried[0] += 1
            log(f"  put_batch: {exc}; sending it again")
            await trio.sleep(min(0.5 * 2**attempt, 5.0))


class Writer:
    """The steady writer: latencies go to ``sink`` (swapped between rest and rebalance)."""

    def __init__(self, client: AsyncClient, out: Outcome) -> None:
        self.client = client
        self.out = out
        self.sink: list[float] = out.rest_latencies_s
        self.number = 0

    async def run(self, until: trio.Event) -> None:
        """Write until ``until`` is set."""
        while not until.is_set():
            start = trio.current_time()
            try:
                await self.client.put(write_address(self.number), fields(10**6 + self.number))
            except Exception as exc:  # a failed write is reported, not measured
                self.out.write_errors.append(f"{type(exc).__name__}: {exc}"[:200])
            else:
                self.sink.append(trio.current_time() - start)
            self.number += 1
            await trio.sleep_until(start + WRITE_EVERY_S)


async def poll(clients: Sequence[AsyncClient], joiner: str | None) -> Poll:
    """One look at the old nodes (a node that does not answer is left out)."""
    moving, state, streamed = False, None, 0
    for client in clients:
        try:
            with trio.fail_after(5.0):
                status = await client.status()
        except Exception:
            continue
        rebalance = status.get("rebalance") or {}
        moving = moving or bool(rebalance.get("in_transition"))
        streamed += int(rebalance.get("streamed_bytes") or 0)
        states = status.get("member_states") or {}
        if joiner is not None and states.get(joiner) == "normal":
            state = "normal"
    return Poll(trio.current_time(), moving, state, streamed)


async def run(
    root: Path, members: Sequence[LocalNode], base: ClientConfig, contexts: int, rest_s: float
) -> Outcome:
    """The whole phase on the running cluster of ``members`` (it grows by one node)."""
    async with AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(open_client(node_config(base, m, CALL_TIMEOUT_S)))
            for m in members
        ]
        watchers = [
            await stack.enter_async_context(open_client(node_config(base, m, 5.0))) for m in members
        ]
        log(f"rebalance: loading {contexts:,} contexts ({BATCH} per put_batch)")
        load_s, retried = await load(clients, contexts)
        out = Outcome(contexts, load_s)
        if retried:
            out.notes.append(
                f"load: {retried} put_batch calls were sent again after an Unavailable"
            )
        log(f"  loaded in {out.load_s:.1f} s ({contexts / out.load_s:,.0f} contexts/s)")
        writer = Writer(clients[0], out)
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer.run, stop)
            await trio.sleep(rest_s)
            log(f"  at rest: {len(out.rest_latencies_s)} writes; adding a node")
            writer.sink = out.move_latencies_s
            try:
                out.add_s, out.joined, port, polls = await _join(root, members, watchers)
            finally:
                stop.set()
        span = window(polls)
        if span is None:
            out.notes.append("the streaming window was not seen (no poll saw the transition)")
        else:
            out.stream_s = span[1] - span[0]
            out.streamed_bytes = span[2]
        out.moved_contexts = await _contexts_of(base, port)
        log(
            f"  {out.joined} normal: add {out.add_s:.1f} s, window {out.stream_s:.1f} s,"
            f" {out.moved_contexts:,} contexts, {out.streamed_bytes / MB:.1f} MB streamed;"
            f" {len(out.move_latencies_s)} writes during it"
        )
        await _rotate(clients[0], watchers[0], out)
    return out


async def _join(
    root: Path, members: Sequence[LocalNode], watchers: Sequence[AsyncClient]
) -> tuple[float, str, int, list[Poll]]:
    """add_nodes in a thread while the old nodes are polled; (seconds, the new node's
    name and rpc port, the polls)."""
    polls: list[Poll] = []
    result: dict[str, Any] = {}
    begin = trio.current_time()
    joiner: list[str | None] = [None]

    def add() -> None:
        result.update(add_nodes(root, 1, timeout_s=JOIN_TIMEOUT_S))

    async with trio.open_nursery() as nursery:

        async def watch() -> None:
            while True:
                polls.append(await poll(watchers, joiner[0]))
                await trio.sleep(POLL_S)

        joiner[0] = next_name([m.name for m in members])
        nursery.start_soon(watch)
        await trio.to_thread.run_sync(add)
        polls.append(await poll(watchers, joiner[0]))
        nursery.cancel_scope.cancel()
    added = result.get("added") or []
    if added != [joiner[0]]:
        raise ClusterError(f"expected {joiner[0]} to join, add_nodes says {added}")
    port = next(int(n["rpc_port"]) for n in result["nodes"] if n["name"] == joiner[0])
    return trio.current_time() - begin, str(joiner[0]), port, polls


def next_name(names: Sequence[str]) -> str:
    """The name ``add_nodes`` gives the next node: ``nodeK``, K after the highest number
    (cluster_init.create_joiner_dirs)."""
    numbers = [int(n.removeprefix("node")) for n in names if n.removeprefix("node").isdigit()]
    return f"node{max(numbers, default=0) + 1}"


async def _contexts_of(base: ClientConfig, rpc_port: int) -> int:
    """The contexts the node at ``rpc_port`` holds (``node.status``'s ``contexts``)."""
    config = replace(base, seeds=(("127.0.0.1", rpc_port),), timeout_s=10.0)
    async with open_client(config) as client:
        return int((await client.status()).get("contexts") or 0)


async def _rotate(client: AsyncClient, watcher: AsyncClient, out: Outcome) -> None:
    """rotate_role(ROLE), then poll until the rotation is done; fills ``out``."""
    log(f"rotation: rotate_role({ROLE!r})")
    begin = trio.current_time()
    answer: dict[str, Any] = {}
    with trio.move_on_after(ROTATE_RETRY_S):
        while True:  # the leader may just have changed (the join): the node says retry
            try:
                answer = await client.rotate_role(ROLE)
                break
            except Unavailable as exc:
                log(f"  rotate_role: {exc}; retrying")
                await trio.sleep(1.0)
    if not answer.get("started"):
        raise ClusterError(f"rotation not started: {answer}")
    last: dict[str, Any] = {}
    timeout_s = rotation_timeout_s(out.contexts)
    with trio.move_on_after(timeout_s):
        while True:
            try:
                rotation = (await watcher.status()).get("rotation") or {}
            except Exception:
                rotation = {}
            if rotation.get("role") == ROLE:
                last = rotation
                out.rotation_rows = max(out.rotation_rows, int(rotation.get("rows_total") or 0))
                out.rotation_members = max(
                    out.rotation_members, int(rotation.get("members_total") or 0)
                )
                if rotation.get("phase") in ("done", "failed"):
                    out.rotation_phase = str(rotation["phase"])
                    out.rotation_s = trio.current_time() - begin
                    if rotation["phase"] == "failed":
                        out.notes.append(f"the rotation failed: {rotation.get('message')}")
                    break
            await trio.sleep(POLL_S)
    if not out.rotation_phase:
        out.notes.append(
            f"the rotation did not finish within {timeout_s:g} s; last seen: phase"
            f" {last.get('phase')}, {last.get('members_done')}/{last.get('members_total')}"
            f" members done, rows {last.get('rows_done')}/{last.get('rows_total')}"
        )
    log(
        f"  rotation {out.rotation_phase or 'unfinished'} after"
        f" {trio.current_time() - begin:.1f} s"
        f" ({out.rotation_rows:,} rows on {out.rotation_members} members)"
    )
