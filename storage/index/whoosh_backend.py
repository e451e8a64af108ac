"""The whoosh backend of the full-text index (pure Python, slower; same contract as tantivy).

Owns: the whoosh schema and analyzer, the mapping of ``IndexDoc`` and ``SearchQuery`` to
whoosh, the in-memory buffer of pending changes and the cached searcher. Must not know:
FORMAT files, LevelDB, roles' meaning; batching lives in ``base``.

Invariants:
    * Pending changes live in a dict keyed by context (last change wins) until a commit; a
      commit opens one ``SegmentWriter``, applies them all and commits it (a writer per
      commit, so no writer or file stays open between commits).
    * The analyzer mirrors tantivy's ``default`` tokenizer (split on non-alphanumerics,
      lower-case, drop tokens of 40+ characters, no stop words), so both backends match the
      same documents for the same words.
    * Free text uses ``MultifieldParser`` over ``TEXT_FIELDS`` with ``AndGroup``: every term
      must match, in any text field (AND semantics, as tantivy). Wildcards are off (tantivy
      has none). Filters are passed as whoosh's ``filter=``, which never scores.
    * The schema is always supplied by this module when opening, so whoosh never unpickles a
      schema from disk (its TOC still pickles the segment list: whoosh's format, not ours).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from whoosh import fields, index, qparser, writing
from whoosh import query as wq
from whoosh.analysis import LowercaseFilter, RegexTokenizer, StopFilter
from whoosh.filedb.filestore import FileStorage

from storage.errors import InvalidPayload
from storage.index.base import (
    FIELD_BOOSTS,
    FILTER_ONLY_SCORE,
    TEXT_FIELDS,
    BufferedIndex,
    DirLock,
    Hit,
    IndexConfig,
    IndexCorrupt,
    IndexDoc,
    SearchQuery,
    is_match_all,
    rank_hits,
)

#: tantivy's default tokenizer drops tokens of 40 bytes or more; whoosh counts characters.
_MAX_TOKEN_CHARS = 39
_ERROR_TEXT_MAX = 200


def build_schema() -> Any:
    """The whoosh schema of ``SCHEMA_VERSION`` (same field names as tantivy's)."""
    analyzer = (
        RegexTokenizer(r"[^\W_]+")
        | LowercaseFilter()
        | StopFilter(stoplist=None, minsize=1, maxsize=_MAX_TOKEN_CHARS)
    )
    text_fields = {name: fields.TEXT(analyzer=analyzer) for name in TEXT_FIELDS}
    return fields.Schema(
        context=fields.ID(stored=True, unique=True, sortable=True),
        version_id=fields.ID(stored=True),
        project=fields.ID(),
        task=fields.ID(),
        agent=fields.ID(),
        role=fields.ID(),
        tag=fields.ID(),
        reader=fields.ID(),
        created_at_ms=fields.NUMERIC(numtype=int, bits=64, signed=True),
        **text_fields,
    )


def create_whoosh(
    path: Path, config: IndexConfig, clock: Callable[[], float], lock: DirLock
) -> WhooshIndex:
    """Create an empty whoosh index in the (empty) directory ``path``."""
    return WhooshIndex(index.create_in(str(path), build_schema()), config, clock, lock)


def open_whoosh(
    path: Path, config: IndexConfig, clock: Callable[[], float], lock: DirLock
) -> WhooshIndex:
    """Open the existing whoosh index in ``path``, checking that its files can be read.

    Raises:
        IndexCorrupt: whoosh cannot open or read it.
    """
    storage = _TrackingStorage(str(path))
    # A damaged whoosh directory raises anything from EmptyIndexError to struct.error or
    # UnpicklingError; all of them mean "rebuild", so the net is wide on purpose.
    try:
        opened = storage.open_index(schema=build_schema())
        with opened.searcher() as searcher:
            searcher.doc_count()
    except Exception as exc:
        storage.close_tracked()
        raise IndexCorrupt(f"whoosh cannot open the index: {_brief(exc)}") from exc
    finally:
        storage.tracked = None
    return WhooshIndex(opened, config, clock, lock)


class _TrackingStorage(FileStorage):  # type: ignore[misc]  # whoosh is untyped
    """A FileStorage that remembers the files it opens while ``tracked`` is a list.

    whoosh does not close the files it was reading when a read fails (a damaged table of
    contents or segment), so they would be closed by the garbage collector, with a
    ResourceWarning. ``open_whoosh`` tracks them during its checks and closes them on failure.
    """

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.tracked: list[Any] | None = []

    def open_file(self, name: str, **kwargs: Any) -> Any:
        opened = super().open_file(name, **kwargs)
        if self.tracked is not None:
            self.tracked.append(opened)
        return opened

    def close_tracked(self) -> None:
        for opened in self.tracked or ():
            if not opened.is_closed:
                opened.close()


class WhooshIndex(BufferedIndex):
    """A whoosh index with a pending-change buffer; see the module docstring."""

    backend = "whoosh"

    def __init__(
        self, ix: Any, config: IndexConfig, clock: Callable[[], float], lock: DirLock
    ) -> None:
        """Wrap the whoosh index ``ix`` (already opened or created)."""
        super().__init__(config, clock, lock)
        self._ix = ix
        self._pending: dict[str, IndexDoc | None] = {}
        self._searcher: Any = None
        self._parser = qparser.MultifieldParser(
            list(TEXT_FIELDS), ix.schema, fieldboosts=dict(FIELD_BOOSTS), group=qparser.AndGroup
        )
        self._parser.remove_plugin_class(qparser.WildcardPlugin)

    # -- BufferedIndex hooks ---------------------------------------------------------------

    def _stage_add(self, doc: IndexDoc) -> None:
        self._pending[doc.context] = doc

    def _stage_remove(self, context: str) -> None:
        self._pending[context] = None

    def _flush(self) -> None:
        writer = self._ix.writer()
        try:
            for context, doc in self._pending.items():
                if doc is None:
                    writer.delete_by_term("context", context)
                else:
                    writer.update_document(**_to_fields(doc))
        except BaseException:
            writer.cancel()
            raise
        writer.commit()
        self._pending.clear()
        self._drop_searcher()

    def _clear(self) -> None:
        self._pending.clear()
        self._ix.writer().commit(mergetype=writing.CLEAR)
        self._drop_searcher()

    def _doc_count(self) -> int:
        return int(self._get_searcher().doc_count())

    def _release(self) -> None:
        self._drop_searcher()

    def _search(self, query: SearchQuery) -> list[Hit]:
        searcher = self._get_searcher()
        filter_query = _filter(query)
        if is_match_all(query.text):
            results = searcher.search(
                wq.Every(), limit=query.limit, filter=filter_query, sortedby="context"
            )
            return [Hit(r["context"], r["version_id"], FILTER_ONLY_SCORE) for r in results]
        parsed = self._parse_text(query.text)

        def fetch(n: int) -> list[Hit]:
            results = searcher.search(parsed, limit=n, filter=filter_query)
            return [Hit(r["context"], r["version_id"], float(r.score)) for r in results]

        return rank_hits(fetch, query.limit)

    # -- helpers ---------------------------------------------------------------------------

    def _parse_text(self, text: str) -> Any:
        """Parse ``text`` (whoosh's parser is lenient: bad syntax becomes plain words).

        Raises:
            InvalidPayload: the parser still gives up.
        """
        try:
            return self._parser.parse(text)
        except qparser.QueryParserError as exc:
            raise InvalidPayload("search text cannot be parsed", field="text") from exc

    def _get_searcher(self) -> Any:
        if self._searcher is None:
            self._searcher = self._ix.searcher()
        return self._searcher

    def _drop_searcher(self) -> None:
        if self._searcher is not None:
            self._searcher.close()
            self._searcher = None


def _to_fields(doc: IndexDoc) -> dict[str, Any]:
    """Whoosh field values; a list is indexed as pre-split exact terms."""
    return {
        "context": doc.context,
        "version_id": doc.version_id,
        "project": doc.project,
        "task": doc.task,
        "agent": doc.agent,
        "role": doc.role,
        "tag": list(doc.tags),
        "reader": list(doc.readers),
        "created_at_ms": doc.created_at_ms,
        "path": doc.path,
        "summary": doc.summary,
        "purpose": doc.purpose,
        "content": doc.content,
        "insights": "\n".join(doc.insights),
        "tags": "\n".join(doc.tags),
        "technologies": "\n".join(doc.technologies),
    }


def _filter(query: SearchQuery) -> Any:
    """The whoosh filter for ``query``'s exact-match fields and time range, or None."""
    terms: list[Any] = [
        wq.Term(name, value)
        for name, value in (
            ("project", query.project),
            ("task", query.task),
            ("agent", query.agent),
            ("role", query.role),
        )
        if value is not None
    ]
    terms += [wq.Term("tag", tag) for tag in query.tags]
    if query.readable_by is not None:
        readers = [wq.Term("reader", role) for role in query.readable_by]
        terms.append(wq.Or(readers) if readers else wq.NullQuery)
    if query.since_ms is not None or query.until_ms is not None:
        terms.append(wq.NumericRange("created_at_ms", query.since_ms, query.until_ms))
    return wq.And(terms) if terms else None


def _brief(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:_ERROR_TEXT_MAX]}"
