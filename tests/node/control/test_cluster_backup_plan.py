"""The cluster backup's pure decisions: merge, the cut filter, names, request bodies and
the ``backup`` duty's skip rules (node/control/cluster_backup_plan.py)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from node.cluster.antientropy import partitions_in
from node.cluster.ring import Ring, RingMember
from node.control.cluster_backup_plan import (
    MAX_RECIPIENTS,
    Merged,
    ReplicaState,
    at_cut,
    backup_name,
    check_name,
    duty_step,
    last_success_ms,
    merge,
    parse,
    quorum_answered,
    read_quorum,
    replica_groups,
    schedule_change,
)
from storage.errors import InvalidPayload
from storage.schema import PurgeMarker
from storage.versions import VersionId

RECIPIENT = "age1" + "q" * 58


def vid(wall: int, node: str = "n1") -> str:
    return str(VersionId(wall, 0, node))


def marker(wall: int) -> PurgeMarker:
    return PurgeMarker(vid(wall), wall, "admin")


def test_merge_is_the_union_with_the_larger_marker_and_the_newest_seal() -> None:
    a = ReplicaState(frozenset({vid(1), vid(2)}), marker(1), {vid(2): 3})
    b = ReplicaState(frozenset({vid(2), vid(4)}), marker(3), {vid(2): 5})
    c = ReplicaState(frozenset({vid(5)}), None)
    merged = merge({"node1": a, "node2": b, "node3": c})
    assert merged.marker == marker(3)
    assert merged.source == {vid(1): "node1", vid(2): "node2", vid(4): "node2", vid(5): "node3"}


def test_a_tie_in_seal_epoch_goes_to_the_preferred_then_the_first_replica_by_name() -> None:
    same = frozenset({vid(7)})
    merged = merge({"node3": ReplicaState(same), "node1": ReplicaState(same)})
    assert merged.source == {vid(7): "node1"}
    preferred = merge({"node3": ReplicaState(same), "node1": ReplicaState(same)}, "node3")
    assert preferred.source == {vid(7): "node3"}  # the leader reads its own copy
    newer = merge({"node3": ReplicaState(same), "node1": ReplicaState(same, None, {vid(7): 1})},
                  "node3")  # fmt: skip
    assert newer.source == {vid(7): "node1"}  # a newer seal beats the preference


def test_at_cut_keeps_ids_at_or_below_the_cut_and_above_the_marker_in_order() -> None:
    source = {vid(w): ("node1" if w % 2 else "node2") for w in (1, 2, 3, 4, 5, 9, 10)}
    plan = at_cut(Merged(marker(2), source), vid(9))
    assert plan == {"node1": [vid(3), vid(5), vid(9)], "node2": [vid(4)]}


def test_at_cut_without_a_marker_keeps_everything_up_to_the_cut() -> None:
    plan = at_cut(Merged(None, {vid(1): "a", vid(3): "a"}), vid(2))
    assert plan == {"a": [vid(1)]}


ids = st.frozensets(st.integers(1, 50).map(vid), max_size=8)
states = st.builds(ReplicaState, ids, st.none() | st.integers(1, 50).map(marker))


@given(st.dictionaries(st.sampled_from(["node1", "node2", "node3"]), states, min_size=1),
       st.integers(1, 60))  # fmt: skip
def test_merge_then_cut_never_returns_what_the_cut_or_a_marker_excludes(
    replicas: dict[str, ReplicaState], cut: int
) -> None:
    merged = merge(replicas)
    assert merged == merge(dict(reversed(list(replicas.items()))))  # order of replicas
    kept = [v for found in at_cut(merged, vid(cut)).values() for v in found]
    union = set().union(*(s.ids for s in replicas.values()))
    uppers = [VersionId.parse(s.marker.upto) for s in replicas.values() if s.marker]
    for v in kept:
        assert v in union
        assert VersionId.parse(v) <= VersionId.parse(vid(cut))
        assert all(VersionId.parse(v) > upto for upto in uppers)
    expected = {
        v for v in union
        if VersionId.parse(v) <= VersionId.parse(vid(cut))
        and all(VersionId.parse(v) > upto for upto in uppers)
    }  # fmt: skip
    assert set(kept) == expected


def test_a_quorum_needs_r_distinct_replicas() -> None:
    assert quorum_answered(["node1", "node2"], 2)
    assert not quorum_answered(["node1", "node1"], 2)
    assert not quorum_answered([], 1)


# -- names ----------------------------------------------------------------------------------


def test_backup_names_are_utc_stamps_and_never_reuse_a_taken_one() -> None:
    name = backup_name(1_700_000_000_123)
    assert name == "20231114T221320.123000Z.slurp-backup.age"
    assert backup_name(1_700_000_000_123, [name]) == "20231114T221320.123000Z-1.slurp-backup.age"
    assert check_name(name) == name
    assert check_name(backup_name(0, [backup_name(0)])).endswith("-1.slurp-backup.age")


@pytest.mark.parametrize(
    "bad",
    [
        "../20231114T221320.123000Z.slurp-backup.age",
        "/etc/passwd",
        "backups/20231114T221320.123000Z.slurp-backup.age",
        "20231114T221320.123000Z.slurp-backup.age.json",
        "20231114T221320.123000Z.slurp-backup.age/..",
        "",
        None,
        7,
    ],
)
def test_a_malformed_name_is_refused_naming_the_field(bad: object) -> None:
    with pytest.raises(InvalidPayload) as caught:
        check_name(bad)
    assert caught.value.field == "name"


# -- request bodies -----------------------------------------------------------------------------


def test_create_bodies_are_typed() -> None:
    assert parse("backup.create", {}) == {"recipients": [], "with_keys": False}
    body = {"recipients": [RECIPIENT], "with_keys": True}
    assert parse("backup.create_leader", body) == {"recipients": [RECIPIENT], "with_keys": True}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"recipients": "age1x"}, "recipients"),
        ({"recipients": ["not-a-recipient"]}, "recipients"),
        ({"recipients": [RECIPIENT] * (MAX_RECIPIENTS + 1)}, "recipients"),
        ({"with_keys": "yes"}, "with_keys"),
        ({"since": "01a22e682e1e-000000-n1"}, "since"),
    ],
)
def test_bad_create_bodies_name_their_field(body: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidPayload) as caught:
        parse("backup.create", body)
    assert caught.value.field == field


def test_read_bodies_validate_the_name_and_offset() -> None:
    name = backup_name(5_000)
    assert parse("backup.read", {"name": name}) == {"name": name, "offset": 0, "node": None}
    assert parse("backup.read_leader", {"name": name, "offset": 9, "node": "node2"}) == {
        "name": name, "offset": 9, "node": "node2",
    }  # fmt: skip
    cases: list[tuple[dict[str, Any], str]] = [
        ({"name": "../x"}, "name"),
        ({"name": name, "offset": -1}, "offset"),
        ({"name": name, "offset": True}, "offset"),
        ({"name": name, "node": "../node1"}, "node"),
        ({"name": name, "node": 3}, "node"),
    ]
    for body, field in cases:
        with pytest.raises(InvalidPayload) as caught:
            parse("backup.read", body)
        assert caught.value.field == field


# -- the duty ---------------------------------------------------------------------------------


def test_the_duty_takes_a_backup_only_in_a_cluster_with_a_schedule() -> None:
    assert duty_step(members=3, interval_s=3600) == "take"
    assert duty_step(members=1, interval_s=3600) == "skip_not_cluster"
    assert duty_step(members=0, interval_s=3600) == "skip_not_cluster"
    assert duty_step(members=3, interval_s=None) == "skip_no_schedule"


def test_the_leader_schedules_the_duty_at_its_configured_interval() -> None:
    assert schedule_change(None, 3600) == 3600  # not in the log yet
    assert schedule_change(86_400, 3600) == 3600  # the leader's schedule changed
    assert schedule_change(3600, 3600) is None
    assert schedule_change(3600, None) is None  # no schedule here: leave the log alone
    assert schedule_change(None, None) is None


def test_the_last_success_comes_from_the_log_or_the_directory() -> None:
    took = "20231114T221320.123000Z.slurp-backup.age: 10 versions, 0 pruned"
    assert last_success_ms(True, 5_000, 2, took, None) == 5_000  # a new leader: the log
    assert last_success_ms(True, 5_000, 2, took, 9_000) == 9_000
    assert last_success_ms(False, 5_000, 2, "503", 3_000) == 3_000  # the last run failed
    assert last_success_ms(False, 5_000, 2, "503", None) is None
    assert last_success_ms(True, 0, 0, "", None) is None  # never ran
    skipped = "skipped: skip_no_schedule"
    assert last_success_ms(True, 5_000, 2, skipped, None) is None  # a skip took none


def test_the_read_quorum_shrinks_with_a_small_cluster() -> None:
    assert read_quorum(2, 3) == 2
    assert read_quorum(2, 1) == 1  # a cluster of one member
    assert read_quorum(3, 2) == 2


def test_replica_groups_cover_every_partition_once_by_replica_set() -> None:
    ring = Ring([RingMember(f"node{i}") for i in range(1, 6)], vnodes=8)
    groups = replica_groups(ring.ranges(3), ring.partitions)
    seen = [p for _, parts in groups for p in parts]
    assert sorted(seen) == list(range(ring.partitions))  # every partition, once
    held_by = {
        p: set(replicas)
        for start, end, replicas in ring.ranges(3)
        for p in partitions_in(start, end, ring.partitions)
    }
    for replicas, parts in groups:
        assert list(replicas) == sorted(replicas)
        assert all(held_by[p] == set(replicas) for p in parts)
    assert len(groups) == len({frozenset(r) for r in held_by.values()})
    three = Ring([RingMember(f"node{i}") for i in range(1, 4)], vnodes=8)
    (only,) = replica_groups(three.ranges(3), three.partitions)  # N = members: one group
    assert only == (("node1", "node2", "node3"), list(range(three.partitions)))
