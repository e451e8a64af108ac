"""Membership: the set of verified node records, and liveness as the RPC layer reports it.

Owns (ARCHITECTURE.md §6, Discovery and membership):

- ``NodeRecord``: what a node publishes about itself, its wire format and its signature.
- ``Membership``: a pure core (§2) that keeps the newest verified record per node name and
  the up/down state fed by failure detection on the RPC channel.

Must not know: Kademlia, sockets, trio, the clock. Time comes in as ``now_ms`` (Unix
milliseconds); the only outside call is the CA's certificate check (which reads its CRL).

Record format, version 1 (msgpack map, string keys, exactly these)::

    {"v": 1, "name": str, "node_id": hex str, "rpc_host": str, "rpc_port": int,
     "http_port": int, "dht_port": int, "cert_pem": bytes, "age_recipient": str,
     "issued_ms": int, "signature": bytes(64)}

The signature is Ed25519, by the key certified in ``cert_pem``, over ``SIGNATURE_DOMAIN``
followed by the msgpack array of every other field in the order above (``v`` first), so the
signed bytes never depend on map ordering. A new format gets a new ``v`` and a new domain.

Invariants:

- A record in ``Membership`` verified under this CA when it was observed: its certificate
  is a node certificate of this CA, not revoked or expired, whose CN is the record's name,
  and whose key signed the record.
- Per name, the newest record wins: a larger ``issued_ms``; on a tie, the larger encoding
  (so every node that saw the same records keeps the same one, whatever the order).
- Out-of-order liveness reports (older than the last transition) change nothing.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

import msgpack
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from crypto.certs import IssuedCert, load_certificate
from crypto.errors import CertificateError
from crypto.signing import SignatureInvalid, verify
from node.errors import NodeError, ProtocolError

RECORD_VERSION = 1
SIGNATURE_DOMAIN = b"slurp/node-record/v1\x00"
MAX_RECORD_BYTES = 4096
MAX_CERT_PEM_BYTES = 3072
MAX_CLOCK_SKEW_MS = 5 * 60 * 1000
REVERIFY_MS = 60 * 1000
SIGNATURE_BYTES = 64

# The reasons ``NodeRecord.verify`` gives. Certificate problems keep the CA's own reason
# (crypto.ca: "foreign-ca", "expired", "revoked", "bad-signature", "not-yet-valid",
# "wrong-usage", "malformed"); the record adds the rest.
REJECT_REASONS = (
    "malformed",
    "foreign-ca",
    "bad-signature",
    "expired",
    "not-yet-valid",
    "revoked",
    "wrong-usage",
    "name-mismatch",
    "issued-in-future",
)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_HEX_ID = re.compile(r"[0-9a-f]{1,64}")
_FIELDS = (
    "name",
    "node_id",
    "rpc_host",
    "rpc_port",
    "http_port",
    "dht_port",
    "cert_pem",
    "age_recipient",
    "issued_ms",
)


class RecordMalformed(ProtocolError, ValueError):
    """Bytes or field values that are not a version-1 node record (the sender's fault)."""


class RecordRejected(NodeError):
    """A well-formed record that does not verify; ``reason`` is one of ``REJECT_REASONS``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


class CertificateVerifier(Protocol):
    """What a record needs from the cluster CA (``crypto.ca.CertificateAuthority`` is one)."""

    def verify(
        self,
        cert_pem: bytes,
        *,
        now: datetime | None = None,
        usage: Literal["node", "client"] | None = None,
    ) -> IssuedCert: ...


def _check_port(name: str, value: object) -> None:
    if type(value) is not int or not 0 <= value <= 65535:
        raise RecordMalformed(f"{name} must be an integer port in 0..65535")


def _check_text(name: str, value: object, max_len: int) -> None:
    if type(value) is not str or not 0 < len(value) <= max_len:
        raise RecordMalformed(f"{name} must be a string of 1..{max_len} characters")


@dataclass(frozen=True)
class NodeRecord:
    """A node's signed self-description; see the module docstring for the format.

    Attributes:
        name: The node's name, equal to its certificate's CN.
        node_id: The node's id, lower-case hex.
        rpc_host: Host of the node's RPC (mutual-TLS) listener.
        rpc_port: Port of the RPC listener.
        http_port: Port of the metrics/health HTTP listener (0: none).
        dht_port: UDP port of the node's Kademlia listener (0: not known yet).
        cert_pem: The node's CA-issued certificate, PEM.
        age_recipient: The node's age recipient (``age1...``) for wrapped secrets.
        issued_ms: When the node signed this record (Unix ms); newer replaces older.
        signature: Ed25519 signature by the certificate's key.
    """

    name: str
    node_id: str
    rpc_host: str
    rpc_port: int
    http_port: int
    dht_port: int
    cert_pem: bytes
    age_recipient: str
    issued_ms: int
    signature: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if type(self.name) is not str or not _NAME.fullmatch(self.name):
            raise RecordMalformed("name must match [A-Za-z0-9][A-Za-z0-9._-]{0,62}")
        if type(self.node_id) is not str or not _HEX_ID.fullmatch(self.node_id):
            raise RecordMalformed("node_id must be 1..64 lower-case hex digits")
        _check_text("rpc_host", self.rpc_host, 253)
        for port in ("rpc_port", "http_port", "dht_port"):
            _check_port(port, getattr(self, port))
        if type(self.cert_pem) is not bytes or len(self.cert_pem) > MAX_CERT_PEM_BYTES:
            raise RecordMalformed(f"cert_pem must be at most {MAX_CERT_PEM_BYTES} bytes")
        if not self.cert_pem.startswith(b"-----BEGIN CERTIFICATE-----"):
            raise RecordMalformed("cert_pem must be a PEM certificate")
        _check_text("age_recipient", self.age_recipient, 256)
        if not self.age_recipient.startswith("age1"):
            raise RecordMalformed("age_recipient must be an age1... recipient")
        if type(self.issued_ms) is not int or not 0 <= self.issued_ms < 2**63:
            raise RecordMalformed("issued_ms must be a non-negative 64-bit integer")
        if type(self.signature) is not bytes or len(self.signature) != SIGNATURE_BYTES:
            raise RecordMalformed(f"signature must be {SIGNATURE_BYTES} bytes")

    @classmethod
    def signed(cls, key: Ed25519PrivateKey, **fields: Any) -> NodeRecord:
        """Build and sign a record.

        Args:
            key: The private key of the node certificate in ``fields["cert_pem"]``.
            **fields: Every attribute except ``signature``.

        Returns:
            The signed record.

        Raises:
            RecordMalformed: a field is missing, unknown or invalid.
        """
        if set(fields) != set(_FIELDS):
            raise RecordMalformed(f"a record needs exactly the fields {', '.join(_FIELDS)}")
        unsigned = cls(**fields, signature=bytes(SIGNATURE_BYTES))
        return cls(**fields, signature=key.sign(unsigned.signing_message()))

    def signing_message(self) -> bytes:
        """The exact bytes the signature covers (domain, then the fields in order)."""
        values = [RECORD_VERSION, *(getattr(self, name) for name in _FIELDS)]
        packed: bytes = msgpack.packb(values, use_bin_type=True)
        return SIGNATURE_DOMAIN + packed

    def encode(self) -> bytes:
        """The version-1 wire form (a msgpack map)."""
        body = {"v": RECORD_VERSION, **asdict(self)}
        data: bytes = msgpack.packb(body, use_bin_type=True)
        if len(data) > MAX_RECORD_BYTES:
            raise RecordMalformed(f"an encoded record exceeds {MAX_RECORD_BYTES} bytes")
        return data

    @classmethod
    def decode(cls, data: bytes) -> NodeRecord:
        """Parse a version-1 record (its signature is not checked here: see ``verify``).

        Raises:
            RecordMalformed: not bytes, too long, not msgpack, wrong version or fields.
        """
        if type(data) is not bytes or len(data) > MAX_RECORD_BYTES:
            raise RecordMalformed(f"a record is at most {MAX_RECORD_BYTES} bytes")
        try:
            body = msgpack.unpackb(data, raw=False, strict_map_key=True)
        except (ValueError, TypeError, msgpack.UnpackException):
            raise RecordMalformed("a record must be one msgpack map") from None
        if not isinstance(body, dict):
            raise RecordMalformed("a record must be one msgpack map")
        if body.get("v") != RECORD_VERSION or type(body.get("v")) is not int:
            raise RecordMalformed("unsupported record version")
        if set(body) != {"v", "signature", *_FIELDS}:
            raise RecordMalformed("a version-1 record has exactly the version-1 fields")
        del body["v"]
        return cls(**body)

    def verify(self, ca: CertificateVerifier, now_ms: int) -> IssuedCert:
        """Check the record against ``ca`` at ``now_ms``.

        Returns:
            What the CA says about the record's certificate.

        Raises:
            RecordRejected: with the CA's reason for the certificate ("foreign-ca",
                "expired", "revoked", "bad-signature", ...), "name-mismatch" (CN is not
                the record's name), "bad-signature" (the record's signature) or
                "issued-in-future" (``issued_ms`` beyond ``MAX_CLOCK_SKEW_MS``).
        """
        now = datetime.fromtimestamp(now_ms / 1000, UTC)
        try:
            issued = ca.verify(self.cert_pem, now=now, usage="node")
        except CertificateError as exc:
            raise RecordRejected(exc.reason, str(exc)) from None
        if issued.name != self.name:
            raise RecordRejected("name-mismatch", f"certificate CN is not {self.name!r}")
        if self.issued_ms > now_ms + MAX_CLOCK_SKEW_MS:
            raise RecordRejected("issued-in-future", "issued_ms is ahead of this clock")
        public = load_certificate(self.cert_pem).public_key()
        if not isinstance(public, Ed25519PublicKey):
            raise RecordRejected("bad-signature", "the certificate key is not Ed25519")
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        try:
            verify(raw, self.signature, self.signing_message())
        except SignatureInvalid:
            raise RecordRejected("bad-signature", "the record signature does not verify") from None
        return issued


def newer(candidate: NodeRecord, current: NodeRecord) -> bool:
    """Whether ``candidate`` replaces ``current`` (same name): later, or equal and larger."""
    if candidate.issued_ms != current.issued_ms:
        return candidate.issued_ms > current.issued_ms
    return candidate.encode() > current.encode()


@dataclass(frozen=True)
class MembershipStatistics:
    """Counters since the core was created.

    Attributes:
        members: Verified members now.
        live: Members not marked down.
        accepted: Records that became a member's current record.
        unchanged: Valid records equal to the current one (re-observed).
        stale: Valid records older than the current one.
        evicted: Members dropped because their current record stopped verifying.
        rejected: Records refused, by reason (see ``REJECT_REASONS``).
    """

    members: int
    live: int
    accepted: int
    unchanged: int
    stale: int
    evicted: int
    rejected: Mapping[str, int]


@dataclass(frozen=True)
class _Liveness:
    up: bool
    since_ms: int


@dataclass
class _Member:
    record: NodeRecord
    encoding: bytes
    verified_ms: int


class Membership:
    """The verified node records of one cluster, newest per name, with liveness.

    Discovery feeds the same records again and again, so a member's current record, seen
    again byte for byte, is re-verified only ``REVERIFY_MS`` after its last check: a
    revoked or expired member leaves at its first observation after that.

    Args:
        ca: The cluster CA that every member's certificate must come from.
    """

    def __init__(self, ca: CertificateVerifier) -> None:
        self._ca = ca
        self._members: dict[str, _Member] = {}
        self._by_encoding: dict[bytes, str] = {}
        self._liveness: dict[str, _Liveness] = {}
        self._counts: Counter[str] = Counter()
        self._rejected: Counter[str] = Counter()

    def observe(self, record_bytes: bytes, now_ms: int) -> bool:
        """Feed one encoded record, from anywhere (the DHT, a peer, this node).

        A record that fails verification is counted by reason and otherwise ignored,
        except that a member whose *current* record stops verifying (revoked, expired)
        is evicted.

        Returns:
            True if the record became its node's current record.
        """
        known = self._members.get(self._by_encoding.get(record_bytes, ""))
        if known is not None and 0 <= now_ms - known.verified_ms < REVERIFY_MS:
            self._counts["unchanged"] += 1
            return False
        try:
            record = NodeRecord.decode(record_bytes)
        except RecordMalformed:
            self._rejected["malformed"] += 1
            return False
        current = self._members.get(record.name)
        try:
            record.verify(self._ca, now_ms)
        except RecordRejected as exc:
            self._rejected[exc.reason] += 1
            if current is not None and current.record == record:
                self._forget(record.name)
                self._counts["evicted"] += 1
            return False
        if current is not None and current.record == record:
            current.verified_ms = now_ms
            self._counts["unchanged"] += 1
            return False
        if current is not None and not newer(record, current.record):
            self._counts["stale"] += 1
            return False
        self._forget(record.name)
        self._members[record.name] = _Member(record, record_bytes, now_ms)
        self._by_encoding[record_bytes] = record.name
        self._counts["accepted"] += 1
        return True

    def _forget(self, name: str) -> None:
        member = self._members.pop(name, None)
        if member is not None:
            del self._by_encoding[member.encoding]

    def member(self, name: str) -> NodeRecord | None:
        """The current record of ``name``, or None if it is not a member."""
        member = self._members.get(name)
        return None if member is None else member.record

    def members(self) -> list[NodeRecord]:
        """Every member's current record, sorted by name."""
        return [self._members[name].record for name in sorted(self._members)]

    def mark_up(self, name: str, now_ms: int) -> bool:
        """The RPC layer reached ``name`` at ``now_ms``. Returns True if its state changed."""
        return self._mark(name, _Liveness(up=True, since_ms=now_ms))

    def mark_down(self, name: str, now_ms: int) -> bool:
        """The RPC layer failed to reach ``name`` at ``now_ms``. True if its state changed."""
        return self._mark(name, _Liveness(up=False, since_ms=now_ms))

    def _mark(self, name: str, report: _Liveness) -> bool:
        last = self._liveness.get(name)
        if last is not None and (report.since_ms < last.since_ms or last.up == report.up):
            return False
        if last is None and report.up:
            self._liveness[name] = report
            return False  # members start up; this only records since when
        self._liveness[name] = report
        return True

    def is_up(self, name: str) -> bool:
        """Whether ``name`` is a member not marked down (members start up)."""
        if name not in self._members:
            return False
        state = self._liveness.get(name)
        return state is None or state.up

    def down_since(self, name: str) -> int | None:
        """When ``name`` was marked down (Unix ms), or None if it is not down."""
        state = self._liveness.get(name)
        return None if state is None or state.up else state.since_ms

    def live_members(self) -> list[NodeRecord]:
        """The members that are up, sorted by name."""
        return [record for record in self.members() if self.is_up(record.name)]

    def statistics(self) -> MembershipStatistics:
        """Counters: members, live, accepted, unchanged, stale, evicted, rejected by reason."""
        return MembershipStatistics(
            members=len(self._members),
            live=len(self.live_members()),
            accepted=self._counts["accepted"],
            unchanged=self._counts["unchanged"],
            stale=self._counts["stale"],
            evicted=self._counts["evicted"],
            rejected=dict(self._rejected),
        )
