"""Loading BLIP-2 weights that the model store (:mod:`workers.model_store`) already fetched.

Fetching happens once per node; loading happens once per replica, from local
files only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from workers.model_store import ModelLoadError

__all__ = ["PromptTokens", "input_size", "load_hf_model", "resolve_dtype"]


def resolve_dtype(name: str, device: Any, bf16_supported: bool | None = None):
    """The torch dtype for ``ModelSpec.dtype`` on ``device``.

    ``auto``: bfloat16 on GPUs that support it, float16 on older GPUs, float32 on CPU.
    ``bf16_supported`` defaults to asking ``torch.cuda`` (tests pass the device fact).
    """
    import torch

    if name == "auto":
        if getattr(device, "type", str(device)) == "cuda":
            if bf16_supported is None:
                bf16_supported = torch.cuda.is_bf16_supported()
            return torch.bfloat16 if bf16_supported else torch.float16
        return torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def load_hf_model(model_dir: Path, dtype: Any, device: Any, attn: str | None) -> tuple[Any, Any]:
    """``(Blip2ForConditionalGeneration on device, Blip2Processor)`` from local safetensors.

    Raises :class:`ModelLoadError` naming the directory for anything that stops
    loading (missing or corrupt files, a config transformers cannot read).
    """
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    kwargs = {"attn_implementation": attn} if attn else {}
    try:
        # Local files only: the model store fetched everything, and only
        # safetensors are ever read (never pickle, never remote code).
        net = Blip2ForConditionalGeneration.from_pretrained(
            model_dir, dtype=dtype, use_safetensors=True, local_files_only=True, **kwargs
        )
        processor = Blip2Processor.from_pretrained(model_dir, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure is reported as a load error, cause kept
        raise ModelLoadError(f"cannot load BLIP-2 from {model_dir}: {type(exc).__name__}: {exc}") from exc
    return net.to(device), processor


def input_size(image_processor: Any) -> tuple[int, int]:
    """``(height, width)`` a loaded BLIP image processor resizes to (``shortest_edge``: a square)."""
    size = image_processor.size
    height = int(size["height"]) if "height" in size else int(size["shortest_edge"])
    width = int(size["width"]) if "width" in size else int(size["shortest_edge"])
    return height, width


class PromptTokens:
    """The text side both engines share: prompt ids as ``Blip2Processor`` makes them, texts, EOS trimming."""

    def __init__(self, tokenizer: Any, bos_token_id: int | None, eos_token_id: int | list[int] | None) -> None:
        self.tokenizer = tokenizer
        eos = eos_token_id
        self.eos_ids: set[int] = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
        # What generate() starts an unprompted caption with after the image tokens.
        self._unprompted = (int(bos_token_id),) if bos_token_id is not None else tuple(tokenizer("").input_ids)
        self._cache: dict[str | None, tuple[int, ...]] = {}

    def ids(self, prompt: str | None) -> tuple[int, ...]:
        """Token ids of ``prompt`` (``None`` = unprompted caption); the first 4,096 prompts are remembered."""
        ids = self._cache.get(prompt)
        if ids is None:
            ids = self._unprompted if prompt is None else tuple(int(i) for i in self.tokenizer(prompt).input_ids)
            if len(self._cache) < 4096:
                self._cache[prompt] = ids
        return ids

    def decode(self, token_lists: list[list[int]]) -> list[str]:
        if not token_lists:  # transformers 5's batch_decode([]) gives [""]: one text for no tokens
            return []
        return [t.strip() for t in self.tokenizer.batch_decode(token_lists, skip_special_tokens=True)]

    def trim(self, tokens: list[int]) -> list[int]:
        """Drop everything after the first EOS (batched rows run on after theirs)."""
        for i, token in enumerate(tokens):
            if token in self.eos_ids:
                return tokens[: i + 1]
        return tokens
