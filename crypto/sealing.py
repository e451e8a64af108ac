"""Envelope encryption: data keys, their age wrapping, and the bounded cache of open ones.

Owns the life of a data key (DEK). A writer draws one random 32-byte DEK per *reader
set* (the recipients of its readers plus admin, each at its current key version), wraps
it once with age (pyrage) to those recipients, and seals up to ``SealPolicy.max_records``
records (or for ``SealPolicy.max_age_s``) under it; a changed reader set or key version
gets a new DEK at once (``DataKeyIssuer``). A reader unwraps a DEK once and keeps it in a
bounded in-memory LRU (``DataKeyCache``) keyed by *who* opened it and the SHA-256 of the
wrapped bytes, so a DEK one role unwrapped never opens a record for another role. The
byte layout is ``crypto.seal_format``'s; the security argument is in docs/storage.md.

``PendingSeal`` carries a payload from the moment it is encrypted (outside every lock)
to the moment its place is known (version id and clear header, under the version store's
lock): ``storage.envelope.Envelope.sealed`` finishes it just before signing.

Must not know about roles, files or storage (``crypto.keyring`` maps roles to
recipients and identities). Invariants: no DEK is ever written anywhere (only its age
wrapping is); no DEK seals more than ``max_records`` records; every record gets a fresh
random nonce; both caches are bounded.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import pyrage
from cachetools import LRUCache
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from pyrage import x25519

from crypto.errors import DecryptionError
from crypto.seal_format import (
    KEY_BYTES,
    KEY_ID_BYTES,
    NONCE_BYTES,
    associated_data,
    seal_with,
)

DEFAULT_MAX_RECORDS = 4096
DEFAULT_MAX_AGE_S = 3600.0
DEFAULT_OPEN_KEYS = 4096  # unwrapped DEKs (and refusals) a keyring keeps, per scope
DEFAULT_WRITER_SETS = 256  # reader sets a writer keeps a DEK for at once
Clock = Callable[[], float]


@dataclass(frozen=True)
class SealPolicy:
    """When a writer's DEK rotates, and how many open DEKs a reader keeps."""

    max_records: int = DEFAULT_MAX_RECORDS
    max_age_s: float = DEFAULT_MAX_AGE_S
    open_keys: int = DEFAULT_OPEN_KEYS
    writer_sets: int = DEFAULT_WRITER_SETS

    def __post_init__(self) -> None:
        if self.max_records < 1 or self.max_age_s <= 0:
            raise ValueError("a data key must seal at least one record for some time")
        if self.open_keys < 1 or self.writer_sets < 1:
            raise ValueError("the data key caches need room for at least one key")


class DataKey:
    """One DEK as its writer holds it: the key, its age wrapping, its use so far."""

    __slots__ = ("aead", "digest", "issued_at", "key", "sealed", "wrapped")

    def __init__(self, key: bytes, wrapped: bytes, issued_at: float) -> None:
        self.key = key
        self.aead = ChaCha20Poly1305(key)
        self.wrapped = wrapped
        self.digest = hashlib.sha256(wrapped).digest()  # the open-key cache's key
        self.issued_at = issued_at
        self.sealed = 0


class DataKeyIssuer:
    """The writer's DEKs, one per reader set, rotated by count, age and recipient change.

    Thread-safe. ``wrap`` (age to the set's recipients) runs under the lock: it costs
    one pyrage encryption per DEK, not per record.
    """

    def __init__(self, policy: SealPolicy, clock: Clock = time.monotonic) -> None:
        self.policy = policy
        self._clock = clock
        self._lock = threading.Lock()
        self._keys: LRUCache[Hashable, DataKey] = LRUCache(maxsize=policy.writer_sets)
        self.issued = 0  # DEKs drawn so far (a counter for tests and metrics)
        self.sealed = 0  # records sealed so far, under any DEK (a counter for metrics)

    def take(self, reader_set: Hashable, wrap: Callable[[bytes], bytes]) -> tuple[DataKey, bool]:
        """The DEK for one more record of ``reader_set``; True when it was drawn now.

        ``reader_set`` must change whenever a recipient or its key version does (the
        keyring passes the sorted (role, version, recipient) triples).
        """
        with self._lock:
            now = self._clock()
            found = self._keys.get(reader_set)
            fresh = (
                found is None
                or found.sealed >= self.policy.max_records
                or now - found.issued_at >= self.policy.max_age_s
            )
            if fresh or found is None:
                key = os.urandom(KEY_BYTES)
                found = DataKey(key, wrap(key), now)
                self._keys[reader_set] = found
                self.issued += 1
            found.sealed += 1
            self.sealed += 1
            return found, fresh

    def clear(self) -> None:
        """Forget every DEK (the next record of any reader set draws a new one)."""
        with self._lock:
            self._keys.clear()


class DataKeyCache:
    """Unwrapped DEKs (and failed unwraps) by (scope, SHA-256 of the wrapped key), bounded.

    ``scope`` names the identities that opened it (a role, a role's key version, or every
    held identity), so one role's unwrap never serves another. ``None`` records that the
    scope's identities do not open that wrapped key.
    """

    def __init__(self, maxsize: int) -> None:
        self._lock = threading.Lock()
        self._keys: LRUCache[tuple[Hashable, bytes], bytes | None] = LRUCache(maxsize=maxsize)
        self.hits = 0
        self.misses = 0

    def lookup(self, scope: Hashable, digest: bytes) -> tuple[bool, bytes | None]:
        """``(known, key)``: known False means ask age; key None means it does not open."""
        with self._lock:
            try:
                found = self._keys[(scope, digest)]
            except KeyError:
                self.misses += 1
                return False, None
            self.hits += 1
            return True, found

    def store(self, scope: Hashable, digest: bytes, key: bytes | None) -> None:
        """Remember what ``scope``'s identities got from the wrapped key ``digest``."""
        with self._lock:
            self._keys[(scope, digest)] = key

    def clear(self) -> None:
        """Forget every DEK (after a key rotation changed which identities a role has)."""
        with self._lock:
            self._keys.clear()

    def drop(self, scope_matches: Callable[[Hashable], bool]) -> int:
        """Forget the entries of every scope ``scope_matches`` accepts; return how many."""
        with self._lock:
            gone = [key for key in self._keys if scope_matches(key[0])]
            for key in gone:
                del self._keys[key]
            return len(gone)

    def __len__(self) -> int:
        with self._lock:
            return len(self._keys)


def wrap_key(key: bytes, recipients: Sequence[x25519.Recipient]) -> bytes:
    """The age file (binary) of ``key`` to ``recipients``."""
    return bytes(pyrage.encrypt(key, list(recipients)))


def unwrap_key(wrapped: bytes, identities: Sequence[x25519.Identity]) -> bytes | None:
    """The DEK inside ``wrapped`` if one of ``identities`` opens it, else None.

    Raises:
        DecryptionError: it opens but does not hold a 32-byte key (a damaged record).
    """
    try:
        key = bytes(pyrage.decrypt(wrapped, list(identities)))
    except pyrage.DecryptError:
        return None
    if len(key) != KEY_BYTES:
        raise DecryptionError("cannot decrypt")
    return key


class PendingSeal(bytes):
    """A payload encrypted under a DEK whose record has no place (version id) yet.

    Its byte value is empty: it never holds plaintext, and stored as is it would be
    refused (``storage.envelope`` refuses to encode or sign one). ``finish`` seals it
    for its place; ``storage.envelope.Envelope.sealed`` calls it before signing.
    """

    _key: DataKey
    _payload: bytes

    def __new__(cls, key: DataKey, payload: bytes) -> PendingSeal:
        self = super().__new__(cls, b"")
        self._key = key
        self._payload = payload
        return self

    def finish(self, context: str, version_id: str, header_digest: bytes) -> bytes:
        """The sealed record bytes, bound to its context, version id and clear header."""
        dk = self._key
        associated = associated_data(context, version_id, header_digest)
        nonce = os.urandom(NONCE_BYTES)
        kid = dk.digest[:KEY_ID_BYTES]
        return seal_with(dk.aead, kid, dk.wrapped, nonce, self._payload, associated).encode()

    def __repr__(self) -> str:
        return "PendingSeal(<unfinished>)"
