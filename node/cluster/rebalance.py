"""Range streaming and cleanup during membership changes, the trio shell.

Owns: the loop that marks ``epoch_seen`` once the service routes by a new ring epoch,
walks this node's contexts for the epoch (offering each to the owners that need it:
``rep.ids`` to ask, ``rep.store`` in ``MAX_BATCH_BYTES`` batches, ``rep.purge`` for a
newer marker), marks ``stream_done`` when the walk is complete, and, once the layout is
settled and every ring member has seen it, drops the contexts this node no longer owns
after their owners confirmed holding them. Decisions come from
``node.cluster.rebalance_plan``; this module only talks.

Cleanup is not once per epoch only: versions can reach a node that no longer owns their
context after its cleanup (anti-entropy or hinted handoff from a node that restarted and
still routes by an older ring epoch, a coordinator one epoch behind). The version store
reports every context that gained versions (``VersionStore.add_observer``); once this
node cleaned up for the epoch, each later poll offers those among them it does not own
to their owners and drops them as a cleanup does (only the arrived contexts are read).

Must not know: Raft, the leader's duty that ends a transition (it reads the marks this
node proposes), how the layout is derived (``NodeService.layout``, set by the daemon
from the applied metadata).

``epoch_seen(E)`` is proposed only once the writes this node coordinates that were
routed by a layout older than E ended (``NodeService.wait_writes_drained``, bounded by
``drain_s``): the walk barrier then also means no such write is still in flight.

Invariants: one walk at a time; version traffic is paced by a token bucket
(``bytes_per_s``, the ``[antientropy] bytes_per_s`` figure unless configured apart) on
trio's clock; an owner that cannot be reached leaves the walk incomplete (retried every
``poll_s``, from the beginning: offers are idempotent), never the node; a context is
dropped only after every owner confirmed it durably (``rep.store`` acknowledged, or
``rep.ids`` showed it held).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import trio

from node.cluster import answers
from node.cluster import rebalance_plan as plan
from node.cluster.antientropy import MAX_ITEMS, ContextState, TokenBucket
from node.cluster.antientropy_service import pace
from node.cluster.layout import Layout, moving_arcs
from node.cluster.replication import batches_by_bytes, unexpired
from node.control.metadata import cmd_epoch_seen, cmd_stream_done
from node.errors import NodeError
from node.rpc.wire import MAX_BATCH_BYTES
from storage.address import ContextName
from storage.errors import StorageError
from storage.schema import PurgeMarker
from storage.version_store import SetChange

if TYPE_CHECKING:
    from node.cluster.service import NodeService
    from node.control.metadata import ClusterMetadata

__all__ = ["ControlView", "RebalanceConfig", "RebalanceService"]
log = logging.getLogger(__name__)
Body = dict[str, Any]
DRAIN_TIMEOUTS = 4  # the default bound of the epoch_seen wait, in request timeouts


class ControlView(Protocol):
    """What streaming needs of the control plane (``node.control.service.ControlService``)."""

    @property
    def metadata(self) -> ClusterMetadata | None:
        """The applied cluster metadata (None before the control plane started)."""
        ...

    async def propose(self, data: bytes) -> Any:
        """Commit a command through the log (``ApplyResult``); raises when no leader."""
        ...


@dataclass(frozen=True)
class RebalanceConfig:
    """Pacing of range streaming."""

    bytes_per_s: int = 8 * 1024 * 1024  # the daemon passes [antientropy] bytes_per_s
    poll_s: float = 1.0  # how often the applied metadata is looked at
    contexts_per_call: int = 256  # contexts per rep.ids question (<= MAX_ITEMS)
    # how long epoch_seen waits for older writes to end; None: DRAIN_TIMEOUTS request
    # timeouts (a write's attempt: a queued frame, its own frame, a hint store)
    drain_s: float | None = None

    def __post_init__(self) -> None:
        if self.bytes_per_s <= 0 or self.poll_s <= 0:
            raise ValueError("bytes_per_s and poll_s must be > 0")
        if self.drain_s is not None and self.drain_s <= 0:
            raise ValueError("drain_s must be > 0")
        if not 1 <= self.contexts_per_call <= MAX_ITEMS:
            raise ValueError(f"contexts_per_call must be in 1..{MAX_ITEMS}")


@dataclass
class RebalanceStats:
    """Progress of this node's walks (``node.status`` ``rebalance``, the metrics)."""

    epoch: int | None = None
    contexts_left: int | None = None
    bytes_left: int | None = None
    pending_ranges: int | None = None
    streamed_bytes: int = 0  # running total: version bytes sent to new owners
    contexts_dropped: int = 0  # running total: contexts removed after a change settled
    refused_versions: int = 0  # versions an owner refused (untrusted, purged): not retried
    walks: int = 0  # complete walks
    drain_timeouts: int = 0  # epoch_seen proposed with older writes still in flight


@dataclass
class _Item:
    ctx: ContextName
    state: ContextState
    owners: tuple[str, ...]  # the owners this context is offered to
    size: int = 0
    confirmed: set[str] = field(default_factory=set)


class RebalanceService:
    """Streams ranges to new owners and cleans up after a change, for one node service."""

    def __init__(
        self, service: NodeService, control: ControlView, config: RebalanceConfig | None = None
    ) -> None:
        self.service = service
        self.control = control
        self.config = config or RebalanceConfig()
        self.stats = RebalanceStats()
        self._bucket = TokenBucket(self.config.bytes_per_s, self.config.bytes_per_s, now=0.0)
        self._walked: tuple[str, ...] | None = None  # ``new`` of the last complete walk
        self._cleaned: int | None = None  # epoch of the last complete cleanup
        self._wake = trio.Event()
        # keys of contexts that gained versions since they were last looked at (written
        # from the store's writer threads: under the lock)
        self._arrived: set[bytes] = set()
        self._arrived_lock = threading.Lock()
        service.store.versions.add_observer(self._on_change)
        service.status_fields.append(lambda: {"rebalance": self.status()})

    def status(self) -> dict[str, Any]:
        """The ``node.status`` ``rebalance`` fields (null figures when unknown)."""
        layout = self.service.layout
        return {
            "epoch": None if layout is None else layout.epoch,
            "in_transition": layout is not None and layout.in_transition,
            "contexts_left": self.stats.contexts_left,
            "bytes_left": self.stats.bytes_left,
            "pending_ranges": self.stats.pending_ranges,
            "streamed_bytes": self.stats.streamed_bytes,
        }

    def wake(self) -> None:
        """Look at the metadata now (the control plane applied an entry)."""
        self._wake.set()

    def _on_change(self, change: SetChange) -> None:
        """The version store's observer (any thread): remember contexts that gained versions."""
        if change.added:
            with self._arrived_lock:
                self._arrived.add(change.ctx)

    def _take_arrived(self) -> set[bytes]:
        with self._arrived_lock:
            arrived, self._arrived = self._arrived, set()
        return arrived

    def _put_back(self, keys: Collection[bytes]) -> None:
        with self._arrived_lock:
            self._arrived.update(keys)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Step every ``poll_s`` and whenever woken."""
        task_status.started()
        while True:
            try:
                await self.step()
            except (NodeError, StorageError) as exc:  # no leader, a peer gone: next time
                log.info("%s: rebalance step failed: %s", self.service.name, exc)
            with trio.move_on_after(self.config.poll_s):
                await self._wake.wait()
            self._wake = trio.Event()

    async def step(self) -> None:
        """One look at the applied metadata: mark, walk, report or clean up."""
        meta, layout = self.control.metadata, self.service.layout
        if meta is None or layout is None or layout.epoch != meta.ring.epoch:
            return  # the service does not route by the applied epoch yet
        me = self.service.store.keyring.node_id
        seen = _by_name(meta, meta.seen)
        member = meta.members.get(me)
        if member is not None and member.state == "removed":  # decommissioned: hand off all
            if not layout.in_transition and plan.barrier_met(layout.new, seen, layout.epoch):
                await self._clean(layout.epoch)
            return
        if meta.seen.get(me, 0) < layout.epoch:
            await self._mark_seen(me, layout.epoch)
            return
        kind = plan.walk_kind(layout, meta.streamed.get(me, 0), self._walked)
        if kind is not None:
            self.stats.epoch = layout.epoch
            up = self._up()
            if not plan.barrier_met(plan.live_names(layout.members, up), seen, layout.epoch):
                return
            if kind == plan.REPORT or await self.walk(layout, kind):
                self._walked = layout.new
                await self.control.propose(cmd_stream_done(me, layout.epoch))
            return
        if plan.cleanup_ready(layout, seen, meta.streamed.get(me, 0)):
            await self._clean(layout.epoch)

    async def _mark_seen(self, me: str, epoch: int) -> None:
        """Propose ``epoch_seen(epoch)`` once no write this node coordinates that was routed
        by an older layout is in flight (Garage's ack tracker): when every live member
        has seen the epoch, no such write is in flight anywhere, so the walks that start
        then see every acknowledged write. Bounded by ``drain_s``: past it a stuck write
        has failed (its request's deadline), and the mark is proposed anyway."""
        bound = self.config.drain_s
        if bound is None:
            bound = DRAIN_TIMEOUTS * self.service.config.timeout_s
        if not await self.service.wait_writes_drained(epoch, bound):
            self.stats.drain_timeouts += 1
            log.warning(
                "%s: %d writes routed by a layout older than epoch %d still in flight "
                "after %.3g s; marking epoch_seen anyway",
                self.service.name, self.service.writes.in_flight(epoch), epoch, bound,
            )  # fmt: skip
        layout = self.service.layout
        if layout is None or layout.epoch != epoch:
            return  # the layout moved on while we waited: the next step marks that one
        await self.control.propose(cmd_epoch_seen(me, epoch))

    async def _clean(self, epoch: int) -> None:
        """The whole cleanup for ``epoch`` until one completes; after it, the contexts
        that gained versions since (the module docstring)."""
        if self._cleaned != epoch:
            self._take_arrived()  # the whole walk reads them (it starts after this)
            if await self.cleanup():
                self._cleaned = epoch
            return
        arrived = self._take_arrived()
        if arrived and not await self.cleanup(arrived):
            self._put_back(arrived)  # an owner did not confirm: next poll

    # -- walking ----------------------------------------------------------------------------

    async def walk(self, layout: Layout, kind: str) -> bool:
        """Offer every held context to the owners ``kind`` names; True once all confirmed."""
        old, new = self.service.placement_rings()
        n, me = self.service.config.quorum.n, self.service.name
        arcs = moving_arcs(old, new, n) if layout.in_transition else []
        self.stats.pending_ranges = plan.pending_ranges(arcs, None)
        items: list[tuple[int, _Item]] = []
        for key, ids, upto in await self._held():
            ctx = ContextName.from_key(key)
            owners = plan.targets(
                kind, old.preference_list(key, n), new.preference_list(key, n), me
            )
            if owners:
                state = ContextState(frozenset(ids), upto)
                items.append((new.key_position(key), _Item(ctx, state, owners)))
        items.sort(key=lambda pair: pair[0])
        await self._sizes([item for _, item in items])
        self.stats.contexts_left = len(items)
        self.stats.bytes_left = sum(item.size for _, item in items)
        complete = True
        for start in range(0, len(items), self.config.contexts_per_call):
            chunk = items[start : start + self.config.contexts_per_call]
            complete = await self._offer([item for _, item in chunk]) and complete
            self.stats.contexts_left -= len(chunk)
            self.stats.bytes_left -= sum(item.size for _, item in chunk)
            self.stats.pending_ranges = plan.pending_ranges(arcs, chunk[-1][0])
        if complete:
            self.stats.walks += 1
            self.stats.pending_ranges = 0
        return complete

    async def cleanup(self, only: Collection[bytes] | None = None) -> bool:
        """Drop held contexts this node does not own once every owner confirmed them
        (all of them; with ``only``, those among these context keys)."""
        _, ring = self.service.placement_rings()
        n, me = self.service.config.quorum.n, self.service.name
        if only is None:
            held = await self._held()
        else:
            foreign = [key for key in only if plan.drops(ring.preference_list(key, n), me)]
            held = await self._held_of(foreign) if foreign else []
        items = []
        for key, ids, upto in held:
            preference = ring.preference_list(key, n)
            if ids and plan.drops(preference, me):
                items.append(
                    _Item(ContextName.from_key(key), ContextState(frozenset(ids), upto),
                          tuple(preference))
                )  # fmt: skip
        complete = True
        for start in range(0, len(items), self.config.contexts_per_call):
            chunk = items[start : start + self.config.contexts_per_call]
            complete = await self._offer(chunk) and complete
            await self._drop([item for item in chunk if set(item.owners) <= item.confirmed])
        return complete

    async def _offer(self, chunk: Sequence[_Item]) -> bool:
        """Offer each item to its owners; True when every owner confirmed every item."""
        complete = True
        for owner in sorted({o for item in chunk for o in item.owners}):
            mine = [item for item in chunk if owner in item.owners]
            try:
                await self._offer_to(owner, mine)
            except (NodeError, StorageError, KeyError, TypeError, ValueError) as exc:
                log.info("%s: streaming to %s failed: %s", self.service.name, owner, exc)
                complete = False
        return complete and all(set(item.owners) <= item.confirmed for item in chunk)

    async def _offer_to(self, owner: str, items: Sequence[_Item]) -> None:
        body = {"contexts": [item.ctx.canonical() for item in items]}
        answer = await self._call(owner, "rep.ids", body)
        theirs: dict[str, ContextState] = {}
        for canonical, ids, marker, *_epochs in answer["states"]:  # epochs: re-seals only
            upto = None if marker is None else PurgeMarker.decode(bytes(marker)).upto
            theirs[str(canonical)] = ContextState(frozenset(str(v) for v in ids), upto)
        pushes: list[tuple[_Item, tuple[str, ...]]] = []
        for item in items:
            todo = plan.offer(
                item.state, theirs.get(item.ctx.canonical(), ContextState(frozenset()))
            )
            if todo.send_marker:
                await self._send_marker(owner, item.ctx)
            if todo.push:
                pushes.append((item, todo.push))
            else:
                item.confirmed.add(owner)
        if pushes:
            await self._push(owner, pushes)
            for item, _ in pushes:
                item.confirmed.add(owner)

    async def _send_marker(self, owner: str, ctx: ContextName) -> None:
        versions = self.service.store.versions
        marker = await self.service.fanout.blocking(lambda: versions.purge_marker(ctx))
        if marker is not None:
            await self._call(
                owner, "rep.purge", {"context": ctx.canonical(), "marker": marker.encode()}
            )

    async def _push(self, owner: str, pushes: Sequence[tuple[_Item, Sequence[str]]]) -> None:
        """Send ``owner`` the versions it lacks of every item at once: one ``rep.store`` per
        ``MAX_BATCH_BYTES`` of versions, whatever their contexts (not a call a context)."""
        versions = self.service.store.versions

        def read() -> list[bytes]:
            found = (versions.version(item.ctx, vid) for item, vids in pushes for vid in vids)
            return [data for data in found if data is not None]

        blobs = unexpired(await self.service.fanout.blocking(read), self.service.store.clock_ms())
        for batch in batches_by_bytes(blobs, MAX_BATCH_BYTES):
            size = sum(map(len, batch))
            await pace(self._bucket, size)
            stored = answers.parse_store(
                await self._call(owner, "rep.store", {"envelopes": batch}), len(batch)
            ).stored
            self.stats.streamed_bytes += size
            self.stats.refused_versions += sum(1 for flag in stored if flag is None)

    async def _drop(self, items: Sequence[_Item]) -> None:
        store = self.service.store

        def drop() -> None:
            for item in items:
                store.versions.remove_versions(item.ctx, sorted(item.state.version_ids))
                store.cache.invalidate_context(item.ctx.key())
                store.index.refresh_context(item.ctx, store.versions.head(item.ctx))

        if items:
            await self.service.fanout.blocking(drop)
            self.stats.contexts_dropped += len(items)

    # -- helpers ----------------------------------------------------------------------------

    async def _held(self) -> list[tuple[bytes, list[str], str | None]]:
        versions = self.service.store.versions
        return await self.service.fanout.blocking(lambda: list(versions.version_sets()))

    async def _held_of(self, keys: Sequence[bytes]) -> list[tuple[bytes, list[str], str | None]]:
        """What ``_held`` gives, for these context keys only."""
        versions = self.service.store.versions

        def read() -> list[tuple[bytes, list[str], str | None]]:
            found = []
            for key in sorted(keys):
                ctx = ContextName.from_key(key)
                marker = versions.purge_marker(ctx)
                found.append(
                    (key, versions.version_ids(ctx), None if marker is None else marker.upto)
                )
            return found

        return await self.service.fanout.blocking(read)

    async def _sizes(self, items: Sequence[_Item]) -> None:
        versions = self.service.store.versions

        def measure() -> None:
            for item in items:
                item.size = sum(len(row.data) for row in versions.versions(item.ctx))

        await self.service.fanout.blocking(measure)

    def _up(self) -> set[str]:
        cluster = self.service.cluster
        return {name for name in cluster.member_names() if cluster.is_up(name)}

    async def _call(self, peer: str, method: str, body: Body) -> Body:
        answer = await self.service.dialer.call(
            peer, method, body, timeout_s=self.service.config.timeout_s
        )
        if not isinstance(answer, dict):
            raise ValueError(f"{method} from {peer} is not a map")
        return answer


def _by_name(meta: ClusterMetadata, marks: Any) -> dict[str, int]:
    """A node_id -> epoch map keyed by the members' names (removed members left out)."""
    names = meta.names()
    return {names[node_id]: epoch for node_id, epoch in marks.items() if node_id in names}
