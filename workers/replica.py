"""The model stage: one BLIP-2 replica per Ray actor, captioning and answering questions.

Used as ``ds.map_batches(Blip2Replica, batch_format="pyarrow",
fn_constructor_kwargs={...}, compute=ActorPoolStrategy(...))``.  Each actor
loads the weights once; each call turns a decoded batch (``pixels`` at the
model's input size) into captions and answers.

Fidelity: for every image and prompt the replica produces the same tokens as
the plain Hugging Face recipe, ``Blip2Processor(images=image, text=prompt)``
then ``Blip2ForConditionalGeneration.generate`` one image at a time.  It gets
there faster by

* normalising the already-resized ``uint8`` pixels with the processor's own
  arithmetic (float64 rescale, float32 normalise, as the PIL-backend
  ``BlipImageProcessor`` does), so the model sees bit-identical inputs;
* running the vision encoder, the Q-Former and the language projection once
  per image, then reusing that prefix for the caption and every question
  (``generate`` would recompute it for each prompt);
* building the language model's input exactly as ``generate`` does
  (``<image>`` x ``num_query_tokens`` then the prompt tokens, the image
  positions overwritten by the projected query outputs) and generating in
  groups of prompts of identical token length, so no padding is ever needed
  and every sequence sees exactly the input it would see alone.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from workers import schema
from workers.config import GenerationSpec, ModelSpec, PromptSpec, StorageOptions
from workers.decode import pixels_from_table
from workers.model_store import ModelLoadError, model_revision, resolve_model_dir

log = logging.getLogger(__name__)

GENERATION_FAILED = "generation_failed"

__all__ = ["Blip2Replica", "ModelLoadError", "GENERATION_FAILED", "resolve_dtype", "normalize_pixels"]


def resolve_dtype(name: str, device: Any):
    """The torch dtype for ``ModelSpec.dtype`` on ``device``.

    ``auto``: bfloat16 on GPUs that support it, float16 on older GPUs, float32 on CPU.
    """
    import torch

    if name == "auto":
        if getattr(device, "type", str(device)) == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def normalize_pixels(pixels: np.ndarray, rescale_factor: float, mean: Any, std: Any) -> np.ndarray:
    """``uint8 (N, H, W, 3)`` -> ``float32 (N, 3, H, W)``, bit-identical to BlipImageProcessor.

    Same operations in the same precision as the processor's PIL backend:
    ``rescale`` multiplies in float64 and casts to float32, ``normalize``
    subtracts and divides by float32 mean and std.  (The transpose to channels
    first does not touch the values.)
    """
    rescaled = (pixels.astype(np.float64) * rescale_factor).astype(np.float32)
    mean32 = np.asarray(mean, dtype=np.float32)
    std32 = np.asarray(std, dtype=np.float32)
    normalized = (rescaled - mean32) / std32
    return np.ascontiguousarray(normalized.transpose(0, 3, 1, 2))


@dataclass
class _Job:
    """One generation: an image (row in the ok sub-batch) and a tokenised prompt."""

    image: int
    slot: int  # 0 = caption, k >= 1 = (k-1)-th question of the row
    prompt_ids: tuple[int, ...]
    result: list[int] = field(default_factory=list)


class Blip2Replica:
    """Callable class for ``map_batches``: pyarrow decode-stage batch -> model-stage batch."""

    def __init__(
        self,
        model: ModelSpec,
        prompts: PromptSpec,
        generation: GenerationSpec,
        storage: StorageOptions | None = None,
        cache_root: str | None = None,
    ) -> None:
        import torch

        self.spec = model
        self.prompts = prompts
        self.generation = generation
        storage = storage or StorageOptions()
        try:
            self.model_dir = resolve_model_dir(model, storage, cache_root)
        except ModelLoadError:
            raise
        except Exception as exc:
            raise ModelLoadError(f"cannot get model {model.model!r}: {type(exc).__name__}: {exc}") from exc
        self.revision = model_revision(self.model_dir, model)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = resolve_dtype(model.dtype, self.device)
        self._load()

    # ------------------------------------------------------------------ loading

    def _load(self) -> None:
        import torch
        from transformers import Blip2ForConditionalGeneration, Blip2Processor

        where = f"{self.spec.model!r} ({self.model_dir})"
        try:
            # Local files only: resolve_model_dir fetched everything needed, and
            # only safetensors are ever read (never pickle, never remote code).
            net = Blip2ForConditionalGeneration.from_pretrained(
                self.model_dir, dtype=self.dtype, use_safetensors=True, local_files_only=True
            )
            processor = Blip2Processor.from_pretrained(self.model_dir, local_files_only=True)
        except Exception as exc:
            raise ModelLoadError(f"cannot load BLIP-2 from {where}: {type(exc).__name__}: {exc}") from exc
        config = net.config
        if config.image_token_index is None:
            raise ModelLoadError(
                f"{where}: config.image_token_index is not set; this checkpoint predates the <image>-token "
                "layout of transformers >= 4.47; use a current revision of the checkpoint"
            )
        self.model = net.to(self.device).eval()
        self.tokenizer = processor.tokenizer
        image_processor = processor.image_processor
        self.rescale_factor = float(image_processor.rescale_factor) if image_processor.do_rescale else 1.0
        if image_processor.do_normalize:
            self.image_mean = list(image_processor.image_mean)
            self.image_std = list(image_processor.image_std)
        else:
            self.image_mean, self.image_std = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
        size = image_processor.size
        self.height = int(size["height"]) if "height" in size else int(size["shortest_edge"])
        self.width = int(size["width"]) if "width" in size else int(size["shortest_edge"])
        self.num_query_tokens = int(config.num_query_tokens)
        self.image_token_id = int(config.image_token_index)
        self.is_encoder_decoder = bool(self.model.language_model.config.is_encoder_decoder)
        bos = getattr(config.text_config, "bos_token_id", None)
        # What generate() starts an unprompted caption with after the image tokens.
        self._unprompted = (int(bos),) if bos is not None else tuple(self.tokenizer("").input_ids)
        self._prompt_cache: dict[str | None, tuple[int, ...]] = {}
        self._torch = torch

    def prompt_ids(self, prompt: str | None) -> tuple[int, ...]:
        """Token ids of ``prompt`` as ``Blip2Processor`` makes them (``None`` = unprompted caption)."""
        if prompt not in self._prompt_cache:
            if prompt is None:
                ids = self._unprompted
            else:
                ids = tuple(int(i) for i in self.tokenizer(prompt).input_ids)
            if len(self._prompt_cache) < 4096:
                self._prompt_cache[prompt] = ids
            return ids
        return self._prompt_cache[prompt]

    # ------------------------------------------------------------------ model pieces

    def _image_prefix(self, pixel_values):
        """Projected Q-Former outputs, ``(N, num_query_tokens, text_hidden)``, as ``generate`` computes them."""
        model = self.model
        image_embeds = model.vision_model(pixel_values, return_dict=True).last_hidden_state
        image_attention_mask = self._torch.ones(
            image_embeds.size()[:-1], dtype=self._torch.long, device=image_embeds.device
        )
        query_tokens = model.query_tokens.expand(image_embeds.shape[0], -1, -1)
        query_output = model.qformer(
            query_embeds=query_tokens,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_attention_mask,
            return_dict=True,
        ).last_hidden_state
        if query_output.dtype != image_embeds.dtype:  # the Q-Former is kept in fp32
            query_output = query_output.to(image_embeds.dtype)
        return model.language_projection(query_output)

    def _generate(self, prefix, prompts: list[tuple[int, ...]]) -> list[list[int]]:
        """Generate for ``prefix[i]`` with ``prompts[i]`` (all the same length); return new token ids."""
        torch = self._torch
        model = self.model
        ids = [[self.image_token_id] * self.num_query_tokens + list(p) for p in prompts]
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        inputs_embeds = model.get_input_embeddings()(input_ids)
        attention_mask = torch.ones_like(input_ids)
        special_image_mask = (input_ids == self.image_token_id).unsqueeze(-1).to(inputs_embeds.device)
        prefix = prefix.to(inputs_embeds.device, inputs_embeds.dtype)
        inputs_embeds = inputs_embeds.masked_scatter(special_image_mask, prefix)
        inputs: dict[str, Any] = {"inputs_embeds": inputs_embeds, "attention_mask": attention_mask}
        if not self.is_encoder_decoder:
            inputs["input_ids"] = input_ids
        out = model.language_model.generate(**inputs, **self.generation.generate_kwargs())
        if self.is_encoder_decoder:
            new = out[:, 1:]  # drop the decoder start token
        elif out.shape[1] >= input_ids.shape[1] and torch.equal(out[:, : input_ids.shape[1]], input_ids):
            new = out[:, input_ids.shape[1] :]  # decoder-only generate echoes the prompt
        else:
            new = out
        return [self._trim(row) for row in new.tolist()]

    def _trim(self, tokens: list[int]) -> list[int]:
        """Drop everything from the first EOS on (batched generate pads finished rows)."""
        eos = self.model.language_model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
        for i, token in enumerate(tokens):
            if token in eos_ids:
                return tokens[: i + 1]
        return tokens

    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True).strip()

    # ------------------------------------------------------------------ batch

    def _run_jobs(self, prefix, jobs: list[_Job], chunk: int, failed: dict[int, str]) -> None:
        """Generate every job, grouped by prompt length; images whose generation fails land in ``failed``."""
        by_length: dict[int, list[_Job]] = defaultdict(list)
        for job in jobs:
            by_length[len(job.prompt_ids)].append(job)
        for length in sorted(by_length):
            group = by_length[length]
            for start in range(0, len(group), chunk):
                part = [j for j in group[start : start + chunk] if j.image not in failed]
                if part:
                    self._run_part(prefix, part, failed)

    def _run_part(self, prefix, part: list[_Job], failed: dict[int, str]) -> None:
        torch = self._torch
        try:
            results = self._generate(prefix[[j.image for j in part]], [j.prompt_ids for j in part])
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as exc:
            if len(part) == 1:
                failed[part[0].image] = f"{type(exc).__name__}: {exc}"
                return
            # Isolate the failing image(s): retry one at a time.
            log.warning("generation failed for a group of %d, retrying one by one: %s", len(part), exc)
            for job in part:
                if job.image not in failed:
                    self._run_part(prefix, [job], failed)
            return
        for job, tokens in zip(part, results, strict=True):
            job.result = tokens

    def _prefixes(self, pixel_values, failed: dict[int, str]):
        """Image prefixes for the whole sub-batch; on a (non-OOM) failure, per image."""
        torch = self._torch
        try:
            return self._image_prefix(pixel_values)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as exc:
            if pixel_values.shape[0] == 1:
                failed[0] = f"{type(exc).__name__}: {exc}"
                return None
            log.warning("image encoder failed for a batch of %d, retrying one by one: %s", pixel_values.shape[0], exc)
        parts = []
        template = None
        for i in range(pixel_values.shape[0]):
            try:
                parts.append(self._image_prefix(pixel_values[i : i + 1]))
                template = parts[-1]
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as exc:
                failed[i] = f"{type(exc).__name__}: {exc}"
                parts.append(None)
        if template is None:
            return None
        return torch.cat([p if p is not None else torch.zeros_like(template) for p in parts])

    def __call__(self, batch: pa.Table) -> pa.Table:
        with self._torch.inference_mode():
            return self._annotate(batch)

    def _annotate(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        status = batch.column(schema.STATUS).to_pylist()
        ok_rows = [i for i, s in enumerate(status) if s == schema.STATUS_OK]
        captions: list[str | None] = [None] * n
        answers: list[list[dict[str, str]] | None] = [None] * n
        error_kind = (
            batch.column(schema.ERROR_KIND).to_pylist() if schema.ERROR_KIND in batch.column_names else [None] * n
        )
        error = batch.column(schema.ERROR).to_pylist() if schema.ERROR in batch.column_names else [None] * n

        if ok_rows:
            self._annotate_ok(batch, ok_rows, status, captions, answers, error_kind, error)

        out = batch.drop_columns([schema.PIXELS]) if schema.PIXELS in batch.column_names else batch
        out = _set_column(out, schema.STATUS, pa.array(status, pa.string()))
        out = _set_column(out, schema.ERROR_KIND, pa.array(error_kind, pa.string()))
        out = _set_column(out, schema.ERROR, pa.array(error, pa.string()))
        out = _set_column(out, schema.CAPTION, pa.array(captions, pa.string()))
        out = _set_column(out, schema.ANSWERS, pa.array(answers, pa.list_(schema.ANSWER_TYPE)))
        out = _set_column(out, schema.MODEL_ID, pa.array([self.spec.model] * n, pa.string()))
        out = _set_column(out, schema.MODEL_REVISION, pa.array([self.revision] * n, pa.string()))
        return out

    def _annotate_ok(self, batch, ok_rows, status, captions, answers, error_kind, error) -> None:
        torch = self._torch
        ok_table = batch.take(pa.array(ok_rows, pa.int64()))
        pixels = pixels_from_table(ok_table)
        if pixels.ndim != 4 or pixels.shape[1:] != (self.height, self.width, 3):
            raise ValueError(
                f"{schema.PIXELS}: expected uint8 images of shape ({self.height}, {self.width}, 3), the model's "
                f"input size, got {pixels.shape[1:]}; the decode stage must resize to the size "
                "check_model_reachable() reports"
            )
        if pixels.dtype != np.uint8:
            raise ValueError(f"{schema.PIXELS}: expected uint8, got {pixels.dtype}")
        pixel_values = torch.from_numpy(normalize_pixels(pixels, self.rescale_factor, self.image_mean, self.image_std))
        pixel_values = pixel_values.to(self.device, self.dtype)

        row_questions = (
            ok_table.column(schema.ROW_QUESTIONS).to_pylist()
            if schema.ROW_QUESTIONS in ok_table.column_names
            else [None] * len(ok_rows)
        )
        questions_per_image: list[list[str]] = []
        jobs: list[_Job] = []
        for image in range(len(ok_rows)):
            qs = list(self.prompts.questions) + [q for q in (row_questions[image] or []) if q and q.strip()]
            questions_per_image.append(qs)
            if self.prompts.caption:
                jobs.append(_Job(image, 0, self.prompt_ids(self.prompts.caption_prompt)))
            for k, q in enumerate(qs, start=1):
                jobs.append(_Job(image, k, self.prompt_ids(self.prompts.question_prompt(q))))

        failed: dict[int, str] = {}
        prefix = self._prefixes(pixel_values, failed) if jobs else None
        if prefix is not None:
            self._run_jobs(prefix, jobs, chunk=max(len(ok_rows), 1), failed=failed)

        results: dict[tuple[int, int], str] = {(j.image, j.slot): self.decode(j.result) for j in jobs}
        for image, row in enumerate(ok_rows):
            if image in failed:
                status[row] = schema.STATUS_ERROR
                error_kind[row] = GENERATION_FAILED
                error[row] = failed[image]
                continue
            if self.prompts.caption:
                captions[row] = results[(image, 0)]
            answers[row] = [
                {"question": q, "answer": results[(image, k)]}
                for k, q in enumerate(questions_per_image[image], start=1)
            ]


def _set_column(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, values)
    return table.append_column(name, values)
