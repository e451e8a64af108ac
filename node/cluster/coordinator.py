"""The coordinator's protocol decisions, as a pure core (ARCHITECTURE.md §2, §6).

Owns what a coordinating node decides, given what replicas answered: the version counts
(ranks) a write reports, what a delete tombstones, which context a wildcard read resolves
to, which role a search reads as, the read-repair plan, the paging of a version set, and
the time budget of inner calls. ``node.cluster.service`` carries these decisions out over
RPC; this module does no I/O and imports no trio, time, random, os or socket.

Invariants:
    - Ranks: the last version of a context in a write gets the highest count any replica
      reported for that context, each earlier one one less, and never less than 1.
    - Repair: after a replica applies its pushes (and the purge marker, when stale), it
      holds the merged union (versions after the newest purge marker); no version is
      planned twice for one replica, and every push batch stays within the byte budget
      unless it holds a single larger envelope.
    - Purge floor: a write needs no read before it exactly when its quorum intersects
      every purge quorum (``needs_pre_read``).
    - Budget: an inner call never gets more time than the client's remaining deadline
      minus the margin, nor more than the configured timeout, nor less than zero.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from node.cluster.replication import Merged, batches_by_bytes
from storage.views import ContextInfo

ADMIN = "admin"
DEADLINE_MARGIN_S = 0.05  # kept back from the client's deadline to answer in time


def write_ranks(
    batch: Mapping[str, Sequence[str]], heads: Mapping[str, int]
) -> dict[tuple[str, str], int]:
    """The version number a write reports for each (context, version id) it wrote.

    Args:
        batch: context -> version ids written to it in this request (any order).
        heads: context -> the highest version count a replica reported after storing.

    Returns:
        (context, version id) -> count: the newest gets the head count, each older one
        one less (at least 1).
    """
    ranks: dict[tuple[str, str], int] = {}
    for ctx, vids in batch.items():
        for vid in vids:
            later = sum(1 for other in vids if other > vid)
            ranks[(ctx, vid)] = max(heads.get(ctx, 0) - later, 1)
    return ranks


@dataclass(frozen=True)
class DeleteDecision:
    """What a delete tombstones: the newest version (the tombstone's parent)."""

    parent: str
    fallback_count: int  # the tombstone's count when no replica reported a head


def decide_delete(rows: Sequence[tuple[str, bool]]) -> DeleteDecision | None:
    """Whether a context can be deleted, from its merged (version id, is tombstone) rows
    in version id order.

    Returns:
        The decision, or None when the context does not exist or its newest version is
        already a tombstone (the caller answers not found).
    """
    if not rows:
        return None
    newest, tombstone = rows[-1]
    if tombstone:
        return None
    return DeleteDecision(parent=newest, fallback_count=len(rows) + 1)


def choose_context(infos: Sequence[ContextInfo], matches: Sequence[bool]) -> ContextInfo | None:
    """The context a wildcard read resolves to: the most recently updated live match.

    Args:
        infos: The merged listing of candidate contexts.
        matches: For each info, whether it matches the wildcard address.

    Returns:
        The chosen context (ties broken by the greater name), or None.
    """
    live = [info for info, match in zip(infos, matches, strict=True) if info.live and match]
    if not live:
        return None
    return max(live, key=lambda info: (info.updated_at_ms, info.context))


@dataclass(frozen=True)
class RoleChoice:
    """The role a search reads as (None: no role filter), or why it is refused."""

    role: str | None
    refusal: str | None = None


def search_role(
    kind: str,
    peer_roles: Sequence[str],
    as_role: str | None,
    authorities: Mapping[str, int],
) -> RoleChoice:
    """Which role a search reads as.

    A node asks as whatever it names; a client may name one of its certificate roles;
    an admin client without a role reads unfiltered; any other client reads as its
    certificate role of the highest authority this cluster knows.
    """
    if kind != "client":
        return RoleChoice(as_role)
    if as_role is not None:
        if as_role not in peer_roles:
            return RoleChoice(None, f"the client's certificate does not grant role {as_role!r}")
        return RoleChoice(as_role)
    if ADMIN in peer_roles:
        return RoleChoice(None)
    known = [role for role in peer_roles if role in authorities]
    if not known:
        return RoleChoice(None, "the client's certificate grants no role of this cluster")
    return RoleChoice(max(known, key=lambda role: authorities[role]))


@dataclass(frozen=True)
class RepairPlan:
    """What to push to whom after a read: version batches, and purge markers."""

    pushes: Mapping[str, tuple[tuple[str, ...], ...]]  # replica -> batches of version ids
    purges: tuple[str, ...]  # replicas to send the purge marker to

    def sends(self) -> int:
        """How many RPCs carrying the plan out takes."""
        return sum(len(batches) for batches in self.pushes.values()) + len(self.purges)


def repair_plan(merged: Merged, budget_bytes: int) -> RepairPlan:
    """Pushes and purges that bring every answering replica to ``merged``.

    Each replica gets each version it lacks once, in id order, in batches of at most
    ``budget_bytes`` (``batches_by_bytes``); replicas that still hold versions the newest
    purge marker covers get the marker.
    """
    size = {vid: len(data) for vid, data in merged.envelopes}
    pushes: dict[str, tuple[tuple[str, ...], ...]] = {}
    for node in sorted(merged.missing):
        vids = list(dict.fromkeys(merged.missing[node]))
        if not vids:
            continue
        # batches_by_bytes splits blobs; split the ids alongside by their sizes.
        stand_ins = [bytes(size[vid]) for vid in vids]
        batches, start = [], 0
        for batch in batches_by_bytes(stand_ins, budget_bytes):
            batches.append(tuple(vids[start : start + len(batch)]))
            start += len(batch)
        pushes[node] = tuple(batches)
    purges = merged.stale_purge if merged.purge is not None else ()
    return RepairPlan(pushes, tuple(purges))


def page_versions(
    rows: Sequence[tuple[str, bytes]], after: str | None, budget_bytes: int
) -> tuple[list[tuple[str, bytes]], bool]:
    """One page of a replica's version set: rows after ``after``, within the budget.

    A page holds at least one row when any remain (a single larger envelope travels
    alone). Returns the page and whether more rows follow it.
    """
    rest = [row for row in rows if after is None or row[0] > after]
    page: list[tuple[str, bytes]] = []
    used = 0
    for vid, data in rest:
        if page and used + len(data) > budget_bytes:
            break
        page.append((vid, data))
        used += len(data)
    return page, len(page) < len(rest)


def fitting(sizes: Sequence[int], budget_bytes: int) -> int:
    """How many leading items of these sizes fit the budget (at least one when any)."""
    used = 0
    for count, size in enumerate(sizes):
        if count and used + size > budget_bytes:
            return count
        used += size
    return len(sizes)


def needs_pre_read(write_w: int, purge_w: int, n: int) -> bool:
    """Whether a write must ask the replicas for the newest purge marker before sealing.

    A purge is acknowledged by ``purge_w`` of the ``n`` replicas; a write of ``write_w``
    acknowledgements with ``write_w + purge_w > n`` always hears from one that holds the
    marker, which refuses a version the marker covers and names its ``upto`` (the write is
    then re-sealed after it and retried). Below that bound nothing guarantees a marker
    holder answers before the write is acknowledged, so the write reads first.
    """
    return write_w + purge_w <= n


def inner_timeout(
    configured_s: float, remaining_s: float | None, margin_s: float = DEADLINE_MARGIN_S
) -> float:
    """The time an inner call (to a replica) may take.

    Args:
        configured_s: The node's configured per-call timeout.
        remaining_s: What is left of the client's deadline, or None without one.
        margin_s: Kept back to send the answer before the client's deadline.

    Returns:
        min(configured, remaining - margin), never negative.
    """
    if remaining_s is None:
        return max(configured_s, 0.0)
    return max(min(configured_s, remaining_s - margin_s), 0.0)
