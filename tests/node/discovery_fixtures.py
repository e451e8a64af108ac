"""Helpers for membership and discovery tests: a CA with node certificates, signed records,
and services run in their own cancel scopes. Plain functions, so tests import them freely.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from crypto.ca import CertificateAuthority
from node.cluster.discovery import DiscoveryConfig, DiscoveryService
from node.cluster.membership import Membership, NodeRecord

AGE_RECIPIENT = "age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p"
FAST_REFRESH_S = 0.1
FAST_RPC_TIMEOUT_S = 0.3


def wall_clock_ms() -> int:
    """Unix milliseconds: certificates are checked against the real clock."""
    return time.time_ns() // 1_000_000


def node_key(ca: CertificateAuthority, name: str) -> Ed25519PrivateKey:
    """The private key of the node certificate ``D/NAME.crt`` (its record signing key)."""
    key = load_pem_private_key((ca.directory / f"{name}.key").read_bytes(), password=None)
    assert isinstance(key, Ed25519PrivateKey)
    return key


def issue(ca: CertificateAuthority, *names: str) -> None:
    """Issue node certificates for 127.0.0.1."""
    for name in names:
        ca.issue_node(name, ["127.0.0.1"])


def make_record(
    ca: CertificateAuthority,
    name: str,
    *,
    issued_ms: int = 1_000,
    key: Ed25519PrivateKey | None = None,
    **overrides: Any,
) -> NodeRecord:
    """A record of ``name`` signed with its certificate's key (or ``key``)."""
    fields: dict[str, Any] = {
        "name": name,
        "node_id": name.encode().hex()[:16],
        "rpc_host": "127.0.0.1",
        "rpc_port": 7000,
        "http_port": 7001,
        "dht_port": 7002,
        "cert_pem": (ca.directory / f"{name}.crt").read_bytes(),
        "age_recipient": AGE_RECIPIENT,
        "issued_ms": issued_ms,
    }
    fields.update(overrides)
    return NodeRecord.signed(key or node_key(ca, name), **fields)


@dataclass
class Running:
    """A started service: its membership, bound port and the scope that stops it."""

    service: DiscoveryService
    membership: Membership
    port: int
    scope: trio.CancelScope

    def names(self) -> set[str]:
        return {record.name for record in self.membership.members()}


async def start(
    nursery: trio.Nursery,
    ca: CertificateAuthority,
    name: str,
    bootstrap: Sequence[tuple[str, int]] = (),
    *,
    state_path: Path | None = None,
    issued_ms: int | None = None,
) -> Running:
    """Start a discovery service for ``name`` (a certificate of ``ca``) on a free port."""
    record = make_record(ca, name, issued_ms=issued_ms or wall_clock_ms())
    config = DiscoveryConfig(
        bootstrap=list(bootstrap),
        refresh_s=FAST_REFRESH_S,
        rpc_timeout_s=FAST_RPC_TIMEOUT_S,
        state_path=state_path,
    )
    membership = Membership(ca)
    service = DiscoveryService(config, record, membership, ca, clock_ms=wall_clock_ms)
    port, scope = await nursery.start(_serve, service)
    return Running(service, membership, port, scope)


async def _serve(
    service: DiscoveryService,
    *,
    task_status: trio.TaskStatus[tuple[int, trio.CancelScope]] = trio.TASK_STATUS_IGNORED,
) -> None:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(service.run)
        task_status.started((port, nursery.cancel_scope))


async def wait_until(condition: Callable[[], bool], *, poll_s: float = 0.02) -> None:
    """Poll ``condition`` (the caller bounds the wait with ``trio.fail_after``).

    Polling on purpose: the state watched (several services' memberships) has no event.
    """
    while not condition():  # noqa: ASYNC110
        await trio.sleep(poll_s)
