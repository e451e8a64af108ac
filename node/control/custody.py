"""Admin-key custody by the leader, forwarding of admin operations, fencing (a trio shell).

The admin role's age identity is Shamir-split across the nodes (``storage.admin_key``,
``node.daemon.cluster_init``): each node keeps only its own share, age-encrypted to its
node identity (``DATA_DIR/keys/admin.share.age``; after a re-share,
``admin.share.<epoch>.age``: only the share of the custody epoch the applied metadata
records counts, ``node.control.reshare``). ``AdminCustody`` carries out the decisions of
``node.control.custody_plan``:

- Collecting: while ``leadership.leader_term()`` is a term ``t`` and the identity is not
  held, it decrypts its own share and asks every other member for theirs in parallel
  (``admin.share {term: t, recipient}``, ``recipient`` a fresh age key of this
  collection, so a share never travels in clear, even inside TLS) until the shares
  combine into the identity on record (``combine_identity(expected_recipient=...)``).
  It then holds it in memory (``keyring.hold_in_memory``) for term ``t``. Fewer answers:
  retried with backoff (``retry_delay_s``).
- Wiping: as soon as ``leader_term()`` is not the held term (None: stepped down or lease
  lost; another: a new term), checked on each ``leadership.on_change`` callback, every
  ``check_interval_s``, before holding, and on cancellation: ``WipeableIdentity.wipe()``
  and ``keyring.release(ADMIN_ROLE)``.
- Answering ``admin.share`` (node peers only): only to the leader this node knows, for
  its own current term (``share_refusal``), re-encrypted to the asked recipient; with
  ``epoch`` (the leader's custody epoch), only if it is this node's too.
- Forwarding (``NodeService.forwarder``): a client request that needs the admin identity
  (an admin read where it is not held, any purge off the leader) is sent to the leader as
  ``admin.forward {method, body, client: {name, roles}}``; the leader runs it through its
  own ``handle`` as that client (``forwarded=True``: never forwarded again), if it holds
  the admin identity. The node's certificate vouches for the client's name and roles.
- Fencing: ``NodeService.leader_term_for_ops`` stamps leader-only operations (purge's
  ``rep.purge``) with the leader term, and replicas check it against their persisted
  fence (``node.control.fence``, installed as ``ReplicaSide.admit_leader_term``).

Must not know: how leadership is decided (``Leadership`` is what ``ControlService`` gives),
the transports, the Shamir arithmetic (``crypto.shamir``).

Invariants:
- The admin identity is held only while ``leader_term()`` equals the term it was
  collected for; it is never held after ``run`` ends.
- No share, mnemonic or identity reaches a log line, an error message or disk.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

import trio
from pyrage import x25519

from crypto.errors import CryptoError
from crypto.roles import ADMIN_ROLE
from crypto.shamir import WipeableIdentity, combine_identity, decrypt_share, encrypt_share_to
from node.cluster import answers
from node.cluster.answers import MalformedAnswer
from node.cluster.requests import Parsed
from node.control.custody_plan import (
    ADMIN_READS,
    Action,
    Route,
    custody_action,
    retry_delay_s,
    route,
)
from node.control.custody_plan import share_refusal as refusal_of
from node.control.fence import Fence
from node.errors import NodeError
from node.rpc.transport import Peer
from storage.admin_key import OWN_SHARE_FILE, share_file, split_record
from storage.errors import Forbidden, NotFound, StorageError, Unavailable

if TYPE_CHECKING:
    from node.cluster.service import NodeService

__all__ = ["AdminCustody", "Leadership"]
log = logging.getLogger(__name__)
Body = dict[str, Any]


class Leadership(Protocol):
    """What custody needs to know of Raft (``node.control.service.ControlService``)."""

    @property
    def term(self) -> int:
        """This node's current Raft term."""
        ...

    def leader_name(self) -> str | None:
        """The node name of the leader this node knows (None: unknown)."""
        ...

    def leader_term(self) -> int | None:
        """This node's term iff it is the leader and its lease holds now; else None."""
        ...

    def custody_params(self) -> tuple[int, str] | None:
        """(threshold, admin recipient) of the split as the cluster metadata records it
        (None: not known, e.g. a standalone node: the local split record is used)."""
        ...

    def custody_epoch(self) -> int:
        """The custody epoch of the applied metadata (0: none recorded, or never re-shared)."""
        ...

    on_change: list[Callable[[], None]]  # called after role/term/leader/lease changes


class AdminCustody:
    """Holds the admin identity while this node leads; answers and forwards admin work."""

    def __init__(
        self, service: NodeService, leadership: Leadership, *, check_interval_s: float = 0.1
    ) -> None:
        """Attach to ``service``: its ``admin.*`` methods, forwarder, fence and status."""
        self.service = service
        self.leadership = leadership
        self.check_interval_s = check_interval_s
        self.keyring = service.store.keyring
        self.fence = Fence(service.store.kv, lambda: leadership.term)
        self._held: WipeableIdentity | None = None
        self._held_term: int | None = None
        self._failures = 0
        self._failed_term: int | None = None
        self._wake = trio.Event()
        self.collections = 0  # identities rebuilt (metrics)
        self.wipes = 0  # identities wiped (metrics)
        service.extra_replica_methods["admin.share"] = self._admin_share
        service.extra_replica_methods["admin.forward"] = self._admin_forward
        service.forwarder = self._forward
        service.forward_refused = self._forward_refused
        service.leader_term_for_ops = self.require_leader_term
        service.local.admit_leader_term = self.fence.admit
        service.status_sources["custody"] = self.status

    # -- state --------------------------------------------------------------------------

    def held(self) -> bool:
        """Whether this node holds the rebuilt admin identity now."""
        return self._held is not None

    def held_term(self) -> int | None:
        """The leader term the admin identity is held for (None: not held)."""
        return self._held_term

    def held_identity(self, term: int) -> WipeableIdentity | None:
        """The identity held for leader term ``term`` (None: not held, or for another term).
        For the re-share only; the caller must not keep it past its use."""
        return self._held if self._held_term == term else None

    def status(self) -> dict[str, Any]:
        """``status_sources["custody"]``: {held: bool, held_term: int | None}."""
        return {"held": self.held(), "held_term": self._held_term}

    def require_leader_term(self) -> int:
        """The fencing token of a leader-only operation issued now.

        Raises:
            Unavailable: this node is not the leader, or its lease does not hold now.
        """
        term = self.leadership.leader_term()
        if term is None:
            raise Unavailable(
                f"{self.service.name} is not the leader (or its lease lapsed): "
                f"leader-only operations go to {self.leadership.leader_name() or 'no known leader'}"
                "; retry"
            )
        return term

    # -- the loop -----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Collect and wipe as leadership changes, until cancelled (then wipe)."""
        self.leadership.on_change.append(self._changed)
        try:
            task_status.started()
            while True:
                delay = await self._step()
                with trio.move_on_after(delay):
                    await self._wake.wait()
                self._wake = trio.Event()
        finally:
            self._wipe("custody stopped")
            self.leadership.on_change.remove(self._changed)

    def _changed(self) -> None:
        """``leadership.on_change``: wipe at once if needed, and wake the loop."""
        self._check()
        self._wake.set()

    def _check(self) -> Action:
        action = custody_action(self.leadership.leader_term(), self._held_term)
        if action is Action.WIPE:
            self._wipe("leadership changed")
        return action

    async def _step(self) -> float:
        """One pass; how long to wait for the next (unless woken)."""
        term = self.leadership.leader_term()
        if self._check() is not Action.COLLECT or term is None or not self._needs_custody():
            return self.check_interval_s
        if self._failed_term != term:
            self._failures, self._failed_term = 0, term
        if await self._collect(term):
            self._failures = 0
            return self.check_interval_s
        self._failures += 1
        return retry_delay_s(self.check_interval_s, self._failures)

    def _needs_custody(self) -> bool:
        """Whether the admin identity is split here (not held on disk, share or record)."""
        if self.keyring.identity_path(ADMIN_ROLE).exists():
            return False  # an unsplit admin identity on disk: nothing to rebuild
        if self.leadership.custody_params() is not None:
            return True  # a member without a share (one that joined) still collects
        own = self.keyring.keys_dir / OWN_SHARE_FILE
        return own.exists() or split_record(self.service.store) is not None

    def _wipe(self, why: str) -> None:
        if self._held is None:
            return
        self._held.wipe()
        self.keyring.release(ADMIN_ROLE)
        log.info("admin identity wiped (held for term %s): %s", self._held_term, why)
        self._held, self._held_term = None, None
        self.wipes += 1
        self._audit("custody.wipe")

    def _audit(self, op: str) -> None:
        """Record a custody event in the audit log (after the fact; never blocks a wipe)."""
        try:
            self.service.store.audit_event(op, None, "ok")
        except (CryptoError, StorageError) as exc:
            log.warning("audit of %s failed: %s", op, exc)

    # -- collecting ---------------------------------------------------------------------

    async def _collect(self, term: int) -> bool:
        """Collect shares for ``term`` and hold the identity; whether it is held now."""
        params = self.leadership.custody_params()
        if params is not None:  # the cluster's record wins over this node's own
            need, expected = params
        else:
            record = split_record(self.service.store) or {}
            threshold = record.get("threshold")
            need = threshold if isinstance(threshold, int) and threshold > 0 else 1
            expected = self.keyring.recipient(ADMIN_ROLE)
        own = await self.service.fanout.blocking(self._own_share)
        shares = [] if own is None else [own]
        rebuilt = await self.service.fanout.blocking(partial(_try_combine, shares, need, expected))
        if rebuilt is None:
            rebuilt = await self._gather(term, shares, need, expected)
        if rebuilt is None:
            log.info("admin shares for term %d: %d collected, too few; retrying", term, len(shares))
            return False
        if self.leadership.leader_term() != term:  # stepped down while collecting
            rebuilt.wipe()
            return False
        self.keyring.hold_in_memory(ADMIN_ROLE, rebuilt.identity())
        self._held, self._held_term = rebuilt, term
        self.collections += 1
        log.info("admin identity rebuilt from %d shares for term %d", len(shares), term)
        self._audit("custody.hold")
        return True

    async def _gather(
        self, term: int, shares: list[str], need: int, expected: str
    ) -> WipeableIdentity | None:
        """Ask the other members in parallel until the shares combine (or all answered)."""
        key = x25519.Identity.generate()  # this collection's own key: shares come sealed
        body = {"term": term, "recipient": str(key.to_public()),
                "epoch": self.leadership.custody_epoch()}  # fmt: skip
        others = [n for n in self.service.cluster.member_names() if n != self.service.name]
        found: list[WipeableIdentity] = []

        async def ask(node: str, cancel: trio.CancelScope) -> None:
            try:
                answer = await self.service.dialer.call(
                    node, "admin.share", body, timeout_s=self.service.config.timeout_s
                )
                try:
                    share = decrypt_share(answers.parse_share(answer), key)
                except CryptoError:
                    raise MalformedAnswer("admin.share", "the share does not open") from None
            except (NodeError, StorageError) as exc:
                self.service.fanout.failed("admin.share", node, exc)
                return
            shares.append(share)
            if found or len(shares) < need:
                return
            combine = partial(_try_combine, list(shares), need, expected)  # PBKDF2: ~10 ms
            rebuilt = await self.service.fanout.blocking(combine)
            if rebuilt is not None and found:  # another answer combined first
                rebuilt.wipe()
            elif rebuilt is not None:
                found.append(rebuilt)
                cancel.cancel()

        try:
            async with trio.open_nursery() as nursery:
                for node in others:
                    nursery.start_soon(ask, node, nursery.cancel_scope)
        except BaseException:  # cancelled (stopping) with an identity rebuilt: never kept
            for rebuilt in found:
                rebuilt.wipe()
            raise
        return found[0] if found else None

    def _own_share(self) -> str | None:
        """This node's share of the committed custody epoch, decrypted (None: no share
        file, or it does not open)."""
        path = self.keyring.keys_dir / share_file(self.leadership.custody_epoch())
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            return decrypt_share(data, self.keyring.node_identity())
        except CryptoError:
            log.warning("%s does not open with this node's identity", path)
            return None

    # -- serving ------------------------------------------------------------------------

    async def _admin_share(self, peer: Peer, args: Body) -> Body:
        """``admin.share {term, recipient}`` -> {share: age ciphertext to recipient}."""
        why = refusal_of(
            peer.name, self.leadership.leader_name(), args["term"], self.leadership.term
        )
        if why is not None:
            raise Forbidden(f"admin.share refused: {why}", field="term")
        epoch = self.leadership.custody_epoch()
        asked = args.get("epoch")
        if asked is not None and asked != epoch:
            raise Unavailable(
                f"admin.share: custody epoch {asked} asked, {epoch} applied here; retry"
            )
        share = await self.service.fanout.blocking(self._own_share)
        if share is None:
            raise NotFound(
                f"{self.service.name} holds no admin share of epoch {epoch} "
                f"(no {share_file(epoch)})"
            )
        return {"share": encrypt_share_to(share, args["recipient"]), "epoch": epoch}

    async def _admin_forward(self, peer: Peer, args: Body) -> Body:
        """``admin.forward {method, body, client}``: run a client's request here, as it."""
        client = Peer(name=args["client_name"], kind="client", roles=args["client_roles"],
                      fingerprint=f"forwarded by {peer.name}")  # fmt: skip
        as_role = args["body"].get("as_role")
        where = self._route(args["method"], as_role, client, forwarded=True)
        if where is Route.NOT_READY:
            if self.leadership.leader_term() is None:
                leader = self.leadership.leader_name()
                raise Unavailable(
                    f"{self.service.name} is not the leader (the leader I know: "
                    f"{leader or 'none'}); retry"
                )
            raise Unavailable("the leader does not hold the admin key yet; retry")
        return await self.service.handle(client, args["method"], args["body"], forwarded=True)

    async def _forward(self, peer: Peer, parsed: Parsed, raw: Body) -> Body | None:
        """``NodeService.forwarder``: the leader's answer, or None to answer here."""
        where = self._route(parsed.method, parsed.args.get("as_role"), peer)
        if where is Route.LOCAL:
            return None
        if where is Route.NOT_READY:
            raise Unavailable("the leader (this node) does not hold the admin key yet; retry")
        leader = self.leadership.leader_name()
        if leader is None:
            raise Unavailable("no leader known; retry")
        if leader == self.service.name:
            raise Unavailable("this node's leader lease does not hold now; retry")
        body = {"method": parsed.method, "body": raw,
                "client": {"name": peer.name, "roles": list(peer.roles)}}  # fmt: skip
        return await self.service.dialer.call(
            leader, "admin.forward", body, timeout_s=self.service.fanout.timeout()
        )

    async def _forward_refused(self, peer: Peer, parsed: Parsed, raw: Body) -> Body | None:
        """``NodeService.forward_refused``: a read refused here, by a client with the admin
        role that named no role, may be one only the admin identity opens: the leader
        answers it (None: answer the refusal here)."""
        if parsed.method not in ADMIN_READS or ADMIN_ROLE not in peer.roles:
            return None
        if parsed.args.get("as_role") is not None or self.keyring.has_identity(ADMIN_ROLE):
            return None
        leader = self.leadership.leader_name()
        if leader is None or leader == self.service.name:
            return None
        body = {"method": parsed.method, "body": {**raw, "as_role": ADMIN_ROLE},
                "client": {"name": peer.name, "roles": list(peer.roles)}}  # fmt: skip
        return await self.service.dialer.call(
            leader, "admin.forward", body, timeout_s=self.service.fanout.timeout()
        )

    def _route(self, method: str, as_role: Any, client: Peer, *, forwarded: bool = False) -> Route:
        return route(
            method, as_role if isinstance(as_role, str) else None, client.roles,
            holds_admin=self.keyring.has_identity(ADMIN_ROLE),
            is_leader=self.leadership.leader_term() is not None, forwarded=forwarded,
        )  # fmt: skip


def _try_combine(shares: list[str], need: int, expected: str) -> WipeableIdentity | None:
    """The identity, if ``shares`` (at least ``need``) combine into the one on record."""
    if len(shares) < need:
        return None
    try:
        return combine_identity(shares, expected_recipient=expected)
    except CryptoError:
        return None
