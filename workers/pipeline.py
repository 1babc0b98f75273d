"""The Ray Data graph: shards -> read -> decode (CPU tasks) -> BLIP-2 (actor pool) -> Parquet.

Why this shape:

* One input block per shard, so read tasks parallelise over shards and a bad
  shard affects only its own task (it turns into an error row, never an
  exception that would fail the job).
* Reading and decoding are one function run as CPU *tasks* (one shard each),
  so Ray Data scales them apart from the model stage and its streaming
  backpressure stops decoded pixels from piling up in the object store when
  the GPUs are the bottleneck.
* The model stage is an actor pool of callable-class replicas: weights load once
  per actor, and ``ActorPoolStrategy(min, max)`` lets the pool grow with the cluster.
* Error rows flow through every stage (each stage passes through rows it
  cannot work on), so every input sample reaches the writer exactly once.
* After a shard's last sample the reader emits a ``shard_end`` row holding
  the shard's row count.  It flows through like an error row; the writer
  turns it into a report, and the driver writes the shard's completion marker
  once that many rows are durable (``workers/ledger.py``).
* Writing is a map stage whose output is a small report per file, consumed by
  the driver as a stream, so markers are written while the job runs and a
  crash loses at most the shards in flight.  The driver compacts a completed
  shard's files to ``max_rows_per_file`` before writing its marker.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pyarrow as pa
import ray
from ray.data import ActorPoolStrategy, TaskPoolStrategy

from workers import schema
from workers.config import AnnotateConfig, DecodeSpec, InputSpec, ResourceSpec, StorageOptions, VideoSpec
from workers.decode import decode_batch
from workers.fast_path import FastPath
from workers.listing import VIDEO, ShardRef
from workers.readers import read_shard
from workers.replica import Blip2Replica
from workers.video import decode_with_videos, read_video_shard
from workers.writer import RowWriter

DECODE_TASK_MEMORY = 512 * 1024**2


def shard_end_row(shard: ShardRef, spec: InputSpec, rows: int) -> pa.Table:
    """The bookkeeping row that tells the driver how many rows ``shard`` produced."""
    row = {
        schema.ID: f"{shard.uri}::<end>",
        schema.SOURCE: shard.uri,
        schema.SHARD: shard.name,
        schema.KEY: "",
        schema.STATUS: schema.STATUS_SHARD_END,
        schema.SHARD_ROWS: rows,
    }
    return pa.Table.from_pylist([row], schema=schema.read_schema(spec.passthrough_columns))


def shard_items(shards: list[ShardRef]) -> list[dict]:
    return [dataclasses.asdict(s) for s in shards]


def _shard_of(item: dict) -> ShardRef:
    return ShardRef(**{**item, "files": tuple(item.get("files") or ())})


def read_and_decode(
    batch: pa.Table,
    spec: InputSpec,
    storage: StorageOptions,
    batch_rows: int,
    decode_spec: DecodeSpec,
    video_spec: VideoSpec,
) -> Iterator[pa.Table]:
    """Ray Data UDF: read each shard the batch names and decode its samples, one block at a time,
    then the shard's ``shard_end`` row with the number of rows it produced.

    One function, so reading and decoding share a task whatever Ray Data's
    fusion rules are: undecoded bytes never wait in the object store for a
    separate decode stage, and a shard's pixels stream out as they are made.
    Rows are counted after decoding: a video becomes one row per sampled frame.
    """
    for item in batch.to_pylist():
        shard = _shard_of(item)
        if shard.format == VIDEO:
            tables = read_video_shard(shard, spec, storage, decode_spec, video_spec, batch_rows)
        else:
            tables = (
                decoded
                for table in read_shard(shard, spec, storage, batch_rows=batch_rows)
                for decoded in decode_with_videos(table, decode_spec, video_spec, batch_rows)
            )
        rows = 0
        for table in tables:
            rows += table.num_rows
            yield table
        yield decode_batch(shard_end_row(shard, spec, rows), decode_spec)


def decoded_dataset(
    input_spec: InputSpec,
    storage: StorageOptions,
    resources: ResourceSpec,
    shards: list[ShardRef],
    decode_spec: DecodeSpec,
    video_spec: VideoSpec | None = None,
) -> ray.data.Dataset:
    """The read+decode stage: one row per sample, ``pixels`` filled on ok rows.

    Also the benchmark's "pure decoding" baseline, so the end-to-end benchmark
    measures exactly what the model and write stages add.
    """
    video_spec = video_spec or VideoSpec()
    ds = ray.data.from_items(shard_items(shards), override_num_blocks=max(1, len(shards)))
    return ds.map_batches(
        read_and_decode,
        fn_kwargs={
            "spec": input_spec,
            "storage": storage,
            "batch_rows": resources.read_batch_rows,
            "decode_spec": decode_spec,
            "video_spec": video_spec,
        },
        batch_size=1,  # one shard per task: a bad shard fails alone, shards parallelise
        batch_format="pyarrow",
        compute=TaskPoolStrategy(size=resources.decode_concurrency) if resources.decode_concurrency else None,
        num_cpus=video_spec.decode_threads,
        # What a task holds at once: a reader block of raw bytes and its
        # pixels, plus one large photo being decoded.  Reserving it also keeps
        # these tasks apart from the model actors, which reserve no memory: Ray
        # Data runs two stages in one process only when their resource requests
        # are equal, and decoding must scale on CPUs apart from the replicas.
        memory=DECODE_TASK_MEMORY,
    )


def build_dataset(
    cfg: AnnotateConfig,
    shards: list[ShardRef],
    decode_spec: DecodeSpec,
    gpus_per_replica: float,
    model_cache_root: str | None,
    run_id: str,
    usage_meter: str | None = None,
) -> ray.data.Dataset:
    """Lazily build the dataset of write reports (``writer.REPORT_SCHEMA``); nothing runs until consumed."""
    res = cfg.resources
    ds = decoded_dataset(cfg.input, cfg.storage, res, shards, decode_spec, cfg.video)
    ds = ds.map_batches(
        Blip2Replica,
        fn_constructor_kwargs={
            "model": cfg.model,
            "prompts": cfg.prompts,
            "generation": cfg.generation,
            "storage": cfg.storage,
            "cache_root": model_cache_root,
            "usage_meter": usage_meter,
            "fast": FastPath(
                generation_batch=cfg.model.generation_batch,
                compile=cfg.model.compile,
                # Replicas sharing a GPU size their batches to their share of it.
                gpu_share=min(1.0, gpus_per_replica) if gpus_per_replica > 0 else 1.0,
            ),
        },
        batch_size=res.model_batch_size(gpus_per_replica),
        batch_format="pyarrow",
        compute=ActorPoolStrategy(min_size=res.replicas_min, max_size=res.replicas_max),
        num_gpus=gpus_per_replica,
        num_cpus=res.cpus_per_replica,
        # Ray Data places actors with its SPREAD default: one replica per GPU
        # node before doubling up.
    )
    ds = ds.map_batches(
        RowWriter,
        fn_constructor_kwargs={
            "output": cfg.output,
            "storage": cfg.storage,
            "passthrough": cfg.input.passthrough_columns,
            "run_id": run_id,
        },
        # Each block the model stage emits is written as it arrives, so rows are
        # durable seconds after they are computed and shard markers follow all
        # through a run.  A fixed batch size here made rows wait for a full batch
        # (on a 48-shard run, every marker came in the last seconds); a shard's
        # small files are compacted to max_rows_per_file when it completes.
        batch_size=None,
        batch_format="pyarrow",
        # No CPU reservation: a write is a Parquet encode of a few hundred rows and
        # one PUT.  With one, Ray Data's budget held writes back while decoding
        # took every CPU (backpressured:tasks(ResourceBudget)) and nothing became
        # durable until the inputs ran out.  The cap bounds writes in flight.
        num_cpus=0,
        # Long-lived writer actors, not tasks: one write per model batch and shard
        # is a few milliseconds of work, and as tasks they ran in worker processes
        # that Ray starts, kills when idle past its per-CPU limit, and starts again,
        # each start importing Ray Data and pandas anew (the durability soak's lost 13%).
        compute=ActorPoolStrategy(min_size=1, max_size=max(2, 2 * res.replicas_max)),
    )
    return ds
