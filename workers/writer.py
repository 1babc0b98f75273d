"""Write annotated rows as hive-partitioned Parquet and report what was written.

``write_rows`` is the last Ray Data stage, a map over batches run by long-lived
:class:`RowWriter` actors.
For each batch it writes one Parquet file per shard present in the batch:

* ``<output>/shard=<name>/part-<run>-<digest>.parquet`` (``partition_by="shard"``), or
* ``<output>/part-<name>~<run>-<digest>.parquet`` (``partition_by="none"``; ``~`` never
  occurs in shard names, so shard ``a``'s prefix is not also shard ``a-1``'s),

where ``<digest>`` hashes the row ids in the file.  The name is a function of
the run and the rows, so a retried task rewrites the same object instead of
adding a duplicate, and every file belongs to exactly one shard, so a shard's
files can be found (and, when incomplete, removed) by prefix.  Each file
becomes visible atomically: a single PUT on S3; temp file + rename on local
disk.

The stage returns one small *report* row per file written (and one per
shard-end marker row seen), which the driver folds into per-shard completion
markers (``workers/ledger.py``).

Batches mix shards, so a shard's rows arrive as many small files; that keeps
rows durable soon after they are computed.  Once all of a shard's rows are
durable, :func:`compact_shard` rewrites them into as few files as
``OutputSpec.max_rows_per_file`` allows, before the marker names them.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from workers import schema
from workers.config import OutputSpec, StorageOptions
from workers.storage import filesystem_for, is_local, join

PARTITION_COLUMN = schema.SHARD

REPORT_SCHEMA = pa.schema(
    [
        pa.field("shard", pa.string()),
        pa.field("file", pa.string()),  # null on shard-end reports
        pa.field("rows", pa.int64()),
        pa.field("ok", pa.int64()),
        pa.field("errors", pa.string()),  # JSON {error_kind: count}
        pa.field("shard_rows", pa.int64()),  # set on shard-end reports only
        pa.field("source", pa.string()),
    ]
)


def output_schema(passthrough: tuple[str, ...] = ()) -> pa.Schema:
    """Schema of every row the job writes (the partition column included)."""
    return pa.schema(schema.OUTPUT_FIELDS + [pa.field(schema.passthrough_name(n), pa.string()) for n in passthrough])


def conform(table: pa.Table, target: pa.Schema) -> pa.Table:
    """Select and cast ``table``'s columns to ``target``; missing columns become nulls.

    Raises ``pyarrow.ArrowInvalid`` when a column cannot be cast, which would be
    a bug in an upstream stage rather than bad input.
    """
    columns = []
    for f in target:
        if f.name in table.column_names:
            col = table.column(f.name)
            columns.append(col if col.type == f.type else col.cast(f.type))
        else:
            columns.append(pa.nulls(table.num_rows, f.type))
    return pa.Table.from_arrays(columns, schema=pa.schema([pa.field(f.name, f.type) for f in target]))


def count_statuses(table: pa.Table) -> dict[str, Any]:
    """``{"rows": n, "ok": n_ok, "errors": {kind: n}}`` for one table."""
    errors: collections.Counter[str] = collections.Counter()
    failed = table.filter(pc.equal(table.column(schema.STATUS), schema.STATUS_ERROR))
    for kind in failed.column(schema.ERROR_KIND).to_pylist():
        errors[kind or "unknown"] += 1
    return {"rows": table.num_rows, "ok": table.num_rows - failed.num_rows, "errors": dict(errors)}


def shard_file_prefix(output: OutputSpec, root: str, shard: str) -> str:
    """Path prefix shared by all of ``shard``'s files, and by no other shard's."""
    if output.partition_by == "none":
        return join(root, f"part-{shard}~")
    return join(root, f"{PARTITION_COLUMN}={shard}") + "/"


def shard_of_file(output: OutputSpec, root: str, path: str) -> str | None:
    """The shard a data file belongs to, or None for anything that is not a data file."""
    name = path.rsplit("/", 1)[-1]
    if not name.endswith(".parquet") or name.startswith((".", "_")):
        return None
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if output.partition_by == "none":
        if parent.rstrip("/") != root.rstrip("/") or not name.startswith("part-") or "~" not in name:
            return None
        return name[len("part-") :].split("~", 1)[0]
    directory = parent.rsplit("/", 1)[-1]
    if parent.rsplit("/", 1)[0].rstrip("/") != root.rstrip("/") or not directory.startswith(f"{PARTITION_COLUMN}="):
        return None
    return directory[len(PARTITION_COLUMN) + 1 :]


def file_path(output: OutputSpec, root: str, shard: str, run_id: str, ids: list[str]) -> str:
    digest = hashlib.sha1("\n".join(ids).encode()).hexdigest()[:16]
    name = f"{run_id}-{digest}.parquet"
    if output.partition_by == "shard":
        name = f"part-{name}"
    return shard_file_prefix(output, root, shard) + name


def put_atomic(fs, path: str, data: bytes, local: bool) -> None:
    """Store ``data`` at ``path`` so that readers see either nothing or all of it.

    Object stores get one PUT of the finished bytes (an exception while
    serialising never uploads a partial object); local disk gets a hidden temp
    file renamed into place.  Raises the filesystem's error (``OSError`` and
    subclasses) on failure.
    """
    if local:
        parent = path.rsplit("/", 1)[0]
        fs.makedirs(parent, exist_ok=True)
        tmp = f"{parent}/.{path.rsplit('/', 1)[1]}.{uuid.uuid4().hex}.tmp"
        fs.pipe_file(tmp, data)
        fs.mv(tmp, path)
    else:
        fs.pipe_file(path, data)


def write_parquet_atomic(fs, path: str, table: pa.Table, local: bool) -> None:
    """Write ``table`` as Parquet with :func:`put_atomic`; on failure Ray Data
    retries the task, which rewrites the same path."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    put_atomic(fs, path, buf.getvalue(), local)


def write_rows(
    batch: pa.Table, output: OutputSpec, storage: StorageOptions, passthrough: tuple[str, ...], run_id: str
) -> pa.Table:
    """Ray Data UDF: write ``batch``'s rows, return one report row per file and per shard end.

    A shard's rows in the batch become one file, or several of at most
    ``output.max_rows_per_file`` rows.
    """
    reports: list[dict[str, Any]] = []
    is_end = pc.equal(batch.column(schema.STATUS), schema.STATUS_SHARD_END)
    for end in batch.filter(is_end).to_pylist():
        reports.append(
            {"shard": end[schema.SHARD], "file": None, "rows": 0, "ok": 0, "errors": "{}",
             "shard_rows": end[schema.SHARD_ROWS], "source": end[schema.SOURCE]}
        )  # fmt: skip
    data = conform(batch.filter(pc.invert(is_end)), output_schema(passthrough))
    if data.num_rows:
        fs, root = filesystem_for(output.url, storage)
        local = is_local(output.url)
        for shard in sorted(set(data.column(PARTITION_COLUMN).to_pylist())):
            part = data.filter(pc.equal(data.column(PARTITION_COLUMN), shard))
            if output.partition_by == "shard":
                # The partition value lives in the directory name, as hive readers expect.
                part = part.drop_columns([PARTITION_COLUMN])
            part = part.sort_by(schema.ID)
            for start in range(0, part.num_rows, output.max_rows_per_file):
                chunk = part.slice(start, output.max_rows_per_file)
                path = file_path(output, root, shard, run_id, chunk.column(schema.ID).to_pylist())
                write_parquet_atomic(fs, path, chunk, local)
                counts = count_statuses(chunk)
                reports.append(
                    {"shard": shard, "file": path, "rows": counts["rows"], "ok": counts["ok"],
                     "errors": json.dumps(counts["errors"], sort_keys=True), "shard_rows": None,
                     "source": None}
                )  # fmt: skip
    return pa.Table.from_pylist(reports, schema=REPORT_SCHEMA)


class RowWriter:
    """Ray Data callable class: :func:`write_rows` in a long-lived actor (one per writer in the pool).

    Errors propagate from :func:`write_rows` unchanged.
    """

    def __init__(self, output: OutputSpec, storage: StorageOptions, passthrough: tuple[str, ...], run_id: str):
        self.output, self.storage, self.passthrough, self.run_id = output, storage, passthrough, run_id

    def __call__(self, batch: pa.Table) -> pa.Table:
        return write_rows(batch, self.output, self.storage, self.passthrough, self.run_id)


def compact_shard(fs, output: OutputSpec, root: str, shard: str, files: dict[str, int], run_id: str) -> list[str]:
    """Rewrite one complete shard's ``files`` (path -> rows) as ``ceil(rows / max_rows_per_file)`` files.

    Returns the paths that now hold the shard's rows.

    Files are read one at a time in path order and cut every
    ``max_rows_per_file`` rows, so memory stays at one output file.  The input
    files are left in place: the ledger deletes them only after the new ones
    are durable, and a crash in between leaves a shard without a marker, which
    a rerun redoes.  Already as few files as the limit allows: returns them unchanged.
    Raises the filesystem's ``OSError`` on failure.
    """
    limit = output.max_rows_per_file
    if len(files) <= max(1, -(-sum(files.values()) // limit)):
        return sorted(files)
    local = is_local(output.url)
    written: list[str] = []
    pending: list[pa.Table] = []
    held = 0

    def flush(table: pa.Table) -> None:
        path = file_path(output, root, shard, run_id, table.column(schema.ID).to_pylist())
        write_parquet_atomic(fs, path, table, local)
        written.append(path)

    for path in sorted(files):
        table = pq.read_table(io.BytesIO(fs.cat_file(path)))
        pending.append(table)
        held += table.num_rows
        while held >= limit:
            merged = pa.concat_tables(pending)
            flush(merged.slice(0, limit))
            rest = merged.slice(limit)
            pending, held = ([rest] if rest.num_rows else []), rest.num_rows
    if held:
        flush(pa.concat_tables(pending))
    return written
