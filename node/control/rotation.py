"""Cluster-wide key rotation through the leader (issue 9), the trio shell.

Owns: the ``rotation:<role>`` leader duties (``RotationDriver`` carries out the phases of
``node.control.rotation_plan``), the member side of ``keys.install``, ``keys.reseal`` and
``keys.retire`` (``MemberKeys``, each fenced by the leader's term, node/control/fence.py),
the client method ``keys.rotate {role}`` (a client with the admin role; a follower hands it
to the leader as ``keys.rotate_leader``), and ``rotation`` in ``node.status``.

How a rotation goes (docs/keys.md, "Cluster-wide rotation"):

1. ``keys.rotate`` on the leader creates duty ``rotation:<role>`` (interval 10^9 s: it
   never comes due again by itself) and starts it under its term.
2. The driver generates the new identity once, seals one copy to each member's node
   recipient (``Member.age_recipient``) and commits them in the duty cursor *before*
   sending anything; a new leader resends these very copies.
3. ``keys.install`` to every member (retried until each acknowledged; it is idempotent);
   then ``cmd_key_epoch(role, version, recipient, now)`` is committed.
4. ``keys.reseal`` to every member, batch by batch, until each says ``done``: the member
   re-encrypts its own rows the role reads (``storage.rotation.reseal_step``, resumable
   from its durable cursor; rows signed by any trusted member are re-sealed). A call
   re-seals synced batches of ``RESEAL_BATCH_ROWS`` rows until it has worked
   ``RESEAL_BUDGET_S`` (at least one batch, at most ``RESEAL_MAX_BATCHES``), so it answers
   in about that time whatever the member's speed; the leader waits up to
   ``RESEAL_TIMEOUT_S`` for it (one slow batch on a loaded member must not turn into a
   timeout, a pause of ``RETRY_S`` and a call that queues behind the unfinished one).
5. ``keys.retire`` to every member: the old identity file is deleted everywhere.
6. The duty finishes. A leader change at any point: the duty is still marked running
   under the old term, the new leader resumes it from the cursor in the log.

A lapsed lease is not a leader change. The duty's run is cancelled whenever
``leader_term()`` stops naming its term (``ControlService._run_duty`` does that, and so
does ``ClusterRotation._run``), and a lease lapses for a moment whenever the leader's
event loop or a majority's answers fall behind a lease (a member busy re-sealing is
enough). If the lease then comes back in the same term, the duties loop does not resume
the duty (``duties.due`` resumes only duties of an older term), so the rotation would
stay "running" forever with nobody driving it. ``ClusterRotation`` therefore keeps track
of the rotations this process drives and revives one (``_revive``, on every
``on_change`` and after each cancelled run) when the log says it runs under this node's
current leader term and nothing here drives it. That is safe: every member call is
idempotent and fenced by the term, and the cursor is in the log.

Must not know: Raft, how the metadata changes (commands only), the row walk itself
(``storage.rotation``). Invariants: no member is asked to install before the sealed copies
are committed; the key epoch is committed only after every member installed; no member
retires before every member re-sealed; every member-side operation is refused below the
member's persisted fence.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import pyrage
import trio
from pyrage import x25519

from crypto.errors import CryptoError
from crypto.keyfiles import parse_identity
from crypto.roles import ADMIN_ROLE
from node.cluster.fanout import deadline
from node.cluster.service import NodeService
from node.control import metadata
from node.control.duties import DutyAction
from node.control.fence import Fence
from node.control.metadata import ApplyResult
from node.control.metadata_types import frozen_map
from node.control.rotation_plan import (
    CursorTooLarge,
    MalformedCursor,
    WalkCursor,
    duty_name,
    role_of,
)
from node.control.service import ControlService
from node.errors import NodeError
from node.rpc.transport import Peer
from storage.context_store import ContextStore
from storage.errors import Forbidden, InvalidPayload, StorageError, Unavailable
from storage.rotation import reseal_step, retire_old_version

log = logging.getLogger(__name__)
Body = dict[str, Any]
NEVER_DUE_S = 10**9  # the rotation duty's interval: it is only ever started on request
RETRY_S = 1.0
# per keys.reseal call: synced batches of RESEAL_BATCH_ROWS rows (a crash of the member
# loses at most one) until the call has worked RESEAL_BUDGET_S; at ~0.3-0.6 ms a row on an
# idle core that is a few thousand rows a call, and a loaded member answers after a batch
# or two. RESEAL_TIMEOUT_S, the leader's wait, leaves room for one slow batch.
RESEAL_BATCH_ROWS = 250
RESEAL_MAX_BATCHES = 40
RESEAL_BUDGET_S = 1.0
RESEAL_TIMEOUT_S = 20.0
Call = Callable[[str, str, Body], Awaitable[Body]]  # (member name, method, body)


def seal_identity(identity: x25519.Identity, recipient: str) -> bytes:
    """The identity's secret key, age-encrypted to a member's node recipient."""
    target = x25519.Recipient.from_str(recipient)
    return bytes(pyrage.encrypt(str(identity).encode("ascii"), [target]))


class MemberKeys:
    """A member's side of a cluster-wide rotation, over its store (blocking calls)."""

    def __init__(
        self,
        store: ContextStore,
        fence: Fence,
        *,
        batch_size: int = RESEAL_BATCH_ROWS,
        max_batches: int = RESEAL_MAX_BATCHES,
        budget_s: float | None = RESEAL_BUDGET_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.fence = fence
        self.batch_size = batch_size
        self.max_batches = max_batches
        self.budget_s = budget_s  # None: only max_batches bounds a call
        self.clock = clock

    def install(self, term: int, role: str, version: int, sealed: bytes) -> Body:
        """Unseal the identity with this node's identity and install it as ``version``.

        Raises:
            StaleTerm: below the fence. InvalidPayload: it does not open or is no identity.
            KeyringError: the keyring cannot take it (another rotation, another history).
        """
        self.fence.admit(term)
        keyring = self.store.keyring
        try:
            plain = pyrage.decrypt(sealed, [keyring.node_identity()])
            identity = parse_identity(bytes(plain).decode("ascii"), "keys.install")
        except (pyrage.DecryptError, UnicodeDecodeError, CryptoError):
            raise InvalidPayload(
                "identity: does not open with this node's identity", field="identity"
            ) from None
        installed = keyring.install_rotation(role, identity, version)
        return {"version": installed.version}

    def reseal(self, term: int, role: str, version: int) -> Body:
        """Re-encrypt batches of rows (``reseal_step``) until ``budget_s`` is spent (after
        at least one batch) or ``max_batches`` are written."""
        self.fence.admit(term)
        stop = None
        if self.budget_s is not None:
            until = self.clock() + self.budget_s

            def stop() -> bool:
                return self.clock() >= until

        report = reseal_step(
            self.store, role, version, trusted=self.store.reader.trusted,
            batch_size=self.batch_size, max_batches=self.max_batches, stop=stop,
        )  # fmt: skip
        return report.to_dict()

    def retire(self, term: int, role: str, version: int) -> Body:
        """Retire key version ``version`` of ``role`` here (idempotent)."""
        self.fence.admit(term)
        return {"retired": retire_old_version(self.store, role, version)}


class RotationDriver:
    """Runs one rotation duty as the leader of ``term`` (see the module docstring).

    ``members()``: node_id -> (name, node recipient) of every member not removed;
    ``call(name, method, body)``: a member's answer (this node's own included);
    ``propose``: commit a metadata command; ``now_ms``: the wall clock.
    """

    def __init__(
        self,
        store: ContextStore,
        *,
        members: Callable[[], Mapping[str, tuple[str, str]]],
        call: Call,
        propose: Callable[[bytes], Awaitable[ApplyResult]],
        now_ms: Callable[[], int],
        retry_s: float = RETRY_S,
    ) -> None:
        self.store = store
        self.members = members
        self.call = call
        self.propose = propose
        self.now_ms = now_ms
        self.retry_s = retry_s

    async def run(self, action: DutyAction, term: int) -> str:
        """Start or resume the rotation ``action`` names; the duty's final message."""
        role = role_of(action.name)
        if role is None:
            raise InvalidPayload(f"{action.name} is not a rotation duty")
        if action.cursor:
            try:
                cursor = WalkCursor.decode(action.cursor)
            except MalformedCursor as exc:
                return f"abandoned: {exc}"
        else:
            cursor = self._fresh(role)
            await self._record(action.name, term, cursor)
        while cursor.phase != "done":
            cursor = await self._step(action.name, term, cursor)
        return f"role {role} rotated to key version {cursor.version}; version retired everywhere"

    def _fresh(self, role: str) -> WalkCursor:
        """Generate the new identity once and seal it to every member."""
        keyring = self.store.keyring
        keyring.role_set.get(role)
        if keyring.rotation_in_progress(role) is not None:
            raise Unavailable(f"a rotation of role {role!r} is unfinished on the leader")
        current = next(rk for rk in keyring.role_keys() if rk.role.name == role)
        identity = x25519.Identity.generate()
        sealed = {nid: seal_identity(identity, rcpt) for nid, (_, rcpt) in self.members().items()}
        return WalkCursor(
            role,
            max(v.version for v in current.versions) + 1,
            current.current,
            str(identity.to_public()),
            sealed=frozen_map(sealed),
        )

    async def _record(self, name: str, term: int, cursor: WalkCursor) -> None:
        try:
            data = cursor.encode()
        except CursorTooLarge as exc:
            raise Unavailable(str(exc)) from None
        result = await self.propose(metadata.cmd_duty_progress(name, term, data))
        if not result.ok:
            raise Unavailable(f"the rotation cursor was not recorded: {result.error}")

    async def _step(self, name: str, term: int, cursor: WalkCursor) -> WalkCursor:
        """One round of the current phase over every pending member; recorded."""
        members = self.members()
        before = cursor
        if cursor.phase == "epoch":
            epoch = metadata.cmd_key_epoch(cursor.role, cursor.version, cursor.recipient,
                                           self.now_ms())  # fmt: skip
            result = await self.propose(epoch)
            if not result.ok and "key version" not in (result.error or ""):
                raise Unavailable(f"the key epoch was not committed: {result.error}")
        else:
            outcomes: dict[str, Body | None] = {}

            async def one(node_id: str) -> None:
                outcomes[node_id] = await self._ask(cursor, term, node_id, members[node_id][0])

            async with trio.open_nursery() as nursery:
                for node_id in cursor.pending(members):
                    nursery.start_soon(one, node_id)
            for node_id, answer in sorted(outcomes.items()):
                if answer is None:
                    continue
                if cursor.phase == "reseal":
                    cursor = cursor.with_rows(node_id, int(answer["scanned"]), int(answer["total"]))
                    if not answer.get("done"):
                        continue
                cursor = cursor.with_done(node_id)
        cursor = cursor.advanced(members)
        if cursor != before:
            await self._record(name, term, cursor)
        if cursor.phase == before.phase and cursor.done == before.done and cursor.phase != "reseal":
            await trio.sleep(self.retry_s)  # somebody is down: retry later
        elif cursor == before:
            await trio.sleep(self.retry_s)
        return cursor

    async def _ask(self, cursor: WalkCursor, term: int, node_id: str, name: str) -> Body | None:
        """One member's answer for the phase, or None (it failed; retried next round)."""
        body: Body = {"term": term, "role": cursor.role}
        if cursor.phase == "install":
            sealed = cursor.sealed.get(node_id)
            if sealed is None:  # a member that joined since: seal from the leader's copy
                members = self.members()
                sealed = self._seal_again(cursor, members[node_id][1])
            method = "keys.install"
            body.update(version=cursor.version, identity=sealed)
        elif cursor.phase == "reseal":
            method = "keys.reseal"
            body.update(version=cursor.version)
        else:
            method = "keys.retire"
            body.update(version=cursor.from_version)
        try:
            return await self.call(name, method, body)
        except (NodeError, StorageError, CryptoError) as exc:
            log.info("%s to %s failed (retried): %s", method, name, exc)
            return None

    def _seal_again(self, cursor: WalkCursor, recipient: str) -> bytes:
        keyring = self.store.keyring
        if keyring.recipient(cursor.role) != cursor.recipient:
            raise Unavailable("the leader does not hold the new identity yet")
        return seal_identity(keyring.current_identity(cursor.role), recipient)


def _cancellation(exc: BaseException) -> bool:
    """Whether ``exc`` is a cancellation: ``trio.Cancelled``, or a group of nothing else."""
    if isinstance(exc, trio.Cancelled):
        return True
    return isinstance(exc, BaseExceptionGroup) and exc.split(trio.Cancelled)[1] is None


def register_member_methods(service: NodeService, member: MemberKeys) -> None:
    """``keys.install``, ``keys.reseal`` and ``keys.retire`` (node peers only) on ``service``."""

    def method(name: str, run: Callable[[Body], Body]) -> None:
        async def handler(peer: Peer, args: Body) -> Body:
            if peer.kind != "node":
                raise Forbidden(f"{name} is for cluster nodes only")
            return await service.fanout.blocking(lambda: run(args))

        service.extra_replica_methods[name] = handler

    method("keys.install", lambda a: member.install(a["term"], a["role"], a["version"],
                                                    a["identity"]))  # fmt: skip
    method("keys.reseal", lambda a: member.reseal(a["term"], a["role"], a["version"]))
    method("keys.retire", lambda a: member.retire(a["term"], a["role"], a["version"]))


class ClusterRotation:
    """Registers the rotation duties, ``keys.*`` methods and status on one node."""

    def __init__(self, control: ControlService, fence: Fence) -> None:
        self.control = control
        self.service = control.service
        self.member = MemberKeys(self.service.store, fence)
        self.driver = RotationDriver(
            self.service.store,
            members=self._members,
            call=self._call,
            propose=control.propose,
            now_ms=control._clock_ms,
        )
        self._driving: set[str] = set()  # rotation duties a task of this process drives
        for role in self.service.store.keyring.role_set.names:
            control.duty_handlers[duty_name(role)] = self._drive
            control.self_reviving.add(duty_name(role))
        control.on_change.append(self._revive)
        register_member_methods(self.service, self.member)
        self.service.extra_replica_methods["keys.rotate_leader"] = self._rotate_leader
        self.service.extra_client_methods["keys.rotate"] = self._rotate
        self.service.status_fields.append(self.status)

    # -- status -----------------------------------------------------------------------------

    def status(self) -> Body:
        """``rotation``: the running rotation's progress (from the log): ``{role, version,
        phase, members_done, members_total, rows_done, rows_total}``; when none runs, the
        last one that ran: ``{role, phase: "done" | "failed", message, finished_ms}``;
        None when there never was one."""
        state = self.control.metadata
        if state is None:
            return {"rotation": None}
        members = list(state.names())
        last: Body | None = None
        for name, duty in sorted(state.duties.items()):
            role = role_of(name)
            if role is None or duty.last_term == 0:
                continue
            if duty.running and duty.cursor:
                try:
                    return {"rotation": WalkCursor.decode(duty.cursor).status(members)}
                except MalformedCursor:
                    continue
            if not duty.running and (last is None or duty.last_finished_ms > last["finished_ms"]):
                last = {
                    "role": role,
                    "phase": "done" if duty.last_ok else "failed",
                    "message": duty.last_message,
                    "finished_ms": duty.last_finished_ms,
                }
        return {"rotation": last}

    # -- the leader's side ------------------------------------------------------------------

    def _members(self) -> dict[str, tuple[str, str]]:
        state = self.control.metadata
        if state is None:
            return {}
        return {
            m.node_id: (m.name, m.age_recipient)
            for m in state.members.values()
            if m.state != "removed"
        }

    async def _call(self, name: str, method: str, body: Body) -> Body:
        local = {
            "keys.install": lambda: self.member.install(
                body["term"], body["role"], body["version"], body["identity"]
            ),
            "keys.reseal": lambda: self.member.reseal(body["term"], body["role"], body["version"]),
            "keys.retire": lambda: self.member.retire(body["term"], body["role"], body["version"]),
        }[method]
        if method == "keys.reseal" and name != self.service.name:
            # a call works RESEAL_BUDGET_S; one slow batch must not become a timeout
            return await self.service.dialer.call(name, method, body, timeout_s=RESEAL_TIMEOUT_S)
        return await self.service.fanout.on(name, method, body, local)

    async def start(self, role: str) -> Body:
        """Start the rotation of ``role`` here, the leader (``keys.rotate``'s answer)."""
        self.service.store.keyring.role_set.get(role)
        term = self.control.leader_term()
        if term is None:
            raise Unavailable(f"{self.service.name} is not the leader any more; retry")
        name = duty_name(role)
        state = self.control.metadata
        duty = None if state is None else state.duties.get(name)
        if duty is not None and duty.running:
            return {"role": role, "duty": name, "started": False, **self.status()}
        if duty is None:
            scheduled = await self.control.propose(metadata.cmd_duty_schedule(name, NEVER_DUE_S))
            if not scheduled.ok:
                raise Unavailable(f"the rotation duty was not created: {scheduled.error}")
        now = self.control._clock_ms()
        started = await self.control.propose(metadata.cmd_duty_started(name, term, now))
        if started.ok and started.value == "start":
            nursery = self.service.fanout.nursery
            if nursery is None:
                raise Unavailable("the node is not serving yet; retry")
            nursery.start_soon(self._run, DutyAction(name, "start"), term)
        # refused: the duties loop started it first (a new duty is due at once); it runs it
        return {"role": role, "duty": name, "started": True, "term": term}

    async def _drive(self, action: DutyAction, term: int) -> str:
        """``driver.run``, known to be driven here while it runs (the duty handler).

        Cancelled (deposed, or the lease lapsed): revived at once if the lease is back. The
        lease may well be back already: a run cancelled in a member call unwinds only once
        that call returns (a local one runs in a thread), and the notice that the lease came
        back found it still driven. The cancellation usually comes out of the walk's nursery
        as an exception group, not as a bare ``trio.Cancelled``."""
        self._driving.add(action.name)
        try:
            return await self.driver.run(action, term)
        except BaseException as exc:
            if _cancellation(exc):
                self._driving.discard(action.name)
                self._revive()
            raise
        finally:
            self._driving.discard(action.name)

    def _revive(self) -> None:
        """Start again every rotation duty the log says runs under this node's current
        leader term that no task here drives (its run was cancelled by a lapsed lease)."""
        term = self.control.leader_term()
        state = self.control.metadata
        nursery = self.service.fanout.nursery
        if term is None or state is None or nursery is None:
            return
        for name, duty in sorted(state.duties.items()):
            if role_of(name) is None or name in self._driving:
                continue
            if duty.running and duty.last_term == term and duty.cursor:
                log.info("%s: resuming rotation duty %s after a lapsed lease", self.service.name,
                         name)  # fmt: skip
                self._driving.add(name)  # until the task starts
                nursery.start_soon(self._run, DutyAction(name, "resume", duty.cursor), term)

    async def _run(self, action: DutyAction, term: int) -> None:
        """Run the duty as ``ControlService._run_duty`` does: cancelled when deposed (the
        next leader resumes it) or when the lease lapses (revived when it is back in the
        same term), finished in the log otherwise. Started from a request's handler, it
        must not inherit that request's deadline (every member call would fail at once)."""
        deadline.set(None)
        ok, message = True, ""
        with trio.CancelScope() as scope:

            def cancel_if_deposed() -> None:
                if self.control.leader_term() != term:
                    scope.cancel()

            self.control.on_change.append(cancel_if_deposed)
            try:
                message = await self._drive(action, term)
            except (StorageError, NodeError) as exc:
                ok, message = False, str(exc)
            finally:
                self.control.on_change.remove(cancel_if_deposed)
        if scope.cancelled_caught:
            return
        now = self.control._clock_ms()
        try:
            await self.control.propose(
                metadata.cmd_duty_finished(action.name, term, now, ok, message)
            )
        except StorageError as exc:
            log.info("rotation duty %s not finished in the log: %s", action.name, exc)

    # -- RPC ----------------------------------------------------------------------------------

    async def _rotate(self, peer: Peer, args: Body) -> Body:
        """``keys.rotate {role}`` from a client with the admin role."""
        if ADMIN_ROLE not in peer.roles:
            raise Forbidden("keys.rotate needs a client certificate with the admin role")
        if self.control.leader_term() is not None:
            return await self.start(args["role"])
        leader = self.control.leader_name()
        if leader is None or leader == self.service.name:
            raise Unavailable("no control-plane leader is known yet; retry")
        return await self.service.dialer.call(
            leader, "keys.rotate_leader", {"role": args["role"]},
            timeout_s=self.control.config.propose_timeout_s * 3,
        )  # fmt: skip

    async def _rotate_leader(self, peer: Peer, args: Body) -> Body:
        if peer.kind != "node":
            raise Forbidden("keys.rotate_leader is for cluster nodes only")
        return await self.start(args["role"])
