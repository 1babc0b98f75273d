"""Loading BLIP-2 weights that the model store (:mod:`workers.model_store`) already fetched.

Fetching happens once per node; loading happens once per replica, from local
files only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from workers.model_store import ModelLoadError

__all__ = ["load_hf_model", "resolve_dtype"]


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
