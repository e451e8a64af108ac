"""Hinted handoff (Dynamo §4.6): store versions for a missed owner, deliver them later.

A trio shell over the pure core ``node.cluster.handoff_plan`` and the durable
``storage.hints.HintStore``. It owns:

- ``store_hints``: called by the node service's write path for each owner that is down or
  whose ``rep.store`` failed. The planned holder (the next healthy node beyond the
  preference list, else this node) stores the hint with a synced write: locally, or
  through ``rep.hint`` on the holder (this node keeps it when the holder cannot).
- ``accept``: the replica side of ``rep.hint`` (nodes only): verify and store a hint.
- ``run``: the delivery loop. Every ``interval_s``, and at once when liveness reports an
  owner up again (``wake``), each up target gets its hints oldest first with ``rep.store``,
  in batches of ``batches_by_bytes``. A hint is deleted only after the owner answered
  for every version in it (its store is synced before it answers). A version that this
  node's purge marker covers is dropped at once; one the owner refuses (None: a bad or a
  not-yet-trusted signature) is retried ``MAX_REFUSALS`` times, then dropped and counted;
  a failed call or a refusal backs the target off (``backoff_s``).

Order of effects in delivery: send -> owner's durable ack -> delete the hint (synced).
A crash between ack and delete re-sends versions the owner already holds: harmless, the
store is a union and a re-sent version is a no-op.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import trio

from node.cluster.handoff_plan import (
    MAX_REFUSALS,
    Delivery,
    HandoffConfig,
    backoff_s,
    delivery_outcome,
    plan_fallbacks,
)
from node.cluster.replication import batches_by_bytes
from node.errors import PeerUnavailable, RemoteError
from node.rpc.wire import MAX_BATCH_BYTES
from storage.address import ContextName
from storage.envelope import Envelope
from storage.errors import CorruptRecord, InvalidPayload, StorageError, Unavailable
from storage.hints import Hint, HintStore
from storage.versions import VersionId

if TYPE_CHECKING:
    from node.cluster.service import NodeService

log = logging.getLogger(__name__)
Body = dict[str, Any]
BATCH_BYTES = MAX_BATCH_BYTES
HINTS_PER_ROUND = 256


class HandoffService:
    """Hints of one node: stored for missed owners, delivered when they are back."""

    def __init__(
        self,
        service: NodeService,
        hints: HintStore,
        config: HandoffConfig,
        *,
        batch_bytes: int = BATCH_BYTES,
    ) -> None:
        """Attach to ``service`` (its write path, ``rep.hint`` and ``status_sources``)."""
        self.service = service
        self.hints = hints
        self.config = config
        self.batch_bytes = batch_bytes
        self._wake = trio.Event()
        self._failures: dict[str, int] = {}
        self._not_before: dict[str, float] = {}
        self._refusals: dict[int, int] = {}  # hint seq -> answers that refused part of it
        self._blocking = service.fanout.blocking  # storage work, off the event loop
        service.handoff = self
        service.status_sources["handoff"] = self.status

    @property
    def sloppy_quorum(self) -> bool:
        """Whether a durable hint counts toward W."""
        return self.config.sloppy_quorum

    def status(self) -> dict[str, Any]:
        """The ``status_sources["handoff"]`` contract."""
        stats = self.hints.stats()
        return {
            "hints": stats.hints,
            "hint_bytes": stats.hint_bytes,
            "hints_dropped": stats.hints_dropped,
            "hints_delivered": stats.hints_delivered,
        }

    def wake(self, owner: str | None = None) -> None:
        """Deliver now (liveness saw ``owner`` come back: its backoff is forgotten)."""
        if owner is not None:
            self._failures.pop(owner, None)
            self._not_before.pop(owner, None)
        self._wake.set()

    # -- storing ------------------------------------------------------------------------

    async def store_hints(
        self,
        ctx: ContextName,
        owners: Sequence[str],
        missed: Collection[str],
        blobs: Sequence[bytes],
    ) -> set[str]:
        """Store a hint for each missed owner on its planned holder.

        Returns:
            The missed owners whose hint is durably stored (a sloppy quorum counts them).
        """
        cluster = self.service.cluster
        up = {name for name in cluster.member_names() if cluster.is_up(name)}
        ring = self.service._current_ring()
        plan = plan_fallbacks(ring, ctx.key(), owners, set(missed), up, self.service.name)
        durable: set[str] = set()
        for owner, holder in plan.holders.items():
            if await self._hold(holder, owner, ctx.canonical(), blobs):
                durable.add(owner)
        return durable

    async def _hold(self, holder: str, target: str, context: str, blobs: Sequence[bytes]) -> bool:
        ok = True
        for batch in batches_by_bytes(blobs, self.batch_bytes):
            if holder != self.service.name:
                body = {"target": target, "context": context, "envelopes": batch}
                try:
                    answer = await self.service.dialer.call(
                        holder, "rep.hint", body, timeout_s=self.service.config.timeout_s
                    )
                    if answer.get("stored") is True:
                        continue
                except (PeerUnavailable, RemoteError) as exc:
                    log.debug("rep.hint on %s failed, holding it here: %s", holder, exc)
            stored = await self._blocking(partial(self.hints.add, target, context, batch))
            ok = ok and stored is not None
        return ok

    async def accept(self, body: Body) -> Body:
        """``rep.hint {target, context, envelopes}`` (parsed by ``node.cluster.requests``):
        verify every version, then store the hint durably.

        Raises:
            InvalidPayload: a version that fails verification or belongs to another context.
        """
        target: str = body["target"]
        context = body["context"].canonical()
        blobs: list[bytes] = body["envelopes"]
        for blob in blobs:
            try:
                env = self.service.replica.verify(blob)
            except CorruptRecord as exc:
                raise InvalidPayload(f"rep.hint: {exc.message}", field="envelopes") from None
            if env.context != context:
                raise InvalidPayload("rep.hint: a version of another context", field="envelopes")
        hint = await self._blocking(lambda: self.hints.add(target, context, blobs))
        return {"stored": hint is not None}

    # -- delivering -----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Deliver forever: every ``interval_s`` and whenever woken."""
        task_status.started()
        while True:
            await self.deliver_once()
            with trio.move_on_after(self.config.interval_s):
                await self._wake.wait()
            self._wake = trio.Event()

    async def deliver_once(self) -> int:
        """One pass over every target that is up and not backed off; hints delivered."""
        cluster = self.service.cluster
        done = 0
        for target in await self._blocking(self.hints.targets):
            if target != self.service.name and not cluster.is_up(target):
                continue
            if trio.current_time() < self._not_before.get(target, 0.0):
                continue
            try:
                done += await self._deliver_to(target)
            except (PeerUnavailable, RemoteError, StorageError) as exc:
                failures = self._failures.get(target, 0) + 1
                self._failures[target] = failures
                delay = backoff_s(self.config.interval_s, failures)
                self._not_before[target] = trio.current_time() + delay
                log.debug("handoff to %s failed (%d in a row): %s", target, failures, exc)
            else:
                self._failures.pop(target, None)
                self._not_before.pop(target, None)
        return done

    async def _deliver_to(self, target: str) -> int:
        """Deliver ``target``'s hints, a round of ``HINTS_PER_ROUND`` at a time, while
        every hint of a round is delivered: a hint kept (a redirect waiting for an owner
        that is down, a refused one) ends the pass, else the next round would read the
        same hints again and spin without ever yielding to the clock."""
        delivered = 0
        while True:
            hints = await self._blocking(lambda: self.hints.pending(target, limit=HINTS_PER_ROUND))
            if not hints:
                return delivered
            done = 0
            for group in _groups(hints, self.batch_bytes):
                done += await self._deliver_group(target, group)
            delivered += done
            if done < len(hints):
                return delivered  # the rest waits for the next pass

    async def _deliver_group(self, target: str, group: list[Hint]) -> int:
        """Send a group of hints; delete each once the owner answered for all of it.

        A hint whose target no longer owns its context (the membership changed since it
        was stored, and the target may already have dropped the range) goes to the
        context's current owners instead (``_redirect``): never to a non-owner."""
        owned: list[Hint] = []
        redirected = 0
        for hint in group:
            owners = self._owners(hint)
            if owners is None or target in owners:
                owned.append(hint)
            else:
                redirected += await self._redirect(hint, owners)
        if not owned:
            return redirected
        group = owned
        sends: list[tuple[Hint, list[bytes], int]] = []  # hint, blobs to send, covered
        for hint in group:
            keep = await self._blocking(partial(self._not_purged, hint))
            sends.append((hint, keep, len(hint.envelopes) - len(keep)))
        blobs = [blob for _, keep, _ in sends for blob in keep]
        flags: list[bool | None] = []
        for batch in batches_by_bytes(blobs, self.batch_bytes):
            answer = await self.service.store_on(target, batch)
            stored = answer.get("stored")
            if not isinstance(stored, list) or len(stored) != len(batch):
                raise Unavailable(f"{target} answered rep.store without a flag per version")
            flags.extend(None if flag is None else bool(flag) for flag in stored)
        done: list[Hint] = []
        refused: list[Hint] = []
        retry = 0
        at = 0
        for hint, keep, covered in sends:
            mine = flags[at : at + len(keep)]
            at += len(keep)
            before = MAX_REFUSALS if covered else self._refusals.get(hint.seq, 0)
            outcome = delivery_outcome(mine + [None] * covered, before)
            if outcome is Delivery.RETRY:
                self._refusals[hint.seq] = before + 1
                retry += 1
                continue
            self._refusals.pop(hint.seq, None)
            (done if outcome is Delivery.DELIVERED else refused).append(hint)
        if done:
            await self._blocking(lambda: self.hints.delete(done, delivered=True))
        if refused:
            await self._blocking(lambda: self.hints.delete(refused, delivered=False))
        if retry:
            raise Unavailable(f"{target} refused versions of {retry} hints (retried later)")
        return len(done) + redirected

    def _owners(self, hint: Hint) -> tuple[str, ...] | None:
        """The current write owners of the hint's context (None: undecodable)."""
        try:
            ctx = ContextName.from_canonical(hint.context)
        except StorageError:
            return None
        return self.service._placement(ctx).replicas

    async def _redirect(self, hint: Hint, owners: Sequence[str]) -> int:
        """Give a hint whose target no longer owns the context to every current owner that
        is up; delete it once all of them stored it (rep.store is idempotent). 1 if done."""
        keep = await self._blocking(partial(self._not_purged, hint))
        cluster = self.service.cluster
        live = [o for o in owners if o == self.service.name or cluster.is_up(o)]
        if keep and len(live) < len(owners):
            return 0  # an owner is down: keep the hint until every owner can take it
        for owner in live:
            for batch in batches_by_bytes(keep, self.batch_bytes):
                answer = await self.service.store_on(owner, batch)
                stored = answer.get("stored")
                if not isinstance(stored, list) or len(stored) != len(batch):
                    raise Unavailable(f"{owner} answered rep.store without a flag per version")
        await self._blocking(lambda: self.hints.delete([hint], delivered=True))
        return 1

    def _not_purged(self, hint: Hint) -> list[bytes]:
        """The hint's versions that no purge marker held here covers (nor undecodable)."""
        try:
            ctx = ContextName.from_canonical(hint.context)
        except StorageError:
            return []  # a damaged hint: dropped, never retried
        marker = self.service.store.versions.purge_marker(ctx)
        upto = None if marker is None else VersionId.parse(marker.upto)
        keep = []
        for blob in hint.envelopes:
            try:
                vid = VersionId.parse(Envelope.decode(blob).version_id)
            except (CorruptRecord, ValueError):
                continue
            if upto is None or vid > upto:
                keep.append(blob)
        return keep


def _groups(hints: Sequence[Hint], budget_bytes: int) -> list[list[Hint]]:
    """Hints, in order, in groups whose envelopes total at most ``budget_bytes`` (a larger
    hint alone)."""
    groups: list[list[Hint]] = []
    size = 0
    for hint in hints:
        weight = sum(len(blob) for blob in hint.envelopes)
        if groups and size + weight <= budget_bytes:
            groups[-1].append(hint)
            size += weight
        else:
            groups.append([hint])
            size = weight
    return groups
