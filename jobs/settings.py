"""Build the job's :class:`~workers.config.AnnotateConfig` from flags and a YAML file.

Users see one flat namespace of settings (``batch_size``, ``questions``,
``endpoint_url``...), the same in YAML and as ``--batch-size`` style flags; flags
override the file.  The flat names map onto the typed sections of
``AnnotateConfig``.  Unknown keys, wrong types and invalid values all raise
:class:`~workers.config.ConfigError` naming the setting.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from workers.config import (
    CPU_BATCH_SIZE,
    DECODE_MODES,
    DTYPES,
    ENGINES,
    FRAME_SAMPLINGS,
    GPU_BATCH_SIZE,
    INPUT_FORMATS,
    PARTITION_BY,
    WRITE_MODES,
    AnnotateConfig,
    ConfigError,
    DecodeSpec,
    GenerationSpec,
    InputSpec,
    ModelSpec,
    OutputSpec,
    PromptSpec,
    ResourceSpec,
    StorageOptions,
    VideoSpec,
)

SECTIONS: dict[str, type] = {
    "input": InputSpec,
    "output": OutputSpec,
    "model": ModelSpec,
    "prompts": PromptSpec,
    "generation": GenerationSpec,
    "decode": DecodeSpec,
    "video": VideoSpec,
    "resources": ResourceSpec,
    "storage": StorageOptions,
}

# Flat setting name -> (section, field).  Names that differ from the field name
# are the ones users would otherwise find ambiguous ("input" vs "urls").
RENAMED: dict[str, tuple[str, str]] = {
    "input": ("input", "urls"),
    "input_format": ("input", "format"),
    "output": ("output", "url"),
    "model": ("model", "model"),
    "model_cache_dir": ("model", "cache_dir"),
    "decode_mode": ("decode", "mode"),
    "video_span_seconds": ("video", "span_seconds"),
    "video_split_above_bytes": ("video", "split_above_bytes"),
    "video_decode_threads": ("video", "decode_threads"),
}
# Decode size/resample come from the model's preprocessor config, not users.
NOT_SETTABLE = {("decode", "height"), ("decode", "width"), ("decode", "resample")}


def _settings_table() -> dict[str, tuple[str, str, Any]]:
    table: dict[str, tuple[str, str, Any]] = {}
    renamed_targets = set(RENAMED.values())
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if (section, f.name) in NOT_SETTABLE or (section, f.name) in renamed_targets:
                continue
            table[f.name] = (section, f.name, hints[f.name])
    for flat, (section, name) in RENAMED.items():
        table[flat] = (section, name, typing.get_type_hints(SECTIONS[section])[name])
    return table


SETTINGS = _settings_table()


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Check/convert one YAML or flag value against its annotated type."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(name, value, inner)
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list of strings, got {value!r}")
        return tuple(_coerce(name, v, args[0]) for v in value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported setting type {hint!r} for {name}")  # a bug in this module, not user input


def build_config(settings: dict[str, Any]) -> AnnotateConfig:
    """Validate a flat mapping of settings and build the frozen config.

    Raises ConfigError naming the first unknown key, badly typed value or
    invalid value.
    """
    per_section: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for key, value in settings.items():
        if key not in SETTINGS:
            close = difflib.get_close_matches(key, SETTINGS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{key}: unknown setting{hint}")
        section, field_name, hint_type = SETTINGS[key]
        per_section[section][field_name] = _coerce(key, value, hint_type)
    if "urls" not in per_section["input"]:
        raise ConfigError("input: at least one input URL is required (--input or 'input:' in the config file)")
    if "url" not in per_section["output"]:
        raise ConfigError("output: an output URL is required (--output or 'output:' in the config file)")
    built = {section: SECTIONS[section](**values) for section, values in per_section.items()}
    cfg = AnnotateConfig(**built)
    if "://" not in cfg.output.url:
        # Workers resolve paths against their own working directory (under
        # `ray job submit`, the unpacked package): make a local output absolute here.
        cfg = dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, url=os.path.abspath(cfg.output.url)))
    return cfg


def load_yaml(path: str) -> dict[str, Any]:
    """Read a YAML settings file; raises ConfigError when it is missing or not a mapping."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"config: cannot read {path}: {e.strerror or e}") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config: {path} is not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config: {path} must hold a mapping of settings, got {type(data).__name__}")
    return data


def _replicas(text: str) -> tuple[int, int]:
    """``"2"`` -> (2, 2); ``"1:8"`` -> (1, 8)."""
    try:
        parts = [int(p) for p in text.split(":")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or MIN:MAX, got {text!r}") from None
    if len(parts) == 1:
        return parts[0], parts[0]
    if len(parts) == 2:
        return parts[0], parts[1]
    raise argparse.ArgumentTypeError(f"expected N or MIN:MAX, got {text!r}")


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jobs.annotate",
        description="Caption images and answer questions about them with BLIP-2 on Ray; writes partitioned Parquet.",
        argument_default=argparse.SUPPRESS,  # only flags given on the command line override the YAML file
    )
    p.add_argument("--config", help="YAML file of settings (same names as the flags, with underscores)")
    g = p.add_argument_group("input")
    g.add_argument("--input", nargs="+", help="input URLs: files, directories or globs (local, file://, s3://)")
    g.add_argument("--input-format", choices=INPUT_FORMATS)
    g.add_argument("--image-column", help="Parquet column holding image bytes (default: auto-detect)")
    g.add_argument("--key-column", help="Parquet column holding a sample key (default: row index)")
    g.add_argument("--passthrough-columns", nargs="+", help="input columns copied to the output (e.g. url txt)")
    g.add_argument("--questions-column", help="input column holding per-row questions")
    g.add_argument("--max-member-bytes", type=int, help="larger images/tar members become error rows")
    g.add_argument("--max-image-pixels", type=int, help="larger images are rejected as decompression bombs")
    g.add_argument(
        "--decode-mode", choices=DECODE_MODES, help="fast (default; JPEG DCT scaling) or exact (= BlipImageProcessor)"
    )
    g = p.add_argument_group("video")
    g.add_argument("--frame-sampling", choices=FRAME_SAMPLINGS, help="which frames of a video become rows")
    g.add_argument("--frame-interval", type=float, help="seconds between sampled frames (default 1.0)")
    g.add_argument("--max-scene-seconds", type=float, help="scene: longer shots also get a frame every interval")
    g.add_argument("--scene-threshold", type=float, help="scene: luma-histogram change that counts as a cut")
    g.add_argument("--max-frames-per-video", type=int, help="then one frame_limit_reached row")
    g.add_argument("--video-span-seconds", type=float, help="large videos are split into shards of this length")
    g.add_argument("--video-split-above-bytes", type=int, help="videos this large are probed and split into spans")
    g.add_argument("--video-decode-threads", type=int, help="FFmpeg threads (and CPUs reserved) per decode task")
    g = p.add_argument_group("output")
    g.add_argument("--output", help="output URL (local path or s3://)")
    g.add_argument("--partition-by", choices=PARTITION_BY)
    g.add_argument("--mode", choices=WRITE_MODES, help="resume (default), overwrite, or error if output exists")
    g.add_argument("--overwrite", dest="mode", action="store_const", const="overwrite", help="same as --mode overwrite")
    g.add_argument("--max-rows-per-file", type=int, help="rows per Parquet file at most (default 100000)")
    g.add_argument(
        "--retry-errors", action="store_true", help="resume also redoes shards with transient error rows"
    )
    g.add_argument("--progress-interval-s", type=float, help="seconds between progress lines in logs (default 30)")
    g = p.add_argument_group("model")
    g.add_argument("--model", help="hub id, local directory, s3:// prefix, or tiny-random (offline smoke test)")
    g.add_argument("--revision", help="pin a hub revision (commit, tag or branch)")
    g.add_argument("--dtype", choices=DTYPES)
    g.add_argument("--model-cache-dir", help="node-local directory for fetched weights")
    g.add_argument("--generation-batch", type=int, help="sequences per generate call (default: automatic)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, help="static KV cache + torch.compile on CUDA")
    g.add_argument(
        "--engine", choices=ENGINES, help="model engine: auto (default; README 'Model engines'), hf (ours) or vllm"
    )
    g = p.add_argument_group("prompts")
    g.add_argument("--no-caption", dest="caption", action="store_false", help="skip captioning")
    g.add_argument("--caption-prompt", help='text the caption continues, e.g. "a photo of"; "{col}" = the row\'s col')
    g.add_argument("--caption-prompt-column", help="passed-through input column holding each row's caption prompt")
    g.add_argument("--questions", nargs="+", help="questions asked of every image")
    g.add_argument("--question-template", help='default "Question: {q} Answer:"')
    g.add_argument("--conversation", nargs="+", help="questions asked in turns, each turn seeing the earlier answers")
    g.add_argument(
        "--answered-turn-template", help='earlier turns in a turn prompt; default "Question: {q} Answer: {a}."'
    )
    g.add_argument(
        "--row-questions-in-turns",
        action="store_true",
        help="ask the questions column's per-row questions as a conversation instead of each on its own",
    )
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int)
    g.add_argument("--min-new-tokens", type=int)
    g.add_argument("--num-beams", type=int)
    g.add_argument("--length-penalty", type=float)
    g.add_argument("--repetition-penalty", type=float)
    g = p.add_argument_group("resources")
    g.add_argument(
        "--batch-size",
        type=int,
        help=f"images per model call (default {CPU_BATCH_SIZE} on CPU, {GPU_BATCH_SIZE} on GPU)",
    )
    g.add_argument("--replicas", type=_replicas, help="model replicas: N or MIN:MAX (autoscaling pool)")
    g.add_argument("--gpus-per-replica", type=float, help="fractions pack replicas on one GPU; 0 = CPU")
    g.add_argument("--cpus-per-replica", type=float)
    g.add_argument("--decode-concurrency", type=int, help="max concurrent CPU decode tasks")
    g.add_argument("--read-batch-rows", type=int)
    g.add_argument("--gpu-hour-price", type=float, help="price of a GPU-hour (CPU-hour on CPU runs): cost per image")
    g = p.add_argument_group("storage")
    g.add_argument("--endpoint-url", help="S3-compatible endpoint (MinIO, R2, ...); credentials: standard AWS chain")
    g.add_argument("--region")
    g.add_argument("--anon", action="store_true", help="anonymous S3 access (public buckets)")
    g.add_argument("--retry-attempts", type=int, help="retries per S3 request after the first (adaptive backoff)")
    return p


def config_from_argv(argv: list[str] | None = None) -> AnnotateConfig:
    """Parse flags (and the YAML file they name) into a validated config."""
    args = vars(make_parser().parse_args(argv))
    settings: dict[str, Any] = {}
    if "config" in args:
        settings.update(load_yaml(args.pop("config")))
    if "replicas" in args:
        args["replicas_min"], args["replicas_max"] = args.pop("replicas")
    settings.update(args)
    return build_config(settings)
