"""The tantivy backend of the full-text index (the default).

Owns: the tantivy schema (field names, tokenizers), the mapping of ``IndexDoc`` to a tantivy
document and of ``SearchQuery`` to a tantivy query, and the one ``IndexWriter`` of an open
index. Must not know: FORMAT files, LevelDB, roles' meaning; batching lives in ``base``.

Invariants:
    * One writer per open index, held from open to ``close()`` (tantivy's own lock file backs
      the directory lock of ``base.DirLock``).
    * The reader reloads manually, right after each commit: a search sees exactly the
      committed state, so ``base.CommitPolicy`` alone decides visibility.
    * Upsert = delete-by-term on the raw ``context`` field, then add; tantivy applies a delete
      only to documents added before it, so the last add of a context wins.
    * Free text goes through ``Index.parse_query`` with AND semantics
      (``conjunction_by_default``); text it rejects is retried as plain lower-cased words.
    * Filters are wrapped in ``const_score_query(.., 0.0)``: they select, never score.
    * The writer indexes with ``WRITER_THREADS`` thread(s), not one per core: every
      indexing thread holding documents writes its own segment at each commit, and this
      index commits small batches often (a replica's drain: a few dozen documents every
      half refresh interval), so more threads mean more tiny segments and more merging.
      Measured (25 documents of ~1 KB per commit, 80 commits, process CPU with merges, 2
      cores, load 7.4-7.8): tantivy's default (2 threads here) 1,227-1,367 µs per document
      and 89-145 ms per commit, one thread 581-638 µs and 38-47 ms.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import tantivy

from storage.errors import DataDirInUse, InvalidPayload
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

#: Exact-match keyword fields (raw tokenizer: the whole value is one term).
KEYWORD_FIELDS = ("project", "task", "agent", "role", "tag", "reader")
#: Characters of the query syntax, replaced by spaces when the parser rejects the text.
_SYNTAX = re.compile(r"[^\w\s]|_")
_ERROR_TEXT_MAX = 200


def build_schema() -> tantivy.Schema:
    """The tantivy schema of ``SCHEMA_VERSION`` (text fields keep positions for phrases)."""
    builder = tantivy.SchemaBuilder()
    builder.add_text_field("context", stored=True, fast=True, tokenizer_name="raw")
    builder.add_text_field("version_id", stored=True, tokenizer_name="raw")
    for name in KEYWORD_FIELDS:
        builder.add_text_field(name, tokenizer_name="raw", index_option="basic")
    for name in TEXT_FIELDS:
        builder.add_text_field(name, tokenizer_name="default")
    builder.add_integer_field("created_at_ms", indexed=True, fast=True)
    return builder.build()


def create_tantivy(
    path: Path, config: IndexConfig, clock: Callable[[], float], lock: DirLock
) -> TantivyIndex:
    """Create an empty tantivy index in the (empty) directory ``path``.

    Raises:
        DataDirInUse: another writer holds tantivy's lock.
    """
    index = tantivy.Index(build_schema(), path=str(path))
    return TantivyIndex(index, config, clock, lock)


def open_tantivy(
    path: Path, config: IndexConfig, clock: Callable[[], float], lock: DirLock
) -> TantivyIndex:
    """Open the existing tantivy index in ``path``, checking that its files can be read.

    Raises:
        IndexCorrupt: tantivy cannot open it (damaged meta.json, segment footers, ...).
        DataDirInUse: another writer holds tantivy's lock.
    """
    try:
        index = tantivy.Index.open(str(path))
    except ValueError as exc:
        raise IndexCorrupt(f"tantivy cannot open the index: {_brief(exc)}") from exc
    return TantivyIndex(index, config, clock, lock)


WRITER_THREADS = 1  # see the module docstring: small, frequent commits


class TantivyIndex(BufferedIndex):
    """A tantivy index with one writer; see the module docstring for its invariants."""

    backend = "tantivy"

    def __init__(
        self,
        index: tantivy.Index,
        config: IndexConfig,
        clock: Callable[[], float],
        lock: DirLock,
    ) -> None:
        """Take the writer and set up a manually reloaded reader.

        Raises:
            DataDirInUse: another writer holds tantivy's lock.
            IndexCorrupt: tantivy fails to start a writer or reader on the files.
        """
        super().__init__(config, clock, lock)
        self._index = index
        self._schema = index.schema
        try:
            self._writer = index.writer(
                heap_size=config.writer_heap_bytes, num_threads=WRITER_THREADS
            )
        except ValueError as exc:
            if "LockBusy" in str(exc):
                raise DataDirInUse("another tantivy writer holds the index") from exc
            raise IndexCorrupt(f"tantivy cannot start a writer: {_brief(exc)}") from exc
        try:
            index.config_reader("manual")
            index.reload()
        except ValueError as exc:
            self._writer.wait_merging_threads()  # frees the writer lock before we give up
            raise IndexCorrupt(f"tantivy cannot read the index: {_brief(exc)}") from exc

    # -- BufferedIndex hooks ---------------------------------------------------------------

    def _stage_add(self, doc: IndexDoc) -> None:
        self._writer.delete_documents_by_term("context", doc.context)
        self._writer.add_document(_to_document(doc))

    def _stage_remove(self, context: str) -> None:
        self._writer.delete_documents_by_term("context", context)

    def _flush(self) -> None:
        try:
            self._writer.commit()
            self._index.reload()
        except ValueError as exc:
            raise IndexCorrupt(f"tantivy commit failed: {_brief(exc)}") from exc

    def _clear(self) -> None:
        # delete_all_documents spares documents added since the last commit: roll them back.
        self._writer.rollback()
        self._writer.delete_all_documents()
        self._flush()

    def _doc_count(self) -> int:
        return self._index.searcher().num_docs

    def _release(self) -> None:
        self._writer.wait_merging_threads()  # consumes the writer and frees tantivy's lock

    def _search(self, query: SearchQuery) -> list[Hit]:
        compiled = self._compile(query)
        searcher = self._index.searcher()
        try:
            if is_match_all(query.text):
                result = searcher.search(
                    compiled,
                    query.limit,
                    count=False,
                    order_by_field="context",
                    order=tantivy.Order.Asc,
                )
                return [
                    Hit(str(key), _version_id(searcher, address), FILTER_ONLY_SCORE)
                    for key, address in result.hits
                ]

            def fetch(n: int) -> list[Hit]:
                hits = searcher.search(compiled, n, count=False).hits
                return [_hit(searcher, float(score), address) for score, address in hits]

            return rank_hits(fetch, query.limit)
        except ValueError as exc:
            raise IndexCorrupt(f"tantivy search failed: {_brief(exc)}") from exc

    # -- queries ---------------------------------------------------------------------------

    def _compile(self, query: SearchQuery) -> tantivy.Query:
        """The text query (or match-all) AND every filter, filters scoring 0."""
        if is_match_all(query.text):
            base = tantivy.Query.all_query()
        else:
            base = self._parse_text(query.text)
        filters = self._filters(query)
        if not filters:
            return base
        clauses = [(tantivy.Occur.Must, base)]
        clauses += [(tantivy.Occur.Must, tantivy.Query.const_score_query(f, 0.0)) for f in filters]
        return tantivy.Query.boolean_query(clauses)

    def _parse_text(self, text: str) -> tantivy.Query:
        """Parse ``text`` with tantivy's syntax; if rejected, as plain words (AND).

        Raises:
            InvalidPayload: even the plain-words form does not parse.
        """
        parsed = self._try_parse(text)
        if parsed is None:  # syntax error, unknown field, ...: fall back to the bare words
            parsed = self._try_parse(_SYNTAX.sub(" ", text).lower())
        if parsed is None:
            raise InvalidPayload("search text cannot be parsed", field="text")
        return parsed

    def _try_parse(self, text: str) -> tantivy.Query | None:
        try:
            return self._index.parse_query(
                text,
                default_field_names=list(TEXT_FIELDS),
                field_boosts=dict(FIELD_BOOSTS),
                conjunction_by_default=True,
            )
        except ValueError:
            return None

    def _filters(self, query: SearchQuery) -> list[tantivy.Query]:
        schema = self._schema
        filters = [
            tantivy.Query.term_query(schema, name, value)
            for name, value in (
                ("project", query.project),
                ("task", query.task),
                ("agent", query.agent),
                ("role", query.role),
            )
            if value is not None
        ]
        filters += [tantivy.Query.term_query(schema, "tag", tag) for tag in query.tags]
        if query.readable_by is not None:
            roles = list(query.readable_by)
            filters.append(
                tantivy.Query.term_set_query(schema, "reader", roles)
                if roles
                else tantivy.Query.empty_query()
            )
        if query.since_ms is not None or query.until_ms is not None:
            filters.append(
                tantivy.Query.range_query(
                    schema,
                    "created_at_ms",
                    tantivy.FieldType.Integer,
                    query.since_ms,
                    query.until_ms,
                )
            )
        return filters


def _to_document(doc: IndexDoc) -> tantivy.Document:
    out = tantivy.Document()
    for name, value in (
        ("context", doc.context),
        ("version_id", doc.version_id),
        ("project", doc.project),
        ("task", doc.task),
        ("agent", doc.agent),
        ("role", doc.role),
        ("path", doc.path),
        ("summary", doc.summary),
        ("purpose", doc.purpose),
        ("content", doc.content),
    ):
        out.add_text(name, value)
    for name, values in (
        ("insights", doc.insights),
        ("tags", doc.tags),
        ("tag", doc.tags),
        ("technologies", doc.technologies),
        ("reader", doc.readers),
    ):
        for value in values:
            out.add_text(name, value)
    out.add_integer("created_at_ms", doc.created_at_ms)
    return out


def _hit(searcher: tantivy.Searcher, score: float, address: tantivy.DocAddress) -> Hit:
    stored = searcher.doc(address)
    return Hit(str(stored.get_first("context")), str(stored.get_first("version_id")), score)


def _version_id(searcher: tantivy.Searcher, address: tantivy.DocAddress) -> str:
    return str(searcher.doc(address).get_first("version_id"))


def _brief(exc: BaseException) -> str:
    """tantivy's error text, cut short (it names files and its metadata, not document text)."""
    return str(exc)[:_ERROR_TEXT_MAX]
