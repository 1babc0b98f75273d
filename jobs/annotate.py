"""Driver entry point: ``python -m jobs.annotate`` (console script ``blip2-annotate``).

Order of work, cheapest checks first, so a mistake costs seconds, not a cluster:
validate the config, check the model can be fetched, list the input shards,
check the output location; only then connect to Ray and run the pipeline.

Joins the cluster named by ``RAY_ADDRESS`` (which ``ray job submit`` sets) and
starts a local Ray otherwise.

Exit codes: 0 done (bad images become error rows, they do not fail the job);
2 invalid configuration, input or output location; 3 model unavailable.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import uuid
from dataclasses import replace
from typing import Any

from jobs.settings import config_from_argv
from workers.config import AnnotateConfig, ConfigError
from workers.listing import list_shards
from workers.model_store import ModelUnavailableError, check_model_reachable
from workers.storage import filesystem_for, join

log = logging.getLogger("blip2_annotate")

SUMMARY_NAME = "_summary.json"  # leading underscore: Parquet readers skip it


class OutputExistsError(RuntimeError):
    """The output location already holds data and overwrite was not asked for."""


def prepare_output(cfg: AnnotateConfig) -> None:
    """Refuse to mix runs in one output unless ``overwrite``; with it, delete first (logged)."""
    fs, root = filesystem_for(cfg.output.url, cfg.storage)
    if fs.exists(root) and fs.ls(root):
        if not cfg.output.overwrite:
            raise OutputExistsError(
                f"output: {cfg.output.url} already holds data; "
                "choose another location or pass --overwrite to replace it"
            )
        log.warning("overwrite: deleting existing output at %s", cfg.output.url)
        fs.rm(root, recursive=True)


def resolve_gpus_per_replica(cfg: AnnotateConfig, cluster_gpus: float) -> float:
    """Explicit setting wins; otherwise one GPU per replica when the cluster has any."""
    if cfg.resources.gpus_per_replica is not None:
        return cfg.resources.gpus_per_replica
    return 1.0 if cluster_gpus > 0 else 0.0


def write_summary(cfg: AnnotateConfig, summary: dict[str, Any]) -> str:
    fs, root = filesystem_for(cfg.output.url, cfg.storage)
    path = join(root, SUMMARY_NAME)
    fs.makedirs(root, exist_ok=True)
    with fs.open(path, "w") as f:
        json.dump(summary, f, indent=2, sort_keys=True)
    return join(cfg.output.url, SUMMARY_NAME)


def summary_line(summary: dict[str, Any]) -> str:
    errors = ", ".join(f"{k}={v}" for k, v in summary["errors_by_kind"].items()) or "none"
    return (
        f"annotated {summary['inputs']} images from {summary['shards']} shards in {summary['wall_time_s']:.1f}s "
        f"({summary['images_per_s']:.1f} images/s): {summary['ok']} ok, {summary['errors']} errors ({errors}); "
        f"output {summary['output']}"
    )


def run(cfg: AnnotateConfig) -> dict[str, Any]:
    """Run one job end to end and return its summary (also written next to the output)."""
    import ray

    from workers.pipeline import build_dataset
    from workers.writer import PartitionedParquetSink

    started = time.monotonic()
    model_info = check_model_reachable(cfg.model, cfg.storage)
    decode_spec = replace(
        cfg.decode, height=model_info["height"], width=model_info["width"], resample=model_info["resample"]
    )
    shards, listing = list_shards(cfg.input, cfg.storage)
    log.info("found %d shards (%s)", len(shards), listing)
    prepare_output(cfg)

    if not ray.is_initialized():
        ray.init()  # RAY_ADDRESS, when set, makes this join that cluster
    gpus = resolve_gpus_per_replica(cfg, ray.cluster_resources().get("GPU", 0.0))
    log.info("model stage: %s replicas, %.2f GPUs each", (cfg.resources.replicas_min, cfg.resources.replicas_max), gpus)

    run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    sink = PartitionedParquetSink(cfg.output, cfg.storage, cfg.input.passthrough_columns, run_id)
    ds = build_dataset(cfg, shards, decode_spec, gpus, cfg.model.cache_dir)
    ds.write_datasink(sink)
    wall = time.monotonic() - started

    counts = sink.counts or {"rows": 0, "ok": 0, "errors": {}, "files": 0}
    summary = {
        "run_id": run_id,
        "output": cfg.output.url,
        "shards": len(shards),
        "listing": listing if isinstance(listing, dict) else vars(listing),
        "inputs": counts["rows"],
        "ok": counts["ok"],
        "errors": counts["rows"] - counts["ok"],
        "errors_by_kind": counts["errors"],
        "files_written": counts["files"],
        "wall_time_s": round(wall, 3),
        "images_per_s": round(counts["rows"] / wall, 3) if wall > 0 else 0.0,
        "gpus_per_replica": gpus,
        "model": model_info,
        "config": cfg.to_dict(),
    }
    summary["summary_url"] = write_summary(cfg, summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = config_from_argv(argv)
        summary = run(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, OutputExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ModelUnavailableError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    print(summary_line(summary))
    print(f"summary: {summary['summary_url']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
