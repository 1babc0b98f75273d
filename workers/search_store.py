"""Where a search index lives and what it is made of: its folder, its SQLite file, its vector files.

The index is a folder, by default ``<output>/_search/``, holding ``index.sqlite``
and ``vectors/<digest>.npy``.  A local index is opened in place; on ``s3://``
the SQLite file is worked on in a local cache folder and uploaded whole (one
PUT, so readers see the old index or the new one), and vector files go
straight to the index URL.  ``workers/search_index.py`` fills it,
``workers/search_query.py`` reads it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from workers import schema
from workers.config import StorageOptions
from workers.storage import filesystem_for, is_local, join, unstrip
from workers.writer import put_atomic

INDEX_DIR = "_search"
DB_NAME = "index.sqlite"
VECTORS_DIR = "vectors"
TEXT_DIR = "text"
# tantivy rewrites these in place; its segment files are written once.
_MUTABLE_TEXT_FILES = ("meta.json", ".managed.json")


class SearchError(Exception):
    """Anything a user can fix: no data, no index, a corrupt or stale index, a bad query.

    The message says what is wrong and what to run; the CLI prints it without a traceback.
    """


# ------------------------------------------------------------------ where the index lives


class IndexLocation:
    """The index folder, and the local path its SQLite file is opened at.

    A local index is opened in place.  A remote one is downloaded into
    ``cache_dir`` when the remote copy differs from the cached one (by ETag or
    size and mtime), and uploaded back by :meth:`push`.
    """

    def __init__(self, index_url: str, storage: StorageOptions, cache_dir: str) -> None:
        self.url = index_url
        self.fs, self.path = filesystem_for(index_url, storage)
        self.local = is_local(index_url)
        if self.local:
            self.dir = Path(self.path)
        else:
            if not cache_dir:
                raise SearchError("cache_dir: a local cache folder is required for a remote index")
            self.dir = Path(cache_dir) / hashlib.sha1(index_url.encode()).hexdigest()[:16]
        self.db = self.dir / DB_NAME
        self.text_dir = self.dir / TEXT_DIR

    def _remote_fingerprint(self) -> str | None:
        try:
            info = self.fs.info(join(self.path, DB_NAME))
        except FileNotFoundError:
            return None
        return json.dumps([info.get("ETag") or info.get("etag"), info.get("size"), str(info.get("LastModified"))])

    def exists(self) -> bool:
        return self.db.exists() if self.local else self._remote_fingerprint() is not None

    def pull(self) -> None:
        """Make ``self.db`` the current remote copy (remote indexes); raises the filesystem's error."""
        if self.local:
            return
        remote = self._remote_fingerprint()
        marker = self.dir / ".remote-fingerprint"
        if remote is None:
            self.db.unlink(missing_ok=True)
            return
        if self.db.exists() and marker.exists() and marker.read_text() == remote:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".{DB_NAME}.download"
        self.fs.get_file(join(self.path, DB_NAME), str(tmp))
        tmp.replace(self.db)
        remote_text = self._remote_text_files()
        local_text = self._local_text_files()
        self.text_dir.mkdir(parents=True, exist_ok=True)
        for name, size in remote_text.items():
            if name in _MUTABLE_TEXT_FILES or local_text.get(name) != size:
                self.fs.get_file(join(self.path, TEXT_DIR, name), str(self.text_dir / name))
        for name in set(local_text) - set(remote_text):
            (self.text_dir / name).unlink()
        marker.write_text(remote)

    def push(self) -> None:
        """Upload the text index, then the SQLite file (remote indexes), then delete what the text index dropped.

        tantivy's segment files never change once written, so only new ones
        travel; ``meta.json``, which names the live segments, goes after them,
        and the SQLite file last: a reader that sees the new SQLite file finds
        everything it names.
        """
        if self.local:
            return
        remote_text = self._remote_text_files()
        local_text = self._local_text_files()
        order = sorted(local_text, key=lambda n: (n in _MUTABLE_TEXT_FILES, n))
        for name in order:
            if name in _MUTABLE_TEXT_FILES or remote_text.get(name) != local_text[name]:
                self.fs.put_file(str(self.text_dir / name), join(self.path, TEXT_DIR, name))
        put_atomic(self.fs, join(self.path, DB_NAME), self.db.read_bytes(), local=False)
        for name in set(remote_text) - set(local_text):
            self.fs.rm_file(join(self.path, TEXT_DIR, name))
        (self.dir / ".remote-fingerprint").write_text(self._remote_fingerprint() or "")

    def _local_text_files(self) -> dict[str, int]:
        if not self.text_dir.is_dir():
            return {}
        return {p.name: p.stat().st_size for p in self.text_dir.iterdir() if p.is_file() and "lock" not in p.name}

    def _remote_text_files(self) -> dict[str, int]:
        root = join(self.path, TEXT_DIR)
        try:
            found = self.fs.find(root, detail=True)
        except FileNotFoundError:
            return {}
        return {p.rsplit("/", 1)[-1]: int(i.get("size") or 0) for p, i in found.items() if "lock" not in p}

    def local_vectors(self, name: str) -> Path:
        """A local path of vector file ``name``, downloaded into the cache first for a remote index."""
        path = self.dir / VECTORS_DIR / name
        if not self.local and not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{name}.download")
            self.fs.get_file(join(self.path, VECTORS_DIR, name), str(tmp))
            tmp.replace(path)
        return path

    def remove_vectors(self, name: str) -> None:
        try:
            self.fs.rm_file(join(self.path, VECTORS_DIR, name))
        except FileNotFoundError:
            pass
        (self.dir / VECTORS_DIR / name).unlink(missing_ok=True)


# ------------------------------------------------------------------ the data files


def list_data_files(output_url: str, storage: StorageOptions) -> dict[str, str]:
    """``{file URL: fingerprint}`` of every Parquet file under ``output_url``.

    Paths with a component starting with ``_`` or ``.`` (``_search/``,
    markers, temp files) are not data.  Raises :class:`SearchError` when there
    is no Parquet file at all.
    """
    fs, root = filesystem_for(output_url, storage)
    try:
        found = fs.find(root, detail=True) if fs.isdir(root) else {}
    except FileNotFoundError:
        found = {}
    files = {}
    for path, info in found.items():
        rel = path[len(root.rstrip("/")) + 1 :]
        if not rel.endswith(".parquet") or any(p.startswith(("_", ".")) for p in rel.split("/")):
            continue
        files[unstrip(fs, path)] = json.dumps(
            [info.get("size"), info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")],
            default=str,
        )
    if not files:
        raise SearchError(f"no Parquet files under {output_url}: nothing to index (is this a job's output URL?)")
    return files


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


# ------------------------------------------------------------------ the rows' columns


@contextlib.contextmanager
def readable_parquet(url: str) -> Iterator[None]:
    """Raises :class:`SearchError` naming ``url`` for pyarrow's errors about what the file holds
    (not Parquet, a corrupt page, a type it cannot read); storage errors pass through."""
    try:
        yield
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
        raise SearchError(f"{url} is not a readable Parquet file ({exc}); move it out of the dataset") from exc


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)


def _is_number(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_null(t)


def _is_id(t: pa.DataType) -> bool:
    return _is_text(t) or pa.types.is_integer(t) and t != pa.uint64()  # SQLite's integers stop at 2**63 - 1


def _is_answers(t: pa.DataType) -> bool:
    if pa.types.is_null(t):
        return True
    if not (pa.types.is_list(t) or pa.types.is_large_list(t)):
        return False
    if pa.types.is_null(t.value_type):  # lists that are all empty
        return True
    if not pa.types.is_struct(t.value_type):
        return False
    fields = {f.name: f.type for f in t.value_type}
    return all(name in fields and _is_text(fields[name]) for name in ("question", "answer"))


# What a hit or a page makes of each column it shows (workers/schema.py's output types, and
# their near relatives); a file holding one of them with another type is refused, by name.
_COLUMN_TYPES: dict[str, tuple[str, Callable[[pa.DataType], bool]]] = {
    schema.ID: ("a string or an integer (not uint64)", _is_id),
    schema.SOURCE: ("a string", _is_text),
    schema.KEY: ("a string", _is_text),
    schema.FRAME_TIME: ("a number", _is_number),
    schema.CAPTION: ("a string", _is_text),
    schema.ANSWERS: ("a list of structs with string fields question and answer", _is_answers),
    schema.STATUS: ("a string", _is_text),
    schema.ERROR_KIND: ("a string", _is_text),
    schema.ERROR: ("a string", _is_text),
}


def check_row_columns(url: str, arrow_schema: pa.Schema, names: Iterable[str]) -> None:
    """:class:`SearchError` naming the column when one of ``names`` that the file has cannot be shown.

    That is: a type other than the job's output gives it (a binary caption, text
    frame times, answers that are not question/answer structs), or a name the
    file holds twice.  Missing columns are fine: their values are None.
    """
    for name in names:
        found = [f for f in arrow_schema if f.name == name]
        if len(found) > 1:
            raise SearchError(f"{url}: column {name!r} appears {len(found)} times")
        if found and name in _COLUMN_TYPES and not _COLUMN_TYPES[name][1](found[0].type):
            raise SearchError(f"{url}: column {name!r} is {found[0].type}, not {_COLUMN_TYPES[name][0]}")


def _text_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def finite_or_none(value: Any) -> float | None:
    """A number as a float; None for NaN, infinities and anything that is not a number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def clean_answers(value: Any) -> list[dict[str, str | None]]:
    """``[{question, answer}]`` of the entries that are mappings; [] for anything that is not a list."""
    if not isinstance(value, list):
        return []
    return [
        {"question": _text_or_none(a.get("question")), "answer": _text_or_none(a.get("answer"))}
        for a in value
        if isinstance(a, dict)
    ]


def clean_row(row: dict[str, Any]) -> dict[str, Any]:
    """The row with the values a page or a hit shows made safe to show.

    Frame times that are not finite numbers become None, answers keep their
    question/answer entries, and text that is not text (from an index someone
    else wrote) becomes None.  Other columns are left as they are.
    """
    out = dict(row)
    for name in (schema.SOURCE, schema.KEY, schema.CAPTION, schema.STATUS, schema.ERROR_KIND, schema.ERROR):
        if name in out:
            out[name] = _text_or_none(out[name])
    if schema.ID in out and not isinstance(out[schema.ID], str | int):
        out[schema.ID] = None
    if schema.FRAME_TIME in out:
        out[schema.FRAME_TIME] = finite_or_none(out[schema.FRAME_TIME])
    if schema.ANSWERS in out:
        out[schema.ANSWERS] = clean_answers(out[schema.ANSWERS]) if out[schema.ANSWERS] is not None else None
    return out


# ------------------------------------------------------------------ the SQLite file


def open_db(path: Path) -> sqlite3.Connection:
    """Open an index for writing, creating its tables; :class:`SearchError` if it is not an index."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), isolation_level=None)
    try:
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, fingerprint TEXT, first_rowid INTEGER,"
            " rows INTEGER, vectors TEXT)"
        )
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise SearchError(f"{path} is not a search index ({exc}); rebuild it with: index --overwrite") from exc
    return conn


def read_meta(conn: sqlite3.Connection) -> dict[str, Any]:
    return {k: json.loads(v) for k, v in conn.execute("SELECT key, value FROM meta")}


def vectors_name(url: str, fingerprint: str) -> str:
    return hashlib.sha1(f"{url}\n{fingerprint}".encode()).hexdigest()[:24] + ".npy"


def save_vectors(location_url: str, storage: StorageOptions, name: str, vectors: np.ndarray) -> None:
    """Write one file's vectors to the index URL atomically (temp + rename locally, one PUT on S3)."""
    fs, path = filesystem_for(join(location_url, VECTORS_DIR, name), storage)
    buf = io.BytesIO()
    np.save(buf, vectors.astype(np.float32, copy=False))
    put_atomic(fs, path, buf.getvalue(), is_local(location_url))
