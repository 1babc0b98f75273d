"""Parquet writer stage (workers/writer.py): write through Ray Data, read back, compare."""

from __future__ import annotations

import json

import duckdb
import pyarrow as pa
import pyarrow.dataset as pads
import pytest
import ray

from workers import schema
from workers.config import OutputSpec, StorageOptions
from workers.writer import REPORT_SCHEMA, conform, count_statuses, output_schema, write_rows


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
        rows.append({"id": f"s3://b/in/{s:03d}.tar::<end>", "source": f"s3://b/in/{s:03d}.tar",
                     "shard": f"{s:03d}.tar", "key": "", "status": "shard_end", "shard_rows": per_shard})  # fmt: skip
    return rows


def _table(rows) -> pa.Table:
    target = pa.schema([*output_schema(("url",)), pa.field(schema.SHARD_ROWS, pa.int64())])
    return conform(pa.Table.from_pylist(rows, schema=target), target)


def _write(rows, url: str, storage: StorageOptions, **output_kwargs) -> pa.Table:
    output = OutputSpec(url=url, **output_kwargs)
    kwargs = {"output": output, "storage": storage, "passthrough": ("url",), "run_id": "r1"}
    ds = ray.data.from_arrow(_table(rows)).repartition(4)
    return pa.Table.from_pylist(
        ds.map_batches(write_rows, fn_kwargs=kwargs, batch_format="pyarrow", batch_size=9).take_all(),
        schema=REPORT_SCHEMA,
    )


def test_round_trip_local_hive_partitions(ray_cluster, tmp_path):
    rows = _rows(3, 10)
    reports = _write(rows, str(tmp_path / "out"), StorageOptions()).to_pylist()
    ends = {r["shard"]: r["shard_rows"] for r in reports if r["file"] is None}
    assert ends == {"000.tar": 10, "001.tar": 10, "002.tar": 10}
    files = [r for r in reports if r["file"] is not None]
    assert sum(r["rows"] for r in files) == 30 and sum(r["ok"] for r in files) == 24
    assert all(r["file"].startswith(f"{tmp_path}/out/shard={r['shard']}/part-r1-") for r in files)

    dirs = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert dirs == ["shard=000.tar", "shard=001.tar", "shard=002.tar"]
    back = pads.dataset(str(tmp_path / "out"), format="parquet", partitioning="hive").to_table()
    data_rows = [r for r in rows if r["status"] != "shard_end"]
    assert sorted(back.column("id").to_pylist()) == sorted(r["id"] for r in data_rows)
    by_id = {r["id"]: r for r in back.to_pylist()}
    for r in data_rows:
        got = by_id[r["id"]]
        assert got["caption"] == r["caption"] and got["answers"] == r["answers"] and got["url"] == r["url"]
        assert got["shard"] == r["shard"]
    assert "shard_rows" not in back.column_names


def test_rewriting_the_same_rows_replaces_the_same_files(ray_cluster, tmp_path):
    """A retried write task produces the same names, so it cannot duplicate rows."""
    rows = _rows(2, 6)
    first = sorted(r["file"] for r in _write(rows, str(tmp_path / "o"), StorageOptions()).to_pylist() if r["file"])
    second = sorted(r["file"] for r in _write(rows, str(tmp_path / "o"), StorageOptions()).to_pylist() if r["file"])
    assert first == second
    assert pads.dataset(str(tmp_path / "o"), partitioning="hive").count_rows() == 12


def test_duckdb_reads_hive_output(ray_cluster, tmp_path):
    _write(_rows(2, 6), str(tmp_path / "out"), StorageOptions())
    result = duckdb.sql(
        "SELECT shard, count(*), count(caption) "
        f"FROM read_parquet('{tmp_path}/out/**/*.parquet', hive_partitioning=true) GROUP BY shard ORDER BY shard"
    ).fetchall()
    assert result == [("000.tar", 6, 5), ("001.tar", 6, 5)]


def test_round_trip_s3(ray_cluster, s3_bucket, s3_storage):
    import s3fs

    rows = _rows(2, 7)
    _write(rows, f"s3://{s3_bucket}/out", s3_storage)
    fs = s3fs.S3FileSystem(**s3_storage.fsspec_options())
    back = pads.dataset(f"{s3_bucket}/out", format="parquet", partitioning="hive", filesystem=fs).to_table()
    assert sorted(back.column("id").to_pylist()) == sorted(r["id"] for r in rows if r["status"] != "shard_end")


def test_unpartitioned_files_are_named_by_shard(ray_cluster, tmp_path):
    reports = _write(_rows(2, 5), str(tmp_path / "flat"), StorageOptions(), partition_by="none").to_pylist()
    names = sorted(p.name for p in (tmp_path / "flat").glob("*.parquet"))
    assert names and all(n.startswith(("part-000.tar~r1-", "part-001.tar~r1-")) for n in names)
    assert len(names) == len([r for r in reports if r["file"]])
    assert pads.dataset(str(tmp_path / "flat")).count_rows() == 10


def test_write_rows_reports_error_kinds(tmp_path):
    table = _table(_rows(1, 10))
    out = OutputSpec(url=str(tmp_path / "o"))
    reports = write_rows(table, out, StorageOptions(), ("url",), "r2").to_pylist()
    (file_report,) = [r for r in reports if r["file"]]
    assert json.loads(file_report["errors"]) == {"truncated_image": 2}
    assert (file_report["rows"], file_report["ok"]) == (10, 8)


def test_conform_fills_missing_columns_and_orders():
    t = pa.table({"status": ["ok"], "id": ["x"], "source": ["s"], "shard": ["h"], "key": ["k"], "extra": [1]})
    out = conform(t, output_schema())
    assert out.column_names == [f.name for f in schema.OUTPUT_FIELDS]
    assert out.column("caption").null_count == 1


@pytest.mark.parametrize("kinds", [[None, "a", "a", "b"]])
def test_count_statuses(kinds):
    t = pa.table({"status": ["ok", "error", "error", "error"], "error_kind": kinds})
    assert count_statuses(t) == {"rows": 4, "ok": 1, "errors": {"a": 2, "b": 1}}


@pytest.mark.parametrize("partition_by", ["shard", "none"])
@pytest.mark.parametrize("on_s3", [False, True], ids=["local", "s3"])
def test_compact_shard_rewrites_small_files_into_as_few_as_the_limit_allows(
    tmp_path, s3_bucket, s3_storage, on_s3, partition_by
):
    from workers.storage import filesystem_for
    from workers.writer import compact_shard, shard_of_file

    url = f"s3://{s3_bucket}/o" if on_s3 else str(tmp_path / "o")
    storage = s3_storage if on_s3 else StorageOptions()
    output = OutputSpec(url=url, partition_by=partition_by, max_rows_per_file=25)
    rows = [r for r in _rows(2, 60) if r["status"] != "shard_end"]
    reports = write_rows(_table(rows).slice(0, 7), output, storage, ("url",), "r1")
    for start in range(7, len(rows), 13):  # small, uneven write batches, as Ray Data hands them over
        more = write_rows(_table(rows).slice(start, 13), output, storage, ("url",), "r1")
        reports = pa.concat_tables([reports, more])
    fs, root = filesystem_for(url, storage)
    mine = {r["file"]: r["rows"] for r in reports.to_pylist() if r["shard"] == "000.tar"}
    assert len(mine) > 3 and sum(mine.values()) == 60

    files = compact_shard(fs, output, root, "000.tar", mine, "r2")
    counts = sorted(pads.dataset(f, filesystem=fs).count_rows() for f in (p.split("://")[-1] for p in files))
    assert counts == [10, 25, 25]  # ceil(60 / 25) files, none above the limit
    assert {shard_of_file(output, root, f) for f in files} == {"000.tar"}
    got = pa.concat_tables([pads.dataset(f, filesystem=fs).to_table() for f in files])
    want = _table(rows).filter(pa.compute.equal(_table(rows).column("shard"), "000.tar"))
    assert sorted(got.column("id").to_pylist()) == sorted(want.column("id").to_pylist())
    assert got.column("caption").to_pylist().count(None) == 12  # error rows survive the rewrite
    # The small files are still there: the ledger deletes them only after the marker's files are durable.
    assert all(fs.exists(f) for f in mine)
    # Already as few files as the limit allows: nothing is rewritten.
    minimal = dict(zip(files, [25, 25, 10], strict=True))  # in the order compact_shard wrote them
    assert compact_shard(fs, output, root, "000.tar", minimal, "r3") == sorted(files)
