"""An interaction environment for the Raft core (etcd-io/raft's rafttest, our names).

It holds N ``RawNode``s, each with a fake disk (what its processed Readys persisted), an
applied sequence, and one shared network queue. ``Env.run(command, args)`` executes one
transcript command and returns its output; the transcript runner and the property test
both drive it. Messages from or to an isolated node are dropped when sent.

Commands (``tests/node/control/testdata/*.txt``):
  add-nodes N voters=(1,2,3) learners=() index=2 prevote=true checkquorum=true seed=0
  campaign ID | tick ID N | tick-election ID | tick-heartbeat ID
  process-ready ID... | deliver-msgs ID... [drop=(ID...)] | stabilize [ID...]
  propose ID DATA | propose-conf-change ID voters=(..) learners=(..) | compact ID INDEX
  restart ID | isolate ID | heal | status ID | raft-log ID

Without ``seed=`` the nodes' rng always draws 0, so the randomized election timeout is
exactly ``election_ticks`` (10) and ``tick-election`` fires an election: transcripts stay
readable. With ``seed=S`` node k draws from ``random.Random(S * 1000 + k)``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from node.control.raft import NotLeader, ProposalDropped, RaftConfig, RawNode
from node.control.raft_types import (
    ConfState,
    Entry,
    EntryKind,
    HardState,
    Message,
    MessageType,
    PersistedState,
    Ready,
    Snapshot,
    SnapshotMeta,
)

ELECTION_TICKS = 10
MSG_NAMES = {
    MessageType.VOTE: "MsgVote",
    MessageType.VOTE_RESP: "MsgVoteResp",
    MessageType.PRE_VOTE: "MsgPreVote",
    MessageType.PRE_VOTE_RESP: "MsgPreVoteResp",
    MessageType.APP: "MsgApp",
    MessageType.APP_RESP: "MsgAppResp",
    MessageType.HEARTBEAT: "MsgHeartbeat",
    MessageType.HEARTBEAT_RESP: "MsgHeartbeatResp",
    MessageType.SNAP: "MsgSnap",
}
WITH_LOG = frozenset(
    {MessageType.VOTE, MessageType.PRE_VOTE, MessageType.APP, MessageType.APP_RESP}
)


class ZeroRandom(random.Random):
    """An rng whose every ``randrange`` is 0 (fixed election timeouts in transcripts)."""

    def randrange(self, *args: object, **kwargs: object) -> int:
        return 0


def ids(ids_: set[str] | frozenset[str]) -> str:
    return "(" + ",".join(sorted(ids_, key=_id_key)) + ")"


def _id_key(node: str) -> tuple[int, str]:
    return (int(node), node) if node.isdigit() else (1 << 30, node)


def fmt_entry(e: Entry) -> str:
    if e.kind is EntryKind.CONF and e.conf is not None:
        conf = f"voters={ids(e.conf.voters)} learners={ids(e.conf.learners)}"
        return f"{e.term}/{e.index} EntryConf {conf}"
    return f'{e.term}/{e.index} EntryNormal "{e.data.decode(errors="replace")}"'


def fmt_snapshot(s: Snapshot) -> str:
    c = s.meta.conf
    return (
        f"Snapshot Index:{s.meta.index} Term:{s.meta.term} "
        f"Voters:{ids(c.voters)} Learners:{ids(c.learners)}"
    )


def fmt_msg(m: Message) -> str:
    out = f"{m.src}->{m.dst} {MSG_NAMES[m.type]} Term:{m.term}"
    if m.type in WITH_LOG:
        out += f" Log:{m.log_term}/{m.index}"
    if m.type in (MessageType.APP, MessageType.HEARTBEAT):
        out += f" Commit:{m.commit}"
    if m.context:
        out += f" Round:{m.context}"
    if m.reject:
        out += " Rejected"
        if m.type is MessageType.APP_RESP:
            out += f" (Hint: {m.reject_hint})"
    if m.entries:
        out += " Entries:[" + ", ".join(fmt_entry(e) for e in m.entries) + "]"
    if m.snapshot is not None:
        out += " " + fmt_snapshot(m.snapshot)
    return out


@dataclass
class Disk:
    """What a node's shell has persisted."""

    hard_state: HardState = field(default_factory=HardState)
    snapshot: Snapshot | None = None
    entries: list[Entry] = field(default_factory=list)


@dataclass
class Node:
    raw: RawNode
    config: RaftConfig
    rng: random.Random
    disk: Disk
    applied: list[str] = field(default_factory=list)
    cluster: str = ""  # nodes bootstrapped into one cluster share committed-entry checks


def applied_at(index: int, applied: list[str]) -> list[str]:
    return [a for a in applied if int(a.split("/")[1].split(" ")[0]) <= index]


def applied_text(e: Entry) -> str:
    return fmt_entry(e)


class Env:
    """N nodes, their disks and one network; see the module docstring."""

    def __init__(self) -> None:
        self.nodes: dict[str, Node] = {}
        self.queue: list[Message] = []
        self.isolated: set[str] = set()
        self.out: list[str] = []
        # Observations for invariant checks (the property test reads them).
        self.committed: dict[tuple[str, int], Entry] = {}
        self.leaders: dict[int, set[str]] = {}

    # -- plumbing -------------------------------------------------------------------------

    def say(self, line: str) -> None:
        self.out.append(line)

    def observe(self, node: Node) -> None:
        raw = node.raw
        if raw.role.value == "leader":
            self.leaders.setdefault(raw.term, set()).add(raw.id)

    def changes(self, node: Node, before: tuple[str, int, str | None], indent: str) -> None:
        raw = node.raw
        after = (raw.role.value, raw.term, raw.leader)
        self.observe(node)
        if after != before:
            self.say(f"{indent}{raw.id} is {after[0]} at term {after[1]}, leader {after[2]}")

    def state(self, node: Node) -> tuple[str, int, str | None]:
        return (node.raw.role.value, node.raw.term, node.raw.leader)

    def process_ready(self, nid: str) -> None:
        node = self.nodes[nid]
        raw = node.raw
        if not raw.has_ready():
            return
        rd = raw.ready()
        self.say(f"> {nid} handling Ready")
        self.print_ready(rd)
        self.persist(node, rd)
        for m in rd.messages:
            if m.src not in self.isolated and m.dst not in self.isolated:
                self.queue.append(m)
        if rd.snapshot is not None:
            node.applied = decode_applied(rd.snapshot.data)
        for e in rd.committed_entries:
            seen = self.committed.setdefault((node.cluster, e.index), e)
            assert seen == e, f"committed entries differ at {e.index}: {seen} vs {e}"
            node.applied.append(applied_text(e))
        raw.advance(rd)

    def print_ready(self, rd: Ready) -> None:
        say = self.say
        say(f"  Ready MustSync={str(rd.must_sync).lower()}:")
        if rd.soft_state is not None:
            say(f"  Lead:{rd.soft_state.leader} State:{rd.soft_state.role.value}")
        if rd.hard_state is not None:
            hs = rd.hard_state
            say(f"  HardState Term:{hs.term} Vote:{hs.vote} Commit:{hs.commit}")
        if rd.entries:
            say("  Entries:")
            for e in rd.entries:
                say(f"  {fmt_entry(e)}")
        if rd.snapshot is not None:
            say(f"  {fmt_snapshot(rd.snapshot)}")
        if rd.committed_entries:
            say("  CommittedEntries:")
            for e in rd.committed_entries:
                say(f"  {fmt_entry(e)}")
        if rd.messages:
            say("  Messages:")
            for m in rd.messages:
                cut = m.src in self.isolated or m.dst in self.isolated
                say(f"  {fmt_msg(m)}" + (" (dropped: isolated)" if cut else ""))

    @staticmethod
    def persist(node: Node, rd: Ready) -> None:
        disk = node.disk
        if rd.snapshot is not None:
            disk.snapshot = rd.snapshot
            disk.entries = []  # an installed snapshot replaces the whole log
        for e in rd.entries:
            disk.entries = [x for x in disk.entries if x.index < e.index] + [e]
        if rd.hard_state is not None:
            disk.hard_state = rd.hard_state

    def deliver(self, nid: str) -> int:
        mine = [m for m in self.queue if m.dst == nid]
        if not mine:
            return 0
        self.queue = [m for m in self.queue if m.dst != nid]
        self.say(f"> {nid} receiving messages")
        for m in mine:
            self.say(f"  {fmt_msg(m)}")
            self.step(nid, m, "    ")
        return len(mine)

    def step(self, nid: str, m: Message, indent: str = "  ") -> None:
        node = self.nodes.get(nid)
        if node is None:
            return
        before = self.state(node)
        node.raw.step(m)
        self.changes(node, before, indent)

    def tick(self, nid: str, n: int) -> None:
        node = self.nodes[nid]
        before = self.state(node)
        for _ in range(n):
            node.raw.tick()
            self.observe(node)
        self.changes(node, before, "  ")

    def stabilize(self, targets: list[str]) -> None:
        for _ in range(1000):
            busy = False
            for nid in targets:
                if self.nodes[nid].raw.has_ready():
                    self.process_ready(nid)
                    busy = True
            for nid in targets:
                busy = self.deliver(nid) > 0 or busy
            if not busy:
                return
        raise AssertionError("stabilize did not converge")

    # -- nodes ----------------------------------------------------------------------------

    def add_nodes(self, count: int, kw: dict[str, str]) -> None:
        voters = frozenset(parse_list(kw.get("voters", "()")))
        learners = frozenset(parse_list(kw.get("learners", "()")))
        index = int(kw.get("index", "0"))
        config = RaftConfig(
            election_ticks=ELECTION_TICKS,
            pre_vote=kw.get("prevote", "false") == "true",
            check_quorum=kw.get("checkquorum", "false") == "true",
            max_entries_per_msg=int(kw.get("max-entries", "64")),
        )
        for _ in range(count):
            nid = str(len(self.nodes) + 1)
            disk = Disk()
            if index:
                meta = SnapshotMeta(index, 1, ConfState(voters, learners))
                disk.snapshot = Snapshot(meta, b"")
            if "seed" in kw:
                rng: random.Random = random.Random(int(kw["seed"]) * 1000 + int(nid))
            else:
                rng = ZeroRandom()
            node = Node(self.boot(nid, config, rng, disk), config, rng, disk)
            node.cluster = min(voters, key=_id_key) if voters else nid
            self.nodes[nid] = node

    @staticmethod
    def boot(nid: str, config: RaftConfig, rng: random.Random, disk: Disk) -> RawNode:
        state = PersistedState(disk.hard_state, disk.snapshot, tuple(disk.entries))
        applied = disk.snapshot.meta.index if disk.snapshot is not None else 0
        return RawNode(nid, config, rng, state, applied=applied)

    def restart(self, nid: str) -> None:
        """Crash (lose all that no processed Ready persisted) and reload from the disk."""
        node = self.nodes[nid]
        node.raw = self.boot(nid, node.config, node.rng, node.disk)
        snap = node.disk.snapshot
        node.applied = decode_applied(snap.data) if snap is not None else []

    def compact(self, nid: str, index: int) -> Snapshot:
        node = self.nodes[nid]
        snap = node.raw.compact(index, encode_applied(applied_at(index, node.applied)))
        node.disk.snapshot = snap
        node.disk.entries = [e for e in node.disk.entries if e.index > index]
        return snap

    # -- commands -------------------------------------------------------------------------

    def run(self, command: str, args: list[str]) -> str:
        self.out = []
        pos = [a for a in args if "=" not in a]
        kw = dict(a.split("=", 1) for a in args if "=" in a)
        handler = getattr(self, "cmd_" + command.replace("-", "_"), None)
        if handler is None:
            raise ValueError(f"unknown command {command}")
        handler(pos, kw)
        return "\n".join(self.out) if self.out else "ok"

    def cmd_add_nodes(self, pos: list[str], kw: dict[str, str]) -> None:
        self.add_nodes(int(pos[0]), kw)

    def cmd_campaign(self, pos: list[str], kw: dict[str, str]) -> None:
        node = self.nodes[pos[0]]
        before = self.state(node)
        node.raw.campaign()
        self.changes(node, before, "")

    def cmd_tick(self, pos: list[str], kw: dict[str, str]) -> None:
        self.tick(pos[0], int(pos[1]) if len(pos) > 1 else 1)

    def cmd_tick_election(self, pos: list[str], kw: dict[str, str]) -> None:
        self.tick(pos[0], self.nodes[pos[0]].config.election_ticks)

    def cmd_tick_heartbeat(self, pos: list[str], kw: dict[str, str]) -> None:
        self.tick(pos[0], self.nodes[pos[0]].config.heartbeat_ticks)

    def cmd_process_ready(self, pos: list[str], kw: dict[str, str]) -> None:
        for nid in pos:
            self.process_ready(nid)

    def cmd_deliver_msgs(self, pos: list[str], kw: dict[str, str]) -> None:
        for nid in parse_list(kw.get("drop", "()")):
            for m in [m for m in self.queue if m.dst == nid]:
                self.say(f"dropped: {fmt_msg(m)}")
            self.queue = [m for m in self.queue if m.dst != nid]
        for nid in pos:
            self.deliver(nid)

    def cmd_stabilize(self, pos: list[str], kw: dict[str, str]) -> None:
        self.stabilize(pos or sorted(self.nodes, key=_id_key))

    def cmd_propose(self, pos: list[str], kw: dict[str, str]) -> None:
        try:
            self.say(f"index {self.nodes[pos[0]].raw.propose(pos[1].encode())}")
        except (NotLeader, ProposalDropped) as e:
            self.say(f"{type(e).__name__}: {e}")

    def cmd_propose_conf_change(self, pos: list[str], kw: dict[str, str]) -> None:
        conf = ConfState(
            frozenset(parse_list(kw.get("voters", "()"))),
            frozenset(parse_list(kw.get("learners", "()"))),
        )
        try:
            self.say(f"index {self.nodes[pos[0]].raw.propose_conf_change(conf)}")
        except (NotLeader, ProposalDropped, ValueError) as e:
            self.say(f"{type(e).__name__}: {e}")

    def cmd_compact(self, pos: list[str], kw: dict[str, str]) -> None:
        self.say(fmt_snapshot(self.compact(pos[0], int(pos[1]))))

    def cmd_restart(self, pos: list[str], kw: dict[str, str]) -> None:
        self.restart(pos[0])
        raw = self.nodes[pos[0]].raw
        self.say(f"{raw.id} restarted: term {raw.term} vote {raw.vote} commit {raw.commit_index}")

    def cmd_isolate(self, pos: list[str], kw: dict[str, str]) -> None:
        self.isolated.add(pos[0])
        self.queue = [m for m in self.queue if pos[0] not in (m.src, m.dst)]

    def cmd_heal(self, pos: list[str], kw: dict[str, str]) -> None:
        self.isolated.clear()

    def cmd_status(self, pos: list[str], kw: dict[str, str]) -> None:
        raw = self.nodes[pos[0]].raw
        self.say(
            f"term:{raw.term} role:{raw.role.value} lead:{raw.leader} vote:{raw.vote} "
            f"commit:{raw.commit_index} applied:{raw.applied_index} "
            f"lease:{str(raw.lease_valid()).lower()}"
        )
        self.say(f"voters:{ids(raw.conf.voters)} learners:{ids(raw.conf.learners)}")
        for peer, (match, nxt) in sorted(raw.progress().items(), key=lambda kv: _id_key(kv[0])):
            self.say(f"{peer}: match={match} next={nxt}")

    def cmd_raft_log(self, pos: list[str], kw: dict[str, str]) -> None:
        disk = self.nodes[pos[0]].disk
        if disk.snapshot is not None:
            self.say(fmt_snapshot(disk.snapshot))
        for e in disk.entries:
            self.say(fmt_entry(e))
        if disk.snapshot is None and not disk.entries:
            self.say("log is empty")


def parse_list(raw: str) -> list[str]:
    inner = raw.strip().removeprefix("(").removesuffix(")")
    return [p.strip() for p in inner.split(",") if p.strip()]


def encode_applied(applied: list[str]) -> bytes:
    return "\n".join(applied).encode()


def decode_applied(data: bytes) -> list[str]:
    return data.decode().split("\n") if data else []
