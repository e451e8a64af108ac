"""The cluster metadata and the state machine every node applies the committed log to.

A pure core (ARCHITECTURE.md §2, §6): no I/O, no clock, no randomness. Cassandra's
transactional cluster metadata (CEP-21, research/control-plane.md §4) is the model: every
committed entry is a pure transformation from one immutable ``ClusterMetadata`` to the
next, and every node that applies the same log reaches the same state.

Owns: the metadata values (members and their states, the ring epoch, key epochs per role,
the Shamir custody parameters, the leader duties, and the trusted signers a cluster was
founded with: fixed at bootstrap, changed by no command), the commands that change them (msgpack
maps ``{"op": str, ...}`` built by the ``cmd_*`` functions), ``apply``, and the snapshot
codec (``encode_state`` / ``decode_state``, schema ``STATE_SCHEMA``).

Must not know: Raft (``apply`` is handed an index and bytes; the shell passes committed
entries in order), the ring's placement algorithm, storage, keys or shares themselves.

Commands (``op``; "refused" leaves the state as it was but for ``applied_index``):

===============  ==============================================================  ========
op               effect                                                          ring
===============  ==============================================================  ========
member_add       a new member (ids are never reused; names unique among the      epoch+1
                 members not removed), with its ring weight
member_state     one step of ``TRANSITIONS`` (removed is final; a removed        epoch+1
                 custody holder leaves ``holders`` and counts in ``lost``)
member_address   a member's RPC host and port (ids are split from addresses)     -
ring             new vnodes and weights of members (``expect_epoch``: refused    epoch+1
                 unless it is the current epoch)
key_epoch        a role's key version; versions only increase                    -
custody          the Shamir threshold, shares, admin recipient and holders.      -
                 With ``custody.epoch``: a re-share, refused unless it is the
                 current epoch + 1. Without (the older form): the parameters
                 are replaced and the epoch kept
duty_schedule    create a duty or change its interval                            -
duty_started     a duty runs under ``term``: fresh, or resumed (cursor kept)     -
                 when it was left running by an older term; refused for a
                 term older than the duty's, or when running in the same term
duty_progress    the running duty's cursor (only from the term that runs it)     -
duty_finished    the running duty ends (only from the term that runs it)        -
stream_done      a member finished streaming ranges for a ring epoch (kept:     -
                 the highest; refused for an epoch not reached yet)
epoch_seen       a member applied a ring epoch (kept: the highest; refused for  -
                 an epoch not reached yet); the cleanup barrier
===============  ==============================================================  ========

The term on the duty commands is the fencing token (ARCHITECTURE.md §6): an entry a
deposed leader appended may still commit under its successor, and must not touch a duty
the successor now runs.

Invariants:
- ``apply`` never raises; an empty command is the leader's no-op; the index must be
  ``applied_index + 1`` (otherwise nothing changes, not even ``applied_index``).
- Every value is immutable; mappings are read-only views.
- ``ring.weights`` has exactly one entry, >= 1, per member not removed; custody holders
  are members; no two members not removed share a name.
- ``decode_state(encode_state(s)) == s``; ``decode_state`` raises only ``MalformedRaftData``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any

import msgpack

from node.control.metadata_codec import (
    custody_from_wire,
    custody_wire,
    member_from_wire,
    member_wire,
)
from node.control.metadata_codec import decode_state as decode_state
from node.control.metadata_codec import encode_state as encode_state
from node.control.metadata_fields import MAX_INT, Fields, check_int
from node.control.metadata_types import (
    DEFAULT_DUTIES,
    MAX_CURSOR_BYTES,
    MAX_DUTIES,
    MAX_MESSAGE_CHARS,
    MAX_NAME,
    MAX_RECIPIENT,
    MAX_VNODES,
    MAX_WEIGHT,
    STATES,
    TRANSITIONS,
    ClusterMetadata,
    Custody,
    Duty,
    KeyEpoch,
    Member,
    RingEpoch,
    frozen_map,
)
from node.control.raft_types import Entry, EntryKind, MalformedRaftData

__all__ = [
    "BOOTSTRAP_INDEX",
    "DEFAULT_DUTIES",
    "STATES",
    "TRANSITIONS",
    "ApplyResult",
    "ClusterMetadata",
    "Custody",
    "Duty",
    "KeyEpoch",
    "Member",
    "RingEpoch",
    "apply",
    "apply_entry",
    "bootstrap_state",
    "cmd_custody",
    "cmd_duty_finished",
    "cmd_duty_progress",
    "cmd_duty_schedule",
    "cmd_duty_started",
    "cmd_epoch_seen",
    "cmd_key_epoch",
    "cmd_member_add",
    "cmd_member_address",
    "cmd_member_state",
    "cmd_ring",
    "cmd_stream_done",
    "decode_state",
    "encode_command",
    "encode_state",
]

BOOTSTRAP_INDEX = 1  # the bootstrap snapshot's index (and term)


@dataclass(frozen=True)
class ApplyResult:
    """What one command did: ``ok``, or ``error`` saying why not; ``value`` is op-specific
    (``duty_started``: "start" or "resume"; otherwise None)."""

    ok: bool
    error: str | None = None
    value: Any = None


class _Refused(Exception):
    """A well-formed command that does not fit the state."""


# -- commands -----------------------------------------------------------------------------


def encode_command(op: str, **fields: Any) -> bytes:
    """The log entry data of command ``op`` with ``fields``."""
    return bytes(msgpack.packb({"op": op, **fields}, use_bin_type=True))


def cmd_member_add(member: Member, weight: int = 1) -> bytes:
    """Add ``member`` with ring weight ``weight``."""
    return encode_command("member_add", member=member_wire(member), weight=weight)


def cmd_member_state(node_id: str, state: str) -> bytes:
    """Move a member to ``state`` (one of ``TRANSITIONS``)."""
    return encode_command("member_state", node_id=node_id, state=state)


def cmd_member_address(node_id: str, rpc_host: str, rpc_port: int) -> bytes:
    """Record a member's new RPC address."""
    return encode_command("member_address", node_id=node_id, host=rpc_host, port=rpc_port)


def cmd_ring(vnodes: int, weights: Mapping[str, int], expect_epoch: int | None = None) -> bytes:
    """Set the ring's vnodes and the weights of the named members (others keep theirs)."""
    fields: dict[str, Any] = {"vnodes": vnodes, "weights": dict(weights)}
    if expect_epoch is not None:
        fields["expect_epoch"] = expect_epoch
    return encode_command("ring", **fields)


def cmd_key_epoch(role: str, version: int, recipient: str, since_ms: int) -> bytes:
    """Record key ``version`` of ``role`` (must be newer than the recorded one)."""
    return encode_command(
        "key_epoch", role=role, version=version, recipient=recipient, since_ms=since_ms
    )


def cmd_custody(custody: Custody) -> bytes:
    """Replace the Shamir custody parameters: a re-share when ``custody.epoch`` > 0 (it
    must then be the current epoch + 1), else the parameters of the current epoch."""
    return encode_command("custody", custody=custody_wire(custody))


def cmd_duty_schedule(name: str, interval_s: int) -> bytes:
    """Create duty ``name`` or change its interval."""
    return encode_command("duty_schedule", name=name, interval_s=interval_s)


def cmd_duty_started(name: str, term: int, at_ms: int) -> bytes:
    """The leader of ``term`` starts (or resumes) duty ``name`` at ``at_ms``."""
    return encode_command("duty_started", name=name, term=term, at_ms=at_ms)


def cmd_duty_progress(name: str, term: int, cursor: bytes) -> bytes:
    """The leader of ``term`` records how far duty ``name`` has come."""
    return encode_command("duty_progress", name=name, term=term, cursor=cursor)


def cmd_duty_finished(name: str, term: int, at_ms: int, ok: bool, message: str) -> bytes:
    """The leader of ``term`` ends duty ``name`` (``message`` is cut to its limit)."""
    return encode_command(
        "duty_finished",
        name=name,
        term=term,
        at_ms=at_ms,
        ok=ok,
        message=message[:MAX_MESSAGE_CHARS],
    )


def cmd_stream_done(node_id: str, epoch: int) -> bytes:
    """Member ``node_id`` finished streaming its ranges for ring ``epoch``."""
    return encode_command("stream_done", node_id=node_id, epoch=epoch)


def cmd_epoch_seen(node_id: str, epoch: int) -> bytes:
    """Member ``node_id`` applied ring ``epoch`` (it routes by it)."""
    return encode_command("epoch_seen", node_id=node_id, epoch=epoch)


# -- apply --------------------------------------------------------------------------------


def apply(state: ClusterMetadata, index: int, data: bytes) -> tuple[ClusterMetadata, ApplyResult]:
    """Apply the committed command ``data`` at log ``index``. Never raises.

    Args:
        state: the state after ``index - 1``.
        index: the entry's log index; must be ``state.applied_index + 1``.
        data: the entry's data (empty: the leader's no-op).

    Returns:
        The next state and what the command did. A command that is malformed, unknown or
        does not fit the state changes only ``applied_index``; a wrong index changes nothing.
    """
    if isinstance(index, bool) or not isinstance(index, int) or index != state.applied_index + 1:
        return state, ApplyResult(
            False, f"index {index} does not follow applied index {state.applied_index}"
        )
    advanced = replace(state, applied_index=index)
    if not data:
        return advanced, ApplyResult(True)
    try:
        fields = Fields(_unpack(data), "command")
        op = fields.str_("op", MAX_NAME)
        handler = _HANDLERS.get(op)
        if handler is None:
            raise _Refused(f"unknown op {op!r}")
        after, value = handler(advanced, fields)
    except MalformedRaftData as exc:
        return advanced, ApplyResult(False, f"malformed: {exc}")
    except _Refused as exc:
        return advanced, ApplyResult(False, f"refused: {exc}")
    return after, ApplyResult(True, None, value)


def apply_entry(state: ClusterMetadata, entry: Entry) -> tuple[ClusterMetadata, ApplyResult]:
    """``apply`` for any committed entry: a CONF entry only advances ``applied_index``
    (the configuration itself is the Raft core's)."""
    return apply(state, entry.index, b"" if entry.kind is EntryKind.CONF else entry.data)


def _unpack(data: bytes) -> Any:
    try:
        return msgpack.unpackb(data, raw=False)
    except (ValueError, TypeError, msgpack.FormatError, msgpack.StackError):
        raise MalformedRaftData("command: does not decode") from None


def _bump(ring: RingEpoch, **changes: Any) -> RingEpoch:
    return replace(ring, epoch=ring.epoch + 1, **changes)


def _member(state: ClusterMetadata, fields: Fields) -> Member:
    node_id = fields.str_("node_id", MAX_NAME)
    member = state.members.get(node_id)
    if member is None or member.state == "removed":
        raise _Refused(f"no member {node_id!r}")
    return member


def _op_member_add(state: ClusterMetadata, fields: Fields) -> tuple[ClusterMetadata, Any]:
    member = member_from_wire(fields.sub("member"))
    weight = fields.int_("weight", 1, MAX_WEIGHT)
    if member.node_id in state.members:
        raise _Refused(f"node id {member.node_id!r} is or was a member")
    if member.state not in ("joining", "normal"):
        raise _Refused("a new member is joining or normal")
    if member.name in state.names().values():
        raise _Refused(f"name {member.name!r} is taken")
    members = {**state.members, member.node_id: member}
    ring = _bump(state.ring, weights=frozen_map({**state.ring.weights, member.node_id: weight}))
    return replace(state, members=frozen_map(members), ring=ring), None


def _op_member_state(state: ClusterMetadata, fields: Fields) -> tuple[ClusterMetadata, Any]:
    member = _member(state, fields)
    new = fields.str_("state", MAX_NAME)
    if new not in STATES:
        raise MalformedRaftData(f"command.state: not one of {sorted(STATES)}")
    if new not in TRANSITIONS[member.state]:
        raise _Refused(f"member {member.node_id!r} cannot go from {member.state} to {new}")
    members = {**state.members, member.node_id: replace(member, state=new)}
    weights = dict(state.ring.weights)
    custody = state.custody
    if new == "removed":
        del weights[member.node_id]
        if custody is not None and member.node_id in custody.holders:
            holders = {k: v for k, v in custody.holders.items() if k != member.node_id}
            custody = replace(custody, holders=frozen_map(holders), lost=custody.lost + 1)
    ring = _bump(state.ring, weights=frozen_map(weights))
    return replace(state, members=frozen_map(members), ring=ring, custody=custody), None


def _op_member_address(state: ClusterMetadata, fields: Fields) -> tuple[ClusterMetadata, Any]:
    member = _member(state, fields)
    moved = replace(
        member,
        rpc_host=fields.str_("host", MAX_NAME, empty=True),
        rpc_port=fields.int_("port", 0, 65535),
    )
    return replace(state, members=frozen_map({**state.members, member.node_id: moved})), None


def _op_ring(state: ClusterMetadata, fields: Fields) -> tuple[ClusterMetadata, Any]:
    if fields.has("expect_epoch") and fields.int_("expect_epoch") != state.ring.epoch:
        raise _Refused(f"the ring is at epoch {state.ring.epoch}")
    vnodes = fields.int_("vnodes", 1, MAX_VNODES)
    weights = fields.int_map("weights", MAX_NAME, 1, MAX_WEIGHT, len(state.members) + 1)
    for node_id in weights:
        if node_id not in state.ring.weights:
            raise _Refused(f"no member {node_id!r}")
    ring = _bump(state.ring, vnodes=vnodes, weights=frozen_map({**state.ring.weights, **weights}))
    return replace(state, ring=ring), None


def _op_key_epoch(state: ClusterMetadata, fields: Fields) -> tuple[ClusterMetadata, Any]:
    role = fields.str_("role", MAX_NAME)
    epoch = KeyEpoch(
        fields.int_("version", 1),
        fields.str_("recipient", MAX_RECIPIENT),
        fields.int_("since_ms"),
    )
    known = state.key_epochs.get(role)
    if known is not None and epoch.version <= known.version:
        raise _Refused(f"role {role!r} is at key version {known.version}")
    return replace(state, key_epochs=frozen_map({**state.key_epochs, role: epoch})), None


def _op_custody(state: ClusterMetadata, fields: Fields) -> tuple[ClusterMetadata, Any]:
    wire = fields.sub("custody")
    custody = custody_from_wire(wire)
    current = 0 if state.custody is None else state.custody.epoch
    if not wire.has("epoch"):  # the older form: same epoch, new parameters
        custody = replace(custody, epoch=current)
    elif custody.epoch != current + 1:
        raise _Refused(f"custody epoch {custody.epoch} is not the next epoch {current + 1}")
    for node_id in custody.holders:
        if node_id not in state.names():
            raise _Refused(f"holder {node_id!r} is not a member")
    return replace(state, custody=custody), None


def _duty(state: ClusterMetadata, fields: Fields) -> Duty:
    name = fields.str_("name", MAX_NAME)
    duty = state.duties.get(name)
    if duty is None:
        raise _Refused(f"no duty {name!r}")
    return duty


def _running(state: ClusterMetadata, fields: Fields) -> Duty:
    duty = _duty(state, fields)
    term = fields.int_("term", 1)
    if not duty.running or duty.last_term != term:
        raise _Refused(f"duty {duty.name!r} is not running under term {term}")
    return duty


def _with_duty(state: ClusterMetadata, duty: Duty) -> ClusterMetadata:
    return replace(state, duties=frozen_map({**state.duties, duty.name: duty}))


def _op_duty_schedule(state: ClusterMetadata, fields: Fields) -> tuple[ClusterMetadata, Any]:
    name = fields.str_("name", MAX_NAME)
    interval_s = fields.int_("interval_s", 1, 10**9)
    duty = state.duties.get(name)
    if duty is None and len(state.duties) >= MAX_DUTIES:
        raise _Refused(f"no more than {MAX_DUTIES} duties")
    duty = Duty(name, interval_s) if duty is None else replace(duty, interval_s=interval_s)
    return _with_duty(state, duty), None


def _op_duty_started(state: ClusterMetadata, fields: Fields) -> tuple[ClusterMetadata, Any]:
    duty = _duty(state, fields)
    term = fields.int_("term", 1)
    at_ms = fields.int_("at_ms")
    if term < duty.last_term:
        raise _Refused(f"duty {duty.name!r} was started under a newer term {duty.last_term}")
    if duty.running and term == duty.last_term:
        raise _Refused(f"duty {duty.name!r} already runs under term {term}")
    if duty.running:  # left running by a deposed leader: resume where it stopped
        return _with_duty(state, replace(duty, last_term=term)), "resume"
    started = replace(duty, running=True, last_term=term, last_started_ms=at_ms, cursor=b"")
    return _with_duty(state, started), "start"


def _op_duty_progress(state: ClusterMetadata, fields: Fields) -> tuple[ClusterMetadata, Any]:
    duty = _running(state, fields)
    cursor = fields.bytes_("cursor", MAX_CURSOR_BYTES)
    return _with_duty(state, replace(duty, cursor=cursor)), None


def _op_duty_finished(state: ClusterMetadata, fields: Fields) -> tuple[ClusterMetadata, Any]:
    duty = _running(state, fields)
    done = replace(
        duty,
        running=False,
        cursor=b"",
        last_finished_ms=fields.int_("at_ms"),
        last_ok=fields.bool_("ok"),
        last_message=fields.str_("message", MAX_MESSAGE_CHARS, empty=True),
    )
    return _with_duty(state, done), None


def _epoch_mark(state: ClusterMetadata, fields: Fields, marks: Mapping[str, int]) -> dict[str, int]:
    """``marks`` with the command's member raised to its epoch (never lowered)."""
    member = _member(state, fields)
    epoch = fields.int_("epoch", 1)
    if epoch > state.ring.epoch:
        raise _Refused(f"the ring is at epoch {state.ring.epoch}, not {epoch}")
    return {**marks, member.node_id: max(epoch, marks.get(member.node_id, 0))}


def _op_stream_done(state: ClusterMetadata, fields: Fields) -> tuple[ClusterMetadata, Any]:
    return replace(state, streamed=frozen_map(_epoch_mark(state, fields, state.streamed))), None


def _op_epoch_seen(state: ClusterMetadata, fields: Fields) -> tuple[ClusterMetadata, Any]:
    return replace(state, seen=frozen_map(_epoch_mark(state, fields, state.seen))), None


_Handler = Callable[[ClusterMetadata, Fields], tuple[ClusterMetadata, Any]]
_HANDLERS: Mapping[str, _Handler] = MappingProxyType(
    {
        "member_add": _op_member_add,
        "member_state": _op_member_state,
        "member_address": _op_member_address,
        "ring": _op_ring,
        "key_epoch": _op_key_epoch,
        "custody": _op_custody,
        "duty_schedule": _op_duty_schedule,
        "duty_started": _op_duty_started,
        "duty_progress": _op_duty_progress,
        "duty_finished": _op_duty_finished,
        "stream_done": _op_stream_done,
        "epoch_seen": _op_epoch_seen,
    }
)


# -- bootstrap ----------------------------------------------------------------------------


def bootstrap_state(
    cluster_id: str,
    members: list[Member] | tuple[Member, ...],
    custody: Custody | None,
    key_epochs: Mapping[str, KeyEpoch],
    vnodes: int = 64,
    duties: Mapping[str, int] = DEFAULT_DUTIES,
    *,
    index: int = BOOTSTRAP_INDEX,
    trusted_signers: Sequence[bytes] = (),
) -> ClusterMetadata:
    """The state of a new cluster at ``index`` (the bootstrap snapshot's), ring epoch 1.

    Args:
        cluster_id: a fresh random id (uuid4 hex).
        members: the founding members (normally all "normal"), weight 1 each.
        custody: the admin split, or None when the admin identity was never split.
        key_epochs: role -> its current key version.
        vnodes: the ring's vnodes (fixed for the cluster's life in practice).
        duties: duty name -> interval in seconds.
        index: the applied index the state stands for.
        trusted_signers: raw Ed25519 keys trusted to sign versions besides the members'
            (the signers of the backup a cluster is founded from; never members).

    Raises:
        MalformedRaftData: the values break an invariant (duplicate id or name, a holder
        that is not a member, ...).
    """
    state = ClusterMetadata(
        cluster_id=cluster_id,
        applied_index=check_int(index, "index", 0, MAX_INT),
        members=frozen_map({m.node_id: m for m in members}),
        ring=RingEpoch(
            1,
            vnodes,
            frozen_map({m.node_id: 1 for m in members if m.state != "removed"}),
        ),
        key_epochs=frozen_map(dict(key_epochs)),
        custody=custody,
        duties=frozen_map({name: Duty(name, s) for name, s in sorted(duties.items())}),
        trusted_signers=tuple(sorted(set(trusted_signers))),
    )
    if len(state.members) != len(members):
        raise MalformedRaftData("members: duplicate node id")
    return decode_state(encode_state(state))  # every field and invariant checked
