"""Driver entry point: ``python -m jobs.annotate`` (console script ``blip2-annotate``).

Order of work, cheapest checks first, so a mistake costs seconds, not a cluster:
validate the config, check the model can be fetched, list the input shards,
check the output location; only then connect to Ray and run the pipeline.

Joins the cluster named by ``RAY_ADDRESS`` (which ``ray job submit`` sets) and
starts a local Ray otherwise.

Exit codes: 0 done (bad images become error rows, they do not fail the job);
2 invalid configuration, input or output location; 3 model unavailable or
replicas cannot load it.
"""

from __future__ import annotations

import collections
import importlib.metadata
import json
import logging
import sys
import time
import uuid
from dataclasses import asdict, replace
from typing import Any

import ray
import ray.exceptions

from jobs.progress import Progress
from jobs.settings import config_from_argv
from workers.config import AnnotateConfig, ConfigError
from workers.ledger import INPUT_ROOTS, LedgerError, OutputConflictError, ShardLedger
from workers.listing import list_shards
from workers.model_store import ModelUnavailableError, check_model_reachable
from workers.readers import KEY_COLUMN_CANDIDATES
from workers.storage import filesystem_for, input_root, join
from workers.usage import UsageMeter, cost_summary, stage_busy_seconds

log = logging.getLogger("blip2_annotate")

SUMMARY_NAME = "_summary.json"  # leading underscore: Parquet readers skip it
MAX_REPLICA_INIT_DEATHS = 3
# Reading the usage meter is one small call to an actor on the driver's node; longer means it is gone.
METER_TIMEOUT_S = 60.0


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
    """What this run did, then what the output holds: a resume that skipped everything says so."""
    errors = ", ".join(f"{k}={v}" for k, v in summary["errors_by_kind"].items()) or "none"
    redone = "".join(f", {n} redone ({reason})" for reason, n in summary["shards_redone"].items())
    return (
        f"annotated {summary['rows_this_run']} images from {summary['shards_this_run']} shards in "
        f"{summary['wall_time_s']:.1f}s ({summary['images_per_s']:.1f} images/s){redone}; "
        f"skipped {summary['rows_skipped_as_done']} images in {summary['shards_skipped_as_done']} shards "
        f"already done; of {summary['inputs']} listed images {summary['ok']} ok, {summary['errors']} errors "
        f"({errors}); output {summary['output']} holds {summary['output_rows']} images"
    ) + _cost_line(summary.get("cost"))


def _cost_line(cost: dict[str, Any] | None) -> str:
    if not cost:
        return ""
    if cost.get("unknown_reason"):
        return f"; cost unknown: {cost['unknown_reason']}"
    unit = cost["device"].upper()
    line = (
        f"; {cost['device_seconds_held']:.1f} {unit}-seconds held, {cost['device_seconds_busy']:.1f} busy, "
        f"{cost['images_per_device_hour'] or 0:,.0f} images per {unit}-hour"
    )
    if cost["cost_per_1k_images"] is not None:
        line += f", {cost['cost_per_1k_images']:.4f} per 1,000 images ({cost['cost_per_1m_images']:,.2f} per 1M)"
    return line


def start_meter(name: str) -> Any:
    """The run's :class:`UsageMeter` actor, on the driver's own node: a lost worker node cannot take it along
    (a zero-CPU actor may land on any node), and if the driver's node goes, the driver goes with it."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0)(UsageMeter).options(name=name, scheduling_strategy=here).remote()


def read_meter(meter: Any) -> tuple[dict[str, dict[str, float]] | None, str | None]:
    """The replicas' usage reports and None, or None and why they cannot be had: never raises a Ray error,
    so the bookkeeping cannot fail a run whose rows are all written."""
    try:
        return ray.get(meter.totals.remote(), timeout=METER_TIMEOUT_S), None
    except ray.exceptions.RayError as e:  # ActorDiedError, ActorUnavailableError, GetTimeoutError, ...
        first_line = (str(e).strip().splitlines() or [""])[0][:200]
        reason = f"usage meter unreadable ({type(e).__name__}: {first_line})"
        log.warning("cost figures unknown: %s", reason)
        return None, reason
    finally:
        ray.kill(meter)  # no error for an actor that is already gone


def code_version() -> str:
    try:
        return importlib.metadata.version("blip2-annotate")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def manifest_for(cfg: AnnotateConfig, model_info: dict[str, Any]) -> dict[str, Any]:
    """The settings that shape output rows, which a resumed run must match, and where the inputs live."""
    manifest = {
        "model": {"id": cfg.model.model, "revision": model_info.get("revision") or cfg.model.revision,
                  "dtype": cfg.model.dtype},
        "prompts": asdict(cfg.prompts),
        "generation": asdict(cfg.generation),
        "input": {**{k: v for k, v in asdict(cfg.input).items() if k != "urls"},
                  # Which columns become keys when key_column is unset: part of every row's id.
                  "key_column_auto": [] if cfg.input.key_column else list(KEY_COLUMN_CANDIDATES)},
        "decode": {"max_image_pixels": cfg.decode.max_image_pixels, "mode": cfg.decode.mode},
        # Which frames become rows, and how videos are cut into shards (their names);
        # not how many threads decode them.
        "video": {k: v for k, v in asdict(cfg.video).items() if k != "decode_threads"},
        "output": {"partition_by": cfg.output.partition_by},
        "code_version": code_version(),
        INPUT_ROOTS: list(dict.fromkeys(input_root(url) for url in cfg.input.urls)),
    }  # fmt: skip
    return json.loads(json.dumps(manifest))  # tuples -> lists, as stored


def run(cfg: AnnotateConfig) -> dict[str, Any]:
    """Run one job end to end and return its summary (also written next to the output).

    Raises ModelUnavailableError, FileNotFoundError (no inputs), OutputConflictError
    (output in use with other settings), or what Ray Data raised when the
    pipeline itself failed (e.g. a replica that cannot load its model).
    """
    import ray.data

    from workers.pipeline import build_dataset

    started = time.monotonic()
    model_info = check_model_reachable(cfg.model, cfg.storage)
    decode_spec = replace(
        cfg.decode, height=model_info["height"], width=model_info["width"], resample=model_info["resample"]
    )
    shards, listing = list_shards(cfg.input, cfg.storage, video=cfg.video)
    log.info("found %d shards (%s)", len(shards), listing)

    run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    ledger = ShardLedger(cfg.output, cfg.storage, run_id)
    plan = ledger.prepare(cfg.output.mode, manifest_for(cfg, model_info), shards)
    todo = [s for s in shards if s.name not in plan.done]

    if todo:
        if not ray.is_initialized():
            ray.init()  # RAY_ADDRESS, when set, makes this join that cluster
        # A replica that cannot load its model fails every time; stop after a
        # few attempts with the cause instead of restarting it forever.
        context = ray.data.DataContext.get_current()
        context.max_consecutive_actor_init_deaths = MAX_REPLICA_INIT_DEATHS
        # Ray Data's bars count write reports (files), not images: jobs/progress.py reports instead.
        context.enable_progress_bars = False
        gpus = resolve_gpus_per_replica(cfg, ray.cluster_resources().get("GPU", 0.0))
        log.info("model stage: replicas %s, %.2f GPUs each; %d of %d shards to do",
                 (cfg.resources.replicas_min, cfg.resources.replicas_max), gpus, len(todo), len(shards))  # fmt: skip
        # Replicas load the revision the driver checked and the manifest records,
        # even if the hub's branch moves while the job runs.
        pinned = replace(cfg, model=replace(cfg.model, revision=model_info.get("revision") or cfg.model.revision))
        meter_name = f"blip2-usage-{run_id}"
        meter = start_meter(meter_name)
        ds = build_dataset(pinned, todo, decode_spec, gpus, cfg.model.cache_dir, run_id, meter_name)
        progress = Progress(todo, sum(m["rows"] for m in plan.done.values()), cfg.output.progress_interval_s)
        for reports in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            ledger.record(reports)
            progress.update(reports)
        progress.close()
        run_end = time.time()
        replicas, cost_unknown = read_meter(meter)
        ledger.finish()
        if ledger.incomplete():
            raise LedgerError(f"shards without all their rows after the run: {ledger.incomplete()[:10]}")
    else:
        gpus = 0.0
    wall = time.monotonic() - started
    rows_this_run = sum(m["rows"] for m in ledger.completed_this_run.values())
    cost = None
    if todo:
        device, units = ("gpu", gpus) if gpus > 0 else ("cpu", cfg.resources.cpus_per_replica)
        cost = cost_summary(replicas, run_end, device, units, rows_this_run, cfg.resources.gpu_hour_price,
                            cost_unknown)  # fmt: skip
        cost["stage_busy_s"] = stage_busy_seconds(ds)

    markers = {**plan.done, **ledger.completed_this_run}
    errors: collections.Counter[str] = collections.Counter()
    for m in markers.values():
        errors.update(m["errors"])
    rows = sum(m["rows"] for m in markers.values())
    summary = {
        "run_id": run_id,
        "output": cfg.output.url,
        "shards": len(shards),
        "shards_this_run": len(ledger.completed_this_run),
        "shards_skipped_as_done": len(plan.done),
        "rows_skipped_as_done": sum(m["rows"] for m in plan.done.values()),
        "shards_redone": {reason: len(names) for reason, names in sorted(plan.redone.items())},
        "orphan_markers": len(plan.orphan_markers),
        "output_rows": rows + plan.orphan_rows,  # also the rows of completed shards no longer listed
        "changed_folders": len(plan.changed_folders),
        "stray_files_removed": plan.removed_files,
        "listing": asdict(listing),
        "inputs": rows,
        "ok": sum(m["ok"] for m in markers.values()),
        "errors": rows - sum(m["ok"] for m in markers.values()),
        "errors_by_kind": dict(sorted(errors.items())),
        "rows_this_run": rows_this_run,
        "wall_time_s": round(wall, 3),
        "images_per_s": round(rows_this_run / wall, 3) if wall > 0 else 0.0,
        "gpus_per_replica": gpus,
        "cost": cost,  # None when nothing ran; workers/usage.py says what each figure counts
        "batch_size": cfg.resources.model_batch_size(gpus) if todo else None,  # None: nothing ran
        "model": model_info,
        "config": cfg.to_dict(),
    }
    summary["summary_url"] = write_summary(cfg, summary)
    return summary


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each record, so calling
    ``main`` twice in one process (tests, notebooks) never logs to a closed stream."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _configure_logging() -> None:
    root = logging.getLogger()
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    _configure_logging()
    try:
        cfg = config_from_argv(argv)
        summary = run(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, OutputConflictError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ModelUnavailableError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except ray.exceptions.ActorDiedError as e:
        # Ray Data gave up on replicas that die while starting (after
        # MAX_REPLICA_INIT_DEATHS tries): name the cause, not Ray's wrapper.
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        cause = next((line for line in reversed(lines) if "ModelLoadError" in line), lines[0] if lines else repr(e))
        print(f"error: model replicas failed to start: {cause}", file=sys.stderr)
        return 3
    print(summary_line(summary))
    print(f"summary: {summary['summary_url']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
