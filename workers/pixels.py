"""Pixels for the model: ``uint8`` images at the model's input size -> normalised tensors.

Everything here is bit-identical to the PIL-backend ``BlipImageProcessor``
(float64 rescale, float32 normalise), so the model sees exactly the values the
plain Hugging Face recipe gives it; the tests check every one of the 3 x 256
possible inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["PinnedStaging", "make_normalizer", "normalization_table", "normalize_pixels", "normalize_with_table"]


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


def make_normalizer(rescale_factor: float, mean: Any, std: Any) -> Callable[[np.ndarray], np.ndarray]:
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


class PinnedStaging:
    """Uploads ``uint8`` pixel chunks to the GPU through two reusable pinned host buffers.

    A non-blocking copy from pinned memory returns before the copy is done, so
    refilling the buffer it reads from too early would hand the GPU the next
    chunk's pixels.  Chunks therefore alternate between two buffers, and before
    a buffer is refilled the host waits for the event recorded after its last
    copy: chunk k+1 fills the other buffer while chunk k's copy may still run,
    and chunk k+2 waits until chunk k's copy has finished.  That holds with no
    synchronisation anywhere else (none inside the model is relied on).

    ``pin`` and ``new_event`` exist for the CPU test of this logic: without a
    GPU, buffers cannot be pinned and ``torch.cuda.Event`` is unavailable.
    """

    def __init__(self, device: Any, pin: bool = True, new_event: Callable[[], Any] | None = None) -> None:
        import torch

        self._torch = torch
        self.device = device
        self._pin = pin
        self._new_event = new_event or torch.cuda.Event
        self._buffers: list[Any] = [None, None]
        self._events: list[Any] = [None, None]
        self._next = 0

    def upload(self, pixels: np.ndarray):
        """``uint8 (N, H, W, 3)`` -> the same tensor on ``device`` (its copy possibly still in flight)."""
        torch = self._torch
        slot, self._next = self._next, 1 - self._next
        if self._events[slot] is not None:
            self._events[slot].synchronize()  # this buffer's previous copy has finished reading it
        buffer = self._buffers[slot]
        if buffer is None or buffer.shape[0] < pixels.shape[0] or buffer.shape[1:] != pixels.shape[1:]:
            buffer = torch.empty(pixels.shape, dtype=torch.uint8)
            buffer = buffer.pin_memory() if self._pin else buffer
            self._buffers[slot] = buffer
        host = buffer[: pixels.shape[0]]
        host.copy_(torch.from_numpy(np.ascontiguousarray(pixels)))
        on_device = host.to(self.device, non_blocking=True)
        event = self._new_event()
        event.record()
        self._events[slot] = event
        return on_device
