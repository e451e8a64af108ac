"""The cluster certificate authority: Ed25519 X.509 certificates for nodes and clients.

Owns: a CA directory ``D`` (ARCHITECTURE.md §5, transport security):

- ``D/ca.crt``, ``D/ca.key``: the CA certificate and its PKCS#8 key (0600);
- ``D/NAME.crt``, ``D/NAME.key``: each issued certificate and its key (0600);
- ``D/ca.crl``: a standard X.509 CRL signed by the CA, rewritten on every revocation. It
  exists from ``init`` on (empty), because OpenSSL's CRL check refuses a chain whose
  issuer has no CRL. Its ``nextUpdate`` is the CA's expiry: slurp distributes the file
  itself, so the CRL is current whenever the file is.

Certificates are plain X.509 PEM (``openssl x509 -text -noout`` reads them):

- node: EKU serverAuth + clientAuth (nodes dial each other), SAN with DNS names and IP
  addresses;
- client: EKU clientAuth, and its roles in the extension described in ``crypto.certs``;
- all: ``BasicConstraints`` and ``KeyUsage`` critical, SKI/AKI present, ``notBefore``
  backdated 5 minutes for clock skew, ``notAfter`` capped at the CA's.

Must not know: roles' meaning or authority (``crypto.roles``), nodes, storage. Invariants:
private keys are written with mode 0600 and never overwritten; an issued name is never
reissued (revoke it and pick a new name); error text holds names and reasons, never keys.
"""

from __future__ import annotations

import builtins
import dataclasses
import ipaddress
import os
import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from crypto.certs import (
    IssuedCert,
    certificate_kind,
    certificate_roles,
    certificate_usages,
    describe_certificate,
    load_certificate,
    roles_extension,
)
from crypto.errors import CertificateError

__all__ = [
    "CertificateAuthority",
    "IssuedCert",
    "certificate_roles",
    "load_certificate",
]

CA_CERT_FILE = "ca.crt"
CA_KEY_FILE = "ca.key"
CRL_FILE = "ca.crl"
CLOCK_SKEW = timedelta(minutes=5)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_ROLE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_UTF8STRING_TAG = 0x0C


def _utc(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return now.astimezone(UTC)


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with ``mode``; never overwrite."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise CertificateError(f"{path.name} already exists", reason="exists") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _replace(path: Path, data: bytes) -> None:
    """Atomically replace ``path`` (write a sibling, fsync, rename)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _key_pem(key: ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _check_validity(cert: x509.Certificate, now: datetime, what: str) -> None:
    if now < cert.not_valid_before_utc:
        raise CertificateError(f"{what} is not valid yet", reason="not-yet-valid")
    if now > cert.not_valid_after_utc:
        raise CertificateError(f"{what} has expired", reason="expired")


class CertificateAuthority:
    """A cluster CA backed by a directory; see the module docstring for its layout."""

    def __init__(
        self, directory: Path, cert: x509.Certificate, key: ed25519.Ed25519PrivateKey | None
    ) -> None:
        """Use ``init`` or ``open``; this only binds already-loaded parts."""
        self.directory = directory
        self.certificate = cert
        self._key = key

    @classmethod
    def init(
        cls,
        directory: Path,
        *,
        name: str = "slurp cluster CA",
        valid_days: int = 3650,
        now: datetime | None = None,
    ) -> CertificateAuthority:
        """Create a new CA in ``directory`` (made 0700 if missing), with an empty CRL.

        Raises:
            CertificateError: reason ``"exists"`` if the directory already holds a CA.
        """
        start = _utc(now)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if (directory / CA_CERT_FILE).exists() or (directory / CA_KEY_FILE).exists():
            raise CertificateError(f"a CA already exists in {directory}", reason="exists")
        key = ed25519.Ed25519PrivateKey.generate()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start - CLOCK_SKEW)
            .not_valid_after(start + timedelta(days=valid_days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(ca=True), critical=True)
            .add_extension(ski, critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                critical=False,
            )
            .sign(key, None)
        )
        _write_new(directory / CA_KEY_FILE, _key_pem(key), 0o600)
        _write_new(directory / CA_CERT_FILE, _cert_pem(cert), 0o644)
        ca = cls(directory, cert, key)
        ca._write_crl([], number=0, now=start)
        return ca

    @classmethod
    def verifier(cls, ca_cert: Path) -> CertificateAuthority:
        """A CA that can only ``verify`` (nodes hold ``ca.crt`` and ``ca.crl``, not the key).

        The CRL is read from ``ca.crl`` beside ``ca_cert`` at every verification.

        Raises:
            CertificateError: reason ``"missing"`` or ``"malformed"``.
        """
        try:
            cert = load_certificate(ca_cert.read_bytes())
        except FileNotFoundError:
            raise CertificateError(f"no CA certificate at {ca_cert}", reason="missing") from None
        return cls(ca_cert.parent, cert, None)

    def _signing_key(self) -> ed25519.Ed25519PrivateKey:
        if self._key is None:
            raise CertificateError("this CA holds no private key (verify only)", reason="missing")
        return self._key

    @classmethod
    def open(cls, directory: Path) -> CertificateAuthority:
        """Open the CA in ``directory``.

        Raises:
            CertificateError: reason ``"missing"`` (no CA there), ``"permissions"`` (the key
                is readable by group or others) or ``"malformed"``.
        """
        key_path = directory / CA_KEY_FILE
        try:
            mode = key_path.stat().st_mode
            cert = load_certificate((directory / CA_CERT_FILE).read_bytes())
            key_pem = key_path.read_bytes()
        except FileNotFoundError:
            raise CertificateError(f"no CA in {directory}", reason="missing") from None
        if mode & 0o077:
            raise CertificateError(f"{key_path} must be mode 0600", reason="permissions")
        key = serialization.load_pem_private_key(key_pem, password=None)
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise CertificateError("the CA key is not Ed25519", reason="malformed")
        return cls(directory, cert, key)

    def issue_node(
        self,
        name: str,
        hosts: Sequence[str],
        *,
        valid_days: int = 365,
        now: datetime | None = None,
        key: ed25519.Ed25519PrivateKey | None = None,
    ) -> IssuedCert:
        """Issue a node certificate (serverAuth + clientAuth) for ``hosts``.

        Args:
            name: The node's name: the CN and the file name ``D/NAME.crt``.
            hosts: DNS names and IP addresses the node is reached at (at least one).
            valid_days: Lifetime, capped at the CA's.
            now: Issue time (tests pass a past time to make expired certificates).
            key: The node's existing Ed25519 key (its version-signing key, so the
                certificate vouches for the signatures on what the node writes); a fresh
                key when None. Either way it is written to ``D/NAME.key``.

        Raises:
            CertificateError: reason ``"bad-name"``, ``"bad-host"`` or ``"exists"``.
        """
        if not hosts:
            raise CertificateError("a node certificate needs a host", reason="bad-host")
        names: builtins.list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,252})", host):
                    raise CertificateError("not a DNS name or IP", reason="bad-host") from None
                names.append(x509.DNSName(host))
        usage = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        extra = [x509.SubjectAlternativeName(names)]
        return self._issue(name, usage, extra, valid_days=valid_days, now=now, key=key)

    def issue_client(
        self,
        name: str,
        roles: Sequence[str],
        *,
        valid_days: int = 365,
        now: datetime | None = None,
    ) -> IssuedCert:
        """Issue a client certificate (clientAuth) carrying ``roles``.

        Raises:
            CertificateError: reason ``"bad-name"``, ``"bad-role"`` or ``"exists"``.
        """
        unique = list(dict.fromkeys(roles))
        if not all(_ROLE.fullmatch(role) for role in unique):
            raise CertificateError("role names are [A-Za-z0-9_.:-]{1,64}", reason="bad-role")
        extra = [roles_extension(unique)]
        usage = [ExtendedKeyUsageOID.CLIENT_AUTH]
        return self._issue(name, usage, extra, valid_days=valid_days, now=now)

    def _authority_key_identifier(self) -> x509.AuthorityKeyIdentifier:
        ski = self.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski.value)

    def _issue(
        self,
        name: str,
        usage: builtins.list[x509.ObjectIdentifier],
        extra: Sequence[x509.ExtensionType],
        *,
        valid_days: int,
        now: datetime | None,
        key: ed25519.Ed25519PrivateKey | None = None,
    ) -> IssuedCert:
        if not _NAME.fullmatch(name) or name == "ca":
            raise CertificateError("names are [A-Za-z0-9._-], not 'ca'", reason="bad-name")
        for suffix in (".crt", ".key"):
            if (self.directory / f"{name}{suffix}").exists():
                raise CertificateError(f"{name} was already issued", reason="exists")
        start = _utc(now)
        key = key or ed25519.Ed25519PrivateKey.generate()
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start - CLOCK_SKEW)
            .not_valid_after(
                min(start + timedelta(days=valid_days), self.certificate.not_valid_after_utc)
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(ca=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(self._authority_key_identifier(), critical=False)
        )
        for ext in extra:
            builder = builder.add_extension(ext, critical=False)
        cert = builder.sign(self._signing_key(), None)
        _write_new(self.directory / f"{name}.key", _key_pem(key), 0o600)
        _write_new(self.directory / f"{name}.crt", _cert_pem(cert), 0o644)
        return describe_certificate(cert, revoked=False)

    def list(self) -> builtins.list[IssuedCert]:
        """Every certificate in the directory, the CA first, then by name."""
        revoked = self._revoked_serials()
        certs = [load_certificate(p.read_bytes()) for p in sorted(self.directory.glob("*.crt"))]
        described = [describe_certificate(c, revoked=c.serial_number in revoked) for c in certs]
        return sorted(described, key=lambda c: (c.kind != "ca", c.name))

    def revoke(self, name_or_serial: str, *, now: datetime | None = None) -> IssuedCert:
        """Revoke a certificate by name or serial (decimal or 0x-hex); idempotent.

        Raises:
            CertificateError: reason ``"unknown"`` (no such certificate) or ``"is-ca"``.
        """
        issued = self.list()
        found = [c for c in issued if c.name == name_or_serial]
        if not found:
            try:
                serial = int(name_or_serial, 0)
            except ValueError:
                serial = -1
            found = [c for c in issued if c.serial == serial]
        if not found:
            raise CertificateError(f"no certificate {name_or_serial!r}", reason="unknown")
        target = found[0]
        if target.kind == "ca":
            raise CertificateError("the CA cannot revoke itself", reason="is-ca")
        if target.revoked:
            return target
        crl = self._crl()
        entries = list(crl)
        entry = (
            x509.RevokedCertificateBuilder()
            .serial_number(target.serial)
            .revocation_date(_utc(now))
            .build()
        )
        number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        self._write_crl([*entries, entry], number=number + 1, now=_utc(now))
        return dataclasses.replace(target, revoked=True)

    def _crl(self) -> x509.CertificateRevocationList:
        try:
            crl = x509.load_pem_x509_crl((self.directory / CRL_FILE).read_bytes())
        except (FileNotFoundError, ValueError):
            raise CertificateError("missing or unreadable CRL", reason="bad-crl") from None
        public = self.certificate.public_key()
        assert isinstance(public, ed25519.Ed25519PublicKey)
        if not crl.is_signature_valid(public):
            raise CertificateError("the CRL is not signed by this CA", reason="bad-crl")
        return crl

    def _revoked_serials(self) -> set[int]:
        return {entry.serial_number for entry in self._crl()}

    def _write_crl(
        self, entries: builtins.list[x509.RevokedCertificate], *, number: int, now: datetime
    ) -> None:
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.certificate.subject)
            .last_update(now)
            .next_update(self.certificate.not_valid_after_utc)
            .add_extension(x509.CRLNumber(number), critical=False)
            .add_extension(self._authority_key_identifier(), critical=False)
        )
        for entry in entries:
            builder = builder.add_revoked_certificate(entry)
        crl = builder.sign(self._signing_key(), None)
        _replace(self.directory / CRL_FILE, crl.public_bytes(serialization.Encoding.PEM))

    def verify(
        self,
        cert_pem: bytes,
        *,
        now: datetime | None = None,
        usage: Literal["node", "client"] | None = None,
    ) -> IssuedCert:
        """Check a certificate against this CA, its CRL and an intended usage.

        ``usage="client"`` accepts node certificates too (nodes dial each other as
        clients); ``usage="node"`` wants serverAuth. A CA certificate passes neither.

        Raises:
            CertificateError: reason ``"malformed"``, ``"foreign-ca"`` (issued by another
                CA), ``"bad-signature"`` (claims this CA but its signature fails),
                ``"not-yet-valid"``, ``"expired"`` (it or the CA), ``"revoked"`` or
                ``"wrong-usage"``.
        """
        at = _utc(now)
        cert = load_certificate(cert_pem)
        self._check_issuer(cert)
        _check_validity(self.certificate, at, "the CA certificate")
        _check_validity(cert, at, "the certificate")
        if cert.serial_number in self._revoked_serials():
            raise CertificateError("the certificate is revoked", reason="revoked")
        kind = certificate_kind(cert)
        usable = {
            None: True,
            "node": kind == "node",
            "client": kind != "ca" and ExtendedKeyUsageOID.CLIENT_AUTH in certificate_usages(cert),
        }[usage]
        if not usable:
            raise CertificateError(f"a {kind} certificate used as {usage}", reason="wrong-usage")
        return describe_certificate(cert, revoked=False)

    def _check_issuer(self, cert: x509.Certificate) -> None:
        ca_ski = self.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        try:
            aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        except x509.ExtensionNotFound:
            aki = None
        if cert.issuer != self.certificate.subject or (
            aki is not None and aki.key_identifier != ca_ski.value.digest
        ):
            raise CertificateError("issued by another CA", reason="foreign-ca")
        try:
            cert.verify_directly_issued_by(self.certificate)
        except (InvalidSignature, ValueError, TypeError):
            raise CertificateError(
                "the CA's signature does not verify", reason="bad-signature"
            ) from None
