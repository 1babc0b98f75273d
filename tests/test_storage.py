"""One fsspec code path (workers/storage.py) that rides out flaky S3.

Faults come from a real proxy on 127.0.0.1 in front of the moto server
(tests/faulty_proxy.py): every few requests it answers 503 SlowDown or drops
the connection, on listing, reads and writes alike; named objects can answer
500 InternalError for a burst of requests or for good (an outage).
"""

from __future__ import annotations

import json

import pytest
import s3fs
from faulty_proxy import FaultyProxy
from helpers import output_ids, tar_bytes
from imagefactory import jpeg_bytes

from jobs.annotate import main
from workers.config import ConfigError, InputSpec, OutputSpec, StorageOptions
from workers.storage import (
    UnsafeURLError,
    filesystem_for,
    input_root,
    is_local,
    is_under,
    join,
    protocol_of,
    refuse_command_url,
    relative_path,
)


@pytest.mark.parametrize("url", ["pipe:curl -s http://x/a.tar", " PIPE:cat a.tar", "exec:rm -rf /", "shell:ls"])
def test_command_running_urls_are_refused_everywhere_by_one_check(url):
    with pytest.raises(UnsafeURLError, match="input: .* uses a command-running scheme"):
        refuse_command_url(url, "input")
    with pytest.raises(ConfigError, match="^input: .*command-running"):
        InputSpec(urls=(url,))
    with pytest.raises(ConfigError, match="^output: .*command-running"):
        OutputSpec(url=url)
    refuse_command_url("s3://bucket/pipe:odd-but-plain.tar", "input")  # only the scheme counts


def test_local_and_relative_paths():
    assert is_local("/data/x") and is_local("file:///data/x") and is_local("rel/x")
    assert not is_local("s3://b/k") and not is_local("gs://b/k")
    assert relative_path("s3://b/in/a/x.jpg", "s3://b/in") == "a/x.jpg"
    assert relative_path("s3://b/in/a/x.jpg", "s3://b/in/") == "a/x.jpg"
    assert relative_path("/other/x.jpg", "/data") == "x.jpg"  # named explicitly, outside the root
    assert relative_path("/data-2/x.jpg", "/data") == "x.jpg"  # a sibling that shares the prefix is outside


@pytest.mark.parametrize(("url", "inside"), [
    ("/data/in/a.jpg", True), ("/data/in", True), ("file:///data/in/sub/a.tar", True), ("local:///data/in/a", True),
    ("/data//in/./a.jpg", True), ("/data/in-other/a.jpg", False), ("/data/i", False), ("/data/in/../etc/passwd", False),
    ("/data/in/sub/../../x", False), ("/data/in/a.jpg::http://x/", False), ("/data", False), ("/etc/passwd", False),
    ("s3://b/in/a.jpg", True), ("s3a://b/in/a.jpg", True), ("s3://b/in-other/a.jpg", False), ("s3://B/in/a.jpg", False),
    ("s3://b2/in/a.jpg", False), ("s3://b/In/a.jpg", False), ("s3://b/in/%2e%2e/x.jpg", False),
    ("gs://b/in/a.jpg", False), ("http://127.0.0.1:9/data/in/a.jpg", False), ("data:image/jpeg;base64,AA", False),
])  # fmt: skip
def test_is_under_compares_whole_segments(url, inside):
    assert is_under(url, ["/data/in", "s3://b/in/"]) is inside


def test_is_under_resolves_local_spellings_like_fsspec(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_under("in/a.jpg", [str(tmp_path / "in")]) and is_under(str(tmp_path / "in" / "a.jpg"), ["file://in"])
    assert is_under(f"{tmp_path}/x/../in/a.jpg", [f"{tmp_path}/x/../in"])  # the job's own spelling
    assert not is_under("in/a.jpg", []) and not is_under("http://h/in/a.jpg", ["/"]) and is_under("/etc/x", ["/"])


def test_input_roots_are_spelled_as_the_listing_spells_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert input_root("in/") == input_root(f"file://{tmp_path}/in") == f"{tmp_path}/in"
    assert input_root("s3a://b/in/") == "s3://b/in" and input_root("s3://b/x/**/*.tar") == "s3://b/x"
    assert input_root("/data/shards-*.tar") == "/data" and input_root("/data/in/one.tar") == "/data/in/one.tar"
    assert input_root("simplecache::s3://b/in") == "simplecache::s3://b/in"  # chained: holds nothing
    assert not is_under("s3://b/in/a.tar", [input_root("simplecache::s3://b/in")])


def test_protocols_and_join():
    assert protocol_of("/data/x") == "file" and protocol_of("s3://b/k") == "s3"
    assert join("s3://b/out/", "shard=a", "f.parquet") == "s3://b/out/shard=a/f.parquet"
    fs, path = filesystem_for("s3://bucket/key", StorageOptions(endpoint_url="http://127.0.0.1:1"))
    assert path == "bucket/key" and fs.client_kwargs["endpoint_url"] == "http://127.0.0.1:1"


def test_s3_clients_retry_adaptively_as_documented():
    """retry_attempts counts retries after the first attempt: 10 (the default) allows 11 attempts."""
    for retries, attempts in ((10, 11), (1, 2)):
        fs, _ = filesystem_for("s3://bucket/key", StorageOptions(endpoint_url="http://127.0.0.1:1",
                                                                 retry_attempts=retries))  # fmt: skip
        fs.connect()
        assert fs.s3.meta.config.retries == {"mode": "adaptive", "total_max_attempts": attempts}


def test_flaky_endpoint_list_read_write_are_retried(s3_endpoint, s3_bucket):
    with FaultyProxy(s3_endpoint, every=3) as proxy:
        fs, root = filesystem_for(f"s3://{s3_bucket}/f", StorageOptions(endpoint_url=proxy.url))
        fs.invalidate_cache()
        for i in range(12):
            fs.pipe_file(f"{root}/{i:02d}.bin", bytes([i]) * 1000)
        for _ in range(6):  # listing meets both faults too
            assert len(fs.ls(root, refresh=True)) == 12
        assert all(fs.cat_file(f"{root}/{i:02d}.bin") == bytes([i]) * 1000 for i in range(12))
    assert proxy.faults["PUT 503"] and proxy.faults["PUT drop"] and proxy.faults["GET 503"] + proxy.faults["GET drop"]
    assert proxy.faults["LIST 503"] and proxy.faults["LIST drop"], proxy.faults


@pytest.mark.parametrize("retry_attempts", [10, 0], ids=["ours", "botocore-retries-off"])
def test_a_burst_longer_than_s3fs_absorbs_is_ridden_out_by_botocore_retries(s3_endpoint, s3_bucket, retry_attempts):
    """Three 500 InternalErrors in a row on one object: s3fs retries only throttling and
    connection errors itself, so without botocore's retries the first one is final."""
    import s3fs

    s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}).pipe_file(f"{s3_bucket}/burst.bin", b"x" * 100)
    with FaultyProxy(s3_endpoint, every=0) as proxy:
        proxy.failures_left[f"GET /{s3_bucket}/burst.bin"] = 3
        # retry_attempts=0 is what StorageOptions refuses; build it as botocore would get it.
        storage = StorageOptions(endpoint_url=proxy.url)
        options = storage.fsspec_options()
        options["config_kwargs"]["retries"]["max_attempts"] = retry_attempts
        fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
        if retry_attempts:
            assert fs.cat_file(f"{s3_bucket}/burst.bin") == b"x" * 100
            assert proxy.faults["GET 500"] == 3
        else:
            with pytest.raises(OSError):
                fs.cat_file(f"{s3_bucket}/burst.bin")
            assert proxy.faults["GET 500"] == 1


@pytest.mark.slow
def test_pipeline_over_flaky_s3_is_complete_and_not_duplicated(ray_cluster, s3_endpoint, s3_bucket, tiny_models,
                                                               photos):  # fmt: skip
    direct = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    expected = set()
    for s in range(4):
        members = [(f"{s}-{i}.jpg", jpeg_bytes(photos["chelsea"][: 100 + 10 * i, : 120 + 10 * s])) for i in range(3)]
        expected |= {f"s3://{s3_bucket}/in/{s}.tar::{s}-{i}" for i in range(3)}
        direct.pipe_file(f"{s3_bucket}/in/{s}.tar", tar_bytes(members))

    with FaultyProxy(s3_endpoint, every=3) as proxy:
        code = main(
            ["--input", f"s3://{s3_bucket}/in/", "--output", f"s3://{s3_bucket}/out", "--endpoint-url", proxy.url,
             "--model", str(tiny_models["opt"]), "--max-new-tokens", "3"]
        )  # fmt: skip
    assert code == 0
    faulted = {k.split()[0] for k in proxy.faults}
    assert {"GET", "PUT"} <= faulted and "LIST" in faulted, (proxy.faults, proxy.requests)  # all kinds hit faults
    ids = output_ids(f"s3://{s3_bucket}/out", {"client_kwargs": {"endpoint_url": s3_endpoint}})
    assert sorted(ids) == sorted(expected)  # complete, no duplicates
    summary = json.loads(direct.cat_file(f"{s3_bucket}/out/_summary.json"))
    assert summary["inputs"] == summary["ok"] == 12
