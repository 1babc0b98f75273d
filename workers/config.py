"""The job's configuration: one frozen, typed object, validated on construction.

``jobs/`` builds an :class:`AnnotateConfig` from flags and an optional YAML file;
every worker receives the parts it needs as constructor arguments.  Nothing in
``workers/`` reads argv or the environment.

Every validation failure raises :class:`ConfigError` whose message starts with
the offending field's name (``batch_size: must be >= 1, got 0``).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from workers.storage import refuse_command_url

DEFAULT_MODEL = "Salesforce/blip2-opt-2.7b"
TINY_MODEL_NAMES = ("tiny-random", "tiny-random-opt", "tiny-random-t5")
DTYPES = ("auto", "float32", "float16", "bfloat16")
# A "{column}" placeholder in a caption prompt template.
_FIELD = re.compile(r"\{([A-Za-z0-9_.-]+)\}")
# Model engines: ours (hf, transformers underneath) or vLLM; auto = what measured fastest (replica.pick_engine).
ENGINES = ("auto", "hf", "vllm")
INPUT_FORMATS = ("auto", "webdataset", "parquet", "images", "video")
PARTITION_BY = ("shard", "none")
WRITE_MODES = ("resume", "overwrite", "error")
# "fast": JPEG DCT-scaled decoding (Pillow's draft), close to BlipImageProcessor's
# pixels and much cheaper (measured in BENCHMARKS.md); "exact": bit-identical to it.
DECODE_MODES = ("fast", "exact")
# Images per model call when batch_size is not set.  On CPU, the cost per
# generated sequence falls until ~128 sequences per generate call, the
# replica's CPU generation batch (BENCHMARKS.md); on a GPU, 256 images keep the
# vision encoder and generation busy, and the replica splits a batch that does
# not fit memory into smaller generate calls.
CPU_BATCH_SIZE = 128
GPU_BATCH_SIZE = 256
# GIF/BMP/TIFF too: real collections hold them, and the decoder takes their first frame.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
# .ts/.m2ts/.mts: MPEG transport streams (broadcast and camcorder recordings), which carry no index.
VIDEO_EXTENSIONS = (".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi", ".ts", ".m2ts", ".mts")
# interval: the frames shown at 0, T, 2T, ...; scene: the first frame of every shot
# (plus every T inside long shots); keyframes: the stream's I-frames, the cheapest.
FRAME_SAMPLINGS = ("interval", "scene", "keyframes")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


def _fail(name: str, message: str) -> None:
    raise ConfigError(f"{name}: {message}")


def _refuse_command_url(url: str, name: str) -> None:
    """storage.refuse_command_url's verdict, as a ConfigError naming the setting."""
    try:
        refuse_command_url(url, name)
    except ValueError as e:
        raise ConfigError(str(e)) from None


@dataclass(frozen=True)
class StorageOptions:
    """How to reach object storage.  Credentials come from the standard AWS chain
    (env vars, ~/.aws, instance profile), never from this object, so they cannot
    leak into logs, the summary or Ray job info."""

    endpoint_url: str | None = None  # S3-compatible stores (MinIO, R2, moto)
    region: str | None = None
    anon: bool = False

    # botocore's own retries, per request, after its first attempt (botocore's
    # max_attempts: 10 retries are 11 attempts): "adaptive" backs off
    # exponentially on 5xx, throttling (SlowDown) and dropped connections, and
    # rate-limits the client while S3 throttles; this rides out minutes-long brownouts.
    retry_attempts: int = 10

    def __post_init__(self) -> None:
        if self.retry_attempts < 1:
            _fail("retry_attempts", f"must be >= 1, got {self.retry_attempts}")

    def fsspec_options(self) -> dict[str, Any]:
        """Keyword arguments for ``fsspec.filesystem("s3", ...)``."""
        opts: dict[str, Any] = {
            "anon": self.anon,
            "config_kwargs": {"retries": {"max_attempts": self.retry_attempts, "mode": "adaptive"}},
        }
        client_kwargs: dict[str, Any] = {}
        if self.endpoint_url:
            client_kwargs["endpoint_url"] = self.endpoint_url
        if self.region:
            client_kwargs["region_name"] = self.region
        if client_kwargs:
            opts["client_kwargs"] = client_kwargs
        return opts


@dataclass(frozen=True)
class InputSpec:
    """What to read and how to turn it into samples."""

    urls: tuple[str, ...]
    format: str = "auto"
    image_column: str | None = None  # Parquet: auto-detects jpg/jpeg/png/image/bytes/...
    key_column: str | None = None  # Parquet: default is the row index within the file
    passthrough_columns: tuple[str, ...] = ()
    questions_column: str | None = None  # per-row questions (string or list of strings)
    max_member_bytes: int = 64 * 1024 * 1024  # tar members/images larger than this are errors

    def __post_init__(self) -> None:
        if not self.urls:
            _fail("input", "at least one input URL is required")
        for url in self.urls:
            if not isinstance(url, str) or not url.strip():
                _fail("input", f"empty input URL in {list(self.urls)!r}")
            _refuse_command_url(url, "input")
        if self.format not in INPUT_FORMATS:
            _fail("input_format", f"must be one of {INPUT_FORMATS}, got {self.format!r}")
        if self.max_member_bytes < 1:
            _fail("max_member_bytes", f"must be >= 1, got {self.max_member_bytes}")
        for name in self.passthrough_columns:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", name):
                _fail("passthrough_columns", f"invalid column name {name!r}")
        if len(set(self.passthrough_columns)) != len(self.passthrough_columns):
            _fail("passthrough_columns", f"duplicate names in {list(self.passthrough_columns)!r}")


@dataclass(frozen=True)
class DecodeSpec:
    """How images become model-ready pixels on CPU workers."""

    height: int = 224
    width: int = 224
    resample: int = 3  # PIL.Image.BICUBIC, what BlipImageProcessor uses
    # Images above this many pixels are rejected before their pixels are
    # decoded (decompression bombs).  178 MP is twice Pillow's warning limit:
    # large enough for any real photo, small enough to bound worker memory.
    max_image_pixels: int = 178_956_970
    mode: str = "fast"  # see DECODE_MODES

    def __post_init__(self) -> None:
        if self.mode not in DECODE_MODES:
            _fail("decode_mode", f"must be one of {DECODE_MODES}, got {self.mode!r}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value < 1:
                _fail(f"decode.{name}", f"must be >= 1, got {value}")
        if self.max_image_pixels < 1:
            _fail("max_image_pixels", f"must be >= 1, got {self.max_image_pixels}")


@dataclass(frozen=True)
class VideoSpec:
    """Which frames of a video become rows, and how a long video is cut into shards."""

    frame_sampling: str = "interval"  # see FRAME_SAMPLINGS
    frame_interval: float = 1.0  # seconds between sampled frames (interval; inside long shots for scene)
    max_scene_seconds: float = 10.0  # scene: shots longer than this also get a frame every frame_interval
    # scene: a cut is a lasting change of the frames' luma histograms above this (half
    # the L1 distance, 0..1).  Chosen with tools/bench_scene.py (BENCHMARKS.md, "Scene
    # cuts"): 3x the largest change inside its shots of fast pans and zooms, no false cut.
    scene_threshold: float = 0.15
    max_frames_per_video: int = 100_000  # then one frame_limit_reached row: an endless stream cannot flood the job
    # Videos at least split_above_bytes large are probed for their duration when the
    # job is listed and cut into spans of span_seconds, each its own shard: a 3-hour
    # film spreads over the cluster, and a crash recomputes only the spans in flight.
    span_seconds: float = 600.0
    split_above_bytes: int = 64 * 1024**2
    # FFmpeg threads per decode task, which reserves as many CPUs (pipeline.py).  One
    # by default: on a node whose every CPU runs a decode task, extra threads only
    # add CPU-seconds (BENCHMARKS.md, "Video"); more pays for a few long videos on idle cores.
    decode_threads: int = 1

    def __post_init__(self) -> None:
        if self.frame_sampling not in FRAME_SAMPLINGS:
            _fail("frame_sampling", f"must be one of {FRAME_SAMPLINGS}, got {self.frame_sampling!r}")
        if not self.frame_interval > 0:
            _fail("frame_interval", f"must be > 0 seconds, got {self.frame_interval}")
        if not self.max_scene_seconds > 0:
            _fail("max_scene_seconds", f"must be > 0 seconds, got {self.max_scene_seconds}")
        if not 0 < self.scene_threshold < 1:
            _fail("scene_threshold", f"must be between 0 and 1, got {self.scene_threshold}")
        if self.max_frames_per_video < 1:
            _fail("max_frames_per_video", f"must be >= 1, got {self.max_frames_per_video}")
        if not self.span_seconds >= self.frame_interval:
            _fail("span_seconds", f"must be >= frame_interval ({self.frame_interval}), got {self.span_seconds}")
        if self.split_above_bytes < 1:
            _fail("split_above_bytes", f"must be >= 1, got {self.split_above_bytes}")
        if not 1 <= self.decode_threads <= 64:
            _fail("decode_threads", f"must be between 1 and 64, got {self.decode_threads}")


@dataclass(frozen=True)
class GenerationSpec:
    """Settings passed to ``generate``.  Greedy by default, so output is reproducible."""

    max_new_tokens: int = 30
    min_new_tokens: int = 0
    num_beams: int = 1
    length_penalty: float = 1.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            _fail("max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            _fail(
                "min_new_tokens",
                f"must be between 0 and max_new_tokens ({self.max_new_tokens}), got {self.min_new_tokens}",
            )
        if self.num_beams < 1:
            _fail("num_beams", f"must be >= 1, got {self.num_beams}")
        if self.repetition_penalty <= 0:
            _fail("repetition_penalty", f"must be > 0, got {self.repetition_penalty}")

    def generate_kwargs(self) -> dict[str, Any]:
        return {
            "max_new_tokens": self.max_new_tokens,
            "min_new_tokens": self.min_new_tokens,
            "num_beams": self.num_beams,
            "length_penalty": self.length_penalty,
            "repetition_penalty": self.repetition_penalty,
            "do_sample": False,
        }


@dataclass(frozen=True)
class PromptSpec:
    """What is asked of every image."""

    caption: bool = True
    # e.g. "a photo of"; None = unconditional caption.  "{name}" fills in the row's
    # value of input column name (one of input.passthrough_columns), e.g. "a photo of {title},".
    caption_prompt: str | None = None
    # An input column (also passed through) holding each row's own caption prompt;
    # rows where it is empty use caption_prompt.
    caption_prompt_column: str | None = None
    questions: tuple[str, ...] = ()
    question_template: str = "Question: {q} Answer:"  # the BLIP-2 paper's VQA template
    # Questions asked in turns: turn k's prompt holds the earlier turns, each as
    # answered_turn_template, then the question as question_template (the BLIP-2
    # paper's "Question: q1 Answer: a1. Question: q2 Answer:").
    conversation: tuple[str, ...] = ()
    answered_turn_template: str = "Question: {q} Answer: {a}."
    # The per-row questions (input.questions_column) are asked as a conversation,
    # after the shared conversation turns, instead of each on its own.
    row_questions_in_turns: bool = False

    def __post_init__(self) -> None:
        if "{q}" not in self.question_template:
            _fail("question_template", f"must contain '{{q}}', got {self.question_template!r}")
        for name in ("questions", "conversation"):
            for q in getattr(self, name):
                if not isinstance(q, str) or not q.strip():
                    _fail(name, f"empty question in {list(getattr(self, name))!r}")
        if "{q}" not in self.answered_turn_template or "{a}" not in self.answered_turn_template:
            _fail("answered_turn_template", f"must contain '{{q}}' and '{{a}}', got {self.answered_turn_template!r}")

    def question_prompt(self, question: str) -> str:
        return self.question_template.replace("{q}", question.strip())

    def caption_fields(self) -> tuple[str, ...]:
        """The input columns the caption prompt template names."""
        return tuple(dict.fromkeys(_FIELD.findall(self.caption_prompt or "")))

    def row_caption_prompt(self, values: dict[str, Any]) -> str | None:
        """The caption prompt of a row whose passed-through input values are ``values`` (missing: empty)."""
        own = values.get(self.caption_prompt_column) if self.caption_prompt_column else None
        if own is not None and str(own).strip():
            return str(own)
        if self.caption_prompt is None:
            return None
        fill = lambda m: "" if values.get(m.group(1)) is None else str(values[m.group(1)])  # noqa: E731
        return _FIELD.sub(fill, self.caption_prompt)

    def turn_prompt(self, history: list[tuple[str, str]], question: str) -> str:
        """The prompt of a conversation turn: the answered turns, then ``question``."""
        done = [self.answered_turn_template.replace("{q}", q.strip()).replace("{a}", a) for q, a in history]
        return " ".join([*done, self.question_prompt(question)])


@dataclass(frozen=True)
class ModelSpec:
    """Which weights to load and how.  Only safetensors; never remote code."""

    model: str = DEFAULT_MODEL  # hub id, local directory, or s3:// prefix
    revision: str | None = None
    dtype: str = "auto"  # auto = bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU
    cache_dir: str | None = None  # where s3:// weights are fetched once per node
    # Sequences per generate call; None = automatic (sized to free GPU memory,
    # 128 on CPU).  Set it only to cap memory on a GPU shared with other work.
    generation_batch: int | None = None
    # Static KV cache + torch.compile of the decoding step on CUDA (on CPU only
    # the static cache, which is slower).  Off by default: compiling costs
    # minutes per batch shape, which pays off only on long jobs.
    compile: bool = False
    engine: str = "auto"  # one of ENGINES; vllm needs the vllm extra and an OPT-based model

    def __post_init__(self) -> None:
        if not self.model or not self.model.strip():
            _fail("model", "must not be empty")
        if self.engine not in ENGINES:
            _fail("engine", f"must be one of {ENGINES}, got {self.engine!r}")
        if self.dtype not in DTYPES:
            _fail("dtype", f"must be one of {DTYPES}, got {self.dtype!r}")
        if self.generation_batch is not None and self.generation_batch < 1:
            _fail("generation_batch", f"must be >= 1, got {self.generation_batch}")


@dataclass(frozen=True)
class ResourceSpec:
    """How the stages are sized on the cluster."""

    batch_size: int | None = None  # images per model call; None = CPU_BATCH_SIZE or GPU_BATCH_SIZE
    replicas_min: int = 1
    replicas_max: int = 1
    # GPUs per replica; fractions pack several small replicas on one GPU.
    # None = 1 when the cluster has GPUs, else 0 (CPU inference).
    gpus_per_replica: float | None = None
    cpus_per_replica: float = 1.0
    decode_concurrency: int | None = None  # None = let Ray Data scale decode tasks
    read_batch_rows: int = 256  # rows per reader block: big enough to amortise, small enough to stream
    # Price of one device-hour (a GPU-hour; a CPU-hour on CPU-only runs) for the
    # summary's cost per 1,000 and per 1,000,000 images; None = no cost figures.
    gpu_hour_price: float | None = None

    def __post_init__(self) -> None:
        if self.batch_size is not None and self.batch_size < 1:
            _fail("batch_size", f"must be >= 1, got {self.batch_size}")
        if self.gpu_hour_price is not None and not self.gpu_hour_price >= 0:
            _fail("gpu_hour_price", f"must be >= 0, got {self.gpu_hour_price}")
        if self.replicas_min < 1:
            _fail("replicas_min", f"must be >= 1, got {self.replicas_min}")
        if self.replicas_max < self.replicas_min:
            _fail("replicas_max", f"must be >= replicas_min ({self.replicas_min}), got {self.replicas_max}")
        if self.gpus_per_replica is not None and self.gpus_per_replica < 0:
            _fail("gpus_per_replica", f"must be >= 0, got {self.gpus_per_replica}")
        if self.cpus_per_replica <= 0:
            _fail("cpus_per_replica", f"must be > 0, got {self.cpus_per_replica}")
        if self.decode_concurrency is not None and self.decode_concurrency < 1:
            _fail("decode_concurrency", f"must be >= 1, got {self.decode_concurrency}")
        if self.read_batch_rows < 1:
            _fail("read_batch_rows", f"must be >= 1, got {self.read_batch_rows}")

    def model_batch_size(self, gpus_per_replica: float) -> int:
        """Images per model call: the setting, or the default for where replicas run."""
        if self.batch_size is not None:
            return self.batch_size
        return GPU_BATCH_SIZE if gpus_per_replica > 0 else CPU_BATCH_SIZE


@dataclass(frozen=True)
class OutputSpec:
    """Where and how results are written."""

    url: str
    partition_by: str = "shard"
    # resume: finish what an earlier run of the same settings started (the safe
    # default for long jobs on preemptible machines); overwrite: delete first;
    # error: refuse an output that already holds data.
    mode: str = "resume"
    # Rows per Parquet file at most: a completed shard's rows are compacted
    # into as few files as this allows.  At the bytes per row measured in
    # BENCHMARKS.md, 100k rows is a few MB: one file for a shard of any usual
    # size, and small enough to hold in the driver while compacting.
    max_rows_per_file: int = 100_000
    # Resume also redoes completed shards holding error rows of a transient
    # kind (schema.TRANSIENT_ERROR_KINDS: read errors, out of memory, ...).
    retry_errors: bool = False
    # Seconds between the driver's plain progress lines (logs, `ray job submit`);
    # on a terminal a progress bar redraws instead.  0 = a line per write report.
    progress_interval_s: float = 30.0

    def __post_init__(self) -> None:
        if not self.url or not self.url.strip():
            _fail("output", "an output URL is required")
        if not self.progress_interval_s >= 0:
            _fail("progress_interval_s", f"must be >= 0, got {self.progress_interval_s}")
        _refuse_command_url(self.url, "output")
        if self.mode not in WRITE_MODES:
            _fail("mode", f"must be one of {WRITE_MODES}, got {self.mode!r}")
        if self.partition_by not in PARTITION_BY:
            _fail("partition_by", f"must be one of {PARTITION_BY}, got {self.partition_by!r}")
        if self.max_rows_per_file < 1:
            _fail("max_rows_per_file", f"must be >= 1, got {self.max_rows_per_file}")


@dataclass(frozen=True)
class AnnotateConfig:
    """Everything one annotation job needs."""

    input: InputSpec
    output: OutputSpec
    model: ModelSpec = field(default_factory=ModelSpec)
    prompts: PromptSpec = field(default_factory=PromptSpec)
    generation: GenerationSpec = field(default_factory=GenerationSpec)
    decode: DecodeSpec = field(default_factory=DecodeSpec)
    video: VideoSpec = field(default_factory=VideoSpec)
    resources: ResourceSpec = field(default_factory=ResourceSpec)
    storage: StorageOptions = field(default_factory=StorageOptions)

    def __post_init__(self) -> None:
        p = self.prompts
        if not (p.caption or p.questions or p.conversation or self.input.questions_column):
            _fail("caption", "nothing to do: captioning is off and there are no questions")
        named = [("caption_prompt", f) for f in p.caption_fields()]
        named += [("caption_prompt_column", p.caption_prompt_column)] if p.caption_prompt_column else []
        for setting, column in named:
            if column not in self.input.passthrough_columns:
                _fail(setting, f"input column {column!r} must also be one of passthrough_columns")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for the summary JSON (holds no credentials: none are in here)."""
        return dataclasses.asdict(self)
