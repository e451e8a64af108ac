"""The stored form of one version: clear header, ciphertext, Ed25519 signature.

Owns: the envelope's msgpack format (``ENVELOPE_SCHEMA``), what is in clear and what is
encrypted, compression of large payloads, the binding of a sealed ciphertext to its place
(``binding``), and sealing/verifying the signature.
Must not know about LevelDB keys or the cache.

In clear (routing and filtering need them; ARCHITECTURE.md §5): the context address,
version id and parent, kind, timestamps, writer, reader roles, tags, technologies and
influence links. Everything else of the record is inside ``ciphertext``, zstd-compressed
first when larger than ``COMPRESS_THRESHOLD_BYTES``: a ChaCha20-Poly1305 box under an
age-wrapped data key (``crypto.seal_format``; docs/storage.md, "Record encryption"), or,
for versions written before sealing, a plain age file to the readers plus admin.

The box's associated data (``binding``) is the context address, the version id and the
SHA-256 of the clear header (the digest the signature covers), so a box is sealed only
once the version id is known: a write's ciphertext travels as a ``crypto.sealing.
PendingSeal`` (no bytes of its own) until ``sealed`` finishes it just before signing;
``encode`` and ``signing_message`` refuse an unfinished one.

The signature covers the context address, the version id, a SHA-256 digest of the clear
header and a SHA-256 digest of the ciphertext (``crypto.signing.signing_message``), so
neither the header nor the ciphertext can be changed or swapped without detection.

**Seal epoch** (``seal_epoch``, issue 9): a cluster-wide key rotation re-seals a version
in place (``storage.rotation``): same version id, new ciphertext, new signature.
``seal_epoch`` says which copy: 0 for a version as written (schema 1, the format before
rotations), and for a re-sealed one the sum of the current key versions of its recipients
(readers plus admin) when it was re-encrypted, and at least one more than the copy it
replaced (schema 2: one more clear, signed header field after ``compression``). A
rotation raises one role's key version, so a re-seal always has a higher ``seal_epoch``
than the copy it replaces. The convergence rule (``Envelope.supersedes``): of two copies of
one version id, the one with the higher ``seal_epoch`` wins; a replica holding the lower
takes the higher (``Replica.apply``, ``VersionStore.rewrite``), never the reverse. Two
copies with the same ``seal_epoch`` are equivalent (both open with the same keys; their
ciphertexts differ since age is randomized) and neither replaces the other.
``seal_epoch_of`` reads the epoch of a stored copy without decoding it (anti-entropy's
digests and the read merge compare copies by it, ``node.cluster.antientropy``).
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from typing import Any, Literal

import msgpack
import zstandard

from crypto.seal_format import associated_data
from crypto.sealing import PendingSeal
from crypto.signing import SignatureInvalid, Signer, signing_message, verify
from storage.errors import CorruptRecord

ENVELOPE_SCHEMA = 1
SEALED_SCHEMA = 2  # the schema of a re-sealed version (``seal_epoch`` > 0)
_ARRAY16 = 0xDC  # msgpack's array header for 16..65535 items (an envelope row has 17 or 18)
COMPRESS_THRESHOLD_BYTES = 1024
MAX_DECOMPRESSED_BYTES = 8 * 1024 * 1024
REUSED_CODEC_MAX_BYTES = 64 * 1024  # larger payloads get a fresh zstd context (see _Codecs)
Kind = Literal["put", "tombstone"]
Compression = Literal["none", "zstd"]

_HEADER_FIELDS = (
    "context",
    "version_id",
    "parent",
    "kind",
    "created_at_ms",
    "created_by",
    "readers",
    "tags",
    "technologies",
    "influences",
    "influenced_by",
    "expires_at_ms",
    "compression",
)


@dataclass(frozen=True)
class Envelope:
    """One stored version."""

    context: str
    version_id: str
    parent: str | None
    kind: Kind
    created_at_ms: int
    created_by: str
    readers: tuple[str, ...]
    tags: tuple[str, ...]
    technologies: tuple[str, ...]
    influences: tuple[str, ...]
    influenced_by: tuple[str, ...]
    expires_at_ms: int | None
    compression: Compression
    ciphertext: bytes
    signer: bytes = b""
    signature: bytes = b""
    seal_epoch: int = 0

    def supersedes(self, other: Envelope) -> bool:
        """Whether this copy replaces ``other``, a copy of the same version (module
        docstring: the higher seal epoch wins; equal epochs never replace each other)."""
        return self.seal_epoch > other.seal_epoch

    @property
    def tombstone(self) -> bool:
        """Whether this version is a delete marker."""
        return self.kind == "tombstone"

    def header(self) -> list[Any]:
        """The clear header as a msgpack-ready list, in ``_HEADER_FIELDS`` order (then
        ``seal_epoch`` when it is not 0)."""
        # spelled out (not a loop over _HEADER_FIELDS with getattr): this runs for every
        # version sealed and every version encoded; msgpack packs a tuple as an array,
        # so the tuples need no copying into lists
        fields = [
            self.context, self.version_id, self.parent, self.kind, self.created_at_ms,
            self.created_by, self.readers, self.tags, self.technologies, self.influences,
            self.influenced_by, self.expires_at_ms, self.compression,
        ]  # fmt: skip
        if self.seal_epoch:
            fields.append(self.seal_epoch)
        return fields

    def _packed_header(self) -> bytes:
        """``header()`` msgpack-encoded; kept on the instance once computed (the fields
        are immutable, and ``dataclasses.replace`` makes a fresh instance without it)."""
        packed: bytes | None = self.__dict__.get("_header_bytes")
        if packed is None:
            packed = msgpack.packb(self.header(), use_bin_type=True)
            object.__setattr__(self, "_header_bytes", packed)
        return packed

    def same_header(self, other: Envelope) -> bool:
        """Whether ``other`` has this clear header, the seal epoch aside (a re-seal of the
        same version keeps every other header field)."""
        return all(getattr(self, name) == getattr(other, name) for name in _HEADER_FIELDS)

    def header_digest(self) -> bytes:
        """SHA-256 of the msgpack-encoded clear header (signed, and bound into the box)."""
        return hashlib.sha256(self._packed_header()).digest()

    def binding(self) -> bytes:
        """The associated data that binds a sealed ciphertext to this version's place:
        context address, version id and clear header digest (``crypto.seal_format``)."""
        return associated_data(self.context, self.version_id, self.header_digest())

    def signing_message(self) -> bytes:
        """The bytes the signature covers."""
        _refuse_pending(self.ciphertext)
        return self._message(self.header_digest(), self.ciphertext)

    def _message(self, header_digest: bytes, ciphertext: bytes) -> bytes:
        return signing_message(
            self.context, self.version_id, header_digest, hashlib.sha256(ciphertext).digest()
        )

    def sealed(self, signer: Signer) -> Envelope:
        """A copy signed by ``signer``; a ``PendingSeal`` ciphertext is first sealed for
        this version's place (``binding``), so the signature covers the final bytes.

        The header (hence its digest) holds neither the ciphertext nor the signature, so
        one digest serves the binding and the signature.
        """
        header_digest = self.header_digest()
        ciphertext = self.ciphertext
        if isinstance(ciphertext, PendingSeal):
            ciphertext = ciphertext.finish(self.context, self.version_id, header_digest)
        signature = signer.sign(self._message(header_digest, ciphertext))
        # a copy with three fields changed, without ``dataclasses.replace`` (which re-runs
        # ``__init__`` through keyword arguments: ~10 µs a version); the header is the
        # same, so its packed bytes come along for ``encode``
        sealed: Envelope = object.__new__(Envelope)
        sealed.__dict__.update(
            self.__dict__, ciphertext=ciphertext, signer=signer.public_key, signature=signature
        )
        return sealed

    def check_signature(self) -> None:
        """Verify the signature against the embedded signer key.

        Whether that key is *trusted* is the caller's decision.

        Raises:
            CorruptRecord: unsigned, or the signature does not verify.
        """
        if not self.signature or not self.signer:
            raise CorruptRecord(f"version {self.version_id} is unsigned", field="signature")
        try:
            verify(self.signer, self.signature, self.signing_message())
        except SignatureInvalid:
            raise CorruptRecord(
                f"version {self.version_id} of {self.context} fails its signature check",
                field="signature",
            ) from None

    def encode(self) -> bytes:
        """The stored (and replicated) form.

        Raises:
            ValueError: the ciphertext is an unfinished ``PendingSeal`` (never signed).
        """
        _refuse_pending(self.ciphertext)
        # the row [schema, *header, ciphertext, signer, signature] as msgpack, from the
        # packed header: an array16 prefix (17 or 18 items), the schema (a positive
        # fixint), the header's items (its packing less its own fixarray byte), then the
        # three byte strings; the same bytes as packing the row in one go
        header = self._packed_header()
        schema = SEALED_SCHEMA if self.seal_epoch else ENVELOPE_SCHEMA
        tail = msgpack.packb((self.ciphertext, self.signer, self.signature), use_bin_type=True)
        items = len(_HEADER_FIELDS) + 4 + (1 if self.seal_epoch else 0)
        return b"".join(
            (bytes((_ARRAY16, 0, items, schema)), memoryview(header)[1:], memoryview(tail)[1:])
        )

    @classmethod
    def decode(cls, data: bytes) -> Envelope:
        """Parse the stored form (the signature is not checked here).

        Raises:
            CorruptRecord: damaged bytes or an unknown schema.
        """
        try:
            row = msgpack.unpackb(data, raw=False, use_list=True)
        except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
            raise CorruptRecord("stored version does not decode", field="envelope") from None
        if not isinstance(row, list) or not row:
            raise CorruptRecord("stored version has the wrong shape", field="envelope")
        if row[0] not in (ENVELOPE_SCHEMA, SEALED_SCHEMA):
            raise CorruptRecord(f"stored version has unknown schema {row[0]!r}", field="envelope")
        extra = 1 if row[0] == SEALED_SCHEMA else 0
        if len(row) != len(_HEADER_FIELDS) + 4 + extra:
            raise CorruptRecord("stored version has the wrong shape", field="envelope")
        values = dict(zip(_HEADER_FIELDS, row[1 : 1 + len(_HEADER_FIELDS)], strict=True))
        try:
            sealed = _int(row[-4]) if extra else 0
            if extra and sealed < 1:
                raise ValueError("a re-sealed version has a seal epoch below 1")
            return cls(
                context=_str(values["context"]),
                version_id=_str(values["version_id"]),
                parent=None if values["parent"] is None else _str(values["parent"]),
                kind=_kind(values["kind"]),
                created_at_ms=_int(values["created_at_ms"]),
                created_by=_str(values["created_by"]),
                readers=_strs(values["readers"]),
                tags=_strs(values["tags"]),
                technologies=_strs(values["technologies"]),
                influences=_strs(values["influences"]),
                influenced_by=_strs(values["influenced_by"]),
                expires_at_ms=None
                if values["expires_at_ms"] is None
                else _int(values["expires_at_ms"]),
                compression="zstd"
                if values["compression"] == "zstd"
                else _none(values["compression"]),
                ciphertext=_bytes(row[-3]),
                signer=_bytes(row[-2]),
                signature=_bytes(row[-1]),
                seal_epoch=sealed,
            )
        except (TypeError, ValueError):
            raise CorruptRecord(
                "stored version has a field of the wrong type", field="envelope"
            ) from None


def seal_epoch_of(data: bytes) -> int:
    """The seal epoch of a stored envelope, read from its first fields only (0 for a
    version as written, and for bytes that do not decode: verification refuses those).

    Cheap where it matters: a schema-1 row is recognised from its first four bytes (a
    msgpack array16 header, then the schema); a re-sealed row skips the header fields
    without building them.
    """
    if len(data) > 3 and data[0] == _ARRAY16 and data[3] == ENVELOPE_SCHEMA:
        return 0
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(data)
    try:
        if unpacker.read_array_header() != len(_HEADER_FIELDS) + 5:
            return 0
        if unpacker.unpack() != SEALED_SCHEMA:
            return 0
        for _ in _HEADER_FIELDS:
            unpacker.skip()
        epoch = unpacker.unpack()
    except (ValueError, msgpack.OutOfData, msgpack.FormatError, msgpack.StackError):
        return 0
    return epoch if isinstance(epoch, int) and not isinstance(epoch, bool) and epoch > 0 else 0


def compress_payload(payload: bytes) -> tuple[bytes, Compression]:
    """zstd-compress ``payload`` when it is large enough to be worth it."""
    if len(payload) <= COMPRESS_THRESHOLD_BYTES:
        return payload, "none"
    small = len(payload) <= REUSED_CODEC_MAX_BYTES
    compressor = _CODECS.compressor if small else zstandard.ZstdCompressor(level=3)
    packed = compressor.compress(payload)
    return (packed, "zstd") if len(packed) < len(payload) else (payload, "none")


def decompress_payload(payload: bytes, compression: Compression) -> bytes:
    """Undo ``compress_payload``.

    Raises:
        CorruptRecord: the compressed bytes are damaged or absurdly large.
    """
    if compression == "none":
        return payload
    try:
        size = zstandard.frame_content_size(payload)  # -1: not in the header
        small = 0 <= size <= REUSED_CODEC_MAX_BYTES
        decompressor = _CODECS.decompressor if small else zstandard.ZstdDecompressor()
        return decompressor.decompress(payload, max_output_size=MAX_DECOMPRESSED_BYTES)
    except zstandard.ZstdError:
        raise CorruptRecord("stored payload does not decompress", field="payload") from None


class _Codecs(threading.local):
    """One zstd compressor and decompressor per thread: making one costs ~12 µs (a
    context allocation), the work on a ~1 KB record ~1-2 µs; the objects are not
    thread-safe, and a one-shot ``compress``/``decompress`` keeps no state between calls,
    so reuse yields the same bytes. Only payloads up to ``REUSED_CODEC_MAX_BYTES`` use
    them: a context keeps the buffers sized for the largest input it met, and up to 40
    worker threads keep theirs while idle, so a few large records must not leave every
    thread holding megabytes."""

    def __init__(self) -> None:
        self.compressor = zstandard.ZstdCompressor(level=3)
        self.decompressor = zstandard.ZstdDecompressor()


_CODECS = _Codecs()


def _refuse_pending(ciphertext: bytes) -> None:
    if isinstance(ciphertext, PendingSeal):
        raise ValueError("an unfinished PendingSeal cannot be signed or stored")


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("expected str")
    return value


def _int(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError("expected int")
    return value


def _bytes(value: Any) -> bytes:
    if not isinstance(value, bytes):
        raise TypeError("expected bytes")
    return value


def _strs(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise TypeError("expected list")
    return tuple(_str(item) for item in value)


def kind_of(data: bytes) -> Kind:
    """The kind of a stored envelope, read without building the ``Envelope`` (counting
    tombstones over a whole store; the signature is not checked here).

    Raises:
        CorruptRecord: damaged bytes, or no valid kind where it belongs.
    """
    try:
        row = msgpack.unpackb(data, raw=False, use_list=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
        raise CorruptRecord("stored version does not decode", field="envelope") from None
    where = 1 + _HEADER_FIELDS.index("kind")
    if not isinstance(row, tuple) or len(row) <= where:
        raise CorruptRecord("stored version has the wrong shape", field="envelope")
    try:
        return _kind(row[where])
    except ValueError:
        raise CorruptRecord("stored version has an unknown kind", field="envelope") from None


def _kind(value: Any) -> Kind:
    if value == "put":
        return "put"
    if value == "tombstone":
        return "tombstone"
    raise ValueError("unknown kind")


def _none(value: Any) -> Literal["none"]:
    if value != "none":
        raise ValueError("unknown compression")
    return "none"
