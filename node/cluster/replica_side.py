"""The replica side of the node service: the ``rep.*`` answers from this node's own store.

Owns: answering other nodes' replica requests (``rep.store``, ``rep.versions`` paged,
``rep.head``, ``rep.purge``, ``rep.heads``, ``rep.search``, ``rep.ping``) over the local
``storage.replica.Replica``, and the same operations as plain calls for the coordinator
when it is itself one of the replicas. Must not know: quorums, the ring, other nodes,
leadership (a leader's ``rep.purge`` carries its ``term``, checked through the
``admit_leader_term`` hook that the control plane installs: ``node.control.fence``; a
``rep.purge`` without a term is a repair or anti-entropy send of a marker some replica
already accepted, and is not fenced). Bodies arrive parsed (``node.cluster.requests``);
slow storage work runs through ``blocking`` (a worker thread on a real node, inline in
the simulation). A read of a small version set (``small``: at most
``INLINE_READ_VERSIONS`` versions, one head lookup to know) runs on the event loop: it
takes microseconds from LevelDB's cache, and handing it to a worker thread and back cost
more CPU than the read and a GIL hand-over in latency (issue 10: a 1-client get went from
8.7 / 7.4 ms p50 to 6.3 / 5.7 ms, server CPU per get 6.9 / 6.3 -> 5.3 ms).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol, TypeVar

from node.cluster import coordinator
from node.rpc.transport import Peer
from node.rpc.wire import MAX_BATCH_BYTES
from storage.address import ContextName
from storage.envelope import Envelope
from storage.errors import InvalidPayload, StorageError
from storage.replica import Replica
from storage.schema import PurgeMarker
from storage.versions import VersionId
from storage.views import to_wire

Body = dict[str, Any]
T = TypeVar("T")
INLINE_READ_VERSIONS = 64  # a version set at most this large is read on the event loop


class Blocking(Protocol):
    """Runs slow storage work off the event loop (``Fanout.blocking``)."""

    def __call__(self, fn: Callable[[], T]) -> Awaitable[T]:
        """The result of ``fn()``."""
        ...


class ReplicaSide:
    """This node as one replica: its ``rep.*`` methods and their local forms."""

    def __init__(self, name: str, replica: Replica, blocking: Blocking) -> None:
        self.name = name
        self.replica = replica
        self.store = replica.store
        self._blocking = blocking
        # the fence of leader-only operations (node.control.fence.Fence.admit); None: no
        # control plane, terms are accepted unchecked
        self.admit_leader_term: Callable[[int], None] | None = None

    def methods(self) -> Mapping[str, Callable[[Peer, Body], Awaitable[Body]]]:
        """The replica methods, by RPC name."""
        return {
            "rep.store": self._rep_store, "rep.versions": self._rep_versions,
            "rep.head": self._rep_head, "rep.purge": self._rep_purge,
            "rep.heads": self._rep_heads, "rep.search": self._rep_search,
            "rep.ping": self._rep_ping,
        }  # fmt: skip

    # -- local forms (the coordinator calls these for itself) ------------------------------

    def apply(self, blobs: list[bytes]) -> Body:
        """Store verified versions; per blob True stored, False held, None refused.

        The answer also names, per context, the newest version id held (``latest``: the
        coordinator's clock moves past it) and, where a version was refused because this
        replica's purge marker covers it, the marker's ``upto`` (``purged``: the
        coordinator re-seals after it and retries). Older coordinators ignore both.
        """
        stored, heads = self.replica.apply(blobs)
        latest: dict[str, str] = {}
        for context in heads:
            head = self.replica.head(ContextName.from_canonical(context))
            if head is not None:
                latest[context] = head.latest
        answer: Body = {"stored": stored, "heads": heads, "latest": latest}
        purged = self._purged_refusals(blobs, stored)
        if purged:
            answer["purged"] = purged
        return answer

    def _purged_refusals(self, blobs: list[bytes], stored: list[bool | None]) -> dict[str, str]:
        """context -> purge marker ``upto``, for refused blobs that marker covers."""
        out: dict[str, str] = {}
        for data, flag in zip(blobs, stored, strict=True):
            if flag is not None:
                continue
            try:
                env = Envelope.decode(data)
                ctx = ContextName.from_canonical(env.context)
                marker = self.store.versions.purge_marker(ctx)
                if marker is not None and VersionId.parse(env.version_id) <= VersionId.parse(
                    marker.upto
                ):
                    out[env.context] = marker.upto
            except StorageError:
                continue  # refused as malformed or forged, not as purged
        return out

    def small(self, ctx: ContextName) -> bool:
        """Whether this node holds at most ``INLINE_READ_VERSIONS`` versions of ``ctx`` (its
        version set may then be read on the event loop: module docstring)."""
        head = self.replica.head(ctx)
        return head is None or head.count <= INLINE_READ_VERSIONS

    def versions_page(self, ctx: ContextName, after: str | None, budget: int) -> Body:
        """One page of the version set of ``ctx`` after version ``after``."""
        rows, marker = self.replica.version_set(ctx)
        page, more = coordinator.page_versions(rows, after, budget)
        return {
            "envelopes": [[vid, data] for vid, data in page],
            "purge": None if marker is None else marker.encode(),
            "more": more,
        }

    def purge(self, ctx: ContextName, marker: PurgeMarker, term: int | None) -> Body:
        """Apply a purge marker; a leader's (``term`` given) only if the fence admits it.

        Raises:
            StaleTerm (``node.control.fence``): ``term`` is older than a leader seen here.
        """
        admit = self.admit_leader_term
        if term is not None and admit is not None:
            admit(term)  # raises the fence (synced) before the purge is applied
        return {"removed": self.replica.apply_purge(ctx, marker)}

    def head(self, ctx: ContextName) -> Body:
        """The newest version id held, and the purge marker's ``upto`` (new ids sort after)."""
        head = self.replica.head(ctx)
        marker = self.store.versions.purge_marker(ctx)
        return {
            "latest": None if head is None else head.latest,
            "purged_upto": None if marker is None else marker.upto,
        }

    def index_status(self) -> Body:
        """The ``index`` field of ``node.status``: ``{pending, lag_s}`` of the queue of
        contexts replicated writes left to index (``storage.index_sync``)."""
        return {"index": self.store.index.lag()}

    def heads(self, args: Body) -> Body:
        """The contexts held that match a pattern."""
        infos = self.store.list_contexts(args["pattern"], include_deleted=bool(args["deleted"]))
        return {"contexts": [to_wire(info) for info in infos]}

    def search(self, args: Body) -> Body:
        """A search of the local index for the given role."""
        hits = self.store.search(
            args["query"], project=args["project"], task=args["task"], tags=list(args["tags"]),
            as_role=args["as_role"], limit=int(args["limit"]),
        )  # fmt: skip
        return {"hits": [to_wire(hit) for hit in hits]}

    # -- RPC handlers ---------------------------------------------------------------------

    async def _rep_store(self, peer: Peer, args: Body) -> Body:
        blobs: list[bytes] = args["envelopes"]
        return await self._blocking(lambda: self.apply(blobs))

    async def _rep_versions(self, peer: Peer, args: Body) -> Body:
        ctx: ContextName = args["context"]
        budget = min(args["max_bytes"] or MAX_BATCH_BYTES, MAX_BATCH_BYTES)
        if self.small(ctx):
            return self.versions_page(ctx, args["after"], budget)
        return await self._blocking(lambda: self.versions_page(ctx, args["after"], budget))

    async def _rep_head(self, peer: Peer, args: Body) -> Body:
        return self.head(args["context"])

    async def _rep_purge(self, peer: Peer, args: Body) -> Body:
        ctx: ContextName = args["context"]
        try:
            marker = PurgeMarker.decode(args["marker"])
        except StorageError as exc:
            raise InvalidPayload(f"marker: {exc.message}", field="marker") from None
        return await self._blocking(lambda: self.purge(ctx, marker, args["term"]))

    async def _rep_heads(self, peer: Peer, args: Body) -> Body:
        return self.heads(args)

    async def _rep_search(self, peer: Peer, args: Body) -> Body:
        return await self._blocking(lambda: self.search(args))

    async def _rep_ping(self, peer: Peer, args: Body) -> Body:
        return {"name": self.name}
