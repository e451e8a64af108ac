"""The replication core: quorum tracking, version-set merges, coverage merges."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from node.cluster.replication import (
    Outcome,
    Quorum,
    QuorumTracker,
    VersionSet,
    batches_by_bytes,
    lacking,
    merge_hits,
    merge_listings,
    merge_version_sets,
)
from storage.schema import PurgeMarker
from storage.views import ContextInfo, SearchResult


def vid(ms: int, node: str = "a") -> str:
    return f"{ms:012x}-000000-{node}"


def test_quorum_reached_and_failed() -> None:
    tracker = QuorumTracker(["a", "b", "c"], 2)
    assert tracker.record("a", True) is Outcome.PENDING
    assert tracker.record("b", False) is Outcome.PENDING
    assert tracker.record("c", True) is Outcome.REACHED
    failing = QuorumTracker(["a", "b", "c"], 2)
    failing.record("a", False)
    assert failing.record("b", False) is Outcome.FAILED
    with pytest.raises(ValueError, match="unexpected"):
        failing.record("b", True)


def test_quorum_overrides_are_validated() -> None:
    assert Quorum().override(w=3) == Quorum(3, 3, 2)
    with pytest.raises(ValueError, match="r=4"):
        Quorum().override(r=4)


def test_merge_is_a_union_minus_what_a_purge_covers() -> None:
    answers = {
        "a": VersionSet({vid(1): b"1", vid(3): b"3"}),
        "b": VersionSet({vid(2): b"2", vid(3): b"3"}, PurgeMarker(vid(1), 0, "admin")),
    }
    merged = merge_version_sets(answers)
    assert [v for v, _ in merged.envelopes] == [vid(2), vid(3)]
    assert merged.missing == {"a": (vid(2),)}
    assert merged.stale_purge == ("a",)


def test_lacking_names_what_a_late_answer_lacks_of_the_merged_read() -> None:
    merged = merge_version_sets(
        {
            "a": VersionSet({vid(2): b"2", vid(3): b"3"}, PurgeMarker(vid(1), 0, "admin")),
            "b": VersionSet({vid(3): b"3"}),
        }
    )
    late = lacking(merged, "c", VersionSet({vid(1): b"1", vid(3): b"3", vid(4): b"4"}))
    assert late.missing == {"c": (vid(2),)}  # vid(4) only c holds: nobody else is repaired
    assert late.stale_purge == ("c",)  # c still holds vid(1), which the marker covers
    assert late.purge == merged.purge
    assert dict(late.envelopes)[vid(2)] == b"2"
    whole = lacking(merged, "d", VersionSet({vid(2): b"2", vid(3): b"3"}, merged.purge))
    assert whole.missing == {}
    assert whole.stale_purge == ()


def _info(context: str, versions: int, updated: int) -> ContextInfo:
    return ContextInfo(context, f"{context}~{versions}", versions, vid(updated), updated, True)


def test_merge_listings_keeps_the_most_advanced_entry() -> None:
    merged = merge_listings([_info("b", 1, 5), _info("a", 2, 9), _info("a", 3, 7)])
    assert [(i.context, i.versions) for i in merged] == [("a", 3), ("b", 1)]


def test_merge_hits_dedupes_ranks_and_limits() -> None:
    hits = [
        SearchResult("x~1", "x", 1, vid(1), 2.0),
        SearchResult("x~2", "x", 2, vid(2), 1.5),
        SearchResult("y~1", "y", 1, vid(1), 3.0),
        SearchResult("z~1", "z", 1, vid(1), 1.5),
    ]
    assert [(h.context, h.version) for h in merge_hits(hits, 2)] == [("y", 1), ("x", 2)]
    assert [h.context for h in merge_hits(hits, 10)] == ["y", "x", "z"]


@given(st.lists(st.binary(max_size=40), max_size=30), st.integers(min_value=1, max_value=100))
def test_batches_by_bytes_keep_order_and_budget(blobs: list[bytes], budget: int) -> None:
    """Batches concatenate to the input; each is within budget unless it holds one blob."""
    batches = list(batches_by_bytes(blobs, budget))
    assert [b for batch in batches for b in batch] == blobs
    assert all(batch for batch in batches)
    for batch in batches:
        assert len(batch) == 1 or sum(map(len, batch)) <= budget


def test_quorum_shortfall_names_each_replica() -> None:
    tracker = QuorumTracker(["a", "b", "c"], 2)
    tracker.record("a", False, "a: connection refused")
    tracker.record("b", True)
    assert tracker.shortfall() == "a: a: connection refused; no answer from c"
    tracker.record("c", False)
    assert tracker.shortfall() == "a: a: connection refused; c: failed"
    assert not tracker.reached
