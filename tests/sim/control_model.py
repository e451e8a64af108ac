"""What the simulated control plane did, and the invariants checked against it.

Owns: the record of every node's leadership (each ``(term, node)`` a node was leader in)
and applied Raft entries (index, term, data digest, per node and life), the violations
found as they are recorded, and the checks over one sample of every running node's
custody state and of the end state after the quiet period. Fed by the trio side
(``tests.sim.control_parts``) through ``ControlService.on_change`` / ``on_apply`` and a
sampler; this module reads no clock and does no I/O.

Must not know: trio, the services, how samples are taken.

The invariants (violations are human-readable strings):

- election safety: at most one leader per term, across all nodes and lives (Raft §5.2);
- state machine safety: every node that applies index ``i`` applies the same (term, data),
  across nodes and across a node's lives (a restarted node re-applies from its snapshot
  the identical entries); within one life indices are applied in order without gaps, and a
  new life does not start past what the node applied before (Raft §5.4.3);
- custody: a node whose keyring holds the admin identity is the leader, holds it for its
  own current leader term, and no two nodes hold it at once;
- after the quiet period: exactly one leader, known to every node, holding the admin
  identity, having applied every entry any node ever applied; every running holder of
  the custody epoch it applied keeps a share file of that epoch, and no running node
  keeps one of an older epoch (re-shares settle and clean up);
- a fenced leader-only order with a stale term is refused; one with the leader's term is
  accepted by a node that has not seen a newer term.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class CustodySample:
    """One running node's custody state at one instant."""

    leader_term: int | None  # ControlService.leader_term()
    held: bool  # AdminCustody.held()
    held_term: int | None  # AdminCustody.held_term()
    keyring_holds: bool  # keyring.has_identity("admin")


@dataclass(frozen=True)
class EndState:
    """One running node's view after the quiet period."""

    leader_term: int | None
    leader_name: str | None
    held: bool
    held_term: int | None
    applied_index: int
    custody_epoch: int | None = None  # the custody epoch applied (None: no custody)
    holder: bool = False  # a holder of that epoch
    share_epochs: tuple[int, ...] = ()  # the epochs of its share files on disk


@dataclass
class ControlRecord:
    """Everything the control plane was seen doing in one schedule."""

    leaders: dict[int, set[str]] = field(default_factory=dict)  # term -> nodes that led it
    applied: dict[int, tuple[int, str, str]] = field(default_factory=dict)  # i -> t, digest, by
    last_applied: dict[str, int] = field(default_factory=dict)  # node -> highest index applied
    life_applied: dict[tuple[str, int], int] = field(default_factory=dict)  # (node, life) -> last
    problems: list[str] = field(default_factory=list)
    samples: int = 0
    fenced_checks: int = 0

    def leader(self, node: str, term: int) -> None:
        """``node`` is the leader of ``term``."""
        nodes = self.leaders.setdefault(term, set())
        nodes.add(node)
        if len(nodes) == 2:
            self.problems.append(f"two leaders in term {term}: {sorted(nodes)}")

    def apply(self, node: str, life: int, index: int, term: int, digest: str) -> None:
        """``node`` (in its ``life``) applied the entry ``index`` of ``term``."""
        where = f"{node} (life {life})"
        last = self.life_applied.get((node, life))
        if (
            last is None
            and index > self.last_applied.get(node, 0) + 1
            and node in self.last_applied
        ):
            self.problems.append(
                f"{where} applied index {index} first, past {self.last_applied[node]}, "
                "the last it applied before: entries were skipped"
            )
        if last is not None and index != last + 1:
            self.problems.append(f"{where} applied index {index} after {last}: out of order")
        self.life_applied[(node, life)] = index
        self.last_applied[node] = max(index, self.last_applied.get(node, 0))
        seen = self.applied.get(index)
        if seen is None:
            self.applied[index] = (term, digest, where)
        elif seen[:2] != (term, digest):
            self.problems.append(
                f"{where} applied (term {term}, data {digest}) at index {index}, but {seen[2]} "
                f"applied (term {seen[0]}, data {seen[1]}) there"
            )

    def sample(self, states: Mapping[str, CustodySample]) -> None:
        """Check one instant of every running node's custody state."""
        self.samples += 1
        holders = sorted(name for name, s in states.items() if s.held or s.keyring_holds)
        if len(holders) > 1:
            self._once(f"the admin identity is held by {holders} at once")
        for name, s in sorted(states.items()):
            if s.keyring_holds != s.held:
                self._once(
                    f"{name}: custody says held={s.held} but the keyring "
                    f"{'holds' if s.keyring_holds else 'does not hold'} the admin identity"
                )
            if s.held and (s.held_term is None or s.leader_term != s.held_term):
                self._once(
                    f"{name} holds the admin identity for term {s.held_term} while its "
                    f"leader term is {s.leader_term}"
                )

    def fenced(self, what: str, problem: str | None) -> None:
        """One fenced-order check (``problem`` None: it behaved)."""
        self.fenced_checks += 1
        if problem is not None:
            self.problems.append(f"{what}: {problem}")

    def _once(self, problem: str) -> None:
        if problem not in self.problems:
            self.problems.append(problem)


def end_state(record: ControlRecord, states: Mapping[str, EndState]) -> list[str]:
    """After the quiet period: one leader, known to all, holding the admin identity, and
    nothing any node applied is missing from it."""
    leaders = sorted(name for name, s in states.items() if s.leader_term is not None)
    if len(leaders) != 1:
        return [f"after the quiet period the nodes with a leader lease are {leaders}, not one"]
    leader = leaders[0]
    mine = states[leader]
    problems = []
    unaware = sorted(name for name, s in states.items() if s.leader_name != leader)
    if unaware:
        seen = {name: states[name].leader_name for name in unaware}
        problems.append(f"after the quiet period {leader} leads, but these nodes know {seen}")
    if not mine.held or mine.held_term != mine.leader_term:
        problems.append(
            f"after the quiet period the leader {leader} (term {mine.leader_term}) does not "
            f"hold the admin identity (held={mine.held}, for term {mine.held_term})"
        )
    others = sorted(name for name, s in states.items() if s.held and name != leader)
    if others:
        problems.append(f"after the quiet period {others} hold the admin identity too")
    for name, s in sorted(states.items()):
        problems.extend(_custody_files(name, s))
    highest = max(record.applied, default=0)
    if mine.applied_index < highest:
        problems.append(
            f"after the quiet period the leader {leader} applied up to {mine.applied_index}, "
            f"but index {highest} was applied (by {record.applied[highest][2]}): lost entries"
        )
    return problems


def _custody_files(name: str, s: EndState) -> list[str]:
    if s.custody_epoch is None:
        return []
    problems = []
    if s.holder and s.custody_epoch not in s.share_epochs:
        problems.append(
            f"after the quiet period {name} holds custody epoch {s.custody_epoch} but has no "
            f"share file of it (files: {list(s.share_epochs)})"
        )
    old = [epoch for epoch in s.share_epochs if epoch < s.custody_epoch]
    if old:
        problems.append(
            f"after the quiet period {name} keeps share files of retired epochs {old} "
            f"(custody epoch {s.custody_epoch})"
        )
    return problems


def fenced_verdict(term: int, refused: bool, floor_now: int, *, stale: bool) -> str | None:
    """Whether a fenced order stamped ``term`` was treated right (None: it was).

    Args:
        term: the order's leader term.
        refused: the receiver refused it as stale.
        floor_now: the receiver's ``max(current term, persisted fence)`` after it answered.
        stale: the order was sent with a term below the receiver's term when sent.
    """
    if stale and not refused:
        return f"an order with the stale term {term} was accepted"
    if not stale and refused and floor_now <= term:
        return f"an order with the leader's term {term} was refused (receiver's floor {floor_now})"
    return None
