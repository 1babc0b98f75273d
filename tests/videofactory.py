"""Real videos for tests, encoded with PyAV's own encoders (H.264 via libx264, VP9 via libvpx).

Shots are slow pans across scikit-image photos, so consecutive frames differ a
little within a shot and a lot at a cut; the cut times are known exactly.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from fractions import Fraction

import av
import numpy as np
from PIL import Image

CONTAINERS = {"h264": ("mp4", "libx264"), "vp9": ("webm", "libvpx-vp9")}


def pan_frames(photo: np.ndarray, count: int, size: tuple[int, int], shift: int = 1) -> list[np.ndarray]:
    """``count`` frames of ``size`` (width, height) panning right across ``photo``."""
    width, height = size
    base = np.asarray(Image.fromarray(photo).resize((width * 2, height)))
    return [np.ascontiguousarray(base[:, (i * shift) % width : (i * shift) % width + width]) for i in range(count)]


def shots(photos: Sequence[np.ndarray], seconds: Sequence[float], fps: int, size: tuple[int, int]) -> list[np.ndarray]:
    """Consecutive shots, one per photo, each ``seconds[i]`` long: cuts at the running sums."""
    frames: list[np.ndarray] = []
    for photo, length in zip(photos, seconds, strict=True):
        frames += pan_frames(photo, round(length * fps), size)
    return frames


def encode(
    frames: Sequence[np.ndarray],
    codec: str = "h264",
    fps: int = 10,
    gop: int | None = None,
    times: Sequence[float] | None = None,
    rotation: int | None = None,
    pix_fmt: str | None = None,
    time_base: int = 1000,
) -> bytes:
    """Encode RGB frames; returns the file's bytes.

    ``times``: presentation times in seconds (variable frame rate), else ``i / fps``.
    ``gop``: keyframe interval in frames.  ``rotation``: display-matrix rotation in
    degrees (counter-clockwise), as phones write it.  ``pix_fmt``: e.g. ``yuv420p10le``.
    ``time_base``: ticks per second of ``times``.
    """
    fmt, encoder = CONTAINERS[codec]
    buf = io.BytesIO()
    height, width = frames[0].shape[:2]
    with av.open(buf, mode="w", format=fmt) as container:
        stream = container.add_stream(encoder, rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = pix_fmt or "yuv420p"
        options = {"g": str(gop or fps * 2)}
        if codec == "h264":
            options.update({"preset": "veryfast", "bf": "2"})
        else:
            options.update({"deadline": "realtime", "cpu-used": "8"})
        if gop:
            options["keyint_min"] = str(gop)
        stream.options = options
        if times is not None:
            stream.codec_context.time_base = Fraction(1, time_base)
            stream.time_base = Fraction(1, time_base)
        if rotation:
            stream.set_display_rotation(rotation)
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            if times is not None:
                frame.pts = round(times[i] * time_base)
                frame.time_base = Fraction(1, time_base)
            else:
                frame.pts = i
                frame.time_base = Fraction(1, fps)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def audio_only(seconds: float = 1.0) -> bytes:
    """An MP4 holding one AAC audio stream and no video."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("aac", rate=16000)
        samples = int(16000 * seconds)
        tone = (0.2 * np.sin(np.arange(samples) * 2 * np.pi * 440 / 16000)).astype(np.float32)[None, :]
        for start in range(0, samples, 1024):
            frame = av.AudioFrame.from_ndarray(tone[:, start : start + 1024], format="fltp", layout="mono")
            frame.sample_rate = 16000
            frame.pts = start
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def remux(data: bytes, fmt: str, options: dict[str, str] | None = None) -> bytes:
    """The same video stream in another container (``matroska``, ``mpegts``, ...), not re-encoded."""
    out = io.BytesIO()
    with av.open(io.BytesIO(data)) as src, av.open(out, mode="w", format=fmt, options=options or {}) as dst:
        stream = dst.add_stream_from_template(src.streams.video[0])
        for packet in src.demux(src.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                dst.mux(packet)
    return out.getvalue()


CUES_ID = b"\x1c\x53\xbb\x6b"  # Matroska's Cues element: the seek index


def _vint(value: int, length: int) -> bytes:
    """EBML's variable-length integer in ``length`` bytes: a 1 marking the length, then the value."""
    return ((1 << (7 * length)) | value).to_bytes(length, "big")


def mkv_without_cues(data: bytes) -> bytes:
    """``data`` as a Matroska file with no seek index, its duration kept: the Cues element
    and the SeekHead's entry naming it are overwritten by Void elements (0xEC) of the same
    length, what a recording cut off before its index was written looks like to a demuxer."""
    mkv = bytearray(remux(data, "matroska", {"write_crc32": "0"}))  # no checksums to mend
    assert mkv.count(CUES_ID) == 2, "expected a SeekHead entry naming the Cues, then the Cues"
    at = mkv.rindex(CUES_ID)
    length = 9 - mkv[at + 4].bit_length()  # of the size vint: its leading zeros + 1
    size = int.from_bytes(mkv[at + 4 : at + 4 + length], "big") & ((1 << (7 * length)) - 1)
    mkv[at : at + 4 + length] = b"\xec" + _vint(size, length + 3)
    seek = mkv.index(b"\x53\xab\x84" + CUES_ID) - 3  # the Seek element (0x4DBB, 1-byte size) holding it
    assert mkv[seek : seek + 2] == b"\x4d\xbb" and mkv[seek + 2] & 0x80, "expected a Seek with a 1-byte size"
    length = mkv[seek + 2] & 0x7F
    mkv[seek : seek + 3 + length] = b"\xec" + _vint(length, 2) + bytes(length)
    assert CUES_ID not in mkv
    return bytes(mkv)
