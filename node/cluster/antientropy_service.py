"""Active anti-entropy, the trio shell: scheduled exchanges of hash trees with each replica peer.

Owns: when passes run (on start, every ``interval_s``, and as soon as a member is seen
coming up: a restart or a healed partition), and carrying out one exchange per peer:
compare partition roots, then the leaves of differing partitions, then the context
digests of differing leaves, then the version ids (and seal epochs) of differing contexts;
push what the peer lacks or holds at a lower seal epoch (``rep.store``), pull what this
node lacks or holds at a lower seal epoch (``rep.fetch``, applied through
``Replica.apply``, which verifies signatures and lets the higher re-seal replace the held
copy) and send purge markers both ways (``rep.purge``). Decisions come from
``node.cluster.antientropy``; this module only talks.

Invariants: one pass at a time; version-carrying traffic is paced by a token bucket
(``bytes_per_s``) on trio's clock; at most ``max_repairs_per_exchange`` contexts are
repaired per exchange (the rest wait for the next pass); a malformed or failed peer
answer ends that exchange only (counted in ``exchanges_failed``), never the node.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import msgpack
import trio

from node.cluster.antientropy import (
    MAX_ITEMS,
    AntiEntropyConfig,
    ContextState,
    TokenBucket,
    differing,
    differing_contexts,
    plan_exchange,
    shared_partitions,
)
from node.cluster.antientropy_replica import (
    BATCH_BUDGET,
    TreeKeeper,
    hash_int,
    replica_handlers,
)
from node.cluster.replication import batches_by_bytes, unexpired
from node.errors import PeerUnavailable, RemoteError
from storage.address import ContextName
from storage.envelope import seal_epoch_of
from storage.errors import StorageError
from storage.schema import PurgeMarker
from storage.version_store import VersionStore

if TYPE_CHECKING:
    from node.cluster.service import NodeService

__all__ = ["AntiEntropyConfig", "AntiEntropyService", "AntiEntropyStats"]
log = logging.getLogger(__name__)
Body = dict[str, Any]


@dataclass
class AntiEntropyStats:
    """Counters of this node's anti-entropy (exported through ``status_sources``)."""

    passes: int = 0
    exchanges: int = 0
    exchanges_failed: int = 0
    versions_repaired: int = 0
    markers_repaired: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    last_pass_at: float | None = None


class ExchangeFailed(Exception):
    """A peer's answer was malformed or refused (ends this exchange only)."""


class AntiEntropyService:
    """Runs anti-entropy passes for one node service."""

    def __init__(self, service: NodeService, config: AntiEntropyConfig) -> None:
        self.service = service
        self.config = config
        ring = service._current_ring()
        self.keeper = TreeKeeper(service.store.versions, ring.partitions, config.leaves)
        self.stats = AntiEntropyStats()
        self._bucket = TokenBucket(config.bytes_per_s, config.bytes_per_s, now=0.0)
        self._pass_lock = trio.Lock()
        service.extra_replica_methods.update(replica_handlers(self.keeper, service.fanout.blocking))
        service.status_sources["antientropy"] = self.status

    def status(self) -> dict[str, Any]:
        """The ``node.status`` contract fields."""
        last = self.stats.last_pass_at
        return {
            "last_pass_age_s": None if last is None else trio.current_time() - last,
            "versions_repaired": self.stats.versions_repaired,
            "passes": self.stats.passes,
            "bytes_sent": self.stats.bytes_sent,
            "bytes_received": self.stats.bytes_received,
        }

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """A pass now, then every ``interval_s`` and whenever a member comes up."""
        task_status.started()
        if not self.config.enabled:
            await trio.sleep_forever()
        cluster = self.service.cluster
        was_up: set[str] = set()
        next_at = trio.current_time()
        while True:
            up = {n for n in cluster.member_names() if cluster.is_up(n)}
            came_up = up - was_up - {self.service.name}
            was_up = up
            if came_up or trio.current_time() >= next_at:
                await self.run_pass()
                next_at = trio.current_time() + self.config.interval_s
            await trio.sleep(max(0.0, min(self.config.poll_s, next_at - trio.current_time())))

    async def run_pass(self) -> None:
        """One exchange with every live peer that shares a partition with this node."""
        async with self._pass_lock:
            for peer, parts in sorted(self._shared_partitions().items()):
                if not self.service.cluster.is_up(peer):
                    continue
                self.stats.exchanges += 1
                try:
                    await self.exchange(peer, parts)
                except (PeerUnavailable, RemoteError, StorageError, ExchangeFailed) as exc:
                    self.stats.exchanges_failed += 1
                    log.info("%s: anti-entropy with %s failed: %s", self.service.name, peer, exc)
            self.stats.passes += 1
            self.stats.last_pass_at = trio.current_time()

    def _shared_partitions(self) -> Mapping[str, tuple[int, ...]]:
        """peer -> the partitions it replicates with this node (cached per ring); during a
        membership change, in either the old or the new ring (a replica of either list
        is a replica)."""
        old, new = self.service.placement_rings()
        n, me = self.service.config.quorum.n, self.service.name
        shared = shared_partitions(new, n, me)
        if old is new:
            return shared
        merged = {peer: set(parts) for peer, parts in shared.items()}
        for peer, parts in shared_partitions(old, n, me).items():
            merged.setdefault(peer, set()).update(parts)
        return {peer: tuple(sorted(parts)) for peer, parts in merged.items()}

    async def exchange(self, peer: str, partitions: Sequence[int]) -> None:
        """Compare and repair every shared partition with ``peer`` (one exchange)."""
        try:
            contexts = await self._differing_contexts(peer, partitions)
            if contexts:
                await self._repair(peer, contexts[: self.config.max_repairs_per_exchange])
        except (KeyError, TypeError, ValueError, msgpack.ExtraData) as exc:
            raise ExchangeFailed(f"malformed answer from {peer}: {exc!r}") from None

    async def _differing_contexts(self, peer: str, partitions: Sequence[int]) -> list[bytes]:
        keeper = self.keeper
        diff_parts: list[int] = []
        for chunk in _chunks(partitions, MAX_ITEMS):
            body = {"partitions": chunk, "summary": True}
            summary = (await self._call(peer, "rep.tree", body))["summary"]
            if summary == keeper.summary(chunk):
                continue  # the whole chunk agrees (the common, idle case): one round trip
            answer = await self._call(peer, "rep.tree", {"partitions": chunk})
            roots = [hash_int(r) for r in answer["roots"]]
            if len(roots) != len(chunk):
                raise ValueError("rep.tree answered a different number of roots")
            mine = keeper.roots(chunk)
            diff_parts += differing(mine, dict(zip(chunk, roots, strict=True)))
        segments: list[list[int]] = []
        for chunk in _chunks(diff_parts, 256):
            answer = await self._call(peer, "rep.tree", {"partitions": chunk, "leaves": True})
            if len(answer["leaves"]) != len(chunk):
                raise ValueError("rep.tree answered a different number of partitions")
            for partition, leaves in zip(chunk, answer["leaves"], strict=True):
                theirs = {keeper.check_leaf(leaf): hash_int(h) for leaf, h in leaves}
                for leaf in differing(keeper.leaf_hashes(partition), theirs):
                    segments.append([partition, leaf])
        found: list[bytes] = []
        for chunk in _chunks(segments, MAX_ITEMS):
            answer = await self._call(peer, "rep.digests", {"segments": chunk})
            theirs_d = {
                ContextName.from_canonical(str(c)).key(): hash_int(h) for c, h in answer["digests"]
            }
            mine_d: dict[bytes, int] = {}
            for partition, leaf in chunk:
                mine_d.update(keeper.contexts_in(partition, leaf))
            found += differing_contexts(mine_d, theirs_d)
            if len(found) >= self.config.max_repairs_per_exchange:
                break
        return found

    async def _repair(self, peer: str, contexts: Sequence[bytes]) -> None:
        versions = self.service.store.versions
        for chunk in _chunks(contexts, 256):
            names = [ContextName.from_key(ctx) for ctx in chunk]
            answer = await self._call(peer, "rep.ids", {"contexts": [n.canonical() for n in names]})
            theirs: dict[bytes, tuple[ContextState, PurgeMarker | None]] = {}
            pushes: list[tuple[ContextName, str]] = []
            pulled: list[bytes] = []
            for canonical, ids, marker, *rest in answer["states"]:
                parsed = None if marker is None else PurgeMarker.decode(bytes(marker))
                state = ContextState(
                    frozenset(str(v) for v in ids),
                    None if parsed is None else parsed.upto,
                    _epochs(rest[0] if rest else []),
                )
                theirs[ContextName.from_canonical(str(canonical)).key()] = (state, parsed)
            for ctx in names:
                their_state, their_marker = theirs.get(ctx.key(), (ContextState(frozenset()), None))
                my_marker, my_ids, my_epochs = await self.service.fanout.blocking(
                    partial(_local_state, versions, ctx)
                )
                mine = ContextState(
                    frozenset(my_ids), None if my_marker is None else my_marker.upto, my_epochs
                )
                pulled += await self._carry_out(
                    peer, ctx, mine, their_state, my_marker, their_marker, pushes
                )
            await self._apply_pulled(pulled)
            await self._push(peer, pushes)

    async def _carry_out(
        self,
        peer: str,
        ctx: ContextName,
        mine: ContextState,
        theirs: ContextState,
        my_marker: PurgeMarker | None,
        their_marker: PurgeMarker | None,
        pushes: list[tuple[ContextName, str]],
    ) -> list[bytes]:
        """Markers now; versions to push go to ``pushes``; returns the versions fetched."""
        plan = plan_exchange(mine, theirs)
        replica = self.service.replica
        if plan.take_marker and their_marker is not None:
            await self.service.fanout.blocking(lambda: replica.apply_purge(ctx, their_marker))
            self.stats.markers_repaired += 1
        if plan.send_marker and my_marker is not None:
            body = {"context": ctx.canonical(), "marker": my_marker.encode()}
            await self._call(peer, "rep.purge", body)
            self.stats.markers_repaired += 1
        pushes.extend((ctx, vid) for vid in plan.push)
        fetched: list[bytes] = []
        wanted = list(plan.pull)
        while wanted:
            await pace(self._bucket, 64 * len(wanted))
            answer = await self._call(
                peer, "rep.fetch", {"context": ctx.canonical(), "ids": wanted}
            )
            blobs = [bytes(b) for b in answer["envelopes"]]
            more = [str(v) for v in answer["more"]]
            if not blobs or not set(more) < set(wanted):
                break  # the peer no longer holds them (purged or expired since)
            self.stats.bytes_received += sum(map(len, blobs))
            await pace(self._bucket, sum(map(len, blobs)))
            fetched += unexpired(blobs, self.service.store.clock_ms())
            wanted = more
        return fetched

    async def _apply_pulled(self, blobs: Sequence[bytes]) -> None:
        """Verify and store fetched versions, one synced batch per ``batches_by_bytes``."""
        replica = self.service.replica
        for batch in batches_by_bytes(blobs, BATCH_BUDGET):
            resealed = replica.resealed
            stored, _ = await self.service.fanout.blocking(partial(replica.apply, batch))
            self.stats.versions_repaired += sum(1 for flag in stored if flag)
            self.stats.versions_repaired += replica.resealed - resealed  # newer seals taken

    async def _push(self, peer: str, items: Sequence[tuple[ContextName, str]]) -> None:
        if not items:
            return
        versions = self.service.store.versions

        def read() -> list[bytes]:
            found = (versions.version(ctx, vid) for ctx, vid in items)
            return [data for data in found if data is not None]

        blobs = unexpired(await self.service.fanout.blocking(read), self.service.store.clock_ms())
        for batch in batches_by_bytes(blobs, BATCH_BUDGET):
            size = sum(map(len, batch))
            await pace(self._bucket, size)
            answer = await self._call(peer, "rep.store", {"envelopes": batch})
            self.stats.bytes_sent += size
            # held already (False) at a lower seal epoch: the plan pushes a copy the peer
            # holds only when this one's seal is higher, and the peer takes it
            self.stats.versions_repaired += sum(
                1
                for blob, flag in zip(batch, answer["stored"], strict=False)
                if flag is True or (flag is False and seal_epoch_of(blob) > 0)
            )

    async def _call(self, peer: str, method: str, body: Body) -> Body:
        answer = await self.service.dialer.call(
            peer, method, body, timeout_s=self.service.config.timeout_s
        )
        if not isinstance(answer, dict):
            raise ExchangeFailed(f"{method} from {peer} is not a map")
        return answer


async def pace(bucket: TokenBucket, amount: int) -> None:
    """Wait until ``bucket`` allows ``amount`` bytes, then spend them (on trio's clock);
    anti-entropy and range streaming pace their transfers with it."""
    delay = bucket.delay(amount, now=trio.current_time())
    if delay > 0:
        await trio.sleep(delay)
    bucket.spend(amount, now=trio.current_time())


def _local_state(
    versions: VersionStore, ctx: ContextName
) -> tuple[PurgeMarker | None, list[str], dict[str, int]]:
    return versions.purge_marker(ctx), versions.version_ids(ctx), versions.seal_epochs(ctx)


def _epochs(pairs: Any) -> dict[str, int]:
    """A peer's re-sealed copies, ``[[version id, seal epoch], ...]``, as a map.

    Raises:
        ValueError: not such pairs (the exchange fails as malformed).
    """
    out: dict[str, int] = {}
    for vid, epoch in pairs:
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 1:
            raise ValueError("a seal epoch must be a positive integer")
        out[str(vid)] = epoch
    return out


def _chunks(items: Sequence[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])
