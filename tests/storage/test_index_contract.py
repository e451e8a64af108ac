"""The FullTextIndex contract: one suite, run against every backend (tantivy and whoosh).

Each test gets a fresh index in ``tmp_path`` and a fake clock; corpora stay tiny because
whoosh is slow.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storage.errors import DataDirInUse, Internal, InvalidPayload
from storage.index import (
    FullTextIndex,
    Hit,
    IndexConfig,
    IndexDoc,
    SearchQuery,
    open_index,
)

BACKENDS: tuple[Literal["tantivy", "whoosh"], ...] = ("tantivy", "whoosh")


class FakeClock:
    """Monotonic seconds that move only when a test says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


OpenIndex = Callable[..., FullTextIndex]


@pytest.fixture(params=[IndexConfig(backend=b) for b in BACKENDS], ids=BACKENDS)
def base_config(request: pytest.FixtureRequest) -> IndexConfig:
    assert isinstance(request.param, IndexConfig)
    return request.param


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def open_ix(base_config: IndexConfig, tmp_path: Path, clock: FakeClock) -> Iterator[OpenIndex]:
    """Opens ``tmp_path/index`` with this backend and the fake clock; closes all at the end."""
    opened: list[FullTextIndex] = []

    def _open(**overrides: Any) -> FullTextIndex:
        config = dataclasses.replace(base_config, **overrides)
        ix = open_index(tmp_path / "index", config, clock=clock)
        opened.append(ix)
        return ix

    yield _open
    for ix in opened:
        ix.close()


@pytest.fixture
def ix(open_ix: OpenIndex) -> FullTextIndex:
    return open_ix()


def doc(context: str, **fields: Any) -> IndexDoc:
    """An IndexDoc with neutral defaults; ``fields`` override them."""
    base = IndexDoc(
        context=context,
        version_id="v1",
        project="chorus",
        task="auth",
        agent="claude",
        role="architect",
        path="src/auth/module.py",
        summary="",
        purpose="",
        insights=(),
        content="",
        tags=(),
        technologies=(),
        readers=("architect",),
        created_at_ms=1_000,
    )
    return dataclasses.replace(base, **fields)


def contexts(hits: list[Hit]) -> list[str]:
    return [h.context for h in hits]


# -- writes --------------------------------------------------------------------------------


def test_doc_count_counts_committed_docs(ix: FullTextIndex) -> None:
    assert ix.doc_count() == 0
    ix.add(doc("a"))
    ix.add(doc("b"))
    assert ix.doc_count() == 0
    ix.commit()
    assert ix.doc_count() == 2


def test_upsert_replaces_the_earlier_doc(ix: FullTextIndex) -> None:
    ix.add(doc("a", version_id="v1", summary="alpha"))
    ix.commit()
    ix.add(doc("a", version_id="v2", summary="beta"))
    ix.commit()
    assert ix.doc_count() == 1
    assert ix.search(SearchQuery(text="alpha")) == []
    assert ix.search(SearchQuery(text="beta"))[0].version_id == "v2"


def test_upsert_within_one_batch_keeps_the_last(ix: FullTextIndex) -> None:
    ix.add(doc("a", version_id="v1", summary="alpha"))
    ix.add(doc("a", version_id="v2", summary="beta"))
    ix.commit()
    assert ix.doc_count() == 1
    assert [h.version_id for h in ix.search(SearchQuery())] == ["v2"]


def test_remove_deletes_only_that_context(ix: FullTextIndex) -> None:
    ix.add(doc("a", summary="shared"))
    ix.add(doc("b", summary="shared"))
    ix.commit()
    ix.remove("a")
    ix.remove("never-indexed")
    ix.commit()
    assert ix.doc_count() == 1
    assert contexts(ix.search(SearchQuery(text="shared"))) == ["b"]


def test_clear_drops_committed_and_pending(ix: FullTextIndex) -> None:
    ix.add(doc("a"))
    ix.commit()
    ix.add(doc("b"))
    ix.clear()
    ix.commit()
    assert ix.doc_count() == 0
    assert ix.search(SearchQuery()) == []


def test_reopen_after_close_keeps_docs(open_ix: OpenIndex) -> None:
    first = open_ix()
    first.add(doc("a", summary="durable"))
    first.close()  # commits the pending add
    second = open_ix()
    assert second.doc_count() == 1
    assert contexts(second.search(SearchQuery(text="durable"))) == ["a"]


def test_second_open_of_the_same_directory_is_refused(open_ix: OpenIndex) -> None:
    first = open_ix()
    with pytest.raises(DataDirInUse):
        open_ix()
    first.close()
    open_ix().close()


def test_closed_index_refuses_work(ix: FullTextIndex) -> None:
    ix.close()
    ix.close()  # idempotent
    with pytest.raises(Internal):
        ix.add(doc("a"))
    with pytest.raises(Internal):
        ix.search(SearchQuery())


# -- the refresh bound ---------------------------------------------------------------------


def test_write_is_visible_after_refresh_interval(open_ix: OpenIndex, clock: FakeClock) -> None:
    ix = open_ix(refresh_interval_s=1.0)
    ix.add(doc("a", summary="fresh"))
    clock.now = 0.9
    assert ix.search(SearchQuery(text="fresh")) == []
    clock.now = 1.0
    assert contexts(ix.search(SearchQuery(text="fresh"))) == ["a"]


def test_commit_makes_a_write_visible_at_once(ix: FullTextIndex) -> None:
    ix.add(doc("a", summary="fresh"))
    ix.commit()
    assert contexts(ix.search(SearchQuery(text="fresh"))) == ["a"]


def test_max_pending_forces_a_commit(open_ix: OpenIndex) -> None:
    ix = open_ix(max_pending=3)
    ix.add(doc("a"))
    ix.add(doc("b"))
    assert ix.search(SearchQuery()) == []
    ix.add(doc("c"))
    assert ix.doc_count() == 3


def test_maybe_commit_reports_whether_it_committed(ix: FullTextIndex, clock: FakeClock) -> None:
    assert ix.maybe_commit() is False  # nothing pending
    ix.add(doc("a"))
    assert ix.maybe_commit() is False  # pending, not yet due
    clock.now = 5.0
    assert ix.maybe_commit() is True
    assert ix.doc_count() == 1


# -- ranking and text ----------------------------------------------------------------------


def test_many_mentions_in_summary_outrank_one_in_content(ix: FullTextIndex) -> None:
    ix.add(doc("many", summary="jwt jwt jwt jwt rotation"))
    ix.add(doc("once", content="the login flow hands out a jwt after the password check"))
    for i in range(3):
        ix.add(doc(f"noise{i}", summary="unrelated caching notes", content="redis eviction"))
    ix.commit()
    hits = ix.search(SearchQuery(text="jwt"))
    assert contexts(hits) == ["many", "once"]
    assert hits[0].score > hits[1].score


def test_text_has_and_semantics_across_fields(ix: FullTextIndex) -> None:
    ix.add(doc("both", summary="jwt", content="rotation"))
    ix.add(doc("one", summary="jwt only"))
    ix.commit()
    assert contexts(ix.search(SearchQuery(text="jwt rotation"))) == ["both"]


@pytest.mark.parametrize(
    "fields",
    [
        {"purpose": "keyword"},
        {"insights": ("first", "the keyword here")},
        {"tags": ("keyword",)},
        {"technologies": ("keyword",)},
        {"path": "src/keyword/x.py"},
        {"content": "keyword"},
    ],
)
def test_every_text_field_is_searched(ix: FullTextIndex, fields: dict[str, Any]) -> None:
    ix.add(doc("a", **fields))
    ix.commit()
    assert contexts(ix.search(SearchQuery(text="Keyword"))) == ["a"]


def test_ties_are_broken_by_context(ix: FullTextIndex) -> None:
    for name in ("e", "c", "a", "d", "b"):
        ix.add(doc(name, summary="same words"))
    ix.commit()
    hits = ix.search(SearchQuery(text="same", limit=3))
    assert contexts(hits) == ["a", "b", "c"]


# -- filters -------------------------------------------------------------------------------


@pytest.fixture
def corpus(ix: FullTextIndex) -> FullTextIndex:
    ix.add(doc("a", project="p1", task="t1", agent="alice", role="dev", tags=("auth", "jwt"),
               readers=("dev",), created_at_ms=100, summary="common alpha"))  # fmt: skip
    ix.add(doc("b", project="p1", task="t2", agent="bob", role="ops", tags=("auth",),
               readers=("ops", "admin"), created_at_ms=200, summary="common beta"))  # fmt: skip
    ix.add(doc("c", project="p2", task="t1", agent="alice", role="dev", tags=("jwt", "two words"),
               readers=("admin",), created_at_ms=300, summary="common alpha"))  # fmt: skip
    ix.commit()
    return ix


FILTER_CASES = [
    (SearchQuery(project="p1"), ["a", "b"]),
    (SearchQuery(project="P1"), []),
    (SearchQuery(task="t1"), ["a", "c"]),
    (SearchQuery(agent="bob"), ["b"]),
    (SearchQuery(role="dev"), ["a", "c"]),
    (SearchQuery(tags=("auth",)), ["a", "b"]),
    (SearchQuery(tags=("auth", "jwt")), ["a"]),
    (SearchQuery(tags=("two words",)), ["c"]),
    (SearchQuery(tags=("two",)), []),
    (SearchQuery(readable_by=("admin",)), ["b", "c"]),
    (SearchQuery(readable_by=("dev", "ops")), ["a", "b"]),
    (SearchQuery(readable_by=()), []),
    (SearchQuery(since_ms=200), ["b", "c"]),
    (SearchQuery(until_ms=200), ["a", "b"]),
    (SearchQuery(since_ms=200, until_ms=200), ["b"]),
    (SearchQuery(project="p1", role="dev"), ["a"]),
    (SearchQuery(), ["a", "b", "c"]),
    (SearchQuery(text="*", project="p1"), ["a", "b"]),
]
TEXT_AND_FILTER_CASES = [
    (SearchQuery(text="common", project="p1"), ["a", "b"]),
    (SearchQuery(text="alpha", readable_by=("admin",)), ["c"]),
    (SearchQuery(text="alpha", tags=("jwt",), since_ms=150), ["c"]),
    (SearchQuery(text="beta", role="dev"), []),
]


def _mismatches(ix: FullTextIndex, cases: list[tuple[SearchQuery, list[str]]]) -> list[str]:
    """One line per case whose hits differ from the expected contexts (one corpus for all)."""
    out = []
    for query, expected in cases:
        got = contexts(ix.search(query))
        if got != expected:
            out.append(f"{query}: got {got}, expected {expected}")
    return out


def test_filters_without_text(corpus: FullTextIndex) -> None:
    assert _mismatches(corpus, FILTER_CASES) == []
    for query, _ in FILTER_CASES:
        assert len({h.score for h in corpus.search(query)}) <= 1  # filters never score


def test_text_and_filters_combined(corpus: FullTextIndex) -> None:
    assert _mismatches(corpus, TEXT_AND_FILTER_CASES) == []


def test_limit_caps_the_hits(corpus: FullTextIndex) -> None:
    assert contexts(corpus.search(SearchQuery(limit=2))) == ["a", "b"]
    assert len(corpus.search(SearchQuery(text="common", limit=1))) == 1


@pytest.mark.parametrize(
    "query",
    [SearchQuery(limit=0), SearchQuery(since_ms=5, until_ms=4), SearchQuery(text="jwt \ud800")],
    ids=repr,
)
def test_invalid_queries_raise_invalid_payload(ix: FullTextIndex, query: SearchQuery) -> None:
    with pytest.raises(InvalidPayload):
        ix.search(query)


# -- hostile query text --------------------------------------------------------------------

NASTY = [
    'jwt "unterminated',
    "a:b",
    "summary:",
    ":",
    "created_at_ms:abc",
    "created_at_ms:[1 TO",
    "(",
    ")",
    "((jwt",
    "[a TO",
    "{}",
    "AND",
    "jwt AND",
    "OR NOT",
    "-",
    "+",
    "jwt^",
    "jwt^abc",
    "jwt~",
    "~2",
    "\\",
    "/regex/",
    "*",
    "?",
    "a*b",
    "\x00",
    "'",
    "IN [a b",
    "ünïcödé 日本語",
    "x" * 500,
]
TOKENS = [*NASTY, " ", "jwt", "summary:", "tag:", '"', "TO", "^", "~", "!", "&&", "||"]


def _search_survives(ix: FullTextIndex, text: str) -> None:
    try:
        hits = ix.search(SearchQuery(text=text))
    except InvalidPayload:
        return
    assert all(isinstance(h, Hit) for h in hits)


def test_nasty_query_text_never_crashes(corpus: FullTextIndex) -> None:
    for text in NASTY:  # one corpus for all: whoosh is slow to set up
        _search_survives(corpus, text)


@settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(text=st.one_of(st.text(max_size=30), st.lists(st.sampled_from(TOKENS)).map("".join)))
def test_any_query_text_raises_at_most_invalid_payload(corpus: FullTextIndex, text: str) -> None:
    """Property: search(text) returns hits or raises InvalidPayload, for any text."""
    _search_survives(corpus, text)
