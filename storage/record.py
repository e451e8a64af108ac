"""The context record (ARCHITECTURE.md §3) and its validation.

Owns: the fields a writer supplies, their types and size limits, and the versioned
msgpack form of the *secret* part (encrypted before it reaches disk). Knows nothing about
keys, LevelDB or addresses beyond validating their text.
Invariants: a ``ContextRecord`` that exists is valid (constructed only through
``from_fields``/``decode_secret``); every error names the offending field.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack

from storage.address import parse
from storage.errors import AddressError, CorruptRecord, InvalidPayload

SECRET_SCHEMA = 1
MAX_TEXT_CHARS = 16 * 1024  # summary, purpose, change_reason
MAX_CONTENT_BYTES = 4 * 1024 * 1024
MAX_LIST_ITEMS = 256  # tags, technologies, insights, influences
MAX_ITEM_CHARS = 4096  # one insight; tags and technologies are capped at 128
MAX_LABEL_CHARS = 128
MAX_METADATA_BYTES = 64 * 1024
MAX_TTL_S = 100 * 365 * 24 * 3600
# The encrypted fields together, msgpack-encoded: what a reader may decompress
# (storage.envelope.MAX_DECOMPRESSED_BYTES); node/rpc/wire.py sizes the frame limit from it.
MAX_SECRET_BYTES = 8 * 1024 * 1024

TEXT_FIELDS = ("summary", "purpose", "change_reason")
LABEL_LIST_FIELDS = ("tags", "technologies")
LINK_FIELDS = ("influences", "influenced_by")
KNOWN_FIELDS = frozenset(
    (
        *TEXT_FIELDS,
        *LABEL_LIST_FIELDS,
        *LINK_FIELDS,
        "insights",
        "content",
        "metadata",
        "confidence",
        "ttl",
    )
)


@dataclass(frozen=True)
class ContextRecord:
    """What a writer supplies for one version; see ``from_fields`` for the limits."""

    summary: str = ""
    purpose: str = ""
    content: str | bytes = ""
    technologies: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    insights: tuple[str, ...] = ()
    metadata: Mapping[str, Any] = field(default_factory=dict)
    change_reason: str = ""
    influences: tuple[str, ...] = ()
    influenced_by: tuple[str, ...] = ()
    confidence: float | None = None
    ttl: int | None = None

    @classmethod
    def from_fields(cls, fields: Mapping[str, Any]) -> ContextRecord:
        """Validate a JSON-like mapping of record fields.

        Raises:
            InvalidPayload: an unknown field, a wrong type, or a value over its limit;
                the error's ``field`` names it.
        """
        if not isinstance(fields, Mapping):
            raise InvalidPayload("a record must be a JSON object", field="record")
        unknown = sorted(set(fields) - KNOWN_FIELDS)
        if unknown:
            raise InvalidPayload(f"unknown record field {unknown[0]!r}", field=str(unknown[0]))
        values: dict[str, Any] = {}
        for name in TEXT_FIELDS:
            if name in fields:
                values[name] = _text(fields[name], name, MAX_TEXT_CHARS)
        for name in LABEL_LIST_FIELDS:
            if name in fields:
                values[name] = _strings(fields[name], name, MAX_LABEL_CHARS, label=True)
        if "insights" in fields:
            values["insights"] = _strings(fields["insights"], "insights", MAX_ITEM_CHARS)
        for name in LINK_FIELDS:
            if name in fields:
                values[name] = _links(fields[name], name)
        if "content" in fields:
            values["content"] = _content(fields["content"])
        if "metadata" in fields:
            values["metadata"] = _metadata(fields["metadata"])
        if fields.get("confidence") is not None:
            values["confidence"] = _confidence(fields["confidence"])
        if fields.get("ttl") is not None:
            values["ttl"] = _ttl(fields["ttl"])
        record = cls(**values)
        if len(record.encode_secret()) > MAX_SECRET_BYTES:
            raise InvalidPayload(
                f"the encrypted fields together (content, texts, insights, metadata) are "
                f"larger than {MAX_SECRET_BYTES} bytes",
                field="record",
            )
        return record

    def secret_fields(self) -> dict[str, Any]:
        """The fields that are encrypted (everything but tags, technologies and links)."""
        return {
            "summary": self.summary,
            "purpose": self.purpose,
            "content": self.content,
            "insights": list(self.insights),
            "metadata": dict(self.metadata),
            "change_reason": self.change_reason,
            "confidence": self.confidence,
        }

    def encode_secret(self) -> bytes:
        """The versioned msgpack form of the secret fields."""
        payload = {"s": SECRET_SCHEMA, **self.secret_fields()}
        return bytes(msgpack.packb(payload, use_bin_type=True))


def decode_secret(data: bytes) -> dict[str, Any]:
    """Decode what ``encode_secret`` wrote.

    Raises:
        CorruptRecord: not a secret payload of a known schema.
    """
    try:
        payload = msgpack.unpackb(data, raw=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
        raise CorruptRecord("stored payload does not decode", field="payload") from None
    if not isinstance(payload, dict) or payload.get("s") != SECRET_SCHEMA:
        raise CorruptRecord("stored payload has an unknown schema", field="payload")
    payload.pop("s")
    return payload


def _text(value: Any, name: str, limit: int) -> str:
    if not isinstance(value, str):
        raise InvalidPayload(f"{name} must be a string", field=name)
    if len(value) > limit:
        raise InvalidPayload(f"{name} is longer than {limit} characters", field=name)
    return value


def _strings(value: Any, name: str, limit: int, *, label: bool = False) -> tuple[str, ...]:
    if not isinstance(value, list | tuple):
        raise InvalidPayload(f"{name} must be a list of strings", field=name)
    if len(value) > MAX_LIST_ITEMS:
        raise InvalidPayload(f"{name} has more than {MAX_LIST_ITEMS} items", field=name)
    out = []
    for item in value:
        text = _text(item, name, limit)
        if label and (not text.strip() or any(ch.isspace() and ch != " " for ch in text)):
            raise InvalidPayload(f"{name} items must be non-empty single-line text", field=name)
        out.append(text)
    return tuple(out)


def _links(value: Any, name: str) -> tuple[str, ...]:
    links = _strings(value, name, 2048)
    for link in links:
        try:
            parse(link)
        except AddressError as exc:
            raise InvalidPayload(
                f"{name} holds an invalid address: {exc.message}", field=name
            ) from None
    return links


def _content(value: Any) -> str | bytes:
    if isinstance(value, str):
        content: str | bytes = value
        size = len(value.encode("utf-8"))
    elif isinstance(value, bytes):
        content = value
        size = len(value)
    else:
        raise InvalidPayload("content must be text or bytes", field="content")
    if size > MAX_CONTENT_BYTES:
        raise InvalidPayload(f"content is larger than {MAX_CONTENT_BYTES} bytes", field="content")
    return content


def _metadata(value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise InvalidPayload("metadata must be an object with string keys", field="metadata")
    try:
        packed = msgpack.packb(dict(value), use_bin_type=True)
    except (TypeError, ValueError, OverflowError):
        raise InvalidPayload(
            "metadata holds a value that cannot be stored", field="metadata"
        ) from None
    if len(packed) > MAX_METADATA_BYTES:
        raise InvalidPayload(
            f"metadata is larger than {MAX_METADATA_BYTES} bytes", field="metadata"
        )
    return dict(value)


def _confidence(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidPayload("confidence must be a number", field="confidence")
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise InvalidPayload("confidence must be between 0 and 1", field="confidence")
    return float(value)


def _ttl(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidPayload("ttl must be a whole number of seconds", field="ttl")
    if not 1 <= value <= MAX_TTL_S:
        raise InvalidPayload(f"ttl must be between 1 and {MAX_TTL_S} seconds", field="ttl")
    return value
