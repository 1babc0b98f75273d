"""The model stage: one BLIP-2 replica per Ray actor, captioning and answering questions.

Used as ``ds.map_batches(Blip2Replica, batch_format="pyarrow",
fn_constructor_kwargs={...}, compute=ActorPoolStrategy(...))``.  Each actor
loads the weights once; each call turns a decoded batch (``pixels`` at the
model's input size) into captions and answers.

Fidelity: for every image and prompt the replica produces the same tokens as
the plain Hugging Face recipe, ``Blip2Processor(images=image, text=prompt)``
then ``Blip2ForConditionalGeneration.generate`` one image at a time.  It gets
there faster by

* normalising the already-resized ``uint8`` pixels to exactly the float32
  values of the PIL-backend ``BlipImageProcessor`` (float64 rescale, float32
  normalise), so the model sees bit-identical inputs: on CPU with float32
  arithmetic that is checked equal on all 3 x 256 possible inputs (else a
  lookup table), on CUDA with the lookup table on the GPU;
* running the vision encoder, the Q-Former and the language projection once
  per image, then reusing that prefix for the caption and every question
  (``generate`` would recompute it for each prompt);
* building the language model's input exactly as ``generate`` does
  (``<image>`` x ``num_query_tokens`` then the prompt tokens, the image
  positions overwritten by the projected query outputs) and generating in
  groups of prompts of identical token length, so no padding is ever needed
  and every sequence sees exactly the input it would see alone;
* for decoder-only language models (OPT), running the image positions through
  the language model once per image and starting the caption and every
  question from that key/value cache (causal attention: the same computation);
* generating many sequences per ``generate`` call (:class:`FastPath`): a fixed
  number on CPU, and on CUDA as many as the free GPU memory holds;
* on CUDA, copying the ``uint8`` pixels through a pinned buffer with a
  non-blocking copy (normalised there, see above); SDPA attention; bf16/fp16
  weights (``ModelSpec.dtype``);
  optionally a static KV cache with ``torch.compile`` (:attr:`FastPath.compile`).

Out of memory: a CUDA out-of-memory error while encoding or generating splits
the work in halves and retries them (after ``torch.cuda.empty_cache()``), down
to a single image; only an image that does not fit alone becomes an error row
(``error_kind="out_of_memory"``).  The replica then remembers the size that
fitted, so later batches do not hit the same error first.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from workers import schema
from workers.config import GenerationSpec, ModelSpec, PromptSpec, StorageOptions
from workers.decode import pixels_from_table
from workers.model_store import ModelLoadError, model_revision, resolve_model_dir

log = logging.getLogger(__name__)

# Sequences per generate() call on CPU.  Per-step overhead (Python, small
# matmuls) dominates there, so bigger is faster until the matmuls get big.
# Measured per sequence, one thread, 20 tokens, for 8/16/32/64/128 sequences
# per call: tiny model 1.91/1.06/0.62/0.38/0.26 ms, small model
# 44/32/25/23/21.5 ms.  (A call never holds more sequences than the batch of
# images the pipeline hands over has images per prompt length.)
CPU_GENERATION_BATCH = 128
# Upper bounds for the per-call sizes chosen from free GPU memory.
GPU_MAX_GENERATION_BATCH = 2048
GPU_MAX_VISION_BATCH = 512
# Share of the free GPU memory the size estimates may plan for (the rest is
# slack for the allocator, CUDA graphs and estimation error).
GPU_MEMORY_FRACTION = 0.6

__all__ = [
    "Blip2Replica",
    "FastPath",
    "ModelLoadError",
    "resolve_dtype",
    "generation_chunk",
    "padded_batch",
    "normalize_pixels",
    "normalization_table",
    "normalize_with_table",
    "make_normalizer",
    "is_out_of_memory",
]


@dataclass(frozen=True)
class FastPath:
    """Knobs of the fast path; the defaults are what the pipeline runs.

    ``generation_batch``  sequences per ``generate`` call; ``None`` = automatic:
                          :data:`CPU_GENERATION_BATCH` on CPU, sized to free
                          memory on CUDA (and halved for good after an OOM).
    ``vision_batch``      images per vision-encoder call; ``None`` = automatic
                          (the whole batch on CPU, sized to free memory on CUDA).
    ``attn_implementation``  passed to ``from_pretrained``; ``"sdpa"`` (PyTorch's
                          fused attention) or ``"eager"``; ``None`` = transformers' choice.
    ``compile``           static KV cache, and on CUDA ``torch.compile`` of the
                          decoding step (transformers' auto-compile; batches are
                          padded to powers of two to bound recompilations).
                          Off by default: compiling costs minutes per shape.
    ``device_normalize``  on CUDA, normalise ``uint8`` pixels on the GPU (pinned
                          buffer + non-blocking copy, lookup table); on CPU in
                          float32 NumPy arithmetic proven equal on all 768
                          inputs (:func:`make_normalizer`).  Both are
                          bit-identical to :func:`normalize_pixels`; ``False``
                          runs :func:`normalize_pixels` itself on the CPU.
    ``gpu_share``         the fraction of its GPU this replica may plan batches
                          for: ``gpus_per_replica`` when replicas share a GPU,
                          so two half-GPU replicas do not each size batches to
                          the whole device's free memory.
    ``prefix_cache``      decoder-only language models (OPT): run the image
                          positions (``num_query_tokens`` of them) through the
                          language model once per image and start every prompt's
                          generation from that key/value cache, instead of
                          recomputing them for the caption and each question.
                          Causal attention makes this the same computation.
                          Greedy/sampling only (not with beams or ``compile``).
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
        if self.attn_implementation not in (None, "sdpa", "eager", "flash_attention_2", "flex_attention"):
            raise ValueError(f"attn_implementation: unsupported {self.attn_implementation!r}")


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
    *, on_gpu: bool, free_bytes: int, bytes_per_sequence: int, fixed: int | None, cap: int | None, compile: bool
) -> int:
    """Sequences per ``generate`` call.

    ``fixed`` (the generation_batch setting) wins; else on a GPU as many as
    ``free_bytes`` holds at ``bytes_per_sequence`` (at least 1, at most
    :data:`GPU_MAX_GENERATION_BATCH`), on CPU :data:`CPU_GENERATION_BATCH`.
    Never above ``cap`` (the size known to fit after an out-of-memory error).
    With ``compile`` on a GPU, rounded down to a power of two, so that
    :func:`padded_batch` of it stays within the memory-sized chunk.
    """
    if fixed:
        chunk = fixed
    elif on_gpu:
        chunk = int(min(GPU_MAX_GENERATION_BATCH, max(1, free_bytes // max(1, bytes_per_sequence))))
    else:
        chunk = CPU_GENERATION_BATCH
    chunk = min(chunk, cap) if cap else chunk
    if compile and on_gpu:
        chunk = 1 << (chunk.bit_length() - 1)
    return chunk


def padded_batch(n: int) -> int:
    """The batch a compiled ``generate`` runs for ``n`` sequences: the next power of two (few shapes to compile)."""
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


def ray_gpu_ids() -> list:
    """GPU ids Ray assigned to this process; empty outside a Ray worker or without ray installed."""
    try:
        import ray
    except ImportError:
        return []
    return list(ray.get_gpu_ids()) if ray.is_initialized() else []


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


def normalization_table(rescale_factor: float, mean: Any, std: Any) -> np.ndarray:
    """``float32 (3, 256)``: what :func:`normalize_pixels` maps each uint8 value to, per channel.

    Computed with :func:`normalize_pixels` itself, so a lookup in this table is
    bit-identical to the arithmetic (elementwise IEEE operations do not depend
    on the neighbours), on any device.
    """
    values = np.broadcast_to(np.arange(256, dtype=np.uint8)[None, :, None, None], (1, 256, 1, 3))
    return np.ascontiguousarray(normalize_pixels(values, rescale_factor, mean, std)[0, :, :, 0])


def make_normalizer(rescale_factor: float, mean: Any, std: Any):
    """The fastest CPU function ``uint8 (N, H, W, 3) -> float32 (N, 3, H, W)`` that equals :func:`normalize_pixels`.

    Plain float32 arithmetic (divide by ``1 / rescale_factor``, subtract the
    mean, divide by the std) when it gives the processor's value for every one
    of the 3 x 256 possible inputs (it does for ``1/255`` and the CLIP mean and
    std: a correctly rounded float32 division equals the float64 product
    rounded to float32 there); otherwise the lookup table.  Elementwise
    operations do not depend on the neighbours, so checking the 768 inputs
    checks every image.
    """
    table = normalization_table(rescale_factor, mean, std)
    divisor = np.float32(1.0 / rescale_factor) if rescale_factor else None
    mean32 = np.asarray(mean, dtype=np.float32).reshape(1, 3, 1, 1)
    std32 = np.asarray(std, dtype=np.float32).reshape(1, 3, 1, 1)

    def arithmetic(pixels: np.ndarray) -> np.ndarray:
        out = np.ascontiguousarray(pixels.transpose(0, 3, 1, 2), dtype=np.float32)
        np.divide(out, divisor, out=out)
        out -= mean32
        out /= std32
        return out

    if divisor is not None and np.isfinite(divisor):
        every = np.broadcast_to(np.arange(256, dtype=np.uint8)[None, None, :, None], (1, 1, 256, 3))
        if np.array_equal(arithmetic(every)[0, :, 0, :], table):
            return arithmetic
    return lambda pixels: normalize_with_table(pixels, table)


def normalize_with_table(pixels: np.ndarray, table: np.ndarray) -> np.ndarray:
    """``uint8 (N, H, W, 3)`` -> ``float32 (N, 3, H, W)`` by table lookup; equals :func:`normalize_pixels`."""
    n, h, w, _ = pixels.shape
    out = np.empty((n, 3, h, w), dtype=np.float32)
    for c in range(3):
        out[:, c] = table[c][pixels[..., c]]
    return out


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
        fast: FastPath | None = None,
        device: str | None = None,
    ) -> None:
        """``device``: ``"cuda"``, ``"cpu"`` or ``None`` (CUDA when available, else CPU)."""
        import torch

        self.spec = model
        self.prompts = prompts
        self.generation = generation
        self.fast = fast or FastPath()
        storage = storage or StorageOptions()
        try:
            self.model_dir = resolve_model_dir(model, storage, cache_root)
        except ModelLoadError:
            raise
        except Exception as exc:
            raise ModelLoadError(f"cannot get model {model.model!r}: {type(exc).__name__}: {exc}") from exc
        self.revision = model_revision(self.model_dir, model)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        gpu_ids = ray_gpu_ids()
        if gpu_ids and self.device.type != "cuda":
            # Most often a CPU-only torch wheel on a GPU node: the job still runs,
            # but at CPU speed, so say it where `ray job logs` shows it.
            log.warning(
                "Ray assigned this replica %.2f of GPU %s, but torch %s sees no CUDA device; running on CPU. "
                "Install a CUDA build of torch on the GPU nodes.",
                self.fast.gpu_share, ",".join(map(str, gpu_ids)), torch.__version__,
            )  # fmt: skip
        self.dtype = resolve_dtype(model.dtype, self.device)
        self._load()

    @classmethod
    def from_objects(
        cls,
        net: Any,
        processor: Any,
        prompts: PromptSpec,
        generation: GenerationSpec,
        model_id: str = "in-memory",
        fast: FastPath | None = None,
    ) -> Blip2Replica:
        """A replica around an already built ``Blip2ForConditionalGeneration`` and ``Blip2Processor``.

        For benchmarks of full-size configurations with random weights, which
        are never saved: ``net`` is used on its current device and dtype.
        """
        self = cls.__new__(cls)
        self.spec = ModelSpec(model=model_id)
        self.prompts = prompts
        self.generation = generation
        self.fast = fast or FastPath()
        self.model_dir = Path(model_id)
        self.revision = None
        param = next(net.parameters())
        self.device = param.device
        self.dtype = net.vision_model.embeddings.patch_embedding.weight.dtype
        self._setup(net, processor, str(model_id))
        return self

    # ------------------------------------------------------------------ loading

    def _load(self) -> None:
        from transformers import Blip2ForConditionalGeneration, Blip2Processor

        where = f"{self.spec.model!r} ({self.model_dir})"
        attn = {"attn_implementation": self.fast.attn_implementation} if self.fast.attn_implementation else {}
        try:
            # Local files only: resolve_model_dir fetched everything needed, and
            # only safetensors are ever read (never pickle, never remote code).
            net = Blip2ForConditionalGeneration.from_pretrained(
                self.model_dir, dtype=self.dtype, use_safetensors=True, local_files_only=True, **attn
            )
            processor = Blip2Processor.from_pretrained(self.model_dir, local_files_only=True)
        except Exception as exc:
            raise ModelLoadError(f"cannot load BLIP-2 from {where}: {type(exc).__name__}: {exc}") from exc
        self._setup(net.to(self.device), processor, where)

    def _setup(self, net: Any, processor: Any, where: str) -> None:
        import torch

        config = net.config
        if config.image_token_index is None:
            raise ModelLoadError(
                f"{where}: config.image_token_index is not set; this checkpoint predates the <image>-token "
                "layout of transformers >= 4.47; use a current revision of the checkpoint"
            )
        self.model = net.eval()
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
        eos = self.model.language_model.generation_config.eos_token_id
        self._eos_ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
        self._torch = torch
        self._table = normalization_table(self.rescale_factor, self.image_mean, self.image_std)
        self._normalize = make_normalizer(self.rescale_factor, self.image_mean, self.image_std)
        self._table_device = None  # the table on the GPU, made on first use
        self._pinned = None  # reusable pinned host buffer for uint8 pixels (CUDA)
        # Largest per-call sizes known to fit after an out-of-memory error (None: no limit seen yet).
        self._generation_cap: int | None = None
        self._vision_cap: int | None = None
        if self.device.type == "cuda" and self.dtype != torch.float32:
            # Half-precision weights were asked for; let the Q-Former, which BLIP-2
            # keeps in float32, use TF32 tensor cores too.  (A process-wide setting:
            # each replica is its own Ray actor process.)
            torch.backends.cuda.matmul.fp32_precision = "tf32"
        self._generate_kwargs = self.generation.generate_kwargs()
        self._use_prefix_cache = (
            self.fast.prefix_cache
            and not self.is_encoder_decoder
            and not self.fast.compile
            and self.generation.num_beams == 1
        )
        self._prefix_kv: list[tuple[Any, Any]] | None = None  # per layer (keys, values) for the current batch
        if self.fast.compile:
            self._generate_kwargs["cache_implementation"] = "static"
            if self.device.type != "cuda":
                log.warning(
                    "compile on a CPU replica: static KV cache only (torch.compile is used on CUDA only), "
                    "and without the image-prefix cache; this is slower than the default on CPU"
                )

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

    # ------------------------------------------------------------------ sizes

    def _free_gpu_bytes(self) -> int:
        torch = self._torch
        free, total = torch.cuda.mem_get_info(self.device)
        return usable_gpu_bytes(
            free,
            total,
            torch.cuda.memory_reserved(self.device),
            torch.cuda.memory_allocated(self.device),
            self.fast.gpu_share,
        )

    def _bytes_per_sequence(self, input_len: int) -> int:
        """Rough GPU memory one generated sequence needs (KV cache, prefill activations, logits)."""
        tc = self.model.language_model.config
        itemsize = self._torch.finfo(self.dtype).bits // 8
        total_len = input_len + self.generation.max_new_tokens
        if self.is_encoder_decoder:
            layers = tc.num_decoder_layers or tc.num_layers
            kv_dim = tc.num_heads * tc.d_kv
            hidden, ffn = tc.d_model, tc.d_ff
            # decoder self-attention cache + cross-attention cache + encoder output
            kv = 2 * layers * kv_dim * (self.generation.max_new_tokens + 1 + input_len) + hidden * input_len
        else:
            layers = tc.num_hidden_layers
            hidden = tc.hidden_size
            kv_dim = hidden
            ffn = getattr(tc, "ffn_dim", 4 * hidden)
            kv = 2 * layers * kv_dim * total_len
        prefill = input_len * (ffn + 6 * hidden)  # one layer's transient activations
        logits = tc.vocab_size * 3 * 4 // itemsize  # float32 logits and processed scores
        return int((kv + prefill + logits) * itemsize * 1.5) * self.generation.num_beams

    def _bytes_per_image(self) -> int:
        """Rough GPU memory the vision encoder + Q-Former need per image (one layer's activations)."""
        vc = self.model.config.vision_config
        itemsize = self._torch.finfo(self.dtype).bits // 8
        tokens = (vc.image_size // vc.patch_size) ** 2 + 1
        per_layer = tokens * (vc.intermediate_size + 6 * vc.hidden_size) * itemsize
        return int(per_layer * 2 + tokens * vc.hidden_size * 4 * 3)

    def _generation_chunk(self, input_len: int) -> int:
        on_gpu = self.device.type == "cuda"
        sized = on_gpu and not self.fast.generation_batch
        return generation_chunk(
            on_gpu=on_gpu,
            free_bytes=self._free_gpu_bytes() if sized else 0,
            bytes_per_sequence=self._bytes_per_sequence(input_len) if sized else 1,
            fixed=self.fast.generation_batch,
            cap=self._generation_cap,
            compile=self.fast.compile,
        )

    def _vision_chunk(self, n: int) -> int:
        if self.fast.vision_batch:
            chunk = self.fast.vision_batch
        elif self.device.type == "cuda":
            fit = self._free_gpu_bytes() // max(1, self._bytes_per_image())
            chunk = int(min(GPU_MAX_VISION_BATCH, max(1, fit)))
        else:
            chunk = max(n, 1)
        return min(chunk, self._vision_cap) if self._vision_cap else chunk

    def _after_oom(self) -> None:
        import gc

        gc.collect()
        if self.device.type == "cuda":
            self._torch.cuda.empty_cache()

    # ------------------------------------------------------------------ model pieces

    def _pixel_values(self, pixels: np.ndarray):
        """``uint8 (N, H, W, 3)`` -> normalised ``(N, 3, H, W)`` on the model's device and dtype."""
        torch = self._torch
        if self.device.type == "cuda" and self.fast.device_normalize:
            n = pixels.shape[0]
            if self._pinned is None or self._pinned.shape[0] < n or self._pinned.shape[1:] != pixels.shape[1:]:
                self._pinned = torch.empty(pixels.shape, dtype=torch.uint8).pin_memory()
            host = self._pinned[:n]
            host.copy_(torch.from_numpy(pixels))
            # The next call only refills the buffer after this batch's results were
            # read back (a synchronisation), so the asynchronous copy is done by then.
            on_device = host.to(self.device, non_blocking=True)
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

    def _language_prefix_kv(self, prefix) -> list[tuple[Any, Any]]:
        """Per layer ``(keys, values)`` of the image positions, as the language model's prefill makes them."""
        lm = self.model.language_model
        base = getattr(lm, lm.base_model_prefix)  # the decoder without the LM head (no logits needed)
        mask = self._torch.ones(prefix.shape[:2], dtype=self._torch.long, device=prefix.device)
        cache = base(inputs_embeds=prefix, attention_mask=mask, use_cache=True, return_dict=True).past_key_values
        return [(layer.keys, layer.values) for layer in cache.layers]

    def _select_kv(self, index):
        """A fresh ``DynamicCache`` holding the prefix keys/values of the images at ``index``."""
        from transformers import DynamicCache

        cache = DynamicCache()
        for layer, (keys, values) in enumerate(self._prefix_kv or ()):
            cache.update(keys.index_select(0, index), values.index_select(0, index), layer)
        return cache

    def _generate(self, prefix, prompts: list[tuple[int, ...]], kv=None) -> list[list[int]]:
        """Generate for ``prefix[i]`` with ``prompts[i]`` (all the same length); return new token ids.

        ``kv``: a cache already holding the image positions' keys/values for these rows
        (:meth:`_select_kv`); generation then only prefills the prompt tokens.
        """
        torch = self._torch
        model = self.model
        n = len(prompts)
        if self.fast.compile and self.device.type == "cuda":
            # Few distinct batch shapes, so few recompilations: pad to a power of two with copies.
            padded = padded_batch(n)
            if padded > n:
                prefix = torch.cat([prefix, prefix[:1].expand(padded - n, -1, -1)])
                prompts = list(prompts) + [prompts[0]] * (padded - n)
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
        if kv is not None:
            inputs["past_key_values"] = kv
        out = model.language_model.generate(**inputs, **self._generate_kwargs)
        if self.is_encoder_decoder:
            new = out[:, 1:]  # drop the decoder start token
        elif out.shape[1] >= input_ids.shape[1] and torch.equal(out[:, : input_ids.shape[1]], input_ids):
            new = out[:, input_ids.shape[1] :]  # decoder-only generate echoes the prompt
        else:
            new = out
        return [self._trim(row) for row in new[:n].tolist()]

    def _trim(self, tokens: list[int]) -> list[int]:
        """Drop everything after the first EOS (batched generate pads finished rows)."""
        for i, token in enumerate(tokens):
            if token in self._eos_ids:
                return tokens[: i + 1]
        return tokens

    # ------------------------------------------------------------------ batch

    def _prefixes(self, pixels: np.ndarray, failed: dict[int, tuple[str, str]]):
        """Image prefixes for the sub-batch, ``(N, q, hidden)``; failed images get zeros and a ``failed`` entry."""
        n = pixels.shape[0]
        parts: list[Any] = [None] * n
        self._encode(pixels, list(range(n)), parts, failed)
        template = next((p for p in parts if p is not None), None)
        if template is None:
            return None
        zeros = self._torch.zeros_like(template)
        return self._torch.stack([p if p is not None else zeros for p in parts])

    def _encode(self, pixels: np.ndarray, images: list[int], parts: list[Any], failed) -> None:
        """Encode ``images`` (consecutive indices) in chunks; OOM halves a chunk, other errors isolate images."""
        chunk = self._vision_chunk(len(images))
        for start in range(0, len(images), chunk):
            part = images[start : start + chunk]
            oom = None
            try:
                prefix = self._image_prefix(self._pixel_values(pixels[part[0] : part[-1] + 1]))
            except Exception as exc:
                if not is_out_of_memory(exc):
                    message = f"{type(exc).__name__}: {exc}"
                    if len(part) == 1:
                        failed[part[0]] = (schema.GENERATION_FAILED, message)
                    else:
                        log.warning("image encoder failed for %d images, retrying one by one: %s", len(part), message)
                        for image in part:
                            self._encode(pixels, [image], parts, failed)
                    continue
                oom = f"{type(exc).__name__}: {exc}"
            if oom is not None:  # outside the except block, so the failed call's tensors can be freed
                prefix = None
                self._after_oom()
                if len(part) == 1:
                    failed[part[0]] = (schema.OUT_OF_MEMORY, f"out of memory encoding the image alone: {oom}")
                    continue
                half = len(part) // 2
                self._vision_cap = half
                log.warning("out of memory encoding %d images; retrying in halves of %d", len(part), half)
                self._encode(pixels, part[:half], parts, failed)
                self._encode(pixels, part[half:], parts, failed)
                continue
            for k, image in enumerate(part):
                parts[image] = prefix[k]

    def _prefix_cache_for(self, prefix, jobs: list[_Job]) -> list[tuple[Any, Any]] | None:
        """The image positions' keys/values for every image of the batch, when worth it and possible.

        Only when some image has more than one prompt (otherwise nothing is reused).
        Computed in chunks like the vision encoder; out of memory here just means
        generating without it (the halving retries then happen in generation).
        """
        if not self._use_prefix_cache or len(jobs) <= prefix.shape[0]:
            return None
        n = prefix.shape[0]
        chunk = self._vision_chunk(n)
        parts: list[list[tuple[Any, Any]]] = []
        oom = False
        try:
            for start in range(0, n, chunk):
                parts.append(self._language_prefix_kv(prefix[start : start + chunk]))
        except Exception as exc:
            if not is_out_of_memory(exc):  # generation without the cache will isolate the image at fault
                log.warning("could not cache the image positions (%s: %s); generating without", type(exc).__name__, exc)
                return None
            oom = True
        if oom:
            parts.clear()
            self._after_oom()
            log.warning("out of memory caching the image positions of %d images; generating without the cache", n)
            return None
        if len(parts) == 1:
            return parts[0]
        cat = self._torch.cat
        return [(cat([p[i][0] for p in parts]), cat([p[i][1] for p in parts])) for i in range(len(parts[0]))]

    def _run_jobs(self, prefix, jobs: list[_Job], failed: dict[int, tuple[str, str]]) -> None:
        """Generate every job, grouped by prompt length; images whose generation fails land in ``failed``."""
        by_length: dict[int, list[_Job]] = defaultdict(list)
        for job in jobs:
            by_length[len(job.prompt_ids)].append(job)
        for length in sorted(by_length):
            group = [j for j in by_length[length] if j.image not in failed]
            start = 0
            while start < len(group):
                chunk = self._generation_chunk(self.num_query_tokens + length)
                part = [j for j in group[start : start + chunk] if j.image not in failed]
                start += chunk
                if part:
                    self._run_part(prefix, part, failed)

    def _run_part(self, prefix, part: list[_Job], failed: dict[int, tuple[str, str]]) -> None:
        torch = self._torch
        oom = None
        try:
            index = torch.tensor([j.image for j in part], device=prefix.device)
            kv = self._select_kv(index) if self._prefix_kv is not None else None
            results = self._generate(prefix.index_select(0, index), [j.prompt_ids for j in part], kv)
            del kv
        except Exception as exc:
            if not is_out_of_memory(exc):
                message = f"{type(exc).__name__}: {exc}"
                if len(part) == 1:
                    failed[part[0].image] = (schema.GENERATION_FAILED, message)
                    return
                # Isolate the failing image(s): retry one at a time.
                log.warning("generation failed for a group of %d, retrying one by one: %s", len(part), message)
                for job in part:
                    if job.image not in failed:
                        self._run_part(prefix, [job], failed)
                return
            oom = f"{type(exc).__name__}: {exc}"
        if oom is not None:  # outside the except block, so the failed call's tensors can be freed
            self._after_oom()
            if len(part) == 1:
                failed[part[0].image] = (schema.OUT_OF_MEMORY, f"out of memory generating for the image alone: {oom}")
                return
            half = len(part) // 2
            self._generation_cap = half
            log.warning("out of memory generating %d sequences; retrying in halves of %d", len(part), half)
            for piece in (part[:half], part[half:]):
                piece = [j for j in piece if j.image not in failed]
                if piece:
                    self._run_part(prefix, piece, failed)
            return
        for job, tokens in zip(part, results, strict=True):
            job.result = tokens

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

        failed: dict[int, tuple[str, str]] = {}
        prefix = self._prefixes(pixels, failed) if jobs else None
        if prefix is not None:
            self._prefix_kv = self._prefix_cache_for(prefix, jobs)
            try:
                self._run_jobs(prefix, jobs, failed)
            finally:
                self._prefix_kv = None

        texts = self.tokenizer.batch_decode([j.result for j in jobs], skip_special_tokens=True) if jobs else []
        results = {(j.image, j.slot): text.strip() for j, text in zip(jobs, texts, strict=True)}
        for image, row in enumerate(ok_rows):
            if image in failed:
                status[row] = schema.STATUS_ERROR
                error_kind[row], error[row] = failed[image]
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
