"""workers.decode: real files (good, odd and broken) through decode_image / decode_batch,
and bit-identity with transformers' BLIP image processor."""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import os
import subprocess
import sys
import textwrap
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from imagefactory import (
    ANIMATION_COLOURS,
    animated_bytes,
    bomb_png,
    broken_image_cases,
    cmyk_jpeg_bytes,
    exif_rotated_jpeg,
    gray16_gradient,
    gray16_png_bytes,
    jpeg_bytes,
    palette_png_with_transparency,
    png_bytes,
    rgba_png_bytes,
    webp_bytes,
)
from PIL import Image, ImageOps

from workers import schema
from workers.config import DECODE_MODES, ConfigError, DecodeSpec
from workers.decode import ERROR_KINDS, DecodeError, decode_batch, decode_image, pixels_from_table

SPEC = DecodeSpec(mode="exact", height=224, width=224)
TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent


@pytest.fixture(scope="module")
def cases(photos):
    # chelsea is 451x300: non-square, so an orientation mix-up shows.
    return broken_image_cases(photos["chelsea"])


CASE_NAMES = list(broken_image_cases(np.zeros((8, 12, 3), np.uint8)))


# --------------------------------------------------------------------------- decode_image


@pytest.mark.parametrize("name", CASE_NAMES)
def test_every_case_through_decode_image(cases, name):
    _ext, data, kind = cases[name]
    if kind is None:
        pixels, width, height = decode_image(data, SPEC)
        assert pixels.shape == (SPEC.height, SPEC.width, 3)
        assert pixels.dtype == np.uint8
        assert pixels.flags.c_contiguous
        assert width > 0 and height > 0
    else:
        with pytest.raises(DecodeError) as info:
            decode_image(data, SPEC)
        assert info.value.kind == kind
        assert info.value.kind in ERROR_KINDS
        assert str(info.value)  # a human-readable reason


def test_case_list_covers_the_brief():
    kinds = {kind for _ext, _data, kind in broken_image_cases(np.zeros((8, 12, 3), np.uint8)).values()}
    assert set(ERROR_KINDS) - kinds == {"missing_image"}  # a null cell is a table-level case, tested below
    assert ".JPG" in {ext for ext, _data, _kind in broken_image_cases(np.zeros((8, 12, 3), np.uint8)).values()}


def test_reports_original_size_and_target_shape(photos):
    spec = DecodeSpec(mode="exact", height=96, width=160)  # non-square target: catches (w, h) swaps
    pixels, width, height = decode_image(png_bytes(photos["chelsea"]), spec)
    assert (width, height) == (451, 300)
    assert pixels.shape == (96, 160, 3)


def test_decode_error_carries_kind_and_message():
    err = DecodeError("truncated_image", "cut short")
    assert err.kind == "truncated_image" and err.message == "cut short" and str(err) == "cut short"


def test_upper_case_extension_decodes_like_lower_case(cases):
    assert np.array_equal(
        decode_image(cases["upper_case_extension"][1], SPEC)[0], decode_image(cases["jpeg"][1], SPEC)[0]
    )


def test_text_and_empty_files_are_named_as_such():
    with pytest.raises(DecodeError, match="empty") as info:
        decode_image(b"", SPEC)
    assert info.value.kind == "empty_file"
    with pytest.raises(DecodeError) as info:
        decode_image(b"GIF89a but not really", SPEC)
    assert info.value.kind in ("not_an_image", "truncated_image")
    with pytest.raises(DecodeError) as info:
        decode_image(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", SPEC)
    assert info.value.kind == "not_an_image"  # EPS (Ghostscript) is never attempted


def test_truncated_files_of_every_format(photos):
    photo = photos["astronaut"]
    for data in (jpeg_bytes(photo), png_bytes(photo), webp_bytes(photo), jpeg_bytes(photo, progressive=True)):
        for fraction in (0.05, 0.5, 0.95):
            with pytest.raises(DecodeError) as info:
                decode_image(data[: int(len(data) * fraction)], SPEC)
            assert info.value.kind == "truncated_image", str(info.value)


# ---------------------------------------------------------------- bit-identity with transformers


def _blip_reference(image: Image.Image, spec: DecodeSpec) -> np.ndarray:
    """What transformers' BLIP processor (PIL backend) feeds into rescale/normalize, as (H, W, 3)."""
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    processor = BlipImageProcessorPil(size={"height": spec.height, "width": spec.width}, resample=spec.resample)
    out = processor(image, do_rescale=False, do_normalize=False, return_tensors="np")["pixel_values"]
    assert out.dtype == np.uint8 and out.shape == (1, 3, spec.height, spec.width)
    return out[0].transpose(1, 2, 0)


def test_default_resample_is_blips():
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    assert int(BlipImageProcessorPil.resample) == DecodeSpec().resample == int(Image.Resampling.BICUBIC)


ENCODINGS = {
    "png": png_bytes,
    "jpeg": jpeg_bytes,
    "webp": webp_bytes,
    "cmyk_jpeg": cmyk_jpeg_bytes,
    "grayscale_jpeg": lambda photo: jpeg_bytes(np.asarray(Image.fromarray(photo).convert("L"))),
    "rgba_png": rgba_png_bytes,
    "exif_rotated": exif_rotated_jpeg,
}


def _encoded(photo: np.ndarray, encoding: str) -> bytes:
    return ENCODINGS[encoding](photo)


@pytest.mark.parametrize("photo_name", ["astronaut", "coffee", "chelsea", "rocket"])
@pytest.mark.parametrize("encoding", ["png", "jpeg", "webp", "cmyk_jpeg", "grayscale_jpeg", "rgba_png", "exif_rotated"])
@pytest.mark.parametrize("size", [(224, 224), (120, 200)])
def test_bit_identical_to_blip_processor(photos, photo_name, encoding, size):
    photo = photos[photo_name]
    data = _encoded(photo, encoding)
    spec = DecodeSpec(mode="exact", height=size[0], width=size[1])
    ours, width, height = decode_image(data, spec)
    # The reference sees the image as transformers' own load_image would: EXIF-oriented.
    reference_image = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    assert (width, height) == reference_image.size
    np.testing.assert_array_equal(ours, _blip_reference(reference_image, spec))


@pytest.mark.parametrize(
    "make", [palette_png_with_transparency, lambda: animated_bytes("GIF"), lambda: animated_bytes("PNG")]
)
def test_bit_identical_for_palette_and_animated(make):
    data = make()
    ours, _, _ = decode_image(data, SPEC)
    np.testing.assert_array_equal(ours, _blip_reference(Image.open(io.BytesIO(data)), SPEC))


# ---------------------------------------------------------------- fast mode: JPEG DCT scaling

FAST_PSNR_DB = 35.0


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def _upscaled(photo: np.ndarray, megapixels: float, size: tuple[int, int] | None = None) -> np.ndarray:
    """A 1-2 MP photo: the real photo enlarged (sides deliberately not multiples of 8 or 16)."""
    h, w = photo.shape[:2]
    scale = (megapixels * 1e6 / (h * w)) ** 0.5
    size = size or (round(w * scale) | 1, round(h * scale) | 1)
    return np.asarray(Image.fromarray(photo).resize(size, Image.Resampling.LANCZOS))


def _with_orientation(arr: np.ndarray, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return jpeg_bytes(arr, exif=exif.tobytes())


def _fast(spec: DecodeSpec) -> DecodeSpec:
    return dataclasses.replace(spec, mode="fast")


def test_modes():
    assert set(DECODE_MODES) == {"exact", "fast"}
    assert DecodeSpec().mode == "fast"  # the job's default; exact is opt-in
    with pytest.raises(ConfigError, match="^decode_mode: must be one of"):
        DecodeSpec(mode="quick")


@pytest.mark.parametrize("photo_name", ["astronaut", "coffee", "chelsea", "rocket"])
@pytest.mark.parametrize("megapixels", [None, 1.0, 2.0])
@pytest.mark.parametrize("size", [(224, 224), (120, 200)])
def test_fast_mode_psnr_against_the_processor(photos, photo_name, megapixels, size):
    """Real photos, native and as 1-2 MP JPEGs: fast mode stays >= 35 dB from the processor's pixels."""
    photo = photos[photo_name] if megapixels is None else _upscaled(photos[photo_name], megapixels)
    spec = DecodeSpec(mode="exact", height=size[0], width=size[1])
    for data in (jpeg_bytes(photo), jpeg_bytes(photo, progressive=True), jpeg_bytes(photo, quality=75)):
        fast, width, height = decode_image(data, _fast(spec))
        reference = _blip_reference(Image.open(io.BytesIO(data)), spec)
        assert fast.shape == reference.shape and fast.dtype == np.uint8 and fast.flags.c_contiguous
        assert (width, height) == (photo.shape[1], photo.shape[0])  # the full size, not the scaled decode's
        assert _psnr(fast, reference) >= FAST_PSNR_DB, (photo_name, megapixels, size)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_fast_mode_follows_exif_orientation(photos, orientation):
    """DCT scaling rounds the scaled size up; the resize box must follow the EXIF turn, or the picture shifts."""
    photo = _upscaled(photos["astronaut"], 1.2, size=(1203, 1010))
    data = _with_orientation(photo, orientation)
    for spec in (SPEC, DecodeSpec(mode="exact", height=120, width=200)):
        exact, width, height = decode_image(data, spec)
        fast, fast_width, fast_height = decode_image(data, _fast(spec))
        assert (fast_width, fast_height) == (width, height)
        assert (width, height) == ((1010, 1203) if orientation >= 5 else (1203, 1010))
        assert _psnr(fast, exact) >= FAST_PSNR_DB, orientation


def test_fast_mode_uses_jpeg_draft(photos, monkeypatch):
    from PIL import JpegImagePlugin

    calls = []
    real = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = real(self, mode, size)
        calls.append((self.size, result))
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    data = jpeg_bytes(_upscaled(photos["coffee"], 1.5))
    decode_image(data, SPEC)
    assert not calls  # exact mode never scales
    decode_image(data, _fast(SPEC))
    ((scaled_size, (_mode, box)),) = calls
    assert min(scaled_size) >= 224 and max(scaled_size) < 1000  # decoded at 1/4 scale, still >= the target
    assert box[2] <= scaled_size[0] and box[3] <= scaled_size[1]


@pytest.mark.parametrize("encoding", ["png", "webp", "cmyk_jpeg", "grayscale_jpeg", "rgba_png", "exif_rotated"])
def test_fast_mode_other_encodings(photos, encoding):
    photo = _upscaled(photos["chelsea"], 1.0)
    data = _encoded(photo, encoding)
    exact, width, height = decode_image(data, SPEC)
    fast, fast_width, fast_height = decode_image(data, _fast(SPEC))
    assert (fast_width, fast_height) == (width, height)
    assert _psnr(fast, exact) >= FAST_PSNR_DB, encoding


@pytest.mark.parametrize("make", [palette_png_with_transparency, lambda: animated_bytes("GIF")])
def test_fast_mode_small_images_are_exact(make):
    """Nothing to scale down by DCT and no reduction gap to use: fast mode gives the exact pixels."""
    data = make()
    np.testing.assert_array_equal(decode_image(data, _fast(SPEC))[0], decode_image(data, SPEC)[0])


@pytest.mark.parametrize("name", CASE_NAMES)
def test_fast_mode_reports_the_same_errors(cases, name):
    _ext, data, kind = cases[name]
    if kind is None:
        assert decode_image(data, _fast(SPEC))[0].shape == (SPEC.height, SPEC.width, 3)
    else:
        with pytest.raises(DecodeError) as info:
            decode_image(data, _fast(SPEC))
        assert info.value.kind == kind


def test_decode_batch_fast_mode(cases):
    named = [(name, data) for name, (_ext, data, _kind) in cases.items()]
    table = _reader_table(named)
    exact = decode_batch(table, SPEC)
    fast = decode_batch(table, _fast(SPEC))
    assert fast.schema == exact.schema
    for name in (schema.ID, schema.STATUS, schema.ERROR_KIND, schema.WIDTH, schema.HEIGHT):
        assert fast.column(name).to_pylist() == exact.column(name).to_pylist(), name
    for i, (a, b) in enumerate(zip(pixels_from_table(fast), pixels_from_table(exact), strict=True)):
        assert _psnr(a, b) >= FAST_PSNR_DB, named[i][0]


# ---------------------------------------------------------------- particular modes and files


def test_gray16_png_is_scaled_not_clipped():
    pixels, width, height = decode_image(gray16_png_bytes(96, 256), DecodeSpec(mode="exact", height=96, width=256))
    assert (width, height) == (256, 96)
    assert np.array_equal(pixels[..., 0], pixels[..., 1]) and np.array_equal(pixels[..., 0], pixels[..., 2])
    row = pixels[48, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255
    assert np.all(np.diff(row) >= 0)  # the ramp survives
    assert 120 < pixels.mean() < 135  # not all white (plain convert("L") would clip to 255)
    # Exactly the 8-bit image round(v / 257) would give.
    expected8 = ((gray16_gradient(96, 256).astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    np.testing.assert_array_equal(
        pixels, decode_image(png_bytes(expected8), DecodeSpec(mode="exact", height=96, width=256))[0]
    )


@pytest.mark.parametrize(
    ("mode", "values", "expected"),
    [
        ("I", np.array([[0, 32896, 65535, -5]], dtype=np.int32), [0, 128, 255, 0]),
        ("F", np.array([[0.0, 0.5, 1.0, np.nan]], dtype=np.float32), [0, 128, 255, 0]),
    ],
)
def test_32bit_int_and_float_grayscale_tiff(mode, values, expected):
    data = io.BytesIO()
    Image.fromarray(values, mode=mode).save(data, format="TIFF")
    assert Image.open(io.BytesIO(data.getvalue())).mode == mode
    pixels, width, height = decode_image(data.getvalue(), DecodeSpec(mode="exact", height=1, width=4, resample=0))
    assert (width, height) == (4, 1)
    assert pixels[0, :, 0].tolist() == expected


def test_palette_transparency_composited_over_white():
    pixels, width, height = decode_image(
        palette_png_with_transparency((64, 48)), DecodeSpec(mode="exact", height=48, width=64)
    )
    assert (width, height) == (64, 48)
    assert np.all(pixels[:, :28] == 255)  # transparent half: white, like transformers' convert_to_rgb
    assert np.all(pixels[:, 36:] == (255, 0, 0))


def test_rgba_alpha_composited_over_white(photos):
    pixels, _, _ = decode_image(
        rgba_png_bytes(photos["coffee"]), DecodeSpec(mode="exact", height=40, width=64, resample=0)
    )
    assert np.all(pixels[:, 0] >= 250)  # alpha ~0 at the left edge: white, not black
    assert pixels[:, -1].mean() < 200  # opaque at the right: the photo


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_animation_uses_first_frame(fmt):
    pixels, width, height = decode_image(animated_bytes(fmt), SPEC)
    assert (width, height) == (40, 30)
    assert np.all(pixels == ANIMATION_COLOURS[0]), np.unique(pixels.reshape(-1, 3), axis=0)


def test_exif_orientation_applied(photos):
    photo = photos["chelsea"]  # 300 rows x 451 columns
    data = exif_rotated_jpeg(photo, orientation=6)
    stored = Image.open(io.BytesIO(data))
    assert stored.size == (451, 300)
    spec = DecodeSpec(mode="exact", height=150, width=100)
    pixels, width, height = decode_image(data, spec)
    assert (width, height) == (300, 451)  # what a viewer shows: rotated 90 degrees clockwise
    rotated = Image.fromarray(np.ascontiguousarray(np.rot90(np.asarray(stored.convert("RGB")), k=-1)))
    np.testing.assert_array_equal(pixels, np.asarray(rotated.resize((100, 150), resample=spec.resample)))
    # And the content is the photo's, turned: compare with the unrotated decode turned by hand.
    plain, _, _ = decode_image(jpeg_bytes(np.ascontiguousarray(np.rot90(photo, k=-1)), quality=95), spec)
    assert np.abs(plain.astype(int) - pixels.astype(int)).mean() < 3


def test_cmyk_jpeg_colours_come_back(photos):
    photo = photos["coffee"]
    cmyk, _, _ = decode_image(cmyk_jpeg_bytes(photo), SPEC)
    rgb, _, _ = decode_image(png_bytes(photo), SPEC)
    assert np.abs(cmyk.astype(int) - rgb.astype(int)).mean() < 4  # not inverted, not garbled


# ---------------------------------------------------------------- decompression bombs


def test_bomb_rejected_by_our_limit_before_pixels_are_read():
    spec = DecodeSpec(mode="exact", max_image_pixels=10_000)
    ok, width, height = decode_image(png_bytes(np.zeros((100, 100, 3), np.uint8)), spec)  # exactly at the limit
    assert (width, height) == (100, 100)
    with pytest.raises(DecodeError, match="above the limit of 10000") as info:
        decode_image(png_bytes(np.zeros((100, 101, 3), np.uint8)), spec)
    assert info.value.kind == "decompression_bomb"


def test_bomb_between_pillow_warning_and_error_limits_uses_our_check():
    # 144 MP: above Pillow's warning threshold (89 MP), below its hard error (179 MP).
    data = bomb_png(12_000, 12_000)
    assert len(data) < 4096
    before = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's DecompressionBombWarning must not escape
        with pytest.raises(DecodeError, match="above the limit of 100000000") as info:
            decode_image(data, DecodeSpec(mode="exact", max_image_pixels=100_000_000))
    assert info.value.kind == "decompression_bomb"
    assert Image.MAX_IMAGE_PIXELS == before  # Pillow's global protection is untouched


def test_bomb_above_pillows_hard_limit_is_a_bomb_too():
    data = bomb_png()  # 50,000 x 50,000
    assert len(data) < 4096
    with pytest.raises(DecodeError) as info:
        decode_image(data, SPEC)
    assert info.value.kind == "decompression_bomb"


def test_bomb_python_allocations_stay_small():
    tracemalloc.start()
    try:
        for data in (bomb_png(), bomb_png(30_000, 30_000), bomb_png(12_000, 12_000)):
            with pytest.raises(DecodeError):
                decode_image(data, DecodeSpec(mode="exact", max_image_pixels=100_000_000))
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 50 * 2**20


_ADDRESS_SPACE_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    sys.path.insert(0, sys.argv[1])
    import numpy as np
    from PIL import Image
    from imagefactory import bomb_png, png_bytes
    from workers.config import DecodeSpec
    from workers.decode import DecodeError, decode_image

    spec = DecodeSpec(mode="exact", max_image_pixels=100_000_000)
    bombs = {"huge": bomb_png(), "30k": bomb_png(30_000, 30_000), "144mp": bomb_png(12_000, 12_000)}
    decode_image(png_bytes(np.zeros((32, 32, 3), np.uint8)), spec)  # warm every code path

    def vm_bytes():
        for line in open("/proc/self/status"):
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024

    # At most 64 MiB more address space than now: a decoder allocating the
    # declared image (144 MB+ even at 1 byte/pixel) would hit MemoryError.
    resource.setrlimit(resource.RLIMIT_AS, (vm_bytes() + 64 * 2**20, resource.RLIM_INFINITY))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = {}
    try:
        Image.new("1", (12_000, 12_000))
        result["control"] = "allocated"
    except MemoryError:
        result["control"] = "MemoryError"
    for name, data in bombs.items():
        try:
            decode_image(data, spec)
            result[name] = "decoded"
        except DecodeError as exc:
            result[name] = exc.kind
    result["rss_growth_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    print(json.dumps(result))
    """
)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc and RLIMIT_AS")
def test_bomb_rejected_within_bounded_address_space():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-c", _ADDRESS_SPACE_SCRIPT, str(TESTS_DIR)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["control"] == "MemoryError", result  # the limit really bites
    assert result["huge"] == result["30k"] == result["144mp"] == "decompression_bomb", result
    assert result["rss_growth_kb"] < 50 * 1024, result


# ---------------------------------------------------------------- decode_batch


def _reader_table(named_files: list[tuple[str, bytes | None]], passthrough: tuple[str, ...] = ("caption_src",)):
    rows = []
    for i, (name, data) in enumerate(named_files):
        rows.append(
            {
                schema.ID: f"shard-0::{name}",
                schema.SOURCE: "s3://bucket/shard-0.tar",
                schema.SHARD: "shard-0",
                schema.KEY: name,
                schema.IMAGE: data,
                schema.STATUS: schema.STATUS_OK,
                schema.ERROR_KIND: None,
                schema.ERROR: None,
                schema.ROW_QUESTIONS: [f"q{i}?"] if i % 2 else None,
                **{column: f"{column}-{i}" for column in passthrough},
            }
        )
    return pa.Table.from_pylist(rows, schema=schema.read_schema(passthrough))


def test_decode_batch_keeps_every_row_in_order(cases):
    named = [(name, data) for name, (_ext, data, _kind) in cases.items()]
    table = _reader_table(named)
    spec = DecodeSpec(mode="exact", height=64, width=80)
    out = decode_batch(table, spec)

    assert out.num_rows == table.num_rows
    assert out.column(schema.ID).to_pylist() == table.column(schema.ID).to_pylist()
    assert out.column("caption_src").to_pylist() == table.column("caption_src").to_pylist()
    assert out.column(schema.ROW_QUESTIONS).to_pylist() == table.column(schema.ROW_QUESTIONS).to_pylist()

    pixels = pixels_from_table(out)
    assert pixels.shape == (table.num_rows, 64, 80, 3) and pixels.dtype == np.uint8
    rows = out.drop_columns([schema.PIXELS]).to_pylist()
    for i, (row, (name, (_ext, data, kind))) in enumerate(zip(rows, cases.items(), strict=True)):
        if kind is None:
            assert row[schema.STATUS] == schema.STATUS_OK, (name, row[schema.ERROR])
            assert row[schema.ERROR_KIND] is None and row[schema.ERROR] is None
            expected, width, height = decode_image(data, spec)
            np.testing.assert_array_equal(pixels[i], expected)
            assert (row[schema.WIDTH], row[schema.HEIGHT]) == (width, height)
        else:
            assert row[schema.STATUS] == schema.STATUS_ERROR, name
            assert row[schema.ERROR_KIND] == kind, (name, row[schema.ERROR])
            assert row[schema.ERROR]
            assert row[schema.WIDTH] is None and row[schema.HEIGHT] is None
            assert not pixels[i].any()


def test_decode_batch_output_schema(cases):
    out = decode_batch(_reader_table([("jpeg", cases["jpeg"][1])]), SPEC)
    names = out.column_names
    assert schema.IMAGE not in names
    frame_columns = [f.name for f in schema.FRAME_FIELDS]
    assert names[-6:] == [schema.PIXELS, schema.WIDTH, schema.HEIGHT, *frame_columns]
    expected_front = [f.name for f in schema.READ_FIELDS if f.name != schema.IMAGE] + ["caption_src"]
    assert names[:-6] == expected_front
    assert all(out.column(name).null_count == out.num_rows for name in frame_columns)  # an image is no frame
    assert out.schema.field(schema.WIDTH).type == pa.int32()
    assert out.schema.field(schema.HEIGHT).type == pa.int32()
    assert isinstance(out.schema.field(schema.PIXELS).type, pa.ExtensionType)
    assert getattr(out.schema.field(schema.PIXELS).type, "shape", None) == (SPEC.height, SPEC.width, 3)
    for field in schema.READ_FIELDS:
        if field.name != schema.IMAGE:
            assert out.schema.field(field.name).equals(field), field.name  # types and nullability kept
    assert (out.column(schema.WIDTH)[0].as_py(), out.column(schema.HEIGHT)[0].as_py()) == (451, 300)


def test_existing_error_rows_pass_through(cases):
    table = _reader_table([("good", cases["jpeg"][1]), ("too_big", None), ("also_good", cases["png"][1])])
    status = table.column_names.index(schema.STATUS)
    kind = table.column_names.index(schema.ERROR_KIND)
    error = table.column_names.index(schema.ERROR)
    table = table.set_column(status, table.schema.field(status), pa.array(["ok", "error", "ok"]))
    table = table.set_column(kind, table.schema.field(kind), pa.array([None, "member_too_large", None]))
    table = table.set_column(error, table.schema.field(error), pa.array([None, "70 MB > 64 MB", None]))

    out = decode_batch(table, SPEC)
    assert out.column(schema.STATUS).to_pylist() == ["ok", "error", "ok"]
    assert out.column(schema.ERROR_KIND).to_pylist() == [None, "member_too_large", None]
    assert out.column(schema.ERROR).to_pylist() == [None, "70 MB > 64 MB", None]
    assert out.column(schema.WIDTH).to_pylist() == [451, None, 451]
    pixels = pixels_from_table(out)
    assert pixels[0].any() and not pixels[1].any() and pixels[2].any()


def test_null_image_on_ok_row_becomes_error():
    out = decode_batch(_reader_table([("nothing", None)]), SPEC)
    assert out.column(schema.STATUS).to_pylist() == [schema.STATUS_ERROR]
    assert out.column(schema.ERROR_KIND).to_pylist() == ["missing_image"]


def test_empty_batch():
    out = decode_batch(_reader_table([]), DecodeSpec(mode="exact", height=32, width=48))
    assert out.num_rows == 0
    assert schema.PIXELS in out.column_names and schema.IMAGE not in out.column_names
    assert pixels_from_table(out).shape == (0, 32, 48, 3)


def test_decode_batch_never_raises_on_garbage(photos):
    rng = np.random.default_rng(0)
    jpeg = bytearray(jpeg_bytes(photos["rocket"][:128, :128]))
    png = bytearray(png_bytes(photos["coffee"][:96, :96]))
    named = []
    for i in range(40):
        source = jpeg if i % 2 else png
        damaged = bytearray(source)
        for position in rng.integers(8, len(damaged), size=int(rng.integers(1, 20))):
            damaged[position] = int(rng.integers(0, 256))
        named.append((f"flip{i}", bytes(damaged)))
        named.append((f"cut{i}", bytes(source[: int(rng.integers(0, len(source)))])))
        named.append((f"noise{i}", rng.integers(0, 256, size=int(rng.integers(1, 2000)), dtype=np.uint8).tobytes()))
    spec = DecodeSpec(mode="exact", height=16, width=16)
    out = decode_batch(_reader_table(named), spec)
    assert out.num_rows == len(named)
    assert set(out.column(schema.STATUS).to_pylist()) <= {schema.STATUS_OK, schema.STATUS_ERROR}
    assert set(out.column(schema.ERROR_KIND).to_pylist()) - {None} <= set(ERROR_KINDS)
    got = dict(zip([n for n, _ in named], out.column(schema.ERROR_KIND).to_pylist(), strict=True))
    for name, data in named:
        # The verdict per input: what decoding that file alone says, in the batch too ...
        try:
            decode_image(data, spec)
            alone = None
        except DecodeError as e:
            alone = e.kind
        assert got[name] == alone, (name, len(data))
        # ... and what the damage implies.
        if name.startswith("noise"):
            assert got[name] == schema.NOT_AN_IMAGE, name  # no image signature in random bytes
        elif name.startswith("cut") and not data:
            assert got[name] == schema.EMPTY_FILE, name
        elif name.startswith("cut"):  # a prefix of a good file: too short to identify, or visibly cut short
            assert got[name] in (schema.NOT_AN_IMAGE, schema.TRUNCATED_IMAGE), (name, len(data))
    verdicts = collections.Counter(got.values())
    assert verdicts[None] and verdicts[schema.TRUNCATED_IMAGE] and verdicts[schema.NOT_AN_IMAGE], verdicts


# ---------------------------------------------------------------- pixels_from_table


def test_pixels_from_table_across_chunks(photos):
    spec = DecodeSpec(mode="exact", height=24, width=32)
    first = decode_batch(_reader_table([("a", png_bytes(photos["coffee"]))]), spec)
    second = decode_batch(_reader_table([("b", png_bytes(photos["rocket"])), ("c", b"")]), spec)
    both = pa.concat_tables([first, second])
    assert both.column(schema.PIXELS).num_chunks == 2
    pixels = pixels_from_table(both)
    assert pixels.shape == (3, 24, 32, 3)
    np.testing.assert_array_equal(pixels[0], pixels_from_table(first)[0])
    np.testing.assert_array_equal(pixels[1:], pixels_from_table(second))


def test_pixels_from_table_with_arrow_native_tensors(photos):
    from ray.data import DataContext
    from ray.data.extensions import FixedShapeTensorFormat

    context = DataContext.get_current()
    saved = context.arrow_fixed_shape_tensor_format
    context.arrow_fixed_shape_tensor_format = FixedShapeTensorFormat.ARROW_NATIVE
    try:
        out = decode_batch(_reader_table([("a", png_bytes(photos["coffee"])), ("b", b"")]), SPEC)
    finally:
        context.arrow_fixed_shape_tensor_format = saved
    assert isinstance(out.column(schema.PIXELS).chunk(0), pa.FixedShapeTensorArray)
    pixels = pixels_from_table(out)
    np.testing.assert_array_equal(pixels[0], decode_image(png_bytes(photos["coffee"]), SPEC)[0])
    assert not pixels[1].any()


# ---------------------------------------------------------------- on a real Ray cluster


@pytest.mark.slow
def test_ray_map_batches_round_trip(ray_cluster, cases):
    ray = ray_cluster
    named = [(name, data) for name, (_ext, data, _kind) in cases.items()]
    table = _reader_table(named)
    spec = DecodeSpec(mode="exact", height=48, width=64)

    def model_stage(batch: pa.Table) -> pa.Table:
        pixels = pixels_from_table(batch)
        assert pixels.shape == (batch.num_rows, 48, 64, 3) and pixels.dtype == np.uint8
        return pa.table(
            {
                schema.ID: batch.column(schema.ID),
                schema.STATUS: batch.column(schema.STATUS),
                schema.ERROR_KIND: batch.column(schema.ERROR_KIND),
                "checksum": pa.array(pixels.reshape(len(pixels), -1).sum(axis=1, dtype=np.int64)),
            }
        )

    ds = (
        ray.data.from_arrow(table)
        .repartition(3)
        .map_batches(decode_batch, batch_format="pyarrow", fn_kwargs={"spec": spec}, batch_size=4)
        .map_batches(model_stage, batch_format="pyarrow", batch_size=5)
    )
    rows = {row[schema.ID]: row for row in ds.take_all()}
    assert len(rows) == len(named)
    for name, (_ext, data, kind) in cases.items():
        row = rows[f"shard-0::{name}"]
        assert row[schema.ERROR_KIND] == kind, name
        expected = 0 if kind else int(decode_image(data, spec)[0].sum(dtype=np.int64))
        assert row["checksum"] == expected, name
