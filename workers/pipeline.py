"""The Ray Data graph: shards -> read -> decode (CPU tasks) -> BLIP-2 (actor pool) -> Parquet.

Why this shape:

* One input block per shard, so read tasks parallelise over shards and a bad
  shard affects only its own task (it turns into an error row, never an
  exception that would fail the job).
* Decoding is its own stage of CPU *tasks*, so Ray Data scales it apart from the
  model stage and its streaming backpressure stops decoded pixels from piling up
  in the object store when the GPUs are the bottleneck.
* The model stage is an actor pool of callable-class replicas: weights load once
  per actor, and ``concurrency=(min, max)`` lets the pool grow with the cluster.
* Error rows flow through every stage (each stage passes through rows it
  cannot work on), so every input sample reaches the writer exactly once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pyarrow as pa
import ray

from workers.config import AnnotateConfig, DecodeSpec, InputSpec, StorageOptions
from workers.decode import decode_batch
from workers.listing import ShardRef
from workers.readers import read_shard
from workers.replica import Blip2Replica

# Images per decode task call: large enough to amortise task overhead, small
# enough (64 x 150 KB at 224 px) that a block stays well under Ray's 128 MiB target.
DECODE_BATCH_ROWS = 64


def read_shards(batch: pa.Table, spec: InputSpec, storage: StorageOptions, batch_rows: int) -> Iterator[pa.Table]:
    """Ray Data UDF: each input row describes one shard; yields its samples."""
    for item in batch.to_pylist():
        item["files"] = tuple(item.get("files") or ())
        shard = ShardRef(**item)
        yield from read_shard(shard, spec, storage, batch_rows=batch_rows)


def shard_items(shards: list[ShardRef]) -> list[dict]:
    return [dataclasses.asdict(s) for s in shards]


def build_dataset(
    cfg: AnnotateConfig,
    shards: list[ShardRef],
    decode_spec: DecodeSpec,
    gpus_per_replica: float,
    model_cache_root: str | None,
) -> ray.data.Dataset:
    """Lazily build the dataset of output rows; nothing runs until it is consumed."""
    res = cfg.resources
    ds = ray.data.from_items(shard_items(shards), override_num_blocks=max(1, len(shards)))
    ds = ds.map_batches(
        read_shards,
        fn_kwargs={"spec": cfg.input, "storage": cfg.storage, "batch_rows": res.read_batch_rows},
        batch_size=1,
        batch_format="pyarrow",
    )
    decode_opts = {"concurrency": res.decode_concurrency} if res.decode_concurrency else {}
    ds = ds.map_batches(
        decode_batch,
        fn_kwargs={"spec": decode_spec},
        batch_size=DECODE_BATCH_ROWS,
        batch_format="pyarrow",
        **decode_opts,
    )
    ds = ds.map_batches(
        Blip2Replica,
        fn_constructor_kwargs={
            "model": cfg.model,
            "prompts": cfg.prompts,
            "generation": cfg.generation,
            "storage": cfg.storage,
            "cache_root": model_cache_root,
        },
        batch_size=res.batch_size,
        batch_format="pyarrow",
        concurrency=(res.replicas_min, res.replicas_max),
        num_gpus=gpus_per_replica,
        num_cpus=res.cpus_per_replica,
    )
    return ds
