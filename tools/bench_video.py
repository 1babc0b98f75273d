"""Video benchmark: frames sampled per CPU-second, ours against the loop users write.

    python tools/bench_video.py [--seconds 20] [--gop 250] [--json out.json]

Encodes a 1080p, 30 fps H.264 clip with PyAV (libx264 defaults: B-frames, keyframe
every ``--gop`` frames; a slow pan across a photo, so every frame differs), then
samples one frame per second three ways, alternating, and reports CPU-seconds
(user + system of this process, all decoder threads included):

* baseline: ``for frame in container.decode(video=0)``, keeping the first frame at
  or after each whole second as an RGB array (what a user writes with PyAV);
* ours, interval: ``workers.video.video_rows`` with ``frame_sampling=interval``,
  frames resized to 224x224 (the model's input) on top, in the job's default
  ``decode_mode`` (fast) and in exact mode;
* ours, keyframes: ``frame_sampling=keyframes``, next to the floor of any keyframes
  sampler (FFmpeg decoding the keyframes alone, no conversion);
* ours with ``decode_threads=2``: CPU-seconds against wall seconds;
* ours at one frame per 5 s, with and without keyframe seeks: when seeking pays.

Targets (issue 10): keyframes >= 10x the baseline's frames per CPU-second,
interval >= 1.5x.  Then the peak RSS of one decode task on a 4K clip (a fresh
subprocess running ``video_rows`` over it).  Not part of the product: it measures it.
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from workers.config import DecodeSpec, VideoSpec  # noqa: E402
from workers.video import video_rows  # noqa: E402


def clip(width: int, height: int, seconds: float, fps: int, gop: int) -> bytes:
    from skimage import data

    photo = np.asarray(Image.fromarray(data.astronaut()).resize((width * 2, height)))
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "veryfast", "g": str(gop), "crf": "23"}
        for i in range(int(seconds * fps)):
            x = (i * 3) % width
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(photo[:, x : x + width]), format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def baseline(data: bytes, threads: str | None) -> int:
    kept = []
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        if threads:
            stream.thread_type = threads
        next_t = 0.0
        for frame in container.decode(stream):
            if frame.time is not None and frame.time >= next_t - 1e-9:
                kept.append(frame.to_ndarray(format="rgb24"))
                next_t += 1.0
    return len(kept)


def keyframes_floor(data: bytes) -> int:
    """The least any keyframes sampler can do: FFmpeg decoding only the keyframes, nothing kept."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        stream.codec_context.skip_frame = "NONKEY"
        return sum(1 for _ in container.decode(stream))


def ours(data: bytes, sampling: str, interval: float = 1.0, seek: bool = True, mode: str = "fast",
         threads: int = 1) -> int:  # fmt: skip
    from workers import video

    spec = VideoSpec(frame_sampling=sampling, frame_interval=interval, decode_threads=threads)
    saved = video.SEEK_MIN_GAP_S
    video.SEEK_MIN_GAP_S = saved if seek else float("inf")
    try:
        rows = list(video_rows(io.BytesIO(data), spec, DecodeSpec(mode=mode)))
    finally:
        video.SEEK_MIN_GAP_S = saved
    assert all(r.kind is None for r in rows), [r.error for r in rows if r.kind]
    return len(rows)


def measure(fn, rounds: int) -> tuple[float, float, int]:
    """Best of ``rounds``: (CPU-seconds, wall seconds, frames)."""
    best = None
    for _ in range(rounds):
        c0, w0 = cpu_seconds(), time.perf_counter()
        n = fn()
        result = (cpu_seconds() - c0, time.perf_counter() - w0, n)
        best = result if best is None or result[0] < best[0] else best
    return best


_PEAK = """
import io, sys, threading, time
sys.path.insert(0, sys.argv[1])
from workers.config import DecodeSpec, VideoSpec
from workers.video import video_rows

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])

data = open(sys.argv[2], "rb").read()
before, peak, done = rss(), [0], threading.Event()
def watch():
    while not done.is_set():
        peak[0] = max(peak[0], rss())
        time.sleep(0.005)
threading.Thread(target=watch, daemon=True).start()
n = sum(1 for r in video_rows(io.BytesIO(data), VideoSpec(frame_interval=1.0), DecodeSpec(mode=sys.argv[3])))
done.set()
print(n, before, max(peak[0], rss()))
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--gop", type=int, default=250, help="keyframe interval in frames (libx264's default: 250)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--skip-4k", action="store_true")
    args = ap.parse_args(argv)

    t0 = time.time()
    data = clip(1920, 1080, args.seconds, 30, args.gop)
    print(f"1080p30 clip: {args.seconds:.0f}s, {len(data) / 1e6:.1f} MB, GOP {args.gop}, encoded in "
          f"{time.time() - t0:.0f}s", flush=True)  # fmt: skip
    cases = {
        "baseline (PyAV default threads)": lambda: baseline(data, None),
        "baseline (thread_type AUTO)": lambda: baseline(data, "AUTO"),
        "ours: interval": lambda: ours(data, "interval"),
        "ours: interval, decode_mode exact": lambda: ours(data, "interval", mode="exact"),
        "ours: interval, decode_threads 2": lambda: ours(data, "interval", threads=2),
        "ours: keyframes": lambda: ours(data, "keyframes"),
        "floor: FFmpeg decoding the keyframes only": lambda: keyframes_floor(data),
        "ours: interval 5 s, seeking": lambda: ours(data, "interval", 5.0),
        "ours: interval 5 s, decoding straight through": lambda: ours(data, "interval", 5.0, seek=False),
    }
    results = {name: measure(fn, args.rounds) for name, fn in cases.items()}
    base = max(results[k][2] / results[k][0] for k in results if k.startswith("baseline"))
    report = {"clip": {"seconds": args.seconds, "gop": args.gop, "bytes": len(data)}, "cases": {}}
    print("| case | frames | CPU s | wall s | frames per CPU-s | vs best baseline |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, (cpu, wall, n) in results.items():
        rate = n / cpu
        report["cases"][name] = {"frames": n, "cpu_s": round(cpu, 3), "wall_s": round(wall, 3),
                                 "frames_per_cpu_s": round(rate, 2), "ratio": round(rate / base, 2)}  # fmt: skip
        print(f"| {name} | {n} | {cpu:.2f} | {wall:.2f} | {rate:.2f} | {rate / base:.2f}x |")

    if not args.skip_4k:
        path = Path("/tmp") / f"bench-4k-{int(time.time())}.mp4"
        path.write_bytes(clip(3840, 2160, 4.0, 30, 60))
        report["rss_4k_mb"] = {}
        try:
            for mode in ("fast", "exact"):
                out = subprocess.run([sys.executable, "-c", _PEAK, str(REPO), str(path), mode], capture_output=True,
                                     text=True, check=True).stdout.split()  # fmt: skip
                frames, before, peak = (int(x) for x in out)
                report["rss_4k_mb"][mode] = {"before": round(before / 1024), "peak": round(peak / 1024),
                                             "growth": round((peak - before) / 1024)}  # fmt: skip
                print(f"4K (3840x2160, 4 s, 30 fps, {mode}): {frames} frames; RSS {before / 1024:.0f} MB after "
                      f"imports and reading the 4 s file, peak {peak / 1024:.0f} MB while decoding "
                      f"(+{(peak - before) / 1024:.0f} MB)")  # fmt: skip
        finally:
            path.unlink()
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
