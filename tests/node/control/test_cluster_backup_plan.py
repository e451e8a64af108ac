"""The cluster backup's pure decisions: merge, the cut filter, names, request bodies and
the ``backup`` duty's skip rules (node/control/cluster_backup_plan.py)."""

from __future__ import annotations

from typing import Any, Literal

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
    check_base,
    check_name,
    duty_base,
    duty_step,
    last_success_ms,
    merge,
    parse,
    quorum_answered,
    read_quorum,
    replica_groups,
    schedule_change,
)
from storage.backup_manifest import OVERLAP_MS, lower_bound
from storage.backup_plan import Step, Taken, next_step
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


def test_an_incremental_keeps_ids_above_the_base_cut_minus_the_overlap() -> None:
    """The embedded incremental's rule (``lower_bound``): a version issued up to
    ``OVERLAP_MS`` before the base cut may have committed after the base read it, so it
    is held again; older ones are not; the cut and the marker still bound it."""
    base = 1_000_000
    walls = (base - OVERLAP_MS - 1, base - OVERLAP_MS, base - OVERLAP_MS + 1, base - 5,
             base + 3, base + 9, base + 20)  # fmt: skip
    source = {vid(w): "node1" for w in walls}
    plan = at_cut(Merged(None, source), vid(base + 9), since=vid(base))
    # the bound is below every id of its millisecond: base - OVERLAP_MS itself is held
    assert plan == {"node1": [vid(base - OVERLAP_MS), vid(base - OVERLAP_MS + 1), vid(base - 5),
                              vid(base + 3), vid(base + 9)]}  # fmt: skip
    marked = at_cut(Merged(marker(base - 5), source), vid(base + 20), since=vid(base))
    assert marked == {"node1": [vid(base + 3), vid(base + 9), vid(base + 20)]}
    assert at_cut(Merged(None, source), vid(base + 20), since=None) == at_cut(
        Merged(None, source), vid(base + 20)
    )  # no base: a full backup


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


walls = st.integers(1, 200_000)


@given(st.dictionaries(st.sampled_from(["node1", "node2"]),
                       st.builds(ReplicaState, st.frozensets(walls.map(vid), max_size=10),
                                 st.none() | walls.map(marker)), min_size=1),
       walls, walls)  # fmt: skip
def test_an_incremental_is_the_full_backup_above_the_lower_bound(
    replicas: dict[str, ReplicaState], cut: int, since: int
) -> None:
    merged = merge(replicas)
    low = lower_bound(vid(since))
    assert low is not None
    full = at_cut(merged, vid(cut))
    incr = at_cut(merged, vid(cut), vid(since))
    expected = {
        source: kept
        for source, found in full.items()
        if (kept := [v for v in found if VersionId.parse(v) > low])
    }
    assert incr == expected


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
    none = {"since": None, "since_cluster": None}
    assert parse("backup.create", {}) == {"recipients": [], "with_keys": False, **none}
    body = {"recipients": [RECIPIENT], "with_keys": True}
    assert parse("backup.create_leader", body) == {
        "recipients": [RECIPIENT], "with_keys": True, **none,
    }  # fmt: skip
    since = {"since": vid(5), "since_cluster": "cluster-a"}
    assert parse("backup.create", since) == {"recipients": [], "with_keys": False, **since}
    assert parse("backup.create", {"since": vid(5)})["since"] == vid(5)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"recipients": "age1x"}, "recipients"),
        ({"recipients": ["not-a-recipient"]}, "recipients"),
        ({"recipients": [RECIPIENT] * (MAX_RECIPIENTS + 1)}, "recipients"),
        ({"with_keys": "yes"}, "with_keys"),
        ({"since": "yesterday"}, "since"),
        ({"since": 12}, "since"),
        ({"since_cluster": "cluster-a"}, "since"),  # a base's cluster without its cut
        ({"since": vid(5), "since_cluster": 7}, "since"),
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


def test_a_base_must_be_this_clusters_and_before_the_cut() -> None:
    check_base(None, None, "cluster-a", vid(10))  # a full backup
    check_base(vid(5), "cluster-a", "cluster-a", vid(10))
    check_base(vid(5), None, "cluster-a", vid(10))  # the client did not say whose
    for since, owner in ((vid(5), "cluster-b"), (vid(10), "cluster-a"), (vid(11), None)):
        with pytest.raises(InvalidPayload) as caught:
            check_base(since, owner, "cluster-a", vid(10))
        assert caught.value.field == "since"


def test_the_duty_takes_incrementals_between_fulls_from_its_own_sidecars() -> None:
    """``[backup] incremental = 2``: full, incr, incr, full, ... over the leader's own
    directory; a base whose sidecar is missing, foreign or without a cut: a full one."""
    taken: list[Taken] = []
    kinds = []
    for number in range(7):
        step = next_step(taken, 2)
        cut = duty_base(step, (vid(number), "cluster-a"), "cluster-a")
        kind: Literal["full", "incremental"] = "full" if cut is None else "incremental"
        if cut is not None:
            assert step.since == taken[-1].file
            assert cut == vid(number)
        kinds.append(kind)
        taken.append(Taken(f"b{number}", kind, number * 1000))
    assert kinds == ["full", "incremental", "incremental", "full", "incremental",
                     "incremental", "full"]  # fmt: skip
    assert next_step([], 2) == Step("full", None)  # a new leader without the files
    assert next_step(taken[:2], 0) == Step("full", None)  # incremental = 0: every one full
    due = next_step(taken[:1], 2)
    assert due == Step("incremental", "b0")
    assert duty_base(due, None, "cluster-a") is None  # no sidecar that belongs to b0
    assert duty_base(due, (vid(1), "cluster-b"), "cluster-a") is None  # another cluster's
    assert duty_base(due, (None, "cluster-a"), "cluster-a") is None  # no cut
    assert duty_base(Step("full", None), (vid(1), "cluster-a"), "cluster-a") is None


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
