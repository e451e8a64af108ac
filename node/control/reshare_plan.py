"""The decisions of re-sharing the admin key when the membership changes (pure).

A pure core (ARCHITECTURE.md §2, §5, §6): no I/O, no trio, no clock, no randomness. The
shell (``node.control.reshare``) asks ``reshare_reason`` / ``plan_reshare`` with the
applied metadata, the Raft voters and which members answer; it splits the held admin
identity as planned, delivers each share (phase 1), and commits ``holders_of`` through
the log (phase 2). Every input is in the log or the leader's view of liveness, so a new
leader resumes from the metadata alone.

Owns:
- the threshold rule, the one ``cluster up`` uses (``threshold_for``: a majority);
- when a re-share is due (``reshare_reason``):

  ===================================================  ======================================
  situation                                            why
  ===================================================  ======================================
  a member holding a share of this epoch was removed   its share must stop counting (``lost``)
  a holder is no longer a normal voter (leaving)       hand its share over before it goes
  a live normal voter holds no share of this epoch     a new member, or one that was down
  ===================================================  ======================================

- the plan: epoch + 1, one share per target (normal voters, sorted by node id, numbered
  from 1; at most ``MAX_HOLDERS``, SLIP-39's limit), threshold over the targets;
  delivered to the live targets only;
- the commit: holders are the live targets that acknowledged; committed only if every one
  of them did and they reach the threshold (else nothing changes, and it is tried again);
- whether a member accepts ``admin.reshare`` (``reshare_refusal``) and which of its share
  files it deletes once an epoch committed (``stale_epochs``).

Must not know: trio, the keyring, shares' contents, the network, Raft's rules.

Invariants:
- A committed epoch's holders can rebuild the identity: at least ``threshold`` of them
  acknowledged a durable share of that epoch before it was proposed.
- Nothing is re-shared while fewer live targets than the threshold answer (the old epoch
  stays the one that combines), nor while no target is left.
- A member never deletes the share file of the committed epoch it holds, nor of an epoch
  not committed yet (a re-share in progress may commit it).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

from node.control.custody_plan import share_refusal
from node.control.metadata import ClusterMetadata, Custody

__all__ = [
    "ReshareStep",
    "holders_of",
    "plan_reshare",
    "reshare_reason",
    "reshare_refusal",
    "stale_epochs",
    "targets",
    "threshold_for",
]


MAX_HOLDERS = 16  # SLIP-39's member count limit (crypto.shamir.MAX_SHARES)


def threshold_for(shares: int) -> int:
    """The threshold of a split into ``shares``: a majority (1 for a single share), as
    ``cluster up`` splits it."""
    return shares // 2 + 1 if shares > 1 else 1


def targets(state: ClusterMetadata, voters: Collection[str]) -> list[str]:
    """Node ids that should hold a share: normal members that are Raft voters with an age
    recipient on record, sorted by node id, at most ``MAX_HOLDERS`` of them (the rest hold
    none)."""
    return sorted(
        node_id
        for node_id, member in state.members.items()
        if member.state == "normal" and node_id in voters and member.age_recipient
    )[:MAX_HOLDERS]


def reshare_reason(
    state: ClusterMetadata, voters: Collection[str], live: Collection[str]
) -> str | None:
    """Why the admin key should be re-shared now (None: it should not; module docstring).

    Args:
        state: the metadata the leader applied.
        voters: the Raft voters (node ids).
        live: node ids of the members that answer now (the leader included).
    """
    custody = state.custody
    if custody is None:
        return None
    wanted = targets(state, voters)
    if custody.lost:
        return f"{custody.lost} share(s) of epoch {custody.epoch} left with removed members"
    for node_id in sorted(custody.holders):
        if node_id not in wanted:
            member = state.members[node_id]
            return f"{member.name} holds a share of epoch {custody.epoch} and is {member.state}"
    for node_id in wanted:
        if node_id not in custody.holders and node_id in live:
            name = state.members[node_id].name
            return f"{name} holds no share of epoch {custody.epoch}"
    return None


@dataclass(frozen=True)
class ReshareStep:
    """A planned re-share: split into ``shares`` with ``threshold`` as epoch ``epoch``;
    ``numbers`` node id -> share number of each target; ``deliver`` the live targets;
    ``recipients`` node id -> age recipient of each target."""

    epoch: int
    threshold: int
    shares: int
    admin_recipient: str
    numbers: Mapping[str, int]
    deliver: tuple[str, ...]
    recipients: Mapping[str, str]
    why: str


def plan_reshare(
    state: ClusterMetadata, voters: Collection[str], live: Collection[str]
) -> ReshareStep | None:
    """The re-share to run now (None: none is due, or it cannot succeed now).

    Args:
        state: the metadata the leader applied.
        voters: the Raft voters (node ids).
        live: node ids of the members that answer now (the leader included).
    """
    why = reshare_reason(state, voters, live)
    custody = state.custody
    if why is None or custody is None:
        return None
    wanted = targets(state, voters)
    threshold = threshold_for(len(wanted))
    deliver = tuple(node_id for node_id in wanted if node_id in live)
    if not wanted or len(deliver) < threshold:
        return None
    return ReshareStep(
        epoch=custody.epoch + 1,
        threshold=threshold,
        shares=len(wanted),
        admin_recipient=custody.admin_recipient,
        numbers={node_id: number for number, node_id in enumerate(wanted, start=1)},
        deliver=deliver,
        recipients={node_id: state.members[node_id].age_recipient for node_id in wanted},
        why=why,
    )


def holders_of(step: ReshareStep, acked: Collection[str]) -> Custody | None:
    """The custody to commit once ``acked`` hold their share durably (None: not every
    delivered target acknowledged, or too few for the threshold: commit nothing)."""
    if set(step.deliver) - set(acked) or len(step.deliver) < step.threshold:
        return None
    holders = {node_id: step.numbers[node_id] for node_id in sorted(step.deliver)}
    return Custody(step.threshold, step.shares, step.admin_recipient, holders, epoch=step.epoch)


def reshare_refusal(
    asker: str,
    leader_name: str | None,
    term: int,
    current_term: int,
    epoch: int,
    committed_epoch: int | None,
) -> str | None:
    """Why this member refuses ``admin.reshare`` from ``asker`` (None: it accepts).

    Args:
        asker: the requesting node's certificate name.
        leader_name: the leader this node knows (None: unknown).
        term: the term the request carries.
        current_term: this node's current Raft term.
        epoch: the custody epoch of the share offered.
        committed_epoch: the custody epoch this node applied (None: no custody known).
    """
    why = share_refusal(asker, leader_name, term, current_term)
    if why is not None:
        return why
    if committed_epoch is None:
        return "no admin custody is recorded in the metadata applied here"
    if epoch <= committed_epoch:
        return f"epoch {epoch} is not above the committed custody epoch {committed_epoch}"
    return None


def stale_epochs(on_disk: Collection[int], custody: Custody | None, me: str) -> list[int]:
    """The epochs of this node's share files to delete, given the committed ``custody``:
    every older epoch, and the committed one (if > 0) when this node does not hold it."""
    if custody is None:
        return []
    stale = [epoch for epoch in on_disk if epoch < custody.epoch]
    if custody.epoch > 0 and custody.epoch in on_disk and me not in custody.holders:
        stale.append(custody.epoch)
    return sorted(stale)
