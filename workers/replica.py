"""The model stage: one BLIP-2 replica per Ray actor, captioning and answering questions.

Used as ``ds.map_batches(Blip2Replica, batch_format="pyarrow",
fn_constructor_kwargs={...}, compute=ActorPoolStrategy(...))``.  Each actor
loads an engine once (ours, :class:`workers.engine.Blip2Engine`, or vLLM,
:class:`workers.vllm_engine.VllmEngine`); each call turns a decoded batch
(``pixels`` at the model's input size) into captions and answers.  This module
is the Arrow side: rows to (image, prompt) jobs and back, and error rows.

Out of memory: an out-of-memory error while encoding or generating splits the
work in halves and retries them (:func:`run_in_parts`), down to a single
image; only an image that does not fit alone becomes an error row
(``error_kind="out_of_memory"``).  The size that fitted is remembered
(:class:`SizeCap`) and raised again after a run of successes, so one bad
batch does not halve the rest of the job.  Any other error in a model call is
retried image by image and lands on the image at fault as
``generation_failed``.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from workers import schema
from workers.config import ENGINES, GenerationSpec, ModelSpec, PromptSpec, StorageOptions
from workers.decode import pixels_from_table
from workers.engine import Blip2Engine
from workers.fast_path import FastPath
from workers.gpu_memory import even_chunks, is_out_of_memory
from workers.model_loading import resolve_dtype
from workers.model_store import ModelLoadError, model_revision, resolve_model_dir

log = logging.getLogger(__name__)

__all__ = ["Blip2Replica", "FastPath", "ModelLoadError", "SizeCap", "pick_engine", "run_in_parts"]


def pick_engine(requested: str, encoder_decoder: Callable[[], bool]) -> str:
    """``"hf"`` or ``"vllm"`` for the ``engine`` setting.

    ``auto`` is ours everywhere: on CPU it measured faster than vLLM on both
    workloads (BENCHMARKS.md "Model engines"); on GPU no measurement exists yet,
    so auto keeps the engine whose tokens the tests pin.  ``vllm`` for an
    encoder-decoder (T5) model raises ``ValueError``: vLLM has no BLIP-2 T5.
    """
    if requested not in ENGINES:
        raise ValueError(f"engine: must be one of {ENGINES}, got {requested!r}")
    if requested == "vllm" and encoder_decoder():
        raise ValueError("engine: vllm runs BLIP-2 with OPT language models only; this model is T5 (use hf or auto)")
    return "hf" if requested == "auto" else requested


class SizeCap:
    """The largest per-call size known to fit after an out-of-memory error, recovering over time.

    After ``recover_after`` calls in a row succeed at the cap, it doubles (and
    disappears once at or above what was asked for): memory that was tight for
    one batch (a neighbour's spike, long prompts) is usually free again.  A
    doubling that runs out of memory again doubles ``recover_after``, so a
    replica that really is short of memory probes ever more rarely.
    """

    RECOVER_AFTER = 32

    def __init__(self) -> None:
        self.limit: int | None = None
        self.recover_after = self.RECOVER_AFTER
        self._successes = 0
        self._probing = False

    def apply(self, chunk: int) -> int:
        return min(chunk, self.limit) if self.limit else chunk

    def shrink(self, size: int) -> None:
        if self._probing:
            self.recover_after *= 2
        self.limit, self._successes, self._probing = max(1, size), 0, False

    def succeeded(self, size: int, wanted: int) -> None:
        if self.limit is None or size >= self.limit:
            self._probing = False  # what was probed fitted
        if self.limit is None or size < self.limit:
            return
        self._successes += 1
        if self._successes >= self.recover_after:
            self.limit = None if self.limit * 2 >= wanted else self.limit * 2
            self._successes, self._probing = 0, True


def run_in_parts(
    items: list[Any],
    call: Callable[[list[Any]], None],
    image_of: Callable[[Any], int],
    failed: dict[int, tuple[str, str]],
    chunk: int,
    cap: SizeCap,
    after_oom: Callable[[], None],
    what: str,
) -> None:
    """``call`` over ``items`` in even parts of at most ``cap.apply(chunk)``; failures land in ``failed``.

    Out of memory halves the part (remembered in ``cap``) down to one item,
    which then fails as ``out_of_memory``.  Any other error retries the part
    item by item, so it lands on the image at fault as ``generation_failed``
    with the exception's type and message.  Items of images already in
    ``failed`` are skipped.  Never raises for a model error.
    """
    live = [x for x in items if image_of(x) not in failed]
    start = 0
    while start < len(live):
        # Re-planned after every part: an out-of-memory error in one lowers the cap for the rest.
        size = even_chunks(len(live) - start, cap.apply(chunk))[0]
        _run_part(live[start : start + size], call, image_of, failed, chunk, cap, after_oom, what)
        start += size


def _run_part(part, call, image_of, failed, chunk, cap, after_oom, what) -> None:
    part = [x for x in part if image_of(x) not in failed]
    if not part:
        return
    oom = None
    try:
        call(part)
        cap.succeeded(len(part), chunk)
        return
    except Exception as exc:  # noqa: BLE001 - the cause becomes the image's error row
        message = f"{type(exc).__name__}: {exc}"
        if not is_out_of_memory(exc):
            if len(part) == 1:
                failed[image_of(part[0])] = (schema.GENERATION_FAILED, message)
                return
            log.warning("%s failed for %d items, retrying one by one: %s", what, len(part), message)
            for item in part:
                _run_part([item], call, image_of, failed, chunk, cap, after_oom, what)
            return
        oom = message
    # Outside the except block, so the failed call's tensors can be freed first.
    after_oom()
    if len(part) == 1:
        failed[image_of(part[0])] = (schema.OUT_OF_MEMORY, f"out of memory {what} for the image alone: {oom}")
        return
    half = len(part) // 2
    cap.shrink(half)
    log.warning("out of memory %s %d items; retrying in halves of %d", what, len(part), half)
    for piece in (part[:half], part[half:]):
        _run_part(piece, call, image_of, failed, chunk, cap, after_oom, what)


@dataclass
class _Job:
    """One generation: an image (row in the ok sub-batch) and a tokenised prompt."""

    image: int
    slot: int  # 0 = caption, k >= 1 = (k-1)-th question of the row
    prompt_ids: tuple[int, ...]
    result: list[int] = field(default_factory=list)


def _is_encoder_decoder(model_dir) -> bool:
    from transformers import AutoConfig

    return bool(AutoConfig.from_pretrained(model_dir, local_files_only=True).text_config.is_encoder_decoder)


def _ray_gpu_ids() -> list:
    try:
        import ray
    except ImportError:
        return []
    return list(ray.get_gpu_ids()) if ray.is_initialized() else []


class Blip2Replica:
    """Callable class for ``map_batches``: pyarrow decode-stage batch -> model-stage batch."""

    def __init__(
        self,
        model: ModelSpec,
        prompts: PromptSpec,
        generation: GenerationSpec,
        storage: StorageOptions | None = None,
        cache_root: str | None = None,
        fast: FastPath | None = None,
        device: str | None = None,
    ) -> None:
        """Fetch (once per node) and load the model; raises :class:`ModelLoadError` naming the model.

        ``device``: ``"cuda"``, ``"cpu"`` or ``None`` (CUDA when available, else CPU).
        """
        import torch

        self.spec, self.prompts, self.generation = model, prompts, generation
        fast = fast or FastPath()
        try:
            model_dir = resolve_model_dir(model, storage or StorageOptions(), cache_root)
        except ModelLoadError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported as a load error, cause kept
            raise ModelLoadError(f"cannot get model {model.model!r}: {type(exc).__name__}: {exc}") from exc
        self.revision = model_revision(model_dir, model)
        target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        gpu_ids = _ray_gpu_ids()
        if gpu_ids and target.type != "cuda":
            # Most often a CPU-only torch wheel on a GPU node: the job still runs,
            # but at CPU speed, so say it where `ray job logs` shows it.
            log.warning(
                "Ray assigned this replica %.2f of GPU %s, but torch %s sees no CUDA device; running on CPU. "
                "Install a CUDA build of torch on the GPU nodes.",
                fast.gpu_share, ",".join(map(str, gpu_ids)), torch.__version__,
            )  # fmt: skip
        dtype = resolve_dtype(model.dtype, target)
        try:
            chosen = pick_engine(model.engine, lambda: _is_encoder_decoder(model_dir))
        except (ValueError, OSError) as exc:
            raise ModelLoadError(f"{model.model!r}: {exc}") from exc
        if chosen == "vllm":
            from workers.vllm_engine import VllmEngine

            self.engine = VllmEngine(model_dir, generation, dtype, fast, device=target)
        else:
            self.engine = Blip2Engine.load(model_dir, generation, fast, target, dtype)
        self._vision_cap, self._generation_cap = SizeCap(), SizeCap()

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        with torch.inference_mode():
            return self._annotate(batch)

    def _annotate(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        status = batch.column(schema.STATUS).to_pylist()
        ok_rows = [i for i, s in enumerate(status) if s == schema.STATUS_OK]
        captions: list[str | None] = [None] * n
        answers: list[list[dict[str, str]] | None] = [None] * n
        names = batch.column_names
        error_kind = batch.column(schema.ERROR_KIND).to_pylist() if schema.ERROR_KIND in names else [None] * n
        error = batch.column(schema.ERROR).to_pylist() if schema.ERROR in names else [None] * n

        if ok_rows:
            # Most batches are all ok: no copy of the pixels then.
            ok_table = batch if len(ok_rows) == n else batch.take(pa.array(ok_rows, pa.int64()))
            failed = self._annotate_ok(ok_table, ok_rows, captions, answers)
            for image, (kind, message) in failed.items():
                row = ok_rows[image]
                status[row], error_kind[row], error[row] = schema.STATUS_ERROR, kind, message
                captions[row] = answers[row] = None

        out = batch.drop_columns([schema.PIXELS]) if schema.PIXELS in names else batch
        columns = {
            schema.STATUS: pa.array(status, pa.string()),
            schema.ERROR_KIND: pa.array(error_kind, pa.string()),
            schema.ERROR: pa.array(error, pa.string()),
            schema.CAPTION: pa.array(captions, pa.string()),
            schema.ANSWERS: pa.array(answers, pa.list_(schema.ANSWER_TYPE)),
            schema.MODEL_ID: pa.array([self.spec.model] * n, pa.string()),
            schema.MODEL_REVISION: pa.array([self.revision] * n, pa.string()),
        }
        for name, values in columns.items():
            if name in out.column_names:
                out = out.set_column(out.column_names.index(name), name, values)
            else:
                out = out.append_column(name, values)
        return out

    def _annotate_ok(self, ok_table: pa.Table, ok_rows, captions, answers) -> dict[int, tuple[str, str]]:
        engine = self.engine
        pixels = pixels_from_table(ok_table)
        if pixels.ndim != 4 or pixels.shape[1:] != (engine.height, engine.width, 3):
            raise ValueError(
                f"{schema.PIXELS}: expected uint8 images of shape ({engine.height}, {engine.width}, 3), the model's "
                f"input size, got {pixels.shape[1:]}; the decode stage must resize to the size "
                "check_model_reachable() reports"
            )
        if pixels.dtype != np.uint8:
            raise ValueError(f"{schema.PIXELS}: expected uint8, got {pixels.dtype}")

        row_questions = (
            ok_table.column(schema.ROW_QUESTIONS).to_pylist()
            if schema.ROW_QUESTIONS in ok_table.column_names
            else [None] * len(ok_rows)
        )
        questions: list[list[str]] = []
        jobs: list[_Job] = []
        for image in range(len(ok_rows)):
            qs = list(self.prompts.questions) + [q for q in (row_questions[image] or []) if q and q.strip()]
            questions.append(qs)
            if self.prompts.caption:
                jobs.append(_Job(image, 0, engine.prompt_ids(self.prompts.caption_prompt)))
            jobs += [_Job(image, k, engine.prompt_ids(self.prompts.question_prompt(q))) for k, q in enumerate(qs, 1)]
        failed: dict[int, tuple[str, str]] = {}
        if not jobs:
            return failed

        features: list[Any] = [None] * len(ok_rows)

        def encode(part: list[int]) -> None:
            out = engine.encode(pixels[part[0] : part[-1] + 1])
            for k, image in enumerate(part):
                features[image] = out[k]

        images = list(range(len(ok_rows)))
        run_in_parts(
            images,
            encode,
            int,
            failed,
            engine.vision_chunk(len(images)),
            self._vision_cap,
            engine.after_oom,
            "encoding",
        )
        if len(failed) == len(images):
            return failed
        per_image = [len(qs) + bool(self.prompts.caption) for qs in questions]
        prefix = engine.prefix(features, per_image)

        def generate(part: list[_Job]) -> None:
            tokens = engine.generate(prefix, [j.image for j in part], [j.prompt_ids for j in part])
            for job, result in zip(part, tokens, strict=True):
                job.result = result

        groups: dict[Any, list[_Job]] = defaultdict(list)
        for job in jobs:
            groups[engine.group_key(job.prompt_ids)].append(job)
        for key in sorted(groups):
            group = groups[key]
            chunk = engine.generation_chunk(len(group[0].prompt_ids))
            run_in_parts(
                group, generate, lambda j: j.image, failed, chunk, self._generation_cap, engine.after_oom, "generating"
            )

        texts = engine.decode([j.result for j in jobs])
        results = {(j.image, j.slot): text for j, text in zip(jobs, texts, strict=True)}
        for image, row in enumerate(ok_rows):
            if image in failed:
                continue
            if self.prompts.caption:
                captions[row] = results[(image, 0)]
            answers[row] = [{"question": q, "answer": results[(image, k)]} for k, q in enumerate(questions[image], 1)]
        return failed
