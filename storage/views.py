"""What the ContextStore returns: typed, JSON-ready views of versions and contexts.

Owns the result dataclasses and their JSON shapes (the CLI's ``--json`` output and, later,
the wire format of the client SDK). Must not know how they are computed.
"""

from __future__ import annotations

import base64
import dataclasses
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar


def iso_ms(ms: int) -> str:
    """Milliseconds since the epoch as an ISO-8601 UTC instant."""
    try:
        moment = datetime.fromtimestamp(ms / 1000, tz=UTC)
    except (ValueError, OverflowError, OSError):  # a damaged timestamp still renders
        return f"@{ms}ms"
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class StoredRef:
    """The answer to a write: which version it created."""

    address: str  # canonical, with *~N
    version: int
    version_id: str

    def to_json(self) -> dict[str, Any]:
        """``{"address", "version", "version_id"}``."""
        return {"address": self.address, "version": self.version, "version_id": self.version_id}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StoredRef:
        """Inverse of ``to_json``."""
        return cls(str(data["address"]), int(data["version"]), str(data["version_id"]))


@dataclass(frozen=True)
class VersionView:
    """One decrypted version of a context."""

    address: str  # canonical, with *~N
    context: str
    version: int
    version_id: str
    parent: str | None
    created_at_ms: int
    created_by: str
    readers: tuple[str, ...]
    tags: tuple[str, ...]
    technologies: tuple[str, ...]
    influences: tuple[str, ...]
    influenced_by: tuple[str, ...]
    expires_at_ms: int | None
    read_as: str
    fields: dict[str, Any] = field(default_factory=dict)  # the decrypted secret fields

    @property
    def summary(self) -> str:
        """The record's summary."""
        return str(self.fields.get("summary", ""))

    @property
    def content(self) -> str | bytes:
        """The record's content."""
        value = self.fields.get("content", "")
        return value if isinstance(value, str | bytes) else str(value)

    def approx_size(self) -> int:
        """An estimate of the bytes this view holds (for the cache's byte bound)."""
        size = 512 + len(self.address) + len(self.context)
        for value in self.fields.values():
            size += len(value) if isinstance(value, str | bytes) else 64
        for items in (self.tags, self.technologies, self.insights_list(), self.influences):
            size += sum(len(item) + 16 for item in items)
        return size

    def insights_list(self) -> list[str]:
        """The record's insights."""
        value = self.fields.get("insights", [])
        return [str(item) for item in value] if isinstance(value, list) else []

    def to_json(self) -> dict[str, Any]:
        """The record with ``address``, ``version``, ``version_id`` and every field."""
        content = self.content
        out: dict[str, Any] = {
            "address": self.address,
            "version": self.version,
            "version_id": self.version_id,
            "context": self.context,
            "parent_version": self.parent,
            "created_at": iso_ms(self.created_at_ms),
            "created_by": self.created_by,
            "roles": list(self.readers),
            "tags": list(self.tags),
            "technologies": list(self.technologies),
            "influences": list(self.influences),
            "influenced_by": list(self.influenced_by),
            "expires_at": None if self.expires_at_ms is None else iso_ms(self.expires_at_ms),
            "read_as": self.read_as,
        }
        for name, value in self.fields.items():
            out[name] = value
        if isinstance(content, bytes):
            out["content"] = base64.b64encode(content).decode("ascii")
            out["content_encoding"] = "base64"
        return out


@dataclass(frozen=True)
class HistoryEntry:
    """One version in a context's history (clear metadata only: nothing is decrypted)."""

    address: str
    version: int
    version_id: str
    parent: str | None
    kind: str  # "put", "tombstone" or "corrupt"
    created_at_ms: int
    created_by: str
    readers: tuple[str, ...]
    tags: tuple[str, ...]
    siblings: int  # size of its sibling group (0 when it has none)

    def to_json(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "address": self.address,
            "version": self.version,
            "version_id": self.version_id,
            "parent_version": self.parent,
            "kind": self.kind,
            "created_at": iso_ms(self.created_at_ms) if self.created_at_ms else None,
            "created_by": self.created_by,
            "roles": list(self.readers),
            "tags": list(self.tags),
            "siblings": self.siblings,
        }


@dataclass(frozen=True)
class ContextInfo:
    """One context in a listing."""

    context: str
    address: str  # the latest version, with *~N
    versions: int
    latest_version_id: str
    updated_at_ms: int
    live: bool

    def to_json(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "context": self.context,
            "address": self.address,
            "versions": self.versions,
            "version_id": self.latest_version_id,
            "updated_at": iso_ms(self.updated_at_ms),
            "deleted": not self.live,
        }


@dataclass(frozen=True)
class SearchResult:
    """A ranked search hit."""

    address: str  # with *~N
    context: str
    version: int
    version_id: str
    score: float

    def to_json(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "address": self.address,
            "context": self.context,
            "version": self.version,
            "version_id": self.version_id,
            "score": round(self.score, 6),
        }


View = TypeVar("View", StoredRef, VersionView, HistoryEntry, ContextInfo, SearchResult)


def to_wire(
    view: StoredRef | VersionView | HistoryEntry | ContextInfo | SearchResult,
) -> dict[str, Any]:
    """The msgpack-ready form of a view (raw milliseconds, bytes kept as bytes)."""
    return {f.name: getattr(view, f.name) for f in dataclasses.fields(view)}


def from_wire(cls: type[View], data: Any) -> View:
    """Rebuild a view from ``to_wire`` output (lists become tuples where the field is one).

    Raises:
        ValueError: ``data`` is not a map with exactly the view's fields.
    """
    names = [f.name for f in dataclasses.fields(cls)]
    if not isinstance(data, dict) or set(data) != set(names):
        raise ValueError(f"not a {cls.__name__}")
    values = {}
    for f in dataclasses.fields(cls):
        value = data[f.name]
        if isinstance(value, list) and "tuple" in str(f.type):
            value = tuple(value)
        values[f.name] = value
    return cls(**values)
