"""Simulation schedules: the steps a simulated cluster goes through, and a seeded generator.

Owns: the step vocabulary (client operations and nemesis faults), the seeded random
schedule generator behind ``scripts/sim``, and the one-line text form of a schedule that a
failure report prints. Pure: no trio, no time, no I/O; the engine (``tests.sim.engine``)
carries the steps out.

Invariant: the same ``(seed, nodes)`` always yields the same schedule, step for step.
Client operations are started in the background (they overlap one another and the
faults); ``Sleep`` is the only step that lets simulated time pass.

Membership changes (``Join``, ``Decommission``, ``Forget``): a schedule has ``spares``
node directories beyond its ``nodes`` founders (``n<nodes+1>``..), created to join and
not started until a ``Join``. About one schedule in ``CHANGE_RATE`` gets one to three
changes (a join first, as a cluster of N founders cannot shrink below N); client
operations and faults address only the founders and the spares joined by an earlier step.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

CONTEXTS = 3  # contexts written per schedule: few, so that writes collide
SPARES = 2  # spare node directories of a random schedule
CHANGE_RATE = 4  # about one schedule in 4 has membership changes


@dataclass(frozen=True)
class Put:
    """A client writes a new version of context ``ctx`` through ``node``."""

    node: str
    ctx: int


@dataclass(frozen=True)
class Get:
    """A client reads the latest version of ``ctx`` through ``node``."""

    node: str
    ctx: int


@dataclass(frozen=True)
class Purge:
    """A client (admin) purges ``ctx`` through ``node``."""

    node: str
    ctx: int


@dataclass(frozen=True)
class Crash:
    """``node`` dies: its tasks stop, its memory is lost, its durable KV survives."""

    node: str


@dataclass(frozen=True)
class Restart:
    """``node`` starts again over its durable KV (no-op when it is running)."""

    node: str


@dataclass(frozen=True)
class CrashMidWrite:
    """A write through ``node`` whose coordinator dies at its next replica send after
    ``sends`` sends went out (0: before any remote replica heard of it; 1: one did)."""

    node: str
    ctx: int
    sends: int


@dataclass(frozen=True)
class Block:
    """Messages from ``src`` to ``dst`` are lost (one direction: asymmetric partition)."""

    src: str
    dst: str


@dataclass(frozen=True)
class Partition:
    """The nodes in ``side`` are cut off from every other node, both ways."""

    side: tuple[str, ...]


@dataclass(frozen=True)
class Heal:
    """Every partition and block is lifted."""


@dataclass(frozen=True)
class Faults:
    """Per-message drop and duplicate probabilities and the maximum delay, from now on."""

    drop: float
    duplicate: float
    max_delay_s: float


@dataclass(frozen=True)
class DiskFail:
    """``node``'s synced writes fail (disk full) while ``failing``."""

    node: str
    failing: bool


@dataclass(frozen=True)
class Sleep:
    """Let ``seconds`` of simulated time pass."""

    seconds: float


@dataclass(frozen=True)
class KillLeader:
    """The node that leads now (if any) crashes; it restarts ``restart_after_s`` later (at
    the first step from then on, or in the quiet period)."""

    restart_after_s: float


@dataclass(frozen=True)
class FencedOrder:
    """Another node sends ``node`` a fenced leader-only order (``ctl.maintain``) with a
    term below ``node``'s, which it must refuse, and the leader (if any) one with its own
    term, which it must obey unless it has seen a newer term."""

    node: str


@dataclass(frozen=True)
class Join:
    """The spare ``node`` starts (empty, with the join marker) and a live member is asked
    to add it (``ctl.member_add``, in the background)."""

    node: str


@dataclass(frozen=True)
class Decommission:
    """A live member is asked to remove ``node`` (``ctl.member_remove``: it streams its
    ranges away, then leaves)."""

    node: str


@dataclass(frozen=True)
class Forget:
    """``node`` crashes for good, then a live member is asked to forget it
    (``ctl.member_forget``); it restarts only if the forget did not happen."""

    node: str


MEMBERSHIP_STEPS = (Join, Decommission, Forget)

Step = (
    Put | Get | Purge | Crash | Restart | CrashMidWrite | Block | Partition | Heal | Faults
    | DiskFail | Sleep | KillLeader | FencedOrder | Join | Decommission | Forget
)  # fmt: skip

CLIENT_STEPS = (Put, Get, Purge, CrashMidWrite)


@dataclass(frozen=True)
class Schedule:
    """A whole run: how many nodes, the network's seed, the steps, and the thread mode."""

    nodes: int
    seed: int
    steps: tuple[Step, ...]
    threaded: bool = False
    spares: int = 0  # node directories beyond the founders, to join

    @property
    def names(self) -> list[str]:
        """The founders' names, ``n1`` .. ``nK``."""
        return node_names(self.nodes)

    @property
    def all_names(self) -> list[str]:
        """The founders' and the spares' names."""
        return node_names(self.nodes + self.spares)

    @property
    def changes(self) -> bool:
        """Whether the schedule has a membership step."""
        return any(isinstance(step, MEMBERSHIP_STEPS) for step in self.steps)

    def describe(self) -> str:
        """One line per step, for failure reports."""
        mode = " threaded" if self.threaded else ""
        mode += f" spares={self.spares}" if self.spares else ""
        head = f"schedule seed={self.seed} nodes={self.nodes}{mode}: {len(self.steps)} steps"
        return "\n".join([head, *(f"  {i:2d}. {step!r}" for i, step in enumerate(self.steps))])


def node_names(count: int) -> list[str]:
    """``n1`` .. ``n<count>``."""
    return [f"n{i}" for i in range(1, count + 1)]


def random_schedule(
    seed: int, nodes: int, *, length: int = 24, threaded_every: int = 0, spares: int = SPARES
) -> Schedule:
    """The schedule of ``seed``: ``length`` steps mixing client operations and faults,
    and in about one schedule of ``CHANGE_RATE`` membership changes (module docstring).

    Args:
        seed: the only source of randomness (the network's faults derive from it too).
        nodes: cluster size (at least 3, as N=3).
        length: number of steps.
        threaded_every: when > 0, every schedule whose seed is a multiple of it runs the
            service's blocking work in threads.
        spares: node directories to join (0: no membership changes).

    Raises:
        ValueError: fewer than 3 nodes or a non-positive length.
    """
    if nodes < 3 or length < 1:
        raise ValueError("a schedule needs at least 3 nodes and 1 step")
    rng = random.Random(f"slurp-sim:{seed}:{nodes}")
    names = node_names(nodes)
    # membership changes draw from their own stream: the other steps of a schedule
    # without changes are those the generator made before changes existed
    changes_rng = random.Random(f"slurp-sim-changes:{seed}:{nodes}")
    changes = _changes(changes_rng, spares, length)
    steps: list[Step] = []
    for position in range(length):
        change = changes.get(position)
        if change is not None:
            step: Step = change(changes_rng, names, node_names(nodes + spares)[nodes:])
            if isinstance(step, Join):
                names = [*names, step.node]
        else:
            step = _random_step(rng, names)
        steps.append(step)
    threaded = threaded_every > 0 and seed % threaded_every == 0
    return Schedule(nodes, seed, tuple(steps), threaded, spares)


Change = Callable[[random.Random, list[str], list[str]], Step]


def _changes(rng: random.Random, spares: int, length: int) -> dict[int, Change]:
    """Positions -> the membership step to put there: none, or a join then at most two
    more changes (each a join of the next spare, a decommission or a forget)."""
    if spares < 1 or length < 2 or rng.randrange(CHANGE_RATE) != 0:
        return {}
    count = min(length, rng.choice((1, 2, 2, 3)))
    positions = sorted(rng.sample(range(length), count))
    kinds: list[Change] = [_join]
    joins = 1
    for _ in range(count - 1):
        roll = rng.random()
        if roll < 0.3 and joins < spares:
            kinds.append(_join)
            joins += 1
        else:
            kinds.append(_decommission if roll < 0.65 else _forget)
    return dict(zip(positions, kinds, strict=True))


def _join(rng: random.Random, names: list[str], spares: list[str]) -> Step:
    return Join(next(s for s in spares if s not in names))


def _decommission(rng: random.Random, names: list[str], spares: list[str]) -> Step:
    return Decommission(rng.choice(names))


def _forget(rng: random.Random, names: list[str], spares: list[str]) -> Step:
    return Forget(rng.choice(names))


def _random_step(rng: random.Random, names: list[str]) -> Step:
    node = rng.choice(names)
    ctx = rng.randrange(CONTEXTS)
    roll = rng.random()
    if roll < 0.30:
        return Put(node, ctx)
    if roll < 0.44:
        return Get(node, ctx)
    if roll < 0.48:
        return Purge(node, ctx)
    if roll < 0.66:
        return Sleep(rng.choice((0.01, 0.01, 0.1, 0.3, 0.6, 1.2)))
    if roll < 0.71:
        return KillLeader(rng.choice((0.3, 1.0, 2.0)))
    if roll < 0.74:
        return FencedOrder(node)
    if roll < 0.78:
        return Crash(node)
    if roll < 0.84:
        return Restart(node)
    if roll < 0.85:
        return CrashMidWrite(node, ctx, rng.randrange(2))
    if roll < 0.89:
        return Block(node, rng.choice([n for n in names if n != node]))
    if roll < 0.91:
        side = tuple(sorted(rng.sample(names, rng.randrange(1, len(names) // 2 + 1))))
        return Partition(side)
    if roll < 0.95:
        return Heal()
    if roll < 0.97:
        drop = rng.choice((0.0, 0.02, 0.1))
        duplicate = rng.choice((0.0, 0.1))
        return Faults(drop, duplicate, rng.choice((0.0, 0.01, 0.05)))
    return DiskFail(node, rng.random() < 0.5)
