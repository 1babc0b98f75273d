"""Full-text engine: a thin wrapper over tantivy (BM25, block-max WAND top-k, English stemming).

It knows rows only as integer ``rowid``s (the search index's ``docs`` table
holds everything else) and Parquet files as integer ``file_no``s, so a file's
rows can be deleted in one term.  Chosen over SQLite FTS5 by measurement
(BENCHMARKS.md "Search"): FTS5 scores every match of a query before it sorts,
tantivy skips blocks that cannot reach the top k, which at a million captions
is the difference between missing and meeting the latency target.

Queries are built from words only (``\\w+``), each quoted, so ``"``, ``*``,
``AND`` or ``NEAR(`` in user text are words, never query syntax.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import tantivy

ROWID = "rowid"
FILE_NO = "file_no"
_WORD = re.compile(r"\w+", re.UNICODE)
# Writer memory: tantivy flushes a segment when it is full; bigger means fewer segments to merge.
_WRITER_HEAP = 128_000_000
# A filter that keeps at most this many rows is handed to tantivy as a term set; a larger
# one is applied to the ranked list afterwards, which then rarely needs to grow.
_TERM_SET_MAX = 100_000


class TextIndexError(Exception):
    """The folder holds no readable tantivy index (missing files, another format)."""


def query_words(text: str) -> list[str]:
    return _WORD.findall(text or "")


def text_of(value: Any) -> str:
    """The searchable text of one cell: strings as is, answers as ``question answer`` pairs, lists joined."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return " ".join(text_of(v) for v in value.values())
    if isinstance(value, list | tuple):
        return " ".join(t for t in (text_of(v) for v in value) if t)
    return str(value)


def file_number(url: str) -> int:
    """A stable id of a data file, so a rerun can delete what a crashed run added for it."""
    return int(hashlib.sha1(url.encode()).hexdigest()[:15], 16)


def _schema(fields: int) -> tantivy.Schema:
    builder = tantivy.SchemaBuilder()
    for i in range(fields):
        builder.add_text_field(f"t{i}", stored=False, tokenizer_name="en_stem")
    builder.add_integer_field(ROWID, stored=True, indexed=True, fast=True)
    builder.add_integer_field(FILE_NO, stored=False, indexed=True)
    return builder.build()


class TextIndex:
    """A tantivy index of ``fields`` text columns in ``folder`` (created when absent and ``create``)."""

    def __init__(self, folder: Path, fields: int, create: bool = False) -> None:
        self.fields = [f"t{i}" for i in range(fields)]
        self.schema = _schema(fields)
        if not create and not (folder / "meta.json").exists():
            raise TextIndexError(f"no text index in {folder}")
        folder.mkdir(parents=True, exist_ok=True)
        try:
            self.index = tantivy.Index(self.schema, path=str(folder), reuse=True)
        except ValueError as exc:  # tantivy's open errors: corrupt meta.json, missing segment files
            raise TextIndexError(f"unreadable text index in {folder}: {exc}") from exc
        self._writer: tantivy.IndexWriter | None = None

    # ------------------------------------------------------------------ writing

    @property
    def writer(self) -> tantivy.IndexWriter:
        if self._writer is None:
            # One indexing thread: the driver's other core reads and converts the next Parquet batch.
            self._writer = self.index.writer(heap_size=_WRITER_HEAP, num_threads=1)
        return self._writer

    def add(self, file_no: int, rows: Iterable[tuple[int, list[str]]]) -> None:
        for rowid, texts in rows:
            doc = tantivy.Document(**{ROWID: rowid, FILE_NO: file_no})
            for name, text in zip(self.fields, texts, strict=True):
                if text:
                    doc.add_text(name, text)
            self.writer.add_document(doc)

    def delete_file(self, file_no: int) -> None:
        self.writer.delete_documents_by_term(FILE_NO, file_no)

    def commit(self) -> None:
        """Make everything added or deleted durable; raises tantivy's ``ValueError`` on an I/O failure."""
        if self._writer is not None:
            self._writer.commit()
            self._writer.wait_merging_threads()  # merges finish before the folder is uploaded
            self._writer = None
            self.index.reload()

    # ------------------------------------------------------------------ reading

    def _parse(self, match: str) -> tantivy.Query:
        return self.index.parse_query(match, self.fields)

    def search(self, match: str, limit: int, allowed: set[int] | None = None) -> list[int]:
        """Row ids of the best ``limit`` rows for the query string ``match`` (built by the helpers below).

        ``allowed`` restricts the result to those rows (a ``--where`` filter).
        """
        query = self._parse(match)
        searcher = self.index.searcher()
        if allowed is not None and len(allowed) <= _TERM_SET_MAX:
            if not allowed:
                return []
            rows = tantivy.Query.term_set_query(self.schema, ROWID, sorted(allowed))
            query = tantivy.Query.boolean_query([(tantivy.Occur.Must, query), (tantivy.Occur.Must, rows)])
            allowed = None
        n = limit
        while True:
            hits = searcher.search(query, n, count=False).hits
            ids = [searcher.doc(address)[ROWID][0] for _, address in hits]
            kept = ids if allowed is None else [r for r in ids if r in allowed]
            if len(kept) >= limit or len(hits) < n:
                return kept[:limit]
            n *= 8  # a large filter dropped some: look further down the ranking


def phrase(words: list[str]) -> str:
    return '"' + " ".join(words) + '"'  # \w+ words hold no quote: nothing to escape


def all_words(words: list[str]) -> str:
    return " ".join(f'+"{w}"' for w in words)


def any_word(words: list[str]) -> str:
    return " ".join(f'"{w}"' for w in words)
