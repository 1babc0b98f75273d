"""Read one shard into Arrow tables of the reader schema (runs inside Ray tasks).

:func:`read_shard` yields ``pyarrow.Table`` batches whose schema is exactly
``read_schema(spec.passthrough_columns)``.  A bad sample becomes an error row
(``status="error"`` with an ``error_kind``) instead of failing the task, and a
shard that cannot be read to its end yields the rows read so far followed by
one shard error row (key ``""``).  Only I/O and format errors are turned into
rows; a bug in this module still raises.

Tar shards are read as a stream: nothing is extracted to disk, members are
only ever read as bytes or text (never unpickled), links and device members
are never followed, and a member larger than ``spec.max_member_bytes`` is
skipped over without being held in memory.
"""

from __future__ import annotations

import json
import posixpath
import re
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from workers.config import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, InputSpec, StorageOptions
from workers.listing import IMAGES, PARQUET, WEBDATASET, ShardRef
from workers.schema import (
    BAD_QUESTIONS,
    DUPLICATE_KEY,
    EMPTY_FILE,
    EMPTY_SHARD,
    ERROR,
    ERROR_KIND,
    ID,
    IMAGE,
    KEY,
    MEDIA,
    MEMBER_TOO_LARGE,
    MISSING_IMAGE,
    MISSING_IMAGE_COLUMN,
    MISSING_KEY,
    MISSING_KEY_COLUMN,
    READ_ERROR,
    ROW_QUESTIONS,
    SHARD,
    SHARD_READ_ERROR,
    SHARD_UNREADABLE,
    SOURCE,
    STATUS,
    STATUS_ERROR,
    STATUS_OK,
    UNSAFE_MEMBER,
    passthrough_name,
    read_schema,
)
from workers.storage import filesystem_for, refuse_command_url, relative_path

# What reading a shard may legitimately raise: storage and format errors.
# (tarfile turns zlib/bz2/lzma errors into ReadError; the rest can surface as-is.)
SHARD_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error, pa.ArrowException)


class StorageReads:
    """The storage calls of one shard read, so a failure can be told apart from bad bytes.

    Both raise ``OSError`` (pyarrow reports a corrupt page as one, s3fs an S3
    failure past its retries), so what counts is where it was raised: in a
    call to the filesystem or its file object (``shard_read_error``, which a
    rerun may get past) or while parsing the bytes (``shard_unreadable``).
    """

    def __init__(self) -> None:
        self.failed = False

    def call(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except OSError:
            self.failed = True
            raise

    def open(self, fs, path: str) -> TracedFile:
        return TracedFile(self.call(fs.open, path, "rb"), self)

    def kind(self) -> str:
        return SHARD_READ_ERROR if self.failed else SHARD_UNREADABLE


class TracedFile:
    """A storage file object whose reads go through :meth:`StorageReads.call`."""

    def __init__(self, f, reads: StorageReads) -> None:
        self._f, self._reads = f, reads

    def read(self, *args):
        return self._reads.call(self._f.read, *args)

    def seek(self, *args):
        return self._reads.call(self._f.seek, *args)

    def __getattr__(self, name: str):
        return getattr(self._f, name)

    def __enter__(self) -> TracedFile:
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()


IMAGE_COLUMN_CANDIDATES = ("jpg", "jpeg", "png", "webp", "image", "image_bytes", "img", "bytes")
# img2dataset's Parquet names each sample in a "key" column: without a
# key_column setting it is used when present (as text or an integer), else the row index.
KEY_COLUMN_CANDIDATES = ("key",)
# Image files fetched per request group: concurrent on S3, bounded memory.
_FETCH_GROUP = 16


def read_shard(shard: ShardRef, spec: InputSpec, storage: StorageOptions, batch_rows: int = 256) -> Iterator[pa.Table]:
    """Yield the shard's samples as tables of at most ``batch_rows`` rows, in shard order.

    A shard with no samples (e.g. a tar holding only ``.txt`` members) yields
    nothing.  Raises ``ValueError`` only for arguments no listing produces
    (unknown format, command-running scheme).
    """
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be >= 1, got {batch_rows}")
    for uri in (shard.uri, *shard.files):
        refuse_command_url(uri, "shard input")
    if shard.format == WEBDATASET:
        rows = _tar_rows(shard, spec, storage)
    elif shard.format == PARQUET:
        rows = _parquet_rows(shard, spec, storage, batch_rows)
    elif shard.format == IMAGES:
        rows = _image_rows(shard, spec, storage)
    else:
        raise ValueError(f"shard {shard.uri!r}: unknown format {shard.format!r}")
    yield from _batched(rows, read_schema(spec.passthrough_columns), batch_rows)


# --------------------------------------------------------------------------- rows


def _batched(rows: Iterable[dict[str, Any]], schema: pa.Schema, batch_rows: int) -> Iterator[pa.Table]:
    buf: list[dict[str, Any]] = []
    for row in rows:
        buf.append(row)
        if len(buf) >= batch_rows:
            yield pa.Table.from_pylist(buf, schema=schema)
            buf = []
    if buf:
        yield pa.Table.from_pylist(buf, schema=schema)


def _row(
    shard: ShardRef,
    spec: InputSpec,
    *,
    source: str,
    key: str,
    image: bytes | None = None,
    kind: str | None = None,
    error: str | None = None,
    questions: list[str] | None = None,
    extra: dict[str, str | None] | None = None,
    media: str | None = None,
) -> dict[str, Any]:
    row: dict[str, Any] = {
        ID: f"{source}::{key}",
        SOURCE: source,
        SHARD: shard.name,
        KEY: key,
        IMAGE: image if kind is None else None,
        STATUS: STATUS_OK if kind is None else STATUS_ERROR,
        ERROR_KIND: kind,
        ERROR: error,
        ROW_QUESTIONS: questions if kind is None else None,
        MEDIA: media,
    }
    extra = extra or {}
    for name in spec.passthrough_columns:
        row[passthrough_name(name)] = extra.get(name)
    return row


def video_file_row(shard: ShardRef, spec: InputSpec) -> dict[str, Any]:
    """The reader row of a video file shard (or span): its frames' rows are made from it."""
    return _row(shard, spec, source=shard.uri, key=relative_path(shard.uri, shard.root), media="video")


def _shard_error(shard: ShardRef, spec: InputSpec, kind: str, error: str) -> dict[str, Any]:
    return _row(shard, spec, source=shard.uri, key="", kind=kind, error=error)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class _Keys:
    """Keys already used in one shard; a repeated key gets a unique ``#dupN`` suffix."""

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def claim(self, key: str) -> tuple[str, bool]:
        """``(key to use, was it a duplicate)``.  The returned key is never handed out again."""
        if key not in self._seen:
            self._seen.add(key)
            return key, False
        n = 2
        while f"{key}#dup{n}" in self._seen:
            n += 1
        unique = f"{key}#dup{n}"
        self._seen.add(unique)
        return unique, True


def parse_questions(value: Any) -> list[str] | None:
    """Per-row questions from a JSON list of strings, a list, or newline-separated text.

    Returns None when there are none; raises ``ValueError`` for anything else.
    """
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str):
        text = value.strip()
        if text.startswith(("[", "{", '"')):
            value = json.loads(text)  # json.JSONDecodeError is a ValueError
            if isinstance(value, str):
                value = [value]
        else:
            value = text.splitlines()
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"expected a list of strings, got {type(value).__name__}")
    out = []
    for item in value:
        if not isinstance(item, str):
            raise ValueError(f"expected a list of strings, got an item of type {type(item).__name__}")
        if item.strip():
            out.append(item.strip())
    return out or None


def _to_text(value: Any) -> str | None:
    """A passthrough value as a string (JSON for nested values)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, ensure_ascii=False, default=str)
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


def _clean(name: str) -> str:
    """Make a tar member name valid UTF-8 (tarfile keeps undecodable bytes as surrogates)."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


# --------------------------------------------------------------------------- webdataset


@dataclass
class _Sample:
    key: str
    image_seen: bool = False  # an image member was found (even if unusable)
    image: bytes | None = None
    media: str | None = None  # "video" when the media member is a video
    texts: dict[str, str] = field(default_factory=dict)  # passthrough column -> text
    questions: str | None = None
    kind: str | None = None
    error: str | None = None

    def fail(self, kind: str, error: str) -> None:
        if self.kind is None:  # the first problem is the one reported
            self.kind, self.error = kind, error


def split_key(name: str) -> tuple[str, str] | None:
    """WebDataset's rule: ``a/b/x.0001.jpg`` -> ``("a/b/x", "0001.jpg")``.

    The key is the path up to the first ``.`` of the basename.  Names without
    an extension, or whose basename starts with ``.``, belong to no sample.
    """
    while name.startswith("./"):
        name = name[2:]
    directory, base = posixpath.split(name)
    if "." not in base or base.startswith("."):
        return None
    stem, ext = base.split(".", 1)
    return (f"{directory}/{stem}" if directory else stem), ext


def _unsafe_name(name: str) -> str | None:
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return "absolute member name"
    if ".." in re.split(r"[/\\]", name):
        return "member name contains '..'"
    return None


def _member_kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return f"symlink to {member.linkname!r}"
    if member.islnk():
        return f"hard link to {member.linkname!r}"
    if member.isdev():
        return "device or FIFO"
    return f"tar type {member.type!r}"


class _TarSamples:
    """Groups a stream of tar members into samples and turns each into a row."""

    def __init__(self, shard: ShardRef, spec: InputSpec) -> None:
        self.shard = shard
        self.spec = spec
        self.current: _Sample | None = None
        self.done: list[dict[str, Any]] = []  # rows of completed samples, not yet handed out
        self.keys = _Keys()
        self.members = 0
        self.passthrough = {name.lower(): name for name in spec.passthrough_columns}
        q = spec.questions_column.lower() if spec.questions_column else None
        self.question_exts = {q, f"{q}.json", f"{q}.txt"} if q else set()

    def add(self, member: tarfile.TarInfo, tf: tarfile.TarFile) -> None:
        """Consume one member.  The row of a sample it completes goes to ``self.done``
        before this member's data is read, so a read that fails keeps that row."""
        self.members += 1
        if member.isdir():
            return
        name = _clean(member.name)
        parts = split_key(name)
        if parts is None:
            return
        key, ext = parts
        if self.current is None or self.current.key != key:
            self.flush()
            self.current = _Sample(key)
        sample = self.current
        ext_low = ext.lower()
        suffix = "." + ext_low.rsplit(".", 1)[-1]
        is_video = suffix in VIDEO_EXTENSIONS
        is_image = suffix in IMAGE_EXTENSIONS or is_video  # the sample's media member
        if is_image:
            if sample.image_seen:
                return  # only the first image or video member of a sample is used
            sample.image_seen = True
            sample.media = "video" if is_video else None
        elif ext_low not in self.question_exts and ext_low not in self.passthrough:
            return  # a member this job does not use (.cls, .pth, ...): never read
        unsafe = _unsafe_name(name)
        if unsafe:
            sample.fail(UNSAFE_MEMBER, f"{name!r}: {unsafe}")
            return
        if not member.isfile():
            if is_image:
                sample.fail(UNSAFE_MEMBER, f"{name!r}: image member is a {_member_kind(member)}, not a file")
            return  # links and devices are never followed
        if member.size > self.spec.max_member_bytes:
            sample.fail(
                MEMBER_TOO_LARGE,
                f"{name!r}: {member.size} bytes exceeds max_member_bytes={self.spec.max_member_bytes}",
            )
            return
        fobj = tf.extractfile(member)
        data = fobj.read() if fobj is not None else b""
        if is_image:
            sample.image = data
        elif ext_low in self.question_exts:
            sample.questions = data.decode("utf-8", "replace")
        else:
            sample.texts[self.passthrough[ext_low]] = data.decode("utf-8", "replace")

    def drain(self) -> list[dict[str, Any]]:
        out, self.done = self.done, []
        return out

    def flush(self) -> None:
        """Finish the current sample.  Samples without an image member produce no row."""
        sample, self.current = self.current, None
        if sample is None:
            return
        key, duplicate = self.keys.claim(sample.key)
        if not sample.image_seen:
            return  # no image member (only .txt, .cls, .pth, ...): not a sample for us
        if sample.image is None and sample.kind is None and not duplicate:
            return  # the image member's read was cut short: the shard error row reports it
        if duplicate:
            sample.kind, sample.error = (
                DUPLICATE_KEY,
                f"key {sample.key!r} appears again, not next to its earlier members (kept the first)",
            )
        elif sample.kind is None and sample.image is not None and not sample.image:
            sample.fail(EMPTY_FILE, f"key {sample.key!r}: the image member is empty")
        questions = None
        if sample.kind is None and sample.questions is not None:
            try:
                questions = parse_questions(sample.questions)
            except ValueError as exc:
                sample.fail(BAD_QUESTIONS, f"key {sample.key!r}: questions member: {exc}")
        self.done.append(
            _row(
                self.shard,
                self.spec,
                source=self.shard.uri,
                key=key,
                image=sample.image,
                kind=sample.kind,
                error=sample.error,
                questions=questions,
                extra=sample.texts,
                media=sample.media,
            )
        )


def _tar_rows(shard: ShardRef, spec: InputSpec, storage: StorageOptions) -> Iterator[dict[str, Any]]:
    samples = _TarSamples(shard, spec)
    reads = StorageReads()
    try:
        fs, path = filesystem_for(shard.uri, storage)
        if reads.call(fs.size, path) == 0:
            yield _shard_error(shard, spec, EMPTY_SHARD, f"{shard.uri} is empty (0 bytes)")
            return
        with reads.open(fs, path) as f, tarfile.open(fileobj=f, mode="r|*") as tf:
            for member in tf:  # streaming: each member's data is read (or skipped) in order
                samples.add(member, tf)
                yield from samples.drain()
    except SHARD_ERRORS as exc:
        # Whatever was complete before the failure is still good.
        samples.flush()
        yield from samples.drain()
        error = f"{_describe(exc)} (after {samples.members} tar member(s))"
        yield _shard_error(shard, spec, reads.kind(), error)
        return
    samples.flush()
    yield from samples.drain()


# --------------------------------------------------------------------------- parquet


def _is_binary(t: pa.DataType) -> bool:
    return (
        pa.types.is_binary(t)
        or pa.types.is_large_binary(t)
        or pa.types.is_fixed_size_binary(t)
        or pa.types.is_binary_view(t)
    )


def _image_field_ok(t: pa.DataType) -> bool:
    """Raw bytes, or a Hugging Face ``Image`` struct ``{bytes, path}``."""
    if _is_binary(t):
        return True
    if pa.types.is_struct(t):
        index = t.get_field_index("bytes")
        return index >= 0 and _is_binary(t.field(index).type)
    return False


def _image_column(schema: pa.Schema, wanted: str | None) -> tuple[str | None, str]:
    """``(column, "")`` or ``(None, reason)``."""
    available = ", ".join(f"{f.name}: {f.type}" for f in schema)
    if wanted is not None:
        if wanted not in schema.names:
            return None, f"image column {wanted!r} not found; available columns: [{available}]"
        t = schema.field(wanted).type
        if not _image_field_ok(t):
            return None, f"image column {wanted!r} has type {t}, expected binary or struct<bytes: binary>"
        return wanted, ""
    for name in IMAGE_COLUMN_CANDIDATES:
        if name in schema.names and _image_field_ok(schema.field(name).type):
            return name, ""
    return None, (
        f"no image column found (looked for binary columns {list(IMAGE_COLUMN_CANDIDATES)}); "
        f"available columns: [{available}]; set image_column"
    )


def _auto_key_column(schema: pa.Schema) -> str | None:
    """The first of :data:`KEY_COLUMN_CANDIDATES` holding text or integers, or None (keys = row index)."""
    for name in KEY_COLUMN_CANDIDATES:
        if name in schema.names:
            t = schema.field(name).type
            if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t):
                return name
    return None


def _image_bytes(value: Any) -> tuple[bytes | None, str]:
    if isinstance(value, dict):  # HF Image struct
        data = value.get("bytes")
        if data is None:
            path = value.get("path")
            return None, f"image struct has no bytes (path {path!r} is not fetched)" if path else "image is null"
        return data, ""
    if value is None:
        return None, "image is null"
    return value, ""


def _parquet_rows(
    shard: ShardRef, spec: InputSpec, storage: StorageOptions, batch_rows: int
) -> Iterator[dict[str, Any]]:
    keys = _Keys()
    index = 0
    reads = StorageReads()
    try:
        fs, path = filesystem_for(shard.uri, storage)
        if reads.call(fs.size, path) == 0:
            yield _shard_error(shard, spec, EMPTY_SHARD, f"{shard.uri} is empty (0 bytes)")
            return
        with reads.open(fs, path) as f:
            pf = pq.ParquetFile(f)
            schema = pf.schema_arrow
            image_col, reason = _image_column(schema, spec.image_column)
            if image_col is None:
                yield _shard_error(shard, spec, MISSING_IMAGE_COLUMN, reason)
                return
            key_col = spec.key_column if spec.key_column is not None else _auto_key_column(schema)
            if key_col is not None and key_col not in schema.names:
                yield _shard_error(
                    shard,
                    spec,
                    MISSING_KEY_COLUMN,
                    f"key column {key_col!r} not found; available columns: {schema.names}",
                )
                return
            q_col = spec.questions_column if spec.questions_column in schema.names else None
            passthrough = [c for c in spec.passthrough_columns if c in schema.names]
            columns = list(
                dict.fromkeys([image_col, *([key_col] if key_col else []), *passthrough, *([q_col] if q_col else [])])
            )
            for batch in pf.iter_batches(batch_size=batch_rows, columns=columns):
                data = {name: batch.column(name).to_pylist() for name in columns}
                for i in range(batch.num_rows):
                    yield _parquet_row(shard, spec, data, i, index, image_col, key_col, q_col, passthrough, keys)
                    index += 1
    except SHARD_ERRORS as exc:
        yield _shard_error(shard, spec, reads.kind(), f"{_describe(exc)} (after {index} row(s))")


def _parquet_row(
    shard: ShardRef,
    spec: InputSpec,
    data: dict[str, list[Any]],
    i: int,
    index: int,
    image_col: str,
    key_col: str | None,
    q_col: str | None,
    passthrough: list[str],
    keys: _Keys,
) -> dict[str, Any]:
    kind = error = None
    if key_col is None:
        raw_key = f"{index:09d}"
    else:
        raw_key = _to_text(data[key_col][i])
        if not raw_key:  # null, or "" (which would collide with the shard error row's id)
            kind, error = (
                MISSING_KEY,
                f"row {index}: key column {key_col!r} is {'null' if raw_key is None else 'empty'}",
            )
            raw_key = f"{index:09d}"
    key, duplicate = keys.claim(raw_key)
    if duplicate:
        kind, error = DUPLICATE_KEY, f"row {index}: key {raw_key!r} appeared earlier in this file"
    extra = {c: _to_text(data[c][i]) for c in passthrough}
    image, reason = _image_bytes(data[image_col][i])
    if kind is None and image is None:
        kind, error = MISSING_IMAGE, f"row {index}: {reason}"
    elif kind is None and not image:
        kind, error = EMPTY_FILE, f"row {index}: the image is empty"
    questions = None
    if kind is None and q_col is not None:
        try:
            questions = parse_questions(data[q_col][i])
        except ValueError as exc:
            kind, error = BAD_QUESTIONS, f"row {index}: questions column {q_col!r}: {exc}"
    return _row(
        shard,
        spec,
        source=shard.uri,
        key=key,
        image=image,
        kind=kind,
        error=error,
        questions=questions,
        extra=extra,
    )


# --------------------------------------------------------------------------- image folders


def _image_rows(shard: ShardRef, spec: InputSpec, storage: StorageOptions) -> Iterator[dict[str, Any]]:
    limit = spec.max_member_bytes
    for start in range(0, len(shard.files), _FETCH_GROUP):
        uris = list(shard.files[start : start + _FETCH_GROUP])
        fs, _ = filesystem_for(uris[0], storage)
        paths = [filesystem_for(u, storage)[1] for u in uris]
        # One ranged read per file (concurrent on S3); reading limit+1 bytes
        # tells "too large" apart without ever holding a huge file.
        results = fs.cat_ranges(paths, [0] * len(paths), [limit + 1] * len(paths), on_error="return")
        for uri, path, result in zip(uris, paths, results, strict=True):
            key = relative_path(uri, shard.root)
            if isinstance(result, BaseException) and not isinstance(result, OSError):
                raise result  # not a storage error: a bug, do not hide it
            data, kind, error = _classify_read(fs, path, limit, result)
            yield _row(shard, spec, source=uri, key=key, image=data, kind=kind, error=error)


def _classify_read(
    fs: Any, path: str, limit: int, result: bytes | OSError
) -> tuple[bytes | None, str | None, str | None]:
    """``(bytes, None, None)`` for a good read, else ``(None, error_kind, error)``."""
    if isinstance(result, OSError):
        # S3 refuses any byte range of an empty object, so look before calling it unreadable.
        try:
            size = fs.size(path)
            if size == 0:
                result = b""
            elif size is not None and size > limit:
                return None, MEMBER_TOO_LARGE, f"{size} bytes exceeds max_member_bytes={limit}"
            else:
                result = fs.cat_file(path)
        except OSError as exc:
            return None, READ_ERROR, _describe(exc)
    if len(result) > limit:
        return None, MEMBER_TOO_LARGE, f"file exceeds max_member_bytes={limit}"
    if not result:
        return None, EMPTY_FILE, "the file is empty"
    return result, None, None
