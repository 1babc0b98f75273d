"""Build and update the search index of a Parquet dataset (a job's output, or any with an ``id``).

The index is a folder, by default ``<output>/_search/`` (``workers/search_store.py``):

* ``index.sqlite``: table ``docs`` (one row per indexed row: ``id``, ``source``,
  ``key``, ``frame_time``, ``caption``, ``answers`` as JSON, and the dataset's
  other scalar columns, for ``--where``), table ``files`` (which Parquet file,
  with which fingerprint, holds which contiguous ``docs`` rowids) and ``meta``;
* ``text/``: the tantivy full-text index of the text columns (``workers/text_index.py``);
* ``vectors/<digest>.npy``: the unit-length embeddings of one Parquet file's
  rows, in rowid order, memory-mapped by queries.

The unit of work is one Parquet file: a rerun indexes files it has not seen,
drops files that are gone (a resumed job compacts its files) and redoes files
whose fingerprint changed.  Work commits every ``COMMIT_ROWS`` rows, and a
file's vectors are written before the ``files`` row names them, so an
interrupted build loses at most the rows since the last commit and the next
run finishes it.  Rows with no text (error rows) are not indexed: there is
nothing to find them by.
"""

from __future__ import annotations

import json
import logging
import re
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from workers import schema
from workers.config import StorageOptions
from workers.embedder import DEFAULT_MODEL, TextEmbedder
from workers.search_store import (
    INDEX_DIR,
    IndexLocation,
    SearchError,
    check_row_columns,
    clean_answers,
    finite_or_none,
    list_data_files,
    open_db,
    read_meta,
    readable_parquet,
    save_vectors,
    vectors_name,
)
from workers.storage import filesystem_for, join, unstrip
from workers.text_index import TextIndex, TextIndexError, file_number, text_of

log = logging.getLogger(__name__)

# Bumped when the tables change shape; an index of another version must be rebuilt.
FORMAT_VERSION = "2"
DEFAULT_TEXT_COLUMNS = (schema.CAPTION, schema.ANSWERS)
# Columns every hit carries, when the dataset has them.
HIT_COLUMNS = (schema.ID, schema.SOURCE, schema.KEY, schema.FRAME_TIME, schema.CAPTION, schema.ANSWERS)
# uint64 is left out: SQLite's integers stop at 2**63 - 1.
_SCALAR = (pa.types.is_string, pa.types.is_large_string, pa.types.is_floating, pa.types.is_boolean,
           lambda t: pa.types.is_integer(t) and t != pa.uint64())  # fmt: skip
_COLUMN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Below this many rows to embed, the driver embeds them itself: a Ray job's start and its
# model loads (seconds) would cost more than they save (embedding rows/s: BENCHMARKS.md "Search").
RAY_MIN_ROWS = 100_000
# Rows per commit: a crash loses at most this much indexing work, and each commit
# costs tantivy a segment flush and merge, small next to indexing this many rows.
COMMIT_ROWS = 500_000
# Rows read from a Parquet file per insert batch: bounded memory on files of any size.
_READ_BATCH_ROWS = 8192


@dataclass(frozen=True)
class IndexSpec:
    """What to index and how.  ``ValueError`` subclasses from ``__post_init__`` name the bad field."""

    output_url: str
    index_url: str = ""  # "" means <output_url>/_search
    text_columns: tuple[str, ...] = DEFAULT_TEXT_COLUMNS
    embedding_model: str | None = DEFAULT_MODEL  # None: full text only
    overwrite: bool = False
    # Embeddings as a Ray Data job (GPU actors where the cluster has GPUs): "on", "off", or "auto",
    # which uses Ray from RAY_MIN_ROWS rows to embed.
    use_ray: str = "auto"
    embed_batch_size: int = 256
    cache_dir: str = ""  # where a remote index is worked on locally; required for s3:// indexes
    storage: StorageOptions = field(default_factory=StorageOptions)

    def __post_init__(self) -> None:
        if not self.output_url.strip():
            raise SearchError("output_url: an output URL is required")
        if not self.text_columns:
            raise SearchError("text_columns: at least one text column is required")
        for name in self.text_columns:
            if not _COLUMN_NAME.fullmatch(name):
                raise SearchError(f"text_columns: {name!r} is not a plain column name")
        if self.use_ray not in ("auto", "on", "off"):
            raise SearchError(f"use_ray: must be auto, on or off, got {self.use_ray!r}")
        if self.embed_batch_size < 1:
            raise SearchError(f"embed_batch_size: must be >= 1, got {self.embed_batch_size}")

    @property
    def resolved_index_url(self) -> str:
        return self.index_url or join(self.output_url, INDEX_DIR)


def check_columns(url: str, arrow_schema: pa.Schema, text_columns: tuple[str, ...]) -> None:
    """:class:`SearchError` unless the file has an ``id``, at least one of the text columns, and
    hit columns of types a hit can show (``check_row_columns``)."""
    if schema.ID not in arrow_schema.names:
        raise SearchError(f"{url} has no {schema.ID!r} column; every indexed dataset needs one")
    check_row_columns(url, arrow_schema, HIT_COLUMNS)
    if not set(text_columns) & set(arrow_schema.names):
        raise SearchError(
            f"{url} has none of the text columns {list(text_columns)}; "
            f"its columns are {arrow_schema.names} (choose with --text-columns)"
        )


def _read_batches(fs, path: str, text_columns: tuple[str, ...]) -> Iterator[tuple[pa.Schema, dict[str, list]]]:
    with fs.open(path, "rb") as f, readable_parquet(unstrip(fs, path)):
        pf = pq.ParquetFile(f)
        arrow_schema = pf.schema_arrow
        check_columns(unstrip(fs, path), arrow_schema, text_columns)
        for batch in pf.iter_batches(batch_size=_READ_BATCH_ROWS):
            yield arrow_schema, {name: batch.column(name).to_pylist() for name in batch.schema.names}


def _scalar_columns(arrow_schema: pa.Schema, text_columns: tuple[str, ...]) -> list[str]:
    # SQLite's column names ignore case: "Width" after "width" (or "ROWID") would be a duplicate column.
    taken = {c.lower() for c in text_columns} | {"rowid"}
    out = []
    for f in arrow_schema:
        if any(test(f.type) for test in _SCALAR) and f.name.lower() not in taken and _COLUMN_NAME.fullmatch(f.name):
            out.append(f.name)
            taken.add(f.name.lower())
    return out


def _batch_texts(data: dict[str, list], text_columns: tuple[str, ...]) -> tuple[list[list[str]], list[int]]:
    """Each text column's text per row, and the rows that have any: the one rule for which rows are indexed,
    shared by the text phase and the embedding phase so that vector i is row i."""
    n = len(data[schema.ID])
    texts = [[text_of(v) for v in data.get(c, [None] * n)] for c in text_columns]
    return texts, [i for i in range(n) if any(t[i] for t in texts)]


def file_texts(fs, path: str, text_columns: tuple[str, ...]) -> list[str]:
    """The embedding text of each indexed row of one file, in rowid order (rows with text only)."""
    out = []
    for _, data in _read_batches(fs, path, text_columns):
        texts, keep = _batch_texts(data, text_columns)
        out += [". ".join(t[i] for t in texts if t[i]) for i in keep]
    return out


def embed_file(embedder: TextEmbedder, url: str, vectors: str, index_url: str, storage: StorageOptions,
               text_columns: tuple[str, ...]) -> int:  # fmt: skip
    """Embed one Parquet file's indexed rows into vector file ``vectors``; returns how many rows."""
    fs, path = filesystem_for(url, storage)
    matrix = embedder.encode(file_texts(fs, path, text_columns))
    save_vectors(index_url, storage, vectors, matrix)
    return len(matrix)


def _create_tables(conn: sqlite3.Connection, spec: IndexSpec) -> None:
    cols = ", ".join(f'"{c}"' for c in HIT_COLUMNS)
    conn.execute(f"CREATE TABLE docs (rowid INTEGER PRIMARY KEY, {cols})")
    meta = {
        "format_version": FORMAT_VERSION,
        "text_columns": list(spec.text_columns),
        "embedding_model": spec.embedding_model,
        "embedding_dim": None,
        "output_url": spec.output_url,
    }
    conn.executemany("INSERT INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in meta.items()])


def _check_compatible(meta: dict[str, Any], spec: IndexSpec, where: str) -> None:
    if meta.get("format_version") != FORMAT_VERSION:
        raise SearchError(
            f"the index at {where} has format {meta.get('format_version')!r}, not {FORMAT_VERSION!r}: "
            "rebuild it with: index --overwrite"
        )
    for name, wanted in (("text_columns", list(spec.text_columns)), ("embedding_model", spec.embedding_model)):
        if meta.get(name) != wanted:
            raise SearchError(
                f"the index at {where} was built with {name}={meta.get(name)!r}, not {wanted!r}: "
                "rerun with the same settings, or with --overwrite to rebuild it"
            )


def _add_columns(conn: sqlite3.Connection, names: list[str]) -> None:
    have = {row[1].lower() for row in conn.execute("PRAGMA table_info(docs)")}  # SQLite ignores case
    for name in names:
        if name.lower() not in have:
            conn.execute(f'ALTER TABLE docs ADD COLUMN "{name}"')


def _index_file_text(conn: sqlite3.Connection, text: TextIndex, fs, url: str, fingerprint: str,
                     spec: IndexSpec) -> int:  # fmt: skip
    """Add one file's rows to ``docs`` (in the caller's transaction) and to the text index; returns the rows."""
    _, path = filesystem_for(url, spec.storage)
    first = (conn.execute("SELECT max(rowid) FROM docs").fetchone()[0] or 0) + 1
    rowid = first
    file_no = file_number(url)
    text.delete_file(file_no)  # what a crashed run added for this file and never recorded
    for arrow_schema, data in _read_batches(fs, path, spec.text_columns):
        extra = _scalar_columns(arrow_schema, spec.text_columns + HIT_COLUMNS)
        _add_columns(conn, extra)
        n = len(data[schema.ID])
        texts, keep = _batch_texts(data, spec.text_columns)
        names = list(HIT_COLUMNS) + extra
        cols = [data.get(c, [None] * n) for c in names]
        if schema.CAPTION not in data:  # another dataset's text: its first text column shows as the caption
            cols[names.index(schema.CAPTION)] = texts[0]
        frame_time, answers = names.index(schema.FRAME_TIME), names.index(schema.ANSWERS)
        cols[frame_time] = [finite_or_none(v) for v in cols[frame_time]]  # NaN and inf: no time
        cols[answers] = [None if v is None else json.dumps(clean_answers(v)) for v in cols[answers]]
        rows = [(rowid + j, *(col[i] for col in cols)) for j, i in enumerate(keep)]
        quoted = ", ".join(f'"{c}"' for c in names)
        conn.executemany(f"INSERT INTO docs (rowid, {quoted}) VALUES ({', '.join('?' * (len(names) + 1))})", rows)
        text.add(file_no, ((rowid + j, [t[i] for t in texts]) for j, i in enumerate(keep)))
        rowid += len(keep)
    conn.execute("INSERT INTO files VALUES (?, ?, ?, ?, NULL)", (url, fingerprint, first, rowid - first))
    return rowid - first


def _drop_file(conn: sqlite3.Connection, text: TextIndex, url: str) -> str | None:
    """Remove one file's rows (in the caller's transaction); returns its vector file's name, to delete after."""
    first, rows, vectors = conn.execute(
        "SELECT first_rowid, rows, vectors FROM files WHERE path = ?", (url,)
    ).fetchone()
    conn.execute("DELETE FROM docs WHERE rowid >= ? AND rowid < ?", (first, first + rows))
    conn.execute("DELETE FROM files WHERE path = ?", (url,))
    text.delete_file(file_number(url))
    return vectors


class EmbedFiles:
    """Ray Data UDF: embeds whole Parquet files and writes their vector files.

    Input rows name a file (``path``, ``vectors``); output rows say how many
    vectors each file got (``rows``) and their width (``dim``).  One model per
    actor, loaded once.  A failure raises, and Ray Data retries the file;
    nothing is half-written because each vector file is one atomic write.
    """

    def __init__(
        self, model: str, index_url: str, storage: StorageOptions, text_columns: tuple[str, ...], batch_size: int
    ) -> None:
        self.embedder = TextEmbedder(model, batch_size=batch_size)
        self.index_url, self.storage, self.text_columns = index_url, storage, text_columns

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [
            embed_file(self.embedder, str(url), str(name), self.index_url, self.storage, self.text_columns)
            for url, name in zip(batch["path"], batch["vectors"], strict=True)
        ]
        return {"path": batch["path"], "rows": np.asarray(rows), "dim": np.full(len(rows), self.embedder.dim)}


@dataclass
class IndexReport:
    files_indexed: int = 0
    files_skipped: int = 0
    files_removed: int = 0
    rows_indexed: int = 0
    rows_embedded: int = 0
    text_seconds: float = 0.0
    embed_seconds: float = 0.0
    index_url: str = ""


# (spec, [(file, vector name)]) -> ({file: vectors written}, dim)
RayEmbedder = Callable[[IndexSpec, list[tuple[str, str]]], tuple[dict[str, int], int]]


def build_index(spec: IndexSpec, embed_with_ray: RayEmbedder | None = None) -> IndexReport:
    """Bring the index up to date with the dataset; returns what was done.

    ``embed_with_ray`` runs the embedding phase as a Ray job, when ``use_ray``
    says so (``jobs/search.py`` passes one): given the spec and ``[(file, vector
    name)]`` it writes the vector files and returns ``({file: rows}, dim)``.
    Raises :class:`SearchError` for no data, an index built with other
    settings, or a file that is not an index; storage errors propagate.
    """
    import time

    location = IndexLocation(spec.resolved_index_url, spec.storage, spec.cache_dir)
    files = list_data_files(spec.output_url, spec.storage)
    # A dataset that cannot be indexed with these settings leaves no index behind to conflict with the next try.
    first_fs, first_path = filesystem_for(min(files), spec.storage)
    with first_fs.open(first_path, "rb") as f, readable_parquet(min(files)):
        check_columns(min(files), pq.read_schema(f), spec.text_columns)
    if spec.overwrite:
        location.db.unlink(missing_ok=True)
        if location.fs.exists(location.path):
            location.fs.rm(location.path, recursive=True)
    else:
        location.pull()
    report = IndexReport(index_url=location.url)
    conn = open_db(location.db)
    try:
        if conn.execute("SELECT count(*) FROM meta").fetchone()[0] == 0:
            _create_tables(conn, spec)
        _check_compatible(read_meta(conn), spec, location.url)
        text = open_text_index(location, len(spec.text_columns), create=True)
        start = time.perf_counter()
        _update_text(conn, text, location, files, spec, report)
        report.text_seconds = time.perf_counter() - start
        location.push()
        if spec.embedding_model:
            start = time.perf_counter()
            report.rows_embedded = _embed_pending(conn, location, spec, embed_with_ray)
            report.embed_seconds = time.perf_counter() - start
            location.push()
    finally:
        conn.close()
    return report


def _update_text(conn: sqlite3.Connection, text: TextIndex, location: IndexLocation, files: dict[str, str],
                 spec: IndexSpec, report: IndexReport) -> None:  # fmt: skip
    """Drop gone or changed files, add new ones, committing every COMMIT_ROWS rows.

    The text index commits before SQLite does, so ``files`` never names rows the
    text index lacks; what a crash leaves in the text index alone is deleted
    when its file is indexed again (by ``file_no``).
    """
    indexed = dict(conn.execute("SELECT path, fingerprint FROM files"))
    fs, _ = filesystem_for(spec.output_url, spec.storage)
    stale_vectors: list[str] = []
    pending_rows = 0

    def commit() -> None:
        text.commit()
        conn.execute("COMMIT")
        for name in stale_vectors:
            location.remove_vectors(name)
        stale_vectors.clear()

    conn.execute("BEGIN")
    try:
        for url in sorted(indexed):
            if files.get(url) != indexed[url]:
                stale_vectors += [v for v in [_drop_file(conn, text, url)] if v]
                report.files_removed += 1
        for url in sorted(files):
            if indexed.get(url) == files[url]:
                report.files_skipped += 1
                continue
            rows = _index_file_text(conn, text, fs, url, files[url], spec)
            report.rows_indexed += rows
            report.files_indexed += 1
            pending_rows += rows
            if pending_rows >= COMMIT_ROWS:
                commit()
                conn.execute("BEGIN")
                pending_rows = 0
        commit()
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _embed_pending(
    conn: sqlite3.Connection, location: IndexLocation, spec: IndexSpec, embed_with_ray: RayEmbedder | None
) -> int:
    pending = [(p, f, r) for p, f, r in conn.execute("SELECT path, fingerprint, rows FROM files WHERE vectors IS NULL")]
    if not pending:
        return 0
    jobs = [(url, vectors_name(url, fingerprint)) for url, fingerprint, _ in pending]
    expected = {url: rows for url, _, rows in pending}
    rows = sum(expected.values())
    use_ray = spec.use_ray == "on" or (spec.use_ray == "auto" and rows >= RAY_MIN_ROWS)
    if use_ray and embed_with_ray is None:
        raise SearchError("use_ray: embeddings as a Ray job were asked for, but no Ray runner was given")
    if use_ray:
        log.info("embedding %d rows of %d file(s) as a Ray Data job", rows, len(jobs))
        counts, dim = embed_with_ray(spec, jobs)
    else:
        embedder = TextEmbedder(spec.embedding_model, batch_size=spec.embed_batch_size)
        dim = embedder.dim
        counts = {url: embed_file(embedder, url, name, location.url, spec.storage, spec.text_columns)
                  for url, name in jobs}  # fmt: skip
    for url, name in jobs:
        if counts.get(url) != expected[url]:  # the file changed between the two phases: redo it next run
            raise SearchError(
                f"{url}: {counts.get(url)} vectors for {expected[url]} indexed rows; "
                "the file changed while indexing, rerun index"
            )
        conn.execute("UPDATE files SET vectors = ? WHERE path = ?", (name, url))
    conn.execute("UPDATE meta SET value = ? WHERE key = 'embedding_dim'", (json.dumps(dim),))
    return sum(counts.values())


def open_text_index(location: IndexLocation, fields: int, create: bool = False) -> TextIndex:
    """The index's tantivy folder; :class:`SearchError` when it is missing or unreadable."""
    try:
        return TextIndex(location.text_dir, fields, create=create)
    except TextIndexError as exc:
        raise SearchError(f"the search index at {location.url} is corrupt ({exc}); "
                          "rebuild it with: python -m jobs.search index URL --overwrite") from exc  # fmt: skip
