"""crypto.ca, crypto.certs and crypto.tls: issuing, revoking, verifying, and real mutual TLS."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from crypto.ca import CertificateAuthority, certificate_roles, load_certificate
from crypto.certs import ROLES_OID
from crypto.errors import CertificateError
from crypto.tls import TlsFiles, client_ssl_context, peer_certificate, server_ssl_context

LONG_AGO = datetime.now(UTC) - timedelta(days=400)
needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.init(tmp_path / "ca")


@pytest.fixture
def foreign_ca(tmp_path: Path) -> CertificateAuthority:
    """Another CA with the very same name, as an attacker would make."""
    return CertificateAuthority.init(tmp_path / "foreign")


def _pem(ca: CertificateAuthority, name: str) -> bytes:
    return (ca.directory / f"{name}.crt").read_bytes()


def _reason(
    ca: CertificateAuthority,
    pem: bytes,
    *,
    now: datetime | None = None,
    usage: Literal["node", "client"] | None = None,
) -> str:
    with pytest.raises(CertificateError) as caught:
        ca.verify(pem, now=now, usage=usage)
    return caught.value.reason


# --- issuing and listing ---------------------------------------------------------------


def test_init_writes_ca_files_with_private_key_0600(ca: CertificateAuthority) -> None:
    """init writes ca.crt, ca.key (0600) and an empty CRL; a second init refuses."""
    assert (ca.directory / "ca.key").stat().st_mode & 0o777 == 0o600
    assert (ca.directory / "ca.crl").is_file()
    [only] = ca.list()
    assert (only.kind, only.name, only.revoked) == ("ca", "slurp cluster CA", False)
    with pytest.raises(CertificateError) as caught:
        CertificateAuthority.init(ca.directory)
    assert caught.value.reason == "exists"


def test_open_checks_presence_and_key_permissions(ca: CertificateAuthority, tmp_path: Path) -> None:
    """open finds the CA; a missing CA or a group-readable key is refused."""
    assert CertificateAuthority.open(ca.directory).certificate == ca.certificate
    with pytest.raises(CertificateError) as missing:
        CertificateAuthority.open(tmp_path / "nowhere")
    assert missing.value.reason == "missing"
    (ca.directory / "ca.key").chmod(0o640)
    with pytest.raises(CertificateError) as loose:
        CertificateAuthority.open(ca.directory)
    assert loose.value.reason == "permissions"


def test_issue_and_list(ca: CertificateAuthority) -> None:
    """Issued node and client certificates are listed with kind, hosts and roles."""
    node = ca.issue_node("node-1", ["node-1.example", "127.0.0.1", "::1"])
    client = ca.issue_client("alice", ["backend_developer", "observer"])
    assert (ca.directory / "node-1.key").stat().st_mode & 0o777 == 0o600
    assert (ca.directory / "alice.key").stat().st_mode & 0o777 == 0o600
    assert node.hosts == ("node-1.example", "127.0.0.1", "::1")
    assert (node.kind, node.roles) == ("node", ())
    assert (client.kind, client.hosts) == ("client", ())
    assert client.roles == ("backend_developer", "observer")
    assert [(c.name, c.kind) for c in ca.list()] == [
        ("slurp cluster CA", "ca"),
        ("alice", "client"),
        ("node-1", "node"),
    ]
    assert client.not_after - client.not_before == timedelta(days=365, minutes=5)


def test_validity_is_capped_at_the_ca(tmp_path: Path) -> None:
    """A certificate never outlives its CA."""
    short = CertificateAuthority.init(tmp_path / "short", valid_days=10)
    issued = short.issue_client("bob", ["observer"], valid_days=365)
    assert issued.not_after == short.certificate.not_valid_after_utc


@pytest.mark.parametrize(
    ("call", "reason"),
    [
        (lambda ca: ca.issue_client("ca", []), "bad-name"),
        (lambda ca: ca.issue_client("../x", []), "bad-name"),
        (lambda ca: ca.issue_client("bob", ["has space"]), "bad-role"),
        (lambda ca: ca.issue_node("n", []), "bad-host"),
        (lambda ca: ca.issue_node("n", ["bad host!"]), "bad-host"),
        (lambda ca: ca.issue_node("dup", ["h"]) and ca.issue_client("dup", []), "exists"),
    ],
)
def test_issue_refuses_bad_requests(
    ca: CertificateAuthority, call: Callable[[CertificateAuthority], object], reason: str
) -> None:
    """Bad names, roles, hosts and reused names are refused with their reason."""
    with pytest.raises(CertificateError) as caught:
        call(ca)
    assert caught.value.reason == reason


def test_client_roles_round_trip(ca: CertificateAuthority) -> None:
    """Roles come back from the PEM in order, deduplicated, also past DER's short form."""
    many = [f"role_{i:03d}" for i in range(40)]
    ca.issue_client("many", [*many, "role_000"])
    ca.issue_client("none", [])
    ca.issue_node("node", ["localhost"])
    assert certificate_roles(load_certificate(_pem(ca, "many"))) == tuple(many)
    assert certificate_roles(load_certificate(_pem(ca, "none"))) == ()
    assert certificate_roles(load_certificate(_pem(ca, "node"))) == ()
    ext = load_certificate(_pem(ca, "many")).extensions.get_extension_for_oid(ROLES_OID)
    assert not ext.critical


def test_load_certificate_refuses_garbage() -> None:
    """Something that is not a certificate raises CertificateError("malformed")."""
    with pytest.raises(CertificateError) as caught:
        load_certificate(b"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
    assert caught.value.reason == "malformed"


# --- revocation --------------------------------------------------------------------------


def test_revoke_by_name_and_serial(ca: CertificateAuthority) -> None:
    """Revocation by name, decimal or hex serial is recorded, idempotent, and persists."""
    alice = ca.issue_client("alice", ["observer"])
    bob = ca.issue_client("bob", ["observer"])
    carol = ca.issue_client("carol", ["observer"])
    assert ca.revoke("alice").revoked
    assert ca.revoke(str(bob.serial)).name == "bob"
    assert ca.revoke(hex(carol.serial)).name == "carol"
    assert ca.revoke("alice") == ca.revoke(str(alice.serial))
    reopened = CertificateAuthority.open(ca.directory)
    assert {c.name for c in reopened.list() if c.revoked} == {"alice", "bob", "carol"}


def test_revoke_refuses_unknown_and_the_ca(ca: CertificateAuthority) -> None:
    """Unknown names and the CA itself cannot be revoked."""
    for target, reason in [
        ("ghost", "unknown"),
        ("12345", "unknown"),
        ("slurp cluster CA", "is-ca"),
    ]:
        with pytest.raises(CertificateError) as caught:
            ca.revoke(target)
        assert caught.value.reason == reason


# --- verify ------------------------------------------------------------------------------


def test_verify_accepts_good_certificates(ca: CertificateAuthority) -> None:
    """Node certs verify as node and as client (nodes dial nodes); clients as client."""
    ca.issue_node("node", ["127.0.0.1"])
    ca.issue_client("alice", ["observer"])
    assert ca.verify(_pem(ca, "node"), usage="node").kind == "node"
    assert ca.verify(_pem(ca, "node"), usage="client").name == "node"
    assert ca.verify(_pem(ca, "alice"), usage="client").roles == ("observer",)
    assert ca.verify(_pem(ca, "alice")).name == "alice"


def test_verify_rejections_name_their_reason(
    ca: CertificateAuthority, foreign_ca: CertificateAuthority
) -> None:
    """expired, not-yet-valid, revoked, foreign-ca, bad-signature, wrong-usage, malformed."""
    ca.issue_client("old", ["observer"], now=LONG_AGO)
    ca.issue_client("fresh", ["observer"])
    ca.issue_client("gone", ["observer"])
    ca.revoke("gone")
    foreign_ca.issue_client("mallory", ["admin"])
    fresh_der = bytearray(load_certificate(_pem(ca, "fresh")).public_bytes(Encoding.DER))
    fresh_der[-1] ^= 0x01  # inside the signature
    assert _reason(ca, _pem(ca, "old")) == "expired"
    assert _reason(ca, _pem(ca, "fresh"), now=LONG_AGO) == "not-yet-valid"
    assert _reason(ca, _pem(ca, "gone")) == "revoked"
    assert _reason(ca, _pem(foreign_ca, "mallory")) == "foreign-ca"
    assert _reason(ca, bytes(fresh_der)) == "bad-signature"
    assert _reason(ca, _pem(ca, "fresh"), usage="node") == "wrong-usage"
    assert _reason(ca, _pem(ca, "ca"), usage="client") == "wrong-usage"
    assert _reason(ca, b"not a certificate") == "malformed"


def test_verify_rejects_certificates_of_an_expired_ca(tmp_path: Path) -> None:
    """Once the CA itself has expired, nothing it issued verifies."""
    old_ca = CertificateAuthority.init(tmp_path / "old", valid_days=30, now=LONG_AGO)
    old_ca.issue_client("alice", ["observer"], now=LONG_AGO)
    assert _reason(old_ca, _pem(old_ca, "alice")) == "expired"


# --- openssl -----------------------------------------------------------------------------


@needs_openssl
def test_openssl_reads_certificates_and_applies_the_crl(ca: CertificateAuthority) -> None:
    """openssl x509 reads our PEM; openssl verify -crl_check agrees with our revocations."""
    ca.issue_node("node", ["127.0.0.1"])
    ca.issue_client("alice", ["observer"])
    ca.revoke("alice")
    d = ca.directory
    text = subprocess.run(
        ["openssl", "x509", "-text", "-noout", "-in", str(d / "node.crt")],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert "ED25519" in text
    assert "IP Address:127.0.0.1" in text
    assert "TLS Web Server Authentication" in text
    verify = ["openssl", "verify", "-x509_strict", "-crl_check", "-CAfile", str(d / "ca.crt")]
    verify += ["-CRLfile", str(d / "ca.crl")]
    ok = subprocess.run([*verify, str(d / "node.crt")], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    revoked = subprocess.run([*verify, str(d / "alice.crt")], capture_output=True, text=True)
    assert revoked.returncode != 0
    assert "revoked" in revoked.stdout + revoked.stderr


# --- mutual TLS --------------------------------------------------------------------------


@dataclass
class Handshake:
    server_error: OSError | None = None
    client_error: OSError | None = None
    peer_roles: tuple[str, ...] | None = None
    reply: bytes = b""


def _handshake(
    server: ssl.SSLContext, client: ssl.SSLContext, hostname: str = "127.0.0.1"
) -> Handshake:
    """One connection on 127.0.0.1: the server thread reads the client's roles, says ok."""
    result = Handshake()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(5)

        def serve() -> None:
            try:
                conn, _ = listener.accept()
                conn.settimeout(5)
                with server.wrap_socket(conn, server_side=True) as tls:
                    result.peer_roles = certificate_roles(peer_certificate(tls))
                    tls.sendall(b"ok")
            except OSError as exc:  # ssl.SSLError is an OSError
                result.server_error = exc

        thread = threading.Thread(target=serve)
        thread.start()
        try:
            with (
                socket.create_connection(listener.getsockname(), timeout=5) as raw,
                client.wrap_socket(raw, server_hostname=hostname) as tls,
            ):
                result.reply = tls.recv(2)
        except OSError as exc:
            result.client_error = exc
        finally:
            thread.join(5)
    return result


def _files(ca: CertificateAuthority, name: str) -> TlsFiles:
    return TlsFiles.in_directory(ca.directory, name)


def _server_rejection(result: Handshake) -> str:
    assert result.reply != b"ok"
    assert isinstance(result.server_error, ssl.SSLCertVerificationError), result
    return str(result.server_error.verify_message)


@pytest.fixture
def node_server(ca: CertificateAuthority) -> ssl.SSLContext:
    ca.issue_node("node", ["localhost", "127.0.0.1"])
    return server_ssl_context(_files(ca, "node"))


def test_tls_succeeds_between_node_and_client(
    ca: CertificateAuthority, node_server: ssl.SSLContext
) -> None:
    """A node and a client of the same CA complete TLS 1.3; the node reads the roles."""
    ca.issue_client("alice", ["backend_developer"])
    assert node_server.minimum_version == ssl.TLSVersion.TLSv1_3
    result = _handshake(node_server, client_ssl_context(_files(ca, "alice")))
    assert (result.server_error, result.client_error) == (None, None)
    assert (result.reply, result.peer_roles) == (b"ok", ("backend_developer",))


def test_tls_succeeds_between_two_nodes(
    ca: CertificateAuthority, node_server: ssl.SSLContext
) -> None:
    """A node dials another node with its own node certificate."""
    ca.issue_node("other", ["localhost"])
    result = _handshake(node_server, client_ssl_context(_files(ca, "other")), "localhost")
    assert (result.reply, result.peer_roles) == (b"ok", ())


def test_tls_refuses_client_of_foreign_ca(
    ca: CertificateAuthority, foreign_ca: CertificateAuthority, node_server: ssl.SSLContext
) -> None:
    """A client that trusts our CA but holds a foreign CA's certificate is refused."""
    foreign_ca.issue_client("mallory", ["admin"])
    mallory = TlsFiles(
        ca_cert=ca.directory / "ca.crt",
        cert=foreign_ca.directory / "mallory.crt",
        key=foreign_ca.directory / "mallory.key",
        crl=ca.directory / "ca.crl",
    )
    result = _handshake(node_server, client_ssl_context(mallory))
    assert "unable to get local issuer certificate" in _server_rejection(result)
    assert result.peer_roles is None


def test_tls_refuses_expired_client(ca: CertificateAuthority, node_server: ssl.SSLContext) -> None:
    """An expired client certificate is refused in the handshake."""
    ca.issue_client("old", ["observer"], now=LONG_AGO)
    result = _handshake(node_server, client_ssl_context(_files(ca, "old")))
    assert "expired" in _server_rejection(result)


def test_tls_refuses_revoked_client(ca: CertificateAuthority) -> None:
    """A client revoked before the server context was built is refused via the CRL."""
    ca.issue_node("node", ["127.0.0.1"])
    ca.issue_client("gone", ["observer"])
    ca.revoke("gone")
    server = server_ssl_context(_files(ca, "node"))
    result = _handshake(server, client_ssl_context(_files(ca, "gone")))
    assert "revoked" in _server_rejection(result)


def test_tls_client_refuses_a_client_certificate_posing_as_server(
    ca: CertificateAuthority,
) -> None:
    """A certificate without serverAuth cannot serve: the client refuses the handshake."""
    ca.issue_client("fake", ["observer"])
    ca.issue_client("alice", ["observer"])
    result = _handshake(
        server_ssl_context(_files(ca, "fake")),
        client_ssl_context(_files(ca, "alice"), check_hostname=False),
    )
    assert isinstance(result.client_error, ssl.SSLCertVerificationError)
    assert "purpose" in str(result.client_error.verify_message)


def test_tls_files_in_directory_wants_every_file(ca: CertificateAuthority) -> None:
    """A missing certificate file is reported before any context is built."""
    with pytest.raises(CertificateError) as caught:
        TlsFiles.in_directory(ca.directory, "nobody")
    assert caught.value.reason == "missing"
