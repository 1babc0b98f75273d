"""The Ray Data graph (workers/pipeline.py): stage layout and shard-end bookkeeping rows."""

from __future__ import annotations

import pyarrow as pa
import pytest
from imagefactory import jpeg_bytes
from shards import write_tar

from jobs.settings import build_config
from workers import schema
from workers.config import DecodeSpec
from workers.listing import list_shards
from workers.pipeline import build_dataset, read_shards, shard_items


def test_read_stage_appends_one_shard_end_row_per_shard(tmp_path, photos):
    write_tar(tmp_path / "a.tar", [("x.jpg", jpeg_bytes(photos["coffee"])), ("y.jpg", b""), ("z.txt", b"t")])
    write_tar(tmp_path / "b.tar", [("only.txt", b"no image here")])
    cfg = build_config({"input": [str(tmp_path)], "output": str(tmp_path / "out")})
    shards, _ = list_shards(cfg.input, cfg.storage)
    batch = pa.Table.from_pylist(shard_items(shards))
    tables = list(read_shards(batch, cfg.input, cfg.storage, batch_rows=8))
    rows = pa.concat_tables(tables).to_pylist()
    ends = {r[schema.SHARD]: r[schema.SHARD_ROWS] for r in rows if r[schema.STATUS] == schema.STATUS_SHARD_END}
    assert ends == {"a.tar": 2, "b.tar": 0}
    assert [r[schema.KEY] for r in rows if r[schema.STATUS] != schema.STATUS_SHARD_END] == ["x", "y"]


@pytest.mark.parametrize("decode_concurrency", [None, 2])
def test_decode_runs_in_its_own_cpu_stage_not_inside_the_model_actors(
    ray_cluster, tmp_path, tiny_models, photos, decode_concurrency
):
    """Read and decode fuse into one task per shard (also with a decode cap); the model stays apart."""
    write_tar(tmp_path / "a.tar", [(f"{i}.jpg", jpeg_bytes(photos["rocket"])) for i in range(3)])
    cfg = build_config(
        {"input": [str(tmp_path / "a.tar")], "output": str(tmp_path / "out"), "model": str(tiny_models["opt"]),
         "max_new_tokens": 2, "decode_concurrency": decode_concurrency}
    )  # fmt: skip
    shards, _ = list_shards(cfg.input, cfg.storage)
    ds = build_dataset(cfg, shards, DecodeSpec(height=32, width=32), 0.0, None, "r1")
    reports = pa.concat_tables(list(ds.iter_batches(batch_size=None, batch_format="pyarrow")))
    assert sum(reports.column("rows").to_pylist()) == 3
    stats = ds.stats()
    assert "MapBatches(read_shards)->MapBatches(decode_batch)" in stats
    assert "decode_batch)->MapBatches(Blip2Replica)" not in stats  # not fused into the actors
    assert "MapBatches(Blip2Replica)" in stats
