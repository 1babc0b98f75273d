"""Model-stage inputs for tests and benchmarks: images unlike photos, and decode-stage batches.

Shared by ``tests/`` and ``bench/`` (which puts ``tests/`` on its path), so a
benchmark feeds the model stage exactly what the tests check.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from PIL import Image

from workers import schema

SAMPLE_PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "cat",
    "immunohistochemistry",
    "retina",
    "hubble_deep_field",
)


def synthetic_images() -> dict[str, np.ndarray]:
    """Inputs unlike the photos: odd sizes and aspect ratios, grey, RGBA, noise."""
    rng = np.random.RandomState(7)
    yy, xx = np.mgrid[0:97, 0:61]
    gradient = np.stack([xx * 4, yy * 2, (xx + yy) % 256], axis=-1).astype(np.uint8)
    grey = np.asarray(Image.fromarray((rng.rand(50, 200) * 255).astype(np.uint8), mode="L").convert("RGB"))
    rgba = np.asarray(Image.fromarray((rng.rand(33, 33, 4) * 255).astype(np.uint8), mode="RGBA").convert("RGB"))
    return {"gradient": gradient, "grey": grey, "rgba": rgba, "noise": (rng.rand(300, 17, 3) * 255).astype(np.uint8)}


def resize_like_processor(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """What the decode stage hands the model: the processor's PIL bicubic resize, as uint8."""
    return np.asarray(Image.fromarray(rgb).convert("RGB").resize((width, height), resample=Image.BICUBIC))


def model_input_table(
    arrays: list[np.ndarray],
    height: int,
    width: int,
    status: list[str] | None = None,
    row_questions: list[list[str] | None] | None = None,
) -> pa.Table:
    """A decode-stage batch: reader columns without ``image``, plus ``pixels``/``width``/``height``."""
    from ray.data.extensions import ArrowTensorArray

    n = len(arrays)
    status = status or [schema.STATUS_OK] * n
    pixels = np.stack(
        [
            resize_like_processor(a, height, width) if s == schema.STATUS_OK else np.zeros((height, width, 3), np.uint8)
            for a, s in zip(arrays, status, strict=True)
        ]
    )
    return pa.table(
        {
            schema.ID: [f"shard-0.tar::{i:04d}" for i in range(n)],
            schema.SOURCE: ["s3://bucket/shard-0.tar"] * n,
            schema.SHARD: ["shard-0.tar"] * n,
            schema.KEY: [f"{i:04d}" for i in range(n)],
            schema.STATUS: status,
            schema.ERROR_KIND: [None if s == schema.STATUS_OK else "decode_failed" for s in status],
            schema.ERROR: [None if s == schema.STATUS_OK else "cannot identify image file" for s in status],
            schema.ROW_QUESTIONS: pa.array(row_questions or [None] * n, pa.list_(pa.string())),
            schema.PIXELS: ArrowTensorArray.from_numpy(pixels),
            schema.WIDTH: pa.array([a.shape[1] for a in arrays], pa.int32()),
            schema.HEIGHT: pa.array([a.shape[0] for a in arrays], pa.int32()),
        }
    )


def sample_photos() -> list[np.ndarray]:
    """Real colour photographs shipped with scikit-image (no download)."""
    from skimage import data

    out = []
    for name in SAMPLE_PHOTOS:
        try:
            image = getattr(data, name)()
        except (AttributeError, OSError, ValueError):  # a build of scikit-image without that file
            continue
        if image.ndim == 3 and image.shape[2] >= 3:
            out.append(np.ascontiguousarray(image[..., :3]))
    return out


def distinct_images(count: int, height: int, width: int, start: int = 0) -> list[np.ndarray]:
    """``count`` different photos at the model's input size (uint8), as the decode stage hands them over.

    Image ``k`` (from ``start``) is sample photo ``k % 8`` turned by 17 degrees
    per pass through the photos: no two alike for 2,880 images, so caches keyed
    by image content (vLLM's multimodal cache) never hit between calls that
    take different ranges.
    """
    from PIL import Image

    sources = sample_photos()
    out = []
    for k in range(start, start + count):
        image = Image.fromarray(sources[k % len(sources)])
        turns = k // len(sources)
        if turns:
            image = image.rotate(17 * turns, expand=False)
        out.append(np.asarray(image.resize((width, height), Image.Resampling.BICUBIC)))
    return out
