"""Write annotated rows as hive-partitioned Parquet and count what was written.

A Ray Data ``Datasink``: each write task groups its rows by partition value
(the input shard by default) and writes one Parquet file per partition under
``<output>/shard=<name>/``.  File names are ``part-<run>-<task>-<n>.parquet``:
deterministic for a given run and write task, so a retried task overwrites its
own files instead of adding duplicates.  Every file becomes visible atomically
(a single PUT on S3; temp file + rename on local disk), so readers never see a
half-written file.

The per-task counts (rows, ok, errors by kind) travel back to the driver in the
write results, which is how the job summary is made without reading the output
again.
"""

from __future__ import annotations

import collections
import uuid
from collections.abc import Iterable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray.data.block import Block, BlockAccessor
from ray.data.datasource import Datasink
from ray.data.datasource.datasink import WriteResult

from workers import schema
from workers.config import OutputSpec, StorageOptions
from workers.storage import filesystem_for, join, protocol_of

PARTITION_COLUMN = schema.SHARD


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
    mask = pc.equal(table.column(schema.STATUS), schema.STATUS_ERROR)
    failed = table.filter(mask)
    for kind in failed.column(schema.ERROR_KIND).to_pylist():
        errors[kind or "unknown"] += 1
    return {"rows": table.num_rows, "ok": table.num_rows - failed.num_rows, "errors": dict(errors)}


def merge_counts(counts: Iterable[dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {"rows": 0, "ok": 0, "errors": collections.Counter(), "files": 0}
    for c in counts:
        total["rows"] += c["rows"]
        total["ok"] += c["ok"]
        total["files"] += c.get("files", 0)
        total["errors"].update(c["errors"])
    total["errors"] = dict(sorted(total["errors"].items()))
    return total


class PartitionedParquetSink(Datasink[dict]):
    """Datasink writing ``OUTPUT_FIELDS`` (+ passthrough columns) as hive-partitioned Parquet.

    After ``write_datasink`` returns, :attr:`counts` holds the merged counts of
    all write tasks.  A failing write raises (Ray Data retries the task; with
    deterministic names the retry replaces the partial attempt's files).
    """

    def __init__(self, output: OutputSpec, storage: StorageOptions, passthrough: tuple[str, ...], run_id: str):
        self.output = output
        self.storage = storage
        self.passthrough = passthrough
        self.run_id = run_id
        self.counts: dict[str, Any] | None = None

    @property
    def min_rows_per_write(self) -> int:
        # Bundle small blocks so a write task makes few, reasonably sized files
        # (one per partition it touches), never a file per batch.
        return min(self.output.max_rows_per_file, 10_000)

    def write(self, blocks: Iterable[Block], ctx) -> dict:
        target = output_schema(self.passthrough)
        tables = [conform(BlockAccessor.for_block(b).to_arrow(), target) for b in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return {"rows": 0, "ok": 0, "errors": {}, "files": 0}
        table = pa.concat_tables(tables)
        fs, root = filesystem_for(self.output.url, self.storage)
        files = 0
        for subdir, part in self._partitions(table):
            for start in range(0, part.num_rows, self.output.max_rows_per_file):
                chunk = part.slice(start, self.output.max_rows_per_file)
                name = f"part-{self.run_id}-{ctx.task_idx:06d}-{files:04d}.parquet"
                self._write_file(fs, join(root, subdir, name) if subdir else join(root, name), chunk)
                files += 1
        counts = count_statuses(table)
        counts["files"] = files
        return counts

    def _partitions(self, table: pa.Table):
        if self.output.partition_by == "none":
            yield "", table
            return
        # The partition value lives in the directory name, not in the file, as
        # hive-partitioned readers (pyarrow, DuckDB, Spark) expect.
        for value in sorted(set(table.column(PARTITION_COLUMN).to_pylist())):
            part = table.filter(pc.equal(table.column(PARTITION_COLUMN), value))
            yield f"{PARTITION_COLUMN}={value}", part.drop_columns([PARTITION_COLUMN])

    def _write_file(self, fs, path: str, table: pa.Table) -> None:
        parent = path.rsplit("/", 1)[0]
        if protocol_of(self.output.url) == "file":
            fs.makedirs(parent, exist_ok=True)
            tmp = f"{parent}/.{path.rsplit('/', 1)[1]}.{uuid.uuid4().hex}.tmp"
            with fs.open(tmp, "wb") as f:
                pq.write_table(table, f, compression="zstd")
            fs.mv(tmp, path)
        else:
            with fs.open(path, "wb") as f:
                pq.write_table(table, f, compression="zstd")

    def on_write_complete(self, write_result: WriteResult[dict]) -> None:
        self.counts = merge_counts(write_result.write_returns)
