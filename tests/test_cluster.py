"""The job on real Ray clusters, and the deployment files that describe them.

* ``ray job submit --working-dir`` against a real two-node cluster started with
  ``ray start`` (a head and a worker node, each its own raylet and resources),
  input, weights and output on S3.
* The model stage on an autoscaling cluster: Ray's fake multi-node provider
  launches GPU worker nodes when replicas ask for GPUs (the GPUs are declared,
  not real, so the replicas run on CPU) and removes them once idle.
* ``cluster.yaml`` through the checks ``ray up`` runs before it starts an
  instance, and structural checks (pins, no secrets).
* ``deploy/rayjob.yaml`` (KubeRay) structurally, its entrypoint through the
  job's own argument parser.

Clusters here are ``ray start --block`` child processes, each in its own
session and temp dir, torn down by killing exactly their process trees:
``ray stop`` kills every Ray process on the machine, including the session
cluster of the ``ray_cluster`` fixture (and anybody else's).  Every fixture
checks on teardown that raylets it did not start are still alive.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pyarrow.dataset as pads
import pytest
import s3fs
import yaml
from helpers import free_port, tar_bytes
from kuberay_schema import schema_errors

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
RAY_CLI = str(VENV_BIN / "ray")
SAMPLES = sorted((REPO / "samples" / "images").glob("*.jpg"))


# --------------------------------------------------------------------------- helpers


def _cluster_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for ``ray start`` and the Ray CLI.

    The venv's bin first on PATH, so a job's ``python`` is this interpreter (as
    on a real node, where Ray and the project live in the image's Python).
    Token authentication on, with this machine's default token
    (``~/.ray/auth_token``, the one ``ray.init`` uses too), as ``cluster.yaml``
    sets it up: every node and every client reads the same token.
    """
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["RAY_AUTH_MODE"] = "token"
    env.update(extra or {})
    return env


def _ray(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the Ray CLI as a user would; fail with its output if it fails."""
    proc = subprocess.run([RAY_CLI, *args], env=_cluster_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(
            f"ray {shlex.join(args)} -> {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return proc


def _psutil():
    """Ray's vendored psutil (Ray puts it on sys.path when imported)."""
    import importlib

    import ray  # noqa: F401

    return importlib.import_module("psutil")


def _session_raylets() -> set[int]:
    """Raylets this pytest process started (the ``ray_cluster`` fixture's): tearing ours down must spare them."""
    psutil = _psutil()
    return {p.pid for p in psutil.Process().children(recursive=True) if p.name() == "raylet"}


def _assert_still_alive(pids: set[int]) -> None:
    psutil = _psutil()
    dead = [pid for pid in pids if not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"]
    assert not dead, f"tearing down a test cluster killed raylets it did not start: {dead}"


class RayNode:
    """One ``ray start ... --block`` process in its own session; ``kill`` ends exactly its process tree."""

    def __init__(self, args: list[str], env: dict[str, str], temp: Path, name: str) -> None:
        self.temp = temp
        self.log_path = temp / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in kill()
        self.proc = subprocess.Popen(
            [RAY_CLI, "start", *args, "--block", "--disable-usage-stats"],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_started(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "Ray runtime started" in self.log():
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            time.sleep(0.2)
        raise TimeoutError(f"ray start did not come up in {timeout}s:\n{self.log()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL ``ray start`` and everything below it: GCS, raylet, agents, workers, fake nodes.

        Processes that lost their parent are caught by their command line, which
        names this node's unique temp dir.
        """
        psutil = _psutil()
        procs = []
        try:
            root = psutil.Process(self.proc.pid)
            procs = [*root.children(recursive=True), root]
        except psutil.NoSuchProcess:
            pass
        for p in psutil.process_iter(["cmdline"]):
            if str(self.temp) in " ".join(p.info["cmdline"] or ()):
                procs.append(p)
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=10)
        self.proc.wait(timeout=10)
        self._log.close()


def _node_args(temp: Path) -> list[str]:
    """Flags every node here gets: loopback, small object store, free ports for what defaults to fixed ones."""
    return [
        "--node-ip-address=127.0.0.1",
        "--object-store-memory=200000000",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--temp-dir={temp}",
    ]


def _head_args(temp: Path, port: int, dashboard_port: int) -> list[str]:
    return [
        "--head",
        f"--port={port}",
        f"--dashboard-port={dashboard_port}",
        "--dashboard-host=127.0.0.1",
        f"--ray-client-server-port={free_port()}",
        *_node_args(temp),
    ]


def _short_tmp(prefix: str) -> Path:
    # Raylet and object-store unix sockets live under --temp-dir; pytest's tmp_path is too long for them.
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def _sample_shards(n_shards: int, per_shard: int) -> dict[str, list[str]]:
    """WebDataset shard names -> sample keys, filled with the bundled sample photos."""
    return {f"shard-{s:05d}.tar": [f"{s:02d}{i:03d}" for i in range(per_shard)] for s in range(n_shards)}


def _shard_bytes(keys: list[str]) -> bytes:
    return tar_bytes([(f"{k}.jpg", SAMPLES[i % len(SAMPLES)].read_bytes()) for i, k in enumerate(keys)])


@functools.lru_cache(maxsize=1)
def _auth_token() -> str:
    """The token the clusters here use (generated once per machine, as ``ray.init`` would)."""
    return _ray("get-auth-token", "--generate").stdout.strip().splitlines()[-1]


def _state(dashboard: str, resource: str) -> list[dict]:
    """Rows of the dashboard's state API over plain HTTP (this process stays off that cluster)."""
    token = _auth_token()
    req = urllib.request.Request(
        f"{dashboard}/api/v0/{resource}?limit=10000&detail=1", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())["data"]["result"]["result"]


def _replica_nodes(dashboard: str, job_hex: str | None = None) -> tuple[set[str], dict[str, str]]:
    """The job's model replicas (actor ids), and the node each one ran on.

    Nodes come from the replicas' method calls (Ray Data asks every new replica
    for its location): a dead actor's own record may have lost its node.
    """
    replicas = {
        a["actor_id"]
        for a in _state(dashboard, "actors")
        if "Blip2Replica" in a["class_name"] and job_hex in (None, a["job_id"])
    }
    placed = {
        t["actor_id"]: t["node_id"]
        for t in _state(dashboard, "tasks")
        if t.get("actor_id") in replicas and t.get("node_id") and t["type"] == "ACTOR_TASK"
    }
    return replicas, placed


def _alive_nodes(dashboard: str) -> list[dict]:
    return [n for n in _state(dashboard, "nodes") if n["state"] == "ALIVE"]


# --------------------------------------------------------------------------- 1. ray job submit


@pytest.fixture()
def two_node_cluster():
    """A real two-node cluster from the CLI: a head and a worker node, each with its own resources.

    4 logical CPUs each (on 2 physical cores): room on each node for a replica next to
    the driver and the read, decode and write tasks.
    """
    _auth_token()  # generates ~/.ray/auth_token if this machine has none yet
    others = _session_raylets()
    temp = _short_tmp("rc-")
    port, dash = free_port(), free_port()
    env = _cluster_env()
    nodes = []
    try:
        head = RayNode([*_head_args(temp, port, dash), "--num-cpus=4", '--resources={"head": 1}'], env, temp, "head")
        nodes.append(head)
        head.wait_started()
        worker = RayNode(
            [f"--address=127.0.0.1:{port}", *_node_args(temp), "--num-cpus=4", '--resources={"worker": 1}'],
            env,
            temp,
            "worker",
        )
        nodes.append(worker)
        worker.wait_started()
        yield {"dashboard": f"http://127.0.0.1:{dash}", "temp": temp}
    finally:
        for node in reversed(nodes):
            node.kill()
        shutil.rmtree(temp, ignore_errors=True)
        _assert_still_alive(others)


@pytest.mark.slow
def test_ray_job_submit_on_two_node_cluster(two_node_cluster, s3_endpoint, s3_bucket, s3_storage, tiny_models,
                                           aws_credentials):  # fmt: skip
    """``ray job submit --working-dir .`` on a head + worker cluster: shards, weights and output on S3.

    The job reaches SUCCEEDED, writes one row per image, ``ray job logs``
    returns the summary line, both nodes did work (read tasks on each, two
    replicas started), and the uploaded working dir left out what .gitignore
    ignores (the virtualenv above all).
    """
    dashboard, temp = two_node_cluster["dashboard"], two_node_cluster["temp"]
    nodes = _alive_nodes(dashboard)
    assert len(nodes) == 2
    assert sorted(r for n in nodes for r in n["resources_total"] if r in ("head", "worker")) == ["head", "worker"]

    fs = s3fs.S3FileSystem(**s3_storage.fsspec_options())
    shards = _sample_shards(n_shards=8, per_shard=10)
    for name, keys in shards.items():
        fs.pipe(f"{s3_bucket}/in/{name}", _shard_bytes(keys))
    # Weights from object storage too: the nodes of a real cluster share no disk.
    fs.put(str(tiny_models["opt"]), f"{s3_bucket}/models/tiny-opt", recursive=True)
    n_images = sum(len(keys) for keys in shards.values())
    summary = f"annotated {n_images} images from {len(shards)} shards"

    job_id = f"annotate-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    # Blocking submit, as in the README: tails the logs, exits non-zero if the job fails.
    submitted = _ray(
        "job", "submit",
        "--address", dashboard,
        "--submission-id", job_id,
        "--working-dir", str(REPO),
        "--entrypoint-num-cpus", "0.1",
        "--",
        "python", "-m", "jobs.annotate",
        "--input", f"s3://{s3_bucket}/in/",
        "--output", f"s3://{s3_bucket}/out/",
        "--endpoint-url", s3_endpoint,
        "--model", f"s3://{s3_bucket}/models/tiny-opt",
        "--model-cache-dir", str(temp / "model-cache"),
        "--questions", "What is in the picture?",
        "--max-new-tokens", "4",
        "--batch-size", "4",
        "--replicas", "2",
        "--gpus-per-replica", "0",
        "--decode-concurrency", "2",  # at most 2 fused read+decode tasks at a time, one shard each
        timeout=240,
    )  # fmt: skip
    print(f"ray job submit -> exit after {time.monotonic() - started:.1f}s")
    assert summary in submitted.stdout

    status = _ray("job", "status", "--address", dashboard, "--log-color", "false", job_id).stdout
    assert f"Job '{job_id}' succeeded" in status
    logs = _ray("job", "logs", "--address", dashboard, job_id).stdout
    assert summary in logs and f"output s3://{s3_bucket}/out/" in logs

    table = pads.dataset(f"{s3_bucket}/out", format="parquet", partitioning="hive", filesystem=fs).to_table(
        columns=["shard", "key", "status", "caption", "answers"]
    )
    rows = sorted((r["shard"], r["key"]) for r in table.to_pylist())
    assert rows == sorted((name, key) for name, keys in shards.items() for key in keys)  # one row per image
    assert set(table.column("status").to_pylist()) == {"ok"}
    assert all(isinstance(c, str) for c in table.column("caption").to_pylist())
    assert all(a[0]["question"] == "What is in the picture?" for a in table.column("answers").to_pylist())

    # Both nodes worked: Ray Data spreads the read tasks (one per shard) and the replicas over them.
    (job,) = [j for j in _state(dashboard, "jobs") if j.get("submission_id") == job_id]
    assert job["status"] == "SUCCEEDED"
    tasks = [t for t in _state(dashboard, "tasks") if t["job_id"] == job["job_id"]]
    # Reading and decoding are one stage: its tasks are named "MapBatches(read_and_decode)".
    read_nodes = {t["node_id"] for t in tasks if "MapBatches(read_and_decode)" in t["name"] and t["node_id"]}
    assert read_nodes == {n["node_id"] for n in nodes}
    replicas, placed = _replica_nodes(dashboard, job["job_id"])
    # Both replicas start; a job this small may finish before the second is ready.
    print(f"replicas created: {len(replicas)}, ran on {len(set(placed.values()))} node(s)")
    assert len(replicas) == 2 and placed and len(set(placed.values())) == len(placed)

    # What --working-dir uploaded: the project, without what .gitignore excludes.
    (pkg,) = {
        p.name: p for p in temp.glob("session_2*/runtime_resources/working_dir_files/_ray_pkg_*") if p.is_dir()
    }.values()
    assert (pkg / "jobs" / "annotate.py").is_file() and (pkg / "workers" / "pipeline.py").is_file()
    assert not (pkg / ".venv").exists() and not (pkg / ".git").exists()
    assert sum(f.stat().st_size for f in pkg.rglob("*") if f.is_file()) < 20 * 2**20

    # The nodes had S3 credentials in their environment (the AWS chain); none of them reached a log,
    # the job's record or its output.
    records = json.dumps([job, *_state(dashboard, "tasks"), *_state(dashboard, "actors")]) + submitted.stdout + logs
    scanned = 0
    for path in [p for p in temp.rglob("*") if p.is_file() and "runtime_resources" not in p.parts]:
        text = path.read_bytes()
        scanned += 1
        for secret in aws_credentials:
            assert secret.encode() not in text, f"{secret[:6]}... found in {path}"
    assert scanned > 20  # the session's logs were there to search
    for secret in aws_credentials:
        assert secret not in records
        assert not any(secret in str(v) for v in table.to_pylist())


# --------------------------------------------------------------------------- 2. autoscaling

FAKE_PROVIDER_DEFAULTS = {
    # What Ray's fake_multi_node/example.yaml holds besides the node types (the PyPI wheel lacks that file).
    "auth": {},
    "docker": {},
    "initialization_commands": [],
    "setup_commands": [],
    "head_setup_commands": [],
    "worker_setup_commands": [],
    "head_start_ray_commands": [],
    "worker_start_ray_commands": [],
    "file_mounts": {},
    "cluster_synced_files": [],
    "file_mounts_sync_continuously": False,
    "rsync_exclude": [],
    "rsync_filter": [],
}
MIN_REPLICAS, MAX_REPLICAS = 2, 3
MAX_GPU_NODES = MAX_REPLICAS


def _gpu_nodes(nodes: list[dict]) -> set[str]:
    return {n["node_id"] for n in nodes if n.get("resources_total", {}).get("GPU", 0) > 0}


class GpuNodeWatcher:
    """Samples the ALIVE GPU nodes of a cluster in a thread."""

    def __init__(self, dashboard: str, interval: float = 0.5) -> None:
        self.dashboard = dashboard
        self.interval = interval
        self.samples: list[tuple[float, set[str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        t0 = time.monotonic()
        while not self._stop.is_set():
            try:
                self.samples.append((round(time.monotonic() - t0, 1), _gpu_nodes(_alive_nodes(self.dashboard))))
            except (OSError, AssertionError, KeyError):
                pass  # dashboard busy: skip a sample
            self._stop.wait(self.interval)

    def __enter__(self) -> GpuNodeWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def seen(self) -> set[str]:
        return set().union(*(ids for _, ids in self.samples))

    def timeline(self) -> list[tuple[float, int]]:
        """(seconds, GPU nodes) at every change."""
        out: list[tuple[float, int]] = []
        for t, ids in self.samples:
            if not out or out[-1][1] != len(ids):
                out.append((t, len(ids)))
        return out


@pytest.fixture()
def autoscaling_cluster():
    """A CPU-only head whose autoscaler (fake multi-node provider) launches GPU worker nodes on demand."""
    _auth_token()
    others = _session_raylets()
    temp = _short_tmp("ra-")
    port, dash = free_port(), free_port()
    config = {
        "cluster_name": "fake-gpu",
        "max_workers": MAX_GPU_NODES,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 0.05,  # 3 s, so the test sees the cluster shrink
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": f"127.0.0.1:{port}",
        },
        "head_node_type": "ray.head.default",
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 2}, "node_config": {}, "max_workers": 0},
            # Declared, not real, GPUs: replicas placed here find no CUDA and run on CPU.
            "gpu_worker": {
                "resources": {"CPU": 1, "GPU": 1, "object_store_memory": 150_000_000},
                "node_config": {},
                "min_workers": 0,
                "max_workers": MAX_GPU_NODES,
            },
        },
        **FAKE_PROVIDER_DEFAULTS,
    }
    config_path = temp / "autoscaling.json"
    config_path.write_text(json.dumps(config))
    # As ray.cluster_utils.AutoscalingCluster starts it.
    env = _cluster_env({"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"})
    head = RayNode(
        [*_head_args(temp, port, dash), "--num-cpus=2", f"--autoscaling-config={config_path}"], env, temp, "head"
    )
    try:
        head.wait_started()
        yield {"dashboard": f"http://127.0.0.1:{dash}", "gcs": f"127.0.0.1:{port}", "temp": temp}
    finally:
        head.kill()
        shutil.rmtree(temp, ignore_errors=True)
        _assert_still_alive(others)


@pytest.mark.slow
def test_gpu_nodes_scale_up_with_the_replica_pool_and_down_after(autoscaling_cluster, tmp_path, tiny_models):
    """``--replicas 2:3 --gpus-per-replica 1`` on a cluster that starts without GPU nodes.

    The pending replicas make the autoscaler launch GPU nodes: at least one per
    minimum replica, never more than the pool's max.  Replicas run on GPU
    nodes, one each (on CPU: the GPUs are only declared); decoding runs on the
    CPU head; once the job is done the GPU nodes are removed as idle.  How many
    replicas actually start before a job this small runs out of work (the
    second GPU node may come up when the first replica has nearly finished) and
    whether the pool grows past its min depend on timing: printed, not asserted.
    """
    dashboard, gcs, temp = autoscaling_cluster["dashboard"], autoscaling_cluster["gcs"], autoscaling_cluster["temp"]
    nodes = _alive_nodes(dashboard)
    assert len(nodes) == 1 and not _gpu_nodes(nodes)  # min_workers 0: no GPU node before the job
    (head_id,) = {n["node_id"] for n in nodes}

    shards = _sample_shards(n_shards=12, per_shard=16)
    (tmp_path / "in").mkdir()
    for name, keys in shards.items():
        (tmp_path / "in" / name).write_bytes(_shard_bytes(keys))
    n_images = sum(len(keys) for keys in shards.values())

    cmd = [
        sys.executable, "-m", "jobs.annotate",
        "--input", str(tmp_path / "in"),
        "--output", str(tmp_path / "out"),
        "--model", str(tiny_models["opt"]),
        "--model-cache-dir", str(temp / "model-cache"),
        "--questions", "What is in the picture?", "What colour is it?",
        "--max-new-tokens", "12",
        "--batch-size", "4",
        "--replicas", f"{MIN_REPLICAS}:{MAX_REPLICAS}",
        "--gpus-per-replica", "1",
        "--decode-concurrency", "2",  # fused read+decode tasks, one shard each
    ]  # fmt: skip
    env = _cluster_env({"RAY_ADDRESS": gcs})  # the driver joins this cluster, as under `ray job submit`
    started = time.monotonic()
    with GpuNodeWatcher(dashboard) as watcher:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
        job_s = time.monotonic() - started
    print(f"job {job_s:.1f}s; GPU nodes over time (s, count): {watcher.timeline()}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"annotated {n_images} images from {len(shards)} shards" in proc.stdout
    summary = json.loads((tmp_path / "out" / "_summary.json").read_text())
    assert summary["ok"] == n_images and summary["gpus_per_replica"] == 1.0

    # GPU nodes came while the job ran: at least one per minimum replica, never more than the max.
    gpu_nodes = watcher.seen()
    assert MIN_REPLICAS <= len(gpu_nodes) <= MAX_REPLICAS, watcher.timeline()

    # Every replica ran on a GPU node of its own; decoding ran on the CPU head.
    replicas, placed = _replica_nodes(dashboard)
    print(f"replicas created: {len(replicas)}, ran: {len(placed)}")
    assert placed and len(set(placed.values())) == len(placed)
    assert set(placed.values()) <= gpu_nodes
    tasks = _state(dashboard, "tasks")
    decode_nodes = {t["node_id"] for t in tasks if "MapBatches(read_and_decode)" in t["name"] and t["node_id"]}
    assert head_id in decode_nodes

    # The cluster shrinks back once the GPU nodes are idle.
    shrink_started = time.monotonic()
    while _gpu_nodes(_alive_nodes(dashboard)) and time.monotonic() - shrink_started < 60:
        time.sleep(1)
    print(f"GPU nodes gone {time.monotonic() - shrink_started:.1f}s after the job")
    assert not _gpu_nodes(_alive_nodes(dashboard))

    # The autoscaler's own account: GPU nodes added for the demand, removed as idle.
    events = re.findall(r":event_summary:(.*)", (temp / "session_latest" / "logs" / "monitor.log").read_text())
    assert any(re.fullmatch(r"Adding \d+ node\(s\) of type gpu_worker\.", e) for e in events), events
    assert any(re.fullmatch(r"Removing \d+ nodes? of type gpu_worker \(idle\)\.", e) for e in events), events


# --------------------------------------------------------------------------- 3. cluster.yaml

CLUSTER_YAML = REPO / "cluster.yaml"
CONSTRAINTS = REPO / "deploy" / "constraints.txt"
RAYJOB_YAML = REPO / "deploy" / "rayjob.yaml"
DOCKERFILE = REPO / "deploy" / "Dockerfile"
REPO_ON_NODE = "~/blip2-annotate"

SECRET_KEYS = re.compile(r"access_key|secret_key|secret_access|session_token|password|aws_credentials", re.I)
SECRET_VALUES = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b|-----BEGIN [A-Z ]*PRIVATE KEY-----")


def _walk(node, path=""):
    """(path, key, value) for every mapping entry and list item of a parsed YAML document."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield path, key, value
            yield from _walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield path, i, value
            yield from _walk(value, f"{path}[{i}]")


def _assert_no_secrets(text: str, doc) -> None:
    assert not SECRET_VALUES.search(text), "credential-like value in the file"
    for path, key, value in _walk(doc):
        assert not (isinstance(key, str) and SECRET_KEYS.search(key)), f"credential-like key {path}.{key}"
        if isinstance(value, str):
            assert not SECRET_KEYS.search(value.replace("\n", " ")) or "auth_token" in value, f"{path}.{key}: {value}"


def _constraints() -> dict[str, str]:
    """Normalised package name -> pinned version, from deploy/constraints.txt."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        (spec,) = req.specifier
        assert spec.operator == "==", f"constraints must pin exactly: {line}"
        pins[canonicalize_name(req.name)] = spec.version
    return pins


def _ray_image(pins: dict[str, str]) -> str:
    return f"rayproject/ray:{pins['ray']}-py311-gpu"


def _pip_installs(commands: list[str]) -> list[list[str]]:
    """Arguments after ``pip install`` in every command that runs one."""
    found = []
    for command in commands:
        for part in re.split(r"&&|;|\|\|", command):
            words = shlex.split(part)
            for i in range(len(words) - 1):
                if words[i].endswith("pip") and words[i + 1] == "install":
                    found.append(words[i + 2 :])
    return found


def _check_pinned_install(args: list[str], pins: dict[str, str], constraints_path: str) -> None:
    """A ``pip install`` that takes every version from the constraints file and installs nothing unlisted."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    assert "-c" in args and args[args.index("-c") + 1] == constraints_path, args
    skip_next = False
    for arg in args:
        if skip_next:
            skip_next = False
            continue
        if arg in ("-c", "-e", "--constraint", "--editable"):
            skip_next = arg in ("-c", "--constraint") or arg in ("-e", "--editable")
            continue
        if arg.startswith("-"):
            assert arg in ("--no-cache-dir",), f"unexpected pip option {arg}"
            continue
        req = Requirement(arg)
        assert canonicalize_name(req.name) in pins, f"{arg} is installed without a pinned version"
        assert not req.url and not req.specifier, f"{arg}: versions belong in the constraints file"


def test_constraints_pin_every_dependency_within_the_project_ranges():
    from importlib.metadata import requires

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = _constraints()
    runtime = [Requirement(r) for r in requires("blip2-annotate") if "extra ==" not in r]  # pyproject's dependencies
    assert runtime
    for req in runtime:
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} (a dependency in pyproject.toml) is not pinned in {CONSTRAINTS.name}"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} is outside {req.specifier}"
    for needed in ("boto3", "botocore", "aiobotocore"):  # the autoscaler's, and s3fs's fragile pair
        assert needed in pins


@pytest.mark.parametrize("path", [CLUSTER_YAML, RAYJOB_YAML, CONSTRAINTS, DOCKERFILE], ids=lambda p: p.name)
def test_deployment_files_hold_no_credentials(path):
    text = path.read_text()
    doc = yaml.safe_load(text) if path.suffix == ".yaml" else {}
    _assert_no_secrets(text, doc)


def test_cluster_yaml_passes_ray_up_validation():
    """The checks ``ray up`` runs before it talks to AWS: schema, defaults merged, cross-field rules."""
    import jsonschema
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(CLUSTER_YAML.read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(raw, schema)  # the file as written
    config = prepare_config(copy.deepcopy(raw))  # AWS defaults merged in, as `ray up` does
    validate_config(config)  # schema again, plus head type, min/max workers, synced-file rules

    assert config["provider"]["type"] == "aws" and "aws_credentials" not in config["provider"]
    assert 0 < config["idle_timeout_minutes"] <= 15
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["max_workers"] == 0 and not head["resources"].get("GPU")
    gpu_types = {name: t for name, t in types.items() if t["resources"].get("GPU", 0) >= 1}
    cpu_types = {name: t for name, t in types.items() if name != config["head_node_type"] and name not in gpu_types}
    assert gpu_types and cpu_types, "a GPU worker type for the replicas and a CPU-only type for decoding"
    for name in (*gpu_types, *cpu_types):
        assert types[name]["min_workers"] == 0 < types[name]["max_workers"], f"{name}: autoscaled from zero"
    assert sum(types[name]["max_workers"] for name in (*gpu_types, *cpu_types)) == config["max_workers"]
    for name, t in types.items():
        arn = t["node_config"]["IamInstanceProfile"]["Arn"]  # S3 through the instance profile
        assert re.fullmatch(r"arn:aws:iam::\d{12}:instance-profile/[\w+=,.@-]+", arn), (name, arn)

    # Pinned Ray and Python, and the project installed on every node at the tested versions.
    pins = _constraints()
    assert config["docker"]["image"] == _ray_image(pins)
    assert config["file_mounts"][REPO_ON_NODE] == "."
    assert ".gitignore" in config["rsync_filter"]
    for key in ("initialization_commands", "head_setup_commands", "worker_setup_commands"):
        for args in _pip_installs(config[key]):
            _check_pinned_install(args, pins, f"{REPO_ON_NODE}/deploy/constraints.txt")
    (setup,) = _pip_installs(config["setup_commands"])
    _check_pinned_install(setup, pins, f"{REPO_ON_NODE}/deploy/constraints.txt")
    assert setup[setup.index("-e") + 1] == REPO_ON_NODE

    # Token authentication on every node, with the token the launcher copies to each.
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        (start,) = [c for c in config[key] if "ray start" in c]
        assert "RAY_AUTH_MODE=token ray start" in start


def test_cluster_yaml_bootstraps_against_the_aws_api(s3_endpoint, tmp_path, monkeypatch):
    """What ``ray up`` does next, against a local AWS API (moto): instance types, key pair, network.

    Ray reads each node type's CPUs and GPUs from EC2's instance-type catalogue; the
    resources declared in cluster.yaml must agree with it (a GPU type that has no GPU
    would never host a replica).  Then the provider's bootstrap resolves key pair,
    subnets and security group, keeping the configured instance profiles.
    """
    from ray.autoscaler._private.aws import utils as aws_utils
    from ray.autoscaler._private.providers import _NODE_PROVIDERS
    from ray.autoscaler._private.util import prepare_config, validate_config

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)  # every boto3 client Ray makes goes to moto
    monkeypatch.setenv("HOME", str(tmp_path))  # the generated SSH key lands here
    aws_utils.resource_cache.cache_clear()
    aws_utils.client_cache.cache_clear()
    try:
        config = prepare_config(yaml.safe_load(CLUSTER_YAML.read_text()))
        provider_cls = _NODE_PROVIDERS["aws"](config["provider"])

        detected = copy.deepcopy(config)
        for t in detected["available_node_types"].values():
            t["resources"] = {}
        detected = provider_cls.fillout_available_node_types_resources(detected)
        for name, t in config["available_node_types"].items():
            if name == config["head_node_type"]:
                continue  # the head offers fewer CPUs than it has, on purpose
            found = detected["available_node_types"][name]["resources"]
            for resource in ("CPU", "GPU"):
                assert t["resources"].get(resource, 0) == found.get(resource, 0), (name, resource, found)

        config = provider_cls.fillout_available_node_types_resources(config)
        validate_config(config)
        resolved = provider_cls.bootstrap_config(config)
    finally:
        aws_utils.resource_cache.cache_clear()
        aws_utils.client_cache.cache_clear()

    assert Path(resolved["auth"]["ssh_private_key"]).is_file()
    raw = yaml.safe_load(CLUSTER_YAML.read_text())
    for name, t in resolved["available_node_types"].items():
        node_config = t["node_config"]
        assert node_config["KeyName"] and node_config["SubnetIds"] and node_config["SecurityGroupIds"], name
        assert (
            node_config["IamInstanceProfile"] == raw["available_node_types"][name]["node_config"]["IamInstanceProfile"]
        )


# --------------------------------------------------------------------------- 4. KubeRay

# KubeRay's CustomResourceDefinitions (../shared/kuberay/README.md): their v1 openAPIV3Schema is what the
# API server checks deploy/rayjob.yaml against, so a misspelt or mistyped field fails here, not at apply time.
KUBERAY_CRDS = REPO.parent / "shared" / "kuberay"


def _kuberay_crd(name: str) -> Path:
    path = KUBERAY_CRDS / name
    assert path.is_file(), (
        f"{path} is missing: the KubeRay CRDs live in ../shared/kuberay next to the repository "
        "(see ../shared/kuberay/README.md); CI has them, a checkout without ../shared cannot run this test"
    )
    return path


def test_kuberay_rayjob_matches_the_kuberay_crd_schema():
    """deploy/rayjob.yaml passes the RayJob CRD's v1 schema strictly (unknown fields are errors, as with
    ``kubectl apply --validate=strict``), and its rayClusterSpec passes the RayCluster CRD's."""
    doc = yaml.safe_load(RAYJOB_YAML.read_text())
    errors = schema_errors(_kuberay_crd("ray.io_rayjobs.yaml"), doc)
    assert not errors, "deploy/rayjob.yaml does not pass the RayJob CRD schema:\n" + "\n".join(errors)

    cluster = {
        "apiVersion": doc["apiVersion"],
        "kind": "RayCluster",
        "metadata": {"name": doc["metadata"]["name"]},
        "spec": doc["spec"]["rayClusterSpec"],
    }
    errors = schema_errors(_kuberay_crd("ray.io_rayclusters.yaml"), cluster)
    assert not errors, "rayClusterSpec does not pass the RayCluster CRD schema:\n" + "\n".join(errors)


def test_kuberay_crd_schema_check_reports_bad_fields_by_path():
    doc = yaml.safe_load(RAYJOB_YAML.read_text())
    group = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    group["minReplica"] = 0  # a misspelt field, which a non-strict API server would drop silently
    group["minReplicas"] = "zero"
    doc["kind"] = "RayJobs"
    errors = schema_errors(_kuberay_crd("ray.io_rayjobs.yaml"), doc)
    where = "$.spec.rayClusterSpec.workerGroupSpecs[0]"
    assert f"{where}: Additional properties are not allowed ('minReplica' was unexpected)" in errors, errors
    assert f"{where}.minReplicas: 'zero' is not of type 'integer'" in errors, errors
    assert "$.kind: 'RayJobs' is not 'RayJob'" in errors, errors
    assert len(errors) == 3, errors

    # The Kubernetes extensions count too: list-map keys are unique, and CEL rules are not passed unchecked.
    doc = yaml.safe_load(RAYJOB_YAML.read_text())
    head = doc["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head["ports"].append({"containerPort": 6379, "name": "gcs-again", "protocol": "TCP"})
    doc["spec"]["managedBy"] = "ray.io/kuberay-operator"
    errors = schema_errors(_kuberay_crd("ray.io_rayjobs.yaml"), doc)
    assert [e.split(":", 1)[0] for e in errors] == [
        "$.spec.managedBy",
        "$.spec.rayClusterSpec.headGroupSpec.template.spec.containers[0].ports",
    ], errors


def _quantity(value) -> float:
    """A Kubernetes CPU/GPU quantity: 4, "4", "500m"."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _container(group: dict) -> dict:
    (container,) = group["template"]["spec"]["containers"]
    return container


def test_kuberay_rayjob_runs_the_job_on_an_autoscaling_gpu_group():
    from jobs.settings import config_from_argv

    doc = yaml.safe_load(RAYJOB_YAML.read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob" and doc["metadata"]["name"]
    spec = doc["spec"]
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    workers = cluster["workerGroupSpecs"]
    # Field names and types are checked against KubeRay's CRDs: test_kuberay_rayjob_matches_the_kuberay_crd_schema.

    # The cluster lives for the job only, scales its workers, authenticates with a token.
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["authOptions"]["mode"] == "token"
    assert cluster["autoscalerOptions"]["idleTimeoutSeconds"] > 0

    # One pinned image everywhere, built from the pinned Ray image (deploy/Dockerfile).
    pins = _constraints()
    assert cluster["rayVersion"] == pins["ray"]
    images = {_container(g)["image"] for g in (head, *workers)}
    (image,) = images
    name, _, tag = image.rpartition(":")
    assert name and "/" not in tag and tag != "latest" and f"ray{pins['ray']}" in tag
    assert re.search(rf"^FROM {re.escape(_ray_image(pins))}$", DOCKERFILE.read_text(), re.M)
    (install,) = _pip_installs(re.findall(r"^RUN (.*)$", DOCKERFILE.read_text(), re.M))
    _check_pinned_install(install, pins, "deploy/constraints.txt")

    for group in (head, *workers):
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), "rayStartParams are strings"
        resources = _container(group)["resources"]
        assert resources["requests"] == resources["limits"], "requests == limits: Ray sizes itself from limits"
    assert "nvidia.com/gpu" not in _container(head)["resources"]["limits"]
    gpu_groups = [g for g in workers if _quantity(_container(g)["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1]
    assert gpu_groups
    for group in workers:
        assert 0 == group["minReplicas"] <= group["replicas"] <= group["minReplicas"] < group["maxReplicas"]

    # The entrypoint is this job, with flags the job's own parser accepts ...
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "-m", "jobs.annotate"]
    cfg = config_from_argv(argv[3:])
    assert all(url.startswith("s3://") for url in (*cfg.input.urls, cfg.output.url, cfg.model.model))
    # ... sized to fit the pods: a replica fits one GPU pod, the pool fits the GPU groups.
    res = cfg.resources
    assert res.gpus_per_replica == 1
    per_pod = {
        g["groupName"]: (
            int(_quantity(_container(g)["resources"]["limits"]["nvidia.com/gpu"]) // res.gpus_per_replica),
            _quantity(_container(g)["resources"]["limits"]["cpu"]),
        )
        for g in gpu_groups
    }
    assert all(replicas >= 1 and cpu >= res.cpus_per_replica * replicas for replicas, cpu in per_pod.values())
    assert res.replicas_max <= sum(g["maxReplicas"] * per_pod[g["groupName"]][0] for g in gpu_groups)
    assert spec["entrypointNumCpus"] <= float(head["rayStartParams"]["num-cpus"])
    # Weights are cached on a volume of each GPU pod.
    for group in gpu_groups:
        mounts = {m["mountPath"] for m in _container(group).get("volumeMounts", [])}
        assert cfg.model.cache_dir in mounts, group["groupName"]
    for group in (head, *workers):
        for env in _container(group).get("env", []):
            assert not env["name"].startswith("AWS_"), "S3 access comes from the service account"
