"""Small JPEG thumbnails of output rows, read back from their original shards by ``source`` and ``key``.

Tar and Parquet shards are read with the job's own readers (``workers/readers.py``)
and its recorded input settings, so a key means here what it meant in the job;
image files and video files are read directly.  A video row's thumbnail is the
frame shown at its ``frame_time``.  Anything that cannot be shown (the shard is
gone, the key is no longer in it, the bytes do not decode) becomes a reason
instead of a picture: a page is never refused because of one image.

A page reads only what the job read: a row's ``source`` is opened only when it
lies under one of :attr:`JobInputs.roots` (the input roots the job's
``_manifest.json`` records; without them, the dataset's own folder; plus what
``--allow-source`` names), and only with the page's own storage settings.  Any
other source, however a crafted Parquet file spells it (another local path, a
second bucket, ``http://169.254.169.254/...``), is a placeholder saying so.
"""

from __future__ import annotations

import base64
import io
import json
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import av
from botocore.exceptions import BotoCoreError
from PIL import Image, ImageOps, UnidentifiedImageError

from workers import schema
from workers.config import ConfigError, InputSpec, StorageOptions
from workers.ledger import INPUT_ROOTS, MANIFEST_NAME
from workers.listing import IMAGES, PARQUET, VIDEO, WEBDATASET, ShardRef, format_of
from workers.readers import read_shard
from workers.storage import filesystem_for, is_under, join, refuse_command_url

THUMB_PIXELS = 160  # longest side: big enough to recognise a scene, ~5 KB as JPEG
JPEG_QUALITY = 80
# Refuse to decode more than this many pixels for a thumbnail (the job's own default bomb limit).
MAX_PIXELS = 178_956_970
_INPUT_FIELDS = ("format", "image_column", "key_column", "passthrough_columns", "questions_column", "max_member_bytes")

Wanted = tuple[str, str, "float | None"]  # (source, key, frame_time)


@dataclass(frozen=True)
class Thumbnail:
    data_uri: str | None  # "data:image/jpeg;base64,..." or None
    reason: str | None = None  # why there is no picture


@dataclass(frozen=True)
class JobInputs:
    """What a page may read thumbnails from, and the job's input settings to read it with."""

    settings: dict[str, Any] | None  # the manifest's "input"; None: the readers' defaults
    roots: tuple[str, ...]  # a source under none of these is never opened
    outside: str = "not under the job's inputs"  # the placeholder's reason for one that is not


def job_inputs(output_url: str, storage: StorageOptions, allow: tuple[str, ...] = ()) -> JobInputs:
    """The inputs of the job that wrote ``output_url`` (its ``_manifest.json``), widened by ``allow``.

    Without a manifest, or with one older than its ``input_roots``, only ``output_url``'s own
    folder (and ``allow``) may be read.  A manifest that is not JSON counts as none.
    """
    fs, path = filesystem_for(join(output_url, MANIFEST_NAME), storage)
    try:
        manifest = json.loads(fs.cat_file(path))
    except (FileNotFoundError, ValueError):
        manifest = None
    manifest = manifest if isinstance(manifest, dict) else {}
    settings = manifest.get("input") if isinstance(manifest.get("input"), dict) else None
    roots = manifest.get(INPUT_ROOTS)
    if isinstance(roots, list) and roots and all(isinstance(r, str) for r in roots):
        return JobInputs(settings, (*roots, *allow), "not under the job's inputs (--allow-source PREFIX shows it)")
    return JobInputs(
        settings,
        (output_url, *allow),
        "not under the job's inputs: no record of them, so only the dataset's own folder is read "
        "(--allow-source PREFIX shows it)",
    )


def input_spec_for(source: str, manifest_input: dict[str, Any] | None) -> InputSpec:
    """The job's input settings (from ``_manifest.json``), aimed at one source."""
    fields = {k: v for k, v in (manifest_input or {}).items() if k in _INPUT_FIELDS}
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    return InputSpec(urls=(source,), **fields)


def _jpeg(im: Image.Image) -> Thumbnail:
    im = ImageOps.exif_transpose(im)
    im.thumbnail((THUMB_PIXELS, THUMB_PIXELS))
    buf = io.BytesIO()
    im.convert("RGB").save(buf, format="JPEG", quality=JPEG_QUALITY)
    return Thumbnail("data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode())


def image_thumbnail(data: bytes) -> Thumbnail:
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > MAX_PIXELS:
                return Thumbnail(None, f"image of {im.width}x{im.height} pixels is too large to show")
            im.draft("RGB", (THUMB_PIXELS * 2, THUMB_PIXELS * 2))  # JPEG: decode at reduced scale
            return _jpeg(im)
    except UnidentifiedImageError:
        return Thumbnail(None, "the image does not decode: not a format Pillow can identify")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        return Thumbnail(None, f"the image does not decode: {exc}")


def _bad_frame_time(frame_time: Any) -> Thumbnail | None:
    # A NaN would match no frame and decode the whole video; inf cannot be seeked to.  Every
    # video row a job writes has a finite time, so None is a crafted (or cleaned NaN) one too.
    if isinstance(frame_time, int | float) and not isinstance(frame_time, bool) and math.isfinite(frame_time):
        return None
    if frame_time is None:
        return Thumbnail(None, "the row has no finite frame_time: which frame to show is unknown")
    return Thumbnail(None, f"frame_time {frame_time!r} is not a finite number of seconds")


def _too_large(kind: str, width: int, height: int) -> Thumbnail | None:
    if width * height > MAX_PIXELS:
        return Thumbnail(None, f"{kind} of {width}x{height} pixels is too large to show")
    return None


def frame_thumbnail(file: Any, frame_time: float | None) -> Thumbnail:
    """The frame on screen at ``frame_time`` seconds.

    A reason instead when ``frame_time`` is missing or not a finite number, when the stream's frames
    have more than :data:`MAX_PIXELS` (checked before any is decoded), or when it does not decode.
    """
    bad = _bad_frame_time(frame_time)
    if bad is not None:
        return bad
    try:
        with av.open(file, mode="r", metadata_errors="ignore") as container:
            if not container.streams.video:
                return Thumbnail(None, "the file has no video stream")
            stream = container.streams.video[0]
            large = _too_large("video", stream.codec_context.width, stream.codec_context.height)
            if large is not None:
                return large
            target = float(frame_time)
            if target > 0 and stream.time_base:
                container.seek(int(target / stream.time_base), stream=stream, backward=True)
            best = None
            for frame in container.decode(stream):
                if frame.time is not None and frame.time > target + 1e-3 and best is not None:
                    break
                best = frame
            if best is None:
                return Thumbnail(None, f"no frame at {target:.3f} s")
            # A stream may change size midway: check the frame itself before converting it.
            return _too_large("video", best.width, best.height) or _jpeg(best.to_image())
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        return Thumbnail(None, f"the video does not decode: {exc}")


def _from_shard(source: str, fmt: str, wanted: list[Wanted], manifest_input, storage) -> dict[Wanted, Thumbnail]:
    keys = defaultdict(list)
    for item in wanted:
        keys[item[1]].append(item)
    found: dict[Wanted, Thumbnail] = {}
    shard = ShardRef(uri=source, format=fmt, name="thumbnails")
    shard_error = None  # the reader's reason when the shard itself cannot be read (gone, corrupt)
    for table in read_shard(shard, input_spec_for(source, manifest_input), storage):
        for row in table.select([schema.KEY, schema.IMAGE, schema.MEDIA, schema.ERROR]).to_pylist():
            if row[schema.KEY] == "" and row[schema.ERROR]:
                shard_error = row[schema.ERROR]
            for item in keys.pop(row[schema.KEY], []):
                if row[schema.IMAGE] is None:
                    found[item] = Thumbnail(None, row[schema.ERROR] or "the sample has no image")
                elif row[schema.MEDIA] == "video":
                    found[item] = frame_thumbnail(io.BytesIO(row[schema.IMAGE]), item[2])
                else:
                    found[item] = image_thumbnail(row[schema.IMAGE])
        if not keys:
            break
    for items in keys.values():
        for item in items:
            found[item] = Thumbnail(None, shard_error or f"key {item[1]!r} is no longer in {source}")
    return found


def _from_file(source: str, fmt: str, wanted: list[Wanted], max_bytes: int, storage) -> dict[Wanted, Thumbnail]:
    fs, path = filesystem_for(source, storage)
    if fmt == VIDEO:
        out = {}
        for item in wanted:
            with fs.open(path, "rb") as f:
                out[item] = frame_thumbnail(f, item[2])
        return out
    size = fs.size(path)
    if size > max_bytes:
        return dict.fromkeys(wanted, Thumbnail(None, f"the file has {size} bytes, above max_member_bytes"))
    return dict.fromkeys(wanted, image_thumbnail(fs.cat_file(path)))


def thumbnails(wanted: list[Wanted], job: JobInputs, storage: StorageOptions) -> dict[Wanted, Thumbnail]:
    """A thumbnail, or a reason, for every ``(source, key, frame_time)``; never raises for bad data.

    A source not under ``job.roots`` is not opened, listed or stat'ed: its reason is ``job.outside``.
    """
    by_source: dict[str, list[Wanted]] = defaultdict(list)
    for item in dict.fromkeys(wanted):
        by_source[item[0]].append(item)
    out: dict[Wanted, Thumbnail] = {}
    for source, items in by_source.items():
        if not isinstance(source, str) or not source:
            out.update(dict.fromkeys(items, Thumbnail(None, f"the row's source {source!r} is not a location")))
            continue
        if not is_under(source, job.roots):
            out.update(dict.fromkeys(items, Thumbnail(None, f"{source} is {job.outside}")))
            continue
        fmt = format_of(source)
        try:
            refuse_command_url(source, "source")
            if fmt in (WEBDATASET, PARQUET):
                out.update(_from_shard(source, fmt, items, job.settings, storage))
            elif fmt in (IMAGES, VIDEO):
                limit = input_spec_for(source, job.settings).max_member_bytes
                out.update(_from_file(source, fmt, items, limit, storage))
            else:
                out.update(dict.fromkeys(items, Thumbnail(None, f"cannot tell what kind of file {source!r} is")))
        except FileNotFoundError:
            out.update(dict.fromkeys(items, Thumbnail(None, f"{source} is gone")))
        except (OSError, BotoCoreError, ValueError, ConfigError) as exc:  # storage, credentials, refused URLs, settings
            out.update(dict.fromkeys(items, Thumbnail(None, f"cannot read {source}: {exc}")))
    return out
