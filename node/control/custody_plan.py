"""The decisions of admin-key custody by the leader (pure; ARCHITECTURE.md §5, §6).

Owns: what a node does with the admin identity given what it knows of leadership
(``custody_action``), when it retries collecting shares (``retry_delay_s``), whether it
answers another node's ``admin.share`` (``share_refusal``), and where a client request
that needs the admin identity is answered (``route``). The trio shell is
``node.control.custody``; it carries these decisions out.

Must not know: trio, clocks, the keyring, shares' contents, the network.

Invariants:
- The admin identity is held only for the term in which this node is the leader with a
  lease that holds now: any other leader term (None included) means WIPE (Raft §6.4.1;
  lease-based duties are dropped on lease expiry, higher term or transfer).
- A share is handed out only to the node this node believes is the leader, for this
  node's own current term: never to a node that merely claims leadership, and never for
  a term this node has left (or not reached).
- A request is forwarded at most once (the shell passes ``forwarded``; a forwarded
  request is routed LOCAL or NOT_READY, never FORWARD).
"""

from __future__ import annotations

from collections.abc import Collection
from enum import Enum

from crypto.roles import ADMIN_ROLE

MAX_RETRY_S = 2.0  # the longest wait between two share collections of one term
# client methods that need the admin identity when read as admin; purge and a cluster
# restore (the backup opens with the admin identity only) always are leader-only
ADMIN_READS = frozenset({"ctx.get", "ctx.get_batch", "ctx.history"})
LEADER_OPS = frozenset({"ctx.purge", "restore.upload", "restore.apply"})


class Action(Enum):
    """What custody does next."""

    IDLE = "idle"  # not the leader, nothing held
    COLLECT = "collect"  # the leader, not holding: collect shares for this term
    KEEP = "keep"  # held for the current leader term
    WIPE = "wipe"  # held for a term that is no longer this node's leader term


class Route(Enum):
    """Where a client request is answered."""

    LOCAL = "local"  # here
    FORWARD = "forward"  # at the leader, through admin.forward
    NOT_READY = "not_ready"  # here is the leader, but it does not hold the admin key yet


def custody_action(leader_term: int | None, held_term: int | None) -> Action:
    """The next action.

    Args:
        leader_term: this node's term if it is the leader and its lease holds now, else None.
        held_term: the term the admin identity is held for, or None if it is not held.
    """
    if held_term is not None:
        return Action.KEEP if held_term == leader_term else Action.WIPE
    return Action.IDLE if leader_term is None else Action.COLLECT


def retry_delay_s(interval_s: float, failures: int) -> float:
    """The wait before the next collection after ``failures`` failed ones in a row
    (doubling from ``interval_s``, at most ``MAX_RETRY_S``; 0 after none)."""
    if failures <= 0:
        return 0.0
    factor: int = 1 << min(failures - 1, 32)
    return min(interval_s * factor, max(MAX_RETRY_S, interval_s))


def share_refusal(asker: str, leader_name: str | None, term: int, current_term: int) -> str | None:
    """Why ``asker`` may not have this node's share for ``term`` (None: it may).

    Args:
        asker: the requesting node's certificate name.
        leader_name: the leader this node knows (None: unknown).
        term: the term the request carries.
        current_term: this node's current Raft term.
    """
    if leader_name is None:
        return f"no leader known here; {asker} is not the leader I know"
    if asker != leader_name:
        return f"{asker} is not the leader I know ({leader_name})"
    if term < current_term:
        return f"stale term {term} < {current_term}"
    if term > current_term:
        return f"term {term} is ahead of mine ({current_term}); retry once I have caught up"
    return None


def route(
    method: str,
    as_role: str | None,
    client_roles: Collection[str],
    *,
    holds_admin: bool,
    is_leader: bool,
    forwarded: bool = False,
) -> Route:
    """Where to answer a client request.

    Args:
        method: the client method.
        as_role: the ``as_role`` it asks to read as (None: not given, or no such field).
        client_roles: the client certificate's roles.
        holds_admin: whether this node holds the admin identity now.
        is_leader: whether this node is the leader with a lease that holds now.
        forwarded: the request was forwarded here by another node.

    A client without the admin role is answered here (and refused here if it asked for
    admin). Admin reads go where the admin identity is; purge is a leader operation and
    goes to the leader, which must hold the admin identity.
    """
    if ADMIN_ROLE not in client_roles:
        return Route.LOCAL
    if method in LEADER_OPS:
        if is_leader:
            return Route.LOCAL if holds_admin else Route.NOT_READY
    elif method in ADMIN_READS and as_role == ADMIN_ROLE:
        if holds_admin:
            return Route.LOCAL
        if is_leader:
            return Route.NOT_READY
    else:
        return Route.LOCAL
    return Route.NOT_READY if forwarded else Route.FORWARD
