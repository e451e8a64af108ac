"""The index-lag phase of ``scripts/bench cluster``: how far search falls behind the writes
under a sustained load (issue 10: the index is off the acknowledgement path, so its lag
must be measured).

1. Load: ``WRITERS`` clients (spread over the 3 nodes) put fresh ~1 KB contexts back to
   back for ``seconds``; every record's content ends with a probe word unique to it.
2. Probes: every ``PROBE_EVERY_S`` the prober takes the newest acknowledged put and
   searches (``ctx.search``, through its own node) for its probe word every ``POLL_S``
   until a hit names its address. Visibility = the hit's arrival minus the put's
   acknowledgement. A probe still unanswered ``PROBE_TIMEOUT_S`` after its put counts as
   missing (reported; a bug or an overloaded node). Probes started in the load window
   are followed to their end after it.
3. Backlog: every ``POLL_S`` each node's ``node.status`` ``index`` (``pending``: contexts
   stored but not yet indexed; ``lag_s``: the age of the oldest of them) is sampled.

Owns: the phase's steps, timing and figures (``Outcome``, ``figures``). Must not know: the
table or the Markdown (``bench_cluster`` renders the figures). Times come from
``trio.current_time()``; ``figures`` is pure.
"""

from __future__ import annotations

import math
import random
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from node.client import AsyncClient
from storage.address import parse

WRITERS = 16
PROBE_EVERY_S = 0.25
POLL_S = 0.05
PROBE_TIMEOUT_S = 10.0
STATUS_EVERY_S = 0.1
VALUE_BYTES = 1024
DEFAULT_SECONDS = 15.0
QUICK_SECONDS = 6.0
ROLE = "backend_developer"

Figure = tuple[str, float, bool]  # label, value, whole number


@dataclass
class Outcome:
    """What the phase measured."""

    seconds: float  # the load window
    puts: int = 0
    put_errors: list[str] = field(default_factory=list)
    visible_s: list[float] = field(default_factory=list)  # per probe: ack -> searchable
    missing: int = 0  # probes not searchable within PROBE_TIMEOUT_S
    lag_s: list[float] = field(default_factory=list)  # node.status index.lag_s samples
    pending: list[int] = field(default_factory=list)  # node.status index.pending samples
    status_errors: int = 0


def probe_word(run: int, key: int) -> str:
    """A word the index tokenises whole and no other record holds (letters only)."""
    digits = []
    n = run * 10_000_000 + key
    while True:
        n, rem = divmod(n, 26)
        digits.append(string.ascii_lowercase[rem])
        if n == 0:
            break
    return "lagprobe" + "".join(reversed(digits))


def address(run: int, key: int) -> str:
    """The context of put ``key`` of run ``run``."""
    return f"ucxl://bench:{ROLE}@bench:indexlag/*^/r{run}/k{key:07d}.txt"


def fields(run: int, key: int) -> dict[str, Any]:
    """~1 KB of random words, then the probe word."""
    rng = random.Random(run * 1_000_003 + key)
    alphabet = string.ascii_lowercase + "      "
    text = "".join(rng.choice(alphabet) for _ in range(VALUE_BYTES - 40))
    return {
        "summary": text[:100],
        "content": f"{text[100:]} {probe_word(run, key)}",
        "tags": ["bench", "indexlag"],
    }


async def run(clients: Sequence[AsyncClient], seconds: float, seed: int = 1) -> Outcome:
    """The phase on ``clients`` (client i talks to node i mod 3; at least 3 of them)."""
    out = Outcome(seconds)
    run_id = random.Random(seed).randrange(1, 100_000)
    newest: list[tuple[int, float]] = []  # (key, ack time) of the newest acknowledged put
    next_key = iter(range(10**9))
    end = trio.current_time() + seconds

    async def writer(client: AsyncClient) -> None:
        while trio.current_time() < end:
            key = next(next_key)
            try:
                await client.put(address(run_id, key), fields(run_id, key))
            except Exception as exc:  # reported, not measured
                out.put_errors.append(f"{type(exc).__name__}: {exc}")
                continue
            out.puts += 1
            newest[:] = [(key, trio.current_time())]

    async def probe(client: AsyncClient, key: int, acked: float) -> None:
        wanted = parse(address(run_id, key)).context().canonical()
        word = probe_word(run_id, key)
        while trio.current_time() < acked + PROBE_TIMEOUT_S:
            try:
                hits = await client.search(word, limit=5)
            except Exception:  # a loaded node may miss a search: try again
                hits = []
            if any(hit.context == wanted for hit in hits):
                out.visible_s.append(trio.current_time() - acked)
                return
            await trio.sleep(POLL_S)
        out.missing += 1

    async def prober(nursery: trio.Nursery, pick: Callable[[], AsyncClient]) -> None:
        while trio.current_time() < end:
            await trio.sleep(PROBE_EVERY_S)
            if newest:
                key, acked = newest[0]
                nursery.start_soon(probe, pick(), key, acked)

    async def status_poller(client: AsyncClient) -> None:
        while trio.current_time() < end:
            try:
                index = (await client.status()).get("index") or {}
                out.lag_s.append(float(index.get("lag_s", math.nan)))
                out.pending.append(int(index.get("pending", 0)))
            except Exception:
                out.status_errors += 1
            await trio.sleep(STATUS_EVERY_S)

    rotation = iter(range(10**9))

    def pick() -> AsyncClient:
        return clients[next(rotation) % len(clients)]

    async with trio.open_nursery() as probes, trio.open_nursery() as load:
        for i in range(WRITERS):
            load.start_soon(writer, clients[i % len(clients)])
        for client in clients[:3]:
            load.start_soon(status_poller, client)
        load.start_soon(prober, probes, pick)
    return out


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (NaN for none)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


def figures(out: Outcome) -> list[Figure]:
    """The table's lines of the phase."""
    ms = [v * 1000 for v in out.visible_s]
    return [
        (f"index lag phase: puts/s, {WRITERS} writers for {out.seconds:g} s", out.puts / out.seconds
         if out.seconds > 0 else math.nan, False),
        ("search sees an acknowledged put after, p50 (ms)", percentile(ms, 50), False),
        ("search sees an acknowledged put after, p99 (ms)", percentile(ms, 99), False),
        ("search sees an acknowledged put after, max (ms)", max(ms) if ms else math.nan, False),
        ("probes not searchable within 10 s", float(out.missing), True),
        ("node.status index.lag_s under load, max (s)", max(out.lag_s, default=math.nan), False),
        ("node.status index.pending under load, max (contexts)",
         float(max(out.pending, default=0)), True),
    ]  # fmt: skip


def describe(out: Outcome) -> str:
    """How the phase was measured (a paragraph of BENCHMARKS.md)."""
    return (
        f"Index lag lines: {WRITERS} writers (spread over the 3 nodes) put fresh ~1 KB contexts"
        f" back to back for {out.seconds:g} s ({out.puts} puts); every {PROBE_EVERY_S * 1000:.0f}"
        " ms a prober takes the newest acknowledged put and runs `ctx.search` for a word only"
        f" that record holds every {POLL_S * 1000:.0f} ms until a hit names it: the figure is"
        f" the hit minus the put's acknowledgement ({len(out.visible_s)} probes). Meanwhile"
        f" each node's `node.status` `index` was sampled every {STATUS_EVERY_S * 1000:.0f} ms"
        f" ({len(out.lag_s)} samples): `pending` contexts stored but not yet indexed, `lag_s`"
        " the age of the oldest. The documented bound (docs/storage.md): a search sees a write"
        " at most `index_refresh_s` (1 s) after it, plus the time to index what is queued"
        " before it."
    )
