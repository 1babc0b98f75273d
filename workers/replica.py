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
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from workers import schema
from workers.batch_splitting import SizeCap, run_in_parts
from workers.config import ENGINES, GenerationSpec, ModelSpec, PromptSpec, StorageOptions
from workers.conversation import continue_conversations, first_session
from workers.decode import pixels_from_table
from workers.engine import Blip2Engine
from workers.fast_path import FastPath
from workers.model_loading import resolve_dtype
from workers.model_store import ModelLoadError, model_revision, resolve_model_dir
from workers.usage import ReplicaUsage

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
        usage_meter: str | None = None,
    ) -> None:
        """Fetch (once per node) and load the model; raises :class:`ModelLoadError` naming the model.

        ``device``: ``"cuda"``, ``"cpu"`` or ``None`` (CUDA when available, else CPU).
        ``usage_meter``: the name of the run's :class:`workers.usage.UsageMeter` actor, if any.
        """
        import torch

        # First: the replica holds its device from here, while it loads too.
        self.usage = ReplicaUsage(usage_meter)
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

        started = time.perf_counter()
        with torch.inference_mode():
            out = self._annotate(batch)
        self.usage.add(time.perf_counter() - started)
        return out

    def _annotate(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        status = batch.column(schema.STATUS).to_pylist()
        ok_rows = [i for i, s in enumerate(status) if s == schema.STATUS_OK]
        captions: list[str | None] = [None] * n
        answers: list[list[dict[str, str]] | None] = [None] * n
        conversations: list[list[dict[str, Any]] | None] = [None] * n
        names = batch.column_names
        error_kind = batch.column(schema.ERROR_KIND).to_pylist() if schema.ERROR_KIND in names else [None] * n
        error = batch.column(schema.ERROR).to_pylist() if schema.ERROR in names else [None] * n

        if ok_rows:
            # Most batches are all ok: no copy of the pixels then.
            ok_table = batch if len(ok_rows) == n else batch.take(pa.array(ok_rows, pa.int64()))
            failed = self._annotate_ok(ok_table, ok_rows, captions, answers, conversations)
            for image, (kind, message) in failed.items():
                row = ok_rows[image]
                status[row], error_kind[row], error[row] = schema.STATUS_ERROR, kind, message
                captions[row] = answers[row] = conversations[row] = None

        out = batch.drop_columns([schema.PIXELS]) if schema.PIXELS in names else batch
        columns = {
            schema.STATUS: pa.array(status, pa.string()),
            schema.ERROR_KIND: pa.array(error_kind, pa.string()),
            schema.ERROR: pa.array(error, pa.string()),
            schema.CAPTION: pa.array(captions, pa.string()),
            schema.ANSWERS: pa.array(answers, pa.list_(schema.ANSWER_TYPE)),
            schema.CONVERSATION: pa.array(conversations, pa.list_(schema.TURN_TYPE)),
            schema.MODEL_ID: pa.array([self.spec.model] * n, pa.string()),
            schema.MODEL_REVISION: pa.array([self.revision] * n, pa.string()),
        }
        for name, values in columns.items():
            if name in out.column_names:
                out = out.set_column(out.column_names.index(name), name, values)
            else:
                out = out.append_column(name, values)
        return out

    def _annotate_ok(self, ok_table: pa.Table, ok_rows, captions, answers, conversations) -> dict[int, tuple[str, str]]:
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
        captions_asked = self._caption_prompts(ok_table)
        questions: list[list[str]] = []
        jobs: list[_Job] = []
        talks: list[list[str]] = []
        in_turns = self.prompts.row_questions_in_turns
        for image in range(len(ok_rows)):
            own = [q for q in (row_questions[image] or []) if q and q.strip()]
            qs = list(self.prompts.questions) + ([] if in_turns else own)
            talks.append(list(self.prompts.conversation) + (own if in_turns else []))
            questions.append(qs)
            if self.prompts.caption:
                jobs.append(_Job(image, 0, engine.prompt_ids(captions_asked[image])))
            jobs += [_Job(image, k, engine.prompt_ids(self.prompts.question_prompt(q))) for k, q in enumerate(qs, 1)]
        failed: dict[int, tuple[str, str]] = {}
        if not jobs and not any(talks):
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
        per_image = [len(qs) + bool(self.prompts.caption) + len(t) for qs, t in zip(questions, talks, strict=True)]
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

        turns = self._converse(prefix, talks, failed) if any(talks) else None
        texts = engine.decode([j.result for j in jobs])
        results = {(j.image, j.slot): text for j, text in zip(jobs, texts, strict=True)}
        for image, row in enumerate(ok_rows):
            if image in failed:
                continue
            if self.prompts.caption:
                captions[row] = results[(image, 0)]
            answers[row] = [{"question": q, "answer": results[(image, k)]} for k, q in enumerate(questions[image], 1)]
            if turns is not None:
                conversations[row] = turns[image]
        return failed

    def _caption_prompts(self, ok_table: pa.Table) -> list[str | None]:
        """Each row's caption prompt: its own (``caption_prompt_column``), or the template filled from its columns."""
        p = self.prompts
        columns = [*p.caption_fields(), *([p.caption_prompt_column] if p.caption_prompt_column else [])]
        if not columns:
            return [p.caption_prompt] * ok_table.num_rows
        names = {c: schema.passthrough_name(c) for c in columns}
        values = {c: ok_table.column(n).to_pylist() for c, n in names.items() if n in ok_table.column_names}
        return [p.row_caption_prompt({c: v[i] for c, v in values.items()}) for i in range(ok_table.num_rows)]

    def _converse(self, prefix, talks: list[list[str]], failed) -> list[list[dict[str, Any]]]:
        """Every image's conversation, turn by turn; one turn of all images at a time.

        Turn k's prompt holds the earlier questions and the model's own answers
        (``PromptSpec.turn_prompt``); an image whose next turn would not fit the
        language model's context fails as ``context_exceeded`` (its other turns
        are dropped with it: a row is whole or an error).
        """
        engine = self.engine
        done: list[list[dict[str, Any]]] = [[] for _ in talks]
        sessions = [first_session(engine, prefix, image) for image in range(len(talks))]
        for turn in range(max(len(t) for t in talks)):
            jobs: list[_Job] = []
            for image, questions in enumerate(talks):
                if turn >= len(questions) or image in failed:
                    continue
                history = [(d["question"], d["answer"]) for d in done[image]]
                ids = engine.prompt_ids(self.prompts.turn_prompt(history, questions[turn]))
                need = engine.num_query_tokens + len(ids) + self.generation.max_new_tokens
                if engine.max_context and need > engine.max_context:
                    failed[image] = (
                        schema.CONTEXT_EXCEEDED,
                        f"conversation turn {turn + 1} needs up to {need} tokens ({engine.num_query_tokens} image, "
                        f"{len(ids)} prompt, max_new_tokens {self.generation.max_new_tokens}); the language model's "
                        f"context holds {engine.max_context}",
                    )
                    continue
                jobs.append(_Job(image, turn + 1, ids))

            def talk(part: list[_Job]) -> None:
                tokens, after = continue_conversations(
                    engine,
                    prefix,
                    [j.image for j in part],
                    [j.prompt_ids for j in part],
                    [sessions[j.image] for j in part],
                )
                for job, result, session in zip(part, tokens, after, strict=True):
                    job.result, sessions[job.image] = result, session

            chunk = engine.generation_chunk(max((len(j.prompt_ids) for j in jobs), default=1))
            run_in_parts(
                jobs, talk, lambda j: j.image, failed, chunk, self._generation_cap, engine.after_oom, "talking"
            )
            jobs = [j for j in jobs if j.image not in failed]
            for job, text in zip(jobs, engine.decode([j.result for j in jobs]), strict=True):
                done[job.image].append({"turn": job.slot, "question": talks[job.image][turn], "answer": text})
        return done
