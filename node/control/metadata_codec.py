"""The msgpack form of the cluster metadata: snapshot data and the values inside commands.

A pure module (no I/O, no clock, no randomness). Snapshot data is a map
``{"v": STATE_SCHEMA, "cluster_id", "applied_index", "members": [member...],
"ring": {"epoch", "vnodes", "weights": {node_id: int}}, "key_epochs": {role: {"version",
"recipient", "since_ms"}}, "custody": None | {"threshold", "shares", "admin_recipient",
"holders": {node_id: int}, "epoch"?, "lost"?}, "duties": [duty...]}`` where a member is
``{"id", "name", "state", "recipient", "host", "port"}`` and a duty ``{"name", "interval_s",
"last_started_ms", "last_finished_ms", "last_term", "running", "cursor", "last_ok",
"last_message"}``; ``"streamed"`` and ``"seen"`` map node_id -> ring epoch (absent in
snapshots written before they existed: empty); ``"trusted"`` is the sorted list of raw
Ed25519 trusted signers (``cluster up --restore``), written only when not empty (absent:
empty), so every state written before it existed reads, and encodes, as it did;
custody's ``"epoch"`` and ``"lost"`` are written only when not 0 (absent: 0), so a state
without re-shares encodes to the bytes it always did. Lists are sorted by id / name so
equal states encode to equal bytes.

Must not know how commands change the state (``node.control.metadata``).

Invariant: ``decode_state`` returns a state that passes ``check_state`` or raises
``MalformedRaftData`` naming the field; ``decode_state(encode_state(s)) == s``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgpack

from node.control.metadata_fields import MAX_INT, Fields, check_int, check_str
from node.control.metadata_types import (
    MAX_CURSOR_BYTES,
    MAX_DUTIES,
    MAX_MEMBERS,
    MAX_MESSAGE_CHARS,
    MAX_NAME,
    MAX_RECIPIENT,
    MAX_ROLES,
    MAX_SHARES,
    MAX_TRUSTED_SIGNERS,
    MAX_VNODES,
    MAX_WEIGHT,
    STATES,
    ClusterMetadata,
    Custody,
    Duty,
    KeyEpoch,
    Member,
    RingEpoch,
    frozen_map,
)
from node.control.raft_types import MalformedRaftData

STATE_SCHEMA = 1
SIGNING_KEY_BYTES = 32  # a raw Ed25519 public key


def member_wire(member: Member) -> dict[str, Any]:
    """The wire form of a member."""
    return {
        "id": member.node_id,
        "name": member.name,
        "state": member.state,
        "recipient": member.age_recipient,
        "host": member.rpc_host,
        "port": member.rpc_port,
        "sign": member.signing_key,
    }


def member_from_wire(fields: Fields) -> Member:
    """A member from its wire form."""
    state = fields.str_("state", MAX_NAME)
    if state not in STATES:
        raise MalformedRaftData(f"{fields.path}.state: not one of {sorted(STATES)}")
    return Member(
        node_id=fields.str_("id", MAX_NAME),
        name=fields.str_("name", MAX_NAME),
        state=state,
        age_recipient=fields.str_("recipient", MAX_RECIPIENT, empty=True),
        rpc_host=fields.str_("host", MAX_NAME, empty=True),
        rpc_port=fields.int_("port", 0, 65535),
        signing_key=fields.bytes_("sign", SIGNING_KEY_BYTES) if fields.has("sign") else b"",
    )


def custody_wire(custody: Custody) -> dict[str, Any]:
    """The wire form of the custody parameters (``epoch`` and ``lost`` only when not 0)."""
    wire: dict[str, Any] = {
        "threshold": custody.threshold,
        "shares": custody.shares,
        "admin_recipient": custody.admin_recipient,
        "holders": dict(custody.holders),
    }
    if custody.epoch:
        wire["epoch"] = custody.epoch
    if custody.lost:
        wire["lost"] = custody.lost
    return wire


def custody_from_wire(fields: Fields) -> Custody:
    """Custody parameters from their wire form (threshold <= shares, distinct share numbers,
    held plus lost shares at most ``shares``; ``epoch``/``lost`` absent: 0)."""
    shares = fields.int_("shares", 1, MAX_SHARES)
    threshold = fields.int_("threshold", 1, shares)
    holders = fields.int_map("holders", MAX_NAME, 1, shares, MAX_SHARES)
    if len(set(holders.values())) != len(holders):
        raise MalformedRaftData(f"{fields.path}.holders: a share number is held twice")
    lost = fields.int_("lost", 0, shares - len(holders)) if fields.has("lost") else 0
    return Custody(
        threshold,
        shares,
        fields.str_("admin_recipient", MAX_RECIPIENT),
        frozen_map(dict(sorted(holders.items()))),
        epoch=fields.int_("epoch", 0, MAX_INT) if fields.has("epoch") else 0,
        lost=lost,
    )


def _duty_wire(duty: Duty) -> dict[str, Any]:
    return {
        "name": duty.name,
        "interval_s": duty.interval_s,
        "last_started_ms": duty.last_started_ms,
        "last_finished_ms": duty.last_finished_ms,
        "last_term": duty.last_term,
        "running": duty.running,
        "cursor": duty.cursor,
        "last_ok": duty.last_ok,
        "last_message": duty.last_message,
    }


def _duty_from_wire(fields: Fields) -> Duty:
    return Duty(
        name=fields.str_("name", MAX_NAME),
        interval_s=fields.int_("interval_s", 1, 10**9),
        last_started_ms=fields.int_("last_started_ms"),
        last_finished_ms=fields.int_("last_finished_ms"),
        last_term=fields.int_("last_term"),
        running=fields.bool_("running"),
        cursor=fields.bytes_("cursor", MAX_CURSOR_BYTES),
        last_ok=fields.bool_("last_ok"),
        last_message=fields.str_("last_message", MAX_MESSAGE_CHARS, empty=True),
    )


def encode_state(state: ClusterMetadata) -> bytes:
    """The snapshot data of ``state`` (deterministic: equal states, equal bytes)."""
    row = {
        "v": STATE_SCHEMA,
        "cluster_id": state.cluster_id,
        "applied_index": state.applied_index,
        "members": [member_wire(m) for _, m in sorted(state.members.items())],
        "ring": {
            "epoch": state.ring.epoch,
            "vnodes": state.ring.vnodes,
            "weights": dict(sorted(state.ring.weights.items())),
        },
        "key_epochs": {
            role: {"version": e.version, "recipient": e.recipient, "since_ms": e.since_ms}
            for role, e in sorted(state.key_epochs.items())
        },
        "custody": None if state.custody is None else custody_wire(state.custody),
        "duties": [_duty_wire(d) for _, d in sorted(state.duties.items())],
        "streamed": dict(sorted(state.streamed.items())),
        "seen": dict(sorted(state.seen.items())),
    }
    if state.trusted_signers:
        row["trusted"] = sorted(state.trusted_signers)
    return bytes(msgpack.packb(row, use_bin_type=True))


def decode_state(data: bytes) -> ClusterMetadata:
    """The state in snapshot ``data``.

    Raises:
        MalformedRaftData: the data does not decode, is of another schema, or a field is
        malformed or breaks an invariant (the message names the field).
    """
    try:
        raw = msgpack.unpackb(data, raw=False)
    except (ValueError, TypeError, msgpack.FormatError, msgpack.StackError):
        raise MalformedRaftData("state: does not decode") from None
    fields = Fields(raw, "state")
    if fields.int_("v") != STATE_SCHEMA:
        raise MalformedRaftData(f"state.v: schema {raw['v']} is not {STATE_SCHEMA}")
    members: dict[str, Member] = {}
    for i, item in enumerate(fields.list_("members", MAX_MEMBERS)):
        member = member_from_wire(Fields(item, f"state.members[{i}]"))
        if member.node_id in members:
            raise MalformedRaftData(f"state.members[{i}].id: duplicate")
        members[member.node_id] = member
    ring = fields.sub("ring")
    key_epochs = {}
    roles = fields.sub("key_epochs")
    if len(roles.raw) > MAX_ROLES:
        raise MalformedRaftData(f"state.key_epochs: more than {MAX_ROLES} roles")
    for role in roles.raw:
        entry = roles.sub(check_str(role, "state.key_epochs key", MAX_NAME))
        key_epochs[role] = KeyEpoch(
            entry.int_("version", 1),
            entry.str_("recipient", MAX_RECIPIENT),
            entry.int_("since_ms"),
        )
    duties: dict[str, Duty] = {}
    for i, item in enumerate(fields.list_("duties", MAX_DUTIES)):
        duty = _duty_from_wire(Fields(item, f"state.duties[{i}]"))
        if duty.name in duties:
            raise MalformedRaftData(f"state.duties[{i}].name: duplicate")
        duties[duty.name] = duty
    custody_raw = fields.raw.get("custody")
    state = ClusterMetadata(
        cluster_id=fields.str_("cluster_id", MAX_NAME),
        applied_index=fields.int_("applied_index"),
        members=frozen_map(members),
        ring=RingEpoch(
            ring.int_("epoch"),
            ring.int_("vnodes", 1, MAX_VNODES),
            frozen_map(
                dict(sorted(ring.int_map("weights", MAX_NAME, 1, MAX_WEIGHT, MAX_MEMBERS).items()))
            ),
        ),
        key_epochs=frozen_map(dict(sorted(key_epochs.items()))),
        custody=None if custody_raw is None else custody_from_wire(fields.sub("custody")),
        duties=frozen_map(duties),
        streamed=_epochs(fields, "streamed"),
        seen=_epochs(fields, "seen"),
        trusted_signers=trusted_from_wire(fields),
    )
    check_state(state)
    return state


def _epochs(fields: Fields, name: str) -> Mapping[str, int]:
    """node_id -> epoch map ``name`` (absent in older snapshots: empty)."""
    if not fields.has(name):
        return frozen_map({})
    return frozen_map(dict(sorted(fields.int_map(name, MAX_NAME, 0, MAX_INT, MAX_MEMBERS).items())))


def trusted_from_wire(fields: Fields, name: str = "trusted") -> tuple[bytes, ...]:
    """The sorted, distinct raw Ed25519 keys of list ``name`` (absent: none)."""
    if not fields.has(name):
        return ()
    keys = []
    for i, item in enumerate(fields.list_(name, MAX_TRUSTED_SIGNERS)):
        if not isinstance(item, bytes) or len(item) != SIGNING_KEY_BYTES:
            raise MalformedRaftData(
                f"{fields.path}.{name}[{i}]: not a raw Ed25519 key ({SIGNING_KEY_BYTES} bytes)"
            )
        keys.append(item)
    return tuple(sorted(set(keys)))


def check_state(state: ClusterMetadata) -> None:
    """Check the cross-field invariants of ``state``.

    Raises:
        MalformedRaftData: ring weights are not exactly the members not removed, two such
        members share a name, or a custody holder is not one of them.
    """
    check_str(state.cluster_id, "state.cluster_id", MAX_NAME)
    live = state.names()
    if len(set(live.values())) != len(live):
        raise MalformedRaftData("state.members: two members share a name")
    if set(state.ring.weights) != set(live):
        raise MalformedRaftData("state.ring.weights: not exactly the members not removed")
    for weight in state.ring.weights.values():
        check_int(weight, "state.ring.weights", 1, MAX_WEIGHT)
    if state.custody is not None and not set(state.custody.holders) <= set(live):
        raise MalformedRaftData("state.custody.holders: a holder is not a member")
    for name, epochs in (("streamed", state.streamed), ("seen", state.seen)):
        if not set(epochs) <= set(state.members):
            raise MalformedRaftData(f"state.{name}: a node id that never was a member")
