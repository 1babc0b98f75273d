"""Stage 2: undecoded image bytes -> model-ready uint8 pixels, on Ray CPU tasks.

:func:`decode_image` turns one file into an ``(H, W, 3)`` uint8 array at the
model's input size.  Its pixels are bit-identical to what transformers'
``BlipImageProcessor`` (PIL backend) hands to its rescale/normalize step for the
same (EXIF-oriented) image: the RGB conversion below is a copy of
``transformers.image_transforms.convert_to_rgb`` (transparency composited onto
white) and the resize is the same single ``PIL.Image.resize`` call that
``transformers.image_transforms.resize`` makes (``reducing_gap=None``).  The
one intentional difference is high-bit-depth input (16/32-bit integer and float
grayscale), which the processor would clip to white; here it is scaled to 8 bits.

``DecodeSpec.mode="fast"`` (the job's default) trades that bit-identity for
speed; ``"exact"`` keeps it.  JPEGs are decoded with Pillow's ``draft`` (libjpeg's DCT
scaling by 1/2, 1/4 or 1/8) to the smallest size that is still at least the
target size, and the bicubic resize then reads exactly the area of the full
image (a fractional ``box``: the scaled decode rounds the edge pixels up), so
the picture is not shifted.  Other formats resize with ``reducing_gap=3``
(an integer box reduction first, then bicubic).  The tests hold it within
35 dB PSNR of the exact output; its speed-up is measured in ``BENCHMARKS.md``.

:func:`decode_batch` applies that to a reader batch (``pyarrow.Table``) for
``Dataset.map_batches(batch_format="pyarrow")``.  A bad image never raises and
is never dropped: its row becomes an error row (``status="error"``, a
snake_case ``error_kind`` and a human-readable ``error``).

Error kinds emitted (``DecodeError.kind``):

``empty_file``          zero bytes
``missing_image``       the image cell is null on a row the reader marked ok
``not_an_image``        Pillow cannot identify it as one of :data:`ALLOWED_FORMATS`
``decompression_bomb``  width*height above ``DecodeSpec.max_image_pixels`` (or Pillow's hard limit)
``truncated_image``     the file ends before the pixel data does (Pillow's "image file is
                        truncated", or the container visibly cut short)
``decode_failed``       anything else Pillow's decoders reject, e.g. a corrupt compressed
                        stream ("broken data stream" in a complete file); message kept
"""

from __future__ import annotations

import functools
import struct
import warnings
from io import BytesIO

import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps, UnidentifiedImageError

from workers import schema
from workers.config import DecodeSpec

FAST_REDUCING_GAP = 3.0

# Every DecodeError.kind this module emits.
ERROR_KINDS = (
    schema.EMPTY_FILE,
    schema.MISSING_IMAGE,
    schema.NOT_AN_IMAGE,
    schema.DECOMPRESSION_BOMB,
    schema.TRUNCATED_IMAGE,
    schema.DECODE_FAILED,
)

# Formats Image.open may try.  Restricting the list keeps rarely-fuzzed parsers
# (and EPS, whose loader runs Ghostscript) away from untrusted bytes.  JPEG also
# opens MPO (multi-picture JPEG from phones).  Formats this Pillow build has no
# plugin for (e.g. AVIF on an old build) are dropped, see _open_formats.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")

# Modes whose samples do not fit in 8 bits; scaled to "L" before RGB conversion.
_HIGH_BIT_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")

# What Image.open itself lets escape for malformed headers (it swallows plugin
# SyntaxError/IndexError/TypeError/struct.error while identifying).
_OPEN_ERRORS = (OSError, ValueError, SyntaxError, struct.error, EOFError)

# What Pillow raises from its decoders for malformed files.  UnidentifiedImageError
# is an OSError; DecompressionBombError is handled separately, before these.
_DECODER_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    struct.error,
    EOFError,
    ZeroDivisionError,
    IndexError,
    KeyError,
)


class DecodeError(Exception):
    """An image could not be decoded; ``kind`` is a snake_case tag for ``error_kind``."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):  # picklable across Ray workers despite the two-argument __init__
        return (type(self), (self.kind, self.message))


def _file_is_cut_short(data: bytes) -> bool:
    """Whether the container says more bytes should follow (JPEG without EOI,
    PNG without IEND, GIF without its trailer, WebP shorter than its RIFF size).
    Only consulted after a decoder has failed, to tell truncation from corruption."""
    if data.startswith(b"\xff\xd8"):
        return not data.rstrip(b"\x00").endswith(b"\xff\xd9")
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return b"IEND" not in data[-32:]
    if data.startswith((b"GIF87a", b"GIF89a")):
        return not data.rstrip(b"\x00").endswith(b"\x3b")
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return int.from_bytes(data[4:8], "little") + 8 > len(data)
    return False


def _decoder_failure(exc: BaseException, data: bytes) -> DecodeError:
    """``truncated_image`` when Pillow says so or the file is visibly cut short,
    else ``decode_failed``; the message names the exception."""
    message = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, EOFError) or "truncated" in message.lower():
        return DecodeError(schema.TRUNCATED_IMAGE, message)
    if _file_is_cut_short(data):
        return DecodeError(schema.TRUNCATED_IMAGE, f"{message} (the file ends early, after {len(data)} bytes)")
    return DecodeError(schema.DECODE_FAILED, message)


def _high_bit_depth_to_l(im: Image.Image) -> Image.Image:
    """Scale 16-bit / 32-bit integer or float grayscale to 8-bit ``L``.

    * ``I;16*``: 0..65535 -> 0..255 (``round(v / 257)``).
    * ``I`` (32-bit signed): negatives clip to 0; if every value fits in 16 bits
      (16-bit PNG/TIFF opened as ``I``) it is scaled as 16-bit, otherwise
      0..2**31-1 -> 0..255.
    * ``F``: NaN -> 0; data within [0, 1] is scaled by 255, within [0, 255] kept,
      within [0, 65535] scaled as 16-bit, anything larger clipped.

    Pillow's own ``convert("L")`` clips instead of scaling, which turns a 16-bit
    image white.
    """
    arr = np.asarray(im)
    if im.mode.startswith("I;16"):
        scaled = (arr.astype(np.uint32) * 255 + 32767) // 65535
    elif im.mode == "I":
        values = np.clip(arr.astype(np.int64), 0, None)
        peak = int(values.max()) if values.size else 0
        if peak <= 65535:
            scaled = (values * 255 + 32767) // 65535
        else:
            scaled = np.rint(values.astype(np.float64) * (255.0 / (2**31 - 1)))
    else:  # "F"
        values = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        values = np.clip(values, 0.0, None)
        peak = float(values.max()) if values.size else 0.0
        if peak <= 1.0:
            values = values * 255.0
        elif peak > 255.0:
            values = values / 257.0
        scaled = np.rint(np.clip(values, 0.0, 255.0))
    return Image.fromarray(np.ascontiguousarray(scaled.astype(np.uint8)), mode="L")


def _convert_to_rgb(im: Image.Image) -> Image.Image:
    """``transformers.image_transforms.convert_to_rgb`` for PIL input, verbatim in effect.

    Transparency (an alpha band or a ``transparency`` entry: palette/tRNS) is
    composited onto white; everything else goes through ``convert("RGB")``
    (CMYK, YCbCr, L, 1, P, premultiplied RGBa ...).
    """
    if im.mode in _HIGH_BIT_DEPTH_MODES:
        im = _high_bit_depth_to_l(im)
    has_alpha = "A" in im.getbands() or im.info.get("transparency") is not None
    if im.mode == "RGB" and not has_alpha:
        return im  # convert("RGB") would only copy it
    if has_alpha:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


@functools.cache
def _open_formats() -> tuple[str, ...]:
    """ALLOWED_FORMATS that this Pillow build can open (registering every plugin
    first: Image.open(formats=...) fails with KeyError on an unregistered one)."""
    Image.init()
    return tuple(name for name in ALLOWED_FORMATS if name in Image.OPEN)


def _open_checked(data: bytes, spec: DecodeSpec) -> Image.Image:
    """Identify the image (headers only) and refuse it if it has too many pixels."""
    try:
        # Our explicit limit below supersedes Pillow's warning; its hard error
        # (at 2x its global limit) is caught and reported as a bomb too.  The
        # global MAX_IMAGE_PIXELS is left untouched.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(BytesIO(data), formats=_open_formats())
    except Image.DecompressionBombError as exc:
        raise DecodeError(schema.DECOMPRESSION_BOMB, str(exc)) from exc
    except UnidentifiedImageError as exc:
        if _file_is_cut_short(data):  # a known format's header, cut off before Pillow could identify it
            raise DecodeError(schema.TRUNCATED_IMAGE, f"file ends after {len(data)} bytes, inside the header") from exc
        raise DecodeError(
            schema.NOT_AN_IMAGE, f"not a recognised image ({len(data)} bytes; accepted: {', '.join(_open_formats())})"
        ) from exc
    except _OPEN_ERRORS as exc:
        raise _decoder_failure(exc, data) from exc
    width, height = im.size
    if width * height > spec.max_image_pixels:
        im.close()
        raise DecodeError(
            schema.DECOMPRESSION_BOMB,
            f"image is {width}x{height} = {width * height} pixels, above the limit of {spec.max_image_pixels}",
        )
    return im


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation tag (1..8) that ``ImageOps.exif_transpose`` will apply; 1 if none or unreadable."""
    try:
        value = int(im.getexif().get(0x0112, 1))
    except Exception:  # a broken EXIF block: exif_transpose will not turn the image either
        return 1
    return value if 1 <= value <= 8 else 1


def _oriented_box(size: tuple[int, int], box: tuple[float, float, float, float], orientation: int):
    """Where ``box`` (the valid area of an upright-stored image, anchored top-left)
    lies after ``exif_transpose`` turned the image (of pre-turn ``size``) by ``orientation``."""
    w, h = size
    ex, ey = w - box[2], h - box[3]  # unused fraction on the right and at the bottom, before turning
    if orientation in (5, 6, 7, 8):
        w, h = h, w  # turned by 90 degrees
    return {
        1: (0.0, 0.0, w - ex, h - ey),
        2: (ex, 0.0, w, h - ey),  # mirrored left-right
        3: (ex, ey, w, h),  # turned 180
        4: (0.0, ey, w - ex, h),  # mirrored top-bottom
        5: (0.0, 0.0, w - ey, h - ex),  # transposed
        6: (ey, 0.0, w, h - ex),  # turned 90 clockwise
        7: (ey, ex, w, h),  # transversed
        8: (0.0, ex, w - ey, h),  # turned 90 counter-clockwise
    }[orientation]


def decode_image(data: bytes, spec: DecodeSpec) -> tuple[np.ndarray, int, int]:
    """Decode one image file into model-ready pixels.

    Returns ``(pixels, width, height)``: ``pixels`` is uint8 ``(spec.height,
    spec.width, 3)``; ``width``/``height`` are the original size as a viewer
    shows it (after EXIF orientation).  Animated images use their first frame.
    Raises :class:`DecodeError` (and nothing else) for a bad file.

    ``spec.mode``: ``"exact"`` (bit-identical to ``BlipImageProcessor``) or
    ``"fast"`` (JPEG DCT-scaled decoding, see the module docstring).
    """
    if not data:
        raise DecodeError(schema.EMPTY_FILE, "the file is empty (0 bytes)")
    im = _open_checked(data, spec)
    with im:
        box = None
        reducing_gap = None
        try:
            im.seek(0)  # animations (GIF/WebP/APNG/MPO): the first frame; a no-op otherwise
            if spec.mode == "fast":
                reducing_gap = FAST_REDUCING_GAP
                # JPEG only: its EXIF sits in the header (other formats' getexif() may decode pixels).
                if im.format in ("JPEG", "MPO"):
                    full_size = im.size
                    orientation = _orientation(im)
                    upright = orientation in (5, 6, 7, 8)
                    wanted = (spec.height, spec.width) if upright else (spec.width, spec.height)
                    drafted = im.draft(None, wanted)
                    if drafted is not None and im.size != full_size:
                        box = _oriented_box(im.size, drafted[1], orientation)
            im.load()
            ImageOps.exif_transpose(im, in_place=True)  # no copy when there is nothing to turn
            rgb = _convert_to_rgb(im)
        except Image.DecompressionBombError as exc:
            raise DecodeError(schema.DECOMPRESSION_BOMB, str(exc)) from exc
        except _DECODER_ERRORS as exc:
            raise _decoder_failure(exc, data) from exc
        width, height = rgb.size
        if box is not None:  # report the full image's size, not the DCT-scaled one
            width, height = (full_size[1], full_size[0]) if upright else full_size
        # Exact mode: exactly transformers.image_transforms.resize, one PIL resize to (width,
        # height), no box, reducing_gap=None.  Outside the try: a bad spec.resample is a config
        # error, not a bad image.
        resized = rgb.resize((spec.width, spec.height), resample=spec.resample, box=box, reducing_gap=reducing_gap)
    pixels = np.array(resized, dtype=np.uint8)  # owned and writable
    return pixels, width, height


def _tensor_array(pixels: np.ndarray) -> pa.ExtensionArray:
    """A Ray Data fixed-shape tensor column (format per the current DataContext)."""
    from ray.data.extensions import ArrowTensorArray

    return ArrowTensorArray.from_numpy(pixels)


def decode_batch(batch: pa.Table, spec: DecodeSpec) -> pa.Table:
    """Decode a reader batch of images.  Same rows, same order; ``image`` is replaced by
    ``pixels`` (tensor column), ``width`` and ``height`` (int32, null on error rows),
    and the video frame columns (null: see :func:`decoded_table`).

    Rows whose status is not ``ok`` pass through untouched (pixels all zero).
    Rows that fail to decode become error rows with :class:`DecodeError`'s kind.
    Every other column (passthrough strings, ``row_questions`` ...) is kept.
    ``spec.mode`` chooses exact or fast decoding (:func:`decode_image`).
    """
    n = batch.num_rows
    names = batch.column_names
    for required in (schema.IMAGE, schema.STATUS, schema.ERROR_KIND, schema.ERROR):
        if required not in names:
            raise KeyError(f"decode_batch: input batch has no {required!r} column (columns: {names})")

    images = batch.column(schema.IMAGE).to_pylist()
    statuses = batch.column(schema.STATUS).to_pylist()
    kinds = batch.column(schema.ERROR_KIND).to_pylist()
    errors = batch.column(schema.ERROR).to_pylist()
    pixels = np.zeros((n, spec.height, spec.width, 3), dtype=np.uint8)
    widths: list[int | None] = [None] * n
    heights: list[int | None] = [None] * n

    for i in range(n):
        if statuses[i] != schema.STATUS_OK:
            continue
        data = images[i]
        images[i] = None  # release the bytes as we go
        try:
            if data is None:
                raise DecodeError(schema.MISSING_IMAGE, "the row has no image bytes")
            pixels[i], widths[i], heights[i] = decode_image(data, spec)
        except DecodeError as exc:
            statuses[i] = schema.STATUS_ERROR
            kinds[i] = exc.kind
            errors[i] = exc.message
    del images

    replaced = {
        schema.STATUS: pa.array(statuses, type=batch.schema.field(schema.STATUS).type),
        schema.ERROR_KIND: pa.array(kinds, type=batch.schema.field(schema.ERROR_KIND).type),
        schema.ERROR: pa.array(errors, type=batch.schema.field(schema.ERROR).type),
    }
    return decoded_table(batch, replaced, pixels, widths, heights)


def decoded_table(
    batch: pa.Table,
    replaced: dict[str, pa.Array],
    pixels: np.ndarray,
    widths: list[int | None],
    heights: list[int | None],
    frames: dict[str, list] | None = None,
) -> pa.Table:
    """The decode stage's output schema, for images and video frames alike: ``batch``'s
    columns without ``image`` (those in ``replaced`` swapped in), then ``pixels``,
    ``width``, ``height`` and the frame columns (null unless ``frames`` gives them)."""
    n = batch.num_rows
    fields: list[pa.Field] = []
    arrays: list[pa.Array | pa.ChunkedArray] = []
    for field in batch.schema:
        if field.name == schema.IMAGE:
            continue
        fields.append(field)
        arrays.append(replaced.get(field.name, batch.column(field.name)))

    tensor = _tensor_array(pixels)
    fields += [
        pa.field(schema.PIXELS, tensor.type),
        pa.field(schema.WIDTH, pa.int32()),
        pa.field(schema.HEIGHT, pa.int32()),
        *schema.FRAME_FIELDS,
    ]
    arrays += [tensor, pa.array(widths, type=pa.int32()), pa.array(heights, type=pa.int32())]
    for f in schema.FRAME_FIELDS:
        values = (frames or {}).get(f.name)
        arrays.append(pa.array(values, type=f.type) if values is not None else pa.nulls(n, f.type))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields, metadata=batch.schema.metadata))


def resize_rgb(rgb: Image.Image, spec: DecodeSpec) -> np.ndarray:
    """An upright RGB picture (a video frame) at the model's input size, resized as
    :func:`decode_image` resizes: in exact mode the one PIL call BlipImageProcessor makes."""
    reducing_gap = FAST_REDUCING_GAP if spec.mode == "fast" else None
    resized = rgb.resize((spec.width, spec.height), resample=spec.resample, reducing_gap=reducing_gap)
    return np.array(resized, dtype=np.uint8)


def _chunk_to_numpy(chunk: pa.Array) -> np.ndarray:
    if isinstance(chunk, pa.FixedShapeTensorArray):  # pyarrow's native tensor type
        return chunk.to_numpy_ndarray()
    arr = chunk.to_numpy(zero_copy_only=False)
    if arr.dtype == object:  # variable-shaped tensors: an object array of ndarrays
        arr = np.stack(list(arr)) if len(arr) else arr
    return arr


def pixels_from_table(table: pa.Table) -> np.ndarray:
    """The ``pixels`` column of a :func:`decode_batch` output as a ``(N, H, W, 3)`` uint8 array.

    Accepts Ray's tensor types (v1/v2, fixed or variable shape) and pyarrow's
    native ``fixed_shape_tensor``, in any number of chunks.
    """
    column = table.column(schema.PIXELS)
    parts = [_chunk_to_numpy(chunk) for chunk in column.chunks if len(chunk)]
    if not parts:
        shape = tuple(getattr(column.type, "shape", ()) or ())
        if len(shape) != 3:
            raise ValueError(f"pixels column of type {column.type} has no fixed (H, W, 3) shape")
        return np.zeros((0, *shape), dtype=np.uint8)
    out = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
    if out.ndim != 4 or out.shape[-1] != 3:
        raise ValueError(f"pixels column holds arrays of shape {out.shape[1:]}, expected (H, W, 3)")
    return np.ascontiguousarray(out, dtype=np.uint8)
