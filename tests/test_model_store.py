"""Resolving and fetching weights: local, tiny-random, s3:// (once per node), Hub (fails fast offline)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import s3fs

from workers import model_store, tiny_model
from workers.config import ModelSpec, StorageOptions
from workers.model_store import (
    ModelLoadError,
    ModelUnavailableError,
    check_model_reachable,
    model_kind,
    model_revision,
    resolve_model_dir,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def _upload(local: Path, s3_endpoint: str, bucket: str, prefix: str, extra: dict[str, bytes] | None = None) -> str:
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    for path in sorted(local.iterdir()):
        client.upload_file(str(path), bucket, f"{prefix}/{path.name}")
    for name, body in (extra or {}).items():
        client.put_object(Bucket=bucket, Key=f"{prefix}/{name}", Body=body)
    return f"s3://{bucket}/{prefix}"


def _pickle_only_dir(path: Path, tiny: Path) -> Path:
    path.mkdir()
    for name in ("config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny / name, path / name)
    (path / "pytorch_model.bin").write_bytes(b"not really a pickle")
    return path


@pytest.mark.parametrize(
    ("model", "kind"),
    [
        ("tiny-random", "tiny"),
        ("tiny-random-t5", "tiny"),
        ("Salesforce/blip2-opt-2.7b", "hub"),
        ("gpt2", "hub"),
        ("s3://bucket/models/blip2", "remote"),
        ("gs://bucket/models/blip2", "remote"),
        ("file:///models/blip2", "local"),
        ("/models/blip2", "local"),
        ("./blip2", "local"),
        ("a/b/c", "local"),
    ],
)
def test_model_kind(model, kind):
    assert model_kind(model) == kind


def test_local_directory_resolves_to_itself(tiny_models, tmp_path):
    spec = ModelSpec(model=str(tiny_models["t5"]))
    assert resolve_model_dir(spec, StorageOptions(), str(tmp_path)) == tiny_models["t5"].resolve()
    assert model_revision(tiny_models["t5"], spec) is None
    assert not list(tmp_path.iterdir())  # nothing cached for a local directory
    info = check_model_reachable(spec, StorageOptions())
    assert info == {
        "height": tiny_model.IMAGE_SIZE,
        "width": tiny_model.IMAGE_SIZE,
        "resample": 3,
        "model_type": "blip-2",
        "text_model_type": "t5",
        "revision": None,
    }
    file_url = ModelSpec(model=f"file://{tiny_models['t5']}")
    assert resolve_model_dir(file_url, StorageOptions(), None) == tiny_models["t5"].resolve()


def test_missing_local_directory_is_a_clear_error(tmp_path):
    spec = ModelSpec(model=str(tmp_path / "nope"))
    with pytest.raises(ModelUnavailableError, match="does not exist"):
        check_model_reachable(spec, StorageOptions())
    with pytest.raises(ModelUnavailableError, match="does not exist"):
        resolve_model_dir(spec, StorageOptions(), None)


def test_pickle_only_directory_is_refused(tiny_models, tmp_path):
    path = _pickle_only_dir(tmp_path / "pickled", tiny_models["opt"])
    spec = ModelSpec(model=str(path))
    for call in (
        lambda: check_model_reachable(spec, StorageOptions()),
        lambda: resolve_model_dir(spec, StorageOptions()),
    ):
        with pytest.raises(ModelUnavailableError, match=r"only pickle weights \(pytorch_model\.bin\).*safetensors"):
            call()
    assert issubclass(ModelUnavailableError, ModelLoadError)


def test_tiny_random_is_built_once_into_the_cache(tmp_path, monkeypatch):
    calls = []
    real_build = tiny_model.build_tiny_blip2

    def counting_build(out_dir, flavor="opt", seed=0):
        calls.append(flavor)
        time.sleep(0.2)  # widen the race window
        return real_build(out_dir, flavor=flavor, seed=seed)

    monkeypatch.setattr(tiny_model, "build_tiny_blip2", counting_build)
    spec = ModelSpec(model="tiny-random")
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(resolve_model_dir(spec, StorageOptions(), str(tmp_path))))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [tmp_path / "tiny-random-opt"] * 2
    assert calls == ["opt"]
    assert resolve_model_dir(spec, StorageOptions(), str(tmp_path)) == tmp_path / "tiny-random-opt"
    assert calls == ["opt"]
    assert (tmp_path / "tiny-random-opt" / "model.safetensors").is_file()
    # spec.cache_dir wins over the caller's cache root
    own = tmp_path / "own"
    assert model_store._cache_root(ModelSpec(model="tiny-random", cache_dir=str(own)), str(tmp_path)) == own
    assert model_store._tiny_target(ModelSpec(model="tiny-random-t5"), tmp_path).name == "tiny-random-t5"

    info = check_model_reachable(ModelSpec(model="tiny-random-t5"), StorageOptions())
    assert (info["height"], info["width"], info["text_model_type"]) == (tiny_model.IMAGE_SIZE,) * 2 + ("t5",)


_FETCHER = textwrap.dedent(
    """
    import json, sys, time
    from workers import model_store
    from workers.config import ModelSpec, StorageOptions

    url, endpoint, cache, log = sys.argv[1:5]
    real = model_store._fetch_prefix

    def logged(*args, **kwargs):
        with open(log, "a") as f:
            f.write("fetch\\n")
        time.sleep(0.5)  # hold the lock long enough for the other process to queue up
        return real(*args, **kwargs)

    model_store._fetch_prefix = logged
    path = model_store.resolve_model_dir(ModelSpec(model=url), StorageOptions(endpoint_url=endpoint), cache)
    print(json.dumps(str(path)))
    """
)


def test_s3_prefix_is_fetched_once_per_node(tiny_models, s3_endpoint, s3_bucket, s3_storage, tmp_path):
    url = _upload(
        tiny_models["opt"],
        s3_endpoint,
        s3_bucket,
        "models/blip2-tiny",
        extra={"pytorch_model.bin": b"pickle next to safetensors: never copied", "README.md": b"# notes"},
    )
    spec = ModelSpec(model=url)
    info = check_model_reachable(spec, s3_storage)
    assert (info["height"], info["width"], info["resample"], info["text_model_type"]) == (32, 32, 3, "opt")

    cache = tmp_path / "cache"
    log = tmp_path / "fetches.log"
    # Two replicas on one node, as separate processes, racing for the same prefix.
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _FETCHER, url, s3_endpoint, str(cache), str(log)],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outputs]
    paths = {json.loads(out.strip().splitlines()[-1]) for out, _ in outputs}
    assert len(paths) == 1
    assert log.read_text().splitlines() == ["fetch"]

    target = Path(paths.pop())
    assert target.parent == cache
    names = {p.name for p in target.iterdir()}
    assert names == {p.name for p in tiny_models["opt"].iterdir()}  # no .bin, no README
    for name in names:
        assert (target / name).read_bytes() == (tiny_models["opt"] / name).read_bytes()
    assert not [p for p in cache.iterdir() if ".partial-" in p.name]

    # In-process callers (threads) find the completed copy without fetching again.
    before = log.read_text()
    assert resolve_model_dir(spec, s3_storage, str(cache)) == target
    assert log.read_text() == before
    # A different revision is a different cache entry.
    assert model_store._remote_target(ModelSpec(model=url, revision="v2"), cache) != target


def test_s3_pickle_only_prefix_is_refused(tiny_models, s3_endpoint, s3_bucket, s3_storage, tmp_path):
    local = _pickle_only_dir(tmp_path / "pickled", tiny_models["opt"])
    url = _upload(local, s3_endpoint, s3_bucket, "pickled")
    spec = ModelSpec(model=url)
    with pytest.raises(ModelUnavailableError, match="only pickle weights"):
        check_model_reachable(spec, s3_storage)
    with pytest.raises(ModelUnavailableError, match="only pickle weights"):
        resolve_model_dir(spec, s3_storage, str(tmp_path / "cache"))
    assert not [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]


def test_s3_missing_prefix_fails_fast(s3_bucket, s3_storage):
    start = time.monotonic()
    with pytest.raises(ModelUnavailableError, match="s3://"):
        check_model_reachable(ModelSpec(model=f"s3://{s3_bucket}/no/such/model"), s3_storage)
    assert time.monotonic() - start < 10


def test_hub_id_offline_fails_fast_with_the_fix(tmp_path):
    spec = ModelSpec(model="Salesforce/blip2-opt-2.7b", cache_dir=str(tmp_path))
    start = time.monotonic()
    with pytest.raises(ModelUnavailableError) as excinfo:
        check_model_reachable(spec, StorageOptions())
    # Fails rather than hangs: a generous bound, far below the minutes a retrying download takes.
    assert time.monotonic() - start < 10
    message = str(excinfo.value)
    assert "Salesforce/blip2-opt-2.7b" in message
    assert "hf download Salesforce/blip2-opt-2.7b --local-dir DIR" in message
    assert "--model DIR" in message and "s3://" in message and "--model tiny-random" in message

    start = time.monotonic()
    with pytest.raises(ModelUnavailableError, match="hf download Salesforce/blip2-opt-2.7b"):
        resolve_model_dir(spec, StorageOptions(), None)
    assert time.monotonic() - start < 10


def _named_commands(message: str) -> list[list[str]]:
    """The shell commands a fix-it message names: each `backticked` span that starts with a program name."""
    return [span.split() for span in re.findall(r"`([^`]+)`", message) if re.match(r"[A-Za-z][\w.-]*( |$)", span)]


def _installed_executable(name: str) -> str:
    """``name`` as installed next to this interpreter (the virtualenv's bin/), else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    assert found, f"the message names `{name}`, which is neither in {beside.parent} nor on PATH"
    return found


def _assert_command_exists(command: list[str]) -> None:
    """``command`` (e.g. ``hf download REPO --local-dir DIR``) runs in the installed tools: its program and
    subcommand answer ``--help`` with exit code 0, and every ``--flag`` it uses is in that help."""
    exe = _installed_executable(command[0])
    subcommand = [word for word in command[1:2] if not word.startswith("-")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "NO_COLOR": "1"}
    outputs = []
    for args in ([exe, "--help"], [exe, *subcommand, "--help"]):
        result = subprocess.run(args, capture_output=True, text=True, timeout=60, env=env)
        assert result.returncode == 0, (
            f"`{' '.join(command)}` names a command that does not work: {args} exited {result.returncode}\n"
            f"{result.stdout[-2000:]}{result.stderr[-2000:]}"
        )
        outputs.append(result.stdout)
    for flag in (word.split("=", 1)[0] for word in command[1:] if word.startswith("--")):
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", outputs[-1]), (
            f"`{' '.join(command)}` uses {flag}, which `{command[0]} {' '.join(subcommand)} --help` does not list"
        )


def test_fix_it_messages_name_commands_that_the_installed_tools_accept(tmp_path):
    """The commands the offline / not-a-model-directory messages tell the user to run exist, with those flags,
    in the installed huggingface_hub (1.x ships ``hf``; its old CLI name is only a stub that exits 1)."""
    with pytest.raises(ModelUnavailableError) as offline:
        check_model_reachable(ModelSpec(model="Salesforce/blip2-opt-2.7b", cache_dir=str(tmp_path)), StorageOptions())
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    (not_a_model / "weights.safetensors").write_bytes(b"")
    with pytest.raises(ModelUnavailableError, match="no config.json") as no_config:
        check_model_reachable(ModelSpec(model=str(not_a_model)), StorageOptions())

    for excinfo in (offline, no_config):
        message = str(excinfo.value)
        commands = [command for command in _named_commands(message) if "download" in command]
        assert commands, f"the message names no download command: {message}"
        for command in commands:
            _assert_command_exists(command)


def test_hub_id_found_in_the_local_cache_offline_pins_the_commit(tiny_models, tmp_path):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--blip2-tiny"
    shutil.copytree(tiny_models["opt"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    spec = ModelSpec(model="acme/blip2-tiny", cache_dir=str(tmp_path))

    info = check_model_reachable(spec, StorageOptions())
    assert info["revision"] == commit
    assert (info["height"], info["width"]) == (32, 32)
    path = resolve_model_dir(spec, StorageOptions(), None)
    assert path == repo / "snapshots" / commit
    assert model_revision(path, spec) == commit


@pytest.mark.parametrize(
    ("pre", "expected"),
    [
        ({"size": {"height": 224, "width": 224}, "resample": 3}, (224, 224, 3)),
        ({"size": 364}, (364, 364, 3)),
        ({"size": {"shortest_edge": 384}, "resample": 2}, (384, 384, 2)),
        ({"image_processor": {"size": {"height": 30, "width": 40}, "resample": 3}}, (30, 40, 3)),
    ],
)
def test_image_settings(pre, expected):
    got = model_store.image_settings(pre)
    assert (got["height"], got["width"], got["resample"]) == expected


def test_non_blip2_checkpoint_is_refused(tiny_models, tmp_path):
    path = tmp_path / "other"
    shutil.copytree(tiny_models["opt"], path)
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "llava"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelUnavailableError, match="BLIP-2"):
        check_model_reachable(ModelSpec(model=str(path)), StorageOptions())


def _replica_actors(job_hex: str) -> dict[str, dict]:
    """The job's model replicas in the GCS actor table (the session cluster runs no dashboard
    for the state API; ``ray._private.state`` reads the same table straight from the GCS)."""
    import ray
    from ray._private import state

    return {
        actor_id: info
        for actor_id, info in state.actors(job_id=ray.JobID.from_hex(job_hex)).items()
        if "Blip2Replica" in info["ActorClassName"]
    }


@pytest.mark.slow
def test_two_replicas_on_one_node_fetch_s3_weights_once(ray_cluster, tiny_models, s3_endpoint, s3_bucket, s3_storage,
                                                        tmp_path, photos, monkeypatch):  # fmt: skip
    """Through the real pipeline: two model replicas on this one-node cluster both load, one download of the weights.

    Both replicas are asked for at the start (``--replicas 2``), but Ray Data starts them
    without waiting, so a run this small could end before the second had loaded (and
    "one download" would prove nothing).  Ray Data's ``wait_for_min_actors_s`` makes the
    pool wait for both before any work starts.
    """
    from faulty_proxy import FaultyProxy
    from helpers import write_tar
    from imagefactory import jpeg_bytes

    from jobs.annotate import main

    fs = s3fs.S3FileSystem(**s3_storage.fsspec_options())
    fs.put(str(tiny_models["opt"]) + "/", f"{s3_bucket}/models/tiny/", recursive=True)
    (tmp_path / "in").mkdir()
    for s in range(4):
        members = [(f"{s}{i}.jpg", jpeg_bytes(photos["coffee"][: 100 + i, : 100 + s])) for i in range(3)]
        write_tar(tmp_path / "in" / f"{s}.tar", members)
    job_hex = ray_cluster.get_runtime_context().get_job_id()
    before = set(_replica_actors(job_hex))
    import ray.data

    monkeypatch.setattr(ray.data.DataContext.get_current(), "wait_for_min_actors_s", 300)
    with FaultyProxy(s3_endpoint, every=0) as counter:
        code = main(
            ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--endpoint-url", counter.url,
             "--model", f"s3://{s3_bucket}/models/tiny", "--model-cache-dir", str(tmp_path / "cache"),
             "--replicas", "2", "--cpus-per-replica", "0.5", "--batch-size", "1", "--max-new-tokens", "2"]
        )  # fmt: skip
    assert code == 0
    replicas = {k: v for k, v in _replica_actors(job_hex).items() if k not in before}
    print({k[:8]: (v["State"], v["Pid"], v["StartTime"], v["NumRestarts"]) for k, v in replicas.items()})
    # Started means constructed: the GCS sets an actor's start time when its __init__
    # (here: fetch and load the weights) has returned.
    loaded = {k: v for k, v in replicas.items() if v["StartTime"] > 0 and v["Pid"] > 0}
    assert len(loaded) == 2, replicas
    assert len({v["Pid"] for v in loaded.values()}) == 2  # two processes, each with its own copy in memory
    assert not any(v["DeathCause"].HasField("creation_task_failure_context") for v in replicas.values())
    weight_gets = counter.paths[f"GET /{s3_bucket}/models/tiny/model.safetensors"]
    assert weight_gets == 1, counter.paths
    summary = json.loads((tmp_path / "out" / "_summary.json").read_text())
    assert (summary["ok"], summary["shards"]) == (12, 4)
