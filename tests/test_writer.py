"""Hive-partitioned Parquet writer (workers/writer.py): write through Ray Data, read back, compare."""

from __future__ import annotations

import duckdb
import pyarrow as pa
import pyarrow.dataset as pads
import pytest
import ray

from workers import schema
from workers.config import OutputSpec, StorageOptions
from workers.writer import PartitionedParquetSink, conform, count_statuses, output_schema


def _rows(n_shards: int, per_shard: int) -> list[dict]:
    rows = []
    for s in range(n_shards):
        for i in range(per_shard):
            bad = i % 5 == 4
            rows.append(
                {
                    "id": f"s3://b/in/{s:03d}.tar::{i:04d}",
                    "source": f"s3://b/in/{s:03d}.tar",
                    "shard": f"{s:03d}.tar",
                    "key": f"{i:04d}",
                    "caption": None if bad else f"caption {s} {i}",
                    "answers": [] if bad else [{"question": "q?", "answer": f"a{i}"}],
                    "status": "error" if bad else "ok",
                    "error_kind": "truncated_image" if bad else None,
                    "error": "image file is truncated" if bad else None,
                    "width": None if bad else 640,
                    "height": None if bad else 480,
                    "model_id": "tiny-random",
                    "model_revision": None,
                    "url": f"http://example.invalid/{i}.jpg",
                }
            )
    return rows


def _write(rows, url: str, storage: StorageOptions, **output_kwargs) -> PartitionedParquetSink:
    sink = PartitionedParquetSink(OutputSpec(url=url, **output_kwargs), storage, ("url",), run_id="r1")
    table = conform(pa.Table.from_pylist(rows), output_schema(("url",)))
    ray.data.from_arrow(table).repartition(4).write_datasink(sink)
    return sink


def test_round_trip_local_hive_partitions(ray_cluster, tmp_path):
    rows = _rows(3, 10)
    sink = _write(rows, str(tmp_path / "out"), StorageOptions())
    assert sink.counts["rows"] == 30 and sink.counts["ok"] == 24
    assert sink.counts["errors"] == {"truncated_image": 6}

    dirs = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert dirs == ["shard=000.tar", "shard=001.tar", "shard=002.tar"]
    back = pads.dataset(str(tmp_path / "out"), format="parquet", partitioning="hive").to_table()
    assert sorted(back.column("id").to_pylist()) == sorted(r["id"] for r in rows)
    by_id = {r["id"]: r for r in back.to_pylist()}
    for r in rows:
        got = by_id[r["id"]]
        assert got["caption"] == r["caption"] and got["answers"] == r["answers"] and got["url"] == r["url"]
        assert got["shard"] == r["shard"]


def test_duckdb_reads_hive_output(ray_cluster, tmp_path):
    _write(_rows(2, 6), str(tmp_path / "out"), StorageOptions())
    con = duckdb.connect()
    result = con.execute(
        "SELECT shard, count(*), count(caption) "
        f"FROM read_parquet('{tmp_path}/out/**/*.parquet', hive_partitioning=true)"
        " GROUP BY shard ORDER BY shard"
    ).fetchall()
    assert result == [("000.tar", 6, 5), ("001.tar", 6, 5)]


def test_round_trip_s3(ray_cluster, s3_bucket, s3_storage):
    import s3fs

    rows = _rows(2, 7)
    sink = _write(rows, f"s3://{s3_bucket}/out", s3_storage)
    assert sink.counts["rows"] == 14
    fs = s3fs.S3FileSystem(**s3_storage.fsspec_options())
    back = pads.dataset(f"{s3_bucket}/out", format="parquet", partitioning="hive", filesystem=fs).to_table()
    assert sorted(back.column("id").to_pylist()) == sorted(r["id"] for r in rows)


def test_unpartitioned_and_file_size_cap(ray_cluster, tmp_path):
    sink = _write(_rows(1, 25), str(tmp_path / "flat"), StorageOptions(), partition_by="none", max_rows_per_file=10)
    files = sorted((tmp_path / "flat").glob("*.parquet"))
    assert len(files) == sink.counts["files"] >= 3
    assert pads.dataset(str(tmp_path / "flat")).count_rows() == 25


def test_conform_fills_missing_columns_and_orders():
    t = pa.table({"status": ["ok"], "id": ["x"], "source": ["s"], "shard": ["h"], "key": ["k"], "extra": [1]})
    out = conform(t, output_schema())
    assert out.column_names == [f.name for f in schema.OUTPUT_FIELDS]
    assert out.column("caption").null_count == 1


@pytest.mark.parametrize("kinds", [[None, "a", "a", "b"]])
def test_count_statuses(kinds):
    t = pa.table({"status": ["ok", "error", "error", "error"], "error_kind": kinds})
    assert count_statuses(t) == {"rows": 4, "ok": 1, "errors": {"a": 2, "b": 1}}
