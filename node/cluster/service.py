"""The node service: answers node/rpc/api.py requests, coordinating replicas (a trio shell).

Owns: authorization of callers by certificate roles, coordination of writes (W durable
acknowledgements) and reads (R answers, merged by union, read repair), coverage queries
for listing and search, and the replica-side methods. Protocol decisions come from the
pure cores (``node.cluster.replication``, ``node.cluster.ring``); this module only carries them out.

Order of effects for a write: validate and encrypt (locally) -> learn the parent from the
live replicas -> sign -> send to every live replica -> answer once W acknowledged; the
remaining sends finish in the service's own nursery. For a read: ask the live replicas ->
answer from the first R version sets, merged -> push what a replica lacked (read repair).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import trio

from crypto.roles import ADMIN_ROLE
from node.cluster import status
from node.cluster.replication import (
    Outcome,
    Placement,
    Quorum,
    QuorumTracker,
    VersionSet,
    merge_hits,
    merge_listings,
    merge_version_sets,
    place,
)
from node.cluster.ring import Ring, RingMember
from node.errors import PeerUnavailable, RemoteError
from node.rpc.transport import Peer
from storage.address import Address, ContextName, Temporal, parse
from storage.context_store import ContextStore, WriteRequest
from storage.envelope import Envelope
from storage.errors import Forbidden, InvalidPayload, NotFound, StorageError, Unavailable
from storage.record import ContextRecord
from storage.replica import Replica
from storage.schema import PurgeMarker
from storage.views import ContextInfo, SearchResult, StoredRef, from_wire, to_wire

log = logging.getLogger(__name__)
T = TypeVar("T")
Body = dict[str, Any]


class Cluster(Protocol):
    """What the service needs to know about membership."""

    name: str

    def member_names(self) -> Sequence[str]:
        """Every member, this node included."""
        ...

    def is_up(self, name: str) -> bool:
        """Whether failure detection thinks ``name`` is up."""
        ...


class HintSink(Protocol):
    """Hinted handoff as the write path sees it (``node.cluster.handoff.HandoffService``)."""

    @property
    def sloppy_quorum(self) -> bool:
        """Whether a durable hint counts toward W."""
        ...

    async def store_hints(
        self,
        ctx: ContextName,
        owners: Sequence[str],
        missed: Collection[str],
        blobs: Sequence[bytes],
    ) -> set[str]:
        """Store hints for missed owners; the owners whose hint is durable."""
        ...

    async def accept(self, body: dict[str, Any]) -> dict[str, Any]:
        """Answer ``rep.hint``."""
        ...


class Dialer(Protocol):
    """Calls to other nodes."""

    async def call(
        self, name: str, method: str, body: dict[str, Any], *, timeout_s: float
    ) -> dict[str, Any]:
        """Call ``method`` on node ``name`` (PeerUnavailable / RemoteError on failure)."""
        ...


@dataclass(frozen=True)
class ServiceConfig:
    """Replication settings of one node."""

    quorum: Quorum = field(default_factory=Quorum)
    vnodes: int = 64
    timeout_s: float = 2.0
    blocking_in_threads: bool = True  # False in the simulation tier (no real I/O there)


class NodeService:
    """Serves one node's requests; ``handle`` is the transport's handler."""

    def __init__(
        self, store: ContextStore, cluster: Cluster, dialer: Dialer, config: ServiceConfig
    ) -> None:
        self.store = store
        self.replica = Replica(store)
        self.cluster = cluster
        self.dialer = dialer
        self.config = config
        self.name = cluster.name
        self._ring_key: tuple[str, ...] = ()
        self._ring = Ring([], vnodes=config.vnodes)
        self._nursery: trio.Nursery | None = None
        self.quorum_failures = 0
        self.status_sources: dict[str, Callable[[], dict[str, Any]]] = {}
        # running totals for the metrics (node/daemon/exporter.py reads them)
        self.quorum_failures_by_op: dict[str, int] = {}
        self.replication_acks: dict[str, int] = {"ok": 0, "error": 0}
        self.repair_pending = 0  # read-repair sends started and not yet finished
        self.extra_replica_methods: dict[str, Callable[[Peer, Body], Awaitable[Body]]] = {}
        self.handoff: HintSink | None = None  # set by HandoffService when enabled

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the nursery where replication finishes after a quorum answered."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    # -- dispatch ---------------------------------------------------------------------------

    async def handle(self, peer: Peer, method: str, body: Body) -> Body:
        """Answer one request (raises StorageError subclasses for UCXL error answers)."""
        if method.startswith("rep."):
            if peer.kind != "node":
                raise Forbidden(f"{method} is for cluster nodes only")
            handler = self._replica_methods().get(method)
        else:
            handler = self._client_methods().get(method)
        if handler is None:
            raise InvalidPayload(f"unknown method {method!r}", field="method")
        try:
            return await handler(peer, body)
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidPayload(f"malformed {method} request: {exc}", field="body") from None

    def _client_methods(self) -> Mapping[str, Callable[[Peer, Body], Awaitable[Body]]]:
        return {
            "ctx.put": self._put,
            "ctx.put_batch": self._put_batch,
            "ctx.get": self._get,
            "ctx.get_batch": self._get_batch,
            "ctx.history": self._history,
            "ctx.ls": self._ls,
            "ctx.search": self._search,
            "ctx.delete": self._delete,
            "ctx.purge": self._purge,
            "node.status": self._status,
        }

    def _replica_methods(self) -> Mapping[str, Callable[[Peer, Body], Awaitable[Body]]]:
        return {
            "rep.store": self._rep_store,
            "rep.versions": self._rep_versions,
            "rep.head": self._rep_head,
            "rep.purge": self._rep_purge,
            "rep.heads": self._rep_heads,
            "rep.search": self._rep_search,
            "rep.ping": self._rep_ping,
            **self.extra_replica_methods,
            "rep.hint": self._rep_hint,
        }

    # -- client methods -------------------------------------------------------------------

    async def _put(self, peer: Peer, body: Body) -> Body:
        refs = await self._write([self._write_request(peer, body)], body.get("w"))
        return {"ref": to_wire(refs[0])}

    async def _put_batch(self, peer: Peer, body: Body) -> Body:
        requests = [self._write_request(peer, item) for item in body["items"]]
        refs = await self._write(requests, body.get("w"))
        return {"refs": [to_wire(ref) for ref in refs]}

    async def _get(self, peer: Peer, body: Body) -> Body:
        view = await self._read(peer, str(body["address"]), body.get("as_role"), body.get("r"))
        return {"version": to_wire(view)}

    async def _get_batch(self, peer: Peer, body: Body) -> Body:
        results: list[Body] = []
        for address in body["addresses"]:
            try:
                view = await self._read(peer, str(address), body.get("as_role"), body.get("r"))
                results.append({"version": to_wire(view)})
            except StorageError as exc:
                results.append({"error": exc.to_dict()})
        return {"results": results}

    async def _history(self, peer: Peer, body: Body) -> Body:
        address = str(body["address"])
        ctx = await self._resolve(peer, parse(address))
        merged = await self._gather_versions(ctx, body.get("r"))
        history = self.replica.history(ctx, merged)
        return {"history": [to_wire(entry) for entry in history]}

    async def _ls(self, peer: Peer, body: Body) -> Body:
        infos = await self._coverage_heads(str(body["pattern"]), bool(body.get("deleted")))
        return {"contexts": [to_wire(info) for info in infos]}

    async def _search(self, peer: Peer, body: Body) -> Body:
        as_role = self._search_role(peer, body.get("as_role"))
        query = {**body, "as_role": as_role}
        answers = await self._everyone("rep.search", query, self._local_search)
        hits = [from_wire(SearchResult, item) for answer in answers for item in answer["hits"]]
        ranked = merge_hits(hits, int(body.get("limit") or 20))
        return {"hits": [to_wire(hit) for hit in ranked]}

    async def _delete(self, peer: Peer, body: Body) -> Body:
        addr = parse(str(body["address"]))
        self._authorize_write(peer, addr)
        if addr.has_wildcard:
            raise InvalidPayload("delete needs a concrete address", field="address")
        ctx = addr.context()
        rows = await self._gather_versions(ctx, None)
        live = [vid for vid, data in rows if not Envelope.decode(data).tombstone]
        if not rows or rows[-1][0] not in live:
            raise NotFound(f"no such context: {ctx.canonical()}", input=addr.canonical())
        self.store.observe(rows[-1][0])
        env = self.replica.seal_tombstone(ctx, rows[-1][0], f"{addr.agent}/{addr.role}@{peer.name}")
        counts = await self._replicate(ctx, [env], body.get("w"))
        count = counts.get(ctx.canonical(), len(rows) + 1)
        return {"ref": to_wire(_ref(ctx, count, env.version_id))}

    async def _purge(self, peer: Peer, body: Body) -> Body:
        if peer.kind == "client" and ADMIN_ROLE not in peer.roles:
            raise Forbidden("purge needs a client certificate with the admin role")
        ctx = parse(str(body["address"])).context()
        rows = await self._gather_versions(ctx, None)
        if not rows:
            raise NotFound(f"no such context: {ctx.canonical()}", input=ctx.canonical())
        marker = self.replica.purge_marker_for(rows[-1][0], f"{peer.name}")
        placement = self._placement(ctx)
        packed = marker.encode()
        tracker = QuorumTracker(placement.live, self.config.quorum.w)

        async def one(node: str) -> Body:
            return await self._on(
                node, "rep.purge", {"context": ctx.canonical(), "marker": packed},
                lambda: {"removed": self.replica.apply_purge(ctx, marker)},
            )  # fmt: skip

        await self._quorum(placement, tracker, one, op="purge")
        return {"versions": len(rows)}

    async def _status(self, peer: Peer, body: Body) -> Body:
        ring = self._current_ring()
        return {
            "name": self.name,
            "node_id": self.store.keyring.node_id,
            "members": [
                {"name": name, "up": self.cluster.is_up(name)}
                for name in self.cluster.member_names()
            ],
            "ring": {"ownership": ring.ownership(), "vnodes": ring.vnodes},
            "quorum": {
                "n": self.config.quorum.n, "w": self.config.quorum.w, "r": self.config.quorum.r
            },
            "contexts": self.store.versions.count_contexts(),
            "refused_versions": self.replica.refused,
            "quorum_failures": self.quorum_failures,
            **self._operator_status(),
        }  # fmt: skip

    def _operator_status(self) -> Body:
        """``backlog`` and ``antientropy`` (node/cluster/status.py), from the status sources."""
        snapshot = status.read_sources(self.status_sources)
        return {
            "backlog": status.backlog(snapshot, self.repair_pending),
            "antientropy": status.antientropy(snapshot),
        }

    # -- replica methods ------------------------------------------------------------------

    async def _rep_store(self, peer: Peer, body: Body) -> Body:
        blobs = [bytes(blob) for blob in body["envelopes"]]
        stored, heads = await self._blocking(lambda: self.replica.apply(blobs))
        return {"stored": stored, "heads": heads}

    async def _rep_versions(self, peer: Peer, body: Body) -> Body:
        ctx = ContextName.from_canonical(str(body["context"]))
        rows, marker = await self._blocking(lambda: self.replica.version_set(ctx))
        return {
            "envelopes": [[vid, data] for vid, data in rows],
            "purge": None if marker is None else marker.encode(),
        }

    async def _rep_head(self, peer: Peer, body: Body) -> Body:
        head = self.replica.head(ContextName.from_canonical(str(body["context"])))
        return {"latest": None if head is None else head.latest}

    async def _rep_purge(self, peer: Peer, body: Body) -> Body:
        ctx = ContextName.from_canonical(str(body["context"]))
        marker = PurgeMarker.decode(bytes(body["marker"]))
        return {"removed": await self._blocking(lambda: self.replica.apply_purge(ctx, marker))}

    async def _rep_heads(self, peer: Peer, body: Body) -> Body:
        return self._local_heads(body)

    async def _rep_search(self, peer: Peer, body: Body) -> Body:
        return await self._blocking(lambda: self._local_search(body))

    async def _rep_ping(self, peer: Peer, body: Body) -> Body:
        return {"name": self.name}

    async def _rep_hint(self, peer: Peer, body: Body) -> Body:
        if self.handoff is None:
            raise Unavailable(f"{self.name} does not hold hints ([handoff] enabled = false)")
        return await self.handoff.accept(body)

    async def store_on(self, node: str, blobs: Sequence[bytes]) -> Body:
        """``rep.store`` of ``blobs`` on ``node`` (locally for this node)."""
        return await self._on(
            node, "rep.store", {"envelopes": list(blobs)},
            lambda: _store_answer(self.replica.apply(blobs)),
        )  # fmt: skip

    def _local_heads(self, body: Body) -> Body:
        infos = self.store.list_contexts(
            str(body["pattern"]), include_deleted=bool(body.get("deleted"))
        )
        return {"contexts": [to_wire(info) for info in infos]}

    def _local_search(self, body: Body) -> Body:
        hits = self.store.search(
            str(body.get("query", "")),
            project=body.get("project"),
            task=body.get("task"),
            tags=[str(tag) for tag in body.get("tags") or []],
            as_role=body.get("as_role"),
            limit=int(body.get("limit") or 20),
        )
        return {"hits": [to_wire(hit) for hit in hits]}

    # -- coordination -------------------------------------------------------------------

    def _write_request(self, peer: Peer, item: Body) -> WriteRequest:
        addr = parse(str(item["address"]))
        self._authorize_write(peer, addr)
        record = ContextRecord.from_fields(item.get("record") or {})
        readers = item.get("readers")
        return WriteRequest(
            addr.canonical(),
            record,
            None if readers is None else tuple(str(r) for r in readers),
            actor=f"{addr.agent}/{addr.role}@{peer.name}",
        )

    def _authorize_write(self, peer: Peer, addr: Address) -> None:
        if peer.kind == "client" and ADMIN_ROLE not in peer.roles and addr.role not in peer.roles:
            raise Forbidden(
                f"the client's certificate does not grant role {addr.role!r}", field="role"
            )

    def _search_role(self, peer: Peer, as_role: Any) -> str | None:
        if peer.kind != "client":
            return None if as_role is None else str(as_role)
        if as_role is not None:
            if str(as_role) not in peer.roles:
                raise Forbidden(f"the client's certificate does not grant role {as_role!r}")
            return str(as_role)
        if ADMIN_ROLE in peer.roles:
            return None
        roles = self.store.keyring.role_set
        known = [r for r in peer.roles if r in roles]
        if not known:
            raise Forbidden("the client's certificate grants no role of this cluster")
        return max(known, key=lambda r: roles.get(r).authority)

    async def _write(self, requests: Sequence[WriteRequest], w: Any) -> list[StoredRef]:
        prepared = await self._blocking(lambda: [self.store.prepare(req) for req in requests])
        contexts = {item.address.context() for item in prepared}
        parents: dict[ContextName, str | None] = {}
        for ctx in contexts:
            parents[ctx] = await self._latest(ctx)
            if parents[ctx] is not None:
                self.store.observe(str(parents[ctx]))
        envelopes = self.store.seal_prepared(prepared, lambda ctx: parents[ctx])
        refs: list[StoredRef] = []
        by_ctx: dict[ContextName, list[Envelope]] = {}
        for env in envelopes:
            by_ctx.setdefault(ContextName.from_canonical(env.context), []).append(env)
        counts: dict[str, int] = {}
        for ctx, envs in by_ctx.items():
            counts.update(await self._replicate(ctx, envs, w))
        for env in envelopes:
            ctx = ContextName.from_canonical(env.context)
            later = sum(1 for e in by_ctx[ctx] if e.version_id > env.version_id)
            count = counts.get(env.context, 0) - later
            refs.append(_ref(ctx, max(count, 1), env.version_id))
        return refs

    async def _latest(self, ctx: ContextName) -> str | None:
        """The newest version id any live replica reports (the parent of a new version)."""
        placement = self._placement(ctx)
        latest: list[str] = []

        async def ask(node: str) -> None:
            try:
                answer = await self._on(
                    node, "rep.head", {"context": ctx.canonical()},
                    lambda: self._local_head(ctx),
                )  # fmt: skip
            except (PeerUnavailable, RemoteError, StorageError):
                return
            if answer.get("latest"):
                latest.append(str(answer["latest"]))

        async with trio.open_nursery() as nursery:
            for node in placement.live:
                nursery.start_soon(ask, node)
        return max(latest, default=None)

    def _local_head(self, ctx: ContextName) -> Body:
        head = self.replica.head(ctx)
        return {"latest": None if head is None else head.latest}

    async def _replicate(
        self, ctx: ContextName, envs: Sequence[Envelope], w: Any
    ) -> dict[str, int]:
        """Send versions to the live replicas; return once W stored them durably."""
        quorum = self.config.quorum.override(w=None if w is None else int(w))
        placement = self._placement(ctx)
        blobs = [env.encode() for env in envs]
        # hinted handoff (node.cluster.handoff_plan): a sloppy quorum asks every owner and
        # counts a down or failed owner once its hint is durable; strict asks the live ones
        sloppy = self.handoff is not None and self.handoff.sloppy_quorum
        asked = Placement(placement.replicas, placement.replicas) if sloppy else placement
        tracker = QuorumTracker(asked.live, quorum.w)
        counts: dict[str, int] = {}

        async def one(node: str) -> Body:
            if node not in placement.live:
                return await self._hint(ctx, placement, node, blobs)
            try:
                answer = await self.store_on(node, blobs)
                if any(flag is None for flag in answer["stored"]):
                    raise Unavailable(f"{node} refused a version (bad or untrusted signature)")
            except (PeerUnavailable, RemoteError, StorageError):
                if self.handoff is None:
                    raise
                hinted = await self._hint(ctx, placement, node, blobs)
                if not sloppy:
                    raise
                return hinted
            for context, count in answer["heads"].items():
                counts[context] = max(counts.get(context, 0), int(count))
            return answer

        await self._quorum(asked, tracker, one, op="write")
        if self.handoff is not None and not sloppy and self._nursery is not None:
            for node in placement.replicas:
                if node not in placement.live:
                    self._nursery.start_soon(self._hint_quietly, ctx, placement, node, blobs)
        return counts

    async def _hint(
        self, ctx: ContextName, placement: Placement, node: str, blobs: list[bytes]
    ) -> Body:
        """Store a hint for ``node``; raises Unavailable unless it is durable."""
        assert self.handoff is not None
        if node not in await self.handoff.store_hints(ctx, placement.replicas, {node}, blobs):
            raise Unavailable(f"no durable hint for {node}")
        return {"hinted": node}

    async def _hint_quietly(
        self, ctx: ContextName, placement: Placement, node: str, blobs: list[bytes]
    ) -> None:
        try:
            await self._hint(ctx, placement, node, blobs)
        except (PeerUnavailable, RemoteError, StorageError) as exc:
            log.debug("hint for %s not stored: %s", node, exc)

    async def _quorum(
        self,
        placement: Placement,
        tracker: QuorumTracker,
        one: Callable[[str], Awaitable[Body]],
        *,
        op: str,
    ) -> None:
        """Run ``one`` on every live replica; return once the tracker's quorum is reached.

        Raises:
            Unavailable: too few replicas are up, or answered in time.
        """
        if not placement.can_reach(tracker.needed):
            self._count_quorum_failure(op)
            raise Unavailable(
                f"{op}: {len(placement.live)} of {len(placement.replicas)} replicas are up, "
                f"{tracker.needed} needed"
            )
        decided = trio.Event()

        async def attempt(node: str) -> None:
            try:
                await one(node)
                success = True
            except (PeerUnavailable, RemoteError, StorageError) as exc:
                log.debug("%s on %s failed: %s", op, node, exc)
                success = False
            if op == "write":
                self.replication_acks["ok" if success else "error"] += 1
            if tracker.record(node, success) is not Outcome.PENDING:
                decided.set()

        assert self._nursery is not None, "NodeService.run must be running"
        for node in placement.live:
            self._nursery.start_soon(attempt, node)
        with trio.move_on_after(self.config.timeout_s):
            await decided.wait()
        if tracker.outcome is not Outcome.REACHED:
            self._count_quorum_failure(op)
            raise Unavailable(
                f"{op}: {len(tracker.ok)} of {tracker.needed} needed replicas answered in time"
            )

    def _count_quorum_failure(self, op: str) -> None:
        self.quorum_failures += 1
        self.quorum_failures_by_op[op] = self.quorum_failures_by_op.get(op, 0) + 1

    async def _gather_versions(self, ctx: ContextName, r: Any) -> list[tuple[str, bytes]]:
        """The merged version set of ``ctx`` from R replicas, with read repair."""
        quorum = self.config.quorum.override(r=None if r is None else int(r))
        placement = self._placement(ctx)
        tracker = QuorumTracker(placement.live, quorum.r)
        answers: dict[str, VersionSet] = {}

        async def one(node: str) -> Body:
            answer = await self._on(
                node, "rep.versions", {"context": ctx.canonical()},
                lambda: _versions_answer(self.replica.version_set(ctx)),
            )  # fmt: skip
            marker = answer.get("purge")
            answers[node] = VersionSet(
                {str(vid): bytes(data) for vid, data in answer["envelopes"]},
                None if marker is None else PurgeMarker.decode(bytes(marker)),
            )
            return answer

        await self._quorum(placement, tracker, one, op="read")
        merged = merge_version_sets(dict(answers))
        self._repair(ctx, merged.envelopes, merged.missing, merged.purge, merged.stale_purge)
        return list(merged.envelopes)

    def _repair(
        self,
        ctx: ContextName,
        rows: Sequence[tuple[str, bytes]],
        missing: Mapping[str, Sequence[str]],
        purge: PurgeMarker | None,
        stale: Sequence[str],
    ) -> None:
        """Push to each replica what it lacked (runs in the service nursery)."""
        assert self._nursery is not None
        by_id = dict(rows)
        for node, vids in missing.items():
            blobs = [by_id[vid] for vid in vids]
            self._start_repair(node, "rep.store", {"envelopes": blobs})
        if purge is not None:
            body = {"context": ctx.canonical(), "marker": purge.encode()}
            for node in stale:
                self._start_repair(node, "rep.purge", body)

    def _start_repair(self, node: str, method: str, body: Body) -> None:
        """Queue one repair send in the service nursery; ``repair_pending`` counts it."""
        assert self._nursery is not None

        async def send() -> None:
            try:
                await self._best_effort(node, method, body)
            finally:
                self.repair_pending -= 1

        self.repair_pending += 1
        self._nursery.start_soon(send)

    async def _best_effort(self, node: str, method: str, body: Body) -> None:
        try:
            if node == self.name:
                await self.handle(_SELF, method, body)
            else:
                await self.dialer.call(node, method, body, timeout_s=self.config.timeout_s)
        except (PeerUnavailable, RemoteError, StorageError) as exc:
            log.debug("repair %s on %s failed: %s", method, node, exc)

    async def _read(self, peer: Peer, address: str, as_role: Any, r: Any) -> Any:
        addr = parse(address)
        ctx = await self._resolve(peer, addr)
        rows = await self._gather_versions(ctx, r)
        allowed = peer.roles if peer.kind == "client" else None
        return await self._blocking(
            lambda: self.replica.view(
                ctx, rows, addr.temporal,
                as_role=None if as_role is None else str(as_role),
                allowed_roles=allowed, where=address,
            )
        )  # fmt: skip

    async def _resolve(self, peer: Peer, addr: Address) -> ContextName:
        ctx = addr.context()
        if not ctx.has_wildcard:
            return ctx
        infos = await self._coverage_heads(addr.canonical(), False)
        live = [info for info in infos if info.live and ctx.matches(parse(info.context).context())]
        if not live:
            raise NotFound(f"no context matches {addr.canonical()}", input=addr.canonical())
        best = max(live, key=lambda info: (info.updated_at_ms, info.context))
        return parse(best.context).context()

    async def _coverage_heads(self, pattern: str, deleted: bool) -> list[ContextInfo]:
        """Every matching context, from every live node (together they hold every range)."""
        body = {"pattern": pattern, "deleted": deleted}
        answers = await self._everyone("rep.heads", body, lambda b: self._local_heads(b))
        infos = [from_wire(ContextInfo, item) for a in answers for item in a["contexts"]]
        return merge_listings(infos)

    async def _everyone(self, method: str, body: Body, local: Callable[[Body], Body]) -> list[Body]:
        """Ask every live member (this node locally); fail if none answered."""
        answers: list[Body] = []

        async def ask(node: str) -> None:
            try:
                answers.append(await self._on(node, method, body, lambda: local(body)))
            except (PeerUnavailable, RemoteError) as exc:
                log.debug("%s on %s failed: %s", method, node, exc)

        async with trio.open_nursery() as nursery:
            for node in self.cluster.member_names():
                if self.cluster.is_up(node):
                    nursery.start_soon(ask, node)
        if not answers:
            raise Unavailable(f"{method}: no node answered")
        return answers

    async def _on(self, node: str, method: str, body: Body, local: Callable[[], Body]) -> Body:
        """Run ``method`` on ``node``: locally (in a thread) for this node, else over RPC."""
        if node == self.name:
            return await self._blocking(local)
        return await self.dialer.call(node, method, body, timeout_s=self.config.timeout_s)

    async def _blocking(self, fn: Callable[[], T]) -> T:
        if self.config.blocking_in_threads:
            return await trio.to_thread.run_sync(fn)
        return fn()

    def _placement(self, ctx: ContextName) -> Placement:
        up = {name for name in self.cluster.member_names() if self.cluster.is_up(name)}
        return place(self._current_ring(), ctx.key(), self.config.quorum.n, up)

    def _current_ring(self) -> Ring:
        names = tuple(sorted(self.cluster.member_names()))
        if names != self._ring_key:
            self._ring = Ring([RingMember(name) for name in names], vnodes=self.config.vnodes)
            self._ring_key = names
        return self._ring


_SELF = Peer(name="self", kind="node", roles=(), fingerprint="")


def _ref(ctx: ContextName, count: int, version_id: str) -> StoredRef:
    return StoredRef(ctx.address(Temporal("version", count)).canonical(), count, version_id)


def _store_answer(result: tuple[list[bool | None], dict[str, int]]) -> Body:
    stored, heads = result
    return {"stored": stored, "heads": heads}


def _versions_answer(result: tuple[list[tuple[str, bytes]], PurgeMarker | None]) -> Body:
    rows, marker = result
    return {
        "envelopes": [[vid, data] for vid, data in rows],
        "purge": None if marker is None else marker.encode(),
    }
