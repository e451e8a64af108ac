"""Errors of the crypto layer.

Owns: the ``CryptoError`` hierarchy. Invariant: no message ever contains a secret, a
share, a passphrase or plaintext.
"""

from __future__ import annotations


class CryptoError(Exception):
    """Base of every error the crypto layer raises on purpose."""


class DecryptionError(CryptoError):
    """One opaque error for every decryption failure (wrong key, tampered data...)."""


class KeyringError(CryptoError):
    """Missing or invalid identity files, unknown roles, bad permissions."""


class ShamirError(CryptoError):
    """Too few shares, a corrupted share, shares from different splits, or a mismatch."""


class CertificateError(CryptoError):
    """A certificate that cannot be used; ``reason`` says why in one word."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class AuditError(CryptoError):
    """The audit log cannot be read or written."""


class AuditChainBroken(AuditError):
    """The hash chain breaks at entry ``seq``; ``reason`` says how."""

    def __init__(self, message: str, *, seq: int, reason: str) -> None:
        super().__init__(message)
        self.seq = seq
        self.reason = reason
