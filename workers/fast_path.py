"""The engine's speed settings: one frozen object, validated when built."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["FastPath"]


@dataclass(frozen=True)
class FastPath:
    """Knobs of the fast path; the defaults are what the pipeline runs.

    ``generation_batch``  sequences per generation call; ``None`` = automatic:
                          ``CPU_GENERATION_BATCH`` on CPU, sized to free memory on CUDA.
    ``vision_batch``      images per vision-encoder call; ``None`` = automatic
                          (the whole batch on CPU, sized to free memory on CUDA).
    ``attn_implementation``  passed to ``from_pretrained``: ``"sdpa"`` (PyTorch's
                          fused attention), ``"eager"`` or ``None`` (transformers'
                          choice).  BLIP-2 rejects ``flash_attention_2``.
    ``compile``           static KV cache and, on CUDA, ``torch.compile`` of the
                          decoding step through plain ``generate`` (batches padded
                          to powers of two).  Off by default: minutes per shape.
    ``device_normalize``  normalise on the GPU by table lookup (CUDA), or in float32
                          NumPy arithmetic proven equal (CPU); ``False`` runs
                          :func:`workers.pixels.normalize_pixels` itself.
    ``gpu_share``         the fraction of its GPU this replica may plan batches
                          for (``gpus_per_replica`` when replicas share a GPU).
    ``prefix_cache``      decoder-only models: the image positions' keys/values
                          computed once per image and shared by its prompts, and
                          each conversation turn continuing the previous turn's cache.
    """

    generation_batch: int | None = None
    vision_batch: int | None = None
    attn_implementation: str | None = "sdpa"
    compile: bool = False
    device_normalize: bool = True
    prefix_cache: bool = True
    gpu_share: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.gpu_share <= 1:
            raise ValueError(f"gpu_share: must be in (0, 1], got {self.gpu_share}")
        for name in ("generation_batch", "vision_batch"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}: must be >= 1 or None, got {value}")
        if self.attn_implementation not in (None, "sdpa", "eager"):
            raise ValueError(
                f"attn_implementation: {self.attn_implementation!r} is not one BLIP-2 supports; "
                "use 'sdpa', 'eager' or None"
            )
