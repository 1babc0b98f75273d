"""How much work one model call takes: per-call sizes from free GPU memory, and out-of-memory facts.

Pure arithmetic over ``torch.cuda`` readings and model configs, so that the
engine asks one place and the tests check the rules without a GPU.
"""

from __future__ import annotations

from typing import Any

# Sequences per generation call on CPU.  Per-step overhead (Python, small
# matmuls) dominates there, so bigger is faster until the matmuls get big.
# Measured per sequence, one thread, 20 tokens, for 8/16/32/64/128 sequences
# per call: tiny model 1.91/1.06/0.62/0.38/0.26 ms, small model
# 44/32/25/23/21.5 ms.
CPU_GENERATION_BATCH = 128
# Upper bounds for the per-call sizes chosen from free GPU memory.  The
# generation bound is above the 256 the review found limiting: at opt-2.7b's
# ~3 MiB of KV cache per 62-token sequence an H100 holds thousands.
GPU_MAX_GENERATION_BATCH = 2048
GPU_MAX_VISION_BATCH = 512
# Share of the free GPU memory the size estimates may plan for (the rest is
# slack for the allocator and for estimation error).
GPU_MEMORY_FRACTION = 0.6

__all__ = [
    "CPU_GENERATION_BATCH",
    "GPU_MAX_GENERATION_BATCH",
    "GPU_MAX_VISION_BATCH",
    "bytes_per_image",
    "bytes_per_sequence",
    "even_chunks",
    "generation_chunk",
    "is_out_of_memory",
    "padded_batch",
    "usable_gpu_bytes",
]


def usable_gpu_bytes(free: int, total: int, reserved: int, allocated: int, share: float = 1.0) -> int:
    """GPU memory a replica may plan its next batch for, from ``torch.cuda`` readings.

    What the device has free, plus what PyTorch's caching allocator holds but
    does not use; for a replica with ``share`` < 1 of the GPU, no more than its
    share of the device minus what it already uses.  Then only
    :data:`GPU_MEMORY_FRACTION` of that: the per-sequence estimates are rough.
    """
    available = free + reserved - allocated
    if share < 1:
        available = min(available, int(total * share) - allocated)
    return max(0, int(available * GPU_MEMORY_FRACTION))


def generation_chunk(
    *, on_gpu: bool, free_bytes: int, bytes_per_sequence: int, fixed: int | None, compile: bool
) -> int:
    """Sequences per generation call.

    ``fixed`` (the generation_batch setting) wins; else on a GPU as many as
    ``free_bytes`` holds at ``bytes_per_sequence`` (at least 1, at most
    :data:`GPU_MAX_GENERATION_BATCH`), on CPU :data:`CPU_GENERATION_BATCH`.
    With ``compile`` on a GPU, rounded down to a power of two, so that
    :func:`padded_batch` of it stays within the memory-sized chunk.
    """
    if fixed:
        chunk = fixed
    elif on_gpu:
        chunk = int(min(GPU_MAX_GENERATION_BATCH, max(1, free_bytes // max(1, bytes_per_sequence))))
    else:
        chunk = CPU_GENERATION_BATCH
    if compile and on_gpu:
        chunk = 1 << (chunk.bit_length() - 1)
    return chunk


def even_chunks(n: int, chunk: int) -> list[int]:
    """Sizes of the fewest parts of at most ``chunk`` that cover ``n``, as equal as possible.

    768 items at a chunk of 640 become 384 + 384, not 640 + 128: the second
    call would otherwise run at a fifth of the batch the memory allows.
    """
    if n <= 0:
        return []
    parts = -(-n // max(1, chunk))
    base, extra = divmod(n, parts)
    return [base + 1] * extra + [base] * (parts - extra)


def padded_batch(n: int) -> int:
    """The batch a compiled step runs for ``n`` sequences: the next power of two (few shapes to compile)."""
    return 1 << max(0, (n - 1).bit_length())


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an accelerator (or host) out-of-memory error.

    ``torch.cuda.OutOfMemoryError``; a ``RuntimeError`` saying "out of memory"
    (older CUDA paths, cuBLAS/cuDNN allocation failures, other backends);
    PyTorch's CPU allocator failing ("can't allocate memory"); ``MemoryError``.
    """
    import torch

    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    if isinstance(exc, RuntimeError):
        message = str(exc).lower()
        return "out of memory" in message or "can't allocate memory" in message
    return False


def bytes_per_sequence(text_config: Any, itemsize: int, input_len: int, max_new_tokens: int, num_beams: int) -> int:
    """Rough GPU memory one generated sequence needs (KV cache, prefill activations, logits)."""
    tc = text_config
    if tc.is_encoder_decoder:
        layers = tc.num_decoder_layers or tc.num_layers
        kv_dim = tc.num_heads * tc.d_kv
        hidden, ffn = tc.d_model, tc.d_ff
        # decoder self-attention cache + cross-attention cache + encoder output
        kv = 2 * layers * kv_dim * (max_new_tokens + 1 + input_len) + hidden * input_len
    else:
        layers = tc.num_hidden_layers
        hidden = tc.hidden_size
        ffn = getattr(tc, "ffn_dim", 4 * hidden)
        kv = 2 * layers * hidden * (input_len + max_new_tokens)
    prefill = input_len * (ffn + 6 * hidden)  # one layer's transient activations
    logits = tc.vocab_size * 3 * 4 // itemsize  # float32 logits and processed scores
    return int((kv + prefill + logits) * itemsize * 1.5) * num_beams


def bytes_per_image(vision_config: Any, itemsize: int) -> int:
    """Rough GPU memory the vision encoder + Q-Former need per image (one layer's activations)."""
    vc = vision_config
    tokens = (vc.image_size // vc.patch_size) ** 2 + 1
    per_layer = tokens * (vc.intermediate_size + 6 * vc.hidden_size) * itemsize
    return int(per_layer * 2 + tokens * vc.hidden_size * 4 * 3)
