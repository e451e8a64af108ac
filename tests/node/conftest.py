"""Fixtures for node tests: a cluster CA in tmp_path with node and client certificates,
and (real tier) a fresh 3-node cluster of real processes."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from crypto.ca import CertificateAuthority
from crypto.tls import TlsFiles
from node.daemon.ops import LocalNode, cluster_down, cluster_up

LONG_AGO = datetime.now(UTC) - timedelta(days=400)
CLIENT_ROLES = ("backend_developer", "observer")


@dataclass
class Pki:
    """A CA directory with ``node-a``/``node-b`` (node certs for 127.0.0.1 and localhost)
    and ``alice`` (a client with ``CLIENT_ROLES``); ``foreign`` is another CA of the same
    name holding ``mallory``."""

    ca: CertificateAuthority
    foreign: CertificateAuthority

    def files(self, name: str) -> TlsFiles:
        """The TLS files of a certificate issued by our CA."""
        return TlsFiles.in_directory(self.ca.directory, name)

    def fingerprint(self, name: str) -> str:
        """The SHA-256 fingerprint the CA lists for ``name``."""
        [issued] = [c for c in self.ca.list() if c.name == name]
        return issued.fingerprint_sha256

    def foreign_files(self, name: str) -> TlsFiles:
        """Trusts our CA, presents a certificate of the foreign one (an impostor)."""
        return TlsFiles(
            ca_cert=self.files("alice").ca_cert,
            cert=self.foreign.directory / f"{name}.crt",
            key=self.foreign.directory / f"{name}.key",
            crl=self.files("alice").crl,
        )


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca = CertificateAuthority.init(tmp_path / "ca")
    for node in ("node-a", "node-b"):
        ca.issue_node(node, ["127.0.0.1", "localhost"])
    ca.issue_client("alice", list(CLIENT_ROLES))
    foreign = CertificateAuthority.init(tmp_path / "foreign")
    foreign.issue_client("mallory", ["admin"])
    return Pki(ca=ca, foreign=foreign)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[Path, list[LocalNode]]]:
    """A fresh 3-node cluster (real processes) in ``tmp_path / "cluster"``, stopped after
    the test (test_real_cluster.py overrides it with one cluster per module)."""
    root = tmp_path / "cluster"
    members = cluster_up(root, 3, timeout_s=90)
    try:
        yield root, members
    finally:
        cluster_down(root)
