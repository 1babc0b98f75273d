"""Bytes of realistic and broken image files, made in memory for tests.

Everything is generated from real photographs (the ``photos`` fixture) or from
hand-written file structures, with Pillow, numpy and zlib only.  The main entry
point is :func:`broken_image_cases`, used by the decode tests and by end-to-end
tests that put these files into shards.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

# Solid frame colours of the animated cases, in frame order (frame 0 must win).
ANIMATION_COLOURS = ((255, 0, 0), (0, 255, 0), (0, 0, 255))

EXIF_ORIENTATION = 0x0112

# Case name -> (file extension, bytes, expected error_kind or None for "decodes fine").
Case = tuple[str, bytes, str | None]


def _save(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def jpeg_bytes(arr: np.ndarray, quality: int = 90, **kwargs) -> bytes:
    """A baseline JPEG of an RGB (H, W, 3) or grayscale (H, W) uint8 array."""
    return _save(Image.fromarray(np.asarray(arr, dtype=np.uint8)), "JPEG", quality=quality, **kwargs)


def png_bytes(arr: np.ndarray) -> bytes:
    """A lossless PNG of an array (uint8 RGB/RGBA/gray, or uint16 gray -> 16-bit PNG)."""
    return _save(Image.fromarray(np.asarray(arr)), "PNG")


def noise_png(seed: int, size: int = 8) -> bytes:
    """A tiny PNG of random RGB noise: distinct bytes per ``seed``."""
    return png_bytes(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8))


def small_jpegs(photos: dict[str, np.ndarray], n: int) -> list[bytes]:
    """``n`` distinct small JPEGs of real photos (a few KB each): different crops of each photo in turn."""
    names = sorted(photos)
    return [jpeg_bytes(photos[names[i % len(names)]][: 60 + 4 * i, : 80 + 3 * i]) for i in range(n)]


def webp_bytes(arr: np.ndarray, quality: int = 90) -> bytes:
    return _save(Image.fromarray(np.asarray(arr, dtype=np.uint8)), "WEBP", quality=quality)


def cmyk_jpeg_bytes(arr: np.ndarray, quality: int = 95) -> bytes:
    """A CMYK JPEG (Pillow writes the Adobe APP14 marker, inverted CMYK)."""
    return _save(Image.fromarray(np.asarray(arr, dtype=np.uint8)).convert("CMYK"), "JPEG", quality=quality)


def gray16_gradient(height: int = 96, width: int = 256) -> np.ndarray:
    """uint16 horizontal ramp 0 -> 65535 (every row identical)."""
    row = np.linspace(0, 65535, width).round().astype(np.uint16)
    return np.repeat(row[None, :], height, axis=0)


def gray16_png_bytes(height: int = 96, width: int = 256) -> bytes:
    """A 16-bit grayscale PNG (Pillow mode ``I;16``) holding :func:`gray16_gradient`."""
    data = _save(Image.fromarray(gray16_gradient(height, width)), "PNG")
    assert data[24] == 16, "expected a 16-bit PNG"  # IHDR bit depth
    return data


def palette_png_with_transparency(size: tuple[int, int] = (64, 48)) -> bytes:
    """A palette (``P``) PNG: left half fully transparent (index 0), right half opaque red."""
    width, height = size
    indices = np.zeros((height, width), dtype=np.uint8)
    indices[:, width // 2 :] = 1
    image = Image.fromarray(indices, mode="L").convert("P")
    palette = [0, 0, 0, 255, 0, 0] + [0, 0, 0] * 254
    image.putpalette(palette)
    return _save(image, "PNG", transparency=0)


def rgba_png_bytes(arr: np.ndarray) -> bytes:
    """An RGBA PNG of a photo whose alpha ramps from 0 (left) to 255 (right)."""
    rgb = np.asarray(arr, dtype=np.uint8)
    alpha = np.linspace(0, 255, rgb.shape[1]).round().astype(np.uint8)
    alpha = np.repeat(alpha[None, :], rgb.shape[0], axis=0)
    return png_bytes(np.dstack([rgb, alpha]))


def animated_bytes(fmt: str, size: tuple[int, int] = (40, 30), colours=ANIMATION_COLOURS) -> bytes:
    """An animation (``GIF``, ``WEBP`` or ``PNG`` = APNG) of solid frames, one per colour."""
    frames = [Image.new("RGB", size, colour) for colour in colours]
    kwargs = {"lossless": True} if fmt == "WEBP" else {}
    data = _save(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **kwargs)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == len(colours)
    return data


def exif_rotated_jpeg(arr: np.ndarray, orientation: int = 6, quality: int = 95) -> bytes:
    """A JPEG of ``arr`` stored as-is, tagged with EXIF ``Orientation``.

    With orientation 6 a viewer rotates it 90 degrees clockwise, so it shows
    ``arr.shape[0]`` pixels wide and ``arr.shape[1]`` pixels high.
    """
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    return jpeg_bytes(arr, quality=quality, exif=exif.tobytes())


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)


def bomb_png(width: int = 50_000, height: int = 50_000, rows: int = 64) -> bytes:
    """A few-hundred-byte PNG whose header claims ``width`` x ``height`` 1-bit pixels.

    Written by hand, never allocating the image: IHDR declares the huge size,
    IDAT holds the zlib stream of only the first ``rows`` all-zero scanlines
    (deflate cannot beat ~1000:1, so a complete stream would not be tiny), then
    IEND.  A decoder that trusted the header would allocate ``width*height``
    bytes (2.5 GB at the default size) before finding the data short.
    """
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit grayscale, no interlace
    scanline = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(scanline) for _ in range(rows)) + compressor.flush(zlib.Z_SYNC_FLUSH)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def corrupt_png(arr: np.ndarray) -> bytes:
    """A complete PNG (valid chunk CRCs, IEND present) whose IDAT zlib stream is garbage."""
    rgb = np.asarray(arr, dtype=np.uint8)[:64, :64]
    height, width = rgb.shape[:2]
    raw = b"".join(b"\x00" + rgb[r].tobytes() for r in range(height))
    stream = bytearray(zlib.compress(raw))
    for k in range(10, min(60, len(stream) - 4)):
        stream[k] ^= 0xFF
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", bytes(stream)) + _png_chunk(b"IEND", b"")
    )


def broken_image_cases(photo: np.ndarray) -> dict[str, Case]:
    """Case name -> (extension, bytes, expected ``error_kind`` or None if it decodes).

    ``photo`` is an RGB uint8 photograph; a non-square one makes the EXIF case
    meaningful (width and height swap).
    """
    photo = np.asarray(photo, dtype=np.uint8)
    jpeg = jpeg_bytes(photo)
    png = png_bytes(photo)
    webp = webp_bytes(photo)
    return {
        # Good files.
        "jpeg": (".jpg", jpeg, None),
        "png": (".png", png, None),
        "webp": (".webp", webp, None),
        "upper_case_extension": (".JPG", jpeg, None),
        "grayscale_jpeg": (".jpeg", jpeg_bytes(np.asarray(Image.fromarray(photo).convert("L"))), None),
        "cmyk_jpeg": (".jpg", cmyk_jpeg_bytes(photo), None),
        "gray16_png": (".png", gray16_png_bytes(), None),
        "palette_png_transparent": (".png", palette_png_with_transparency(), None),
        "rgba_png": (".png", rgba_png_bytes(photo), None),
        "animated_gif": (".gif", animated_bytes("GIF"), None),
        "animated_webp": (".webp", animated_bytes("WEBP"), None),
        "animated_png": (".png", animated_bytes("PNG"), None),
        "exif_rotated_jpeg": (".jpg", exif_rotated_jpeg(photo, orientation=6), None),
        # Broken files.
        "empty": (".jpg", b"", "empty_file"),
        "truncated_jpeg": (".jpg", jpeg[: len(jpeg) // 2], "truncated_image"),
        "truncated_png": (".png", png[: len(png) // 2], "truncated_image"),
        "truncated_webp": (".webp", webp[: len(webp) // 2], "truncated_image"),
        "text_named_jpg": (".jpg", b"<html><body>404 Not Found</body></html>\n", "not_an_image"),
        "corrupt_png": (".png", corrupt_png(photo), "decode_failed"),
        "decompression_bomb": (".png", bomb_png(), "decompression_bomb"),
    }
