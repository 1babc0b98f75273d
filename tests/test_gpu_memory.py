"""Per-call sizes from free GPU memory, even chunks, and what counts as out of memory (no GPU needed)."""

from __future__ import annotations

import torch

from workers.gpu_memory import (
    CPU_GENERATION_BATCH,
    GPU_MAX_GENERATION_BATCH,
    even_chunks,
    generation_chunk,
    is_out_of_memory,
    padded_batch,
    usable_gpu_bytes,
)


def _chunk(**facts) -> int:
    return generation_chunk(**{"on_gpu": True, "free_bytes": 0, "bytes_per_sequence": 1, "fixed": None,
                               "compile": False, **facts})  # fmt: skip


def test_is_out_of_memory():
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert is_out_of_memory(
        RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
    )
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("probability tensor contains inf or nan"))
    assert not is_out_of_memory(ValueError("out of memory"))  # only the error types allocators raise


def test_generation_chunk_is_sized_from_free_gpu_memory():
    mib = 1024**2
    assert _chunk(free_bytes=300 * mib, bytes_per_sequence=2 * mib) == 150
    assert _chunk(free_bytes=80 * 1024 * mib, bytes_per_sequence=2 * mib) == GPU_MAX_GENERATION_BATCH
    assert GPU_MAX_GENERATION_BATCH > 256  # the review found 256 limiting on H100s
    assert _chunk(free_bytes=mib, bytes_per_sequence=2 * mib) == 1  # never zero: a lone sequence may still fit
    assert _chunk(free_bytes=300 * mib, bytes_per_sequence=2 * mib, fixed=64) == 64  # the setting wins
    assert _chunk(on_gpu=False, free_bytes=300 * mib) == CPU_GENERATION_BATCH


def test_compiled_batches_are_padded_within_the_memory_sized_chunk():
    assert [padded_batch(n) for n in (1, 2, 3, 5, 8, 9, 150)] == [1, 2, 4, 8, 8, 16, 256]
    for free in range(1, 3000, 7):
        chunk = _chunk(free_bytes=free, bytes_per_sequence=1, compile=True)
        assert padded_batch(chunk) == chunk <= free  # a full chunk is not padded past what fits
        assert all(padded_batch(n) <= chunk for n in range(1, chunk + 1))
    assert _chunk(free_bytes=150, compile=True, on_gpu=False) == CPU_GENERATION_BATCH  # no compile on CPU


def test_even_chunks_split_evenly_within_the_limit():
    assert even_chunks(768, 640) == [384, 384]  # not 640 + 128
    assert even_chunks(10, 3) == [3, 3, 2, 2]
    assert even_chunks(5, 8) == [5]
    assert even_chunks(0, 8) == []
    for n in range(1, 200, 7):
        for chunk in (1, 2, 5, 64):
            sizes = even_chunks(n, chunk)
            assert sum(sizes) == n and max(sizes) <= chunk
            assert max(sizes) - min(sizes) <= 1 and len(sizes) == -(-n // chunk)


def test_usable_gpu_memory_respects_a_shared_gpu():
    gib = 1 << 30
    # A whole GPU: the device's free memory plus the allocator's unused cache, 60% of it.
    whole = usable_gpu_bytes(free=70 * gib, total=80 * gib, reserved=6 * gib, allocated=5 * gib)
    assert whole == int(71 * gib * 0.6)
    # Half of the same GPU, its other half still empty: only this replica's half, minus what it uses.
    half = usable_gpu_bytes(free=70 * gib, total=80 * gib, reserved=6 * gib, allocated=5 * gib, share=0.5)
    assert half == int(35 * gib * 0.6)
    # The neighbour took more than its half: the device's free memory is the tighter bound.
    assert usable_gpu_bytes(free=10 * gib, total=80 * gib, reserved=5 * gib, allocated=5 * gib, share=0.5) == int(
        10 * gib * 0.6
    )
    # Already over its share: nothing to plan for (the OOM splitting takes over), never negative.
    assert usable_gpu_bytes(free=30 * gib, total=80 * gib, reserved=45 * gib, allocated=45 * gib, share=0.5) == 0
