"""The values the Raft core (``node.control.raft``) takes and gives, and their wire form.

Owns: entries, hard state, configurations, snapshots, messages, soft state and ``Ready``
(the etcd-io/raft RawNode/Ready vocabulary), and the msgpack-ready dict form of a message
and of a snapshot. A pure module: no I/O, no clock, no randomness.

Node ids are opaque non-empty strings (slurp uses the keyring's random ``node_id``; the
transcript tests use "1", "2", "3"). Index 0 and term 0 mean "nothing".

Invariant: ``message_from_wire`` and ``snapshot_from_wire`` return a well-formed value or
raise ``MalformedRaftData`` naming the field; they never raise anything else.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

MAX_ID_LENGTH = 128


class MalformedRaftData(ValueError):
    """A message, entry or snapshot from the wire or the disk is malformed (names the field)."""


class EntryKind(enum.Enum):
    """What an entry carries: an application command (empty data: the leader's no-op) or a
    new configuration (``ConfState`` in ``Entry.conf``)."""

    NORMAL = "normal"
    CONF = "conf"


@dataclass(frozen=True)
class ConfState:
    """A configuration: the voters and the learners (non-voting members being caught up)."""

    voters: frozenset[str]
    learners: frozenset[str] = frozenset()

    def to_wire(self) -> dict[str, Any]:
        return {"voters": sorted(self.voters), "learners": sorted(self.learners)}


@dataclass(frozen=True)
class Entry:
    """One log entry. ``conf`` is set exactly when ``kind`` is CONF (the whole new config)."""

    index: int
    term: int
    kind: EntryKind = EntryKind.NORMAL
    data: bytes = b""
    conf: ConfState | None = None

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "i": self.index,
            "t": self.term,
            "k": self.kind.value,
            "d": self.data,
        }
        if self.conf is not None:
            out["c"] = self.conf.to_wire()
        return out


@dataclass(frozen=True)
class HardState:
    """What must be durable (synced) before any message that depends on it leaves."""

    term: int = 0
    vote: str | None = None
    commit: int = 0


@dataclass(frozen=True)
class SnapshotMeta:
    """The last index and term a snapshot covers, and the configuration at that index."""

    index: int
    term: int
    conf: ConfState


@dataclass(frozen=True)
class Snapshot:
    """The application state (``data``, opaque to the core) up to and including ``meta.index``."""

    meta: SnapshotMeta
    data: bytes = b""

    def to_wire(self) -> dict[str, Any]:
        return {
            "index": self.meta.index,
            "term": self.meta.term,
            "conf": self.meta.conf.to_wire(),
            "data": self.data,
        }


class MessageType(enum.Enum):
    """Raft messages (thesis names in comments)."""

    VOTE = "vote"  # RequestVote
    VOTE_RESP = "vote_resp"
    PRE_VOTE = "pre_vote"  # §9.6: asks at term+1 without raising the term
    PRE_VOTE_RESP = "pre_vote_resp"
    APP = "app"  # AppendEntries with entries (or a probe)
    APP_RESP = "app_resp"
    HEARTBEAT = "heartbeat"  # AppendEntries without entries; carries commit and a context
    HEARTBEAT_RESP = "heartbeat_resp"
    SNAP = "snap"  # InstallSnapshot (whole, not chunked: the metadata state is small)


@dataclass(frozen=True)
class Message:
    """One Raft message. Fields a type does not use keep their defaults.

    - ``log_term``/``index``: APP: the entry preceding ``entries``; VOTE/PRE_VOTE: the
      candidate's last entry; APP_RESP: ``index`` is the highest index now matching
      (accept) or the rejected probe index (reject), ``reject_hint`` the follower's last
      index (reject).
    - ``commit``: the sender's commit index (APP, HEARTBEAT).
    - ``context``: HEARTBEAT/HEARTBEAT_RESP: the leader's heartbeat round, echoed back
      (the lease counts from the round's send tick).
    """

    type: MessageType
    src: str
    dst: str
    term: int
    log_term: int = 0
    index: int = 0
    entries: tuple[Entry, ...] = ()
    commit: int = 0
    reject: bool = False
    reject_hint: int = 0
    snapshot: Snapshot | None = None
    context: int = 0

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "type": self.type.value,
            "src": self.src,
            "dst": self.dst,
            "term": self.term,
        }
        if self.log_term:
            out["log_term"] = self.log_term
        if self.index:
            out["index"] = self.index
        if self.entries:
            out["entries"] = [e.to_wire() for e in self.entries]
        if self.commit:
            out["commit"] = self.commit
        if self.reject:
            out["reject"] = True
        if self.reject_hint:
            out["reject_hint"] = self.reject_hint
        if self.snapshot is not None:
            out["snapshot"] = self.snapshot.to_wire()
        if self.context:
            out["context"] = self.context
        return out


class Role(enum.Enum):
    """A node's role in its current term."""

    FOLLOWER = "follower"
    PRE_CANDIDATE = "pre_candidate"
    CANDIDATE = "candidate"
    LEADER = "leader"


@dataclass(frozen=True)
class SoftState:
    """What need not be durable: the known leader (None: unknown) and the role."""

    leader: str | None
    role: Role


@dataclass
class Ready:
    """What the shell must do, in this order, before ``RawNode.advance(ready)``:

    1. persist ``snapshot`` (if any; it replaces the log up to its index), then ``entries``
       (an entry at index i discards stored entries >= i), then ``hard_state`` (if any),
       synced when ``must_sync``; a failed sync is fatal to the node, never retried;
    2. only then send ``messages``;
    3. apply ``snapshot`` (if any), then ``committed_entries`` in order;
    4. call ``advance(ready)``.
    ``soft_state`` is set when the leader or role changed (None: unchanged).
    """

    soft_state: SoftState | None = None
    hard_state: HardState | None = None
    entries: list[Entry] = field(default_factory=list)
    snapshot: Snapshot | None = None
    committed_entries: list[Entry] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)
    must_sync: bool = False


@dataclass(frozen=True)
class PersistedState:
    """What a restarting node loads from its disk: its hard state, its latest snapshot (None:
    never compacted and never bootstrapped from one), and the entries after it."""

    hard_state: HardState = HardState()
    snapshot: Snapshot | None = None
    entries: tuple[Entry, ...] = ()


# -- the wire form ----------------------------------------------------------------------


def _field(raw: Mapping[Any, Any], name: str, kind: type, default: Any = None) -> Any:
    value = raw.get(name, default)
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise MalformedRaftData(f"{name}: expected an integer")
    if kind is int and not 0 <= value < 2**63:
        raise MalformedRaftData(f"{name}: out of range")
    if kind is not int and not isinstance(value, kind):
        raise MalformedRaftData(f"{name}: expected {kind.__name__}")
    return value


def _node_id(raw: Mapping[Any, Any], name: str) -> str:
    value = _field(raw, name, str)
    if not 0 < len(value) <= MAX_ID_LENGTH:
        raise MalformedRaftData(f"{name}: a node id is 1 to {MAX_ID_LENGTH} characters")
    return str(value)


def _mapping(value: Any, name: str) -> Mapping[Any, Any]:
    if not isinstance(value, Mapping):
        raise MalformedRaftData(f"{name}: expected a map")
    return value


def conf_from_wire(raw: Any, name: str = "conf") -> ConfState:
    """A ``ConfState`` from its wire form."""
    raw = _mapping(raw, name)
    sets = []
    for part in ("voters", "learners"):
        items = raw.get(part, [])
        if not isinstance(items, list) or not all(isinstance(i, str) and i for i in items):
            raise MalformedRaftData(f"{name}.{part}: expected a list of node ids")
        sets.append(frozenset(items))
    if sets[0] & sets[1]:
        raise MalformedRaftData(f"{name}: a node is both voter and learner")
    return ConfState(sets[0], sets[1])


def entry_from_wire(raw: Any, name: str = "entry") -> Entry:
    """An ``Entry`` from its wire form."""
    raw = _mapping(raw, name)
    try:
        kind = EntryKind(raw.get("k"))
    except ValueError:
        raise MalformedRaftData(f"{name}.k: unknown entry kind") from None
    conf = None
    if kind is EntryKind.CONF:
        conf = conf_from_wire(raw.get("c"), f"{name}.c")
    index = _field(raw, "i", int)
    term = _field(raw, "t", int)
    if index < 1 or term < 1:
        raise MalformedRaftData(f"{name}: index and term start at 1")
    return Entry(index, term, kind, bytes(_field(raw, "d", bytes, b"")), conf)


def snapshot_from_wire(raw: Any, name: str = "snapshot") -> Snapshot:
    """A ``Snapshot`` from its wire form."""
    raw = _mapping(raw, name)
    meta = SnapshotMeta(
        _field(raw, "index", int),
        _field(raw, "term", int),
        conf_from_wire(raw.get("conf"), f"{name}.conf"),
    )
    return Snapshot(meta, bytes(_field(raw, "data", bytes, b"")))


def message_from_wire(raw: Any) -> Message:
    """A ``Message`` from its wire form (``Message.to_wire``)."""
    raw = _mapping(raw, "message")
    try:
        kind = MessageType(raw.get("type"))
    except ValueError:
        raise MalformedRaftData("type: unknown message type") from None
    entries_raw = raw.get("entries", [])
    if not isinstance(entries_raw, list):
        raise MalformedRaftData("entries: expected a list")
    entries = tuple(entry_from_wire(e, f"entries[{i}]") for i, e in enumerate(entries_raw))
    snap = raw.get("snapshot")
    reject = raw.get("reject", False)
    if not isinstance(reject, bool):
        raise MalformedRaftData("reject: expected a boolean")
    return Message(
        type=kind,
        src=_node_id(raw, "src"),
        dst=_node_id(raw, "dst"),
        term=_field(raw, "term", int),
        log_term=_field(raw, "log_term", int, 0),
        index=_field(raw, "index", int, 0),
        entries=entries,
        commit=_field(raw, "commit", int, 0),
        reject=reject,
        reject_hint=_field(raw, "reject_hint", int, 0),
        snapshot=None if snap is None else snapshot_from_wire(snap),
        context=_field(raw, "context", int, 0),
    )
