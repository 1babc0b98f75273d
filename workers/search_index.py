"""Build and update the search index of a Parquet dataset (a job's output, or any with an ``id``).

The index is a folder, by default ``<output>/_search/``:

* ``index.sqlite``: table ``docs`` (one row per indexed row: ``id``, ``source``,
  ``key``, ``frame_time``, ``caption``, ``answers`` as JSON, and the dataset's
  other scalar columns, for ``--where``), an FTS5 table ``fts`` over the text
  columns (BM25, Porter stemming), table ``files`` (which Parquet file, with
  which fingerprint, holds which contiguous ``docs`` rowids) and ``meta``.
* ``vectors/<digest>.npy``: the unit-length embeddings of one Parquet file's
  rows, in rowid order, memory-mapped by queries.

The unit of work is one Parquet file: a rerun indexes files it has not seen,
drops files that are gone (a resumed job compacts its files) and redoes files
whose fingerprint changed.  Each file's text rows commit in one SQLite
transaction, and its vectors are written before the ``files`` row names them,
so an interrupted build loses at most the file in flight and the next run
finishes it.  Rows with no text (error rows) are not indexed: there is nothing
to find them by.

On ``s3://`` the SQLite file is worked on in a local cache folder and uploaded
whole after each phase; vector files go straight to the index URL.
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
    list_data_files,
    open_db,
    read_meta,
    save_vectors,
    vectors_name,
)
from workers.storage import filesystem_for, join, unstrip

log = logging.getLogger(__name__)

# Bumped when the tables change shape; an index of another version must be rebuilt.
FORMAT_VERSION = "1"
DEFAULT_TEXT_COLUMNS = (schema.CAPTION, schema.ANSWERS)
# Columns every hit carries, when the dataset has them.
HIT_COLUMNS = (schema.ID, schema.SOURCE, schema.KEY, schema.FRAME_TIME, schema.CAPTION, schema.ANSWERS)
_SCALAR = (pa.types.is_string, pa.types.is_large_string, pa.types.is_integer, pa.types.is_floating, pa.types.is_boolean)
_COLUMN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
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
    use_ray: bool = False  # embeddings as a Ray Data job (GPU actors where the cluster has GPUs)
    embed_batch_size: int = 256
    cache_dir: str = ""  # where a remote index's SQLite file is worked on; required for s3:// indexes
    storage: StorageOptions = field(default_factory=StorageOptions)

    def __post_init__(self) -> None:
        if not self.output_url.strip():
            raise SearchError("output_url: an output URL is required")
        if not self.text_columns:
            raise SearchError("text_columns: at least one text column is required")
        for name in self.text_columns:
            if not _COLUMN_NAME.fullmatch(name):
                raise SearchError(f"text_columns: {name!r} is not a plain column name")
        if self.embed_batch_size < 1:
            raise SearchError(f"embed_batch_size: must be >= 1, got {self.embed_batch_size}")

    @property
    def resolved_index_url(self) -> str:
        return self.index_url or join(self.output_url, INDEX_DIR)


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


def check_columns(url: str, arrow_schema: pa.Schema, text_columns: tuple[str, ...]) -> None:
    """:class:`SearchError` unless the file has an ``id`` and at least one of the text columns."""
    if schema.ID not in arrow_schema.names:
        raise SearchError(f"{url} has no {schema.ID!r} column; every indexed dataset needs one")
    if not set(text_columns) & set(arrow_schema.names):
        raise SearchError(
            f"{url} has none of the text columns {list(text_columns)}; "
            f"its columns are {arrow_schema.names} (choose with --text-columns)"
        )


def _read_batches(fs, path: str, text_columns: tuple[str, ...]) -> Iterator[tuple[pa.Schema, dict[str, list]]]:
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        arrow_schema = pf.schema_arrow
        check_columns(unstrip(fs, path), arrow_schema, text_columns)
        for batch in pf.iter_batches(batch_size=_READ_BATCH_ROWS):
            yield arrow_schema, {name: batch.column(name).to_pylist() for name in batch.schema.names}


def _scalar_columns(arrow_schema: pa.Schema, text_columns: tuple[str, ...]) -> list[str]:
    return [
        f.name
        for f in arrow_schema
        if any(test(f.type) for test in _SCALAR) and f.name not in text_columns and _COLUMN_NAME.fullmatch(f.name)
    ]


def file_texts(fs, path: str, text_columns: tuple[str, ...]) -> list[str]:
    """The embedding text of each indexed row of one file, in rowid order (rows with text only)."""
    texts = []
    for _, data in _read_batches(fs, path, text_columns):
        n = len(data[schema.ID])
        cols = [data.get(c, [None] * n) for c in text_columns]
        for i in range(n):
            parts = [text_of(col[i]) for col in cols]
            if any(parts):
                texts.append(". ".join(p for p in parts if p))
    return texts


def _create_tables(conn: sqlite3.Connection, spec: IndexSpec) -> None:
    fts_cols = ", ".join(f"t{i}" for i in range(len(spec.text_columns)))
    cols = ", ".join(f'"{c}"' for c in HIT_COLUMNS)
    conn.execute(f"CREATE TABLE docs (rowid INTEGER PRIMARY KEY, {cols})")
    conn.execute(f"CREATE VIRTUAL TABLE fts USING fts5({fts_cols}, tokenize='porter unicode61 remove_diacritics 2')")
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
    have = {row[1] for row in conn.execute("PRAGMA table_info(docs)")}
    for name in names:
        if name not in have:
            conn.execute(f'ALTER TABLE docs ADD COLUMN "{name}"')


def _index_file_text(conn: sqlite3.Connection, fs, url: str, fingerprint: str, spec: IndexSpec) -> int:
    """Insert one file's rows into docs and fts in one transaction; returns the rows indexed."""
    _, path = filesystem_for(url, spec.storage)
    first = (conn.execute("SELECT max(rowid) FROM docs").fetchone()[0] or 0) + 1
    rowid = first
    conn.execute("BEGIN")
    try:
        for arrow_schema, data in _read_batches(fs, path, spec.text_columns):
            extra = _scalar_columns(arrow_schema, spec.text_columns + HIT_COLUMNS)
            _add_columns(conn, extra)
            n = len(data[schema.ID])
            texts = [[text_of(v) for v in data.get(c, [None] * n)] for c in spec.text_columns]
            keep = [i for i in range(n) if any(t[i] for t in texts)]
            names = list(HIT_COLUMNS) + extra
            cols = [data.get(c, [None] * n) for c in names]
            answers = names.index(schema.ANSWERS)
            rows, fts_rows = [], []
            for j, i in enumerate(keep):
                values = [col[i] for col in cols]
                values[answers] = json.dumps(values[answers]) if values[answers] is not None else None
                rows.append((rowid + j, *values))
                fts_rows.append((rowid + j, *(t[i] for t in texts)))
            marks = ", ".join("?" * (len(names) + 1))
            quoted = ", ".join(f'"{c}"' for c in names)
            conn.executemany(f"INSERT INTO docs (rowid, {quoted}) VALUES ({marks})", rows)
            fts_cols = ", ".join(f"t{k}" for k in range(len(texts)))
            conn.executemany(f"INSERT INTO fts (rowid, {fts_cols}) VALUES (?, {', '.join('?' * len(texts))})", fts_rows)
            rowid += len(keep)
        conn.execute("INSERT INTO files VALUES (?, ?, ?, ?, NULL)", (url, fingerprint, first, rowid - first))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return rowid - first


def _drop_file(conn: sqlite3.Connection, location: IndexLocation, url: str) -> None:
    first, rows, vectors = conn.execute(
        "SELECT first_rowid, rows, vectors FROM files WHERE path = ?", (url,)
    ).fetchone()
    conn.execute("BEGIN")
    conn.execute("DELETE FROM fts WHERE rowid >= ? AND rowid < ?", (first, first + rows))
    conn.execute("DELETE FROM docs WHERE rowid >= ? AND rowid < ?", (first, first + rows))
    conn.execute("DELETE FROM files WHERE path = ?", (url,))
    conn.execute("COMMIT")
    if vectors:
        location.remove_vectors(vectors)


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
        rows = []
        for url, name in zip(batch["path"], batch["vectors"], strict=True):
            fs, path = filesystem_for(str(url), self.storage)
            vectors = self.embedder.encode(file_texts(fs, path, self.text_columns))
            save_vectors(self.index_url, self.storage, str(name), vectors)
            rows.append(len(vectors))
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

    ``embed_with_ray`` runs the embedding phase as a Ray job (``jobs/search.py``
    passes one when ``use_ray`` is set): given the spec and ``[(file, vector
    name)]`` it writes the vector files and returns ``({file: rows}, dim)``.
    Raises :class:`SearchError` for no data, an index built with other
    settings, or a file that is not an index; storage errors propagate.
    """
    import time

    location = IndexLocation(spec.resolved_index_url, spec.storage, spec.cache_dir)
    files = list_data_files(spec.output_url, spec.storage)
    # A dataset that cannot be indexed with these settings leaves no index behind to conflict with the next try.
    first_fs, first_path = filesystem_for(min(files), spec.storage)
    with first_fs.open(first_path, "rb") as f:
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
        indexed = dict(conn.execute("SELECT path, fingerprint FROM files"))
        for url in sorted(indexed):
            if files.get(url) != indexed[url]:
                _drop_file(conn, location, url)
                report.files_removed += 1
        fs, _ = filesystem_for(spec.output_url, spec.storage)
        start = time.perf_counter()
        for url in sorted(files):
            if url in indexed and indexed[url] == files[url]:
                report.files_skipped += 1
                continue
            report.rows_indexed += _index_file_text(conn, fs, url, files[url], spec)
            report.files_indexed += 1
        if report.files_indexed or report.files_removed:
            conn.execute("INSERT INTO fts(fts) VALUES ('optimize')")  # one b-tree per term: faster queries
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


def _embed_pending(
    conn: sqlite3.Connection, location: IndexLocation, spec: IndexSpec, embed_with_ray: RayEmbedder | None
) -> int:
    pending = [(p, f, r) for p, f, r in conn.execute("SELECT path, fingerprint, rows FROM files WHERE vectors IS NULL")]
    if not pending:
        return 0
    jobs = [(url, vectors_name(url, fingerprint)) for url, fingerprint, _ in pending]
    expected = {url: rows for url, _, rows in pending}
    if embed_with_ray is not None:
        counts, dim = embed_with_ray(spec, jobs)
    else:
        embedder = TextEmbedder(spec.embedding_model, batch_size=spec.embed_batch_size)
        counts, dim = {}, embedder.dim
        for url, name in jobs:
            fs, path = filesystem_for(url, spec.storage)
            vectors = embedder.encode(file_texts(fs, path, spec.text_columns))
            save_vectors(location.url, spec.storage, name, vectors)
            counts[url] = len(vectors)
    for url, name in jobs:
        if counts.get(url) != expected[url]:  # the file changed between the two phases: redo it next run
            raise SearchError(
                f"{url}: {counts.get(url)} vectors for {expected[url]} indexed rows; "
                "the file changed while indexing, rerun index"
            )
        conn.execute("UPDATE files SET vectors = ? WHERE path = ?", (name, url))
    conn.execute("UPDATE meta SET value = ? WHERE key = 'embedding_dim'", (json.dumps(dim),))
    return sum(counts.values())


def staleness(conn: sqlite3.Connection, output_url: str, storage: StorageOptions) -> str | None:
    """Why the index no longer matches the dataset (files added, removed, changed, vectors missing), or None."""
    files = list_data_files(output_url, storage)
    indexed = dict(conn.execute("SELECT path, fingerprint FROM files"))
    added = sum(1 for u in files if u not in indexed)
    removed = sum(1 for u in indexed if u not in files)
    changed = sum(1 for u in indexed if u in files and files[u] != indexed[u])
    parts = [f"{n} file(s) {what}" for n, what in ((added, "added"), (removed, "removed"), (changed, "changed")) if n]
    if not parts:
        return None
    return f"the index is older than the output ({', '.join(parts)} since it was built)"
