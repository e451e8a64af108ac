"""Hinted handoff planning: who holds a hint for a missed owner, when a write is done.

A pure core (ARCHITECTURE.md §2, §6; Dynamo §4.6): no I/O, no clock, no randomness. The
node service and ``node.cluster.handoff`` carry out what it decides.

- Fallbacks (``plan_fallbacks``): each owner of the preference list that missed a write
  (down, or its store failed) gets one hint holder: the next node clockwise *beyond* the
  preference list that is up and is neither an owner nor already a fallback for another
  missed owner. When no such node is left, the coordinator itself holds the hint (it is
  always up, and may itself be an owner).
- Write quorum (``write_reached``): strict (the default) counts only owners that stored the
  versions durably toward W. Sloppy (``[handoff] sloppy_quorum = true``, Dynamo's sloppy
  quorum) also counts each missed owner whose hint was stored durably (synced) on its
  holder. A hint is never counted before it is on disk.
- Delivery (``delivery_outcome``): the owner's answer to ``rep.store`` flags each version
  True (stored), False (already held) or None (refused: a bad or untrusted signature, or
  covered by the owner's purge marker). With no None the hint is delivered (deleted, counted). A
  refusal is retried a few times (``MAX_REFUSALS``, with backoff), because a node that
  has just restarted refuses versions whose signer it has not re-learned from discovery
  yet; after that the hint is dropped and counted, never retried forever. A version
  covered by a purge marker is never sent at all (the holder drops it).
- Backoff (``backoff_s``): after a failed delivery to a target, wait the interval doubled
  per consecutive failure, capped.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from node.cluster.ring import Ring

MAX_BACKOFF_FACTOR = 32
MAX_REFUSALS = 5
DEFAULT_HINT_MAX_BYTES = 256 * 1024 * 1024
DEFAULT_HANDOFF_INTERVAL_S = 2.0


@dataclass(frozen=True)
class HandoffConfig:
    """The ``[handoff]`` table (validated by ``node.daemon.config``).

    ``enabled``: store and deliver hints at all; ``sloppy_quorum``: a durable hint counts
    toward W; ``max_bytes``: the bound on every hint this node holds together;
    ``interval_s``: how often delivery is tried (and the unit of the backoff).
    """

    enabled: bool = True
    sloppy_quorum: bool = False
    max_bytes: int = DEFAULT_HINT_MAX_BYTES
    interval_s: float = DEFAULT_HANDOFF_INTERVAL_S


@dataclass(frozen=True)
class FallbackPlan:
    """Which node holds the hint for each missed owner."""

    holders: Mapping[str, str]  # missed owner -> hint holder


def plan_fallbacks(
    ring: Ring,
    key: bytes,
    owners: Sequence[str],
    missed: Collection[str],
    up: Collection[str],
    me: str,
) -> FallbackPlan:
    """Choose a hint holder for every missed owner, in preference-list order.

    Args:
        ring: The current ring.
        key: The context's ring key.
        owners: The preference list (the first N distinct nodes clockwise).
        missed: The owners that did not (or cannot) store the write.
        up: The nodes believed up.
        me: The coordinator (the holder of last resort).

    Returns:
        One holder per missed owner: a distinct up non-owner beyond the preference list
        clockwise, or ``me`` once those run out.
    """
    owned = set(owners)
    beyond = [
        node
        for node in ring.preference_list(key, len(ring))
        if node not in owned and node in up and node != me
    ]
    holders: dict[str, str] = {}
    spare = iter(beyond)
    for owner in owners:
        if owner in missed:
            holders[owner] = next(spare, me)
    return FallbackPlan(holders)


def counts_toward_w(*, stored: bool, hinted: bool, sloppy: bool) -> bool:
    """Whether one owner's outcome counts toward W (the rule the write path applies per
    owner; ``QuorumTracker`` counts them): a durable store always, a durable hint only
    under a sloppy quorum."""
    return stored or (hinted and sloppy)


def write_reached(
    stored: Collection[str], hinted: Collection[str], w: int, *, sloppy: bool
) -> bool:
    """Whether a write has its W, over whole sets of owners (the reference the per-owner
    rule ``counts_toward_w`` is checked against).

    Args:
        stored: Owners that acknowledged a durable store.
        hinted: Missed owners whose hint is durably stored on their holder.
        w: The write quorum.
        sloppy: Count hints toward W (Dynamo's sloppy quorum).
    """
    owners = set(stored) | set(hinted)
    counted = [
        o for o in owners if counts_toward_w(stored=o in stored, hinted=o in hinted, sloppy=sloppy)
    ]
    return len(counted) >= w


class Delivery(enum.Enum):
    """What to do with a hint after its owner answered."""

    DELIVERED = "delivered"  # every version stored or already held: delete, count delivered
    RETRY = "retry"  # refused, but maybe only for now: keep, back the target off
    REFUSED = "refused"  # refused MAX_REFUSALS times (or purged here): delete, count dropped


def delivery_outcome(flags: Sequence[bool | None], refusals_before: int) -> Delivery:
    """What to do with a hint after the owner's ``rep.store`` flags.

    Args:
        flags: One per version of the hint (None: refused).
        refusals_before: How many earlier answers refused some version of this hint.
    """
    if all(flag is not None for flag in flags):
        return Delivery.DELIVERED
    return Delivery.REFUSED if refusals_before + 1 >= MAX_REFUSALS else Delivery.RETRY


def backoff_s(interval_s: float, failures: int) -> float:
    """Delay before the next delivery attempt to a target after ``failures`` in a row."""
    if failures <= 0:
        return 0.0
    factor: int = (
        min(1 << (failures - 1), MAX_BACKOFF_FACTOR) if failures < 64 else MAX_BACKOFF_FACTOR
    )
    return interval_s * factor
