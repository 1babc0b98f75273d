"""End to end: ``jobs.annotate`` on a real local Ray cluster against a real S3 endpoint.

Every test goes through the whole Ray Data pipeline (list -> read -> decode ->
BLIP-2 actor -> Parquet) and reads the output back.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import time

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs
from helpers import driver_env, photo_shards, read_output, tar_bytes
from imagefactory import broken_image_cases, jpeg_bytes, png_bytes
from PIL import Image, ImageOps
from reference import Reference

from jobs.annotate import main
from workers.config import GenerationSpec

QUESTIONS = ["What is in the picture?", "What colour is it?"]
MAX_NEW = 6


@pytest.mark.slow
def test_cli_webdataset_s3_to_s3_hive_parquet(ray_cluster, s3_endpoint, s3_bucket, s3_storage, tiny_models, photos,
                                              tmp_path):  # fmt: skip
    """The issue's scenario: ``python -m jobs.annotate`` as a process, S3 in, S3 out, two questions."""
    fs = s3fs.S3FileSystem(**s3_storage.fsspec_options())
    shards = photo_shards(photos, n_shards=3, per_shard=4)
    for name, members in shards.items():
        fs.pipe(f"{s3_bucket}/in/{name}", tar_bytes(members))

    # A distinctive secret for the driver: it must not show up in logs or output.
    env = driver_env(ray_cluster.get_runtime_context().gcs_address,
                     {"AWS_SECRET_ACCESS_KEY": "S3cr3t-d0-not-leak", "AWS_ACCESS_KEY_ID": "AKIA-d0-not-leak"})
    cmd = [
        sys.executable, "-m", "jobs.annotate",
        "--input", f"s3://{s3_bucket}/in/",
        "--output", f"s3://{s3_bucket}/out/",
        "--endpoint-url", s3_endpoint,
        "--model", str(tiny_models["opt"]),
        "--questions", *QUESTIONS,
        "--passthrough-columns", "txt",
        "--max-new-tokens", str(MAX_NEW),
        "--batch-size", "4",
        "--decode-mode", "exact",  # so every caption and answer can be held against the plain recipe
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "annotated 12 images from 3 shards" in proc.stdout

    local = tmp_path / "download"  # pytest removes it: nothing is left in the system temp dir
    fs.get(f"{s3_bucket}/out/", str(local), recursive=True)
    got = duckdb.sql(
        f"SELECT shard, key, caption, answers, status, txt FROM read_parquet('{local}/**/*.parquet', "
        "hive_partitioning=true) ORDER BY shard, key"
    ).fetchall()
    expected = sorted(
        (name, member[0].rsplit(".", 1)[0]) for name, members in shards.items() for member in members[::2]
    )
    assert [(row[0], row[1]) for row in got] == expected  # exactly one row per input image
    by_ext: dict[str, dict[tuple[str, str], bytes]] = {"txt": {}, "jpg": {}}
    for name, ms in shards.items():
        for member, data in ms:
            key, ext = member.rsplit(".", 1)
            by_ext[ext.lower()][(name, key)] = data
    reference = Reference(tiny_models["opt"], GenerationSpec(max_new_tokens=MAX_NEW))
    for shard, key, caption, answers, status, txt in got:
        rgb = np.asarray(Image.open(io.BytesIO(by_ext["jpg"][(shard, key)])).convert("RGB"))
        assert status == "ok"
        assert caption == reference(rgb, None)[0], (shard, key)
        assert answers == [{"question": q, "answer": reference(rgb, f"Question: {q} Answer:")[0]} for q in QUESTIONS]
        assert txt == by_ext["txt"][(shard, key)].decode()
    assert len({row[2] for row in got}) > 1  # captions depend on the image
    partitions = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{s3_bucket}/out/") if "shard=" in p)
    assert partitions == [f"shard={name}" for name in sorted(shards)]
    summary = json.loads(fs.cat(f"{s3_bucket}/out/_summary.json"))
    assert summary["inputs"] == summary["ok"] == 12 and summary["errors"] == 0
    written = b"".join(fs.cat(p) for p in fs.find(f"{s3_bucket}/out/"))
    for secret in ("S3cr3t-d0-not-leak", "AKIA-d0-not-leak"):
        assert secret not in proc.stdout + proc.stderr
        assert secret.encode() not in written


@pytest.mark.slow
def test_broken_and_odd_images_in_one_shard(ray_cluster, tmp_path, tiny_models, photos, capsys):
    cases = broken_image_cases(photos["astronaut"][:300, :260])
    members = [(f"{name}{ext}", data) for name, (ext, data, _kind) in sorted(cases.items())]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "mixed.tar").write_bytes(tar_bytes(members))
    out = tmp_path / "out"

    code = main(
        ["--input", str(tmp_path / "in"), "--output", str(out), "--model", str(tiny_models["opt"]),
         "--questions", QUESTIONS[0], "--max-new-tokens", "4", "--batch-size", "3"]
    )  # fmt: skip
    assert code == 0
    rows = {r["key"]: r for r in read_output(str(out))}
    assert sorted(rows) == sorted(cases)  # one row per sample, none lost, none extra
    for name, (_ext, _data, kind) in cases.items():
        row = rows[name]
        if kind is None:
            assert row["status"] == "ok", (name, row["error"])
            assert isinstance(row["caption"], str) and len(row["answers"]) == 1
        else:
            assert (row["status"], row["error_kind"]) == ("error", kind), name
            assert row["error"] and row["caption"] is None
    rotated = rows["exif_rotated_jpeg"]
    assert (rotated["width"], rotated["height"]) == (300, 260)  # EXIF orientation applied
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["ok"] + summary["errors"] == summary["inputs"] == len(cases)
    assert summary["errors_by_kind"]["decompression_bomb"] == 1
    assert "images/s" in capsys.readouterr().out


@pytest.mark.slow
def test_parquet_on_s3_with_passthrough_and_row_questions(ray_cluster, s3_endpoint, s3_bucket, s3_storage,
                                                          tiny_models, photos):  # fmt: skip
    fs = s3fs.S3FileSystem(**s3_storage.fsspec_options())
    names = sorted(photos)
    table = pa.table(
        {
            "uid": [f"u{i}" for i in range(6)],
            "jpg": [jpeg_bytes(photos[names[i % 4]]) if i != 3 else b"not an image" for i in range(6)],
            "url": [f"https://example.invalid/{i}.jpg" for i in range(6)],
            "caption": [f"alt text {i}" for i in range(6)],
            "questions": [["Is it red?"] if i % 2 else [] for i in range(6)],
        }
    )
    with fs.open(f"{s3_bucket}/pq/part-0.parquet", "wb") as f:
        pq.write_table(table, f, row_group_size=4)
    out = f"s3://{s3_bucket}/pq-out"
    code = main(
        ["--input", f"s3://{s3_bucket}/pq/", "--output", out, "--endpoint-url", s3_endpoint,
         "--model", str(tiny_models["t5"]), "--key-column", "uid", "--passthrough-columns", "url", "caption",
         "--questions-column", "questions", "--questions", QUESTIONS[0], "--max-new-tokens", "4"]
    )  # fmt: skip
    assert code == 0
    rows = {r["key"]: r for r in read_output(out, s3_storage.fsspec_options())}
    assert sorted(rows) == [f"u{i}" for i in range(6)]
    assert rows["u3"]["status"] == "error" and rows["u3"]["error_kind"] == "not_an_image"
    for i in (0, 1, 2, 4, 5):
        row = rows[f"u{i}"]
        assert row["status"] == "ok"
        assert row["url"] == f"https://example.invalid/{i}.jpg"
        assert row["input_caption"] == f"alt text {i}"
        expected_q = [QUESTIONS[0]] + (["Is it red?"] if i % 2 else [])
        assert [a["question"] for a in row["answers"]] == expected_q


@pytest.mark.slow
def test_image_folder_fidelity_to_plain_generate(ray_cluster, tmp_path, tiny_models, photos):
    """Pipeline output equals Blip2Processor + generate, one image and prompt at a time, fp32."""
    folder = tmp_path / "imgs"
    (folder / "nested").mkdir(parents=True)
    files = {}
    for i, (name, arr) in enumerate(sorted(photos.items())):
        path = folder / ("nested" if i % 2 else ".") / f"{name}.{'png' if i == 1 else 'jpg'}"
        path.write_bytes(png_bytes(arr) if i == 1 else jpeg_bytes(arr))
        files[str(path.relative_to(folder))] = path
    (folder / "notes.md").write_text("not an image")

    for flavor in ("opt", "t5"):
        out = tmp_path / f"out-{flavor}"
        code = main(
            ["--input", str(folder), "--output", str(out), "--model", str(tiny_models[flavor]),
             "--caption-prompt", "a photo of", "--questions", *QUESTIONS, "--max-new-tokens", str(MAX_NEW),
             "--batch-size", "3", "--decode-mode", "exact"]  # the reference decodes with BlipImageProcessor
        )  # fmt: skip
        assert code == 0
        rows = {r["key"]: r for r in read_output(str(out))}
        assert sorted(rows) == sorted(files)
        summary = json.loads((out / "_summary.json").read_text())
        assert summary["listing"]["ignored_files"] == 1

        reference = Reference(tiny_models[flavor], GenerationSpec(max_new_tokens=MAX_NEW))
        for key, path in files.items():
            rgb = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
            row = rows[key]
            assert row["caption"] == reference(rgb, "a photo of")[0], (flavor, key)
            for qa, question in zip(row["answers"], QUESTIONS, strict=True):
                assert qa == {"question": question, "answer": reference(rgb, f"Question: {question} Answer:")[0]}


def test_conversation_and_what_the_run_cost(ray_cluster, tmp_path, tiny_models, photos, capsys):
    """A conversation reaches the Parquet output; the summary's cost fields agree with the run's wall time."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name, arr in photos.items():
        (folder / f"{name}.jpg").write_bytes(jpeg_bytes(arr))
    out = tmp_path / "out"
    turns = ["What is in the picture?", "Why?"]
    price = 3.0
    code = main(["--input", str(folder), "--output", str(out), "--model", str(tiny_models["opt"]),
                 "--conversation", *turns, "--max-new-tokens", "6", "--gpu-hour-price", str(price)])  # fmt: skip
    assert code == 0
    rows = read_output(str(out))
    assert len(rows) == len(photos)
    for row in rows:
        assert [(t["turn"], t["question"]) for t in row["conversation"]] == [(1, turns[0]), (2, turns[1])]
    summary = json.loads((out / "_summary.json").read_text())
    cost = summary["cost"]
    assert (cost["device"], cost["replicas"], cost["device_hour_price"]) == ("cpu", 1, price)
    # One replica reserving 1 CPU: held is its lifetime, within the run's wall time; busy within held.
    assert 0 < cost["device_seconds_busy"] <= cost["device_seconds_held"] <= summary["wall_time_s"]
    assert cost["images_per_device_hour"] == pytest.approx(len(photos) / cost["device_seconds_held"] * 3600, rel=1e-3)
    assert cost["cost_per_1k_images"] == pytest.approx(price / cost["images_per_device_hour"] * 1000, rel=1e-3)
    assert cost["cost_per_1m_images"] == pytest.approx(cost["cost_per_1k_images"] * 1000, rel=1e-3)
    stages = cost["stage_busy_s"]
    assert set(stages) == {"read_decode", "model", "write"} and all(v > 0 for v in stages.values()), stages
    assert stages["model"] >= cost["device_seconds_busy"] * 0.5  # Ray Data's task time includes the replica's calls
    assert "CPU-seconds held" in capsys.readouterr().out


@pytest.mark.slow
def test_question_template_and_no_caption_from_a_public_bucket_with_anon(ray_cluster, s3_endpoint, s3_bucket,
                                                                         tiny_models, photos, tmp_path):  # fmt: skip
    """--question-template shapes every prompt, --no-caption leaves captions null, --anon sends unsigned requests
    (which the store answers only for a public object)."""
    import boto3
    from faulty_proxy import FaultyProxy

    names = sorted(photos)
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").put_object(
        Bucket=s3_bucket, Key="in/a.tar", ACL="public-read",
        Body=tar_bytes([(f"{n}.jpg", jpeg_bytes(photos[n])) for n in names]),
    )  # fmt: skip
    template, question = "Q: {q} A:", "what is this?"
    with FaultyProxy(s3_endpoint, every=0) as proxy:
        code = main(
            ["--input", f"s3://{s3_bucket}/in/", "--output", str(tmp_path / "out"), "--endpoint-url", proxy.url,
             "--anon", "--model", str(tiny_models["opt"]), "--no-caption", "--questions", question,
             "--question-template", template, "--max-new-tokens", str(MAX_NEW), "--decode-mode", "exact"]
        )  # fmt: skip
    assert code == 0
    assert proxy.signed[False] > 0 and proxy.signed[True] == 0, proxy.signed  # not one request carried credentials
    rows = {r["key"]: r for r in read_output(str(tmp_path / "out"))}
    reference = Reference(tiny_models["opt"], GenerationSpec(max_new_tokens=MAX_NEW))
    assert sorted(rows) == names
    for name in names:
        assert rows[name]["caption"] is None
        rgb = np.asarray(Image.open(io.BytesIO(jpeg_bytes(photos[name]))).convert("RGB"))
        assert rows[name]["answers"] == [{"question": question, "answer": reference(rgb, "Q: what is this? A:")[0]}]
    assert len({r["answers"][0]["answer"] for r in rows.values()}) > 1  # answers depend on the image


def test_offline_default_model_fails_fast_with_fix(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jpg").write_bytes(b"x")
    started = time.monotonic()
    code = main(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")])
    assert code == 3
    assert time.monotonic() - started < 30
    err = capsys.readouterr().err
    assert "Salesforce/blip2-opt-2.7b" in err and "tiny-random" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_write_modes_resume_error_overwrite(ray_cluster, tmp_path, tiny_models, photos, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jpg").write_bytes(jpeg_bytes(photos["coffee"]))
    args = ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--model", str(tiny_models["opt"]),
            "--max-new-tokens", "3"]  # fmt: skip
    assert main(args) == 0
    first = json.loads((tmp_path / "out" / "_summary.json").read_text())
    assert first["rows_this_run"] == 1

    assert main([*args, "--mode", "error"]) == 2
    assert "--mode overwrite" in capsys.readouterr().err

    assert main(args) == 0  # resume (the default): nothing left to do
    again = json.loads((tmp_path / "out" / "_summary.json").read_text())
    assert (again["rows_this_run"], again["shards_skipped_as_done"], again["inputs"]) == (0, 1, 1)

    assert main([*args, "--overwrite"]) == 0
    assert json.loads((tmp_path / "out" / "_summary.json").read_text())["rows_this_run"] == 1
    assert len(read_output(str(tmp_path / "out"))) == 1


@pytest.mark.slow
def test_resume_with_different_settings_is_refused(ray_cluster, tmp_path, tiny_models, photos, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jpg").write_bytes(jpeg_bytes(photos["rocket"]))
    args = ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--model", str(tiny_models["opt"]),
            "--max-new-tokens", "3", "--questions", "What is it?"]  # fmt: skip
    assert main(args) == 0
    assert main([*args[:-1], "Where is it?", "--max-new-tokens", "5", "--decode-mode", "exact"]) == 2
    err = capsys.readouterr().err
    assert "different settings" in err
    assert "prompts.questions: was ['What is it?'], now ['Where is it?']" in err
    assert "generation.max_new_tokens: was 3, now 5" in err
    assert "decode.mode: was 'fast', now 'exact'" in err
    # Speed settings are not part of the output's identity: the run resumes (nothing left to do).
    assert main([*args, "--batch-size", "7", "--generation-batch", "2"]) == 0
    summary = json.loads((tmp_path / "out" / "_summary.json").read_text())
    assert (summary["shards_skipped_as_done"], summary["rows_this_run"], summary["inputs"]) == (1, 0, 1)


@pytest.mark.slow
def test_model_that_cannot_load_stops_the_job_quickly_with_the_cause(ray_cluster, tmp_path, tiny_models, photos,
                                                                     capsys):  # fmt: skip
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_models["opt"], broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)  # a corrupt weights file
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jpg").write_bytes(jpeg_bytes(photos["coffee"]))
    started = time.monotonic()
    code = main(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--model", str(broken)])
    assert code == 3
    assert time.monotonic() - started < 180  # gives up after a few tries, not forever
    err = capsys.readouterr().err
    assert "model replicas failed to start" in err and "cannot load BLIP-2" in err


@pytest.mark.slow
def test_a_5000_row_shard_is_written_in_files_of_max_rows_per_file(ray_cluster, tmp_path, tiny_models):
    """Rows arrive in write batches that mix shards; each shard ends as ceil(rows / max_rows_per_file) files."""
    rng = np.random.default_rng(0)
    tiles = [jpeg_bytes(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8), quality=70) for _ in range(50)]
    n = 5_000
    images = [tiles[i % 50] if i % 1000 else b"not an image" for i in range(n)]  # 5 error rows ride along
    pq.write_table(
        pa.table({"key": [f"k{i:05d}" for i in range(n)], "jpg": pa.array(images, pa.binary())}),
        tmp_path / "big.parquet",
        row_group_size=500,
    )
    small = tmp_path / "small.parquet"
    pq.write_table(pa.table({"key": ["s0", "s1"], "jpg": pa.array(tiles[:2], pa.binary())}), small)
    out = tmp_path / "out"
    args = ["--input", str(tmp_path / "big.parquet"), str(small), "--output", str(out),
            "--model", str(tiny_models["opt"]), "--max-new-tokens", "1", "--max-rows-per-file", "2500",
            "--batch-size", "512"]  # fmt: skip
    assert main(args) == 0
    files = sorted((out / "shard=big.parquet").glob("*.parquet"))
    # Written per model batch (512 rows, split by shard), as they are computed; compacted to two files.
    assert sorted(pq.read_metadata(f).num_rows for f in files) == [2500, 2500]
    marker = json.loads((out / "_markers" / "big.parquet.json").read_text())
    assert sorted(marker["files"]) == [str(f) for f in files] and marker["rows"] == n
    assert [pq.read_metadata(f).num_rows for f in (out / "shard=small.parquet").glob("*.parquet")] == [2]
    rows = read_output(str(out))
    big = [r for r in rows if r["shard"] == "big.parquet"]
    assert sorted(r["key"] for r in big) == [f"k{i:05d}" for i in range(n)]  # each row once
    assert sum(r["error_kind"] == "not_an_image" for r in big) == 5
    summary = json.loads((out / "_summary.json").read_text())
    assert (summary["inputs"], summary["errors_by_kind"]) == (n + 2, {"not_an_image": 5})
    # The default (100,000 rows) holds the whole shard in one file; a resume of the same output keeps it as is.
    again = tmp_path / "again"
    assert main([*args[:4], str(again), *args[5:9], *args[11:]]) == 0
    assert [pq.read_metadata(f).num_rows for f in (again / "shard=big.parquet").glob("*.parquet")] == [n]
    assert main(args) == 0
    assert sorted((out / "shard=big.parquet").glob("*.parquet")) == files
