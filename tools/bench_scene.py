"""Scene-cut detectors on videos with known cuts: ours against PySceneDetect's ContentDetector.

    pip install -e '.[bench]'      # scenedetect, opencv
    python tools/bench_scene.py [--clips 8] [--json out.json]

Each clip is a run of shots made from scikit-image photos (H.264, 640x360, 25 fps),
with the cut times known exactly.  The shots are made to be hard in both
directions: fast pans and zooms inside a shot (a detector that reacts to motion
cuts there), two shots from different parts of one photo back to back (similar
colours on both sides of the cut), and a two-frame flash inside a shot.

Both detectors see the same decoded frames.  Ours is the product's path
(``workers.video.video_rows`` with ``frame_sampling=scene``: the first frame of
each shot); ContentDetector (HSV deltas, PySceneDetect's default, threshold 27,
min_scene_len 15 frames) gets each frame as BGR at 256 pixels wide, the size
PySceneDetect's SceneManager downscales 640-wide video to.  A detected cut
matches a true one within 0.25 s, each at most once.  Cost: CPU milliseconds
per frame of the detection alone (thumbnail + histogram, or resize + BGR +
ContentDetector), frames decoded once beforehand.  Not part of the product.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import av
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from bench_video import cpu_seconds  # noqa: E402  (tools/ is this script's folder)
from videofactory import encode  # noqa: E402

from workers.config import DecodeSpec, VideoSpec  # noqa: E402
from workers.video import _luma_histogram, histogram_distance, video_rows  # noqa: E402

SIZE, FPS, TOLERANCE_S = (640, 360), 25, 0.25
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "colorwheel")  # fmt: skip


def shot(photo: np.ndarray, frames: int, kind: str, rng: np.random.Generator) -> list[np.ndarray]:
    """``frames`` frames of one shot over ``photo``: a pan, a zoom, or a pan with a flash."""
    width, height = SIZE
    big = np.asarray(Image.fromarray(photo).resize((width * 3, height * 3)))
    x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
    speed = int(rng.integers(2, 12))  # pixels per frame on the 3x image: up to a fast pan
    out = []
    for i in range(frames):
        if kind == "zoom":
            scale = 1.0 + 0.6 * i / max(1, frames - 1)
            w, h = int(width * 2 / scale), int(height * 2 / scale)
            crop = big[y0 : y0 + h, x0 : x0 + w]
        else:
            x = min(x0 + i * speed, width * 2)
            crop = big[y0 : y0 + height * 2, x : x + width]
        frame = np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize(SIZE))
        if kind == "flash" and frames // 2 <= i < frames // 2 + 2:
            frame = np.clip(frame.astype(np.int16) + 90, 0, 255).astype(np.uint8)
        out.append(frame)
    return out


def make_clip(photos: dict[str, np.ndarray], rng: np.random.Generator, shots: int) -> tuple[bytes, list[float]]:
    frames: list[np.ndarray] = []
    cuts: list[float] = []
    previous = None
    for s in range(shots):
        # One shot in four comes from the previous shot's photo, another region of it.
        name = previous if previous and rng.random() < 0.25 else str(rng.choice(PHOTOS))
        kind = str(rng.choice(["pan", "zoom", "pan", "flash"]))
        length = round(float(rng.uniform(1.0, 4.0)) * FPS)
        if s:
            cuts.append(len(frames) / FPS)
        frames += shot(photos[name], length, kind, rng)
        previous = name
    return encode(frames, "h264", fps=FPS), cuts


def decoded(data: bytes) -> list[tuple[float, av.VideoFrame]]:
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        return [(float(f.pts * stream.time_base), f) for f in container.decode(stream)]


def ours_cuts(data: bytes, spec: VideoSpec) -> list[float]:
    rows = list(video_rows(io.BytesIO(data), spec, DecodeSpec(height=32, width=32)))
    return [r.time for r in rows if r.kind is None][1:]  # the first row is the clip's start, not a cut


def ours_detection(frames: list[tuple[float, av.VideoFrame]], threshold: float) -> int:
    """Ours without decoding, for its cost: thumbnail, histogram, distance; the jumps above ``threshold``."""
    previous, jumps = None, 0
    for _t, frame in frames:
        hist = _luma_histogram(frame)
        jumps += previous is not None and histogram_distance(hist, previous) > threshold
        previous = hist
    return jumps


def content_cuts(frames: list[tuple[float, av.VideoFrame]]) -> list[float]:
    from scenedetect import ContentDetector
    from scenedetect.common import FrameTimecode

    detector = ContentDetector()  # PySceneDetect's defaults: threshold 27, min_scene_len 15
    width = 256
    height = round(SIZE[1] * width / SIZE[0])
    cuts = []
    for i, (_t, frame) in enumerate(frames):
        bgr = frame.to_ndarray(width=width, height=height, format="bgr24")
        cuts += [c.frame_num for c in detector.process_frame(FrameTimecode(i, fps=float(FPS)), bgr)]
    return [c / FPS for c in cuts]


def score(found: list[float], truth: list[float]) -> tuple[int, int]:
    """(matched, false) cuts: each true cut matched at most once, within TOLERANCE_S."""
    left, matched = list(truth), 0
    for t in found:
        near = [c for c in left if abs(c - t) <= TOLERANCE_S]
        if near:
            left.remove(min(near, key=lambda c: abs(c - t)))
            matched += 1
    return matched, len(found) - matched


def timed(fn, *args) -> tuple[float, object]:
    c0 = cpu_seconds()
    out = fn(*args)
    return cpu_seconds() - c0, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clips", type=int, default=8)
    ap.add_argument("--shots", type=int, default=8, help="shots per clip")
    ap.add_argument("--seed", type=int, default=10)
    ap.add_argument("--threshold", type=float, default=VideoSpec().scene_threshold, help="ours: scene_threshold")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    from skimage import data

    photos = {name: getattr(data, name)() for name in PHOTOS}
    photos = {k: v if v.ndim == 3 else np.stack([v] * 3, -1) for k, v in photos.items()}
    rng = np.random.default_rng(args.seed)
    spec = VideoSpec(frame_sampling="scene", max_scene_seconds=1e6, scene_threshold=args.threshold)
    totals = {"ours": [0, 0, 0.0], "ContentDetector": [0, 0, 0.0]}
    true_cuts = frame_count = 0
    for _ in range(args.clips):
        clip, truth = make_clip(photos, rng, args.shots)
        frames = decoded(clip)
        true_cuts += len(truth)
        frame_count += len(frames)
        content_cpu, content_found = timed(content_cuts, frames)
        for name, found, cost in (
            ("ours", ours_cuts(clip, spec), timed(ours_detection, frames, spec.scene_threshold)[0]),
            ("ContentDetector", content_found, content_cpu),
        ):
            matched, false = score(found, truth)
            totals[name][0] += matched
            totals[name][1] += false
            totals[name][2] += cost
    report = {
        "clips": args.clips,
        "threshold": args.threshold,
        "true_cuts": true_cuts,
        "frames": frame_count,
        "detectors": {},
    }
    print(f"{args.clips} clips, {frame_count} frames at {SIZE[0]}x{SIZE[1]}, {true_cuts} known cuts")
    print("| detector | found | false | precision | recall | CPU ms per frame |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, (matched, false, cpu) in totals.items():
        precision = matched / max(1, matched + false)
        recall = matched / max(1, true_cuts)
        ms = 1000 * cpu / frame_count
        report["detectors"][name] = {"matched": matched, "false": false, "precision": round(precision, 3),
                                     "recall": round(recall, 3), "cpu_ms_per_frame": round(ms, 3)}  # fmt: skip
        print(f"| {name} | {matched} | {false} | {precision:.2f} | {recall:.2f} | {ms:.3f} |")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
