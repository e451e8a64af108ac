"""The cluster-metadata values: members, ring epoch, key epochs, custody, duties.

A pure module (no I/O, no clock, no randomness); ``node.control.metadata`` re-exports
these and owns how they change. Must not know the log, the wire form (see
``node.control.metadata_codec``) or how a ring places keys.

Invariants: every value is a frozen dataclass; every mapping is a read-only view
(``frozen_map``), so a ``ClusterMetadata`` once built never changes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TypeVar

STATES = frozenset({"joining", "normal", "leaving", "removed"})
# Member state machine (Cassandra/Riak style). "normal -> removed" is the forced removal of a
# dead node; "leaving -> normal" cancels a leave. Removed is final: a node id is never reused.
TRANSITIONS: Mapping[str, frozenset[str]] = MappingProxyType(
    {
        "joining": frozenset({"normal", "removed"}),
        "normal": frozenset({"leaving", "removed"}),
        "leaving": frozenset({"normal", "removed"}),
        "removed": frozenset(),
    }
)
RING_STATES = frozenset({"normal", "leaving"})  # members the ring routes by

DEFAULT_DUTIES: Mapping[str, int] = MappingProxyType(
    {"ttl_sweep": 60, "compaction": 3600, "rotation_check": 3600}
)  # duty name -> interval in seconds ("backup" arrives with the backup issue)

MAX_NAME = 128  # node ids, names, roles, duty names, hosts
MAX_RECIPIENT = 256  # an age recipient is ~62 characters
MAX_CURSOR_BYTES = 4096
MAX_MESSAGE_CHARS = 512
MAX_VNODES = 4096
MAX_WEIGHT = 1_000_000
MAX_SHARES = 255
MAX_MEMBERS = 4096
MAX_DUTIES = 64
MAX_ROLES = 256
MAX_TRUSTED_SIGNERS = 4096  # trusted signing keys that are not members (a restore's signers)

K = TypeVar("K")
V = TypeVar("V")


def frozen_map(items: Mapping[K, V]) -> Mapping[K, V]:
    """A read-only copy of ``items``."""
    return MappingProxyType(dict(items))


@dataclass(frozen=True)
class Member:
    """A cluster member. ``node_id`` is the keyring's node id (never reused); ``name`` the
    node's name (what the ring and the data plane use); ``age_recipient`` its node
    recipient (shares and role identities are sealed to it); ``signing_key`` its raw
    Ed25519 version-signing public key (b"": not recorded), trusted by every node that
    applies the member, so replicas accept its versions before discovery finds it."""

    node_id: str
    name: str
    state: str
    age_recipient: str
    rpc_host: str = ""
    rpc_port: int = 0
    signing_key: bytes = b""


@dataclass(frozen=True)
class RingEpoch:
    """The ring a node routes by: ``epoch`` grows with every membership or weight change;
    ``weights`` node_id -> weight for every member not removed."""

    epoch: int
    vnodes: int
    weights: Mapping[str, int]


@dataclass(frozen=True)
class KeyEpoch:
    """A role's current key version, its recipient, and since when (ms, wall clock)."""

    version: int
    recipient: str
    since_ms: int


@dataclass(frozen=True)
class Custody:
    """The admin identity's Shamir split: ``threshold`` of ``shares``; ``holders`` node_id ->
    share number (1-based) it keeps sealed to its node recipient. ``epoch`` numbers the
    split (0: the one ``cluster up`` made; each re-share is the next); shares of different
    epochs never combine. ``lost``: shares of this epoch that left with a member since
    removed (a reason to re-share: those shares must stop counting)."""

    threshold: int
    shares: int
    admin_recipient: str
    holders: Mapping[str, int]
    epoch: int = 0
    lost: int = 0


@dataclass(frozen=True)
class Duty:
    """A leader duty and its last run. ``running`` with ``last_term``: the term of the
    leader that runs it; ``cursor``: where a resumed run picks up (duty-specific)."""

    name: str
    interval_s: int
    last_started_ms: int = 0
    last_finished_ms: int = 0
    last_term: int = 0  # 0: never started
    running: bool = False
    cursor: bytes = b""
    last_ok: bool = True
    last_message: str = ""


@dataclass(frozen=True)
class ClusterMetadata:
    """The whole metadata state after the entry at ``applied_index``."""

    cluster_id: str
    applied_index: int
    members: Mapping[str, Member]  # node_id -> member (removed ones too)
    ring: RingEpoch
    key_epochs: Mapping[str, KeyEpoch]  # role -> key epoch
    custody: Custody | None
    duties: Mapping[str, Duty]  # name -> duty
    # node_id -> the highest ring epoch whose range streaming that node finished
    # (``stream_done``), and the highest ring epoch it applied (``epoch_seen``)
    streamed: Mapping[str, int] = field(default_factory=lambda: frozen_map({}))
    seen: Mapping[str, int] = field(default_factory=lambda: frozen_map({}))
    # raw Ed25519 keys that signed the versions a cluster was founded from (``cluster up
    # --restore``): trusted like a member's signing key, never members; sorted, distinct
    trusted_signers: tuple[bytes, ...] = ()

    def signing_keys(self, *, removed: bool = False) -> list[bytes]:
        """Every key this cluster trusts to sign versions: the signing keys of the members
        not removed (with ``removed``: of every member ever), then the trusted signers."""
        members = [
            m.signing_key
            for _, m in sorted(self.members.items())
            if m.signing_key and (removed or m.state != "removed")
        ]
        return [*members, *(k for k in self.trusted_signers if k not in members)]

    def names(self) -> dict[str, str]:
        """node_id -> name of every member not removed."""
        return {i: m.name for i, m in sorted(self.members.items()) if m.state != "removed"}

    def ring_members(self) -> tuple[str, ...]:
        """Names of the members the ring routes by (normal or leaving), sorted."""
        return tuple(sorted(m.name for m in self.members.values() if m.state in RING_STATES))

    def ring_weights(self) -> dict[str, int]:
        """name -> ring weight of the members the ring routes by."""
        return {
            m.name: self.ring.weights[m.node_id]
            for m in sorted(self.members.values(), key=lambda m: m.name)
            if m.state in RING_STATES
        }

    def member_by_name(self, name: str) -> Member | None:
        """The member not removed called ``name``, or None."""
        for member in self.members.values():
            if member.name == name and member.state != "removed":
                return member
        return None
