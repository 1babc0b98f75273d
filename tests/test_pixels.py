"""Pixels for the model: bit-identical normalisation, and the pinned upload that cannot race."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from model_inputs import resize_like_processor
from PIL import Image

from workers.config import GenerationSpec
from workers.engine import Blip2Engine
from workers.fast_path import FastPath
from workers.model_loading import load_hf_model
from workers.pixels import (
    PinnedStaging,
    make_normalizer,
    normalization_table,
    normalize_pixels,
    normalize_with_table,
)

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def _engine(path, fast: FastPath | None = None, device: str = "cpu") -> Blip2Engine:
    fast = fast or FastPath()
    net, processor = load_hf_model(path, torch.float32, torch.device(device), fast.attn_implementation)
    return Blip2Engine(net, processor, GenerationSpec(max_new_tokens=4), fast)


def _every_value() -> np.ndarray:
    return np.broadcast_to(np.arange(256, dtype=np.uint8)[None, :, None, None], (2, 256, 5, 3)).copy()


def test_pixels_normalised_like_the_processor(tiny_models, images, references):
    ref = references["opt"]
    engine = _engine(tiny_models["opt"])
    for rgb in images.values():
        expected = ref.processor.image_processor(Image.fromarray(rgb), return_tensors="np")["pixel_values"]
        resized = resize_like_processor(rgb, ref.height, ref.width)[None]
        got = normalize_pixels(resized, engine.rescale_factor, engine.image_mean, engine.image_std)
        assert got.dtype == np.float32 and got.shape == expected.shape
        assert np.array_equal(got, expected)


def test_normalization_table_is_bit_identical(images):
    table = normalization_table(1 / 255, CLIP_MEAN, CLIP_STD)
    assert table.dtype == np.float32 and table.shape == (3, 256)
    every = _every_value()
    assert np.array_equal(normalize_with_table(every, table), normalize_pixels(every, 1 / 255, CLIP_MEAN, CLIP_STD))
    for rgb in images.values():
        pixels = resize_like_processor(rgb, 24, 40)[None]
        assert np.array_equal(
            normalize_with_table(pixels, table), normalize_pixels(pixels, 1 / 255, CLIP_MEAN, CLIP_STD)
        )


@pytest.mark.parametrize(
    "rescale, mean, std",
    [
        (1 / 255, CLIP_MEAN, CLIP_STD),  # BLIP-2
        (1 / 255, [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),
        (0.00392156862745098, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),  # ImageNet
        (1 / 127.5, [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]),
        (0.003, [0.1, 0.2, 0.3], [0.7, 0.11, 0.13]),  # arbitrary: may need the table
        (1.0, [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]),
    ],
)
def test_cpu_normalizer_is_bit_identical(images, rescale, mean, std):
    normalize = make_normalizer(rescale, mean, std)
    every = _every_value()
    assert np.array_equal(normalize(every), normalize_pixels(every, rescale, mean, std))
    batch = np.stack([resize_like_processor(rgb, 24, 40) for rgb in images.values()])
    got = normalize(batch)
    assert got.dtype == np.float32 and got.flags.c_contiguous
    assert np.array_equal(got, normalize_pixels(batch, rescale, mean, std))


def test_engine_pixel_values_match_the_processor(tiny_models, images, references):
    ref = references["opt"]
    expected = np.concatenate(
        [
            ref.processor.image_processor(Image.fromarray(rgb), return_tensors="np")["pixel_values"]
            for rgb in images.values()
        ]
    )
    for fast in (FastPath(), FastPath(device_normalize=False)):
        engine = _engine(tiny_models["opt"], fast)
        arrays = [resize_like_processor(rgb, ref.height, ref.width) for rgb in images.values()]
        assert np.array_equal(engine.pixel_values(np.stack(arrays)).cpu().numpy(), expected)


class _Event:
    """Stands in for ``torch.cuda.Event`` on CPU: records when it was recorded and waited on."""

    def __init__(self, log: list, name: int) -> None:
        self.log, self.name = log, name

    def record(self) -> None:
        self.log.append(("record", self.name))

    def synchronize(self) -> None:
        self.log.append(("wait", self.name))


def test_pinned_staging_never_refills_a_buffer_whose_copy_may_still_run():
    """Chunk k+1 goes to the other buffer; chunk k+2 waits for chunk k's copy first.

    On CPU the "device" tensor is the staging buffer itself, so a single
    reused buffer shows up here as an earlier chunk's values being overwritten.
    """
    log: list = []
    counter = iter(range(100))
    staging = PinnedStaging(torch.device("cpu"), pin=False, new_event=lambda: _Event(log, next(counter)))
    chunks = [np.full((3, 4, 4, 3), k, dtype=np.uint8) for k in range(5)]
    outs = []
    for k, chunk in enumerate(chunks):
        outs.append(staging.upload(chunk))
        # The previous chunk is still intact after this one was staged.
        if k:
            assert torch.equal(outs[k - 1], torch.from_numpy(chunks[k - 1])), k
        assert torch.equal(outs[k], torch.from_numpy(chunks[k]))
    # Upload k >= 2 waited for the event recorded by upload k-2 before refilling its buffer.
    waits = [name for what, name in log if what == "wait"]
    assert waits == [0, 1, 2]
    for k in range(2, 5):
        assert log.index(("wait", k - 2)) < log.index(("record", k))
    # A smaller chunk reuses the buffer (a view), a differently shaped one gets a new buffer.
    assert staging.upload(np.ones((2, 4, 4, 3), np.uint8)).shape == (2, 4, 4, 3)
    assert staging.upload(np.ones((1, 8, 8, 3), np.uint8)).shape == (1, 8, 8, 3)


@pytest.mark.gpu
@requires_cuda
def test_pinned_staging_uploads_every_chunk_intact_on_cuda():
    """Many large chunks back to back, no synchronisation between them: each arrives with its own pixels."""
    staging = PinnedStaging(torch.device("cuda"))
    rng = np.random.default_rng(0)
    chunks = [rng.integers(0, 256, (64, 224, 224, 3), dtype=np.uint8) for _ in range(6)]
    outs = [staging.upload(chunk) for chunk in chunks]
    torch.cuda.synchronize()
    for chunk, out in zip(chunks, outs, strict=True):
        assert np.array_equal(out.cpu().numpy(), chunk)


@pytest.mark.gpu
@requires_cuda
def test_gpu_normalisation_is_bit_identical(tiny_models, images):
    engine = _engine(tiny_models["opt"], device="cuda")  # float32: compares the values themselves
    arrays = np.stack([resize_like_processor(rgb, engine.height, engine.width) for rgb in images.values()])
    expected = normalize_pixels(arrays, engine.rescale_factor, engine.image_mean, engine.image_std)
    for _ in range(3):  # later calls reuse the pinned buffers
        got = engine.pixel_values(arrays)
        assert got.device.type == "cuda"
        assert np.array_equal(got.cpu().numpy(), expected)
