"""node.cluster.membership: the node record format, its verification reasons, and the pure core.

Certificates are issued at a fixed date and every check passes ``now`` explicitly, so no
test here reads the clock or sleeps.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from crypto.ca import CertificateAuthority
from node.cluster.membership import (
    MAX_CLOCK_SKEW_MS,
    REVERIFY_MS,
    Membership,
    NodeRecord,
    RecordMalformed,
    RecordRejected,
)
from node.errors import ProtocolError
from tests.node.discovery_fixtures import make_record, node_key

ISSUED_AT = datetime(2030, 1, 1, tzinfo=UTC)
NOW_MS = int((ISSUED_AT + timedelta(days=1)).timestamp() * 1000)
NAMES = ("node-a", "node-b", "node-c")


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    """Our CA with node certificates node-a, node-b, node-c, all issued at ISSUED_AT."""
    authority = CertificateAuthority.init(tmp_path / "ca", now=ISSUED_AT)
    for name in NAMES:
        authority.issue_node(name, ["127.0.0.1"], now=ISSUED_AT)
    return authority


@pytest.fixture
def foreign(tmp_path: Path) -> CertificateAuthority:
    """Another CA (same default name) holding its own node-a and mallory."""
    authority = CertificateAuthority.init(tmp_path / "foreign", now=ISSUED_AT)
    for name in ("node-a", "mallory"):
        authority.issue_node(name, ["127.0.0.1"], now=ISSUED_AT)
    return authority


def rejection(record: NodeRecord, ca: CertificateAuthority, now_ms: int = NOW_MS) -> str:
    with pytest.raises(RecordRejected) as caught:
        record.verify(ca, now_ms)
    return caught.value.reason


# -- the record format ---------------------------------------------------------------------


def test_record_round_trips_and_verifies(ca: CertificateAuthority) -> None:
    record = make_record(ca, "node-a")
    assert NodeRecord.decode(record.encode()) == record
    assert msgpack.unpackb(record.encode())["v"] == 1
    assert record.verify(ca, NOW_MS).name == "node-a"


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda body: body.update(v=2), id="unknown-version"),
        pytest.param(lambda body: body.update(v=True), id="bool-version"),
        pytest.param(lambda body: body.pop("signature"), id="missing-field"),
        pytest.param(lambda body: body.update(extra=1), id="unknown-field"),
        pytest.param(lambda body: body.update(rpc_port="7000"), id="port-as-text"),
        pytest.param(lambda body: body.update(rpc_port=True), id="port-as-bool"),
        pytest.param(lambda body: body.update(dht_port=70000), id="port-out-of-range"),
        pytest.param(lambda body: body.update(name="../etc"), id="bad-name"),
        pytest.param(lambda body: body.update(node_id="XYZ"), id="bad-node-id"),
        pytest.param(lambda body: body.update(signature=b"short"), id="short-signature"),
        pytest.param(lambda body: body.update(cert_pem=b"x" * 5000), id="huge-cert"),
        pytest.param(lambda body: body.update(age_recipient="ssh-ed25519"), id="bad-recipient"),
        pytest.param(lambda body: body.update(issued_ms=-1), id="negative-time"),
    ],
)
def test_decode_refuses_malformed_fields(ca: CertificateAuthority, mutate: object) -> None:
    body = msgpack.unpackb(make_record(ca, "node-a").encode())
    mutate(body)  # type: ignore[operator]
    with pytest.raises(RecordMalformed) as caught:
        NodeRecord.decode(msgpack.packb(body))
    assert isinstance(caught.value, ProtocolError)


@pytest.mark.parametrize(
    "data", [b"", b"\xc1", b"\x93\x01\x02\x03", b"\x91" * 3000, b"\x00" * 5000, "text"]
)
def test_decode_refuses_non_records(data: bytes) -> None:
    with pytest.raises(RecordMalformed):
        NodeRecord.decode(data)


def test_signed_requires_exactly_the_fields(ca: CertificateAuthority) -> None:
    with pytest.raises(RecordMalformed):
        make_record(ca, "node-a", surplus=1)


# -- verification reasons ------------------------------------------------------------------


def test_foreign_ca(ca: CertificateAuthority, foreign: CertificateAuthority) -> None:
    assert rejection(make_record(foreign, "node-a"), ca) == "foreign-ca"


def test_expired_and_not_yet_valid(ca: CertificateAuthority) -> None:
    record = make_record(ca, "node-a")
    assert rejection(record, ca, NOW_MS + 400 * 86_400_000) == "expired"
    assert rejection(record, ca, NOW_MS - 2 * 86_400_000) == "not-yet-valid"


def test_revoked(ca: CertificateAuthority) -> None:
    record = make_record(ca, "node-a")
    ca.revoke("node-a", now=ISSUED_AT)
    assert rejection(record, ca) == "revoked"


def test_bad_signature(ca: CertificateAuthority) -> None:
    forged = make_record(ca, "node-a", key=Ed25519PrivateKey.generate())
    assert rejection(forged, ca) == "bad-signature"
    tampered = dataclasses.replace(make_record(ca, "node-a"), rpc_port=6666)
    assert rejection(tampered, ca) == "bad-signature"


def test_name_mismatch(ca: CertificateAuthority) -> None:
    """node-a's certificate and key cannot vouch for a record named node-b."""
    cert_a = (ca.directory / "node-a.crt").read_bytes()
    record = make_record(ca, "node-b", cert_pem=cert_a, key=node_key(ca, "node-a"))
    assert rejection(record, ca) == "name-mismatch"


def test_client_certificate_is_wrong_usage(ca: CertificateAuthority) -> None:
    ca.issue_client("alice", ["observer"], now=ISSUED_AT)
    assert rejection(make_record(ca, "alice"), ca) == "wrong-usage"


def test_issued_in_future(ca: CertificateAuthority) -> None:
    record = make_record(ca, "node-a", issued_ms=NOW_MS + MAX_CLOCK_SKEW_MS + 1)
    assert rejection(record, ca) == "issued-in-future"
    assert make_record(ca, "node-a", issued_ms=NOW_MS + MAX_CLOCK_SKEW_MS).verify(ca, NOW_MS)


# -- the membership core -------------------------------------------------------------------


def test_observe_keeps_verified_records_sorted(ca: CertificateAuthority) -> None:
    membership = Membership(ca)
    for name in reversed(NAMES):
        assert membership.observe(make_record(ca, name).encode(), NOW_MS)
    assert [r.name for r in membership.members()] == list(NAMES)
    assert not membership.observe(make_record(ca, "node-a").encode(), NOW_MS)
    stats = membership.statistics()
    assert (stats.members, stats.accepted, stats.unchanged, stats.rejected) == (3, 3, 1, {})


def test_foreign_and_malformed_records_are_ignored_and_counted(
    ca: CertificateAuthority, foreign: CertificateAuthority
) -> None:
    membership = Membership(ca)
    assert not membership.observe(make_record(foreign, "mallory").encode(), NOW_MS)
    assert not membership.observe(make_record(foreign, "node-a").encode(), NOW_MS)
    assert not membership.observe(b"\x81\xa1v\x01", NOW_MS)
    assert membership.members() == []
    assert membership.statistics().rejected == {"foreign-ca": 2, "malformed": 1}


def test_newest_record_wins(ca: CertificateAuthority) -> None:
    old = make_record(ca, "node-a", issued_ms=1_000, rpc_port=7000)
    new = make_record(ca, "node-a", issued_ms=2_000, rpc_port=7100)
    membership = Membership(ca)
    assert membership.observe(old.encode(), NOW_MS)
    assert membership.observe(new.encode(), NOW_MS)
    assert not membership.observe(old.encode(), NOW_MS)
    assert membership.member("node-a") == new
    assert membership.statistics().stale == 1


@pytest.fixture(scope="module")
def versions(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[CertificateAuthority, list[NodeRecord]]:
    """A CA and two versions of each node's record; node-c's two share one issued_ms."""
    authority = CertificateAuthority.init(tmp_path_factory.mktemp("versions"), now=ISSUED_AT)
    for name in NAMES:
        authority.issue_node(name, ["127.0.0.1"], now=ISSUED_AT)
    records = [
        make_record(authority, "node-a", issued_ms=1),
        make_record(authority, "node-a", issued_ms=2),
        make_record(authority, "node-b", issued_ms=9),
        make_record(authority, "node-b", issued_ms=5),
        make_record(authority, "node-c", issued_ms=7, rpc_port=1),
        make_record(authority, "node-c", issued_ms=7, rpc_port=2),
    ]
    return authority, records


@settings(max_examples=15, deadline=None, derandomize=True)
@given(order=st.permutations(range(6)))
def test_outcome_does_not_depend_on_order(
    versions: tuple[CertificateAuthority, list[NodeRecord]], order: list[int]
) -> None:
    """Whatever the order of observation, the newest record per name wins (ties too)."""
    authority, records = versions
    membership = Membership(authority)
    for index in order:
        membership.observe(records[index].encode(), NOW_MS)
    tie = max(records[4:], key=NodeRecord.encode)
    assert membership.members() == [records[1], records[2], tie]


def test_evicts_a_member_whose_record_stops_verifying(ca: CertificateAuthority) -> None:
    membership = Membership(ca)
    record = make_record(ca, "node-b")
    membership.observe(record.encode(), NOW_MS)
    ca.revoke("node-b", now=ISSUED_AT)
    assert not membership.observe(record.encode(), NOW_MS + REVERIFY_MS - 1)  # not checked
    assert membership.member("node-b") == record
    assert not membership.observe(record.encode(), NOW_MS + REVERIFY_MS)
    assert membership.member("node-b") is None
    assert membership.statistics().evicted == 1
    assert membership.statistics().rejected == {"revoked": 1}


def test_liveness_marks(ca: CertificateAuthority) -> None:
    membership = Membership(ca)
    for name in NAMES:
        membership.observe(make_record(ca, name).encode(), NOW_MS)
    assert membership.is_up("node-b")  # members start up
    assert membership.mark_down("node-b", 100)
    assert not membership.mark_down("node-b", 150)  # already down, since 100
    assert membership.down_since("node-b") == 100
    assert not membership.is_up("node-b")
    assert [r.name for r in membership.live_members()] == ["node-a", "node-c"]
    assert not membership.mark_up("node-b", 90)  # a report older than the last change
    assert not membership.is_up("node-b")
    assert membership.mark_up("node-b", 200)
    assert membership.is_up("node-b")
    assert membership.down_since("node-b") is None
    assert not membership.mark_up("node-a", 10)  # up already
    assert membership.statistics().live == 3


def test_liveness_of_non_members(ca: CertificateAuthority) -> None:
    membership = Membership(ca)
    assert not membership.mark_up("node-z", 10)
    assert not membership.is_up("node-z")
    assert membership.mark_down("node-z", 20)
    membership.observe(make_record(ca, "node-c").encode(), NOW_MS)
    assert membership.is_up("node-c")
    assert membership.live_members() == membership.members()
