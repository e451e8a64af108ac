"""The node service: answers node/rpc/api.py requests, coordinating replicas (a trio shell).

Owns: authorization of callers by certificate roles, admission (at most
``max_inflight_requests`` client requests and as many replica requests at once; beyond
that ``UCXL-503-UNAVAILABLE`` "busy", nothing queued), carrying out the coordinator's
decisions (``node.cluster.coordinator``: ranks, delete, wildcard resolution, search role,
repair plan, budgets), hinted handoff's hook on the write path (``HintSink``), and the
operator status. The replica-side methods live in ``node.cluster.replica_side``; replica
calls, their fault isolation and budgets in ``node.cluster.fanout``; request parsing in
``node.cluster.requests``; peer-answer parsing in ``node.cluster.answers``. Other
subsystems add replica methods through ``extra_replica_methods`` (anti-entropy's
``rep.tree``/``rep.digests``/``rep.ids``/``rep.fetch``, handoff's ``rep.hint``, admin
custody's ``admin.share``/``admin.forward``: node certificates only), client methods
through ``extra_client_methods`` (membership's ``ctl.member_*``; the handler checks the
caller's roles) and figures through ``status_sources``.

The control plane (``node.control.custody``) adds two hooks: ``forwarder``, consulted
with each parsed client request (it may answer it by forwarding it to the leader, or
return None to let this node answer; a request that arrived forwarded is never forwarded
again), and ``leader_term_for_ops``, the fencing token a leader-only operation carries
(``ctx.purge`` stamps its ``rep.purge`` with it; it raises when this node is not the
leader). Without them (no control plane) purge runs unfenced, as before.

Order of effects for a write: validate and encrypt (locally) -> sign, with this node's
own latest version as the parent (no read before the write; a ``w`` whose quorum does not
meet every purge quorum reads the parent and purge floor from the replicas first,
``coordinator.needs_pre_read``) -> send to every live replica in ``MAX_BATCH_BYTES``
batches through the store batcher (``node.cluster.store_batch``: concurrent writes share
one ``rep.store`` frame per replica) -> answer once W acknowledged every batch of *this*
write (strict quorum; with ``[handoff] sloppy_quorum`` a durable hint for a down or failed
owner counts too); a replica refusing a version as purged names its marker's ``upto``: the
versions are re-sealed after it and sent once more. Hints for the owners that missed it,
and the remaining sends, finish in the service's own nursery. The contexts of a batch
write are replicated concurrently. For a read: page the version sets of the live
replicas -> answer from the first R, merged -> push what a replica lacked (read repair,
bounded fan-out).

Membership changes (``set_layout``, ``node.cluster.layout``): while a layout is in
transition, writes (puts, deletes, purges, their hints) go to the union of the old and
the new preference list and succeed only with W acknowledgements in each; reads gather R
from the old list, which holds every acknowledged write, and also ask the new-only owners
(not counted toward R): every answer, the late ones too, gets read repair, so a read
during a move makes the context's new owners whole. Every write counts in ``writes``
(``node.cluster.inflight_writes``) by the ring epoch it was placed by, until each of its
replica attempts ended: range streaming's ``epoch_seen`` waits for the older ones.
Without a layout, or outside a transition, placement is the ring over
``cluster.member_names()`` / the layout's members.

Errors: a body that does not parse answers ``UCXL-400-INVALID_PAYLOAD`` naming the field;
after parsing, an exception that is not a ``StorageError``/``NodeError`` is our bug: it is
logged with its traceback, counted, and answered ``UCXL-500-INTERNAL``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from typing import Any, Protocol

import msgpack
import trio

from crypto.roles import ADMIN_ROLE
from node.cluster import answers, coordinator, status
from node.cluster.fanout import Dialer, Fanout, FaultSink, deadline
from node.cluster.handoff_plan import counts_toward_w
from node.cluster.inflight_writes import InflightWrites, WriteToken
from node.cluster.layout import Layout, place_layout, place_read
from node.cluster.replica_side import INLINE_READ_VERSIONS, ReplicaSide
from node.cluster.replication import (
    Merged,
    Placement,
    Quorum,
    QuorumTracker,
    VersionSet,
    batches_by_bytes,
    lacking,
    merge_hits,
    merge_listings,
    merge_version_sets,
    place,
)
from node.cluster.requests import Parsed, WriteItem, parse_request
from node.cluster.ring import Ring, RingMember
from node.cluster.store_batch import Item, StoreBatcher
from node.errors import NodeError
from node.rpc.transport import Peer
from node.rpc.wire import MAX_BATCH_BYTES
from storage.address import Address, ContextName, Temporal, parse
from storage.context_store import ContextStore, Prepared, WriteRequest
from storage.envelope import Envelope
from storage.errors import Forbidden, Internal, InvalidPayload, NotFound, StorageError, Unavailable
from storage.replica import Replica
from storage.versions import VersionId
from storage.views import ContextInfo, StoredRef, to_wire

__all__ = ["Cluster", "Dialer", "NodeService", "ReplicateResult", "ServiceConfig"]
log = logging.getLogger(__name__)
Body = dict[str, Any]
# liveness, ops and the control plane's messages stay answerable under load
UNLIMITED_METHODS = frozenset({"rep.ping", "node.status", "raft.msg"})
# A write of one record with at most this much content is prepared (encoded, compressed,
# sealed: ~30-60 µs for 1 KB) on the event loop: handing it to a worker thread and back
# costs more CPU than the work (~60-120 µs measured here) and buys no parallelism, since
# the work holds the GIL. Larger or batched writes still go to a thread. The one slow case
# is the write that draws a new data key: one age wrap (~0.3-1 ms) per [keys]
# data_key_max_records records or data_key_max_age_s, on the event loop.
INLINE_PREPARE_MAX_CONTENT_BYTES = 64 * 1024


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


Handler = Callable[[Peer, Body], Awaitable[Body]]
# (client, parsed request, raw body) -> the answer, or None to answer here
Forwarder = Callable[[Peer, Parsed, Body], Awaitable[Body | None]]


@dataclass(frozen=True)
class ServiceConfig:
    """Replication settings of one node."""

    quorum: Quorum = field(default_factory=Quorum)
    vnodes: int = 64
    timeout_s: float = 2.0
    blocking_in_threads: bool = True  # False in the simulation tier (no real I/O there)
    max_inflight_requests: int = 256  # per kind (client, replica); beyond: 503 busy
    max_repair_sends: int = 64  # concurrent background repair sends; excess dropped


class VersionPurged(Unavailable):
    """A replica refused a version because its purge marker covers it."""


@dataclass
class Learned:
    """What a write learned from the replicas' answers: the newest purge ``upto``."""

    purged_upto: str | None = None

    def note_purged(self, upto: str) -> None:
        """Keep the greatest ``upto``."""
        if self.purged_upto is None or VersionId.parse(upto) > VersionId.parse(self.purged_upto):
            self.purged_upto = upto

    def covers(self, envs: Sequence[Envelope]) -> bool:
        """Whether a noted marker covers any of ``envs``."""
        if self.purged_upto is None:
            return False
        upto = VersionId.parse(self.purged_upto)
        return any(VersionId.parse(env.version_id) <= upto for env in envs)


@dataclass
class ReplicateResult:
    """How a replicated write went: who acknowledged, failed, or was down."""

    heads: dict[str, int] = field(default_factory=dict)  # context -> highest count reported
    acked: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # answered badly or not in time
    down: list[str] = field(default_factory=list)  # preferred replicas not asked (down)


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
        self.status_sources: dict[str, Callable[[], dict[str, Any]]] = {}
        # top-level ``node.status`` fields of other parts (the control plane's role, term...)
        self.status_fields: list[Callable[[], dict[str, Any]]] = []
        self.fanout = Fanout(
            self.name, dialer, timeout_s=config.timeout_s,
            blocking_in_threads=config.blocking_in_threads,
            max_background=config.max_repair_sends,
        )  # fmt: skip
        self.local = ReplicaSide(self.name, self.replica, self.fanout.blocking)
        self.status_fields.append(self.local.index_status)  # index: {pending, lag_s}
        self._ring_key: tuple[str, ...] = ()
        self._ring = Ring([], vnodes=config.vnodes)
        self._old_ring_key: tuple[str, ...] = ()
        self._old_ring = Ring([], vnodes=config.vnodes)
        # the rings of the applied metadata (set by the daemon); None: discovery's members
        self.layout: Layout | None = None
        self._inflight = {"client": 0, "replica": 0}
        self.quorum_failures = 0
        # running totals for the metrics (node/daemon/exporter.py reads them)
        self.quorum_failures_by_op: dict[str, int] = {}
        self.replication_acks: dict[str, int] = {"ok": 0, "error": 0}
        self.repair_pending = 0  # read-repair sends started and not yet finished
        # replica methods of other subsystems (anti-entropy, handoff); each parses its own body
        self.extra_replica_methods: dict[str, Handler] = {"rep.hint": self._rep_hint}
        # client methods of other subsystems (membership's ctl.member_*, key rotation's
        # keys.rotate); each checks roles
        self.extra_client_methods: dict[str, Handler] = {}
        self.handoff: HintSink | None = None  # set by HandoffService when enabled
        self.forwarder: Forwarder | None = None  # set by the control plane (admin custody)
        # consulted when this node refused a client request Forbidden: it may answer it
        # elsewhere (custody: a read only the admin identity opens, forwarded to the leader)
        self.forward_refused: Forwarder | None = None
        # the leader's term for leader-only operations (raises Unavailable on a non-leader);
        # set by the control plane; None: no control plane, leader operations unfenced
        self.leader_term_for_ops: Callable[[], int] | None = None
        # group commit of the write path: concurrent puts share rep.store frames
        self.store_batcher = StoreBatcher(
            self._send_store, lambda: self.fanout.nursery, max_bytes=MAX_BATCH_BYTES
        )
        self.purge_retries = 0  # writes re-sealed after a replica's purge marker
        # writes in flight per layout epoch: ``epoch_seen`` waits for the older ones
        self.writes = InflightWrites()
        self._write_ended = trio.Event()

    def set_layout(self, layout: Layout | None) -> None:
        """Place by ``layout`` from now on (None: by ``cluster.member_names()``)."""
        self.layout = layout

    def _begin_write(self) -> _Write:
        """Count a write routed by the current layout (call right before placing it)."""
        return _Write(self.writes.begin(0 if self.layout is None else self.layout.epoch))

    def _end_write(self, token: WriteToken) -> None:
        """Every attempt of the write of ``token`` ended; wake whoever waits on it."""
        self.writes.end(token)
        self._write_ended.set()
        self._write_ended = trio.Event()

    def _end_unless_handed(self, write: _Write) -> None:
        """End ``write`` now unless its attempts were started (their end ends it)."""
        if not write.handed:
            self._end_write(write.token)

    async def wait_writes_drained(self, epoch: int, timeout_s: float) -> bool:
        """Wait until no write this node coordinates that was routed by a layout older
        than ``epoch`` is in flight (every replica attempt of it ended).

        Returns:
            True once drained; False when ``timeout_s`` passed first.
        """
        with trio.move_on_after(timeout_s):
            while not self.writes.drained_below(epoch):
                await self._write_ended.wait()
            return True
        return False

    @property
    def faults(self) -> Any:
        """The fault counters (``node.cluster.fanout.FaultCounters``)."""
        return self.fanout.faults

    def report_faults_to(self, sink: FaultSink) -> None:
        """Report faults to ``sink`` too (the daemon's metrics)."""
        self.fanout.sink = sink

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the nursery where replication finishes after a quorum answered."""
        async with trio.open_nursery() as nursery:
            self.fanout.nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    # -- dispatch ---------------------------------------------------------------------------

    async def handle(self, peer: Peer, method: str, body: Body, *, forwarded: bool = False) -> Body:
        """Answer one request (raises StorageError subclasses for UCXL error answers).

        ``forwarded``: the request was forwarded by another node (``admin.forward``) and is
        answered here, never forwarded again.
        """
        node_only = method.startswith("rep.") or method in self.extra_replica_methods
        kind = "replica" if node_only else "client"
        if kind == "replica" and peer.kind != "node":
            raise Forbidden(f"{method} is for cluster nodes only")
        parsed = parse_request(method, body)
        if method in UNLIMITED_METHODS:
            return await self._dispatch(peer, parsed)
        if self._inflight[kind] >= self.config.max_inflight_requests:
            self.fanout.faults.refused_busy += 1
            self.fanout.sink.refused_busy()
            raise Unavailable(
                f"node {self.name} is busy: {self._inflight[kind]} {kind} requests in flight "
                f"(limit {self.config.max_inflight_requests}); retry later"
            )
        self._inflight[kind] += 1
        try:
            return await self._dispatch(peer, parsed, None if forwarded else body)
        finally:
            self._inflight[kind] -= 1

    async def _dispatch(self, peer: Peer, parsed: Parsed, raw: Body | None = None) -> Body:
        end = trio.current_effective_deadline()
        deadline.set(None if end == float("inf") else end)
        handler = self._methods()[parsed.method]
        try:
            if raw is not None and self.forwarder is not None and peer.kind == "client":
                answer = await self.forwarder(peer, parsed, raw)
                if answer is not None:
                    return answer
            try:
                return await handler(peer, parsed.args)
            except Forbidden:
                if raw is None or self.forward_refused is None or peer.kind != "client":
                    raise
                elsewhere = await self.forward_refused(peer, parsed, raw)
                if elsewhere is None:
                    raise
                return elsewhere
        except (StorageError, NodeError):
            raise
        except Exception:
            self.fanout.internal(parsed.method)
            raise Internal(f"{parsed.method} failed inside the node (logged)") from None

    def _methods(self) -> Mapping[str, Callable[[Peer, Body], Awaitable[Body]]]:
        return {
            "ctx.put": self._put, "ctx.put_batch": self._put_batch, "ctx.get": self._get,
            "ctx.get_batch": self._get_batch, "ctx.history": self._history, "ctx.ls": self._ls,
            "ctx.search": self._search, "ctx.delete": self._delete, "ctx.purge": self._purge,
            "node.status": self._status,
            **self.local.methods(),
            **self.extra_client_methods,
            **self.extra_replica_methods,
        }  # fmt: skip

    # -- client methods -------------------------------------------------------------------

    async def _put(self, peer: Peer, args: Body) -> Body:
        refs = await self._write([self._write_request(peer, i) for i in args["items"]], args["w"])
        return {"ref": to_wire(refs[0])}

    async def _put_batch(self, peer: Peer, args: Body) -> Body:
        refs = await self._write([self._write_request(peer, i) for i in args["items"]], args["w"])
        return {"refs": [to_wire(ref) for ref in refs]}

    async def _get(self, peer: Peer, args: Body) -> Body:
        view = await self._read(peer, args["address"], args["as_role"], args["r"])
        return {"version": to_wire(view)}

    async def _get_batch(self, peer: Peer, args: Body) -> Body:
        """Answers in order while they fit ``MAX_BATCH_BYTES``; ``more``: ask for the rest."""
        results: list[Body] = []
        used = 0
        for address in args["addresses"]:
            try:
                view = await self._read(peer, parse(address), args["as_role"], args["r"])
                item: Body = {"version": to_wire(view)}
            except StorageError as exc:
                item = {"error": exc.to_dict()}
            size = len(msgpack.packb(item, use_bin_type=True))
            if results and used + size > MAX_BATCH_BYTES:
                return {"results": results, "more": True}
            results.append(item)
            used += size
        return {"results": results, "more": False}

    async def _history(self, peer: Peer, args: Body) -> Body:
        ctx = await self._resolve(args["address"])
        merged = await self._gather_versions(ctx, args["r"])
        history = await self.fanout.blocking(lambda: self.replica.history(ctx, merged))
        rest = [to_wire(entry) for entry in history[args["from"] :]]
        sizes = [len(msgpack.packb(entry, use_bin_type=True)) for entry in rest]
        count = coordinator.fitting(sizes, MAX_BATCH_BYTES)
        return {"history": rest[:count], "more": count < len(rest)}

    async def _ls(self, peer: Peer, args: Body) -> Body:
        infos = await self._coverage_heads(args["pattern"], args["deleted"])
        return {"contexts": [to_wire(info) for info in infos]}

    async def _search(self, peer: Peer, args: Body) -> Body:
        roles = self.store.keyring.role_set
        authorities = {name: int(roles.get(name).authority) for name in roles.names}
        choice = coordinator.search_role(peer.kind, peer.roles, args["as_role"], authorities)
        if choice.refusal is not None:
            raise Forbidden(choice.refusal)
        query = {**args, "as_role": choice.role}

        async def ask(node: str) -> list[Any]:
            answer = await self.fanout.on(
                node, "rep.search", query, lambda: self.local.search(query)
            )
            return answers.parse_search(answer)

        hits = await self.fanout.everyone(self._up_members(), "rep.search", ask)
        ranked = merge_hits([hit for part in hits for hit in part], int(args["limit"]))
        return {"hits": [to_wire(hit) for hit in ranked]}

    async def _delete(self, peer: Peer, args: Body) -> Body:
        addr: Address = args["address"]
        self._authorize_write(peer, addr)
        if addr.has_wildcard:
            raise InvalidPayload("delete needs a concrete address", field="address")
        ctx = addr.context()
        rows = await self._gather_versions(ctx, None)
        kinds = [(vid, Envelope.decode(data).tombstone) for vid, data in rows]
        decision = coordinator.decide_delete(kinds)
        if decision is None:
            raise NotFound(f"no such context: {ctx.canonical()}", input=addr.canonical())
        self.store.observe(decision.parent)
        actor = f"{addr.agent}/{addr.role}@{peer.name}"
        env = self.replica.seal_tombstone(ctx, decision.parent, actor)
        result = await self.replicate(ctx, [env], args["w"])
        count = result.heads.get(ctx.canonical(), decision.fallback_count)
        return {"ref": to_wire(_ref(ctx, count, env.version_id))}

    async def _purge(self, peer: Peer, args: Body) -> Body:
        if peer.kind == "client" and ADMIN_ROLE not in peer.roles:
            raise Forbidden("purge needs a client certificate with the admin role")
        # a leader-only operation: stamped with the leader's term (fencing), when there is
        # a control plane; this raises on a node that is not (or no longer) the leader
        term = None if self.leader_term_for_ops is None else self.leader_term_for_ops()
        ctx = args["address"].context()
        rows = await self._gather_versions(ctx, None)
        if not rows:
            raise NotFound(f"no such context: {ctx.canonical()}", input=ctx.canonical())
        marker = self.replica.purge_marker_for(rows[-1][0], f"{peer.name}")
        body: Body = {"context": ctx.canonical(), "marker": marker.encode()}
        if term is not None:
            body["term"] = term

        async def one(node: str) -> None:
            answers.parse_purge(await self.fanout.on(
                node, "rep.purge", body, lambda: self.local.purge(ctx, marker, term)
            ))  # fmt: skip

        write = self._begin_write()  # routed by this layout: epoch_seen waits for it
        try:
            placement = self._placement(ctx)
            tracker = self._tracker(placement, self.config.quorum.w, "purge")
            await self._quorum(placement, tracker, one, op="purge", write=write)
        finally:
            self._end_unless_handed(write)
        return {"versions": len(rows)}

    async def _status(self, peer: Peer, args: Body) -> Body:
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
            "faults": self.fanout.faults.to_wire(),
            "inflight": dict(self._inflight),
            "store_batches": asdict(self.store_batcher.stats),
            **self._operator_status(),
            **{k: v for fields in self.status_fields for k, v in fields().items()},
        }  # fmt: skip

    def _operator_status(self) -> Body:
        """``backlog`` and ``antientropy`` (node/cluster/status.py), from the status sources."""
        snapshot = status.read_sources(self.status_sources)
        return {
            "backlog": status.backlog(snapshot, self.repair_pending),
            "antientropy": status.antientropy(snapshot),
        }

    # -- replica methods (node.cluster.replica_side) ---------------------------------------

    async def _rep_hint(self, peer: Peer, body: Body) -> Body:
        if self.handoff is None:
            raise Unavailable(f"{self.name} does not hold hints ([handoff] enabled = false)")
        return await self.handoff.accept(body)

    async def store_on(self, node: str, blobs: Sequence[bytes]) -> Body:
        """``rep.store`` of ``blobs`` on ``node`` (locally for this node)."""
        batch = list(blobs)
        return await self.fanout.on(
            node, "rep.store", {"envelopes": batch}, partial(self.local.apply, batch)
        )

    async def _send_store(self, node: str, blobs: list[bytes]) -> Body:
        """One frame of the store batcher (under the deadline it set)."""
        return await self.store_on(node, blobs)

    # -- coordination -------------------------------------------------------------------

    def _write_request(self, peer: Peer, item: WriteItem) -> WriteRequest:
        self._authorize_write(peer, item.address)
        actor = f"{item.address.agent}/{item.address.role}@{peer.name}"
        return WriteRequest(item.address, item.record, item.readers, actor=actor)

    def _authorize_write(self, peer: Peer, addr: Address) -> None:
        if peer.kind == "client" and ADMIN_ROLE not in peer.roles and addr.role not in peer.roles:
            raise Forbidden(
                f"the client's certificate does not grant role {addr.role!r}", field="role"
            )

    def _quorum_of(self, w: int | None = None, r: int | None = None) -> Quorum:
        try:
            return self.config.quorum.override(w=w, r=r)
        except ValueError:
            name = "w" if w is not None else "r"
            raise InvalidPayload(
                f"{name} must be between 1 and n={self.config.quorum.n}", field=name
            ) from None

    async def _write(self, requests: Sequence[WriteRequest], w: int | None) -> list[StoredRef]:
        """Prepare, then seal and replicate each context's versions (contexts at once)."""
        quorum = self._quorum_of(w=w)
        if _small_single(requests):  # CPU only, holding the GIL: a thread hop costs more
            prepared = [self.store.prepare(requests[0])]
        else:
            prepared = await self.fanout.blocking(lambda: [self.store.prepare(r) for r in requests])
        by_ctx: dict[ContextName, list[Prepared]] = {}
        for item in prepared:
            by_ctx.setdefault(item.context, []).append(item)
        pre_read = coordinator.needs_pre_read(quorum.w, self.config.quorum.w, quorum.n)
        done: dict[ContextName, tuple[list[Envelope], ReplicateResult] | Exception] = {}

        async def one(ctx: ContextName, items: list[Prepared]) -> None:
            try:
                done[ctx] = await self._put_context(ctx, items, w, pre_read=pre_read)
            except Exception as exc:  # raised below, in request order
                done[ctx] = exc

        if len(by_ctx) == 1:
            await one(*next(iter(by_ctx.items())))
        else:  # contexts concurrently: the store batcher folds them into shared frames
            async with trio.open_nursery() as nursery:
                for ctx, items in by_ctx.items():
                    nursery.start_soon(one, ctx, items)
        heads: dict[str, int] = {}
        written: dict[ContextName, list[Envelope]] = {}
        for ctx in by_ctx:
            outcome = done[ctx]
            if isinstance(outcome, Exception):
                raise outcome
            written[ctx], result = outcome
            heads.update(result.heads)
        batch = {ctx.canonical(): [env.version_id for env in envs] for ctx, envs in written.items()}
        ranks = coordinator.write_ranks(batch, heads)
        refs, used = [], dict.fromkeys(written, 0)
        for item in prepared:  # in request order
            env = written[item.context][used[item.context]]
            used[item.context] += 1
            refs.append(_ref(item.context, ranks[(env.context, env.version_id)], env.version_id))
        return refs

    async def _put_context(
        self, ctx: ContextName, items: Sequence[Prepared], w: int | None, *, pre_read: bool
    ) -> tuple[list[Envelope], ReplicateResult]:
        """Seal ``items`` (versions of ``ctx``) and replicate them.

        No read before the write (issue 10, lever 2): the parent is this node's own latest
        version of ``ctx`` when it holds one, else None (the parent only links history and
        groups siblings; the latest version is the greatest id, whatever the parents). The
        one thing the old pre-read guarded, that a new id sorts after the newest purge
        marker, holds by quorum intersection plus one retry: a purge reached W replicas,
        this write needs W of the same N (W + W > N), so a replica holding the marker
        answers; it refuses the version and names the marker's ``upto``; then the versions
        are re-sealed after it and sent once more. A write whose ``w`` leaves no such
        intersection (``pre_read``) still asks the replicas first (``_latest``).
        """
        if pre_read:
            parent, purged_upto = await self._latest(ctx)
            for seen in (parent, purged_upto):  # the new version sorts after both
                if seen is not None:
                    self.store.observe(seen)
        else:
            parent = self._local_parent(ctx)
        envs = self.store.seal_prepared(items, lambda _ctx: parent)
        learned = Learned()
        try:
            result = await self.replicate(ctx, envs, w, learned=learned)
            if not learned.covers(envs):
                return envs, result
        except Unavailable:
            if learned.purged_upto is None and not pre_read:
                # a replica of an older release refuses a purged version without naming
                # its marker's ``upto``: ask the replicas' heads once, on this failure path
                _, upto_seen = await self._latest(ctx)
                if upto_seen is None or not Learned(upto_seen).covers(envs):
                    raise
                learned.note_purged(upto_seen)
            if learned.purged_upto is None:
                raise
        upto = learned.purged_upto
        assert upto is not None
        self.store.observe(upto)
        self.purge_retries += 1
        if parent is not None and VersionId.parse(parent) <= VersionId.parse(upto):
            parent = None  # the parent was purged
        envs = self.store.seal_prepared(items, lambda _ctx: parent)
        return envs, await self.replicate(ctx, envs, w)

    def _local_parent(self, ctx: ContextName) -> str | None:
        """The newest version of ``ctx`` this node holds (a replica's view), or None."""
        head = self.store.versions.head(ctx)
        return None if head is None else head.latest

    async def _latest(self, ctx: ContextName) -> tuple[str | None, str | None]:
        """The newest version id any live replica reports (the parent of a new version),
        and the newest purge marker's ``upto`` (a new version must sort after it, or the
        replicas would refuse it as purged)."""

        async def ask(node: str) -> tuple[str | None, str | None]:
            answer = await self.fanout.on(
                node, "rep.head", {"context": ctx.canonical()}, lambda: self.local.head(ctx)
            )
            return answers.parse_head(answer), answers.parse_head_purge(answer)

        try:
            seen = await self.fanout.everyone(self._placement(ctx).live, "rep.head", ask)
        except Unavailable:
            return None, None
        latest = [head for head, _ in seen if head is not None]
        purged = [upto for _, upto in seen if upto is not None]
        return max(latest, default=None), max(purged, key=VersionId.parse, default=None)

    async def replicate(
        self,
        ctx: ContextName,
        envs: Sequence[Envelope],
        w: int | None,
        *,
        learned: Learned | None = None,
    ) -> ReplicateResult:
        """Send versions this node just sealed (signed with its own key) to the live
        replicas in batches; return once W stored them all.

        Each replica's batches go through the store batcher, which shares frames with
        concurrent writes; W is counted from this write's own flags. Newest version ids the
        replicas report move this node's clock; purge markers that made a replica refuse a
        version are noted in ``learned``.

        Returns the acknowledging, failed and down replicas (hinted handoff keeps the
        versions for the failed and down ones).
        """
        quorum = self._quorum_of(w=w)
        write = self._begin_write()  # routed by this layout: epoch_seen waits for it
        try:
            return await self._replicate(ctx, envs, quorum, write, learned)
        finally:
            self._end_unless_handed(write)

    async def _replicate(
        self,
        ctx: ContextName,
        envs: Sequence[Envelope],
        quorum: Quorum,
        write: _Write,
        learned: Learned | None,
    ) -> ReplicateResult:
        """``replicate`` under the write tracker's ``write`` (ended once all attempts end)."""
        placement = self._placement(ctx)
        items = [Item(env.context, env.version_id, env.encode()) for env in envs]
        blobs = [item.blob for item in items]
        for blob in blobs:  # sealed by this node just now: its local apply skips a verify
            self.replica.sealed_here(blob)
        batches: list[list[Item]] = []
        if len(blobs) == 1:  # a single put: one batch, whatever its size
            batches.append(items)
        else:
            for batch in batches_by_bytes(blobs, MAX_BATCH_BYTES):
                start = sum(len(b) for b in batches)
                batches.append(items[start : start + len(batch)])
        # this write's own ids: a replica naming one of them as its newest tells this
        # node's clock nothing (it issued them), so only other ids are observed
        own = {env.version_id for env in envs}
        seen = learned if learned is not None else Learned()
        # hinted handoff (node.cluster.handoff_plan): every owner gets an attempt; a down
        # owner's attempt stores its hint. Strict (default): only owners that stored the
        # write count toward W, and too few live owners fail at once. Sloppy: a durable
        # hint for a down or failed owner counts too.
        sloppy = self.handoff is not None and self.handoff.sloppy_quorum
        if not sloppy:
            self._check_reachable(placement, quorum.w, "write")  # UNAVAILABLE now, nothing sent
        asked = placement
        if self.handoff is not None:
            asked = replace(placement, live=placement.replicas)
        tracker = self._tracker(asked, quorum.w, "write")
        result = ReplicateResult(down=[n for n in placement.replicas if n not in placement.live])

        async def one(node: str) -> None:
            live = node in placement.live
            try:
                failure = await stored_on(node) if live else Unavailable(f"{node} is down")
                # a version refused as purged is not hinted: its owner would refuse it too
                purged = isinstance(failure, VersionPurged)
                hinted = failure is not None and self.handoff is not None and not purged
                if hinted:  # by this attempt, so hints are not bounded by the repair fan-out
                    await self._hint(ctx, placement, node, blobs)
                counted = counts_toward_w(stored=failure is None, hinted=hinted, sloppy=sloppy)
                if failure is not None and not counted:
                    raise failure
            except Exception:
                if live:
                    self.replication_acks["error"] += 1
                raise
            if live:
                self.replication_acks["ok"] += 1

        async def stored_on(node: str) -> Exception | None:
            """None once ``node`` stored every batch durably, else what went wrong."""
            try:
                await store(node)
            except (NodeError, StorageError) as exc:
                return exc
            return None

        async def store(node: str) -> None:
            for batch in batches:
                answer = await self.store_batcher.store(node, batch, self.fanout.timeout())
                for latest in answer.latest.values():
                    if latest not in own:
                        self.store.observe(latest)  # HLC receive event
                for upto in answer.purged.values():
                    seen.note_purged(upto)
                if any(flag is None for flag in answer.stored):
                    if answer.purged:
                        raise VersionPurged(f"{node} refused a version as purged")
                    raise Unavailable(
                        f"{node} refused a version (bad or untrusted signature, or purged)"
                    )
                for context, count in answer.heads.items():
                    result.heads[context] = max(result.heads.get(context, 0), count)

        await self._quorum(asked, tracker, one, op="write", write=write)
        result.acked = list(tracker.ok)
        result.failed = [node for node in tracker.failed if node in placement.live]
        return result

    async def _hint(
        self, ctx: ContextName, placement: Placement, node: str, blobs: list[bytes]
    ) -> None:
        """Store the hint for ``node`` (the handoff batches it); Unavailable unless durable."""
        assert self.handoff is not None
        if node not in await self.handoff.store_hints(ctx, placement.replicas, {node}, blobs):
            raise Unavailable(f"no durable hint for {node}")

    def _tracker(self, placement: Placement, needed: int, op: str) -> QuorumTracker:
        self._check_reachable(placement, needed, op)
        return QuorumTracker(placement.live, needed, groups=placement.groups)

    def _check_reachable(self, placement: Placement, needed: int, op: str) -> None:
        """Unavailable (counted) unless enough replicas are up to reach ``needed``."""
        if not placement.can_reach(needed):
            self._count_quorum_failure(op)
            raise Unavailable(
                f"{op}: {len(placement.live)} of {len(placement.replicas)} replicas are up, "
                f"{needed} needed"
            )

    async def _quorum(
        self,
        placement: Placement,
        tracker: QuorumTracker,
        one: Callable[[str], Awaitable[None]],
        *,
        op: str,
        write: _Write | None = None,
    ) -> None:
        """Run ``one`` on every live replica; Unavailable unless the quorum is reached.

        ``write``: the write tracker's entry, ended once every attempt ended.
        """
        settled = None
        if write is not None:
            write.handed = True
            settled = partial(self._end_write, write.token)
        await self.fanout.quorum(placement.live, tracker, one, op=op, settled=settled)
        if not tracker.reached:
            self._count_quorum_failure(op)
            raise Unavailable(
                f"{op}: {tracker.counted} of {tracker.needed} needed replicas answered in time"
                f" ({tracker.shortfall()})"
            )

    def _count_quorum_failure(self, op: str) -> None:
        self.quorum_failures += 1
        self.quorum_failures_by_op[op] = self.quorum_failures_by_op.get(op, 0) + 1

    async def _gather_versions(self, ctx: ContextName, r: int | None) -> list[tuple[str, bytes]]:
        """The merged version set of ``ctx`` from R replicas (paged), with read repair."""
        quorum = self._quorum_of(r=r)
        placement = self._read_placement(ctx)
        tracker = self._tracker(placement, quorum.r, "read")
        found: dict[str, VersionSet] = {}
        read: list[Merged] = []  # the merged answer, once the quorum decided

        async def one(node: str) -> None:
            envelopes: dict[str, bytes] = {}
            after: str | None = None
            while True:
                if node == self.name and self.local.small(ctx):  # on the event loop
                    answer = self.local.versions_page(ctx, after, MAX_BATCH_BYTES)
                else:
                    body = {
                        "context": ctx.canonical(),
                        "after": after,
                        "max_bytes": MAX_BATCH_BYTES,
                    }
                    answer = await self.fanout.on(
                        node, "rep.versions", body,
                        partial(self.local.versions_page, ctx, after, MAX_BATCH_BYTES),
                    )  # fmt: skip
                page = answers.parse_versions(answer, ctx.canonical())
                envelopes.update(page.envelopes)
                if not page.more or not page.envelopes:
                    break
                after = max(page.envelopes)
            found[node] = VersionSet(envelopes, page.purge)
            if read and placement.groups:  # answered after the merge, during a transition
                self._repair(ctx, lacking(read[0], node, found[node]))

        await self._quorum(placement, tracker, one, op="read")
        merged = merge_version_sets({node: found[node] for node in tracker.ok})
        read.append(merged)
        self._repair(ctx, merged)
        return list(merged.envelopes)

    def _repair(self, ctx: ContextName, merged: Merged) -> None:
        """Carry out the repair plan in the background (bounded; excess dropped, counted)."""
        plan = coordinator.repair_plan(merged, MAX_BATCH_BYTES)
        by_id = dict(merged.envelopes)
        for node, batches in plan.pushes.items():
            for vids in batches:
                body: Body = {"envelopes": [by_id[vid] for vid in vids]}
                self._start_repair(node, "rep.store", body)
        if merged.purge is not None:
            body = {"context": ctx.canonical(), "marker": merged.purge.encode()}
            for node in plan.purges:
                self._start_repair(node, "rep.purge", body)

    def _start_repair(self, node: str, method: str, body: Body) -> None:
        """One bounded background repair send; ``repair_pending`` counts it until it ends."""

        async def send() -> object:
            try:
                if node == self.name:
                    return await self.handle(_SELF, method, body)
                return await self.dialer.call(node, method, body, timeout_s=self.config.timeout_s)
            finally:
                self.repair_pending -= 1

        self.repair_pending += 1
        if not self.fanout.background(method, send):
            self.repair_pending -= 1  # dropped (counted): anti-entropy covers it

    async def _read(self, peer: Peer, addr: Address, as_role: str | None, r: int | None) -> Any:
        ctx = await self._resolve(addr)
        rows = await self._gather_versions(ctx, r)
        allowed = peer.roles if peer.kind == "client" else None

        def view() -> Any:  # one version decrypted (a data key unwrapped at most)
            return self.replica.view(
                ctx, rows, addr.temporal, as_role=as_role, allowed_roles=allowed,
                where=addr.canonical(),
            )  # fmt: skip

        if len(rows) <= INLINE_READ_VERSIONS:  # on the event loop, as a small local read
            return view()
        return await self.fanout.blocking(view)

    async def _resolve(self, addr: Address) -> ContextName:
        ctx = addr.context()
        if not ctx.has_wildcard:
            return ctx
        infos = await self._coverage_heads(addr.canonical(), False)
        matches = [ctx.matches(parse(info.context).context()) for info in infos]
        best = coordinator.choose_context(infos, matches)
        if best is None:
            raise NotFound(f"no context matches {addr.canonical()}", input=addr.canonical())
        return parse(best.context).context()

    async def _coverage_heads(self, pattern: str, deleted: bool) -> list[ContextInfo]:
        """Every matching context, from every live node (together they hold every range)."""
        body = {"pattern": pattern, "deleted": deleted}

        async def ask(node: str) -> list[ContextInfo]:
            answer = await self.fanout.on(node, "rep.heads", body, lambda: self.local.heads(body))
            return answers.parse_heads(answer)

        parts = await self.fanout.everyone(self._up_members(), "rep.heads", ask)
        return merge_listings([info for part in parts for info in part])

    def _up_members(self) -> list[str]:
        return [node for node in self.cluster.member_names() if self.cluster.is_up(node)]

    def _placement(self, ctx: ContextName) -> Placement:
        """Where writes go: the union of the layout's lists, a quorum group each."""
        up = set(self._up_members())
        if self.layout is None or not self.layout.in_transition:
            return place(self._current_ring(), ctx.key(), self.config.quorum.n, up)
        old, new = self.placement_rings()
        return place_layout(old, new, ctx.key(), self.config.quorum.n, up)

    def _read_placement(self, ctx: ContextName) -> Placement:
        """Where reads go: the old list, which counts toward R (while in transition it
        holds every acknowledged write), and in transition the new-only owners too,
        asked for read repair only (``layout.place_read``)."""
        up = set(self._up_members())
        old, new = self.placement_rings()
        if old is new:
            return place(old, ctx.key(), self.config.quorum.n, up)
        return place_read(old, new, ctx.key(), self.config.quorum.n, up)

    def placement_rings(self) -> tuple[Ring, Ring]:
        """The old and the new ring (the same ring outside a transition)."""
        new = self._current_ring()
        if self.layout is None or not self.layout.in_transition:
            return new, new
        if self.layout.old != self._old_ring_key:
            members = [RingMember(name) for name in self.layout.old]
            self._old_ring = Ring(members, vnodes=self.config.vnodes)
            self._old_ring_key = self.layout.old
        return self._old_ring, new

    def _current_ring(self) -> Ring:
        """The ring by the layout's new members, else by the cluster's members."""
        if self.layout is not None:
            names = self.layout.new
        else:
            names = tuple(sorted(self.cluster.member_names()))
        if names != self._ring_key:
            self._ring = Ring([RingMember(name) for name in names], vnodes=self.config.vnodes)
            self._ring_key = names
        return self._ring


@dataclass
class _Write:
    """A write counted by ``NodeService.writes``; ``handed``: its attempts end it."""

    token: WriteToken
    handed: bool = False


_SELF = Peer(name="self", kind="node", roles=(), fingerprint="")


def _small_single(requests: Sequence[WriteRequest]) -> bool:
    """One write whose content is small enough to prepare on the event loop."""
    return (
        len(requests) == 1 and len(requests[0].record.content) <= INLINE_PREPARE_MAX_CONTENT_BYTES
    )


def _ref(ctx: ContextName, count: int, version_id: str) -> StoredRef:
    return StoredRef(ctx.address(Temporal("version", count)).canonical(), count, version_id)
