"""What a simulated run observed, and the invariants checked against it.

Owns: the history of client operations (each with a start and end tick of one logical
sequence, so "finished before started" is exact), the end-of-run snapshot of every node's
durable version sets, and the invariant checks over both. Pure: no trio, no time, no I/O.

The invariants (each returns human-readable violations, empty when it holds):

- ``acked_writes_kept``: every acknowledged write is held by at least W replicas' durable
  stores at the end, unless a purge of its context was not yet finished when it started;
- ``reads_were_written``: a read returns only a version some put wrote (same summary),
  begun before the read ended, and never a
  version removed by a purge acknowledged before the read began; and it sees every write
  acknowledged before it began (R + W > N);
- ``purged_stay_purged``: no store that applied a purge holds a version it removed (and,
  once replicas converge, no store at all); reads never return one (``reads_were_written``
  and the engine's final reads);
- ``converged``: every replica of a context holds the identical version set and purge
  marker (only after anti-entropy and hinted handoff exist; see the engine's flag).

Membership changes (the engine passes only the final ring's members' snapshots to the
checks above: a forgotten or removed node's store does not count):

- ``settled``: after the quiet period no member is joining or leaving;
- ``exact_replicas``: every context held by some final ring member is held by exactly its
  N owners in the final ring;
- ``drop_problems``: when a node drops a context (range cleanup), every owner holds each
  dropped version durably, or purged it.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

W = 2  # the default write quorum of the simulated clusters


@dataclass
class PutRecord:
    """One attempted write; ``version_id`` is set when it was acknowledged."""

    ctx: int
    summary: str
    start: int
    end: int | None = None
    version_id: str | None = None
    error: str | None = None


@dataclass
class PurgeRecord:
    """One attempted purge; ``end`` is set when it finished (acknowledged or failed)."""

    ctx: int
    start: int
    end: int | None = None
    acked: bool = False


@dataclass
class ReadRecord:
    """One read that returned a version."""

    ctx: int
    node: str
    start: int
    end: int
    summary: str
    version_id: str


@dataclass
class NodeSnapshot:
    """A node's durable state at the end: context -> (version ids, purge marker upto)."""

    versions: dict[int, set[str]] = field(default_factory=dict)
    purge_upto: dict[int, str | None] = field(default_factory=dict)


@dataclass
class History:
    """Everything the client side saw, in one logical clock."""

    puts: list[PutRecord] = field(default_factory=list)
    purges: list[PurgeRecord] = field(default_factory=list)
    reads: list[ReadRecord] = field(default_factory=list)
    changes: list[tuple[str, str]] = field(default_factory=list)  # (step, outcome)
    tick: int = 0

    def now(self) -> int:
        """The next tick of the logical clock."""
        self.tick += 1
        return self.tick

    def exempt(self, put: PutRecord) -> bool:
        """Whether a purge may legitimately have removed ``put`` (one overlapped or followed)."""
        return any(p.ctx == put.ctx and (p.end is None or p.end > put.start) for p in self.purges)

    def purge_between(self, put: PutRecord, before: int) -> bool:
        """Whether a purge of ``put``'s context started before tick ``before`` and had not
        finished when ``put`` started (it may have removed ``put`` by then)."""
        return any(
            p.ctx == put.ctx and p.start < before and (p.end is None or p.end > put.start)
            for p in self.purges
        )

    def purged_by_finished(self, put: PutRecord, before: int) -> bool:
        """Whether an acknowledged purge started after ``put`` was acked and ended before
        tick ``before`` (so ``put`` must be gone from then on)."""
        return put.end is not None and any(
            p.ctx == put.ctx and p.acked and p.start > put.end and p.end is not None
            and p.end < before
            for p in self.purges
        )  # fmt: skip


def acked_writes_kept(history: History, nodes: Mapping[str, NodeSnapshot]) -> list[str]:
    """Acknowledged writes not purged are held by >= W durable stores."""
    problems = []
    for put in history.puts:
        if put.version_id is None or history.exempt(put):
            continue
        holders = [
            n for n, snap in nodes.items() if put.version_id in snap.versions.get(put.ctx, ())
        ]
        if len(holders) < W:
            problems.append(
                f"acknowledged write {put.summary} ({put.version_id}) of ctx {put.ctx} is held "
                f"by {holders or 'no node'}, fewer than W={W}"
            )
    return problems


def reads_were_written(history: History) -> list[str]:
    """Every read returned a written, unpurged version, at least as new as prior acks."""
    problems = []
    by_summary = {put.summary: put for put in history.puts}
    for read in history.reads:
        put = by_summary.get(read.summary)
        where = f"read of ctx {read.ctx} via {read.node} (ticks {read.start}-{read.end})"
        if put is None or put.ctx != read.ctx or put.start > read.end:
            problems.append(f"{where} returned {read.summary!r}, which was never written")
            continue
        # (no check that read.version_id == put.version_id: the simulated network may
        # deliver a client's put twice, and a put is not idempotent, so one summary can
        # legitimately be stored under two version ids; TCP never duplicates a request)
        if history.purged_by_finished(put, read.start):
            problems.append(f"{where} returned {read.summary!r}, purged before the read began")
        for earlier in history.puts:
            if (
                earlier.ctx == read.ctx and earlier.version_id is not None
                and earlier.end is not None and earlier.end < read.start
                and earlier.version_id > read.version_id
                and not history.purge_between(earlier, read.end)
            ):  # fmt: skip
                problems.append(
                    f"{where} returned {read.version_id}, older than {earlier.version_id} "
                    f"({earlier.summary}) acknowledged before the read began"
                )
    return problems


def must_be_gone(history: History) -> dict[int, set[str]]:
    """Per context, the acknowledged writes that a finished, acknowledged purge removed."""
    end = history.tick + 1
    gone: dict[int, set[str]] = {}
    for put in history.puts:
        if put.version_id is not None and history.purged_by_finished(put, end):
            gone.setdefault(put.ctx, set()).add(put.version_id)
    return gone


def purged_stay_purged(
    history: History, nodes: Mapping[str, NodeSnapshot], *, everywhere: bool
) -> list[str]:
    """No store that holds a purge marker holds a version the purge removed; with
    ``everywhere`` (replicas converged), no store at all holds one."""
    problems = []
    for ctx, vids in sorted(must_be_gone(history).items()):
        for name, snap in sorted(nodes.items()):
            if not everywhere and snap.purge_upto.get(ctx) is None:
                continue  # this replica missed the purge; only repair can bring it
            for vid in sorted(vids & snap.versions.get(ctx, set())):
                problems.append(f"purged version {vid} of ctx {ctx} is back on {name}")
    return problems


def converged(replicas: Mapping[int, list[str]], nodes: Mapping[str, NodeSnapshot]) -> list[str]:
    """Every replica of each context holds the same version ids and purge marker."""
    problems = []
    for ctx, names in sorted(replicas.items()):
        states = {
            name: (frozenset(nodes[name].versions.get(ctx, ())), nodes[name].purge_upto.get(ctx))
            for name in names
        }
        if len(set(states.values())) > 1:
            detail = ", ".join(
                f"{name}: {len(vids)} versions, purge upto {upto}"
                for name, (vids, upto) in sorted(states.items())
            )
            problems.append(f"replicas of ctx {ctx} differ after the quiet period: {detail}")
    return problems


def settled(states: Mapping[str, str]) -> list[str]:
    """No member (name -> member state) is still joining or leaving."""
    moving = {name: state for name, state in sorted(states.items()) if state in MOVING}
    return [f"membership not settled after the quiet period: {moving}"] if moving else []


MOVING = frozenset({"joining", "leaving"})


def exact_replicas(owners: Mapping[int, list[str]], nodes: Mapping[str, NodeSnapshot]) -> list[str]:
    """Every context some node of ``nodes`` (the final ring's members) holds a version of
    is held by exactly its owners (``owners``: its N-long preference list)."""
    problems = []
    for ctx, names in sorted(owners.items()):
        holders = {name for name, snap in nodes.items() if snap.versions.get(ctx)}
        if holders and holders != set(names):
            problems.append(
                f"ctx {ctx} is held by {sorted(holders)} after the quiet period, "
                f"not by exactly its owners {sorted(names)}"
            )
    return problems


def drop_problems(
    dropper: str,
    ctx: str,
    version_ids: Collection[str],
    owners: Mapping[str, tuple[Collection[str], str | None]],
) -> list[str]:
    """``dropper`` drops ``version_ids`` of ``ctx``; ``owners``: each owner's durable
    version ids and purge marker (``upto``) at that instant. A version must be held by
    every owner, or removed by the owner's purge marker."""
    problems = []
    for owner, (held, upto) in sorted(owners.items()):
        lacking = sorted(
            vid for vid in version_ids if vid not in held and (upto is None or vid > upto)
        )
        if lacking:
            problems.append(f"{dropper} dropped {ctx} while its owner {owner} lacked {lacking}")
    return problems
