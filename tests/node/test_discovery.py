"""node.cluster.discovery: real Kademlia nodes on 127.0.0.1 UDP under trio-asyncio.

Each test polls with short sleeps inside ``trio.fail_after``: the outcome is fixed, only
the time it takes varies. Services refresh every 0.1 s and give up on a request after 0.3 s.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
import trio

from crypto.ca import CertificateAuthority
from node.cluster.discovery import (
    DiscoveryConfig,
    DiscoveryService,
    DiscoveryStateError,
    load_state_file,
    record_key,
    save_state_file,
)
from node.cluster.membership import Membership, RecordRejected
from tests.node.discovery_fixtures import (
    Running,
    issue,
    make_record,
    start,
    wait_until,
    wall_clock_ms,
)

EVERYONE = {"node-a", "node-b", "node-c"}
CONVERGE_S = 10


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    authority = CertificateAuthority.init(tmp_path / "ca")
    issue(authority, *sorted(EVERYONE))
    return authority


@pytest.fixture
def foreign(tmp_path: Path) -> CertificateAuthority:
    authority = CertificateAuthority.init(tmp_path / "foreign")
    issue(authority, "mallory")
    return authority


async def test_three_nodes_find_each_other_through_one(ca: CertificateAuthority) -> None:
    began = time.monotonic()
    async with trio.open_nursery() as nursery:
        a = await start(nursery, ca, "node-a")
        b = await start(nursery, ca, "node-b", [("127.0.0.1", a.port)])
        c = await start(nursery, ca, "node-c", [("127.0.0.1", a.port)])
        with trio.fail_after(CONVERGE_S):
            await wait_until(lambda: all(n.names() == EVERYONE for n in (a, b, c)))
        print(f"3 nodes converged in {time.monotonic() - began:.3f} s")
        # C bootstrapped from A only, yet holds B's record exactly as B signed it.
        assert c.membership.member("node-b") == b.membership.member("node-b")
        assert c.service.statistics().contacts == 2
        for running in (a, b, c):
            assert running.membership.statistics().rejected == {}
        nursery.cancel_scope.cancel()


async def test_record_from_a_foreign_ca_is_ignored_and_counted(
    ca: CertificateAuthority, foreign: CertificateAuthority
) -> None:
    async with trio.open_nursery() as nursery:
        a = await start(nursery, ca, "node-a")
        b = await start(nursery, ca, "node-b", [("127.0.0.1", a.port)])
        rogue = await start(nursery, foreign, "mallory", [("127.0.0.1", a.port)])
        with trio.fail_after(CONVERGE_S):
            await wait_until(
                lambda: all(
                    n.membership.statistics().rejected.get("foreign-ca", 0) >= 1
                    and n.names() == {"node-a", "node-b"}
                    for n in (a, b)
                )
            )
            # The rogue published into the DHT: A's storage refused it too.
            await wait_until(lambda: a.service.statistics().stores_refused >= 1)
        assert rogue.names() == {"mallory"}  # and it trusts none of ours
        nursery.cancel_scope.cancel()


async def test_newer_record_replaces_the_old_one(ca: CertificateAuthority) -> None:
    async with trio.open_nursery() as nursery:
        a = await start(nursery, ca, "node-a", issued_ms=1_000)
        b = await start(nursery, ca, "node-b", [("127.0.0.1", a.port)], issued_ms=1_000)
        c = await start(nursery, ca, "node-c", [("127.0.0.1", a.port)], issued_ms=1_000)
        with trio.fail_after(CONVERGE_S):
            await wait_until(lambda: all(n.names() == EVERYONE for n in (a, b, c)))
        with pytest.raises(ValueError, match="newer"):
            b.service.set_record(make_record(ca, "node-b", issued_ms=999))
        b.service.set_record(make_record(ca, "node-b", issued_ms=2_000, rpc_port=7100))

        def moved(running: Running) -> bool:
            record = running.membership.member("node-b")
            return record is not None and record.rpc_port == 7100

        with trio.fail_after(CONVERGE_S):
            await wait_until(lambda: moved(a) and moved(c))
        assert a.membership.statistics().accepted == 4  # three records, then B's newer one
        nursery.cancel_scope.cancel()


async def test_restarted_node_reloads_its_json_state(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    state = tmp_path / "node-c.state.json"
    async with trio.open_nursery() as nursery:
        a = await start(nursery, ca, "node-a")
        b = await start(nursery, ca, "node-b", [("127.0.0.1", a.port)])
        c = await start(nursery, ca, "node-c", [("127.0.0.1", a.port)], state_path=state)
        peers = {("127.0.0.1", a.port), ("127.0.0.1", b.port)}
        with trio.fail_after(CONVERGE_S):
            await wait_until(lambda: state.exists() and set(load_state_file(state) or ()) == peers)
        c.scope.cancel()
        assert json.loads(state.read_text())["version"] == 1

        # Restarted on another port with no bootstrap address: only the state file helps.
        c2 = await start(nursery, ca, "node-c", state_path=state)
        assert c2.port != c.port
        with trio.fail_after(CONVERGE_S):
            await wait_until(lambda: c2.names() == EVERYONE)
            # A and B learn C's new address (same Kademlia id) as soon as it talks to them.
            await wait_until(
                lambda: all(("127.0.0.1", c2.port) in n.service.neighbours() for n in (a, b))
            )
        nursery.cancel_scope.cancel()


async def test_malformed_datagrams_are_dropped_and_counted(ca: CertificateAuthority) -> None:
    async with trio.open_nursery() as nursery:
        a = await start(nursery, ca, "node-a")
        b = await start(nursery, ca, "node-b", [("127.0.0.1", a.port)])
        with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as sock:
            for junk in (
                b"\x00",  # too short
                b"\x07" + bytes(20) + b"\x90",  # unknown kind
                b"\x00" + bytes(20) + b"\xc1",  # not msgpack
                b"\x00" + bytes(20) + b"\x92\xa4ping\x90",  # wrong arity
                b"\x00" + bytes(20) + b"\x92\xa4stun\x91\x01",  # not an RPC we serve
                b"\x00" + bytes(20) + b"\x92\xa4ping\x91\xa3bad",  # node id not 20 bytes
                b"\x00" + bytes(20) + b"\x92\x91\x01\x91\x01",  # unhashable RPC name
            ):
                await sock.sendto(junk, ("127.0.0.1", a.port))
        with trio.fail_after(CONVERGE_S):
            await wait_until(lambda: a.service.statistics().datagrams_malformed == 7)
            await wait_until(lambda: a.names() == b.names() == {"node-a", "node-b"})
        nursery.cancel_scope.cancel()


async def test_own_record_must_verify(ca: CertificateAuthority, tmp_path: Path) -> None:
    other = CertificateAuthority.init(tmp_path / "other")
    issue(other, "node-a")
    record = make_record(other, "node-a", issued_ms=wall_clock_ms())
    service = DiscoveryService(
        DiscoveryConfig(), record, Membership(ca), ca, clock_ms=wall_clock_ms
    )
    with pytest.raises(RecordRejected, match="foreign-ca"):
        await service.run()


def test_state_file_round_trip_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    assert load_state_file(path) is None
    save_state_file(path, [("127.0.0.1", 4000), ("::1", 4001)])
    assert load_state_file(path) == [("127.0.0.1", 4000), ("::1", 4001)]
    for bad in (
        "not json",
        '{"version": 2, "neighbours": []}',
        '{"version": 1}',
        '{"version": 1, "neighbours": [["example.org", 4000]]}',
        '{"version": 1, "neighbours": [["127.0.0.1", 0]]}',
    ):
        path.write_text(bad)
        with pytest.raises(DiscoveryStateError):
            load_state_file(path)


def test_service_load_state_adds_bootstrap_addresses(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    path = tmp_path / "state.json"
    record = make_record(ca, "node-a", issued_ms=wall_clock_ms())
    service = DiscoveryService(
        DiscoveryConfig(), record, Membership(ca), ca, clock_ms=wall_clock_ms
    )
    assert service.load_state(path) == []
    save_state_file(path, [("127.0.0.1", 4000)])
    assert service.load_state(path) == [("127.0.0.1", 4000)]
    assert service.save_state(path) == 0  # not running: no neighbours, file left alone
    assert load_state_file(path) == [("127.0.0.1", 4000)]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"host": "localhost"},
        {"bootstrap": [("node-a.example", 4000)]},
        {"bootstrap": [("127.0.0.1", 0)]},
        {"port": 70000},
        {"refresh_s": 0},
        {"ksize": 0},
    ],
)
def test_config_is_validated(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="discovery"):
        DiscoveryConfig(**kwargs)  # type: ignore[arg-type]


def test_record_key_is_sha1_of_the_prefixed_name() -> None:
    """The spec, restated: peers compute each other's key and Kademlia id from the name."""
    expected = hashlib.sha1(b"slurp/node/node-a", usedforsecurity=False).digest()
    assert record_key("node-a") == expected
