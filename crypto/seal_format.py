"""The byte layout of a sealed record: an age-wrapped data key beside a ChaCha20-Poly1305 box.

A pure core (ARCHITECTURE.md §2): no I/O, no clock, no randomness of its own (the nonce
comes in as an argument). ``crypto.sealing`` draws keys and nonces and wraps keys with age.

Owns the layout (``SEAL_LAYOUT`` 1), all integers big-endian::

    offset   size  field
    0        8     magic b"SLRPSEAL"
    8        1     layout version, 1
    9        16    key id: SHA-256(wrapped key)[:16]
    25       2     W, the length of the wrapped key
    27       W     wrapped key: a binary age v1 file whose payload is the 32-byte data key
    27+W     12    nonce (fresh, random, per record)
    39+W     rest  ChaCha20-Poly1305(data key, nonce, payload, associated data): the
                   ciphertext with its 16-byte tag

and the associated data (``associated_data``) that binds a box to its place::

    b"slurp-seal/v1" 0x00 | u16 len | context (UTF-8) | u16 len | version id (UTF-8)
                          | 32-byte SHA-256 of the signed clear header

A record written before sealing existed is a plain age file; ``is_age`` tells the two
apart by age's first line, ``age-encryption.org/v1``.

Must not know about roles, keyrings, envelopes or storage. Invariants: ``parse`` never
raises anything but ``DecryptionError`` on bad input (one opaque error: a damaged record
and a wrong key look the same to the caller); ``open_box`` releases no plaintext whose
tag did not verify; the key id is checked against the wrapped key it names.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from crypto.errors import DecryptionError

MAGIC = b"SLRPSEAL"
SEAL_LAYOUT = 1
AGE_PREFIX = b"age-encryption.org/v1\n"
AD_DOMAIN = b"slurp-seal/v1\x00"
KEY_BYTES = 32
KEY_ID_BYTES = 16
NONCE_BYTES = 12
TAG_BYTES = 16
MAX_WRAPPED_BYTES = 0xFFFF
_FIXED = struct.Struct(">8sB16sH")  # magic, layout, key id, wrapped length


def is_sealed(data: bytes) -> bool:
    """Whether ``data`` starts like a sealed record (it may still be damaged)."""
    return data[: len(MAGIC)] == MAGIC


def is_age(data: bytes) -> bool:
    """Whether ``data`` starts like a binary age v1 file (a record from before sealing)."""
    return data[: len(AGE_PREFIX)] == AGE_PREFIX


def key_id(wrapped: bytes) -> bytes:
    """The id of a wrapped data key: the first 16 bytes of its SHA-256."""
    return hashlib.sha256(wrapped).digest()[:KEY_ID_BYTES]


def associated_data(context: str, version_id: str, header_digest: bytes) -> bytes:
    """What a box is bound to: its context address, version id and clear header digest.

    Raises:
        ValueError: an over-long context or version id, or a digest that is not 32 bytes.
    """
    ctx, vid = context.encode("utf-8"), version_id.encode("utf-8")
    if len(ctx) > 0xFFFF or len(vid) > 0xFFFF or len(header_digest) != 32:
        raise ValueError("cannot bind a sealed record to that place")
    return b"".join(
        (AD_DOMAIN, struct.pack(">H", len(ctx)), ctx, struct.pack(">H", len(vid)), vid,
         header_digest)
    )  # fmt: skip


@dataclass(frozen=True)
class SealedRecord:
    """A parsed sealed record (nothing in it is opened yet).

    ``digest`` is the full SHA-256 of the wrapped key (``key_id`` is its first 16 bytes);
    readers cache unwrapped keys by it.
    """

    key_id: bytes
    wrapped_key: bytes
    nonce: bytes
    box: bytes
    digest: bytes = b""

    def encode(self) -> bytes:
        """The stored bytes (module docstring)."""
        fixed = _FIXED.pack(MAGIC, SEAL_LAYOUT, self.key_id, len(self.wrapped_key))
        return b"".join((fixed, self.wrapped_key, self.nonce, self.box))

    @classmethod
    def parse(cls, data: bytes) -> SealedRecord:
        """Split stored bytes into their fields, checking lengths and the key id.

        Raises:
            DecryptionError: not a sealed record of a known layout, or damaged.
        """
        if len(data) < _FIXED.size:
            raise DecryptionError("cannot decrypt")
        magic, layout, kid, wrapped_len = _FIXED.unpack_from(data)
        if magic != MAGIC or layout != SEAL_LAYOUT:
            raise DecryptionError("cannot decrypt")
        start = _FIXED.size
        wrapped = data[start : start + wrapped_len]
        nonce = data[start + wrapped_len : start + wrapped_len + NONCE_BYTES]
        box = data[start + wrapped_len + NONCE_BYTES :]
        if len(wrapped) != wrapped_len or len(nonce) != NONCE_BYTES or len(box) < TAG_BYTES:
            raise DecryptionError("cannot decrypt")
        digest = hashlib.sha256(wrapped).digest()
        if digest[:KEY_ID_BYTES] != kid or not is_age(wrapped):
            raise DecryptionError("cannot decrypt")
        return cls(kid, wrapped, nonce, box, digest)


def seal_box(
    key: bytes, wrapped: bytes, nonce: bytes, payload: bytes, associated: bytes
) -> SealedRecord:
    """Seal ``payload`` under ``key`` (whose age-wrapped form is ``wrapped``).

    Raises:
        ValueError: a key, nonce or wrapped key of the wrong size.
    """
    if len(key) != KEY_BYTES or len(nonce) != NONCE_BYTES or len(wrapped) > MAX_WRAPPED_BYTES:
        raise ValueError("bad data key, nonce or wrapped key size")
    return seal_with(ChaCha20Poly1305(key), key_id(wrapped), wrapped, nonce, payload, associated)


def seal_with(
    aead: ChaCha20Poly1305,
    kid: bytes,
    wrapped: bytes,
    nonce: bytes,
    payload: bytes,
    associated: bytes,
) -> SealedRecord:
    """``seal_box`` with the AEAD object and key id of the data key already made (the
    writer's fast path: both are built once per data key, not once per record).

    Raises:
        ValueError: a nonce of the wrong size.
    """
    if len(nonce) != NONCE_BYTES:
        raise ValueError("bad nonce size")
    box = aead.encrypt(nonce, payload, associated)
    return SealedRecord(kid, wrapped, nonce, box)


def open_box(record: SealedRecord, key: bytes, associated: bytes) -> bytes:
    """The payload of ``record``, opened with its unwrapped data key.

    Raises:
        DecryptionError: the key, the nonce, the box or the associated data is not the
            one it was sealed with.
    """
    if len(key) != KEY_BYTES:
        raise DecryptionError("cannot decrypt")
    try:
        return ChaCha20Poly1305(key).decrypt(record.nonce, record.box, associated)
    except InvalidTag:
        raise DecryptionError("cannot decrypt") from None


def age_file_of(data: bytes) -> bytes:
    """The age file inside a stored ciphertext: a sealed record's wrapped data key (it
    opens with the same identities as the record), or a plain age record itself.

    Raises:
        DecryptionError: neither a sealed record nor an age file.
    """
    if is_age(data):
        return data
    return SealedRecord.parse(data).wrapped_key
