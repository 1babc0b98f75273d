"""A worker node lost mid-run, as a spot preemption loses it: the run finishes by itself, exactly once.

A three-node cluster of ``ray start --block`` processes (tests/test_cluster.py's
``RayNode``), each in its own temp dir so that killing one node's process tree
spares the others:

* the head: no CPUs, so only the driver (``RAY_ADDRESS``), Ray Data's own actors and the
  usage meter, which a zero-CPU actor is free to leave: without its pin it landed on a worker;
* a replica node: 2 CPUs and too little memory for a decode task, so it holds the
  one model replica (``--cpus-per-replica 2``) and no decoding;
* a decode node: 1 CPU, so it holds every read+decode task and never a replica.

The writers reserve nothing and run on any node.

Once the driver has written some shard markers (a count, not a delay), the test
SIGKILLs one worker node's whole process tree (raylet, agents, workers) and
starts a fresh node of the same kind.  The run must end rc 0 with its summary and
cost figures, every input row once in the output, and progress never above the total.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import free_port, output_ids, read_markers, write_tar
from imagefactory import jpeg_bytes
from test_cluster import (
    RayNode,
    _assert_still_alive,
    _auth_token,
    _cluster_env,
    _node_args,
    _psutil,
    _session_raylets,
    _short_tmp,
)

REPO = Path(__file__).resolve().parents[1]
N_SHARDS, PER_SHARD = 10, 6
KILL_AFTER_MARKERS = 2
DECODE_MEMORY = 2 * 1024**3  # room for decode tasks (512 MiB each, workers/pipeline.py)
NO_DECODE_MEMORY = 256 * 1024**2  # less than one decode task reserves
# Seconds, not a synchronisation: how long a step may take before the test gives up with what it saw.
STEP_TIMEOUT_S = 240


class Cluster:
    """Head plus named worker nodes, each its own ``RayNode`` and temp dir."""

    def __init__(self) -> None:
        self.port = free_port()
        self.nodes: dict[str, RayNode] = {}
        self.temps: list[Path] = []
        system = {
            # A dead node is declared dead in ~2 s instead of ~15 s: the test waits less.
            "health_check_period_ms": 500,
            "health_check_failure_threshold": 4,
            # Blocks of a few tiny 32x32 images would be inlined into the driver's memory (< 100 KB);
            # stored in the node's object store, as blocks of real images are, they are lost with it.
            "max_direct_call_object_size": 1024,
        }
        self._start("head", ["--head", f"--port={self.port}", "--include-dashboard=false",
                             f"--dashboard-port={free_port()}",
                             f"--ray-client-server-port={free_port()}", "--num-cpus=0",
                             f"--system-config={json.dumps(system)}"])  # fmt: skip

    def _start(self, name: str, args: list[str]) -> RayNode:
        temp = _short_tmp(f"nl-{name}-")
        self.temps.append(temp)
        node = RayNode([*args, *_node_args(temp)], _cluster_env(), temp, name)
        self.nodes[name] = node
        node.wait_started()
        return node

    def add(self, name: str, kind: str) -> RayNode:
        resources = {
            "replica": ["--num-cpus=2", f"--memory={NO_DECODE_MEMORY}"],
            "decode": ["--num-cpus=1", f"--memory={DECODE_MEMORY}"],
        }[kind]
        return self._start(name, [f"--address=127.0.0.1:{self.port}", *resources])

    def titles(self, name: str) -> list[str]:
        """Command lines of the node's worker processes (Ray titles them ``ray::<task or actor>``)."""
        psutil = _psutil()
        try:
            procs = psutil.Process(self.nodes[name].proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        titles = []
        for p in procs:
            try:
                titles.append(" ".join(p.cmdline()))
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                pass
        return [t.split()[0] for t in titles if t.startswith("ray::")]  # Ray pads its titles with spaces

    def close(self) -> None:
        for node in reversed(self.nodes.values()):
            node.kill()
        for temp in self.temps:
            shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture()
def three_node_cluster():
    _auth_token()  # token authentication, as tests/test_cluster.py's clusters and cluster.yaml use
    others = _session_raylets()
    cluster = Cluster()
    try:
        cluster.add("replica", "replica")
        cluster.add("decode", "decode")
        yield cluster
    finally:
        cluster.close()
        _assert_still_alive(others)


def _inputs(folder: Path, photos) -> set[str]:
    names = sorted(photos)
    ids = set()
    for s in range(N_SHARDS):
        path = folder / f"{s:03d}.tar"
        members = [(f"{s:03d}_{i}.jpg", jpeg_bytes(photos[names[(s + i) % 4]][: 80 + 4 * i, : 80 + 4 * s]))
                   for i in range(PER_SHARD)]  # fmt: skip
        write_tar(path, members)
        ids |= {f"{path}::{s:03d}_{i}" for i in range(PER_SHARD)}
    return ids


def _wait_for(what: str, check, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + STEP_TIMEOUT_S
    while not check():
        if proc.poll() is not None:
            pytest.fail(f"the driver ended (rc {proc.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {STEP_TIMEOUT_S}s")
        time.sleep(0.1)


def _ran(node: RayNode, task: str) -> bool:
    """Whether ``task`` ran on ``node``: Ray marks each task's start (``:task_name:...``) in its worker's log."""
    return any(task in p.read_text(errors="replace") for p in node.temp.glob("session_*/logs/worker-*"))


@pytest.mark.slow
@pytest.mark.parametrize("lost", ["replica", "decode"], ids=["node-with-the-replica", "node-with-decode-tasks"])
def test_a_node_lost_mid_run_and_replaced_the_run_finishes_by_itself_exactly_once(
    three_node_cluster, tmp_path, tiny_models, photos, lost
):
    cluster = three_node_cluster
    expected = _inputs(tmp_path / "in", photos)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "jobs.annotate", "--input", str(tmp_path / "in"), "--output", str(out),
           "--model", str(tiny_models["opt"]), "--max-new-tokens", "4", "--batch-size", "4",
           "--cpus-per-replica", "2", "--progress-interval-s", "0"]  # fmt: skip
    env = _cluster_env({"RAY_ADDRESS": f"127.0.0.1:{cluster.port}"})
    log = tmp_path / "driver.log"
    with open(log, "w") as sink:  # a file, not a pipe: nobody reads while the test waits
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(
            f"{KILL_AFTER_MARKERS} shard markers", lambda: len(read_markers(out)) >= KILL_AFTER_MARKERS, proc, log
        )
        at_kill = {name: cluster.titles(name) for name in cluster.nodes}
        marked_at_kill = len(read_markers(out))
        cluster.nodes[lost].kill()  # SIGKILL of raylet, agents and workers, without warning
        fresh = cluster.add(f"{lost}-fresh", lost)
        proc.wait(timeout=STEP_TIMEOUT_S * 2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stdout = log.read_text()
    at_kill = {name: sorted(set(titles)) for name, titles in at_kill.items()}
    print("worker processes when the node was killed:", at_kill)
    print(stdout[-4000:])
    assert proc.returncode == 0, stdout[-4000:]
    # Where things were when the node went: the killed node held what this case is about.
    replicas_on = [name for name, titles in at_kill.items() if any("Blip2Replica" in t for t in titles)]
    assert replicas_on == ["replica"], at_kill
    assert any("UsageMeter" in t for t in at_kill["head"]), at_kill["head"]  # the meter lives with the driver
    assert marked_at_kill < N_SHARDS, "every shard was marked before the kill"
    # What the lost node held was redone on the fresh one (the only node of its kind left).
    redone = "Blip2Replica" if lost == "replica" else "read_and_decode"
    assert _ran(fresh, redone), f"the fresh node ran no {redone}"

    ids = output_ids(out)
    assert len(ids) == len(set(ids)) and set(ids) == expected  # every input row exactly once
    summary = json.loads((out / "_summary.json").read_text())
    assert (summary["shards_this_run"], summary["shards_skipped_as_done"]) == (N_SHARDS, 0)  # one run did it all
    assert summary["rows_this_run"] == summary["ok"] == len(expected)
    assert f"annotated {len(expected)} images from {N_SHARDS} shards" in stdout
    cost = summary["cost"]
    assert cost["unknown_reason"] is None and cost["replicas"] >= 1 and cost["device_seconds_held"] > 0, cost
    if lost == "replica":
        assert cost["replicas"] >= 2, cost  # the lost replica and its restart both held a device
    progress = [(int(d), int(t)) for d, t in re.findall(r"progress: (\d+)/(\d+) images", stdout)]
    assert progress and all(done <= total for done, total in progress), progress
    assert progress[-1] == (len(expected), len(expected)), progress


PLACEMENT_SCRIPT = """
import json, ray
from ray._private import state
from jobs.annotate import start_meter
ray.init()
meters = [start_meter(f"blip2-usage-placement-{i}") for i in range(METERS)]
ray.get([m.totals.remote() for m in meters])  # all of them started
nodes = [a["Address"]["NodeID"] for a in state.actors().values() if a["ActorClassName"] == "UsageMeter"]
print(json.dumps({"driver": ray.get_runtime_context().get_node_id(), "meters": nodes}))
"""


@pytest.mark.slow
def test_the_usage_meter_starts_on_the_drivers_node_with_other_nodes_to_choose_from(three_node_cluster):
    """Without its pin, a zero-CPU actor lands on any node (it did, on the node the test above kills):
    with three nodes, twelve meters all on the driver's by chance is a 1 in 500,000 event."""
    env = _cluster_env({"RAY_ADDRESS": f"127.0.0.1:{three_node_cluster.port}"})
    script = PLACEMENT_SCRIPT.replace("METERS", "12")
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=STEP_TIMEOUT_S)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    placed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(placed["meters"]) == 12 and set(placed["meters"]) == {placed["driver"]}, placed
