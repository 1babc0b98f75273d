"""Where a search index lives and what it is made of: its folder, its SQLite file, its vector files.

The index is a folder, by default ``<output>/_search/``, holding ``index.sqlite``
and ``vectors/<digest>.npy``.  A local index is opened in place; on ``s3://``
the SQLite file is worked on in a local cache folder and uploaded whole (one
PUT, so readers see the old index or the new one), and vector files go
straight to the index URL.  ``workers/search_index.py`` fills it,
``workers/search_query.py`` reads it.
"""

from __future__ import annotations

import hashlib
import io
import json
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np

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
