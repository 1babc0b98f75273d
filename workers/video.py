"""Videos -> sampled frames at the model's input size, with PyAV (FFmpeg is in its wheels).

A video becomes one row per sampled frame (``frame_time``, ``frame_index``,
``video_duration`` set; ``id`` ``<source>::<key>#t=<seconds, 3 decimals>``), plus
at most one error row with the video's own id when it is broken or cut short.
Frames before the damage are kept.  Nothing here raises for bad input.

Reading: a video file is read through an fsspec file object (local or ``s3://``
alike), never held whole in memory nor copied to disk; FFmpeg asks for the byte
ranges it needs.  A video inside a tar (video2dataset's layout) arrives as the
member's bytes, bounded by ``max_member_bytes``.

Sampling (``VideoSpec.frame_sampling``), by presentation time from the stream's start:

* ``interval``: the frames shown at 0, T, 2T, ...: for each target the last frame
  that starts at or before it, each distinct frame once.  A frame known to be on
  screen at no target (a later frame, already demuxed, starts before the next one)
  is handed to FFmpeg with ``skip_frame=NONREF``: dropped undecoded when it is a
  non-reference frame (no other frame depends on it, so nothing else changes).
  When the next target lies past a keyframe the demuxer seeks to it.
* ``scene``: the first frame of every shot, plus, inside shots of ``max_scene_seconds``
  or more, the first frame at or after each k*T at least T/2 into the shot.  A cut is
  a jump in the 32-bin luma histogram of a 64x36 thumbnail of consecutive frames (see
  :func:`histogram_distance`) that lasts: a flash is not a cut (:func:`_cuts`).
* ``keyframes``: the stream's keyframes only (``skip_frame=NONKEY``), the cheapest.

Spans ``[start, end)`` of a video (workers/listing.py) give exactly the rows of the
unsplit video, in every mode: a span owns the frames (interval: the targets) in it;
scene spans decode from before their start and past their end as far as the rule's
decisions look (:func:`_scene`).  A seek that lands past the time asked for (MPEG-TS,
other files without an index) goes back further (:meth:`_Decoder.start_at`).  This
assumes what FFmpeg decodes after a seek to a keyframe is what it decodes there from
the stream's start (closed GOPs; x264's default).

``frame_index`` is exact while the stream is read from its start: a frame's rank
among the packets demuxed so far (every packet with an earlier presentation time
precedes it in decoding order, decoded or skipped).  After a seek it is the time
times the average frame rate, exact for constant frame rates.  ``width``/``height``
are the frame's size after its rotation metadata.

Pixels: ``DecodeSpec.mode="exact"`` converts the frame to full-size RGB and resizes
it as :func:`workers.decode.decode_image` does (what BlipImageProcessor does to the
same frame); ``"fast"`` (the default) has FFmpeg's swscale convert and scale in one
pass, with area averaging, within the PSNR that tests/test_video.py holds it to.
"""

from __future__ import annotations

import bisect
import io
import math
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import av
import numpy as np
import pyarrow as pa
from PIL import Image

from workers import schema
from workers.config import DecodeSpec, InputSpec, StorageOptions, VideoSpec
from workers.decode import DecodeError, decode_batch, decoded_table, resize_rgb
from workers.listing import ShardRef
from workers.readers import StorageReads, TracedFile, video_file_row
from workers.storage import filesystem_for

# Headers claiming more than this are not trusted (a hostile or broken file can
# claim a duration of years): the video is then read as if its duration were unknown.
MAX_TRUSTED_SECONDS = 7 * 24 * 3600.0
# Nor a duration that leaves fewer bytes than this per second (1 kbit/s; a slideshow
# at one H.264 frame per second needs several): a 2 KB file claiming five days would
# otherwise be listed as 700 spans.
MIN_TRUSTED_BYTES_PER_SECOND = 125
# Seek only when the next target is at least this far past a keyframe ahead of
# the current position: a seek costs a demuxer reset and the frames from the
# keyframe to the target (measured in BENCHMARKS.md, "Video").
SEEK_MIN_GAP_S = 2.0
# A seek to a span's start that lands past it goes back this far, then twice as far, ...
SEEK_BACK_S = 1.0
# Scene spans decode from this long before the history their decisions need (_scene):
# frames for the cut rule's state to become known; doubled while it does not.
SCENE_WARMUP_S = 1.0
# Ranged reads of this size: FFmpeg reads sequentially and seeks now and then, so a
# readahead cache of a few MB keeps S3 requests few without holding the file.
READ_BLOCK_BYTES = 4 * 1024**2
THUMB_SIZE = (64, 36)
HISTOGRAM_BINS = 32
# A cut must still be there this many frames later: covers a camera flash or an
# explosion's one or two bright frames, at the price of missing shots shorter than that.
FLASH_FRAMES = 2


@dataclass
class FrameRow:
    """One row of a video's output: a sampled frame (``pixels`` set) or the video's error."""

    pixels: np.ndarray | None = None
    width: int | None = None
    height: int | None = None
    time: float | None = None
    index: int | None = None
    duration: float | None = None
    kind: str | None = None
    error: str | None = None


def frame_id(source: str, key: str, time: float) -> str:
    """The W3C media-fragment-style id of a frame: stable across reruns."""
    return f"{source}::{key}#t={time:.3f}"


def histogram_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Half the L1 distance of two normalised histograms: 0 identical, 1 disjoint."""
    return float(0.5 * np.abs(a - b).sum())


def _luma_histogram(frame: av.VideoFrame) -> np.ndarray:
    thumb = frame.reformat(width=THUMB_SIZE[0], height=THUMB_SIZE[1], format="gray").to_ndarray()
    hist = np.bincount((thumb >> 3).ravel(), minlength=HISTOGRAM_BINS).astype(np.float64)
    return hist / hist.sum()


# --------------------------------------------------------------------------- opening


def _open(file: BinaryIO) -> tuple[Any, Any]:
    """``(container, video stream)``; raises DecodeError with a video error kind."""
    try:
        container = av.open(file, mode="r", metadata_errors="ignore")
    except av.error.InvalidDataError as exc:
        raise DecodeError(schema.NOT_A_VIDEO, f"not a video FFmpeg can read: {exc}") from exc
    except (av.error.EOFError, EOFError) as exc:
        raise DecodeError(schema.TRUNCATED_VIDEO, f"the file ends inside its header: {exc}") from exc
    except av.error.FFmpegError as exc:
        # A missing MP4 index ("moov atom not found") is FFmpeg's InvalidData too; name it.
        raise DecodeError(schema.NOT_A_VIDEO, f"cannot open the video: {exc}") from exc
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["no streams"]
        container.close()
        raise DecodeError(schema.NO_VIDEO_STREAM, f"the file has no video stream (streams: {', '.join(kinds)})")
    return container, container.streams.video[0]


def _moov_missing(file: BinaryIO) -> bool:
    """An MP4/MOV whose index atom is absent: the usual form of a download cut short."""
    try:
        file.seek(0)
        head = file.read(12)
    except OSError:
        return False
    return len(head) >= 8 and head[4:8] in (b"ftyp", b"mdat", b"free", b"wide")


def header_duration(container: Any, stream: Any) -> float | None:
    """The video's duration in seconds from its header (the stream's, else the container's),
    or None when it gives none, one of MAX_TRUSTED_SECONDS or more, or one the file's
    size cannot fill at MIN_TRUSTED_BYTES_PER_SECOND."""
    if stream.duration and stream.time_base:
        seconds = float(stream.duration * stream.time_base)
    elif container.duration:
        seconds = container.duration / 1_000_000
    else:
        return None
    size = getattr(container, "size", 0) or 0  # 0 when the file object's size is unknown
    if size and size < seconds * MIN_TRUSTED_BYTES_PER_SECOND:
        return None
    return seconds if 0 < seconds < MAX_TRUSTED_SECONDS else None


class _Clock:
    """Times and indexes of one stream's frames, from its time base and sample index."""

    def __init__(self, container: Any, stream: Any) -> None:
        self.time_base = float(stream.time_base)
        self.start_pts = stream.start_time or 0
        rate = stream.average_rate or stream.guessed_rate
        self.rate = float(rate) if rate else None
        self.duration = header_duration(container, stream)
        self.keyframe_times: list[float] = []
        try:
            # The container's index (MP4/MOV: every sample; MKV/WebM: its cues), for seeking.
            self.keyframe_times = sorted(self.seconds(e.timestamp) for e in stream.index_entries if e.is_keyframe)
        except (AttributeError, av.error.FFmpegError):
            pass

    def seconds(self, pts: int) -> float:
        return (pts - self.start_pts) * self.time_base

    def end_of(self, shown: tuple[float, int, Any]) -> float:
        """When the frame ``(time, index, frame)`` leaves the screen, for the stream's last
        frame when the header gives no duration to trust: its own duration, else one frame."""
        t, _index, frame = shown
        if frame.duration:
            return t + frame.duration * self.time_base
        return t + 1 / self.rate if self.rate else t

    def estimated_index(self, pts: int) -> int:
        return round(self.seconds(pts) * self.rate) if self.rate else -1

    def keyframe_after(self, now: float, target: float) -> float | None:
        """The last keyframe at or before ``target`` if it is past ``now``, else None."""
        i = bisect.bisect_right(self.keyframe_times, target) - 1
        if i >= 0 and self.keyframe_times[i] > now:
            return self.keyframe_times[i]
        return None


# --------------------------------------------------------------------------- sampling


def _frames(container: Any, stream: Any, clock: _Clock, spec: VideoSpec, start: float, end: float | None):
    """Yield ``(time, index, av.VideoFrame)`` for the frames the sampling picks in ``[start, end)``."""
    if spec.frame_sampling == "scene":
        # From the stream's start, on past the span's end: _scene seeks and stops it.
        yield from _scene(_Decoder(container, stream, clock, spec, 0.0, None), spec, start, end)
        return
    sampler = {"interval": _interval, "keyframes": _keyframes}[spec.frame_sampling]
    yield from sampler(_Decoder(container, stream, clock, spec, start, end), spec, start)


class _Decoder:
    """A stream's frames in presentation order from ``start``, ``(time, index, frame)``,
    with the interval sampler's hooks: ``interval`` (the grid k*T it samples; frames
    shown at none of its points are not decoded when FFmpeg can drop them) and
    :meth:`seek_to` (jump ahead to a keyframe)."""

    def __init__(self, container: Any, stream: Any, clock: _Clock, spec: VideoSpec, start: float, end: float | None):
        self.container, self.stream, self.clock, self.end = container, stream, clock, end
        self.ctx = stream.codec_context
        # Frame + slice threads, as many as the decode task reserved CPUs (pipeline.py):
        # more would oversubscribe a node whose every CPU runs a decode task.
        stream.thread_type = "AUTO"
        self.ctx.thread_count = spec.decode_threads
        self.keyframes_only = spec.frame_sampling == "keyframes"
        self.interval = spec.frame_interval if spec.frame_sampling == "interval" else None
        self._seek: float | None = None
        self.seen: list[int] = []  # sorted pts of the packets demuxed since the start or the last seek
        self.from_start = True  # packet ranks are frame indexes only while read from the start
        self.fresh = True  # nothing demuxed yet: the stream's start needs no seek
        self._need: float | None = None  # after start_at: the first frame must start at or before this
        self._retreats = 0
        self.start_at(start)

    def start_at(self, seconds: float) -> None:
        """Decode every frame from ``seconds`` on (the stream's start when <= 0): seek to the
        keyframe at or before it.  When the first frame then comes later (without an index,
        FFmpeg's seek in MPEG-TS can land past a keyframe, and the decoder waits for the
        next one), seek again SEEK_BACK_S earlier, doubling, down to the stream's start."""
        if seconds <= 0 and self.fresh:
            return
        self._need, self._retreats = (seconds if seconds > 0 else None), 0
        self._jump(max(seconds, 0.0))

    def _retreat(self) -> None:
        self._retreats += 1
        target = self._need - SEEK_BACK_S * 2 ** (self._retreats - 1)
        if target <= 0:
            self._need, target = None, 0.0  # from the stream's start: its first frame is the first there is
        self._jump(target)

    def _jump(self, seconds: float) -> None:
        pts = int(seconds / self.clock.time_base) + self.clock.start_pts
        self.container.seek(pts, backward=True, any_frame=False, stream=self.stream)
        self.seen, self.from_start = [], False

    def _index(self, pts: int) -> int:
        if not self.from_start:
            return self.clock.estimated_index(pts)
        return bisect.bisect_left(self.seen, pts)

    def _shown_at_no_target(self, pts: int) -> bool:
        """True when the frame ``pts`` is on screen at no k*T: a later frame already
        demuxed (a B-frame's forward reference) starts before the next target.  Exact
        for any frame rate, variable included; without a later frame known, False.
        Only for interval sampling (``self.interval`` set)."""
        later = bisect.bisect_right(self.seen, pts)
        if later == len(self.seen) or later == 1:
            return False  # the last frame known, or the first: it may be what the first target shows
        t, t_next = self.clock.seconds(pts), self.clock.seconds(self.seen[later])
        # Slack on both sides: deciding "shown" wrongly only costs one decoded frame.
        k = math.ceil((t - 1e-6) / self.interval)
        return k * self.interval >= t_next + 1e-6

    def seek_to(self, seconds: float) -> None:
        self._seek = seconds

    def __iter__(self) -> Iterator[tuple[float, int, Any]]:
        clock = self.clock
        while True:
            jumped = False
            for packet in self.container.demux(self.stream):
                self.fresh = False
                if packet.pts is not None:
                    bisect.insort(self.seen, packet.pts)
                    if self.keyframes_only and not packet.is_keyframe:
                        continue  # never decoded: keyframes need no other frame
                    if self.interval is not None:
                        # NONREF drops the frame only if no other frame depends on it.
                        self.ctx.skip_frame = "NONREF" if self._shown_at_no_target(packet.pts) else "DEFAULT"
                for frame in packet.decode():  # the last, empty packet flushes the decoder
                    if frame.pts is None or (self.keyframes_only and not frame.key_frame):
                        continue
                    t = clock.seconds(frame.pts)
                    if self._need is not None:
                        if t > self._need + 1e-9:  # landed past the time asked for
                            self._retreat()
                            jumped = True
                            break
                        self._need = None
                    if self.end is not None and t >= self.end:
                        return
                    yield t, self._index(frame.pts), frame
                    if self._seek is not None:
                        self._jump(self._seek)
                        self._seek = None
                        jumped = True
                        break
                if jumped:
                    break
            if not jumped:
                if self._need is None:
                    return
                self._retreat()  # the seek landed past the last frame: not one frame came


def _keyframes(frames: _Decoder, spec: VideoSpec, start: float):
    for t, index, frame in frames:
        if t >= start:
            yield t, index, frame


def _interval(frames: _Decoder, spec: VideoSpec, start: float):
    """The frames shown at k*T in ``[start, end)``: for each target the last frame starting at or before it."""
    interval, end = spec.frame_interval, frames.end
    # Targets are k*T rounded to the nanosecond, so spans that meet at a target agree on it.
    k = math.ceil(round(start / interval, 6))
    target = round(k * interval, 9)
    # A span owns its targets; a frame on screen since before the span's first target
    # that was also on screen at the previous span's last target is that span's row.
    before_span = round((k - 1) * interval, 9) if start > 0 else -math.inf
    previous: tuple[float, int, Any] | None = None
    emitted = None  # pts of the frame emitted last: a frame shown at several targets is emitted once
    sought = -math.inf  # the target of the last seek: at most one seek per target, so reading always advances

    def advance() -> bool:
        nonlocal k, target
        k += 1
        target = round(k * interval, 9)
        return end is None or target < end - 1e-9

    for t, index, frame in frames:
        while target < t - 1e-9:
            chosen = previous or (t, index, frame)  # before the first frame: the first frame
            if chosen[2].pts != emitted and chosen[0] > before_span + 1e-9:
                emitted = chosen[2].pts
                yield chosen
            if not advance():
                return
        if abs(target - t) <= 1e-9:
            if frame.pts != emitted:
                emitted = frame.pts
                yield t, index, frame
            if not advance():
                return
        previous = (t, index, frame)
        if target - t >= SEEK_MIN_GAP_S and target > sought:
            if frames.clock.keyframe_after(t, target) is not None:
                # FFmpeg lands on the last keyframe at or before the target; the frames from
                # there to the target are decoded, the one on screen at the target is kept.
                sought = target
                frames.seek_to(sought)
                previous = None
    # The last frame stays on screen to the end: a target before the end shows it.
    if previous is not None and previous[2].pts != emitted and previous[0] > before_span + 1e-9:
        until = frames.clock.duration if frames.clock.duration is not None else frames.clock.end_of(previous)
        if target < until and (end is None or target < end):
            yield previous


def _cuts(frames: _Decoder, threshold: float, known: bool) -> Iterator[tuple[float, int, Any, bool | None]]:
    """``(time, index, frame, starts_a_shot)`` for each frame, FLASH_FRAMES frames late.

    A cut is a luma-histogram jump above ``threshold`` from the frame before that is
    still there FLASH_FRAMES frames later: a flash or a two-frame glitch, whose
    histogram returns to what it was, is not a cut (tools/bench_scene.py measures
    both rules).  From the stream's start (``known``) the first frame starts a shot.
    Otherwise (after a seek) ``starts_a_shot`` is None until the rule's state is known:
    it is "the last frame that was no flash", one of the FLASH_FRAMES + 1 frames before
    (a flash lasts at most FLASH_FRAMES frames), so a frame within ``threshold`` of each
    of them is no jump in any history, and from it on every flag is the unsplit run's."""
    before = None  # histogram of the frame before the first pending one
    synced = known
    recent: deque[np.ndarray] = deque(maxlen=FLASH_FRAMES + 1)  # the frames decided last, while not synced
    pending: deque[tuple[float, int, Any, np.ndarray]] = deque()

    def decide(lookahead: np.ndarray | None) -> tuple[float, int, Any, bool | None]:
        nonlocal before, synced
        t, index, frame, hist = pending.popleft()
        if not synced:
            if len(recent) == recent.maxlen and all(histogram_distance(hist, h) <= threshold for h in recent):
                synced, before = True, hist
                return t, index, frame, False
            recent.append(hist)
            return t, index, frame, None
        if before is None:
            before = hist
            return t, index, frame, True
        jump = histogram_distance(hist, before) > threshold
        lasts = lookahead is None or histogram_distance(lookahead, before) > threshold
        if not jump or lasts:
            before = hist
        # else a flash: the frames after it are compared with the frame before it
        return t, index, frame, jump and lasts

    for t, index, frame in frames:
        pending.append((t, index, frame, _luma_histogram(frame)))
        if len(pending) > FLASH_FRAMES:
            yield decide(pending[-1][3])
    while pending:
        yield decide(pending[-1][3] if len(pending) > 1 else None)


def _scene(frames: _Decoder, spec: VideoSpec, start: float, end: float | None):
    """First frame of every shot; in a shot with a frame max_scene_seconds or more after
    its first, also the first frame at or after each k*T (interval sampling's grid) at
    least T/2 after the shot's first frame (a shot's extras are held until it is that long).

    Spans give the unsplit rows: a decision at t needs the cuts of the max(max_scene_seconds,
    T/2) seconds before it (an older shot start is long and far enough: no more is needed),
    so a span decodes from that much plus SCENE_WARMUP_S before its start, and on past its
    end while a held frame or a cut flag waits; when the cut state is not known by then it
    starts again from twice the warm-up earlier, at worst from the stream's start."""
    reach = max(spec.max_scene_seconds, spec.frame_interval / 2)
    warmup = SCENE_WARMUP_S
    while True:
        since = start - reach - warmup if start > 0 else 0.0
        frames.start_at(since)
        cuts = _cuts(frames, spec.scene_threshold, known=since <= 0)
        try:
            if (yield from _scene_pass(cuts, spec, start, end)):
                return
        finally:
            cuts.close()
        warmup *= 2


def _scene_pass(cuts: Iterator[tuple[float, int, Any, bool | None]], spec: VideoSpec, start: float,
                end: float | None):  # fmt: skip
    """One try of :func:`_scene`: True when done, False, before yielding anything, when the
    span's first frame comes before the state its decisions need."""
    interval, longest = spec.frame_interval, spec.max_scene_seconds
    reach = max(longest, interval / 2)
    shot: float | None = None  # the current shot's first frame; None: earlier than ``known_from``
    known_from: float | None = None  # time of the first frame with a known cut flag
    previous: float | None = None  # time of the frame before
    checked = False  # the span's first frame was found decidable
    held: list[tuple[float, int, Any]] = []  # extras of the current shot, not yet known to be long
    for t, index, frame, cut in cuts:
        past = end is not None and t >= end
        if cut is not None and known_from is None:
            known_from = t
        if t >= start and not checked:
            if past:
                return True  # no frame in the span
            # An unknown shot start is before known_from: far enough back when the frame
            # before the span's first is at least ``reach`` after it (see _scene).
            if cut is None or not cut and shot is None and (previous is None or previous - known_from < reach):
                return False
            checked = True
        if cut is None:
            previous = t
            continue
        if cut:
            held, shot = [], t  # a cut: the shot before was short
            if past:
                return True
            if t >= start:
                yield t, index, frame
            previous = t
            continue
        if held and t - shot >= longest:
            yield from held
            held = []
        if past:
            if not held:
                return True
            previous = t
            continue
        if t >= start and previous is not None and _grid(t, interval) > _grid(previous, interval):
            if shot is None or _grid(t, interval) * interval >= shot + interval / 2 - 1e-9:
                if shot is None or t - shot >= longest:
                    yield t, index, frame
                else:
                    held.append((t, index, frame))
        previous = t
    return True  # the stream's end: a shot still held was short


def _grid(t: float, interval: float) -> int:
    """The number of the last point k*T at or before ``t`` (to a millionth of T)."""
    return math.floor(round(t / interval, 6))


def video_rows(
    file: BinaryIO,
    video: VideoSpec,
    decode: DecodeSpec,
    start: float = 0.0,
    end: float | None = None,
    reads: StorageReads | None = None,
) -> Iterator[FrameRow]:
    """The rows of one video (or of its span ``[start, end)`` seconds): frames, then at most one error.

    Never raises for bad input: a file that cannot be opened yields one error row;
    damage mid-stream yields the frames before it, then an error row.  When
    ``reads`` (the file's storage calls) saw a storage failure, the error row is a
    ``shard_read_error``, which a resume retries.
    """
    try:
        try:
            yield from _video_rows(file, video, decode, start, end)
        except DecodeError as exc:
            yield FrameRow(kind=exc.kind, error=exc.message)
    except OSError as exc:  # FFmpeg re-raises what the file object raised
        if reads is None or not reads.failed:
            raise
        yield FrameRow(kind=schema.SHARD_READ_ERROR, error=f"{type(exc).__name__}: {exc}")


def _video_rows(file: BinaryIO, video: VideoSpec, decode: DecodeSpec, start: float, end: float | None):
    try:
        container, stream = _open(file)
    except DecodeError as exc:
        if exc.kind == schema.NOT_A_VIDEO and _moov_missing(file):
            exc = DecodeError(schema.TRUNCATED_VIDEO, f"the MP4 index (moov atom) is missing: {exc.message}")
        yield FrameRow(kind=exc.kind, error=exc.message)
        return
    with container:
        width, height = stream.codec_context.width, stream.codec_context.height
        if width * height > decode.max_image_pixels:
            yield FrameRow(
                kind=schema.DECOMPRESSION_BOMB,
                error=f"frames are {width}x{height} = {width * height} pixels, above the limit of "
                f"{decode.max_image_pixels}",
            )
            return
        clock = _Clock(container, stream)
        sampled = 0
        try:
            for t, index, frame in _frames(container, stream, clock, video, start, end):
                if sampled >= video.max_frames_per_video:
                    yield FrameRow(
                        kind=schema.FRAME_LIMIT_REACHED,
                        error=f"stopped at {t:.3f}s after {sampled} frames (max_frames_per_video)",
                        duration=clock.duration,
                    )
                    return
                yield _frame_row(frame, t, index, clock.duration, decode)
                sampled += 1
        except av.error.FFmpegError as exc:
            yield FrameRow(kind=schema.VIDEO_DECODE_FAILED, error=f"after {sampled} frames: {exc}",
                           duration=clock.duration)  # fmt: skip


def _frame_row(frame: Any, t: float, index: int, duration: float | None, decode: DecodeSpec) -> FrameRow:
    turns = round((frame.rotation or 0) / 90) % 4  # counter-clockwise quarter turns
    width, height = (frame.height, frame.width) if turns % 2 else (frame.width, frame.height)
    if decode.mode == "fast":
        # One swscale pass from the decoder's YUV straight to the model's size (area
        # averaging), instead of a full-size RGB frame and a bicubic resize of it.
        size = (decode.height, decode.width) if turns % 2 else (decode.width, decode.height)
        small = frame.to_ndarray(width=size[0], height=size[1], format="rgb24", interpolation="AREA")
        pixels = np.ascontiguousarray(np.rot90(small, turns)) if turns else small
    else:
        rgb = frame.to_ndarray(format="rgb24")
        if turns:
            rgb = np.rot90(rgb, turns)
        pixels = resize_rgb(Image.fromarray(np.ascontiguousarray(rgb)), decode)
    return FrameRow(pixels=pixels, width=width, height=height, time=t, index=index, duration=duration)


# --------------------------------------------------------------------------- tables


def frame_table(base: pa.Table, rows: list[FrameRow], decode: DecodeSpec) -> pa.Table:
    """Decode-stage table for ``rows`` of the one-row reader table ``base`` (the video's row)."""
    n = len(rows)
    src = base.column(schema.SOURCE)[0].as_py()
    key = base.column(schema.KEY)[0].as_py()
    repeated = base.take(pa.array([0] * n, pa.int64()))
    pixels = np.zeros((n, decode.height, decode.width, 3), dtype=np.uint8)
    for i, r in enumerate(rows):
        if r.pixels is not None:
            pixels[i] = r.pixels
    replaced = {
        schema.ID: pa.array([frame_id(src, key, r.time) if r.kind is None else f"{src}::{key}" for r in rows]),
        schema.STATUS: pa.array([schema.STATUS_OK if r.kind is None else schema.STATUS_ERROR for r in rows]),
        schema.ERROR_KIND: pa.array([r.kind for r in rows], pa.string()),
        schema.ERROR: pa.array([r.error for r in rows], pa.string()),
    }
    frames = {
        schema.FRAME_TIME: [r.time for r in rows],
        schema.FRAME_INDEX: [r.index for r in rows],
        schema.VIDEO_DURATION: [r.duration for r in rows],
    }
    return decoded_table(repeated, replaced, pixels, [r.width for r in rows], [r.height for r in rows], frames)


def _tables(base: pa.Table, rows: Iterator[FrameRow], decode: DecodeSpec, batch_rows: int) -> Iterator[pa.Table]:
    buf: list[FrameRow] = []
    for row in rows:
        buf.append(row)
        if len(buf) >= batch_rows:
            yield frame_table(base, buf, decode)
            buf = []
    if buf:
        yield frame_table(base, buf, decode)


def decode_with_videos(batch: pa.Table, decode: DecodeSpec, video: VideoSpec, batch_rows: int) -> Iterator[pa.Table]:
    """Decode a reader batch whose rows may be videos (tar members): images as
    :func:`decode_batch` does, each ok video row expanded into its frame rows."""
    media = batch.column(schema.MEDIA).to_pylist() if schema.MEDIA in batch.column_names else [None] * batch.num_rows
    statuses = batch.column(schema.STATUS).to_pylist()
    videos = [i for i, (m, s) in enumerate(zip(media, statuses, strict=True)) if m == "video" and s == schema.STATUS_OK]
    if not videos:
        yield decode_batch(batch, decode)
        return
    is_video = set(videos)
    others = [i for i in range(batch.num_rows) if i not in is_video]
    if others:
        yield decode_batch(batch.take(pa.array(others, pa.int64())), decode)
    for i in videos:
        base = batch.slice(i, 1)
        data = base.column(schema.IMAGE)[0].as_py()
        yield from _tables(base, video_rows(io.BytesIO(data), video, decode), decode, batch_rows)


def read_video_shard(
    shard: ShardRef, spec: InputSpec, storage: StorageOptions, decode: DecodeSpec, video: VideoSpec, batch_rows: int
) -> Iterator[pa.Table]:
    """Decode-stage tables of one video file, or of its span ``[shard.start_s, shard.end_s)``."""
    base = pa.Table.from_pylist([video_file_row(shard, spec)], schema=schema.read_schema(spec.passthrough_columns))
    end = shard.end_s or None
    reads = StorageReads()
    try:
        fs, path = filesystem_for(shard.uri, storage)
        if reads.call(fs.size, path) == 0:
            rows: Iterator[FrameRow] = iter([FrameRow(kind=schema.EMPTY_FILE, error="the file is empty (0 bytes)")])
            yield from _tables(base, rows, decode, batch_rows)
            return
        f = reads.call(fs.open, path, "rb", block_size=READ_BLOCK_BYTES, cache_type="readahead")
        with TracedFile(f, reads) as traced:
            yield from _tables(base, video_rows(traced, video, decode, shard.start_s, end, reads), decode, batch_rows)
    except OSError as exc:
        if not reads.failed:
            raise
        failed = FrameRow(kind=schema.SHARD_READ_ERROR, error=f"{type(exc).__name__}: {exc}")
        yield from _tables(base, iter([failed]), decode, batch_rows)
