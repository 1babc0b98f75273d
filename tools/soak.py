"""Soak run: how long a computed row waits for its shard's marker (docs: BENCHMARKS.md, "Durability").

    python tools/soak.py [--shards 500] [--per-shard 2000] [--work-dir DIR]

Writes ``--shards`` WebDataset tars of tiny JPEGs, then runs the real job
(``jobs.annotate.main``, local Ray, the tiny random BLIP-2) in this process with
one change: the model stage is a subclass of ``Blip2Replica`` that appends, after
each batch, the wall-clock time at which it finished computing rows of each
shard.  After the run it reads every marker's mtime and prints, per shard,

* ``lag``: marker written - the shard's last row computed (what durability adds),
* ``span``: marker written - the shard's first row computed (the longest any one
  row of the shard waited to become part of a completed shard),

their maxima and percentiles, and the share of markers written by each quarter
of the time rows were being computed.  A run whose markers all come at the end shows a lag near the run's
length; one that writes as it goes shows seconds.  Not part of the product: it
measures it.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from workers import pipeline  # noqa: E402
from workers.replica import Blip2Replica  # noqa: E402

TIMES_DIR_ENV = "BLIP2_SOAK_TIMES"  # the tool's own; the product reads no env in workers


class TimedReplica(Blip2Replica):
    """Blip2Replica that records when it computed rows of which shard (pickled by value: defined in __main__)."""

    def __call__(self, batch):
        out = super().__call__(batch)
        now = time.time()
        shards = set(out.column("shard").to_pylist()) - {None}
        folder = Path(os.environ[TIMES_DIR_ENV])
        with open(folder / f"{os.getpid()}.tsv", "a") as f:
            f.writelines(f"{shard}\t{now:.3f}\n" for shard in shards)
        return out


def tiny_jpegs(count: int = 16) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=70)
        out.append(buf.getvalue())
    return out


def write_shards(folder: Path, shards: int, per_shard: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    jpegs = tiny_jpegs()
    for s in range(shards):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for i in range(per_shard):
                data = jpegs[(s + i) % len(jpegs)]
                info = tarfile.TarInfo(f"{s:05d}_{i:05d}.jpg")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", type=int, default=500)
    ap.add_argument("--per-shard", type=int, default=2000)
    ap.add_argument("--work-dir", type=Path, default=None, help="kept afterwards when given")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args(argv)

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="soak-"))
    try:
        t0 = time.time()
        write_shards(work / "in", args.shards, args.per_shard)
        print(f"wrote {args.shards} x {args.per_shard} images in {time.time() - t0:.0f}s", flush=True)
        times = work / "times"
        times.mkdir(exist_ok=True)
        os.environ[TIMES_DIR_ENV] = str(times)  # inherited by the local Ray's workers
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        pipeline.Blip2Replica = TimedReplica
        from jobs.annotate import main as annotate

        started = time.time()
        code = annotate(["--input", str(work / "in"), "--output", str(work / "out"), "--model", "tiny-random",
                         "--model-cache-dir", str(work / "models"), "--max-new-tokens", "4"])  # fmt: skip
        ended = time.time()
        if code != 0:
            print(f"job failed with exit code {code}")
            return code

        first: dict[str, float] = {}
        last: dict[str, float] = {}
        for path in times.glob("*.tsv"):
            for line in path.read_text().splitlines():
                shard, t = line.split("\t")
                first[shard] = min(first.get(shard, float(t)), float(t))
                last[shard] = max(last.get(shard, 0.0), float(t))
        marker_at = {p.stem: p.stat().st_mtime for p in (work / "out" / "_markers").glob("*.json")}
        lag = [marker_at[s] - last[s] for s in marker_at]
        span = [marker_at[s] - first[s] for s in marker_at]
        wall = ended - started
        # Quarters of the time rows were being computed (start-up excluded): a run that
        # writes as it goes has about a quarter of its markers after the first quarter.
        computing_from = min(first.values())
        computing = ended - computing_from
        quarters = [
            sum(t <= computing_from + computing * q / 4 for t in marker_at.values()) / len(marker_at) for q in (1, 2, 3)
        ]
        figures = {
            "shards": args.shards,
            "images": args.shards * args.per_shard,
            "markers": len(marker_at),
            "wall_s": round(wall, 1),
            "images_per_s": round(args.shards * args.per_shard / wall, 1),
            "lag_max_s": round(max(lag), 2),
            "lag_p50_s": round(statistics.median(lag), 2),
            "lag_p95_s": round(percentile(lag, 0.95), 2),
            "span_max_s": round(max(span), 2),
            "span_p50_s": round(statistics.median(span), 2),
            "markers_by_quarter": [round(q, 3) for q in quarters],
            "computing_s": round(computing, 1),
            "first_marker_after_s": round(min(marker_at.values()) - computing_from, 1),
        }
        print(json.dumps(figures, indent=2))
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2) + "\n")
        return 0
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
