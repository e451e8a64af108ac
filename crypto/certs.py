"""Reading slurp's X.509 certificates: kind, roles, hosts, and the roles extension format.

Owns: the format of the client-roles extension. A client certificate carries its roles in
a non-critical extension ``ROLES_OID`` (an OID under the X.667 UUID arc 2.25, which needs
no registration) whose value is a DER UTF8String holding a JSON array of role names, e.g.
``["backend_developer","observer"]``. The OID names version 1 of this format; a new format
gets a new OID. Non-critical, so TLS stacks that don't know it still accept the certificate.

Must not know: issuing, revocation or the CA directory (``crypto.ca``), roles' meaning
(``crypto.roles``). Invariant: pure functions of the certificate bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from crypto.errors import CertificateError

Kind = Literal["ca", "node", "client"]
ROLES_OID = x509.ObjectIdentifier("2.25.239443093884895905536655128091060293681.1")
_UTF8STRING_TAG = 0x0C


@dataclass(frozen=True)
class IssuedCert:
    """What the CA knows about one certificate. ``fingerprint_sha256`` is lower-case hex."""

    name: str
    kind: Kind
    serial: int
    not_before: datetime
    not_after: datetime
    fingerprint_sha256: str
    roles: tuple[str, ...]
    hosts: tuple[str, ...]
    revoked: bool


def roles_extension(roles: list[str]) -> x509.UnrecognizedExtension:
    """The extension value that carries ``roles`` (see the module docstring for the format)."""
    return x509.UnrecognizedExtension(
        ROLES_OID, _der_utf8string(json.dumps(roles, separators=(",", ":")))
    )


def _der_utf8string(text: str) -> bytes:
    raw = text.encode("utf-8")
    if len(raw) < 0x80:
        return bytes([_UTF8STRING_TAG, len(raw)]) + raw
    size = len(raw).to_bytes((len(raw).bit_length() + 7) // 8, "big")
    return bytes([_UTF8STRING_TAG, 0x80 | len(size)]) + size + raw


def _parse_der_utf8string(der: bytes) -> str:
    if len(der) < 2 or der[0] != _UTF8STRING_TAG:
        raise ValueError("not a UTF8String")
    length, start = der[1], 2
    if length & 0x80:
        start = 2 + (length & 0x7F)
        length = int.from_bytes(der[2:start], "big")
    if start + length != len(der):
        raise ValueError("bad DER length")
    return der[start:].decode("utf-8")


def certificate_roles(cert: x509.Certificate) -> tuple[str, ...]:
    """The roles a client certificate carries (empty for certificates without roles).

    Args:
        cert: Any certificate.

    Returns:
        The role names, in the order they were issued.

    Raises:
        CertificateError: reason ``"malformed"`` if the roles extension cannot be parsed.
    """
    try:
        ext = cert.extensions.get_extension_for_oid(ROLES_OID).value
    except x509.ExtensionNotFound:
        return ()
    if not isinstance(ext, x509.UnrecognizedExtension):
        raise CertificateError("unreadable roles extension", reason="malformed")
    try:
        roles = json.loads(_parse_der_utf8string(ext.value))
    except ValueError:
        raise CertificateError("unreadable roles extension", reason="malformed") from None
    if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
        raise CertificateError("roles extension is not a list of names", reason="malformed")
    return tuple(roles)


def load_certificate(data: bytes) -> x509.Certificate:
    """Parse one certificate, PEM or DER (DER is what ``getpeercert(True)`` returns).

    Raises:
        CertificateError: reason ``"malformed"``.
    """
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError:
        raise CertificateError("not an X.509 certificate", reason="malformed") from None


def certificate_kind(cert: x509.Certificate) -> Kind:
    """``"ca"`` if it may sign certificates, ``"node"`` if it may serve TLS, else client."""
    try:
        if cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            return "ca"
    except x509.ExtensionNotFound:
        pass
    return "node" if ExtendedKeyUsageOID.SERVER_AUTH in certificate_usages(cert) else "client"


def certificate_usages(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    """The extended key usages (empty without the extension)."""
    try:
        return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        return []


def _common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


def _hosts(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    return tuple(str(name.value) for name in san if isinstance(name, x509.DNSName | x509.IPAddress))


def describe_certificate(cert: x509.Certificate, *, revoked: bool) -> IssuedCert:
    """Summarize ``cert``; ``revoked`` comes from the CA's CRL, which the cert cannot know."""
    return IssuedCert(
        name=_common_name(cert),
        kind=certificate_kind(cert),
        serial=cert.serial_number,
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        fingerprint_sha256=cert.fingerprint(hashes.SHA256()).hex(),
        roles=certificate_roles(cert),
        hosts=_hosts(cert),
        revoked=revoked,
    )
