"""The Ray Data graph (workers/pipeline.py): stage layout and shard-end bookkeeping rows."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
from helpers import write_tar
from imagefactory import jpeg_bytes

from jobs.settings import build_config
from workers import schema
from workers.config import DecodeSpec
from workers.listing import list_shards
from workers.pipeline import build_dataset, read_and_decode, shard_items

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_read_stage_appends_one_shard_end_row_per_shard(tmp_path, photos):
    write_tar(tmp_path / "a.tar", [("x.jpg", jpeg_bytes(photos["coffee"])), ("y.jpg", b""), ("z.txt", b"t")])
    write_tar(tmp_path / "b.tar", [("only.txt", b"no image here")])
    cfg = build_config({"input": [str(tmp_path)], "output": str(tmp_path / "out")})
    shards, _ = list_shards(cfg.input, cfg.storage)
    batch = pa.Table.from_pylist(shard_items(shards))
    tables = list(read_and_decode(batch, cfg.input, cfg.storage, 8, DecodeSpec(height=32, width=32), cfg.video))
    rows = pa.concat_tables(tables).drop_columns([schema.PIXELS]).to_pylist()
    ends = {r[schema.SHARD]: r[schema.SHARD_ROWS] for r in rows if r[schema.STATUS] == schema.STATUS_SHARD_END}
    assert ends == {"a.tar": 2, "b.tar": 0}
    assert [r[schema.KEY] for r in rows if r[schema.STATUS] != schema.STATUS_SHARD_END] == ["x", "y"]


def _optimized_physical_plan(ds, capsys) -> list[str]:
    """The operators Ray Data will run, from ``Dataset.explain()`` (its documented plan printout)."""
    capsys.readouterr()
    ds.explain()
    text = capsys.readouterr().out
    plan = text.split("-------- Physical Plan (Optimized) --------", 1)[1]
    return [line.strip(" +-") for line in plan.strip().splitlines()]


@pytest.mark.parametrize("decode_concurrency", [None, 2])
def test_decode_runs_in_its_own_cpu_stage_not_inside_the_model_actors(
    ray_cluster, tmp_path, tiny_models, photos, decode_concurrency, capsys
):
    """Read+decode is one task stage, the CPU replicas an actor stage of their own (also with a decode cap)."""
    write_tar(tmp_path / "a.tar", [(f"{i}.jpg", jpeg_bytes(photos["rocket"])) for i in range(3)])
    cfg = build_config(
        {"input": [str(tmp_path / "a.tar")], "output": str(tmp_path / "out"), "model": str(tiny_models["opt"]),
         "max_new_tokens": 2, "decode_concurrency": decode_concurrency}
    )  # fmt: skip
    shards, _ = list_shards(cfg.input, cfg.storage)
    # gpus_per_replica=0: replicas on CPU, where equal resource requests would let Ray Data fuse the stages.
    ds = build_dataset(cfg, shards, DecodeSpec(height=32, width=32), 0.0, None, "r1")
    assert _optimized_physical_plan(ds, capsys) == [
        "ActorPoolMapOperator[MapBatches(RowWriter)]",
        "ActorPoolMapOperator[MapBatches(Blip2Replica)]",
        "TaskPoolMapOperator[MapBatches(read_and_decode)]",
        "InputDataBuffer[Input]",
    ]
    reports = pa.concat_tables(list(ds.iter_batches(batch_size=None, batch_format="pyarrow")))
    assert sum(reports.column("rows").to_pylist()) == 3
    assert sum(reports.column("ok").to_pylist()) == 3


_FAKE_GPU_DRIVER = """
import sys
import ray
from jobs.annotate import main

# One GPU that Ray schedules but torch cannot see: what a CPU-only torch wheel on a GPU node looks like.
ray.init(num_cpus=3, num_gpus=1, include_dashboard=False, log_to_driver=True)
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_fractional_gpu_share_reaches_each_replica(tmp_path, tiny_models, photos):
    """``--gpus-per-replica 0.5``: two replicas fit on one GPU, and each one plans for half of it.

    Runs its own Ray (one fake GPU) in a subprocess, apart from the session cluster,
    which has none.  Each replica says which share it got when torch cannot use the
    GPU it was given, so the share is read back from what each replica process printed.
    """
    (tmp_path / "in").mkdir()
    for s in range(4):
        write_tar(tmp_path / "in" / f"{s}.tar", [(f"{s}{i}.jpg", jpeg_bytes(photos["rocket"][: 80 + i, : 90 + s]))
                                                 for i in range(3)])  # fmt: skip
    args = ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--model", str(tiny_models["opt"]),
            "--replicas", "2", "--gpus-per-replica", "0.5", "--cpus-per-replica", "0.5",
            "--batch-size", "1", "--max-new-tokens", "2"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", _FAKE_GPU_DRIVER, *args], capture_output=True, text=True,
                          timeout=300, env=env, cwd=REPO_ROOT)  # fmt: skip
    output = re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout + proc.stderr)  # Ray colours the worker prefix
    assert proc.returncode == 0, output[-4000:]
    said = re.findall(r"pid=(\d+)\) .*Ray assigned this replica ([\d.]+) of GPU (\S+), but torch", output)
    print(said)
    assert {share for _pid, share, _gpu in said} == {"0.50"}, output[-4000:]
    assert len({pid for pid, _share, _gpu in said}) == 2  # both replicas, one GPU between them
    assert {gpu for _pid, _share, gpu in said} == {"0"}
    summary = json.loads((tmp_path / "out" / "_summary.json").read_text())
    assert (summary["ok"], summary["gpus_per_replica"]) == (12, 0.5)
