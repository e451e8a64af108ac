"""Mutual-TLS contexts for the cluster, built on the CA's files (``crypto.ca``).

Owns: the TLS policy of every slurp connection (ARCHITECTURE.md §5): TLS 1.3 only, a peer
certificate required on both sides, the cluster CA as the only trust root, and the CA's
CRL checked for the peer's certificate (``VERIFY_CRL_CHECK_LEAF``), so OpenSSL itself
refuses expired, foreign and revoked certificates during the handshake. OpenSSL's default
purpose checks also apply: a server must present serverAuth (a node certificate), a client
clientAuth. What the peer may *do* is not decided here: after the handshake, read its roles
with ``peer_certificate`` and ``crypto.certs.certificate_roles``.

Must not know: sockets, trio, nodes. Invariant: a context reads the CRL once, when built;
after a revocation, build new contexts (e.g. when ``ca.crl``'s mtime changes).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from crypto.ca import CA_CERT_FILE, CRL_FILE
from crypto.certs import load_certificate
from crypto.errors import CertificateError


@dataclass(frozen=True)
class TlsFiles:
    """Where one party's TLS material lives.

    Attributes:
        ca_cert: The cluster CA certificate (the trust root).
        cert: This party's certificate.
        key: This party's private key (0600).
        crl: The CA's CRL; ``None`` turns revocation checking off (say why at the call).
    """

    ca_cert: Path
    cert: Path
    key: Path
    crl: Path | None

    @classmethod
    def in_directory(cls, directory: Path, name: str) -> TlsFiles:
        """The files ``crypto.ca`` writes: ``ca.crt``, ``NAME.crt``, ``NAME.key``, ``ca.crl``.

        Raises:
            CertificateError: reason ``"missing"`` if one of them does not exist.
        """
        files = cls(
            ca_cert=directory / CA_CERT_FILE,
            cert=directory / f"{name}.crt",
            key=directory / f"{name}.key",
            crl=directory / CRL_FILE,
        )
        for path in (files.ca_cert, files.cert, files.key, files.crl):
            if path is not None and not path.is_file():
                raise CertificateError(f"missing {path.name}", reason="missing")
        return files


def _configure(context: ssl.SSLContext, files: TlsFiles) -> ssl.SSLContext:
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.verify_mode = ssl.CERT_REQUIRED
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    context.load_cert_chain(files.cert, files.key)
    context.load_verify_locations(cafile=files.ca_cert)
    if files.crl is not None:
        context.load_verify_locations(cafile=files.crl)
        context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    return context


def server_ssl_context(files: TlsFiles) -> ssl.SSLContext:
    """A server context that requires a client certificate from the cluster CA.

    Args:
        files: The node's CA certificate, node certificate and key, and CRL.

    Returns:
        The context; wrap accepted sockets with ``server_side=True``.

    Raises:
        ssl.SSLError: A file cannot be loaded.
        OSError: A file cannot be read.
    """
    return _configure(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), files)


def client_ssl_context(files: TlsFiles, *, check_hostname: bool = True) -> ssl.SSLContext:
    """A client context that presents ``files.cert`` and trusts only the cluster CA.

    Args:
        files: The caller's CA certificate, certificate and key, and CRL.
        check_hostname: Require the server's SAN to match ``server_hostname`` (node
            certificates list their DNS names and IPs). Turn off only where peers are
            identified by certificate, not address.

    Returns:
        The context; pass ``server_hostname`` when wrapping.

    Raises:
        ssl.SSLError: A file cannot be loaded.
        OSError: A file cannot be read.
    """
    context = _configure(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), files)
    context.check_hostname = check_hostname
    return context


def peer_certificate(connection: ssl.SSLSocket | ssl.SSLObject) -> x509.Certificate:
    """The verified certificate the peer presented in the handshake.

    Raises:
        CertificateError: reason ``"missing"`` if there is none (handshake not done).
    """
    der = connection.getpeercert(binary_form=True)
    if not der:
        raise CertificateError("the peer presented no certificate", reason="missing")
    return load_certificate(der)
