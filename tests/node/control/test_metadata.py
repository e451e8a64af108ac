"""node.control.metadata: the cluster-metadata state machine, its commands and snapshot codec."""

from __future__ import annotations

import re
from dataclasses import replace

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.control.metadata import (
    DEFAULT_DUTIES,
    TRANSITIONS,
    ClusterMetadata,
    Custody,
    Member,
    apply,
    apply_entry,
    bootstrap_state,
    cmd_custody,
    cmd_duty_finished,
    cmd_duty_progress,
    cmd_duty_schedule,
    cmd_duty_started,
    cmd_key_epoch,
    cmd_member_add,
    cmd_member_address,
    cmd_member_state,
    cmd_ring,
    decode_state,
    encode_command,
    encode_state,
)
from node.control.raft_types import ConfState, Entry, EntryKind, MalformedRaftData
from tests.node.control.metadata_fixtures import IDS, three_members, three_node_state

SETTINGS = settings(max_examples=150, deadline=None, derandomize=True)


def run(state: ClusterMetadata, *commands: bytes) -> ClusterMetadata:
    """Apply ``commands`` in order, each expected to succeed."""
    for data in commands:
        state, result = apply(state, state.applied_index + 1, data)
        assert result.ok, result.error
    return state


def refused(state: ClusterMetadata, data: bytes) -> str:
    """Apply ``data``, expect it refused or malformed with only applied_index moved; the error."""
    after, result = apply(state, state.applied_index + 1, data)
    assert not result.ok
    assert result.error is not None
    assert after == replace(state, applied_index=state.applied_index + 1)
    return result.error


def newcomer(node_id: str = "id-d", name: str = "node4", state: str = "joining") -> Member:
    return Member(node_id, name, state, "age1new", "10.0.0.4", 7004)


# -- bootstrap and queries --------------------------------------------------------------


def test_bootstrap_state_has_every_member_normal_on_ring_epoch_one() -> None:
    state = three_node_state()
    assert state.applied_index == 1
    assert state.ring.epoch == 1
    assert state.ring.vnodes == 64
    assert state.names() == {"id-a": "node1", "id-b": "node2", "id-c": "node3"}
    assert state.ring_members() == ("node1", "node2", "node3")
    assert state.ring_weights() == {"node1": 1, "node2": 1, "node3": 1}
    assert state.member_by_name("node2") == three_members()[1]
    assert state.member_by_name("node9") is None
    assert {n: d.interval_s for n, d in state.duties.items()} == dict(DEFAULT_DUTIES)
    assert all(d.last_term == 0 and not d.running for d in state.duties.values())


def test_bootstrap_refuses_duplicate_ids_names_and_foreign_holders() -> None:
    members = three_members()
    with pytest.raises(MalformedRaftData, match="duplicate node id"):
        bootstrap_state("c", [*members, members[0]], None, {})
    with pytest.raises(MalformedRaftData, match="share a name"):
        bootstrap_state("c", [*members, newcomer(name="node1", state="normal")], None, {})
    with pytest.raises(MalformedRaftData, match="holders"):
        bootstrap_state("c", members, Custody(1, 1, "age1x", {"id-z": 1}), {})


def test_state_values_are_read_only() -> None:
    state = three_node_state()
    with pytest.raises(TypeError):
        state.members["id-z"] = newcomer()  # type: ignore[index]


# -- the log rules ------------------------------------------------------------------------


def test_empty_entry_is_the_leaders_noop() -> None:
    state = three_node_state()
    after, result = apply(state, 2, b"")
    assert result.ok
    assert result.error is None
    assert after == replace(state, applied_index=2)


@pytest.mark.parametrize("index", [1, 3, 0, -1])
def test_an_index_that_skips_or_repeats_changes_nothing(index: int) -> None:
    state = three_node_state()
    after, result = apply(state, index, cmd_duty_schedule("backup", 60))
    assert after is state
    assert not result.ok
    assert "does not follow applied index 1" in (result.error or "")


def test_a_conf_entry_only_advances_the_applied_index() -> None:
    state = three_node_state()
    conf = ConfState(frozenset(IDS))
    data = cmd_duty_schedule("x", 1)
    after, result = apply_entry(state, Entry(2, 1, EntryKind.CONF, data, conf))
    assert result.ok
    assert after == replace(state, applied_index=2)
    after, result = apply_entry(state, Entry(2, 1, EntryKind.NORMAL, data))
    assert result.ok
    assert "x" in after.duties


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"\xc1", "malformed: command: does not decode"),
        (b"\x92\x01\x02", "malformed: command: expected a map"),
        (msgpack.packb({"op": 3}), "malformed: command.op: expected a string"),
        (encode_command("frobnicate"), "refused: unknown op 'frobnicate'"),
        (encode_command("member_state", node_id="id-a"), "malformed: command.state: missing"),
        (encode_command("member_state", node_id="id-a", state="gone"), "command.state: not one"),
        (encode_command("duty_schedule", name="x", interval_s=True), "command.interval_s"),
        (encode_command("duty_schedule", name="x", interval_s=0), "out of range"),
        (b"\x81\xc4\x01x\x01", "malformed"),  # a bytes key
    ],
)
def test_malformed_or_unknown_commands_are_refused_by_name(data: bytes, error: str) -> None:
    assert error in refused(three_node_state(), data)


# -- members and the ring -----------------------------------------------------------------


def test_adding_a_member_bumps_the_ring_epoch_but_it_routes_only_when_normal() -> None:
    state = run(three_node_state(), cmd_member_add(newcomer(), weight=2))
    assert state.ring.epoch == 2
    assert state.ring.weights["id-d"] == 2
    assert state.names()["id-d"] == "node4"
    assert "node4" not in state.ring_members()
    state = run(state, cmd_member_state("id-d", "normal"))
    assert state.ring.epoch == 3
    assert state.ring_weights()["node4"] == 2


def test_member_ids_are_never_reused_and_live_names_are_unique() -> None:
    state = three_node_state()
    assert "is or was a member" in refused(state, cmd_member_add(newcomer(node_id="id-a")))
    assert "taken" in refused(state, cmd_member_add(newcomer(name="node1")))
    assert "joining or normal" in refused(state, cmd_member_add(newcomer(state="leaving")))
    gone = run(state, cmd_member_state("id-a", "removed"))
    assert "is or was a member" in refused(gone, cmd_member_add(newcomer(node_id="id-a")))
    renamed = run(gone, cmd_member_add(newcomer(name="node1")))  # the name is free again
    assert renamed.member_by_name("node1") == newcomer(name="node1")


@pytest.mark.parametrize(
    ("start", "target"),
    [(s, t) for s in ("joining", "normal", "leaving") for t in sorted(TRANSITIONS)],
)
def test_member_state_follows_the_transition_table(start: str, target: str) -> None:
    state = run(three_node_state(), cmd_member_add(newcomer(state="joining")))
    if start == "normal":
        state = run(state, cmd_member_state("id-d", "normal"))
    elif start == "leaving":
        state = run(state, cmd_member_state("id-d", "normal"), cmd_member_state("id-d", "leaving"))
    data = cmd_member_state("id-d", target)
    if target in TRANSITIONS[start]:
        after = run(state, data)
        assert after.members["id-d"].state == target
        assert after.ring.epoch == state.ring.epoch + 1
    else:
        assert f"cannot go from {start} to {target}" in refused(state, data)


def test_removing_a_member_drops_its_weight_and_its_custody() -> None:
    state = run(three_node_state(), cmd_member_state("id-c", "leaving"))
    assert state.ring_members() == ("node1", "node2", "node3")  # leaving still routes
    state = run(state, cmd_member_state("id-c", "removed"))
    assert state.ring_members() == ("node1", "node2")
    assert set(state.ring.weights) == {"id-a", "id-b"}
    assert state.custody is not None
    assert dict(state.custody.holders) == {"id-a": 1, "id-b": 2}
    assert "no member 'id-c'" in refused(state, cmd_member_state("id-c", "normal"))
    assert "no member 'id-c'" in refused(state, cmd_member_address("id-c", "h", 1))


def test_member_address_changes_only_the_address() -> None:
    state = three_node_state()
    after = run(state, cmd_member_address("id-b", "10.1.1.1", 9000))
    assert after.members["id-b"] == replace(
        state.members["id-b"], rpc_host="10.1.1.1", rpc_port=9000
    )
    assert after.ring == state.ring
    assert "out of range" in refused(state, cmd_member_address("id-b", "h", 70000))


def test_ring_command_merges_weights_and_fences_on_the_epoch() -> None:
    state = three_node_state()
    after = run(state, cmd_ring(128, {"id-b": 3}, expect_epoch=1))
    assert after.ring.epoch == 2
    assert after.ring.vnodes == 128
    assert dict(after.ring.weights) == {"id-a": 1, "id-b": 3, "id-c": 1}
    assert "the ring is at epoch 2" in refused(after, cmd_ring(64, {}, expect_epoch=1))
    assert "no member 'id-z'" in refused(state, cmd_ring(64, {"id-z": 1}))
    assert "out of range" in refused(state, cmd_ring(64, {"id-a": 0}))


# -- keys and custody ---------------------------------------------------------------------


def test_key_epochs_only_move_forward() -> None:
    state = run(three_node_state(), cmd_key_epoch("observer", 2, "age1obs2", 99))
    assert state.key_epochs["observer"].version == 2
    assert state.key_epochs["observer"].recipient == "age1obs2"
    assert "at key version 2" in refused(state, cmd_key_epoch("observer", 2, "age1x", 100))
    assert "at key version 2" in refused(state, cmd_key_epoch("observer", 1, "age1x", 100))
    state = run(state, cmd_key_epoch("new_role", 1, "age1new", 100))
    assert set(state.key_epochs) == {"admin", "observer", "new_role"}


def test_custody_holders_must_be_members_and_numbers_fit_the_split() -> None:
    state = three_node_state()
    after = run(state, cmd_custody(Custody(1, 2, "age1admin2", {"id-a": 2, "id-c": 1})))
    assert after.custody == Custody(1, 2, "age1admin2", {"id-a": 2, "id-c": 1})
    assert "not a member" in refused(state, cmd_custody(Custody(1, 1, "a", {"id-z": 1})))
    assert "held twice" in refused(state, cmd_custody(Custody(1, 2, "a", {"id-a": 1, "id-b": 1})))
    assert "threshold" in refused(state, cmd_custody(Custody(3, 2, "a", {})))
    assert "holders" in refused(state, cmd_custody(Custody(1, 2, "a", {"id-a": 3})))


def test_custody_epochs_re_share_to_the_next_epoch_only() -> None:
    state = three_node_state()
    assert state.custody is not None
    assert state.custody.epoch == 0
    reshared = Custody(2, 2, "age1admin", {"id-a": 1, "id-b": 2}, epoch=1)
    after = run(state, cmd_custody(reshared))
    assert after.custody == reshared
    assert "epoch 1 is not the next epoch 2" in refused(after, cmd_custody(reshared))
    assert "epoch 3 is not the next epoch 2" in refused(
        after, cmd_custody(replace(reshared, epoch=3))
    )
    explicit_zero = encode_command(
        "custody", custody={"threshold": 1, "shares": 1, "admin_recipient": "a",
                            "holders": {}, "epoch": 0},
    )  # fmt: skip
    assert "epoch 0 is not the next epoch 1" in refused(state, explicit_zero)
    bad = encode_command("custody", custody={"threshold": 1, "shares": 1,
                                             "admin_recipient": "a", "holders": {},
                                             "epoch": "1"})  # fmt: skip
    assert "custody.epoch: expected an integer" in refused(state, bad)
    # the older form (no epoch) replaces the parameters and keeps the epoch
    legacy = run(after, cmd_custody(Custody(1, 2, "age1admin", {"id-a": 1})))
    assert legacy.custody is not None
    assert legacy.custody.epoch == 1


def test_a_removed_holder_leaves_the_holders_and_counts_as_lost() -> None:
    state = run(three_node_state(), cmd_member_state("id-c", "removed"))
    assert state.custody == Custody(2, 3, "age1admin", {"id-a": 1, "id-b": 2}, lost=1)
    assert decode_state(encode_state(state)) == state
    too_many = encode_command(
        "custody", custody={"threshold": 1, "shares": 2, "admin_recipient": "a",
                            "holders": {"id-a": 1}, "lost": 2},
    )  # fmt: skip
    assert "custody.lost: out of range [0, 1]" in refused(state, too_many)


def test_a_snapshot_without_custody_epochs_decodes_as_epoch_0() -> None:
    """The wire form written before custody epochs existed still decodes, to epoch 0, and
    a state never re-shared encodes to the very same bytes."""
    state = three_node_state()
    row = msgpack.unpackb(encode_state(state), raw=False)
    assert set(row["custody"]) == {"threshold", "shares", "admin_recipient", "holders"}
    assert decode_state(msgpack.packb(row)) == state
    reshared = run(state, cmd_custody(Custody(1, 1, "age1admin", {"id-a": 1}, epoch=1)))
    row = msgpack.unpackb(encode_state(reshared), raw=False)
    assert row["custody"]["epoch"] == 1
    assert decode_state(encode_state(reshared)) == reshared
    row["custody"]["epoch"] = -1
    with pytest.raises(MalformedRaftData, match=r"state\.custody\.epoch"):
        decode_state(msgpack.packb(row))


# -- duties -------------------------------------------------------------------------------


def test_a_duty_runs_start_progress_finish_under_one_term() -> None:
    state = three_node_state()
    state, result = apply(state, 2, cmd_duty_started("compaction", 4, 1_000))
    assert result.ok
    assert result.value == "start"
    duty = state.duties["compaction"]
    assert duty.running
    assert duty.last_term == 4
    assert duty.last_started_ms == 1_000
    state = run(state, cmd_duty_progress("compaction", 4, b"k/42"))
    assert state.duties["compaction"].cursor == b"k/42"
    state = run(state, cmd_duty_finished("compaction", 4, 2_000, False, "x" * 2000))
    duty = state.duties["compaction"]
    assert not duty.running
    assert duty.cursor == b""
    assert duty.last_finished_ms == 2_000
    assert not duty.last_ok
    assert duty.last_message == "x" * 512


def test_a_duty_is_fenced_by_term() -> None:
    state = run(three_node_state(), cmd_duty_started("ttl_sweep", 4, 1_000))
    assert "already runs under term 4" in refused(state, cmd_duty_started("ttl_sweep", 4, 2))
    assert "newer term 4" in refused(state, cmd_duty_started("ttl_sweep", 3, 2))
    assert "not running under term 3" in refused(state, cmd_duty_progress("ttl_sweep", 3, b"x"))
    assert "not running under term 5" in refused(
        state, cmd_duty_finished("ttl_sweep", 5, 2, True, "")
    )
    idle = three_node_state()
    assert "not running" in refused(idle, cmd_duty_progress("ttl_sweep", 1, b""))
    assert "no duty 'backup'" in refused(idle, cmd_duty_started("backup", 1, 0))


def test_a_new_leader_resumes_a_duty_its_predecessor_left_running() -> None:
    state = run(
        three_node_state(),
        cmd_duty_started("rotation_check", 4, 1_000),
        cmd_duty_progress("rotation_check", 4, b"half"),
    )
    state, result = apply(state, state.applied_index + 1, cmd_duty_started("rotation_check", 6, 9))
    assert result.ok
    assert result.value == "resume"
    duty = state.duties["rotation_check"]
    assert duty.running
    assert duty.last_term == 6
    assert duty.cursor == b"half"
    assert duty.last_started_ms == 1_000  # the schedule counts from the original start
    # the deposed leader's late entries commit after the takeover and change nothing
    assert "not running under term 4" in refused(
        state, cmd_duty_finished("rotation_check", 4, 5, True, "")
    )


def test_duty_schedule_adds_and_retimes() -> None:
    state = run(three_node_state(), cmd_duty_schedule("backup", 86400))
    assert state.duties["backup"].interval_s == 86400
    assert state.duties["backup"].last_term == 0
    state = run(state, cmd_duty_started("backup", 2, 5), cmd_duty_schedule("backup", 60))
    assert state.duties["backup"].interval_s == 60
    assert state.duties["backup"].running


# -- the snapshot codec -------------------------------------------------------------------


def test_state_round_trips_and_encodes_deterministically() -> None:
    state = run(
        three_node_state(),
        cmd_member_add(newcomer()),
        cmd_duty_started("ttl_sweep", 2, 7),
        cmd_duty_progress("ttl_sweep", 2, b"\x00\xff"),
    )
    data = encode_state(state)
    assert decode_state(data) == state
    assert encode_state(decode_state(data)) == data


def _tampered(**changes: object) -> bytes:
    row = msgpack.unpackb(encode_state(three_node_state()), raw=False)
    row.update(changes)
    return bytes(msgpack.packb(row, use_bin_type=True))


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (b"", "state: does not decode"),
        (b"\x01", "state: expected a map"),
        (_tampered(v=2), "state.v: schema 2"),
        (_tampered(cluster_id=5), "state.cluster_id"),
        (_tampered(members="x"), "state.members: expected a list"),
        (_tampered(members=[{"id": "a"}]), "state.members[0].state: missing"),
        (_tampered(ring={"epoch": 1, "vnodes": 0, "weights": {}}), "state.ring.vnodes"),
        (_tampered(ring={"epoch": 1, "vnodes": 8, "weights": {}}), "state.ring.weights: not"),
        (_tampered(duties=[{"name": "x"}]), "state.duties[0].interval_s: missing"),
        (_tampered(custody={"threshold": 1}), "state.custody.shares: missing"),
        (_tampered(key_epochs={"r": {"version": 0}}), "state.key_epochs.r.version"),
    ],
)
def test_decode_state_names_the_malformed_field(data: bytes, field: str) -> None:
    with pytest.raises(MalformedRaftData, match=f"^{re.escape(field)}"):
        decode_state(data)


# -- properties ---------------------------------------------------------------------------

_ids = st.sampled_from([*IDS, "id-d", "id-e", ""])
_names = st.sampled_from(["node1", "node4", "node5", "x" * 200])
_duty_names = st.sampled_from([*DEFAULT_DUTIES, "backup"])
_terms = st.integers(min_value=0, max_value=6)
_ms = st.integers(min_value=0, max_value=10**7)
_member_states = st.sampled_from([*TRANSITIONS, "bogus"])
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.text(max_size=8),
    st.binary(max_size=8),
)
_junk = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)

_commands = st.one_of(
    st.builds(
        lambda i, n, s, w: cmd_member_add(Member(i or "z", n, s, "age1r", "h", 1), w),
        _ids,
        _names,
        st.sampled_from(["joining", "normal", "leaving"]),
        st.integers(1, 3),
    ),
    st.builds(cmd_member_state, _ids, _member_states),
    st.builds(cmd_member_address, _ids, st.text(max_size=5), st.integers(0, 70000)),
    st.builds(
        cmd_ring,
        st.integers(0, 5000),
        st.dictionaries(_ids, st.integers(0, 4), max_size=3),
        st.none() | st.integers(0, 6),
    ),
    st.builds(
        cmd_key_epoch,
        st.sampled_from(["admin", "observer", "r"]),
        st.integers(0, 4),
        st.just("age1k"),
        _ms,
    ),
    st.builds(
        lambda t, s, h: cmd_custody(Custody(t, s, "age1admin", h)),
        st.integers(0, 4),
        st.integers(0, 4),
        st.dictionaries(_ids, st.integers(0, 4), max_size=3),
    ),
    st.builds(cmd_duty_schedule, _duty_names, st.integers(0, 100)),
    st.builds(cmd_duty_started, _duty_names, _terms, _ms),
    st.builds(cmd_duty_progress, _duty_names, _terms, st.binary(max_size=8)),
    st.builds(cmd_duty_finished, _duty_names, _terms, _ms, st.booleans(), st.text(max_size=8)),
    st.builds(
        lambda op, fields: encode_command(op, **fields),
        st.sampled_from(["member_add", "member_state", "ring", "custody", "duty_started", "x"]),
        st.dictionaries(
            st.sampled_from(["node_id", "member", "state", "name", "term", "weights", "custody"]),
            _junk,
        ),
    ),
    st.builds(lambda junk: bytes(msgpack.packb(junk)), _junk),
    st.binary(max_size=24),
)


@SETTINGS
@given(st.lists(_commands, max_size=25))
def test_any_command_sequence_applies_without_raising_deterministically_and_round_trips(
    log: list[bytes],
) -> None:
    """Applying any log never raises, gives the same state twice, and the state round-trips."""
    states = []
    for _ in range(2):
        state = three_node_state()
        for data in log:
            state, result = apply(state, state.applied_index + 1, data)
            assert result.ok == (result.error is None)
        states.append(state)
    assert states[0] == states[1]
    assert states[0].applied_index == 1 + len(log)
    assert decode_state(encode_state(states[0])) == states[0]
    assert encode_state(states[0]) == encode_state(states[1])


@SETTINGS
@given(st.integers(0, 10**6), st.integers(0, 255), st.binary(max_size=4))
def test_decode_state_of_damaged_data_raises_only_malformed_raft_data(
    at: int, byte: int, tail: bytes
) -> None:
    """A damaged snapshot decodes to a state that round-trips, or raises MalformedRaftData."""
    data = bytearray(encode_state(three_node_state()))
    data[at % len(data)] = byte
    outcome = _decode_or_error(bytes(data) + tail)
    if isinstance(outcome, str):
        assert outcome.startswith("state")
    else:
        assert decode_state(encode_state(outcome)) == outcome


def _decode_or_error(data: bytes) -> ClusterMetadata | str:
    try:
        return decode_state(data)
    except MalformedRaftData as exc:
        return str(exc)


# -- trusted signers (cluster up --restore) ------------------------------------------------


def test_trusted_signers_round_trip_and_an_old_snapshot_reads_as_none() -> None:
    """The founding list of trusted signers round-trips, sorted and distinct; a state
    without one encodes to the bytes it always did (no "trusted" key), and a snapshot
    written before the list existed decodes with none."""
    plain = three_node_state()
    row = msgpack.unpackb(encode_state(plain), raw=False)
    assert "trusted" not in row
    assert plain.trusted_signers == ()
    assert decode_state(msgpack.packb(row)) == plain
    keys = [bytes([9]) * 32, bytes([1]) * 32, bytes([9]) * 32]
    founded = bootstrap_state(
        "c0ffee", three_members(), plain.custody, plain.key_epochs, trusted_signers=keys
    )
    assert founded.trusted_signers == (bytes([1]) * 32, bytes([9]) * 32)
    assert decode_state(encode_state(founded)) == founded
    assert msgpack.unpackb(encode_state(founded), raw=False)["trusted"] == [
        bytes([1]) * 32,
        bytes([9]) * 32,
    ]
    # no command changes the list: it survives every entry applied after the bootstrap
    after = run(founded, cmd_member_state("id-c", "removed"))
    assert after.trusted_signers == founded.trusted_signers


def test_a_malformed_trusted_signer_is_named() -> None:
    row = msgpack.unpackb(encode_state(three_node_state()), raw=False)
    row["trusted"] = [bytes(32), b"short"]
    with pytest.raises(MalformedRaftData, match=r"state\.trusted\[1\]: not a raw Ed25519 key"):
        decode_state(msgpack.packb(row))
    row["trusted"] = "not a list"
    with pytest.raises(MalformedRaftData, match=r"state\.trusted: expected a list"):
        decode_state(msgpack.packb(row))


def test_the_cluster_trusts_its_members_keys_and_the_trusted_signers() -> None:
    """``signing_keys`` is what every node trusts: the members' keys (not removed ones;
    every one for a backup's signers list) and the founding trusted signers, which never
    become members."""
    members = [replace(m, signing_key=bytes([i]) * 32) for i, m in
               enumerate(three_members(), start=1)]  # fmt: skip
    old = bytes([7]) * 32
    state = bootstrap_state("c0ffee", members, None, {}, trusted_signers=[old, bytes([1]) * 32])
    assert state.signing_keys() == [bytes([1]) * 32, bytes([2]) * 32, bytes([3]) * 32, old]
    assert len(state.members) == 3
    assert old not in {m.signing_key for m in state.members.values()}
    removed = run(state, cmd_member_state("id-b", "removed"))
    assert removed.signing_keys() == [bytes([1]) * 32, bytes([3]) * 32, old]
    assert removed.signing_keys(removed=True) == state.signing_keys()
