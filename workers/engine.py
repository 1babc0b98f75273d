"""Our BLIP-2 engine: pure torch, no Arrow, no Ray.

It loads ``Blip2ForConditionalGeneration``, turns images into prefixes and
generates tokens for (image, prompt) jobs.  Fidelity: for every image and
prompt the tokens equal the plain Hugging Face recipe, ``Blip2Processor(images,
text)`` then ``generate`` one image at a time.  It gets there faster by

* normalising the already-resized ``uint8`` pixels bit-identically
  (:mod:`workers.pixels`), on the GPU through a double-buffered pinned upload;
* running the vision encoder, Q-Former and projection once per image
  (:meth:`Blip2Engine.encode`), reused by the caption and every question;
* building the language model input exactly as ``generate`` does (``<image>``
  x ``num_query_tokens`` then the prompt, image positions replaced by the
  projected queries), in groups of prompts of identical token length, so no
  padding is ever needed and every sequence sees the input it would see alone;
* for decoder-only language models (OPT), running the image positions through
  the language model once per image (:meth:`Blip2Engine.prefix`) and starting
  every prompt from that key/value cache, decoded by our greedy loop
  (:mod:`workers.decoding`) through a ``Cache``, the supported API.  Beam
  search, T5 and ``compile`` go to plain ``generate`` without a prefilled cache.

Out of memory here propagates; the stage (:mod:`workers.replica`) splits the
work and retries.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from workers import gpu_memory
from workers.config import GenerationSpec
from workers.decoding import greedy_loop_covers, greedy_tokens
from workers.fast_path import FastPath
from workers.model_loading import PromptTokens, input_size, load_hf_model
from workers.model_store import ModelLoadError
from workers.pixels import PinnedStaging, make_normalizer, normalization_table, normalize_pixels

log = logging.getLogger(__name__)

__all__ = ["Blip2Engine", "FastPath", "ImagePrefix"]


@dataclass
class ImagePrefix:
    """A batch's images as the language model sees them.

    ``embeds``: the projected Q-Former outputs, ``(N, num_query_tokens, hidden)``;
    ``kv``: per layer ``(keys, values)`` of those positions after the language
    model (decoder-only models with several prompts per image), else ``None``.
    """

    embeds: Any
    kv: list[tuple[Any, Any]] | None = None


class Blip2Engine:
    """Images and prompt token ids in, generated token ids out."""

    name = "hf"

    def __init__(self, net: Any, processor: Any, generation: GenerationSpec, fast: FastPath | None = None) -> None:
        """Wraps a loaded model; raises :class:`ModelLoadError` for checkpoints without an ``<image>`` token."""
        import torch

        self._torch = torch
        self.generation = generation
        self.fast = fast or FastPath()
        config = net.config
        if config.image_token_index is None:
            raise ModelLoadError(
                "config.image_token_index is not set; this checkpoint predates the <image>-token "
                "layout of transformers >= 4.47; use a current revision of the checkpoint"
            )
        self.model = net.eval()
        param = next(net.parameters())
        self.device = param.device
        self.dtype = net.vision_model.embeddings.patch_embedding.weight.dtype
        ip = processor.image_processor
        self.rescale_factor = float(ip.rescale_factor) if ip.do_rescale else 1.0
        self.image_mean = list(ip.image_mean) if ip.do_normalize else [0.0, 0.0, 0.0]
        self.image_std = list(ip.image_std) if ip.do_normalize else [1.0, 1.0, 1.0]
        self.height, self.width = input_size(ip)
        self.num_query_tokens = int(config.num_query_tokens)
        self.image_token_id = int(config.image_token_index)
        lm = self.model.language_model
        self.is_encoder_decoder = bool(lm.config.is_encoder_decoder)
        # Longest input + output the language model was built for (OPT's learned positions; T5's n_positions).
        tc = lm.config
        self.max_context = getattr(tc, "max_position_embeddings", None) or getattr(tc, "n_positions", None)
        bos = getattr(config.text_config, "bos_token_id", None)
        self.text = PromptTokens(processor.tokenizer, bos, lm.generation_config.eos_token_id)
        self.eos_ids = self.text.eos_ids
        self._normalize = make_normalizer(self.rescale_factor, self.image_mean, self.image_std)
        self._table = normalization_table(self.rescale_factor, self.image_mean, self.image_std)
        self._table_device = None
        self._staging = PinnedStaging(self.device) if self.device.type == "cuda" else None
        self._generate_kwargs = generation.generate_kwargs()
        if self.fast.compile:
            self._generate_kwargs["cache_implementation"] = "static"
        # Our loop: decoder-only, greedy settings it reproduces, not compile (which is generate's).
        self.own_loop = (
            not self.is_encoder_decoder
            and not self.fast.compile
            and greedy_loop_covers(generation, lm.generation_config)
        )
        self.use_prefix_cache = self.own_loop and self.fast.prefix_cache
        if not self.is_encoder_decoder:
            self.decoder = getattr(lm, lm.base_model_prefix).decoder
            # transformers 5.24 renamed the decoder's past_key_values argument to cache.
            params = inspect.signature(self.decoder.forward).parameters
            self.cache_kwarg = "cache" if "cache" in params else "past_key_values"
        if self.device.type == "cuda" and self.dtype != torch.float32:
            # Let the Q-Former, which BLIP-2 keeps in float32, use TF32 tensor cores
            # (a process-wide setting: each replica is its own actor process).
            torch.backends.cuda.matmul.fp32_precision = "tf32"

    @classmethod
    def load(cls, model_dir: Path, generation: GenerationSpec, fast: FastPath, device: Any, dtype: Any) -> Blip2Engine:
        """Load from ``model_dir``; raises :class:`ModelLoadError` (see :func:`load_hf_model`)."""
        net, processor = load_hf_model(model_dir, dtype, device, fast.attn_implementation)
        try:
            return cls(net, processor, generation, fast)
        except ModelLoadError as exc:
            raise ModelLoadError(f"{model_dir}: {exc}") from exc

    # ------------------------------------------------------------------ text

    def prompt_ids(self, prompt: str | None) -> tuple[int, ...]:
        """Token ids of ``prompt`` as ``Blip2Processor`` makes them (``None`` = unprompted caption)."""
        return self.text.ids(prompt)

    def decode(self, token_lists: list[list[int]]) -> list[str]:
        return self.text.decode(token_lists)

    def group_key(self, prompt_ids: tuple[int, ...]) -> int:
        """Jobs with equal keys may share a generation call: equal prompt lengths need no padding."""
        return len(prompt_ids)

    # ------------------------------------------------------------------ sizes

    def _usable_gpu_bytes(self) -> int:
        cuda = self._torch.cuda
        free, total = cuda.mem_get_info(self.device)
        reserved, allocated = cuda.memory_reserved(self.device), cuda.memory_allocated(self.device)
        return gpu_memory.usable_gpu_bytes(free, total, reserved, allocated, self.fast.gpu_share)

    def generation_chunk(self, prompt_len: int) -> int:
        on_gpu = self.device.type == "cuda"
        sized = on_gpu and not self.fast.generation_batch
        itemsize = self._torch.finfo(self.dtype).bits // 8
        g = self.generation
        per = gpu_memory.bytes_per_sequence(
            self.model.language_model.config,
            itemsize,
            self.num_query_tokens + prompt_len,
            g.max_new_tokens,
            g.num_beams,
        )
        return gpu_memory.generation_chunk(
            on_gpu=on_gpu,
            free_bytes=self._usable_gpu_bytes() if sized else 0,
            bytes_per_sequence=per,
            fixed=self.fast.generation_batch,
            compile=self.fast.compile,
        )

    def vision_chunk(self, n: int) -> int:
        if self.fast.vision_batch:
            return self.fast.vision_batch
        if self.device.type != "cuda":
            return max(n, 1)
        itemsize = self._torch.finfo(self.dtype).bits // 8
        per = gpu_memory.bytes_per_image(self.model.config.vision_config, itemsize)
        return int(min(gpu_memory.GPU_MAX_VISION_BATCH, max(1, self._usable_gpu_bytes() // max(1, per))))

    def after_oom(self) -> None:
        import gc

        gc.collect()
        if self.device.type == "cuda":
            self._torch.cuda.empty_cache()

    # ------------------------------------------------------------------ images

    def pixel_values(self, pixels: np.ndarray):
        """``uint8 (N, H, W, 3)`` -> normalised ``(N, 3, H, W)`` on the model's device and dtype."""
        torch = self._torch
        if self._staging is not None and self.fast.device_normalize:
            on_device = self._staging.upload(pixels)
            if self._table_device is None:
                self._table_device = torch.from_numpy(self._table).to(self.device).reshape(-1)
            offsets = torch.arange(3, device=self.device, dtype=torch.int32).view(1, 3, 1, 1) * 256
            index = on_device.permute(0, 3, 1, 2).to(torch.int32) + offsets
            return self._table_device[index.long()].contiguous().to(self.dtype)
        if self.fast.device_normalize:
            values = self._normalize(pixels)
        else:
            values = normalize_pixels(pixels, self.rescale_factor, self.image_mean, self.image_std)
        return torch.from_numpy(values).to(self.device, self.dtype)

    def encode(self, pixels: np.ndarray):
        """Projected Q-Former outputs ``(N, num_query_tokens, hidden)`` for ``uint8`` pixels, as in ``generate``."""
        torch, model = self._torch, self.model
        image_embeds = model.vision_model(self.pixel_values(pixels), return_dict=True).last_hidden_state
        mask = torch.ones(image_embeds.size()[:-1], dtype=torch.long, device=image_embeds.device)
        queries = model.query_tokens.expand(image_embeds.shape[0], -1, -1)
        out = model.qformer(
            query_embeds=queries, encoder_hidden_states=image_embeds, encoder_attention_mask=mask, return_dict=True
        ).last_hidden_state
        if out.dtype != image_embeds.dtype:  # the Q-Former is kept in fp32
            out = out.to(image_embeds.dtype)
        return model.language_projection(out)

    def prefix(self, features: list[Any], prompts_per_image: list[int]) -> ImagePrefix:
        """Stack per-image ``features`` (``None`` for images that failed: zeros) and, when it pays, their KV.

        The image positions' cache is only worth computing when some image has
        more than one prompt.  It is computed in vision-sized chunks; running out
        of memory (or any other error) here only means generating without it,
        and generation then isolates the image at fault.
        """
        torch = self._torch
        template = next(f for f in features if f is not None)
        zeros = torch.zeros_like(template)
        embeds = torch.stack([f if f is not None else zeros for f in features])
        if not self.use_prefix_cache or max(prompts_per_image, default=0) <= 1:
            return ImagePrefix(embeds)
        n = embeds.shape[0]
        chunk = self.vision_chunk(n)
        parts = []
        failure = None
        try:
            for start in range(0, n, chunk):
                parts.append(self._prefix_kv(embeds[start : start + chunk]))
        except Exception as exc:  # noqa: BLE001 - logged; generation without the cache reports the cause
            failure = f"{type(exc).__name__}: {exc}"
        if failure is not None:  # outside the except block, so the failed call's tensors can be freed
            parts.clear()
            self.after_oom()
            log.warning("could not cache the image positions of %d images (%s); generating without", n, failure)
            return ImagePrefix(embeds)
        layers = [
            (torch.cat([p[i][0] for p in parts]), torch.cat([p[i][1] for p in parts])) for i in range(len(parts[0]))
        ]
        return ImagePrefix(embeds, layers)

    def _prefix_kv(self, embeds) -> list[tuple[Any, Any]]:
        from transformers import DynamicCache

        cache = DynamicCache()
        self.decoder(inputs_embeds=embeds, **{self.cache_kwarg: cache}, use_cache=True, return_dict=True)
        return [(layer.keys, layer.values) for layer in cache.layers]

    # ------------------------------------------------------------------ generation

    def generate(self, prefix: ImagePrefix, images: list[int], prompts: list[tuple[int, ...]]) -> list[list[int]]:
        """New token ids for ``prefix`` row ``images[i]`` with ``prompts[i]`` (all of one length), cut after EOS."""
        torch = self._torch
        index = torch.tensor(images, device=prefix.embeds.device)
        embeds = prefix.embeds.index_select(0, index)
        if self.own_loop:
            new = self._own_loop(embeds, prefix.kv, index, prompts)
        else:
            new = self._plain_generate(embeds, prompts)
        return [self.trim(row) for row in new[: len(prompts)].tolist()]

    def _input_ids(self, prompts: list[tuple[int, ...]]):
        ids = [[self.image_token_id] * self.num_query_tokens + list(p) for p in prompts]
        return self._torch.tensor(ids, dtype=self._torch.long, device=self.device)

    def _own_loop(self, embeds, kv, index, prompts):
        from transformers import DynamicCache

        cache = DynamicCache()
        if kv is not None:  # start after the image positions
            for layer, (keys, values) in enumerate(kv):
                cache.update(keys.index_select(0, index), values.index_select(0, index), layer)
        keep = self.num_query_tokens if kv is not None else 0
        return self.greedy_from(cache, self._input_ids(prompts), keep, embeds)

    def greedy_from(self, cache, input_ids, keep: int, image_embeds):
        """Our greedy loop for ``input_ids`` (image tokens + prompt), ``cache`` already holding the first ``keep``.

        ``keep`` 0: the image positions are prefilled from ``image_embeds``, then the prompt.
        """
        embed = self.model.get_input_embeddings()
        if keep:
            first = embed(input_ids[:, keep:])
        else:
            token_embeds = embed(input_ids[:, self.num_query_tokens :])
            first = self._torch.cat([image_embeds.to(token_embeds.dtype), token_embeds], dim=1)
        lm_head = self.model.language_model.lm_head
        return greedy_tokens(
            self.decoder, lm_head, cache, self.cache_kwarg, first, input_ids, self.generation, self.eos_ids
        )

    def _plain_generate(self, embeds, prompts):
        """``language_model.generate`` on the full input embeddings (T5, beams, compile); no prefilled cache."""
        torch = self._torch
        n = len(prompts)
        if self.fast.compile and self.device.type == "cuda":
            # Few distinct batch shapes, so few recompilations: pad to a power of two with copies.
            padded = gpu_memory.padded_batch(n)
            if padded > n:
                embeds = torch.cat([embeds, embeds[:1].expand(padded - n, -1, -1)])
                prompts = list(prompts) + [prompts[0]] * (padded - n)
        input_ids = self._input_ids(prompts)
        inputs_embeds = self.model.get_input_embeddings()(input_ids)
        mask = (input_ids == self.image_token_id).unsqueeze(-1)
        inputs_embeds = inputs_embeds.masked_scatter(mask, embeds.to(inputs_embeds.dtype))
        inputs: dict[str, Any] = {"inputs_embeds": inputs_embeds, "attention_mask": torch.ones_like(input_ids)}
        if not self.is_encoder_decoder:
            inputs["input_ids"] = input_ids
        out = self.model.language_model.generate(**inputs, **self._generate_kwargs)
        if self.is_encoder_decoder:
            return out[:, 1:]  # drop the decoder start token
        if out.shape[1] >= input_ids.shape[1] and torch.equal(out[:, : input_ids.shape[1]], input_ids):
            return out[:, input_ids.shape[1] :]  # decoder-only generate echoes the prompt
        return out

    def trim(self, tokens: list[int]) -> list[int]:
        return self.text.trim(tokens)
