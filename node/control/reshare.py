"""Re-sharing the admin key when the membership changes (a trio shell).

Owns the two phases of a re-share, carried out by the leader that holds the admin
identity (``AdminCustody``) while ``node.control.reshare_plan`` says one is due:

1. **Deliver.** Split the held identity afresh (``crypto.shamir.split_identity``) for the
   plan's targets, and give each live target its share, age-encrypted to that member's
   ``age_recipient`` from the metadata, through ``admin.reshare {term, epoch, share}``
   (its own share it writes itself). A member accepts only from the leader it knows, for
   its own current term, an epoch above the committed one (``reshare_refusal``); it
   writes the share durably as ``keys/admin.share.<epoch>.age`` (synced, atomic) before
   it answers.
2. **Commit.** Once every live target acknowledged, propose ``cmd_custody`` with the new
   epoch and holders. Until that entry commits, the old epoch is the one ``admin.share``
   answers with and the one that combines: a crash anywhere leaves a combinable set.

Every member (leader or not) deletes, once a custody epoch ``e`` is applied, its share
files of epochs below ``e`` (and of ``e`` if it is not a holder): ``stale_epochs``. An
unlink is all a disk allows; no share is ever logged.

The loop is woken by each applied entry and each leadership change, and otherwise
re-checks every ``interval_s``; a failed re-share is retried with backoff
(``custody_plan.retry_delay_s``). A new leader re-plans from the metadata alone.

Must not know: Raft's rules, the Shamir arithmetic, how leadership is decided, the
transports (``NodeService.dialer``).

Invariants:
- A re-share runs only under the leader term the identity is held for, after this leader
  applied everything it committed (so no older leader's custody entry can still land),
  and stops at the first sign that the term is over.
- A share leaves this node only sealed to its holder's node recipient.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import Any, Protocol

import trio

from crypto.errors import CryptoError
from crypto.keyfiles import replace_secret_file
from crypto.shamir import decrypt_share, encrypt_share_to, split_identity
from node.cluster.service import NodeService
from node.control import metadata
from node.control.custody import AdminCustody
from node.control.custody_plan import retry_delay_s
from node.control.metadata import ApplyResult, ClusterMetadata
from node.control.raft_types import ConfState, Entry
from node.control.reshare_plan import (
    ReshareStep,
    holders_of,
    plan_reshare,
    reshare_refusal,
    stale_epochs,
)
from node.errors import NodeError
from node.rpc.transport import Peer
from storage.admin_key import share_epochs, share_file
from storage.errors import Forbidden, InvalidPayload, StorageError, Unavailable

__all__ = ["AdminReshare", "ReshareControl"]
log = logging.getLogger(__name__)
Body = dict[str, Any]


class ReshareControl(Protocol):
    """What re-sharing needs of the control plane (``ControlService``)."""

    @property
    def term(self) -> int:
        """This node's current Raft term."""
        ...

    @property
    def metadata(self) -> ClusterMetadata | None:
        """The applied cluster metadata (None: none yet)."""
        ...

    on_change: list[Callable[[], None]]
    on_apply: list[Callable[[Entry], None]]

    def leader_name(self) -> str | None:
        """The name of the leader this node knows."""
        ...

    def leader_term(self) -> int | None:
        """The term while this node leads with a lease that holds now; else None."""
        ...

    def conf(self) -> ConfState:
        """The Raft configuration."""
        ...

    def commit_index(self) -> int:
        """This node's commit index."""
        ...

    async def propose(self, data: bytes) -> ApplyResult:
        """Commit ``data`` through the log (Unavailable when it cannot)."""
        ...


class AdminReshare:
    """The re-share loop of one node, and its ``admin.reshare`` method."""

    def __init__(
        self,
        control: ReshareControl,
        custody: AdminCustody,
        service: NodeService,
        *,
        interval_s: float = 1.0,
        is_live: Callable[[str], bool] | None = None,
    ) -> None:
        self.control = control
        self.custody = custody
        self.service = service
        self.interval_s = interval_s
        self.is_live = is_live or service.cluster.is_up
        self.keyring = service.store.keyring
        self.reshares = 0  # epochs this node committed as the leader (metrics, tests)
        self.last: str | None = None  # what the last attempt did (status)
        self._failures = 0
        self._retry_at = 0.0  # trio time before which a failed re-share is not retried
        self._cleaned: tuple[int, bool] | None = None  # (epoch, holder) last cleaned for
        self._wake = trio.Event()
        service.extra_replica_methods["admin.reshare"] = self._admin_reshare
        service.status_fields.append(self.status)

    def status(self) -> Body:
        """``node.status``'s ``admin_custody``: {epoch, threshold, holders: int, holder:
        bool (this node holds a share of it), last_reshare: str | None} (null: the admin
        identity is not split in the applied metadata)."""
        state = self.control.metadata
        custody = None if state is None else state.custody
        if custody is None:
            return {"admin_custody": None}
        return {
            "admin_custody": {
                "epoch": custody.epoch,
                "threshold": custody.threshold,
                "holders": len(custody.holders),
                "holder": self.keyring.node_id in custody.holders,
                "last_reshare": self.last,
            }
        }

    def wake(self) -> None:
        """Check soon (an applied entry, a leadership change)."""
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Clean stale share files, and re-share while leading, until cancelled."""
        self.control.on_change.append(self.wake)
        self.control.on_apply.append(self._applied)
        try:
            task_status.started()
            while True:
                delay = await self.step()
                with trio.move_on_after(delay):
                    await self._wake.wait()
                self._wake = trio.Event()
        finally:
            self.control.on_change.remove(self.wake)
            self.control.on_apply.remove(self._applied)

    def _applied(self, _entry: Entry) -> None:
        self._wake.set()

    async def step(self) -> float:
        """One pass: clean, then re-share if due (not before the backoff of a failed one
        ends, however often an applied entry wakes the loop); how long until the next."""
        await self._clean()
        now = trio.current_time()
        if now < self._retry_at:
            return self._retry_at - now
        try:
            done = await self.reshare_once()
        except (StorageError, NodeError, CryptoError) as exc:
            self.last = f"re-share failed: {exc}"
            log.info("admin re-share not done: %s", exc)
            done = False
        self._failures = 0 if done is not False else self._failures + 1
        delay = retry_delay_s(self.interval_s, self._failures) or self.interval_s
        self._retry_at = trio.current_time() + delay if self._failures else 0.0
        return delay

    # -- the leader ---------------------------------------------------------------------

    def _plan(self) -> tuple[int, ReshareStep] | None:
        term = self.control.leader_term()
        state = self.control.metadata
        if term is None or state is None or self.custody.held_term() != term:
            return None
        if state.applied_index < self.control.commit_index():
            return None  # an older leader's custody entry may still be on its way
        live = {
            node_id for node_id, member in state.members.items()
            if member.name == self.service.name or self.is_live(member.name)
        }  # fmt: skip
        step = plan_reshare(state, self.control.conf().voters, live)
        return None if step is None else (term, step)

    async def reshare_once(self) -> bool | None:
        """Re-share if due now: True once committed, False if it failed (retried later),
        None if none is due (or this node cannot: not the leader, no identity held)."""
        planned = self._plan()
        if planned is None:
            return None
        term, step = planned
        identity = self.custody.held_identity(term)
        if identity is None:
            return None
        log.info("admin re-share to epoch %d: %s", step.epoch, step.why)
        secret = str(identity.identity())  # CryptoError if wiped meanwhile
        split = await self.service.fanout.blocking(
            partial(split_identity, secret, step.threshold, step.shares)
        )
        sealed = {
            node_id: encrypt_share_to(split.shares[number - 1], step.recipients[node_id])
            for node_id, number in step.numbers.items() if node_id in step.deliver
        }  # fmt: skip
        del split, secret  # only the sealed shares leave this function
        acked = await self._deliver(term, step, sealed)
        custody = holders_of(step, acked)
        if custody is None:
            self.last = f"epoch {step.epoch}: {len(acked)} of {len(step.deliver)} acknowledged"
            return False
        if self.control.leader_term() != term:
            self.last = f"epoch {step.epoch}: leadership lost before the commit"
            return False
        result = await self.control.propose(metadata.cmd_custody(custody))
        if not result.ok:
            self.last = f"epoch {step.epoch}: not committed: {result.error}"
            return False
        self.reshares += 1
        self.last = f"epoch {step.epoch} committed: {len(custody.holders)} holders ({step.why})"
        log.info("admin key re-shared: epoch %d, %d of %d", step.epoch, step.threshold,
                 step.shares)  # fmt: skip
        return True

    async def _deliver(self, term: int, step: ReshareStep, sealed: dict[str, bytes]) -> set[str]:
        """Phase 1: every target's share, durably held; the node ids that acknowledged."""
        state = self.control.metadata
        assert state is not None
        acked: set[str] = set()
        me = self.keyring.node_id

        async def give(node_id: str) -> None:
            if self.control.leader_term() != term:
                return
            if node_id == me:
                try:
                    await self.service.fanout.blocking(partial(self._write, step.epoch, sealed[me]))
                except OSError as exc:
                    log.warning("own admin share of epoch %d not written: %s", step.epoch,
                                exc.strerror)  # fmt: skip
                    return
                acked.add(me)
                return
            name = state.members[node_id].name
            body = {"term": term, "epoch": step.epoch, "share": sealed[node_id]}
            try:
                await self.service.dialer.call(
                    name, "admin.reshare", body, timeout_s=self.service.config.timeout_s
                )
            except (NodeError, StorageError) as exc:
                self.service.fanout.failed("admin.reshare", name, exc)
                return
            acked.add(node_id)

        async with trio.open_nursery() as nursery:
            for node_id in step.deliver:
                nursery.start_soon(give, node_id)
        return acked

    # -- every member -------------------------------------------------------------------

    def _write(self, epoch: int, sealed: bytes) -> None:
        """Keep ``sealed`` (a share sealed to this node) as the share file of ``epoch``."""
        replace_secret_file(self.keyring.keys_dir / share_file(epoch), sealed)

    async def _admin_reshare(self, peer: Peer, args: Body) -> Body:
        """``admin.reshare {term, epoch, share}`` -> {epoch} once the share is durable."""
        state = self.control.metadata
        custody = None if state is None else state.custody
        why = reshare_refusal(
            peer.name, self.control.leader_name(), args["term"], self.control.term,
            args["epoch"], None if custody is None else custody.epoch,
        )  # fmt: skip
        if why is not None:
            raise Forbidden(f"admin.reshare refused: {why}", field="term")
        share: bytes = args["share"]
        try:
            await self.service.fanout.blocking(
                lambda: decrypt_share(share, self.keyring.node_identity())
            )
        except CryptoError:
            raise InvalidPayload(
                "share: does not open with this node's identity as an admin share", field="share"
            ) from None
        try:
            await self.service.fanout.blocking(partial(self._write, args["epoch"], share))
        except OSError as exc:
            raise Unavailable(
                f"{self.service.name} could not write its admin share: {exc.strerror}; retry"
            ) from None
        return {"epoch": args["epoch"]}

    async def _clean(self) -> None:
        """Delete this node's share files the committed custody made stale."""
        state = self.control.metadata
        custody = None if state is None else state.custody
        if custody is None:
            return
        mark = (custody.epoch, self.keyring.node_id in custody.holders)
        if mark == self._cleaned:
            return
        me = self.keyring.node_id

        def clean() -> list[int]:
            files = share_epochs(self.keyring.keys_dir)
            stale = stale_epochs(files, custody, me)
            for epoch in stale:
                files[epoch].unlink(missing_ok=True)
            return stale

        try:
            removed = await self.service.fanout.blocking(clean)
        except OSError as exc:
            log.warning("old admin share files not deleted: %s", exc.strerror)
            return
        self._cleaned = mark
        if removed:
            log.info("deleted admin share files of epochs %s (epoch %d committed)", removed,
                     custody.epoch)  # fmt: skip
