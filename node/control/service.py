"""The control plane's trio shell: runs the Raft core over the node's RPC and its store.

Owns: one ``RawNode`` (node/control/raft.py) per node, its clock (a tick every
``tick_s`` of trio's clock), the Ready loop (persist synced through
``node/control/log_store.py`` -> send -> apply to the metadata state machine ->
advance), the ``raft.msg`` and ``raft.propose`` methods, proposals from this node
(forwarded to the leader when it is not one), log compaction into snapshots of the
metadata, and the leader duties loop (node/control/duties.py decides what is due; the
handlers registered in ``duty_handlers`` do the work).

Must not know: Raft's rules (the core), the metadata's transformations (the state
machine), sockets or TLS (the node's dialer), how the admin key is held (custody).

Invariants:
- Nothing leaves before the Ready's hard state and entries are durable (synchronous mode:
  save, then send). A failed save halts this node's control plane (``halted`` says why):
  a failed fsync is never retried ("fsyncgate"); the data path keeps serving, and a
  restart reloads what is durable.
- Every core call (tick, step, propose, ready, advance) happens under one lock, so a
  Ready is never interleaved with another input.
- ``leader_term()`` is the term only while this node leads and its lease holds, checked
  at each call in real time (trio's clock) from the send time of the heartbeat round a
  majority acknowledged: a tick loop that fell behind cannot stretch it. ``on_change``
  runs when it lapses or returns, not only when the role, term or leader changes: the
  tick loop wakes at the lease's end, and any ``leader_term()`` call that sees a change
  notifies first (so a listener never sees a lapsed lease before being told).
- A peer's message is stepped only when its sender id belongs to the certificate name it
  came over (a node cannot speak for another) and it is addressed to this node. A sender
  id the applied metadata does not know (a member added while this node was down, or
  before its metadata caught up) is bound to the certificate name it first came over;
  a removed member's id, and a known member's name speaking for another id, are refused.

Joining (``node.control.bootstrap.mark_join``): a node created to join a running cluster
starts its ``RawNode`` from an empty Raft state, with ``metadata`` None, until the
leader's snapshot arrives; it never bootstraps a cluster of its own. Meanwhile it knows
no member names, so it accepts ``raft.msg`` from any node certificate of the cluster CA
and records sender id -> certificate name (``name_of`` answers from that record until the
metadata is applied): that is how it answers the leader. Entries committed before a
snapshot cannot reach it (a joiner's log is empty, so the leader's first append is a
snapshot) and would be skipped.

Stale metadata: a node that was down (or whose control plane halted) while a member
joined restarts with metadata that does not list it, and that member may lead by then
(Raft: a follower takes a valid leader's messages of a higher term whether or not its
own, older, configuration lists it). Its node certificate (same CA) proves its name, so
its messages are accepted as a joiner's are, and its id -> name is recorded so this node
can answer it, until the log brings the metadata that lists it.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from node.cluster.service import NodeService
from node.control import duties, metadata
from node.control.bootstrap import bootstrap_single, clear_join, join_pending
from node.control.log_store import RaftLogStore
from node.control.metadata import ApplyResult, ClusterMetadata
from node.control.raft import NotLeader, ProposalDropped, RaftConfig, RawNode
from node.control.raft_types import (
    ConfState,
    Entry,
    EntryKind,
    MalformedRaftData,
    Message,
    PersistedState,
    Ready,
    Role,
    SoftState,
)
from node.errors import NodeError, PeerUnavailable, RemoteError
from node.rpc.transport import Peer
from storage.errors import Forbidden, StorageError, Unavailable

log = logging.getLogger(__name__)
Body = dict[str, Any]
DutyHandler = Callable[[duties.DutyAction, int], Awaitable[str]]


@dataclass(frozen=True)
class ControlConfig:
    """Timing of the control plane (from the node's ``[election]`` table), in ticks of
    ``tick_s`` of trio's clock."""

    tick_s: float = 0.05
    heartbeat_ticks: int = 3
    election_ticks: int = 6
    election_jitter_ticks: int = 6  # the election timeout is in [T, T + jitter) ticks
    lease_ratio: float = 0.9
    compact_every: int = 1000  # entries applied past the last snapshot before compacting
    max_queued_messages: int = 256  # per peer; beyond it messages are dropped (Raft resends)
    duties_interval_s: float = 1.0
    propose_timeout_s: float = 5.0

    @classmethod
    def from_election(
        cls, heartbeat_ms: int, election_timeout_ms: tuple[int, int]
    ) -> ControlConfig:
        """A tick of a third of the heartbeat (at least 10 ms); the election timeout is
        randomized in [MIN, MAX) of ``election_timeout_ms``, to the tick."""
        tick_ms = max(10, heartbeat_ms // 3)
        heartbeat = max(1, round(heartbeat_ms / tick_ms))
        low, high = election_timeout_ms
        election = max(heartbeat + 1, math.ceil(low / tick_ms))
        jitter = max(1, math.ceil((high - low) / tick_ms))
        return cls(tick_ms / 1000, heartbeat, election, jitter)

    def raft(self) -> RaftConfig:
        """The core's configuration."""
        return RaftConfig(
            election_ticks=self.election_ticks, heartbeat_ticks=self.heartbeat_ticks,
            election_jitter_ticks=self.election_jitter_ticks, lease_ratio=self.lease_ratio,
        )  # fmt: skip


@dataclass
class _Waiter:
    term: int
    done: trio.Event
    result: ApplyResult | None = None
    lost: str | None = None


class ControlService:
    """One node's control plane; ``run`` serves until cancelled (see the module docstring)."""

    def __init__(
        self,
        service: NodeService,
        config: ControlConfig,
        *,
        rng: random.Random,
        clock_ms: Callable[[], int],
        rpc_host: str = "127.0.0.1",
        rpc_port: int = 0,
    ) -> None:
        self.service = service
        self.config = config
        self.node_id = service.store.keyring.node_id
        self.log = RaftLogStore(service.store.kv)
        self.on_change: list[Callable[[], None]] = []
        self.on_apply: list[Callable[[Entry], None]] = []
        self.duty_handlers: dict[str, DutyHandler] = {}
        # duties whose handler resumes itself after a lapsed lease (the cluster rotation)
        self.self_reviving: set[str] = set()
        self._driving: set[str] = set()  # duties a run of _run_duty drives now
        self._lost: set[str] = set()  # duties whose run here was cancelled in this term
        self.metadata: ClusterMetadata | None = None
        self.elections = 0
        self.messages_dropped = 0
        self.halted: str | None = None
        self.warnings: dict[str, str] = {}
        self._rng = rng
        self._clock_ms = clock_ms
        self._rpc = (rpc_host, rpc_port)
        self._node: RawNode | None = None
        self._lock = trio.Lock()
        self._wake = trio.Event()
        self._waiters: dict[int, _Waiter] = {}
        self._queues: dict[str, trio.MemorySendChannel[Message]] = {}
        self._nursery: trio.Nursery | None = None
        self._ticks = 0  # the core's tick count: tick n happened at _tick_times[n]
        self._tick_times: dict[int, float] = {0: -math.inf}
        self._lease_seen: int | None = None  # leader_term() as listeners were last told
        self._notifying = False
        self._soft = SoftState(None, Role.FOLLOWER)
        self._duty_scope: trio.CancelScope | None = None
        self._snapshot_index = 0
        self._applied = trio.Event()  # set (and replaced) at each applied entry
        self._peer_names: dict[str, str] = {}  # id -> cert name, learned while joining
        self.joining = False  # started from an empty state, waiting for the leader's snapshot
        service.extra_replica_methods["raft.msg"] = self._raft_msg
        service.extra_replica_methods["raft.propose"] = self._raft_propose

    # -- what others read -------------------------------------------------------------------

    @property
    def term(self) -> int:
        """This node's current term (0 before it started)."""
        return 0 if self._node is None else self._node.term

    def role(self) -> Role | None:
        """This node's role (None before it started or after its control plane halted)."""
        if self._node is None or self.halted is not None:
            return None
        return self._node.role

    def leader_id(self) -> str | None:
        """The node id of the leader this node knows."""
        return None if self._node is None else self._node.leader

    def leader_name(self) -> str | None:
        """The name of the leader this node knows (None: unknown)."""
        leader = self.leader_id()
        if leader is None:
            return None
        return self.name_of(leader)

    def name_of(self, node_id: str) -> str | None:
        """A member's name by node id (from the applied metadata; for an id it does not
        list yet, e.g. while joining, from the certificates its messages came over)."""
        if self.metadata is None or node_id not in self.metadata.members:
            return self._peer_names.get(node_id)
        return self.metadata.names().get(node_id)

    def conf(self) -> ConfState:
        """The Raft configuration (the latest, committed or not; empty before start)."""
        return ConfState(frozenset()) if self._node is None else self._node.conf

    def commit_index(self) -> int:
        """This node's commit index."""
        return 0 if self._node is None else self._node.commit_index

    def match_indexes(self) -> dict[str, int]:
        """Leader: node id -> the index replicated there (itself included); {} otherwise."""
        if self._node is None:
            return {}
        return {node_id: match for node_id, (match, _) in self._node.progress().items()}

    def leader_term(self) -> int | None:
        """The term, while this node leads and its lease holds (checked now). A change
        since listeners were last told is told first (``on_change``)."""
        expiry = self._lease_expiry()
        term = None if expiry is None or trio.current_time() >= expiry else self.term
        if term != self._lease_seen and not self._notifying:
            self._lease_seen = term
            self._notify()
        return term

    def _lease_expiry(self) -> float | None:
        """When the current lease ends, on trio's clock (None: no lease). It counts in real
        time from the tick its heartbeat round was sent at, so a tick loop that fell
        behind (a stalled event loop) cannot stretch it."""
        node = self._node
        if node is None or self.halted is not None or node.role is not Role.LEADER:
            return None
        since_tick = node.lease_from()
        started = None if since_tick is None else self._tick_times.get(since_tick)
        if started is None:
            return None
        return started + self.config.lease_ratio * self.config.election_ticks * self.config.tick_s

    def custody_params(self) -> tuple[int, str] | None:
        """(threshold, admin recipient) of the admin split the applied metadata records."""
        custody = None if self.metadata is None else self.metadata.custody
        if custody is None or custody.threshold < 1:
            return None
        return custody.threshold, custody.admin_recipient

    def custody_epoch(self) -> int:
        """The custody epoch of the applied metadata (0: none recorded, never re-shared)."""
        custody = None if self.metadata is None else self.metadata.custody
        return 0 if custody is None else custody.epoch

    def status(self) -> Body:
        """``role``, ``term``, ``leader`` and the log's figures, for ``node.status``."""
        node = self._node
        role = self.role()
        return {
            "role": None if role is None else _role_name(role),
            "term": self.term,
            "leader": self.leader_name(),
            "raft": {
                "node_id": self.node_id,
                "commit_index": 0 if node is None else node.commit_index,
                "applied_index": 0 if node is None else node.applied_index,
                "lease": self.leader_term() is not None,
                "elections": self.elections,
                "halted": self.halted,
                "voters": [] if node is None else sorted(
                    self.name_of(v) or v for v in node.conf.voters
                ),
                "ring_epoch": None if self.metadata is None else self.metadata.ring.epoch,
                "warnings": dict(self.warnings),
            },
        }  # fmt: skip

    # -- running ----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Load (or bootstrap) the log, then tick, drive Readys and run duties. A log that
        cannot be read (a failing disk, a corrupt row) halts the control plane, not the
        node: the data path serves, ``halted`` says why, a restart tries again."""
        try:
            state = await self._load()
        except (StorageError, NodeError, MalformedRaftData, OSError) as exc:
            self.halted = f"the raft log could not be loaded: {type(exc).__name__}: {exc}"
            log.critical("%s: control plane halted: %s", self.service.name, self.halted)
            task_status.started()
            await trio.sleep_forever()
        applied = 0
        if state.snapshot is not None:
            self.metadata = metadata.decode_state(state.snapshot.data)
            applied = self._snapshot_index = state.snapshot.meta.index
        self._node = RawNode(self.node_id, self.config.raft(), self._rng, state, applied=applied)
        self._soft = self._node.soft_state()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._tick_loop)
                nursery.start_soon(self._ready_loop)
                nursery.start_soon(self._duties_loop)
                task_status.started()
                await trio.sleep_forever()
        finally:
            for waiter in self._waiters.values():
                waiter.lost = "the node is stopping"
                waiter.done.set()

    async def _load(self) -> PersistedState:
        """The persisted Raft state: bootstrapped alone when there is none (unless the node
        was created to join: then empty, until the leader's snapshot arrives)."""
        store = self.service.store
        fresh = not await self.service.fanout.blocking(self.log.has_state)
        if fresh and await self.service.fanout.blocking(lambda: join_pending(store.kv)):
            self.joining = True
            return PersistedState()  # wait for the leader's snapshot (module docstring)
        if fresh:
            name, (host, port) = self.service.name, self._rpc
            await self.service.fanout.blocking(lambda: bootstrap_single(store, name, host, port))
        state = await self.service.fanout.blocking(self.log.load)
        self.joining = state.snapshot is None and join_pending(store.kv)
        return state

    async def _tick_loop(self) -> None:
        keep = 4 * (self.config.election_ticks + self.config.election_jitter_ticks)
        next_tick = trio.current_time()
        while self.halted is None:
            if trio.current_time() >= next_tick:
                async with self._lock:
                    assert self._node is not None
                    self._node.tick()
                    self._ticks += 1
                    self._tick_times[self._ticks] = trio.current_time()
                    self._tick_times.pop(self._ticks - keep, None)
                next_tick = trio.current_time() + self.config.tick_s
                self._wake.set()
            self.leader_term()  # tells listeners when the lease lapsed or came back
            expiry = self._lease_expiry()
            now = trio.current_time()
            await trio.sleep_until(
                next_tick if expiry is None or expiry <= now else min(next_tick, expiry)
            )

    async def _ready_loop(self) -> None:
        while self.halted is None:
            await self._wake.wait()
            self._wake = trio.Event()
            while self.halted is None:
                async with self._lock:
                    assert self._node is not None
                    if not self._node.has_ready():
                        break
                    await self._handle_ready(self._node, self._node.ready())
        self._notify()

    async def _handle_ready(self, node: RawNode, ready: Ready) -> None:
        if ready.snapshot is not None or ready.entries or ready.hard_state is not None:
            try:
                await self.service.fanout.blocking(
                    lambda: self.log.save(
                        snapshot=ready.snapshot, entries=ready.entries,
                        hard_state=ready.hard_state, sync=ready.must_sync,
                    )
                )  # fmt: skip
            except Exception as exc:
                self.halted = f"the raft log could not be saved: {type(exc).__name__}: {exc}"
                log.critical("%s: control plane halted: %s", self.service.name, self.halted)
                return
        for message in ready.messages:
            self._send(message)
        if ready.snapshot is not None:
            self.metadata = metadata.decode_state(ready.snapshot.data)
            self._snapshot_index = ready.snapshot.meta.index
            self._settle_waiters(ready.snapshot.meta.index, None)
            if self.joining:
                self.joining = False
                await self.service.fanout.blocking(lambda: clear_join(self.service.store.kv))
                log.info("%s: joined the cluster (snapshot at %d)", self.service.name,
                         ready.snapshot.meta.index)  # fmt: skip
        for entry in ready.committed_entries:
            self._apply(entry)
        node.advance(ready)
        if ready.soft_state is not None and ready.soft_state != self._soft:
            if ready.soft_state.role is Role.CANDIDATE:
                self.elections += 1
            self._soft = ready.soft_state
            self._notify()
        elif ready.hard_state is not None:
            self._notify()  # a new term: leadership-dependent state must re-check
        await self._maybe_compact(node)

    def _apply(self, entry: Entry) -> None:
        if self.metadata is None:  # cannot happen (module docstring): a joiner's log is empty
            log.warning("entry %d committed before any snapshot: skipped", entry.index)
            return
        self.metadata, result = metadata.apply_entry(self.metadata, entry)
        if not result.ok and entry.kind is EntryKind.NORMAL and entry.data:
            log.warning("entry %d applied as a no-op: %s", entry.index, result.error)
        for hook in self.on_apply:
            hook(entry)
        self._settle_waiters(entry.index, (entry.term, result))
        self._applied.set()
        self._applied = trio.Event()

    def _settle_waiters(self, index: int, applied: tuple[int, ApplyResult] | None) -> None:
        for at in [i for i in self._waiters if i <= index]:
            waiter = self._waiters.pop(at)
            if applied is not None and at == index and applied[0] == waiter.term:
                waiter.result = applied[1]
            else:
                waiter.lost = "the proposal was overtaken by a leader change; retry"
            waiter.done.set()

    async def _maybe_compact(self, node: RawNode) -> None:
        if self.metadata is None:
            return
        applied = node.applied_index
        if applied - self._snapshot_index < self.config.compact_every:
            return
        snapshot = node.compact(applied, metadata.encode_state(self.metadata))
        try:
            await self.service.fanout.blocking(lambda: self.log.compact(snapshot))
            self._snapshot_index = snapshot.meta.index
        except Exception as exc:
            self.halted = f"the raft snapshot could not be saved: {type(exc).__name__}: {exc}"
            log.critical("%s: control plane halted: %s", self.service.name, self.halted)

    def _notify(self) -> None:
        for hook in list(self.on_change):
            try:
                hook()
            except Exception:
                self.service.fanout.internal("control.on_change")

    # -- messages ---------------------------------------------------------------------------

    def _send(self, message: Message) -> None:
        name = self.name_of(message.dst)
        if name is None or self._nursery is None:
            self.messages_dropped += 1
            return
        queue = self._queues.get(name)
        if queue is None:
            send, receive = trio.open_memory_channel[Message](self.config.max_queued_messages)
            self._queues[name] = queue = send
            self._nursery.start_soon(self._sender, name, receive)
        try:
            queue.send_nowait(message)
        except trio.WouldBlock:
            self.messages_dropped += 1

    async def _sender(self, name: str, queue: trio.MemoryReceiveChannel[Message]) -> None:
        """Deliver queued messages to ``name`` in batches, one call in flight."""
        timeout = max(4 * self.config.heartbeat_ticks * self.config.tick_s, 0.5)
        async for first in queue:
            batch = [first]
            while len(batch) < 64:
                try:
                    batch.append(queue.receive_nowait())
                except trio.WouldBlock:
                    break
            body = {"msgs": [m.to_wire() for m in batch]}
            try:
                await self.service.dialer.call(name, "raft.msg", body, timeout_s=timeout)
            except (NodeError, StorageError, PeerUnavailable, RemoteError):
                self.messages_dropped += len(batch)  # Raft resends what matters
            except Exception:
                self.service.fanout.internal("raft.msg")

    async def _raft_msg(self, peer: Peer, args: Body) -> Body:
        if peer.kind != "node":
            raise Forbidden("raft.msg is for cluster nodes only")
        if self._node is None or self.halted is not None:
            return {"stepped": 0}
        stepped = 0
        async with self._lock:
            for message in args["msgs"]:
                if message.dst != self.node_id or not self._from(peer, message.src):
                    continue
                self._node.step(message)
                stepped += 1
        self._wake.set()
        return {"stepped": stepped}

    def _from(self, peer: Peer, node_id: str) -> bool:
        """Whether ``peer`` may speak as ``node_id``: its member name matches, or (an id the
        applied metadata does not list: joining, or stale metadata, see the module
        docstring) the id is bound to this certificate name, on first sight."""
        state = self.metadata
        if state is not None:
            member = state.members.get(node_id)
            if member is not None:
                return member.state != "removed" and member.name == peer.name
            if state.member_by_name(peer.name) is not None:
                return False  # a member's certificate speaking for an id not its own
        known = self._peer_names.get(node_id)
        if known is not None and known != peer.name:
            return False
        if known is None:
            # one id per certificate name: a node that re-creates its id (a fresh data dir
            # under the same certificate) replaces its old binding, so the map stays as
            # small as the number of node certificates that ever spoke to this node
            for stale in [i for i, name in self._peer_names.items() if name == peer.name]:
                del self._peer_names[stale]
            self._peer_names[node_id] = peer.name
        return True

    # -- proposals --------------------------------------------------------------------------

    async def propose(self, data: bytes) -> ApplyResult:
        """Commit ``data`` through the log and wait until this node applied it.

        Raises:
            Unavailable: no leader is known, the leader changed, or it took too long.
        """
        with trio.move_on_after(self.config.propose_timeout_s):
            if self._node is not None and self._node.role is Role.LEADER:
                return await self._propose_here(data)
            leader = self.leader_name()
            if leader is None:
                raise Unavailable("no control-plane leader is known yet; retry")
            answer = await self.service.dialer.call(
                leader, "raft.propose", {"data": data}, timeout_s=self.config.propose_timeout_s
            )
            index = answer.get("index")
            if not isinstance(index, int):
                raise Unavailable(f"the leader {leader} answered raft.propose without an index")
            await self._wait_applied(index)
            return ApplyResult(bool(answer.get("ok")), answer.get("error"), answer.get("value"))
        raise Unavailable("the control-plane proposal timed out; retry")

    async def propose_conf_change(self, conf: ConfState) -> None:
        """Leader only: commit the single-server configuration change ``conf`` and wait
        until this node applied it.

        Raises:
            Unavailable: not the leader, a conf change is still uncommitted, the change
                was lost to a leader change, or it took too long.
            ValueError: ``conf`` is not a single-server change of the current one.
        """
        with trio.move_on_after(self.config.propose_timeout_s):
            result = await self._propose_here(b"", conf=conf)
            if not result.ok:
                raise Unavailable(f"the configuration change did not apply: {result.error}")
            return
        raise Unavailable("the configuration change timed out; retry")

    async def _propose_here(self, data: bytes, *, conf: ConfState | None = None) -> ApplyResult:
        if self._node is None or self.halted is not None:
            raise Unavailable(f"the control plane of {self.service.name} is not running")
        async with self._lock:
            try:
                if conf is None:
                    index = self._node.propose(data)
                else:
                    index = self._node.propose_conf_change(conf)
            except NotLeader as exc:
                raise Unavailable(
                    f"not the leader any more (leader: {exc.leader}); retry"
                ) from None
            except ProposalDropped as exc:
                raise Unavailable(f"the proposal was dropped: {exc}; retry") from None
            waiter = _Waiter(self._node.term, trio.Event())
            self._waiters[index] = waiter
        self._wake.set()
        await waiter.done.wait()
        if waiter.result is None:
            raise Unavailable(waiter.lost or "the proposal was lost; retry")
        return waiter.result

    async def _wait_applied(self, index: int) -> None:
        while self._node is None or self._node.applied_index < index:
            await self._applied.wait()

    async def _raft_propose(self, peer: Peer, args: Body) -> Body:
        if peer.kind != "node":
            raise Forbidden("raft.propose is for cluster nodes only")
        result = await self._propose_here(args["data"])
        assert self._node is not None
        return {
            "ok": result.ok, "error": result.error, "value": result.value,
            "index": self._node.applied_index,
        }  # fmt: skip

    # -- leader duties ------------------------------------------------------------------------

    async def _duties_loop(self) -> None:
        while self.halted is None:
            await trio.sleep(self.config.duties_interval_s)
            term = self.leader_term()
            if term is None or self.metadata is None:
                continue
            for action, again in self._due(self.metadata, term):
                handler = self.duty_handlers.get(action.name)
                if handler is None:
                    continue
                try:
                    await self._run_duty(action, handler, term, again=again)
                except StorageError as exc:  # Unavailable: lost leadership, or no quorum
                    log.info("duty %s not run: %s", action.name, exc.message)
                except Exception:
                    self.service.fanout.internal(f"duty.{action.name}")

    def _due(self, state: ClusterMetadata, term: int) -> list[tuple[duties.DutyAction, bool]]:
        """What to run now: the due duties, then those this node lost in its own term (its
        run was cancelled by a lease that lapsed and came back: the log still says running
        under this term, so no other leader can resume it; ``again``: run it on)."""
        due = [(action, False) for action in duties.due(state, self._clock_ms(), term)]
        for name in sorted(self._lost):
            duty = state.duties.get(name)
            if duty is None or not duty.running or duty.last_term != term:
                self._lost.discard(name)  # finished, or another term owns it now
            elif name not in self._driving:
                due.append((duties.DutyAction(name, "resume", duty.cursor), True))
        return due

    async def _run_duty(
        self, action: duties.DutyAction, handler: DutyHandler, term: int, *, again: bool = False
    ) -> None:
        if not again:
            now = self._clock_ms()
            started = await self.propose(metadata.cmd_duty_started(action.name, term, now))
            if not started.ok:
                log.info("duty %s not started: %s", action.name, started.error)
                return
        self._lost.discard(action.name)
        self._driving.add(action.name)
        ok, message = True, ""
        with trio.CancelScope() as scope:
            self._duty_scope = scope

            def cancel_if_deposed() -> None:
                if self.leader_term() != term:
                    scope.cancel()

            self.on_change.append(cancel_if_deposed)
            try:
                message = await handler(action, term)
            except (StorageError, NodeError) as exc:
                ok, message = False, str(exc)
            finally:
                self.on_change.remove(cancel_if_deposed)
                self._duty_scope = None
                self._driving.discard(action.name)
        if scope.cancelled_caught:
            # deposed mid-duty: the next leader resumes it (it is still marked running); if
            # only the lease lapsed, this node resumes it once the lease is back
            if action.name not in self.self_reviving:
                self._lost.add(action.name)
            return
        await self.propose(
            metadata.cmd_duty_finished(action.name, term, self._clock_ms(), ok, message)
        )


def _role_name(role: Role) -> str:
    """The contract's names: "leader", "follower", "candidate" (a pre-candidate is one)."""
    return "candidate" if role is Role.PRE_CANDIDATE else role.value
