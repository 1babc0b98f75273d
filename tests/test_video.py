"""workers/video.py against real videos made with PyAV's encoders (tests/videofactory.py).

Every sampled frame is held against a plain PyAV loop that decodes every frame:
the frame sampled for a time must be the very frame that loop shows then.
"""

from __future__ import annotations

import io
import json
import os
import random
import signal
import struct
import subprocess
import sys
import time
from dataclasses import replace

import av
import numpy as np
import pytest
from helpers import driver_env, output_ids, read_markers, read_output, tar_bytes
from videofactory import audio_only, encode, pan_frames, remux, shots

from workers import schema
from workers.config import DecodeSpec, StorageOptions, VideoSpec
from workers.decode import resize_rgb
from workers.listing import VIDEO, list_shards
from workers.video import FrameRow, histogram_distance, video_rows

SIZE = (96, 64)  # width, height of the test videos
DECODE = DecodeSpec(height=32, width=32, mode="exact")
CUTS = [2.0, 3.5, 6.5]  # shots of 2.0, 1.5, 3.0 and 1.5 s
LENGTHS = [2.0, 1.5, 3.0, 1.5]


@pytest.fixture(scope="module")
def stills(photos):
    return [photos[n] for n in ("astronaut", "coffee", "chelsea", "rocket")]


@pytest.fixture(scope="module")
def clips(stills) -> dict[str, bytes]:
    frames = shots(stills, LENGTHS, fps=10, size=SIZE)
    return {
        "h264": encode(frames, "h264", fps=10),
        "vp9": encode(frames, "vp9", fps=10),
        "long_gop": encode(frames, "h264", fps=10, gop=50),
        "short_gop": encode(frames, "h264", fps=10, gop=5),
    }


def plain_frames(data: bytes) -> list[tuple[float, np.ndarray, bool]]:
    """What users write: decode every frame, ``(time from the stream start, RGB, keyframe)``."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        start = stream.start_time or 0
        return [
            (float((f.pts - start) * stream.time_base), f.to_ndarray(format="rgb24"), f.key_frame)
            for f in container.decode(stream)
        ]


def duration_of(data: bytes) -> float:
    """The stream's duration from its header, as PyAV reports it: the last frame is shown until then."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        if stream.duration:
            return float(stream.duration * stream.time_base)
        return container.duration / 1_000_000  # WebM keeps it in the container only


def shown_at(frames, t: float) -> int:
    """Index of the frame on screen at time ``t``: the last that starts at or before it."""
    return max(i for i, (ft, _rgb, _k) in enumerate(frames) if ft <= t + 1e-9)


def rows_of(data: bytes, spec: VideoSpec, decode: DecodeSpec = DECODE, **kwargs) -> list[FrameRow]:
    return list(video_rows(io.BytesIO(data), spec, decode, **kwargs))


def pixels(rgb: np.ndarray, decode: DecodeSpec = DECODE) -> np.ndarray:
    from PIL import Image

    return resize_rgb(Image.fromarray(rgb), decode)


# --------------------------------------------------------------------------- interval


@pytest.mark.parametrize("clip", ["h264", "vp9", "long_gop", "short_gop"])
@pytest.mark.parametrize("interval", [1.0, 0.25, 3.0])
def test_interval_frames_are_the_frames_shown_at_each_multiple_of_the_interval(clips, clip, interval):
    data = clips[clip]
    truth = plain_frames(data)
    rows = rows_of(data, VideoSpec(frame_interval=interval))
    expected = sorted({shown_at(truth, t) for t in np.arange(0, duration_of(data) - 1e-9, interval)})
    assert [r.kind for r in rows] == [None] * len(rows)
    assert [r.index for r in rows] == expected
    assert [r.time for r in rows] == pytest.approx([truth[i][0] for i in expected])
    for r, i in zip(rows, expected, strict=True):
        assert np.array_equal(r.pixels, pixels(truth[i][1])), (clip, r.time)
    assert {(r.width, r.height) for r in rows} == {SIZE}
    assert [r.duration for r in rows] == pytest.approx([8.0] * len(rows), abs=0.11)  # the header may add a frame


def test_sparse_sampling_seeks_to_keyframes_and_still_gives_the_shown_frames(clips, monkeypatch):
    """With a keyframe every 0.5 s and a frame every 3 s, the sampler seeks; the frames stay the true ones."""
    from workers import video

    seeks = []
    real = video._Decoder._jump
    monkeypatch.setattr(video._Decoder, "_jump", lambda self, s: (seeks.append(s), real(self, s))[1])
    data = clips["short_gop"]
    truth = plain_frames(data)
    rows = rows_of(data, VideoSpec(frame_interval=3.0))
    assert seeks, "no seek happened"
    assert [r.time for r in rows] == pytest.approx([0.0, 3.0, 6.0])
    for r in rows:
        assert np.array_equal(r.pixels, pixels(truth[shown_at(truth, r.time)][1]))


def test_variable_frame_rate_picks_the_frame_on_screen(stills):
    rng = np.random.default_rng(7)
    times = np.cumsum(rng.uniform(0.03, 0.4, 40))
    times = np.round(times - times[0], 3)
    frames = pan_frames(stills[0], len(times), SIZE, shift=3)
    data = encode(frames, "h264", times=list(times))
    truth = plain_frames(data)
    assert len({round(b - a, 3) for (a, _, _), (b, _, _) in zip(truth, truth[1:], strict=False)}) > 5  # really VFR
    rows = rows_of(data, VideoSpec(frame_interval=0.5))
    expected = sorted({shown_at(truth, t) for t in np.arange(0, duration_of(data) - 1e-9, 0.5)})
    assert [r.time for r in rows] == pytest.approx([truth[i][0] for i in expected])
    assert [r.index for r in rows] == expected
    for r, i in zip(rows, expected, strict=True):
        assert np.array_equal(r.pixels, pixels(truth[i][1]))


def test_rotation_metadata_turns_the_frame_upright(stills):
    frames = pan_frames(stills[1], 10, SIZE)
    flat = rows_of(encode(frames, "h264"), VideoSpec())
    turned = rows_of(encode(frames, "h264", rotation=90), VideoSpec())
    assert (flat[0].width, flat[0].height) == SIZE
    assert (turned[0].width, turned[0].height) == (SIZE[1], SIZE[0])
    truth = plain_frames(encode(frames, "h264", rotation=90))
    assert np.array_equal(turned[0].pixels, pixels(np.rot90(truth[0][1])))  # counter-clockwise, as the matrix says


def test_ten_bit_video_decodes(stills):
    data = encode(pan_frames(stills[2], 10, SIZE), "h264", pix_fmt="yuv420p10le")
    with av.open(io.BytesIO(data)) as c:
        assert "10" in c.streams.video[0].codec_context.pix_fmt
    (row,) = rows_of(data, VideoSpec())
    assert row.kind is None and row.pixels.shape == (32, 32, 3) and row.pixels.mean() > 10


# --------------------------------------------------------------------------- keyframes, scenes


def test_keyframes_mode_gives_exactly_the_keyframes(clips):
    for clip in ("h264", "vp9", "short_gop"):
        truth = plain_frames(clips[clip])
        rows = rows_of(clips[clip], VideoSpec(frame_sampling="keyframes"))
        expected = [i for i, (_t, _rgb, key) in enumerate(truth) if key]
        assert [r.index for r in rows] == expected, clip
        for r, i in zip(rows, expected, strict=True):
            assert np.array_equal(r.pixels, pixels(truth[i][1]))


def scene_videos(stills) -> list[tuple[str, bytes, list[float]]]:
    """Test videos with known cuts: (name, bytes, cut times)."""
    out = []
    for codec in ("h264", "vp9"):
        out.append((f"{codec}-4-shots", encode(shots(stills, LENGTHS, 10, SIZE), codec, fps=10), CUTS))
    order = [stills[i] for i in (2, 0, 3, 1, 2, 3)]
    lengths = [1.0, 0.7, 2.2, 0.5, 1.6, 1.0]
    cuts = list(np.round(np.cumsum(lengths)[:-1], 3))
    out.append(("h264-6-shots-25fps", encode(shots(order, lengths, 25, SIZE), "h264", fps=25, gop=100), cuts))
    return out


def test_scene_mode_finds_every_cut_within_a_quarter_second(stills):
    found = missed = false = 0
    for name, data, cuts in scene_videos(stills):
        rows = rows_of(data, VideoSpec(frame_sampling="scene", max_scene_seconds=100))
        starts = [r.time for r in rows][1:]  # the first row is the video's first frame
        hits = [c for c in cuts if any(abs(s - c) <= 0.25 for s in starts)]
        found += len(hits)
        missed += len(cuts) - len(hits)
        false += sum(not any(abs(s - c) <= 0.25 for c in cuts) for s in starts)
        assert rows[0].time == 0.0, name
    precision, recall = found / (found + false), found / (found + missed)
    print(f"scene cuts: precision {precision:.2f}, recall {recall:.2f} ({found} found, {missed} missed, {false} false)")
    assert (precision, recall) == (1.0, 1.0)


def test_a_flash_inside_a_shot_is_not_a_cut_but_a_cut_after_it_is(stills):
    """Two bright frames in the middle of a shot: no cut at them, nor where they end."""
    frames = pan_frames(stills[0], 30, SIZE) + pan_frames(stills[1], 20, SIZE)
    for i in (12, 13):
        frames[i] = np.clip(frames[i].astype(np.int16) + 90, 0, 255).astype(np.uint8)
    rows = rows_of(encode(frames, "h264", fps=10), VideoSpec(frame_sampling="scene", max_scene_seconds=100))
    assert [r.time for r in rows] == pytest.approx([0.0, 3.0])


def test_interval_sampling_leaves_non_reference_frames_undecoded(clips, monkeypatch):
    """At one frame per second of a 10 fps clip with B-frames, most B-frames are on screen
    at no target: they never reach the decoder's output (the frames kept stay exact above)."""
    from workers import video

    decoded = []
    real = video._Decoder.__iter__

    def counting(self):
        for item in real(self):
            decoded.append(item[0])
            yield item

    monkeypatch.setattr(video._Decoder, "__iter__", counting)
    data = clips["h264"]
    rows = rows_of(data, VideoSpec(frame_interval=1.0))
    total = len(plain_frames(data))
    assert len(rows) == 8
    assert len(decoded) < 0.75 * total, (len(decoded), total)


def test_scene_mode_adds_interval_frames_inside_long_shots(clips):
    rows = rows_of(clips["h264"], VideoSpec(frame_sampling="scene", max_scene_seconds=2.5, frame_interval=1.0))
    # Shots start at 0, 2, 3.5 and 6.5; only the 3-second shot is longer than 2.5 s: its extras
    # are on interval sampling's grid (whole seconds), at least half an interval after its start.
    assert [r.time for r in rows] == pytest.approx([0.0, 2.0, 3.5, 4.0, 5.0, 6.0, 6.5])


def test_histogram_distance_bounds():
    a = np.array([1.0, 0.0])
    assert histogram_distance(a, a) == 0.0 and histogram_distance(a, np.array([0.0, 1.0])) == 1.0


# --------------------------------------------------------------------------- limits and bad input


def test_max_frames_per_video_ends_with_one_frame_limit_row(clips):
    rows = rows_of(clips["h264"], VideoSpec(frame_interval=0.5, max_frames_per_video=3))
    assert [r.kind for r in rows] == [None, None, None, schema.FRAME_LIMIT_REACHED]
    assert "3 frames" in rows[-1].error


def test_frames_above_the_pixel_limit_are_refused_from_the_header(clips):
    rows = rows_of(clips["h264"], VideoSpec(), replace(DECODE, max_image_pixels=SIZE[0] * SIZE[1] - 1))
    assert [r.kind for r in rows] == [schema.DECOMPRESSION_BOMB]
    assert f"{SIZE[0]}x{SIZE[1]}" in rows[0].error


def _corrupt_middle(data: bytes) -> bytes:
    """The same MP4 with the middle of its media data overwritten by noise (index intact)."""
    start = data.index(b"mdat") + 8
    end = start + (len(data) - start) // 2
    noisy = bytearray(data)
    noisy[start + (end - start) // 2 : end] = np.random.default_rng(3).bytes(end - start - (end - start) // 2)
    return bytes(noisy)


@pytest.mark.parametrize(
    ("case", "kind"),
    [
        ("text named .mp4", schema.NOT_A_VIDEO),
        ("moov atom missing", schema.TRUNCATED_VIDEO),
        ("audio only", schema.NO_VIDEO_STREAM),
    ],
)
def test_broken_videos_become_one_error_row(clips, case, kind):
    data = {
        "text named .mp4": b"this is a text file, not a video\n" * 20,
        "moov atom missing": clips["h264"][: len(clips["h264"]) // 2],  # libx264 MP4: moov at the end
        "audio only": audio_only(),
    }[case]
    rows = rows_of(data, VideoSpec())
    assert [r.kind for r in rows] == [kind], rows
    assert rows[0].error and rows[0].pixels is None


def test_corrupt_packets_mid_stream_keep_the_frames_before(clips):
    data = _corrupt_middle(clips["long_gop"])
    rows = rows_of(data, VideoSpec(frame_interval=0.5))
    good = [r for r in rows if r.kind is None]
    assert good and good[0].time == 0.0
    # Either FFmpeg reports the damage (one error row last) or it conceals it; never a crash,
    # and the frames before the damage are exactly the true ones.
    assert all(r.kind is None for r in rows[:-1])
    assert rows[-1].kind in (None, schema.VIDEO_DECODE_FAILED)
    truth = plain_frames(clips["long_gop"])
    assert np.array_equal(good[0].pixels, pixels(truth[0][1]))


# --------------------------------------------------------------------------- spans


def test_a_large_video_is_split_into_spans_whose_frames_add_up_to_the_whole(tmp_path, stills):
    frames = shots(stills, LENGTHS, fps=10, size=SIZE)
    data = encode(frames, "h264", fps=10, gop=10)
    (tmp_path / "film.MP4").write_bytes(data)
    spec = VideoSpec(frame_interval=0.5, span_seconds=3.0, split_above_bytes=1)
    from workers.config import InputSpec

    shards, stats = list_shards(InputSpec(urls=(str(tmp_path),)), StorageOptions(), video=spec)
    assert [(s.name, s.format, s.start_s, s.end_s) for s in shards] == [
        ("film.MP4.t0", VIDEO, 0.0, 3.0), ("film.MP4.t3", VIDEO, 3.0, 6.0), ("film.MP4.t6", VIDEO, 6.0, 0.0)
    ]  # fmt: skip
    assert (stats.video_files, stats.video_shards) == (1, 3)
    whole = rows_of(data, spec)
    parts = [r for s in shards for r in rows_of(data, spec, start=s.start_s, end=s.end_s or None)]
    assert [r.time for r in parts] == [r.time for r in whole] == pytest.approx(list(np.arange(0, 8, 0.5)))
    assert all(np.array_equal(a.pixels, b.pixels) for a, b in zip(parts, whole, strict=True))
    # Unsplit below the size threshold.
    small, _ = list_shards(InputSpec(urls=(str(tmp_path),)), StorageOptions(), video=VideoSpec())
    assert [(s.name, s.end_s) for s in small] == [("film.MP4", 0.0)]


def _claim_duration(webm: bytes, seconds: float) -> bytes:
    """The WebM with its Segment Info's Duration (EBML 0x4489, a float64 in milliseconds at
    the default timecode scale) claiming ``seconds``: FFmpeg takes it as the duration."""
    at = webm.index(b"\x44\x89\x88") + 3
    return webm[:at] + struct.pack(">d", seconds * 1000) + webm[at + 8 :]


@pytest.mark.parametrize("claim", [4 * 86400.0, 300 * 365 * 86400.0])
def test_an_absurd_duration_in_the_header_is_not_trusted(tmp_path, clips, claim):
    """Four days in a 20 KB file (below any real bitrate) or 300 years: neither splits the
    video into spans nor shows up as its duration; the frames are the honest file's."""
    from workers.config import InputSpec

    honest = clips["vp9"]
    lying = _claim_duration(honest, claim)
    with av.open(io.BytesIO(lying)) as container:
        assert container.duration / 1e6 == pytest.approx(claim)  # FFmpeg believes it
    (tmp_path / "lying.webm").write_bytes(lying)
    spec = VideoSpec(span_seconds=600, split_above_bytes=1)
    shards, _ = list_shards(InputSpec(urls=(str(tmp_path),)), StorageOptions(), video=spec)
    assert [(s.name, s.start_s, s.end_s) for s in shards] == [("lying.webm", 0.0, 0.0)]
    rows, truth = rows_of(lying, spec), rows_of(honest, spec)
    assert [r.kind for r in rows] == [None] * 8
    assert [r.time for r in rows] == [r.time for r in truth]
    assert {r.duration for r in rows} == {None}


def test_an_absurd_frame_rate_gives_one_row_per_target_not_per_frame(stills):
    """100 frames 10 microseconds apart (a header rate of 100,000 fps): one row at 0 s, then
    frame_interval decides, not the frame count; keyframes mode stops at max_frames_per_video."""
    times = [i * 1e-5 for i in range(100)] + [2.0]
    frames = pan_frames(stills[0], len(times), SIZE, shift=2)
    data = encode(frames, "h264", times=times, time_base=100_000)
    rows = rows_of(data, VideoSpec(frame_interval=1.0))
    assert [r.kind for r in rows] == [None] * 3
    assert [r.time for r in rows] == pytest.approx([0.0, 0.00099, 2.0])  # at 1 s the burst's last frame
    capped = rows_of(data, VideoSpec(frame_sampling="scene", max_scene_seconds=1e-4, frame_interval=1e-5,
                                     max_frames_per_video=20))  # fmt: skip
    assert [r.kind for r in capped] == [None] * 20 + [schema.FRAME_LIMIT_REACHED]


# --------------------------------------------------------------------------- through the job


def _video2dataset_tar(clips: dict[str, bytes]) -> bytes:
    """video2dataset's layout: ``<key>.mp4`` + ``<key>.txt`` + ``<key>.json`` per sample."""
    members = []
    for i, (name, data) in enumerate(clips.items()):
        members += [(f"{i:05d}.mp4", data), (f"{i:05d}.txt", name.encode()), (f"{i:05d}.json", b"{}")]
    return tar_bytes(members)


@pytest.mark.slow
def test_cli_videos_from_a_folder_and_a_tar_on_s3_give_one_row_per_second(
    ray_cluster, s3_endpoint, s3_bucket, s3_storage, clips, tmp_path
):
    """The issue's command: videos in an S3 folder and in a tar, interval sampling at 1 s, tiny-random model."""
    import s3fs

    fs = s3fs.S3FileSystem(**s3_storage.fsspec_options())
    folder = {"a.mp4": clips["h264"], "sub/b.WEBM": clips["vp9"], "text.mp4": b"not a video\n" * 50,
              "cut.mp4": clips["h264"][:3000], "sound.mp4": audio_only()}  # fmt: skip
    for name, data in folder.items():
        fs.pipe(f"{s3_bucket}/in/videos/{name}", data)
    fs.pipe(f"{s3_bucket}/in/clips.tar", _video2dataset_tar({"long": clips["long_gop"], "bad": b"\x00" * 4000}))
    cmd = [sys.executable, "-m", "jobs.annotate", "--input", f"s3://{s3_bucket}/in/videos/",
           f"s3://{s3_bucket}/in/clips.tar", "--output", f"s3://{s3_bucket}/out", "--endpoint-url", s3_endpoint,
           "--frame-sampling", "interval", "--frame-interval", "1.0", "--model", "tiny-random",
           "--model-cache-dir", str(tmp_path / "models"), "--max-new-tokens", "3",
           "--passthrough-columns", "txt"]  # fmt: skip
    proc = subprocess.run(cmd, env=driver_env(ray_cluster.get_runtime_context().gcs_address),
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_output(f"s3://{s3_bucket}/out", s3_storage.fsspec_options())
    by_key: dict[str, list[dict]] = {}
    for r in rows:
        by_key.setdefault(r["key"], []).append(r)
    for key in ("a.mp4", "sub/b.WEBM", "00000"):
        frames = sorted(by_key[key], key=lambda r: r["frame_time"])
        assert [r["frame_time"] for r in frames] == pytest.approx([float(t) for t in range(8)]), key
        assert [r["frame_index"] for r in frames] == [10 * t for t in range(8)], key
        assert {r["status"] for r in frames} == {"ok"} and all(isinstance(r["caption"], str) for r in frames)
        assert [r["id"] for r in frames] == [f"{frames[0]['source']}::{key}#t={t}.000" for t in range(8)]
        assert all(r["video_duration"] == pytest.approx(8.0, abs=0.11) for r in frames)
    assert {r["txt"] for r in by_key["00000"]} == {"long"}
    errors = {r["key"]: r["error_kind"] for r in rows if r["status"] == "error"}
    assert errors == {"text.mp4": "not_a_video", "cut.mp4": "truncated_video", "sound.mp4": "no_video_stream",
                      "00001": "not_a_video"}  # fmt: skip
    assert all(r["frame_time"] is None and r["id"] == f"{r['source']}::{r['key']}"
               for r in rows if r["status"] == "error")  # fmt: skip
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) == 3 * 8 + 4
    summary = json.loads(fs.cat(f"{s3_bucket}/out/_summary.json"))
    assert (summary["inputs"], summary["ok"], summary["errors"]) == (28, 24, 4)
    assert summary["listing"]["video_files"] == 5


@pytest.mark.slow
def test_frame_captions_equal_the_plain_recipe_on_the_same_frame(ray_cluster, tiny_models, clips, photos, tmp_path):
    """Images and videos in one job, decode mode exact: each frame's caption and answer are what
    Blip2Processor + generate give for that decoded frame; the resumed run is refused if the sampling changes."""
    from imagefactory import jpeg_bytes
    from reference import Reference

    from jobs.annotate import main
    from workers.config import GenerationSpec

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "clip.mkv").write_bytes(remux(clips["h264"], "matroska"))
    (tmp_path / "in" / "photo.jpg").write_bytes(jpeg_bytes(photos["coffee"]))
    out = tmp_path / "out"
    args = ["--input", str(tmp_path / "in"), "--output", str(out), "--model", str(tiny_models["opt"]),
            "--max-new-tokens", "5", "--decode-mode", "exact", "--frame-interval", "2.5",
            "--questions", "What is it?"]  # fmt: skip
    assert main(args) == 0
    rows = sorted(read_output(str(out)), key=lambda r: (r["key"], r["frame_time"] or 0))
    assert [(r["key"], r["frame_time"]) for r in rows] == [
        ("clip.mkv", 0.0), ("clip.mkv", 2.5), ("clip.mkv", 5.0), ("clip.mkv", 7.5), ("photo.jpg", None)
    ]  # fmt: skip
    ref = Reference(tiny_models["opt"], GenerationSpec(max_new_tokens=5))
    truth = plain_frames(clips["h264"])
    for r in rows[:-1]:
        rgb = truth[shown_at(truth, r["frame_time"])][1]
        assert r["caption"] == ref(rgb, None)[0], r["frame_time"]
        assert r["answers"][0]["answer"] == ref(rgb, "Question: What is it? Answer:")[0]
    assert main([*args[:-4], "--frame-interval", "1.0", "--questions", "What is it?"]) == 2  # settings differ


@pytest.mark.slow
def test_driver_sigkill_chaos_over_videos_ends_with_one_row_per_sampled_frame(ray_cluster, tmp_path, tiny_models,
                                                                              stills):  # fmt: skip
    rng = random.Random(int(os.environ.get("CHAOS_SEED", "20261203")))
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    expected = set()
    for v in range(10):
        frames = shots([stills[(v + k) % 4] for k in range(3)], [1.0, 1.5, 1.5], fps=10, size=SIZE)
        (inp / f"v{v}.mp4").write_bytes(encode(frames, "h264", fps=10))
        expected |= {f"{inp}/v{v}.mp4::v{v}.mp4#t={t / 2:.3f}" for t in range(8)}
    cmd = [sys.executable, "-m", "jobs.annotate", "--input", str(inp), "--output", str(out),
           "--model", str(tiny_models["opt"]), "--max-new-tokens", "3", "--frame-interval", "0.5",
           "--batch-size", "4"]  # fmt: skip
    env = driver_env(ray_cluster.get_runtime_context().gcs_address)
    attempts = []
    for attempt in range(8):
        done_before = read_markers(out)
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if sum(how == "killed" for _, how, _ in attempts) < 2:
            # Kill as soon as a random number of this attempt's shards are marked, at most half
            # of those left: the videos are short, so their markers come close together.
            left = 10 - len(done_before)
            kill_at = len(done_before) + rng.randint(1, max(1, left // 2))
            while proc.poll() is None and len(read_markers(out)) < kill_at:
                time.sleep(0.02)
            if proc.poll() is None and len(read_markers(out)) < 10:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                attempts.append((attempt, "killed", len(read_markers(out))))
                continue
        stdout, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, stdout[-3000:]
        attempts.append((attempt, "finished", len(read_markers(out))))
        break
    print("attempts (attempt, how it ended, markers):", attempts)
    assert any(how == "killed" and 0 < n < 10 for _, how, n in attempts), attempts
    ids = output_ids(out)
    assert len(ids) == len(set(ids)) and set(ids) == expected
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["rows_this_run"] == len(expected) - sum(m["rows"] for m in done_before.values())


def test_a_frame_on_screen_across_a_span_boundary_is_one_row(stills):
    """2 fps, a frame every 0.3 s, spans of 0.9 s: the frame at 0.5 s is on screen at 0.6 and at 0.9."""
    data = encode(pan_frames(stills[3], 8, SIZE, shift=5), "h264", fps=2)
    spec = VideoSpec(frame_interval=0.3, span_seconds=0.9)
    whole = [r.time for r in rows_of(data, spec)]
    parts = [r.time for a, b in ((0.0, 0.9), (0.9, 1.8), (1.8, 2.7), (2.7, None))
             for r in rows_of(data, spec, start=a, end=b)]  # fmt: skip
    assert whole == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5])
    assert parts == whole


def test_read_and_decode_expands_tar_video_members_and_counts_their_frames(tmp_path, clips, photos):
    """A local tar mixing an image sample and a video sample: the shard_end row counts frames, not samples."""
    import pyarrow as pa
    from imagefactory import jpeg_bytes

    from jobs.settings import build_config
    from workers.pipeline import read_and_decode, shard_items

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "mixed.tar").write_bytes(
        tar_bytes([("img.jpg", jpeg_bytes(photos["coffee"])), ("vid.mp4", clips["vp9"]), ("vid.txt", b"t")])
    )
    cfg = build_config({"input": [str(tmp_path / "in")], "output": str(tmp_path / "out"), "frame_interval": 2.0})
    shards, _ = list_shards(cfg.input, cfg.storage, video=cfg.video)
    tables = list(read_and_decode(pa.Table.from_pylist(shard_items(shards)), cfg.input, cfg.storage, 3, DECODE,
                                  cfg.video))  # fmt: skip
    rows = pa.concat_tables(tables).drop_columns([schema.PIXELS]).to_pylist()
    data_rows = [r for r in rows if r[schema.STATUS] != schema.STATUS_SHARD_END]
    assert sorted((r["key"], r["frame_time"]) for r in data_rows) == [
        ("img", None), ("vid", 0.0), ("vid", 2.0), ("vid", 4.0), ("vid", 6.0)
    ]  # fmt: skip
    (end,) = [r for r in rows if r[schema.STATUS] == schema.STATUS_SHARD_END]
    assert end[schema.SHARD_ROWS] == len(data_rows) == 5
    assert len({r["id"] for r in data_rows}) == 5


def test_fast_mode_frames_are_close_to_exact_ones(clips):
    exact = rows_of(clips["h264"], VideoSpec())
    fast = rows_of(clips["h264"], VideoSpec(), replace(DECODE, mode="fast"))
    assert [r.time for r in fast] == [r.time for r in exact]
    for a, b in zip(fast, exact, strict=True):
        mse = np.mean((a.pixels.astype(float) - b.pixels.astype(float)) ** 2)
        assert 10 * np.log10(255**2 / max(mse, 1e-9)) > 25, a.time
        assert (a.width, a.height) == (b.width, b.height)


def test_fast_mode_turns_rotated_frames_upright_too(stills):
    data = encode(pan_frames(stills[1], 10, (96, 48)), "h264", rotation=90)
    exact = rows_of(data, VideoSpec())[0]
    fast = rows_of(data, VideoSpec(), replace(DECODE, mode="fast"))[0]
    assert (fast.width, fast.height) == (exact.width, exact.height) == (48, 96)
    mse = np.mean((fast.pixels.astype(float) - exact.pixels.astype(float)) ** 2)
    assert 10 * np.log10(255**2 / max(mse, 1e-9)) > 25


def test_a_span_of_a_video_on_s3_is_read_in_ranges_not_whole(s3_endpoint, s3_bucket, stills, monkeypatch):
    """The last span of an S3 video: FFmpeg seeks, fsspec fetches blocks, far less than the file comes over."""
    import s3fs
    from faulty_proxy import FaultyProxy

    from workers import video
    from workers.config import InputSpec
    from workers.listing import ShardRef

    frames = shots(stills, [4.0, 4.0, 4.0, 4.0], fps=10, size=(320, 240))
    data = encode(frames, "h264", fps=10, gop=10)
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}).pipe_file(f"{s3_bucket}/v/film.mp4", data)
    monkeypatch.setattr(video, "READ_BLOCK_BYTES", 16 * 1024)  # blocks far smaller than the test file
    uri = f"s3://{s3_bucket}/v/film.mp4"
    shard = ShardRef(uri=uri, format=VIDEO, name="film.mp4.t14", root=f"s3://{s3_bucket}/v", start_s=14.0)
    with FaultyProxy(s3_endpoint, every=0) as proxy:
        tables = list(video.read_video_shard(shard, InputSpec(urls=(uri,)), StorageOptions(endpoint_url=proxy.url),
                                             DECODE, VideoSpec(), batch_rows=8))  # fmt: skip
    times = [t for table in tables for t in table.column(schema.FRAME_TIME).to_pylist()]
    assert times == pytest.approx([14.0, 15.0])
    served = proxy.bytes_served[f"GET /{s3_bucket}/v/film.mp4"]
    print(f"{served} of {len(data)} bytes fetched in {proxy.paths[f'GET /{s3_bucket}/v/film.mp4']} GETs")
    assert 0 < served < len(data) / 2
