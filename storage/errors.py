"""Errors raised by the storage layer, each carrying a UCXL code (shared/UCXL.md).

Owns: the ``StorageError`` hierarchy and the mapping from error class to
``UCXL-<status>-<NAME>`` code. Must not know about the CLI or the network.
Invariant: an error's message names the offending field and never contains
plaintext, secrets or stored values.
"""

from __future__ import annotations

from typing import Any


class StorageError(Exception):
    """Base of every error the storage layer raises on purpose.

    Attributes:
        code: the UCXL code, e.g. ``UCXL-404-NOT_FOUND``.
        message: a human sentence naming what is wrong.
        field: the offending field (``"agent"``, ``"temporal"``, ``"content"``...) or None.
        input: the offending input (an address string, never a secret), or None.
    """

    code: str = "UCXL-500-INTERNAL"

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        input: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        if code is not None:
            self.code = code
        self.message = message
        self.field = field
        self.input = input

    @property
    def status(self) -> int:
        """The HTTP-style status number embedded in the code."""
        return int(self.code.split("-")[1])

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape printed by the CLI and sent on the wire."""
        return {"code": self.code, "message": self.message, "field": self.field}


class AddressError(StorageError):
    """An address that does not parse (base of the two parser errors)."""

    code = "UCXL-400-INVALID_ADDRESS"


class InvalidAddress(AddressError):
    """The address is malformed; ``field`` names the component."""

    code = "UCXL-400-INVALID_ADDRESS"


class TemporalInvalid(AddressError):
    """The temporal segment is malformed."""

    code = "UCXL-400-TEMPORAL_INVALID"


class InvalidPayload(StorageError):
    """The record is malformed or too large (caller's fault)."""

    code = "UCXL-400-INVALID_PAYLOAD"


class Forbidden(StorageError):
    """The caller's role may not read or write this context."""

    code = "UCXL-403-FORBIDDEN"


class NotFound(StorageError):
    """No such context, or it was deleted or purged."""

    code = "UCXL-404-NOT_FOUND"


class TemporalOutOfRange(StorageError):
    """The temporal segment points outside the context's history."""

    code = "UCXL-404-TEMPORAL_OUT_OF_RANGE"


class DataDirInUse(StorageError):
    """Another process holds the data directory open."""

    code = "UCXL-409-DATA_DIR_IN_USE"


class AlreadyInitialised(StorageError):
    """``init`` on a data directory that already holds a node."""

    code = "UCXL-409-ALREADY_INITIALISED"


class KeyringUnusable(StorageError):
    """The keyring cannot be used: missing files, loose permissions, wrong passphrase."""

    code = "UCXL-412-KEYRING_UNUSABLE"


class Unavailable(StorageError):
    """Too few replicas answered (quorum not reached)."""

    code = "UCXL-503-UNAVAILABLE"


class CorruptRecord(StorageError):
    """A stored version failed its integrity check (decode, signature or decryption).

    The store's own fault (or the disk's), never the caller's; other records
    stay readable.
    """

    code = "UCXL-500-CORRUPT_RECORD"


class UntrustedSigner(CorruptRecord):
    """A version's signature verifies, but under a key this node does not trust (now).

    A ``CorruptRecord`` to every caller; the index drain tells it apart, because trust
    can come later (a node trusts its peers' keys only after its store is open).
    """


class Internal(StorageError):
    """A bug: never expected."""

    code = "UCXL-500-INTERNAL"
