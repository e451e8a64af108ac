"""Version ids, the hybrid logical clock, and temporal navigation."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storage.address import Temporal
from storage.errors import CorruptRecord, TemporalOutOfRange
from storage.versions import (
    HybridLogicalClock,
    VersionId,
    VersionInfo,
    select,
    sibling_groups,
)


def test_version_id_round_trip_and_order() -> None:
    a = VersionId(1000, 0, "n1")
    b = VersionId(1000, 1, "n0")
    c = VersionId(1001, 0, "aa")
    assert VersionId.parse(str(a)) == a
    assert a < b < c
    assert sorted([str(c), str(a), str(b)]) == [str(a), str(b), str(c)]


@pytest.mark.parametrize(
    "bad", ["", "xyz", "0000-00-n", "00000000000g-000000-n1", "0" * 12 + "-000000-N!"]
)
def test_malformed_version_id(bad: str) -> None:
    with pytest.raises(CorruptRecord):
        VersionId.parse(bad)


@settings(max_examples=50)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=60))
def test_hlc_is_strictly_monotonic_when_the_wall_clock_stalls_or_jumps_back(
    steps: list[int],
) -> None:
    """Ids increase strictly whatever the wall clock does."""
    wall = [10_000]
    clock = HybridLogicalClock("n", lambda: wall[0])
    last = None
    for step in steps:
        wall[0] += step - 2  # may go backwards
        vid = clock.next_id()
        assert last is None or vid > last
        last = vid


def test_hlc_moves_past_observed_ids_and_resumes_from_last() -> None:
    clock = HybridLogicalClock("n", lambda: 5)
    clock.observe(VersionId(100, 7, "other"))
    assert clock.next_id() == VersionId(100, 8, "n")
    resumed = HybridLogicalClock("n", lambda: 5, clock.last)
    assert resumed.next_id() > clock.last


def _history(n: int) -> list[VersionInfo]:
    out = []
    parent = None
    for i in range(n):
        vid = VersionId(1000 * (i + 1), 0, "n")
        out.append(VersionInfo(vid, parent, 1000 * (i + 1), False))
        parent = vid
    return out


@pytest.mark.parametrize(
    ("temporal", "index"),
    [
        (Temporal("latest", None), 4),
        (Temporal("first", None), 0),
        (Temporal("version", 1), 0),
        (Temporal("version", 5), 4),
        (Temporal("back", 0), 4),
        (Temporal("back", 1), 3),
        (Temporal("back", 4), 0),
        (Temporal("forward", 0), 0),
        (Temporal("forward", 2), 2),
        (Temporal("instant", datetime.fromtimestamp(3.5, tz=UTC)), 2),
        (Temporal("instant", datetime.fromtimestamp(3.0, tz=UTC)), 2),
        (Temporal("instant", datetime.fromtimestamp(99, tz=UTC)), 4),
    ],
)
def test_select(temporal: Temporal, index: int) -> None:
    assert select(_history(5), temporal, where="x") == index


@pytest.mark.parametrize(
    "temporal",
    [
        Temporal("version", 6),
        Temporal("back", 5),
        Temporal("forward", 5),
        Temporal("instant", datetime.fromtimestamp(0.5, tz=UTC)),
    ],
)
def test_select_out_of_range_is_an_error_not_a_clamp(temporal: Temporal) -> None:
    with pytest.raises(TemporalOutOfRange):
        select(_history(5), temporal, where="x")


@given(n=st.integers(1, 30), k=st.integers(0, 40))
def test_back_and_forward_are_mirror_images(n: int, k: int) -> None:
    """~~k from the latest is ^^(n-1-k) from the first, and both agree on range."""
    hist = _history(n)
    if k < n:
        assert select(hist, Temporal("back", k), where="x") == select(
            hist, Temporal("forward", n - 1 - k), where="x"
        )
    else:
        with pytest.raises(TemporalOutOfRange):
            select(hist, Temporal("back", k), where="x")


def test_sibling_groups() -> None:
    root = VersionId(1, 0, "a")
    left = VersionId(2, 0, "a")
    right = VersionId(2, 0, "b")
    infos = [
        VersionInfo(root, None, 1, False),
        VersionInfo(left, root, 2, False),
        VersionInfo(right, root, 2, False),
    ]
    assert sibling_groups(infos) == {left: 2, right: 2}
