"""Measurements behind docs/scaling.md: per-stage costs and 1-node vs 2-node throughput.

    python docs/measure_scaling.py [--images 480] [--shards 24] [--megapixels 1.2] [--repeat 2]

Makes WebDataset shards of JPEGs (the bundled sample photos, resized to about
``--megapixels``), builds the tiny random BLIP-2, starts a one-node cluster with
``ray start`` (2 logical CPUs) and runs ``python -m jobs.annotate`` against it
``--repeat`` times; reads per-stage task times from the state API (``ray list
tasks --detail``); adds a second node (2 more logical CPUs) and runs the job
again ``--repeat`` times.  Prints a Markdown summary.

The cluster runs in its own temp dir and is torn down by killing its own
processes (never ``ray stop``, which would stop every Ray on the machine).
Numbers are for the machine it runs on and the tiny model (docs/scaling.md).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(extra: dict[str, str] | None = None) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    e["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{e.get('PATH', '')}"
    e.update({"RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"})
    e.update(extra or {})
    return e


class Node:
    def __init__(self, args: list[str], temp: Path, name: str) -> None:
        self.temp = temp
        self.log = temp / f"{name}.log"
        common = [
            "--node-ip-address=127.0.0.1",
            "--object-store-memory=500000000",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--temp-dir={temp}",
            "--disable-usage-stats",
            "--block",
        ]
        self.proc = subprocess.Popen(
            [RAY, "start", *args, *common],
            env=env(),
            stdout=open(self.log, "wb"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 90
        while "Ray runtime started" not in self.log.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(self.log.read_text(errors="replace")[-3000:])
            time.sleep(0.2)

    def kill(self) -> None:
        import importlib

        import ray  # noqa: F401 - puts Ray's vendored psutil on sys.path

        psutil = importlib.import_module("psutil")

        procs = []
        try:
            root = psutil.Process(self.proc.pid)
            procs = [*root.children(recursive=True), root]
        except psutil.NoSuchProcess:
            pass
        procs += [p for p in psutil.process_iter(["cmdline"]) if str(self.temp) in " ".join(p.info["cmdline"] or ())]
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=10)


def make_shards(out: Path, images: int, shards: int, megapixels: float) -> None:
    from PIL import Image

    photos = sorted((REPO / "samples" / "images").glob("*.jpg"))
    encoded = []
    for path in photos:
        img = Image.open(path).convert("RGB")
        scale = (megapixels * 1e6 / (img.width * img.height)) ** 0.5
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        encoded.append(buf.getvalue())
    out.mkdir(parents=True)
    per_shard = images // shards
    for s in range(shards):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for i in range(per_shard):
                data = encoded[(s + i) % len(encoded)]
                info = tarfile.TarInfo(f"{s:03d}{i:04d}.jpg")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        (out / f"shard-{s:05d}.tar").write_bytes(buf.getvalue())


def run_job(gcs: str, args: list[str]) -> tuple[float, dict]:
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.annotate", *args],
        env=env({"RAY_ADDRESS": gcs}),
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    wall = time.monotonic() - started
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-4000:])
    out = args[args.index("--output") + 1]
    return wall, json.loads((Path(out) / "_summary.json").read_text())


def stage_costs(dashboard: str) -> dict[str, tuple[int, float]]:
    """Stage -> (tasks, summed task wall time in s), from the state API's task records."""
    proc = subprocess.run(
        [RAY, "list", "tasks", "--address", dashboard, "--detail", "--format", "json", "--limit", "10000"],
        env=env(),
        capture_output=True,
        text=True,
        check=True,
    )
    costs: dict[str, list[float]] = {}
    for task in json.loads(proc.stdout):
        name = task["name"]
        stage = next((s for s in STAGES if s in name), None)
        if stage is None or not task.get("end_time_ms") or not task.get("start_time_ms"):
            continue
        if stage == "Blip2Replica" and not name.endswith(".submit"):
            continue  # the replica's own calls: constructor and bookkeeping are not model work
        start, end = (datetime.fromisoformat(task[k]) for k in ("start_time_ms", "end_time_ms"))
        costs.setdefault(stage, []).append((end - start).total_seconds())
    return {stage: (len(v), sum(v)) for stage, v in costs.items()}


STAGES = ("read_and_decode", "Blip2Replica", "write_rows")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=480)
    ap.add_argument("--shards", type=int, default=24)
    ap.add_argument("--megapixels", type=float, default=1.2)
    ap.add_argument("--max-new-tokens", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=2, help="runs per cluster size")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more flags for jobs.annotate")
    opts = ap.parse_args()

    from workers.tiny_model import build_tiny_blip2

    work = Path(tempfile.mkdtemp(prefix="ms-", dir="/tmp"))
    nodes: list[Node] = []
    try:
        model = build_tiny_blip2(work / "model", flavor="opt")
        make_shards(work / "in", opts.images, opts.shards, opts.megapixels)
        port, dash = free_port(), free_port()
        gcs = f"127.0.0.1:{port}"
        head_args = ["--head", f"--port={port}", f"--dashboard-port={dash}", f"--ray-client-server-port={free_port()}"]
        nodes.append(Node([*head_args, "--num-cpus=2"], work, "head"))

        def job(name: str) -> list[str]:
            return [
                "--input", str(work / "in"),
                "--output", str(work / name),
                "--model", str(model),
                "--questions", "What is in the picture?",
                "--max-new-tokens", str(opts.max_new_tokens),
                "--batch-size", "16",  # as in docs/scaling.md's measurements (the CPU default is now 128)
                "--replicas", "1:2",
                "--gpus-per-replica", "0",
                "--decode-concurrency", "2",
                *opts.extra,
            ]  # fmt: skip

        one = [run_job(gcs, job(f"out-1node-{k}")) for k in range(opts.repeat)]
        costs = stage_costs(f"http://127.0.0.1:{dash}")
        nodes.append(Node([f"--address={gcs}", "--num-cpus=2"], work, "worker"))
        two = [run_job(gcs, job(f"out-2node-{k}")) for k in range(opts.repeat)]
        runs = {"1 node, 2 logical CPUs": one, "2 nodes, 2 + 2 logical CPUs": two}

        what = f"{opts.images} images, {opts.shards} shards, ~{opts.megapixels} MP JPEG, tiny BLIP-2"
        print(f"## {what}, {os.cpu_count()} cores\n")
        n = opts.images * opts.repeat
        print(f"Per-stage task time on one node, all {opts.repeat} runs together ({n} images):\n")
        print("| stage | tasks | task time (s) | ms per image |")
        print("| --- | --- | --- | --- |")
        for stage in STAGES:
            tasks, seconds = costs.get(stage, (0, 0.0))
            print(f"| {stage} | {tasks} | {seconds:.2f} | {1000 * seconds / n:.2f} |")
        print("\n| cluster | job wall time (s), each run | images/s (summary), each run |")
        print("| --- | --- | --- |")
        for name, results in runs.items():
            walls = ", ".join(f"{wall:.1f}" for wall, _ in results)
            rates = ", ".join(f"{summary['images_per_s']:.1f}" for _, summary in results)
            print(f"| {name} | {walls} | {rates} |")
    finally:
        for node in reversed(nodes):
            node.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
