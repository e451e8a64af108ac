"""Peer answers, validated in one place: one parse function per replica method.

Owns: the shape checks of what another node answers to ``rep.*`` calls (node/rpc/api.py).
Whatever a peer sends, a parse function returns typed values or raises
``MalformedAnswer``, which the coordinator counts as that replica failing (never as a
bug of its own, never as the client's fault). Envelopes and purge markers are decoded
here, so a version set that parses holds only well-formed versions of the context asked
about (signatures are checked where versions are applied, ``storage.replica``).

Pure: no I/O, no trio; the service (``node.cluster.service``) calls these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from node.errors import NodeError
from storage.envelope import Envelope
from storage.errors import StorageError
from storage.schema import PurgeMarker
from storage.versions import VersionId
from storage.views import ContextInfo, SearchResult, from_wire


class MalformedAnswer(NodeError):
    """A peer's answer does not have the shape its method promises."""

    def __init__(self, method: str, what: str) -> None:
        super().__init__(f"malformed {method} answer: {what}")
        self.method = method
        self.what = what


@dataclass(frozen=True)
class StoreAnswer:
    """``rep.store``: per envelope, stored (True), already held (False) or refused (None);
    context -> count after; and (newer replicas; empty from older ones) context -> the
    newest version id held, and context -> the ``upto`` of the purge marker of a context
    where a version was refused as purged."""

    stored: tuple[bool | None, ...]
    heads: dict[str, int]
    latest: dict[str, str] = field(default_factory=dict)
    purged: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class VersionsPage:
    """``rep.versions``: one page of a replica's version set."""

    envelopes: dict[str, bytes]
    purge: PurgeMarker | None
    more: bool


def _field(method: str, answer: Any, name: str, kind: type | tuple[type, ...]) -> Any:
    if not isinstance(answer, dict):
        raise MalformedAnswer(method, "not a map")
    if name not in answer:
        raise MalformedAnswer(method, f"lacks {name!r}")
    value = answer[name]
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _kinds(kind)):
        raise MalformedAnswer(method, f"{name!r} has type {type(value).__name__}")
    return value


def _kinds(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def parse_store(answer: Any, sent: int) -> StoreAnswer:
    """The answer to a ``rep.store`` of ``sent`` envelopes."""
    stored = _field("rep.store", answer, "stored", list)
    if len(stored) != sent or not all(flag is None or isinstance(flag, bool) for flag in stored):
        raise MalformedAnswer("rep.store", f"'stored' is not {sent} flags")
    heads = _field("rep.store", answer, "heads", dict)
    for ctx, count in heads.items():
        if not isinstance(ctx, str) or isinstance(count, bool) or not isinstance(count, int):
            raise MalformedAnswer("rep.store", "'heads' is not a map of context to count")
        if count < 0:
            raise MalformedAnswer("rep.store", "'heads' holds a negative count")
    latest = _version_ids(answer, "latest")
    purged = _version_ids(answer, "purged")
    return StoreAnswer(tuple(stored), dict(heads), latest, purged)


def _version_ids(answer: dict[str, Any], name: str) -> dict[str, str]:
    """An optional ``rep.store`` map of context -> version id (absent from older peers)."""
    value = answer.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise MalformedAnswer("rep.store", f"{name!r} is not a map")
    for ctx, vid in value.items():
        if not isinstance(ctx, str) or not isinstance(vid, str):
            raise MalformedAnswer("rep.store", f"{name!r} is not a map of context to id")
        try:
            VersionId.parse(vid)
        except StorageError:
            raise MalformedAnswer("rep.store", f"{name!r} holds a bad version id") from None
    return dict(value)


def parse_versions(answer: Any, context: str) -> VersionsPage:
    """A page of ``context``'s version set; every envelope decodes and belongs to it."""
    rows = _field("rep.versions", answer, "envelopes", list)
    envelopes: dict[str, bytes] = {}
    for row in rows:
        if not (isinstance(row, list) and len(row) == 2):
            raise MalformedAnswer("rep.versions", "an envelope row is not [id, bytes]")
        vid, data = row
        if not isinstance(vid, str) or not isinstance(data, bytes):
            raise MalformedAnswer("rep.versions", "an envelope row is not [id, bytes]")
        try:
            env = Envelope.decode(data)
        except StorageError:
            raise MalformedAnswer("rep.versions", f"version {vid[:40]!r} does not decode") from None
        try:
            VersionId.parse(vid)
        except StorageError:
            raise MalformedAnswer("rep.versions", f"{vid[:40]!r} is not a version id") from None
        if env.version_id != vid or env.context != context:
            raise MalformedAnswer("rep.versions", f"version {vid[:40]!r} is not of {context}")
        envelopes[vid] = data
    marker = _field("rep.versions", answer, "purge", (bytes, type(None)))
    more = answer.get("more", False)
    if not isinstance(more, bool):
        raise MalformedAnswer("rep.versions", "'more' is not a boolean")
    return VersionsPage(envelopes, None if marker is None else parse_marker(marker), more)


def parse_marker(data: bytes) -> PurgeMarker:
    """A purge marker a peer sent."""
    try:
        marker = PurgeMarker.decode(data)
        VersionId.parse(marker.upto)
    except (StorageError, ValueError, TypeError):
        raise MalformedAnswer("rep.versions", "the purge marker does not decode") from None
    return marker


def parse_head(answer: Any) -> str | None:
    """``rep.head``: the newest version id, or None."""
    latest = _field("rep.head", answer, "latest", (str, type(None)))
    return None if latest is None or latest == "" else str(latest)


def parse_head_purge(answer: Any) -> str | None:
    """``rep.head``: the ``upto`` of the replica's purge marker, or None (also when absent)."""
    if not isinstance(answer, dict) or answer.get("purged_upto") is None:
        return None
    upto = answer["purged_upto"]
    try:
        VersionId.parse(upto if isinstance(upto, str) else "")
    except StorageError:
        raise MalformedAnswer("rep.head", "'purged_upto' is not a version id") from None
    return str(upto)


def parse_purge(answer: Any) -> int:
    """``rep.purge``: how many versions the replica removed."""
    removed = _field("rep.purge", answer, "removed", int)
    if isinstance(removed, bool) or removed < 0:
        raise MalformedAnswer("rep.purge", "'removed' is not a count")
    return int(removed)


def parse_heads(answer: Any) -> list[ContextInfo]:
    """``rep.heads``: the contexts a node holds."""
    return _views("rep.heads", _field("rep.heads", answer, "contexts", list), ContextInfo)


def parse_search(answer: Any) -> list[SearchResult]:
    """``rep.search``: a node's hits."""
    return _views("rep.search", _field("rep.search", answer, "hits", list), SearchResult)


# The fields the coordinator compares or sorts by, with their wire types.
_TYPED: dict[type[Any], dict[str, type | tuple[type, ...]]] = {
    ContextInfo: {
        "context": str, "address": str, "versions": int, "latest_version_id": str,
        "updated_at_ms": int, "live": bool,
    },
    SearchResult: {
        "address": str, "context": str, "version": int, "version_id": str,
        "score": (int, float),
    },
}  # fmt: skip


def _views(method: str, items: list[Any], cls: type[Any]) -> list[Any]:
    out = []
    for item in items:
        try:
            view = from_wire(cls, item)
        except (KeyError, TypeError, ValueError, StorageError):
            raise MalformedAnswer(method, f"an item is not a {cls.__name__}") from None
        for name, kind in _TYPED[cls].items():
            value = getattr(view, name)
            if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
                raise MalformedAnswer(method, f"a {cls.__name__}'s {name} has the wrong type")
        out.append(view)
    return out


def parse_share(answer: Any) -> bytes:
    """The answer to ``admin.share``: one Shamir share, age-encrypted to the recipient asked
    for (``node.control.custody`` decrypts and checks it)."""
    share = _field("admin.share", answer, "share", bytes)
    if not share:
        raise MalformedAnswer("admin.share", "'share' is empty")
    return bytes(share)
