"""The Raft core: a sans-I/O state machine in the style of etcd-io/raft's RawNode/Ready.

A pure core (ARCHITECTURE.md §2, §6): no I/O, no clock (time is ``tick()``), randomness
only from the injected ``random.Random``. The shell feeds it ticks, peer messages and
proposals, and carries out each ``Ready`` in the order its docstring fixes (persist, send,
apply, ``advance``). All messages wait for the Ready, so nothing leaves before the state
it depends on is durable (synchronous mode; research/control-plane.md §1).

Owns: term, vote, role and known leader; elections (Raft §5.2) with a randomized timeout
in [election_ticks, election_ticks + jitter) (jitter: election_ticks unless set);
pre-vote (thesis §9.6, etcd semantics incl. #8288 and #8334); check-quorum and leader
stickiness (§6.2, §4.2.3); the restarted-voter quiet period; replication with probing
and backtracking (§5.3); commitment by counting only current-term entries (§5.4.2);
snapshots sent to laggards and installed (ch. 5); single-server membership changes
adopted on append (§4.1, with the 2015 fix); the leader lease (§6.4.1, in this node's
ticks).

Must not know: what entries mean (data is opaque; CONF entries carry a ``ConfState``),
the disk, the network, the wall clock, node names (ids are opaque strings).

Transitions (``step``), after the term rules of ``_check_term``:

    role           message                      effect
    any            VOTE / PRE_VOTE              grant iff log up to date and allowed
    follower       APP / HEARTBEAT / SNAP       leader := src, reset election timer
    (pre)candidate APP / HEARTBEAT / SNAP       become follower of src (same term)
    pre_candidate  PRE_VOTE_RESP (term+1)       count; majority -> candidate
    candidate      VOTE_RESP                    count; majority -> leader
    leader         APP_RESP / HEARTBEAT_RESP    progress, commit, lease

Peer input: a message for another node, from itself, at term 0, or whose indexes do not
fit the log is ignored; a response from a node outside the configuration is ignored;
requests are judged by Raft's rules alone (a vote needs the requester's config, not ours).

Invariants:
- at most one vote per term, and term/vote reach ``Ready.hard_state`` (must_sync) in the
  same Ready as any message that depends on them;
- a pre-vote changes no term or vote on either side;
- the leader commits by counting only entries of its own term; committed entries are
  never truncated (a peer asking for it is ignored);
- at most one uncommitted CONF entry, and none before an own-term entry committed;
- ``lease_valid()`` implies check-quorum is on, this node is leader, has committed an
  entry of its term, and a majority acked a heartbeat sent < lease_ratio*election_ticks ago.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from node.control.raft_log import RaftLog
from node.control.raft_types import (
    ConfState,
    Entry,
    EntryKind,
    HardState,
    Message,
    MessageType,
    PersistedState,
    Ready,
    Role,
    Snapshot,
    SoftState,
)

MT = MessageType
LEADER_TO_FOLLOWER = frozenset({MT.APP, MT.HEARTBEAT, MT.SNAP})
RESPONSES = frozenset({MT.APP_RESP, MT.HEARTBEAT_RESP, MT.VOTE_RESP, MT.PRE_VOTE_RESP})
KEPT_ROUNDS = 64  # heartbeat rounds remembered for lease accounting


class Rng(Protocol):
    """The randomness the core needs (a ``random.Random`` fits)."""

    def randrange(self, stop: int, /) -> int: ...


@dataclass(frozen=True)
class RaftConfig:
    """Timing (in ticks) and switches; see the module docstring."""

    election_ticks: int = 10
    heartbeat_ticks: int = 1
    election_jitter_ticks: int = 0  # timeout in [T, T + jitter); 0: jitter = T, as etcd
    pre_vote: bool = True
    check_quorum: bool = True
    lease_ratio: float = 0.9
    max_entries_per_msg: int = 64
    max_uncommitted_entries: int = 1024

    def __post_init__(self) -> None:
        if not 0 < self.heartbeat_ticks < self.election_ticks:
            raise ValueError("need 0 < heartbeat_ticks < election_ticks")
        if not 0 < self.lease_ratio < 1:
            raise ValueError("lease_ratio must be in (0, 1)")
        if self.election_jitter_ticks < 0:
            raise ValueError("election_jitter_ticks must be >= 0")
        if self.max_entries_per_msg < 1 or self.max_uncommitted_entries < 1:
            raise ValueError("message and uncommitted limits must be positive")


class NotLeader(Exception):
    """A proposal reached a node that is not the leader; ``leader`` is the known one."""

    def __init__(self, leader: str | None) -> None:
        super().__init__(f"not the leader (leader: {leader})")
        self.leader = leader


class ProposalDropped(Exception):
    """The leader refused a proposal for now (a pending conf change, too many uncommitted
    entries, no own-term commit yet, or the leader is being removed)."""


@dataclass
class _Progress:
    """The leader's view of one peer (etcd's tracker.Progress, without inflight limits)."""

    match: int
    next: int
    probing: bool = True  # probe: one message per heartbeat until a match is found
    paused: bool = False
    recent_active: bool = False


class RawNode:
    """One Raft participant. See the module docstring and ``Ready``."""

    def __init__(
        self,
        node_id: str,
        config: RaftConfig,
        rng: Rng,
        state: PersistedState,
        *,
        applied: int = 0,
    ) -> None:
        if not node_id:
            raise ValueError("a node id is a non-empty string")
        self._id = node_id
        self._cfg = config
        self._rng = rng
        self._log = RaftLog(state)
        self._log.applied = min(max(applied, self._log.offset), self._log.committed)
        hs = state.hard_state
        self._term, self._vote = hs.term, hs.vote
        self._role = Role.FOLLOWER
        self._lead: str | None = None
        self._msgs: list[Message] = []
        self._votes: dict[str, bool] = {}
        self._progress: dict[str, _Progress] = {}
        self._ticks = 0
        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        self._timeout = config.election_ticks
        self._reset_timer()
        # A restarted voter may have helped elect a leader whose lease still holds.
        self._quiet_until = config.election_ticks if hs.term > 0 else 0
        self._round = 0
        self._round_sent: dict[int, int] = {}
        self._round_acks: dict[int, set[str]] = {}
        self._lease_from: int | None = None
        self._prev_hs = self.hard_state()
        self._prev_ss = self.soft_state()
        self._pending: Ready | None = None
        self._leader_start = 0  # index of this leader's no-op

    # -- state read by the shell ----------------------------------------------------------

    @property
    def id(self) -> str:
        return self._id

    @property
    def term(self) -> int:
        return self._term

    @property
    def vote(self) -> str | None:
        return self._vote

    @property
    def role(self) -> Role:
        return self._role

    @property
    def leader(self) -> str | None:
        return self._lead

    @property
    def commit_index(self) -> int:
        return self._log.committed

    @property
    def applied_index(self) -> int:
        return self._log.applied

    @property
    def conf(self) -> ConfState:
        return self._log.conf

    def hard_state(self) -> HardState:
        return HardState(self._term, self._vote, self._log.committed)

    def soft_state(self) -> SoftState:
        return SoftState(self._lead, self._role)

    def progress(self) -> dict[str, tuple[int, int]]:
        """Leader: peer id -> (match, next), itself included; {} otherwise."""
        return {k: (p.match, p.next) for k, p in sorted(self._progress.items())}

    def lease_valid(self) -> bool:
        """True while this leader may act alone (see the module invariants)."""
        if self._role is not Role.LEADER or self._lease_from is None:
            return False
        if not self._cfg.check_quorum or not self._committed_own_term():
            return False
        return self._ticks < self._lease_from + self._cfg.lease_ratio * self._cfg.election_ticks

    def lease_from(self) -> int | None:
        """The tick the current lease counts from (the send tick of the latest heartbeat
        round a majority acknowledged), while ``lease_valid()``; else None. A shell whose
        ticks can fall behind real time maps it to the real time of that tick."""
        return self._lease_from if self.lease_valid() else None

    # -- inputs ---------------------------------------------------------------------------

    def tick(self) -> None:
        """One unit of logical time."""
        self._ticks += 1
        self._election_elapsed += 1
        if self._role is Role.LEADER:
            self._tick_leader()
        elif self._election_elapsed >= self._timeout and self._promotable():
            self._hup()

    def campaign(self) -> None:
        """Start an election now (a pre-vote first when enabled)."""
        if self._role is not Role.LEADER and self._promotable():
            self._hup()

    def propose(self, data: bytes) -> int:
        """Append an application command; returns its index.

        Raises:
            NotLeader: this node is not the leader.
            ProposalDropped: too many uncommitted entries, or this leader is being removed.
        """
        self._check_can_propose()
        return self._append_own(Entry(0, 0, EntryKind.NORMAL, bytes(data)))

    def propose_conf_change(self, conf: ConfState) -> int:
        """Append a single-server configuration change (thesis §4.1); returns its index.

        Raises:
            NotLeader: this node is not the leader.
            ValueError: ``conf`` is not one voter/learner added, removed or promoted.
            ProposalDropped: a conf entry is uncommitted, or no own-term entry committed.
        """
        self._check_can_propose()
        _check_single_change(self._log.conf, conf)
        if self._log.conf_index > self._log.committed:
            raise ProposalDropped("a configuration change is still uncommitted")
        if not self._committed_own_term():
            raise ProposalDropped("no entry of this leader's term is committed yet")
        return self._append_own(Entry(0, 0, EntryKind.CONF, b"", conf))

    def compact(self, index: int, data: bytes) -> Snapshot:
        """Take the application's snapshot ``data`` of its state at ``index`` (<= applied).

        Returns:
            The snapshot; the shell persists it. The core drops entries <= index.
        Raises:
            ValueError: ``index`` is not in (current snapshot index, applied].
        """
        return self._log.compact(index, data)

    def step(self, msg: Message) -> None:
        """Take one message from a peer; never raises on bad input (it is ignored)."""
        if msg.dst != self._id or msg.src == self._id or msg.term == 0:
            return
        if msg.type in RESPONSES and msg.src not in self._members():
            return
        if not self._check_term(msg):
            return
        if msg.type in (MT.VOTE, MT.PRE_VOTE):
            self._handle_vote_request(msg)
        elif self._role is Role.LEADER:
            self._step_leader(msg)
        elif msg.type in LEADER_TO_FOLLOWER:
            if self._role is not Role.FOLLOWER or self._lead != msg.src:
                self._become_follower(msg.term, msg.src)
            self._election_elapsed = 0
            self._step_follower(msg)
        elif (self._role, msg.type) in (
            (Role.PRE_CANDIDATE, MT.PRE_VOTE_RESP),
            (Role.CANDIDATE, MT.VOTE_RESP),
        ):
            self._count_vote(msg)

    # -- outputs --------------------------------------------------------------------------

    def has_ready(self) -> bool:
        log = self._log
        return bool(
            self.soft_state() != self._prev_ss
            or self.hard_state() != self._prev_hs
            or self._msgs
            or log.unstable()
            or log.pending_snapshot is not None
            or log.committed > self._apply_from()
        )

    def ready(self) -> Ready:
        """The next batch of work; see ``Ready``. Raises RuntimeError if one is pending."""
        if self._pending is not None:
            raise RuntimeError("ready() called twice without advance()")
        log = self._log
        hs, ss = self.hard_state(), self.soft_state()
        rd = Ready(
            soft_state=ss if ss != self._prev_ss else None,
            hard_state=hs if hs != self._prev_hs else None,
            entries=log.unstable(),
            snapshot=log.pending_snapshot,
            committed_entries=log.between(self._apply_from(), log.committed),
            messages=self._msgs,
        )
        rd.must_sync = bool(
            rd.entries
            or rd.snapshot is not None
            or (hs.term, hs.vote) != (self._prev_hs.term, self._prev_hs.vote)
        )
        self._msgs = []
        self._pending = rd
        return rd

    def advance(self, ready: Ready) -> None:
        """The shell carried out ``ready`` (the one last returned by ``ready()``)."""
        if ready is not self._pending:
            raise RuntimeError("advance() needs the Ready last returned by ready()")
        self._pending = None
        log = self._log
        if ready.soft_state is not None:
            self._prev_ss = ready.soft_state
        if ready.hard_state is not None:
            self._prev_hs = ready.hard_state
        if ready.snapshot is not None:
            if log.pending_snapshot is ready.snapshot:
                log.pending_snapshot = None
            log.applied = max(log.applied, ready.snapshot.meta.index)
        if ready.entries:
            log.stable_to(ready.entries[-1])
        if ready.committed_entries:
            log.applied = max(log.applied, ready.committed_entries[-1].index)

    # -- time -----------------------------------------------------------------------------

    def _tick_leader(self) -> None:
        self._heartbeat_elapsed += 1
        if self._election_elapsed >= self._cfg.election_ticks:
            self._election_elapsed = 0
            if self._cfg.check_quorum and not self._quorum_active():
                self._become_follower(self._term, None)
                return
        if self._heartbeat_elapsed >= self._cfg.heartbeat_ticks:
            self._heartbeat_elapsed = 0
            self._broadcast_heartbeat()

    def _quorum_active(self) -> bool:
        active = {k for k, p in self._progress.items() if p.recent_active or k == self._id}
        for p in self._progress.values():
            p.recent_active = False
        return _has_quorum(self._log.conf.voters, active)

    def _reset_timer(self) -> None:
        self._election_elapsed = 0
        jitter = self._cfg.election_jitter_ticks or self._cfg.election_ticks
        self._timeout = self._cfg.election_ticks + self._rng.randrange(jitter)

    # -- roles ----------------------------------------------------------------------------

    def _promotable(self) -> bool:
        return self._id in self._log.conf.voters

    def _members(self) -> frozenset[str]:
        return self._log.conf.voters | self._log.conf.learners

    def _reset(self, term: int) -> None:
        if term != self._term:
            self._term, self._vote = term, None
        self._lead = None
        self._votes = {}
        self._progress = {}
        self._heartbeat_elapsed = 0
        self._lease_from = None
        self._round_sent, self._round_acks = {}, {}
        self._reset_timer()

    def _become_follower(self, term: int, lead: str | None) -> None:
        self._reset(term)
        self._role, self._lead = Role.FOLLOWER, lead

    def _hup(self) -> None:
        if self._cfg.pre_vote:
            self._reset(self._term)  # §9.6 and etcd #8334: forget the leader, keep term/vote
            self._role = Role.PRE_CANDIDATE
            self._request_votes(MT.PRE_VOTE, self._term + 1)
        else:
            self._campaign()

    def _campaign(self) -> None:
        self._reset(self._term + 1)
        self._role, self._vote = Role.CANDIDATE, self._id
        self._request_votes(MT.VOTE, self._term)

    def _request_votes(self, kind: MessageType, term: int) -> None:
        self._votes = {self._id: True}
        if self._tally() == 1:
            self._on_won()
            return
        for peer in sorted(self._log.conf.voters - {self._id}):
            self._send(
                kind, peer, term, log_term=self._log.last_term(), index=self._log.last_index()
            )

    def _tally(self) -> int:
        """1: won, -1: lost, 0: undecided."""
        voters = self._log.conf.voters
        granted = {k for k, v in self._votes.items() if v and k in voters}
        rejected = {k for k, v in self._votes.items() if not v and k in voters}
        if _has_quorum(voters, granted):
            return 1
        return -1 if not _has_quorum(voters, voters - rejected) else 0

    def _count_vote(self, msg: Message) -> None:
        if self._role is Role.PRE_CANDIDATE and msg.term != self._term + (0 if msg.reject else 1):
            return
        self._votes.setdefault(msg.src, not msg.reject)
        outcome = self._tally()
        if outcome == 1:
            self._on_won()
        elif outcome == -1:
            self._become_follower(self._term, None)

    def _on_won(self) -> None:
        if self._role is Role.PRE_CANDIDATE:
            self._campaign()
        else:
            self._become_leader()

    def _become_leader(self) -> None:
        self._reset(self._term)
        self._role, self._lead = Role.LEADER, self._id
        last = self._log.last_index()
        self._leader_start = last + 1
        for peer in self._members() | {self._id}:
            self._progress[peer] = _Progress(match=0, next=last + 1)
        self._append_own(Entry(0, 0))  # §5.4.2 / §8: commit an entry of this term first

    # -- votes ----------------------------------------------------------------------------

    def _check_term(self, msg: Message) -> bool:
        """Raft's term rules for every message; False: the message is dropped."""
        if msg.term > self._term:
            if msg.type in (MT.VOTE, MT.PRE_VOTE) and self._sticky():
                return False  # §4.2.3: a leader was heard within an election timeout
            if msg.type is MT.PRE_VOTE or (msg.type is MT.PRE_VOTE_RESP and not msg.reject):
                return True  # pre-votes never change terms
            self._become_follower(msg.term, msg.src if msg.type in LEADER_TO_FOLLOWER else None)
            return True
        if msg.term < self._term:
            if msg.type in (MT.APP, MT.HEARTBEAT):
                self._send(MT.APP_RESP, msg.src, self._term)  # lets a stale leader step down
            elif msg.type is MT.PRE_VOTE:
                self._send(MT.PRE_VOTE_RESP, msg.src, self._term, reject=True)
            return False
        return True

    def _sticky(self) -> bool:
        if self._ticks < self._quiet_until:
            return True
        heard = self._lead is not None and self._election_elapsed < self._cfg.election_ticks
        return self._cfg.check_quorum and heard

    def _handle_vote_request(self, msg: Message) -> None:
        pre = msg.type is MT.PRE_VOTE
        resp = MT.PRE_VOTE_RESP if pre else MT.VOTE_RESP
        may = (
            self._vote == msg.src
            or (self._vote is None and self._lead is None)
            or (pre and msg.term > self._term)
        )
        if may and self._log.is_up_to_date(msg.index, msg.log_term):
            self._send(resp, msg.src, msg.term)  # grants carry the request's term (#8288)
            if not pre:
                self._vote = msg.src
                self._election_elapsed = 0
        else:
            self._send(resp, msg.src, self._term, reject=True)

    # -- follower -------------------------------------------------------------------------

    def _step_follower(self, msg: Message) -> None:
        log = self._log
        if msg.type is MT.HEARTBEAT:
            log.commit_to(msg.commit)
            self._send(MT.HEARTBEAT_RESP, msg.src, self._term, context=msg.context)
        elif msg.type is MT.APP:
            self._handle_append(msg)
        elif msg.type is MT.SNAP and msg.snapshot is not None:
            self._handle_snapshot(msg, msg.snapshot)

    def _handle_append(self, msg: Message) -> None:
        log = self._log
        if msg.index < log.committed:
            self._send(MT.APP_RESP, msg.src, self._term, index=log.committed)
            return
        if not _well_formed(msg):
            return
        if not log.match_term(msg.index, msg.log_term):
            hint = min(msg.index, log.last_index())
            self._send(
                MT.APP_RESP, msg.src, self._term, index=msg.index, reject=True, reject_hint=hint
            )
            return
        if not log.append(msg.entries):
            return  # it would overwrite a committed entry: not a leader we can trust
        last_new = msg.index + len(msg.entries)
        log.commit_to(min(msg.commit, last_new))
        self._send(MT.APP_RESP, msg.src, self._term, index=last_new)

    def _handle_snapshot(self, msg: Message, snap: Snapshot) -> None:
        log = self._log
        meta = snap.meta
        if meta.index <= log.committed or meta.term > msg.term or meta.term == 0:
            self._send(MT.APP_RESP, msg.src, self._term, index=log.committed)
            return
        if log.match_term(meta.index, meta.term):
            log.commit_to(meta.index)  # it covers a prefix of our log: keep the rest (ch. 5)
        else:
            log.restore(snap)
        self._send(MT.APP_RESP, msg.src, self._term, index=log.last_index())

    # -- leader ---------------------------------------------------------------------------

    def _step_leader(self, msg: Message) -> None:
        pr = self._progress.get(msg.src)
        if pr is None:
            return
        if msg.type is MT.HEARTBEAT_RESP:
            pr.recent_active, pr.paused = True, False
            self._ack_round(msg.src, msg.context)
            if pr.match < self._log.last_index():
                self._send_append(msg.src)
        elif msg.type is MT.APP_RESP:
            pr.recent_active = True
            if msg.reject:
                self._on_reject(msg.src, pr, msg)
            elif pr.match < msg.index <= self._log.last_index():
                pr.match, pr.next = msg.index, max(pr.next, msg.index + 1)
                pr.probing = pr.paused = False
                if self._maybe_commit():
                    self._broadcast_append()
                elif pr.next <= self._log.last_index():
                    self._send_append(msg.src)
            elif pr.paused and msg.index <= pr.match:
                pr.paused = False

    def _on_reject(self, peer: str, pr: _Progress, msg: Message) -> None:
        if pr.probing and msg.index != pr.next - 1:
            return  # a stale rejection
        if not pr.probing and msg.index <= pr.match:
            return
        pr.next = max(pr.match + 1, min(msg.index, msg.reject_hint + 1))
        pr.probing, pr.paused = True, False
        self._send_append(peer)

    def _send_append(self, peer: str) -> None:
        pr = self._progress.get(peer)
        if pr is None or pr.paused or peer == self._id:
            return
        log = self._log
        prev = pr.next - 1
        prev_term = log.term(prev)
        if prev_term is None and prev < log.offset and log.snapshot is not None:
            self._send(MT.SNAP, peer, self._term, snapshot=log.snapshot)
            pr.next, pr.probing, pr.paused = log.snapshot.meta.index + 1, True, True
            return
        if prev_term is None:
            pr.next, prev, prev_term = log.last_index() + 1, log.last_index(), log.last_term()
        entries = tuple(log.slice(pr.next, self._cfg.max_entries_per_msg))
        self._send(
            MT.APP,
            peer,
            self._term,
            log_term=prev_term,
            index=prev,
            entries=entries,
            commit=log.committed,
        )
        if pr.probing:
            pr.paused = True
        elif entries:
            pr.next = entries[-1].index + 1

    def _broadcast_append(self) -> None:
        for peer in sorted(self._progress):
            self._send_append(peer)

    def _broadcast_heartbeat(self) -> None:
        self._round += 1
        self._round_sent[self._round] = self._ticks
        self._round_acks[self._round] = set()
        self._round_sent.pop(self._round - KEPT_ROUNDS, None)
        self._round_acks.pop(self._round - KEPT_ROUNDS, None)
        self._ack_round(self._id, self._round)
        for peer, pr in sorted(self._progress.items()):
            if peer != self._id:
                commit = min(pr.match, self._log.committed)
                self._send(MT.HEARTBEAT, peer, self._term, commit=commit, context=self._round)

    def _ack_round(self, peer: str, round_: int) -> None:
        acks = self._round_acks.get(round_)
        if acks is None:
            return
        acks.add(peer)
        if _has_quorum(self._log.conf.voters, acks):
            sent = self._round_sent[round_]
            self._lease_from = max(self._lease_from or 0, sent)

    def _maybe_commit(self) -> bool:
        """§5.4.2: commit the majority-matched index if it is of this term."""
        voters = sorted(self._log.conf.voters)
        if not voters:
            return False
        matches = sorted((self._progress[v].match if v in self._progress else 0) for v in voters)
        index = matches[(len(matches) - 1) // 2]
        if self._log.term(index) != self._term or not self._log.commit_to(index):
            return False
        if self._id not in self._log.conf.voters and self._log.conf_index <= self._log.committed:
            self._become_follower(self._term, None)  # §4.2.2: removed, and it is committed
            return False
        return True

    def _committed_own_term(self) -> bool:
        """This leader's first entry (its no-op) is committed (an index, not a term test:
        a bootstrap snapshot may carry the term of the first election)."""
        return self._role is Role.LEADER and self._log.committed >= self._leader_start

    def _check_can_propose(self) -> None:
        if self._role is not Role.LEADER:
            raise NotLeader(self._lead)
        if self._id not in self._log.conf.voters:
            raise ProposalDropped("this leader is being removed")
        if self._log.last_index() - self._log.committed >= self._cfg.max_uncommitted_entries:
            raise ProposalDropped("too many uncommitted entries")

    def _append_own(self, entry: Entry) -> int:
        log = self._log
        index = log.last_index() + 1
        log.append([Entry(index, self._term, entry.kind, entry.data, entry.conf)])
        self._sync_progress()
        me = self._progress[self._id]
        me.match, me.next = index, index + 1
        self._maybe_commit()
        self._broadcast_append()
        return index

    def _sync_progress(self) -> None:
        """Track exactly the members of the latest config (plus this leader)."""
        last = self._log.last_index()
        wanted = self._members() | {self._id}
        for peer in list(self._progress):
            if peer not in wanted:
                del self._progress[peer]
        for peer in wanted - self._progress.keys():
            self._progress[peer] = _Progress(match=0, next=last, recent_active=True)

    # -- helpers --------------------------------------------------------------------------

    def _apply_from(self) -> int:
        snap = self._log.pending_snapshot
        return max(self._log.applied, snap.meta.index if snap is not None else 0)

    def _send(
        self,
        kind: MessageType,
        dst: str,
        term: int,
        *,
        log_term: int = 0,
        index: int = 0,
        entries: tuple[Entry, ...] = (),
        commit: int = 0,
        reject: bool = False,
        reject_hint: int = 0,
        snapshot: Snapshot | None = None,
        context: int = 0,
    ) -> None:
        self._msgs.append(
            Message(
                kind,
                self._id,
                dst,
                term,
                log_term,
                index,
                entries,
                commit,
                reject,
                reject_hint,
                snapshot,
                context,
            )
        )


def _has_quorum(voters: frozenset[str], ids: set[str] | frozenset[str]) -> bool:
    return bool(voters) and len(voters & ids) > len(voters) // 2


def _well_formed(msg: Message) -> bool:
    """APP entries follow ``index`` one by one, with terms in [log_term, msg.term]."""
    term = msg.log_term
    for k, e in enumerate(msg.entries):
        if e.index != msg.index + 1 + k or not term <= e.term <= msg.term:
            return False
        if (e.kind is EntryKind.CONF) != (e.conf is not None):
            return False
        term = e.term
    return msg.log_term <= msg.term


def _check_single_change(old: ConfState, new: ConfState) -> None:
    """ValueError unless ``new`` differs from ``old`` in exactly one node's standing, and
    that change is an add, a removal, or a learner's promotion (thesis §4.1)."""
    if new.voters & new.learners:
        raise ValueError("a node cannot be both voter and learner")
    if not new.voters:
        raise ValueError("a configuration needs a voter")

    def standing(conf: ConfState, node: str) -> str:
        return "voter" if node in conf.voters else "learner" if node in conf.learners else "none"

    changed = [
        n
        for n in old.voters | old.learners | new.voters | new.learners
        if standing(old, n) != standing(new, n)
    ]
    if len(changed) != 1:
        raise ValueError(f"a single-server change moves one node, not {len(changed)}")
    if (standing(old, changed[0]), standing(new, changed[0])) == ("voter", "learner"):
        raise ValueError("demoting a voter to learner is not a single-server change here")
