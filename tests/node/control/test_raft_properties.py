"""Raft safety under random faults, robustness on bad peer input, and API edge cases."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.control.raft import NotLeader, RaftConfig, RawNode
from node.control.raft_types import (
    ConfState,
    Entry,
    HardState,
    Message,
    MessageType,
    PersistedState,
    Role,
    Snapshot,
    SnapshotMeta,
)
from tests.node.control.interaction import Env


def _cluster(env: Env, n: int, seed: int) -> list[str]:
    voters = ",".join(str(i) for i in range(1, n + 1))
    env.run("add-nodes", [str(n), f"voters=({voters})", "index=2", "prevote=true",
                          "checkquorum=true", f"seed={seed}"])  # fmt: skip
    return [str(i) for i in range(1, n + 1)]


def _check(env: Env) -> None:
    for term, leaders in env.leaders.items():
        assert len(leaders) <= 1, f"two leaders in term {term}: {leaders}"
    seqs = sorted((n.applied for n in env.nodes.values()), key=len)
    for shorter, longer in itertools.pairwise(seqs):
        assert longer[: len(shorter)] == shorter, "applied sequences diverge"


@settings(max_examples=30, derandomize=True, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(3, 5))
def test_random_faults_keep_raft_safe(seed: int, n: int) -> None:
    """Under drops, reorders, crashes and compactions: one leader per term, committed
    entries agree by index, applied sequences are prefixes of each other."""
    rng = random.Random(seed)
    env = Env()
    ids = _cluster(env, n, seed)
    proposed = 0
    for _ in range(600):
        roll = rng.random()
        nid = rng.choice(ids)
        if roll < 0.35:
            env.tick(nid, 1)
        elif roll < 0.6:
            env.process_ready(nid)
        elif roll < 0.85 and env.queue:
            m = env.queue.pop(rng.randrange(len(env.queue)))  # reorder
            if rng.random() > 0.1:  # drop 10%
                env.step(m.dst, m)
        elif roll < 0.92:
            raw = env.nodes[nid].raw
            if raw.role is Role.LEADER:
                proposed += 1
                raw.propose(f"p{proposed}".encode())
        elif roll < 0.96:
            node = env.nodes[nid]
            snap = node.disk.snapshot
            if snap is not None and node.raw.applied_index > snap.meta.index + 2:
                env.compact(nid, node.raw.applied_index - 1)
        elif roll < 0.98:
            env.restart(nid)  # loses whatever no processed Ready persisted
        _check(env)
    # heal: a quiet network with ticks makes progress; safety still holds
    for k in range(300):
        for nid in ids:
            env.tick(nid, 1)
            raw = env.nodes[nid].raw
            if raw.role is Role.LEADER and k % 10 == 0:
                raw.propose(f"h{k}".encode())
        env.stabilize(ids)
        _check(env)
    assert any(env.leaders.values()), "no leader was ever elected"
    assert len({n.raw.commit_index for n in env.nodes.values()}) == 1, "no convergence"


def _bootstrapped(node_id: str = "1", term: int = 0) -> RawNode:
    snap = Snapshot(SnapshotMeta(2, 1, ConfState(frozenset({"1", "2", "3"}))))
    state = PersistedState(HardState(term, None, 2), snap, ())
    return RawNode(node_id, RaftConfig(), random.Random(1), state)


MESSAGES = st.builds(
    Message,
    type=st.sampled_from(list(MessageType)),
    src=st.sampled_from(["1", "2", "3", "9"]),
    dst=st.sampled_from(["1", "2"]),
    term=st.integers(0, 5),
    log_term=st.integers(0, 5),
    index=st.integers(0, 2**40),
    entries=st.lists(
        st.builds(Entry, index=st.integers(1, 8), term=st.integers(1, 5)), max_size=3
    ).map(tuple),
    commit=st.integers(0, 2**40),
    reject=st.booleans(),
    reject_hint=st.integers(0, 2**40),
    context=st.integers(0, 10),
)


@settings(max_examples=200, derandomize=True, deadline=None)
@given(msgs=st.lists(MESSAGES, max_size=20), leader=st.booleans())
def test_bad_peer_input_never_raises(msgs: list[Message], leader: bool) -> None:
    """Any message sequence is handled or ignored; commit never passes the log's end."""
    node = _bootstrapped()
    if leader:
        node.campaign()
        for peer in ("2", "3"):
            node.step(Message(MessageType.PRE_VOTE_RESP, peer, "1", 1))
        for peer in ("2", "3"):
            node.step(Message(MessageType.VOTE_RESP, peer, "1", 1))
        assert node.role is Role.LEADER
    for m in msgs:
        node.step(m)
        node.tick()
        if node.has_ready():
            node.advance(node.ready())
    assert node.commit_index <= node._log.last_index()


def test_ready_twice_without_advance_raises() -> None:
    """The Ready/advance handshake is strict."""
    node = _bootstrapped()
    node.campaign()
    node.ready()
    with pytest.raises(RuntimeError):
        node.ready()


def test_propose_on_follower_names_the_leader() -> None:
    """NotLeader carries the known leader."""
    node = _bootstrapped("2")
    node.step(Message(MessageType.HEARTBEAT, "1", "2", 1))
    with pytest.raises(NotLeader) as caught:
        node.propose(b"x")
    assert caught.value.leader == "1"


def test_snapshot_covering_a_prefix_keeps_the_log() -> None:
    """Thesis ch. 5: a snapshot matching the follower's log only advances its commit."""
    node = _bootstrapped("2")
    entries = (Entry(3, 1), Entry(4, 1, data=b"a"), Entry(5, 1, data=b"b"))
    node.step(Message(MessageType.APP, "1", "2", 1, log_term=1, index=2, entries=entries))
    snap = Snapshot(SnapshotMeta(4, 1, ConfState(frozenset({"1", "2", "3"}))), b"s")
    node.step(Message(MessageType.SNAP, "1", "2", 1, snapshot=snap))
    rd = node.ready()
    assert rd.snapshot is None
    assert node.commit_index == 4
    assert [e.index for e in rd.entries] == [3, 4, 5]


def test_snapshot_not_matching_replaces_the_log() -> None:
    """A snapshot the follower's log does not match is installed; its log is dropped."""
    node = _bootstrapped("2")
    node.step(Message(MessageType.APP, "1", "2", 1, log_term=1, index=2, entries=(Entry(3, 1),)))
    snap = Snapshot(SnapshotMeta(6, 2, ConfState(frozenset({"1", "2", "3"}))), b"s")
    node.step(Message(MessageType.SNAP, "1", "2", 2, snapshot=snap))
    rd = node.ready()
    assert rd.snapshot == snap
    assert node.commit_index == 6
    node.advance(rd)
    assert node.applied_index == 6


def test_restarted_voter_refuses_higher_term_votes_for_one_timeout() -> None:
    """A voter restarted with term > 0 ignores (pre-)votes for election_ticks ticks."""
    node = _bootstrapped("2", term=3)
    vote = Message(MessageType.VOTE, "3", "2", 4, log_term=1, index=2)
    node.step(vote)
    assert node.term == 3
    for _ in range(RaftConfig().election_ticks - 1):
        node.tick()
    node.step(vote)
    assert node.term == 3
    node.tick()
    node.step(Message(MessageType.VOTE, "3", "2", 4, log_term=1, index=2))
    assert (node.term, node.vote) == (4, "3")


def test_single_server_change_rules() -> None:
    """Demotion and multi-node changes are refused with ValueError."""
    from node.control.raft import _check_single_change

    old = ConfState(frozenset({"1", "2", "3"}))
    _check_single_change(old, ConfState(frozenset({"1", "2", "3", "4"})))
    _check_single_change(old, ConfState(frozenset({"1", "2"})))
    with pytest.raises(ValueError, match="demoting"):
        _check_single_change(old, ConfState(frozenset({"1", "2"}), frozenset({"3"})))
    with pytest.raises(ValueError, match="not 2"):
        _check_single_change(old, ConfState(frozenset({"1"})))
