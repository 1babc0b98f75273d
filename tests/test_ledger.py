"""Exactly-once bookkeeping (workers/ledger.py): crashes, reruns and SIGKILLed drivers.

The chaos tests run ``python -m jobs.annotate`` as a real process joined to the
session's Ray cluster, kill it with SIGKILL at random moments, and rerun it
until it finishes; then they read the output back.
"""

from __future__ import annotations

import functools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import driver_env, output_ids, output_table, read_markers, read_output, tar_bytes, write_tar
from imagefactory import jpeg_bytes

from jobs.annotate import main
from workers import listing
from workers.config import OutputSpec, StorageOptions
from workers.ledger import LedgerError, OutputConflictError, ShardLedger, manifest_diff
from workers.listing import ShardRef
from workers.writer import REPORT_SCHEMA


def make_shards(folder: Path, photos, n_shards: int, per_shard: int) -> set[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(photos)
    ids = set()
    for s in range(n_shards):
        path = folder / f"{s:04d}.tar"
        members = []
        for i in range(per_shard):
            data = jpeg_bytes(photos[names[(s + i) % len(names)]][: 64 + 8 * i, : 64 + 8 * s], quality=80)
            members.append((f"{s:04d}_{i:03d}.jpg", data))
            ids.add(f"{path}::{s:04d}_{i:03d}")
        write_tar(path, members)
    return ids


def driver_cmd(inp: Path, out: Path, model: Path) -> list[str]:
    return [sys.executable, "-m", "jobs.annotate", "--input", str(inp), "--output", str(out), "--model", str(model),
            "--max-new-tokens", "8", "--batch-size", "2", "--questions", "What is it?"]  # fmt: skip


@pytest.mark.slow
def test_driver_sigkill_chaos_then_rerun_is_exactly_once(ray_cluster, tmp_path, tiny_models, photos):
    rng = random.Random(int(os.environ.get("CHAOS_SEED", "20261128")))
    expected = make_shards(tmp_path / "in", photos, n_shards=16, per_shard=3)
    out = tmp_path / "out"
    env = driver_env(ray_cluster.get_runtime_context().gcs_address)
    cmd = driver_cmd(tmp_path / "in", out, tiny_models["opt"])

    attempts = []  # (attempt, "killed" or "finished", markers when it ended)
    kills = 0
    for attempt in range(8):
        done_before = read_markers(out)
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if kills < 3:
            # Kill between markers: after this attempt's first marker, at a random moment.
            while proc.poll() is None and len(read_markers(out)) <= len(done_before):
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 1.0))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
                attempts.append((attempt, "killed", len(read_markers(out))))
                continue
        stdout, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, stdout[-3000:]
        attempts.append((attempt, "finished", len(read_markers(out))))
        break
    else:
        pytest.fail("job did not complete")
    print("attempts (attempt, how it ended, markers):", attempts)
    assert any(how == "killed" and 0 < n < 16 for _, how, n in attempts), attempts  # died between markers

    ids = output_ids(out)
    assert len(ids) == len(set(ids)) == len(expected)  # no duplicates, nothing lost
    assert set(ids) == expected
    summary = json.loads((out / "_summary.json").read_text())
    # The final run recomputed exactly the shards that had no marker when it started.
    rows_left = len(expected) - sum(m["rows"] for m in done_before.values())
    assert summary["rows_this_run"] == rows_left
    assert summary["shards_skipped_as_done"] == len(done_before)
    assert summary["inputs"] == summary["ok"] == len(expected)


def _durable_rows(out: Path) -> int:
    """Rows in the output's data files now (files come and go while compaction runs)."""
    rows = 0
    for path in out.glob("shard=*/*.parquet"):
        try:
            rows += pq.read_metadata(path).num_rows
        except (FileNotFoundError, OSError):
            pass  # compacted away between the listing and the read
    return rows


@pytest.mark.slow
def test_markers_follow_the_run_so_a_crash_at_60_percent_keeps_a_third(ray_cluster, tmp_path, tiny_models, photos):
    """Rows become durable as they are computed and shards are marked as they complete, not at the end."""
    n_shards, per_shard = 40, 40
    expected = make_shards(tmp_path / "in", photos, n_shards=n_shards, per_shard=per_shard)
    out = tmp_path / "out"
    env = driver_env(ray_cluster.get_runtime_context().gcs_address)
    cmd = [sys.executable, "-m", "jobs.annotate", "--input", str(tmp_path / "in"), "--output", str(out),
           "--model", str(tiny_models["opt"]), "--max-new-tokens", "12", "--questions", "What is it?",
           "--batch-size", "32"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    timeline = []  # (seconds, durable rows, marked shards)
    started = time.monotonic()
    while proc.poll() is None:
        rows, marked = _durable_rows(out), len(read_markers(out))
        timeline.append((round(time.monotonic() - started, 1), rows, marked))
        if rows >= 0.6 * len(expected):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.1)
    stdout, _ = proc.communicate(timeout=60)
    print("seconds, durable rows, marked shards:", timeline[::5], timeline[-1])
    assert proc.returncode == -signal.SIGKILL, f"the run ended before 60% of its rows were durable:\n{stdout[-2000:]}"
    done_before = read_markers(out)
    assert len(done_before) >= n_shards / 3, timeline[-1]

    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["shards_skipped_as_done"] == len(done_before)
    assert summary["rows_this_run"] == len(expected) - sum(m["rows"] for m in done_before.values())
    ids = output_ids(out)
    assert len(ids) == len(set(ids)) and set(ids) == expected


@pytest.mark.slow
def test_data_written_but_marker_missing_is_redone_without_duplicates(ray_cluster, tmp_path, tiny_models, photos):
    expected = make_shards(tmp_path / "in", photos, n_shards=3, per_shard=4)
    out = tmp_path / "out"
    args = driver_cmd(tmp_path / "in", out, tiny_models["opt"])[3:]
    assert main(args) == 0
    # Simulate a crash between the data and the marker of shard 0001.tar, plus
    # a stray file of an older attempt that a zombie task wrote late.
    marker = out / "_markers" / "0001.tar.json"
    files = json.loads(marker.read_text())["files"]
    marker.unlink()
    shutil.copy(files[0], Path(files[0]).with_name("part-oldrun-0000000000000000.parquet"))
    assert len(output_ids(out)) == len(expected) + 4  # duplicates are visible before the rerun

    assert main(args) == 0
    ids = output_ids(out)
    assert sorted(ids) == sorted(expected)
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["rows_this_run"] == 4 and summary["shards_skipped_as_done"] == 2
    assert (out / "_markers" / "0001.tar.json").exists()


@pytest.mark.slow
def test_replica_killed_mid_batch_is_restarted_and_retried(ray_cluster, tmp_path, tiny_models, photos):
    expected = make_shards(tmp_path / "in", photos, n_shards=8, per_shard=4)
    out = tmp_path / "out"
    env = driver_env(ray_cluster.get_runtime_context().gcs_address)
    proc = subprocess.Popen(driver_cmd(tmp_path / "in", out, tiny_models["opt"]), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    def replica_pids() -> list[int]:
        ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
        return [int(line.split()[0]) for line in ps.splitlines() if "Blip2Replica" in line and "ray::" in line]

    killed = None
    deadline = time.monotonic() + 120
    while killed is None and proc.poll() is None and time.monotonic() < deadline:
        # Kill the replica once it has done some work (a marker exists) but not all.
        if read_markers(out):
            pids = replica_pids()
            if pids:
                os.kill(pids[0], signal.SIGKILL)
                killed = pids[0]
                marked_at_kill = len(read_markers(out))
        time.sleep(0.05)
    # Ray starts a new replica process, and it finishes the work that remained.
    restarted = None
    while restarted is None and proc.poll() is None and time.monotonic() < deadline:
        restarted = next((pid for pid in replica_pids() if pid != killed), None)
        time.sleep(0.05)
    stdout, _ = proc.communicate(timeout=600)
    assert killed is not None, "no replica process found to kill"
    assert proc.returncode == 0, stdout[-3000:]
    assert restarted is not None, "the job finished without a new replica: the kill did not land mid-run"
    assert marked_at_kill < 8, "every shard was marked before the kill: no work remained for a restarted replica"
    assert sorted(output_ids(out)) == sorted(expected)
    assert len(read_markers(out)) == 8


# --------------------------------------------------------------------------- unit level


def _reports(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=REPORT_SCHEMA)


def test_marker_only_when_all_rows_arrived_and_retries_count_once(tmp_path):
    out = OutputSpec(url=str(tmp_path / "o"))
    ledger = ShardLedger(out, StorageOptions(), "r1")
    ledger.prepare("resume", {"v": 1}, _refs("a", "b"))
    f1 = _parquet(tmp_path / "o" / "shard=a" / "part-r1-1.parquet", ["a::1", "a::2"])
    f2 = _parquet(tmp_path / "o" / "shard=a" / "part-r1-2.parquet", ["a::3", "a::4"])
    file_rep = {"shard": "a", "rows": 2, "ok": 1, "errors": '{"not_an_image": 1}', "shard_rows": None, "source": None}
    assert ledger.record(_reports([{**file_rep, "file": f1}])) == []
    assert ledger.record(_reports([{**file_rep, "file": f1}])) == []  # a retried task reports the same file
    end = {"shard": "a", "file": None, "rows": 0, "ok": 0, "errors": "{}", "shard_rows": 4, "source": "s://a"}
    assert ledger.record(_reports([end])) == []
    assert not (tmp_path / "o" / "_markers").exists()
    assert ledger.record(_reports([{**file_rep, "file": f2}])) + ledger.finish() == ["a"]
    marker = json.loads((tmp_path / "o" / "_markers" / "a.json").read_text())
    assert (marker["rows"], marker["ok"], marker["errors"]) == (4, 2, {"not_an_image": 2})
    # The two files were compacted into one (max_rows_per_file allows it) before the marker named it.
    (compacted,) = marker["files"]
    assert pq.read_table(compacted).column("id").to_pylist() == ["a::1", "a::2", "a::3", "a::4"]
    assert sorted(p.name for p in (tmp_path / "o" / "shard=a").iterdir()) == [Path(compacted).name]
    assert ledger.incomplete() == []
    # An empty shard completes from its end row alone.
    assert ledger.record(_reports([{**end, "shard": "b", "shard_rows": 0}])) + ledger.finish() == ["b"]


def test_more_rows_than_the_shard_has_is_an_error(tmp_path):
    ledger = ShardLedger(OutputSpec(url=str(tmp_path / "o")), StorageOptions(), "r1")
    rep = {"shard": "a", "ok": 1, "errors": "{}", "source": None}
    ledger.record(_reports([{**rep, "file": None, "rows": 0, "shard_rows": 1}]))
    with pytest.raises(LedgerError, match="shard a: 2 rows written but the shard has 1"):
        ledger.record(_reports([{**rep, "file": str(tmp_path / "f"), "rows": 2, "shard_rows": None}]))


def test_manifest_mismatch_names_what_differs(tmp_path, s3_bucket, s3_storage):
    out = OutputSpec(url=f"s3://{s3_bucket}/o")
    ShardLedger(out, s3_storage, "r1").prepare("resume", {"model": {"id": "m1"}, "code_version": "1"}, _refs("a"))
    with pytest.raises(OutputConflictError, match=r"model\.id: was 'm1', now 'm2'"):
        ShardLedger(out, s3_storage, "r2").prepare("resume", {"model": {"id": "m2"}, "code_version": "1"}, _refs("a"))
    # A new code version alone is not a settings change.
    ShardLedger(out, s3_storage, "r3").prepare("resume", {"model": {"id": "m1"}, "code_version": "2"}, _refs("a"))
    with pytest.raises(OutputConflictError, match="write mode 'error'"):
        ShardLedger(out, s3_storage, "r4").prepare("error", {"model": {"id": "m1"}}, _refs("a"))


def test_the_manifest_records_input_roots_and_a_resume_with_other_inputs_keeps_them(tmp_path, monkeypatch):
    from jobs.annotate import manifest_for
    from jobs.settings import config_from_argv

    def manifest(*inputs: str) -> dict:
        cfg = config_from_argv(["--input", *inputs, "--output", str(tmp_path / "o"), "--model", "m"])
        return manifest_for(cfg, {})

    monkeypatch.chdir(tmp_path)
    first = manifest("in/", f"file://{tmp_path}/in", "s3a://b/x/*.tar")
    assert first["input_roots"] == [f"{tmp_path}/in", "s3://b/x"]
    out = OutputSpec(url=str(tmp_path / "o"))
    ShardLedger(out, StorageOptions(), "r1").prepare("resume", first, _refs("a"))
    # More inputs on resume are not a settings change; the earlier rows' roots stay recorded.
    ShardLedger(out, StorageOptions(), "r2").prepare("resume", manifest("more/"), _refs("a", "b"))
    stored = json.loads((tmp_path / "o" / "_manifest.json").read_text())
    assert stored["input_roots"] == [f"{tmp_path}/in", "s3://b/x", f"{tmp_path}/more"]
    assert manifest_diff(first, {**first, "input_roots": ["/elsewhere"]}) == []


def test_manifest_diff_nested():
    assert manifest_diff({"a": {"b": 1, "c": [1]}}, {"a": {"b": 2, "c": [1]}}) == ["a.b: was 1, now 2"]


def test_settings_added_later_compare_against_what_older_code_did():
    """Outputs written before decode_mode existed were decoded exactly: resuming them in fast mode is refused."""
    old = {"decode": {"max_image_pixels": 10}}  # an older manifest: no decode.mode
    assert manifest_diff(old, {"decode": {"max_image_pixels": 10, "mode": "fast"}}) == [
        "decode.mode: was 'exact', now 'fast'"
    ]
    assert manifest_diff(old, {"decode": {"max_image_pixels": 10, "mode": "exact"}}) == []
    # A new setting without a known legacy value is not a difference.
    assert manifest_diff(old, {"decode": {"max_image_pixels": 10, "mode": "exact", "other": 1}}) == []


def _refs(*names: str) -> list[ShardRef]:
    return [ShardRef(uri=f"file:///in/{name}.tar", format="webdataset", name=name) for name in names]


@pytest.mark.slow
def test_image_folder_that_changed_is_redone_whole_and_exactly_once(
    ray_cluster, tmp_path, tiny_models, photos, monkeypatch
):
    """Images added to a folder move others between chunks of the same names: resume must not skip or repeat any."""
    import jobs.annotate

    # Chunks of 3 images instead of 10,000, so a handful of files shows the effect.
    monkeypatch.setattr(jobs.annotate, "list_shards", functools.partial(listing.list_shards, images_per_shard=3))
    changing, steady = tmp_path / "in" / "changing", tmp_path / "in" / "steady"
    for folder, names in ((changing, ["b", "d", "f", "h", "j"]), (steady, ["k", "l", "m", "n"])):
        folder.mkdir(parents=True)
        for name in names:
            (folder / f"{name}.jpg").write_bytes(jpeg_bytes(photos["coffee"][:64, :64]))
    out = tmp_path / "out"
    args = ["--input", str(tmp_path / "in"), "--output", str(out), "--model", str(tiny_models["opt"]),
            "--max-new-tokens", "2"]  # fmt: skip
    assert main(args) == 0
    assert len(output_ids(out)) == 9 and len(read_markers(out)) == 4  # 2 + 2 chunks

    for name in ("a", "e"):  # sort before and between the annotated ones: every chunk of the folder shifts
        (changing / f"{name}.jpg").write_bytes(jpeg_bytes(photos["rocket"][:64, :64]))
    assert main(args) == 0
    ids = output_ids(out)
    assert sorted(ids) == sorted(set(ids)) and len(ids) == 11  # every image once, none skipped
    assert {i.rsplit("/", 1)[1] for i in ids} == {f"{n}.jpg" for n in "abdefhjklmn"}
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["shards_skipped_as_done"] == 2  # the unchanged folder's two chunks were kept
    assert summary["rows_this_run"] == 7 and summary["changed_folders"] == 1

    (changing / "a.jpg").unlink()  # and removing images (3 chunks become 2) is handled the same way
    (changing / "b.jpg").unlink()
    assert main(args) == 0
    ids = output_ids(out)
    assert sorted(ids) == sorted(set(ids)) and len(ids) == 9
    assert len(read_markers(out)) == 4  # no marker of a chunk that no longer exists is left behind
    assert json.loads((out / "_summary.json").read_text())["orphan_markers"] == 0


def _touch(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"PAR1")
    return str(path)


def _parquet(path: Path, ids: list[str]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": ids, "status": ["ok"] * len(ids)}), path)
    return str(path)


def _complete_shard(ledger: ShardLedger, shard: str, files: list[str]) -> None:
    rep = {"shard": shard, "rows": 1, "ok": 1, "errors": "{}", "shard_rows": None, "source": None}
    ledger.record(_reports([{**rep, "file": f} for f in files]))
    end = {"shard": shard, "file": None, "rows": 0, "ok": 0, "errors": "{}", "shard_rows": len(files), "source": "s"}
    assert ledger.record(_reports([end])) + ledger.finish() == [shard]


def test_unpartitioned_shard_names_that_prefix_each_other_stay_apart(tmp_path):
    out = OutputSpec(url=str(tmp_path / "o"), partition_by="none")
    ledger = ShardLedger(out, StorageOptions(), "r1")
    ledger.prepare("resume", {"v": 1}, _refs("a", "a-1"))
    f_a1 = _touch(tmp_path / "o" / "part-a-1~r1-0001.parquet")
    _complete_shard(ledger, "a-1", [f_a1])
    f_a = _touch(tmp_path / "o" / "part-a~r1-0002.parquet")
    _complete_shard(ledger, "a", [f_a])  # completing "a" must not take "a-1"'s file for a stray
    assert Path(f_a1).exists() and Path(f_a).exists()
    # A rerun where "a" lost its marker redoes "a" only.
    (tmp_path / "o" / "_markers" / "a.json").unlink()
    plan = ShardLedger(out, StorageOptions(), "r2").prepare("resume", {"v": 1}, _refs("a", "a-1"))
    assert set(plan.done) == {"a-1"} and Path(f_a1).exists() and not Path(f_a).exists()


@pytest.mark.parametrize("on_s3", [False, True], ids=["local", "s3"])
def test_resume_reconciles_files_with_markers(tmp_path, request, on_s3):
    """Stray files, a marker whose data is gone and a torn marker, on local disk and on the moto bucket alike."""
    if on_s3:
        storage = request.getfixturevalue("s3_storage")
        out = OutputSpec(url=f"s3://{request.getfixturevalue('s3_bucket')}/o")
    else:
        storage, out = StorageOptions(), OutputSpec(url=str(tmp_path / "o"))
    ledger = ShardLedger(out, storage, "r1")
    fs, root = ledger.fs, ledger.root
    ledger.prepare("resume", {"v": 1}, _refs("a", "b", "c"))

    def put(name: str) -> str:
        path = f"{root}/{name}"
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(path, b"PAR1")
        return path

    fa, fb, fc = put("shard=a/part-r1-1.parquet"), put("shard=b/part-r1-2.parquet"), put("shard=c/part-r1-3.parquet")
    for shard, f in (("a", fa), ("b", fb), ("c", fc)):
        _complete_shard(ledger, shard, [f])
    late = put("shard=a/part-zombie-9.parquet")  # landed after a's marker
    fs.rm(fb)  # b's marker survives its data (an interrupted delete)
    fs.pipe_file(f"{root}/_markers/c.json", b"{not json")  # a torn marker
    fs.invalidate_cache()
    plan = ShardLedger(out, storage, "r2").prepare("resume", {"v": 1}, _refs("a", "b", "c"))
    fs.invalidate_cache()
    assert set(plan.done) == {"a"}
    assert not fs.exists(late) and fs.exists(fa)
    assert not fs.exists(f"{root}/_markers/b.json")
    assert not fs.exists(fc)  # c is redone from scratch
    assert plan.removed_files == 2  # the zombie and c's file


def test_a_late_report_for_a_complete_shard_is_ignored_or_removed(tmp_path):
    out = OutputSpec(url=str(tmp_path / "o"))
    ledger = ShardLedger(out, StorageOptions(), "r1")
    ledger.prepare("resume", {"v": 1}, _refs("a"))
    fa = _touch(tmp_path / "o" / "shard=a" / "part-r1-1.parquet")
    _complete_shard(ledger, "a", [fa])
    rep = {"shard": "a", "rows": 1, "ok": 1, "errors": "{}", "shard_rows": None, "source": None}
    assert ledger.record(_reports([{**rep, "file": fa}])) == []  # retried write of a listed file
    dup = _touch(tmp_path / "o" / "shard=a" / "part-r1-2.parquet")
    ledger.record(_reports([{**rep, "file": dup}]))
    assert Path(fa).exists() and not Path(dup).exists() and ledger.incomplete() == []


# --------------------------------------------------------------------------- resume redoes what failed


def _rows_by_shard(out: Path) -> dict[str, list[tuple[str, str, str | None]]]:
    table = output_table(str(out), columns=["shard", "key", "status", "error_kind"])
    got: dict[str, list] = {}
    for r in sorted(table.to_pylist(), key=lambda r: (r["shard"], r["key"])):
        got.setdefault(r["shard"], []).append((r["key"], r["status"], r["error_kind"]))
    return got


@pytest.mark.slow
def test_a_shard_fixed_after_a_failed_read_is_redone_exactly_once(ray_cluster, tmp_path, tiny_models, photos, capsys):
    inp, out = tmp_path / "in", tmp_path / "out"
    make_shards(inp, photos, n_shards=2, per_shard=3)
    good = (inp / "0001.tar").read_bytes()
    import gzip

    (inp / "0001.tar").unlink()
    whole = gzip.compress(good)
    (inp / "0001.tgz").write_bytes(whole[: len(whole) // 2])  # cut short in transit
    cmd = ["--input", str(inp), "--output", str(out), "--model", str(tiny_models["opt"]), "--max-new-tokens", "2"]
    assert main(cmd) == 0
    first = _rows_by_shard(out)
    assert first["0001.tgz"][0] == ("", "error", "shard_unreadable")
    assert read_markers(out)["0001.tgz"]["errors"].get("shard_unreadable") == 1
    kept_marker = read_markers(out)["0000.tar"]

    (inp / "0001.tgz").write_bytes(whole)  # the good file replaces it
    capsys.readouterr()
    assert main(cmd) == 0
    line = capsys.readouterr().out
    assert "annotated 3 images from 1 shards" in line and "1 redone (input_changed)" in line, line
    assert "skipped 3 images in 1 shards already done" in line, line
    again = _rows_by_shard(out)
    assert again["0001.tgz"] == [(f"0001_{i:03d}", "ok", None) for i in range(3)]  # each once, no error row
    assert again["0000.tar"] == first["0000.tar"] and read_markers(out)["0000.tar"] == kept_marker  # not recomputed
    assert sorted(output_ids(out)) == sorted(set(output_ids(out)))
    # Nothing changed since: a third run does nothing.
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["shards_redone"] == {"input_changed": 1} and summary["rows_this_run"] == 3
    assert main(cmd) == 0
    assert json.loads((out / "_summary.json").read_text())["rows_this_run"] == 0


@pytest.mark.slow
def test_outage_failures_are_retried_by_resume_and_retry_errors(ray_cluster, s3_endpoint, s3_bucket, tiny_models,
                                                                photos):  # fmt: skip
    """A shard unreadable in an outage is redone by the next resume; a read_error row only with
    --retry-errors; a not_an_image row never."""
    import s3fs
    from faulty_proxy import FaultyProxy

    direct = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    jpg = jpeg_bytes(photos["coffee"][:96, :96])
    direct.pipe_file(f"{s3_bucket}/in/a.tar", tar_bytes([("a0.jpg", jpg), ("a1.jpg", b"plain text, not a jpeg")]))
    direct.pipe_file(f"{s3_bucket}/in/b.tar", tar_bytes([("b0.jpg", jpg), ("b1.jpg", jpg)]))
    direct.pipe_file(f"{s3_bucket}/in/imgs/x.jpg", jpg)
    direct.pipe_file(f"{s3_bucket}/in/imgs/y.jpg", jpg)
    out = f"s3://{s3_bucket}/out"

    def rows() -> dict[str, list]:
        got: dict[str, list] = {}
        for r in sorted(read_output(out, {"client_kwargs": {"endpoint_url": s3_endpoint}}),
                        key=lambda r: (r["shard"], r["key"])):  # fmt: skip
            got.setdefault(r["shard"], []).append((r["key"], r["error_kind"]))
        return got

    def summary() -> dict:
        return json.loads(direct.cat_file(f"{s3_bucket}/out/_summary.json"))

    with FaultyProxy(s3_endpoint, every=0) as proxy:
        proxy.outage |= {f"GET /{s3_bucket}/in/b.tar", f"GET /{s3_bucket}/in/imgs/x.jpg"}
        cmd = ["--input", f"s3://{s3_bucket}/in/", "--output", out, "--endpoint-url", proxy.url,
               "--retry-attempts", "1", "--model", str(tiny_models["opt"]), "--max-new-tokens", "2"]  # fmt: skip
        assert main(cmd) == 0
        assert rows() == {
            "a.tar": [("a0", None), ("a1", "not_an_image")],
            "b.tar": [("", "shard_read_error")],
            "imgs": [("imgs/x.jpg", "read_error"), ("imgs/y.jpg", None)],
        }
        first = {name: m["run_id"] for name, m in _s3_markers(direct, s3_bucket).items()}
        proxy.outage.clear()  # the outage ends

        assert main(cmd) == 0  # a plain resume retries the unreadable shard only
        assert summary()["shards_redone"] == {"read_failed": 1}
        assert rows()["b.tar"] == [("b0", None), ("b1", None)]
        assert rows()["imgs"] == [("imgs/x.jpg", "read_error"), ("imgs/y.jpg", None)]

        assert main([*cmd, "--retry-errors"]) == 0  # now the transient read_error too, not the not_an_image row
        assert summary()["shards_redone"] == {"retry_errors": 1}
        final = rows()
        assert final == {
            "a.tar": [("a0", None), ("a1", "not_an_image")],
            "b.tar": [("b0", None), ("b1", None)],
            "imgs": [("imgs/x.jpg", None), ("imgs/y.jpg", None)],
        }
        last = {name: m["run_id"] for name, m in _s3_markers(direct, s3_bucket).items()}
    assert last["a.tar"] == first["a.tar"]  # never recomputed
    assert len({last["b.tar"], last["imgs"], first["a.tar"]}) == 3
    assert summary()["inputs"] == 6 and summary()["errors_by_kind"] == {"not_an_image": 1}


def _s3_markers(fs, bucket: str) -> dict[str, dict]:
    fs.invalidate_cache()
    return {p.rsplit("/", 1)[1][: -len(".json")]: json.loads(fs.cat_file(p)) for p in fs.ls(f"{bucket}/out/_markers")}


@pytest.mark.slow
def test_inputs_that_change_between_runs(ray_cluster, tmp_path, tiny_models, photos):
    """A tar deleted keeps its rows (an orphan marker); a tar added is the only thing the next run computes."""
    inp, out = tmp_path / "in", tmp_path / "out"
    expected = make_shards(inp, photos, n_shards=3, per_shard=2)
    cmd = ["--input", str(inp), "--output", str(out), "--model", str(tiny_models["opt"]), "--max-new-tokens", "2"]
    assert main(cmd) == 0
    first = read_markers(out)

    (inp / "0001.tar").unlink()
    assert main(cmd) == 0
    summary = json.loads((out / "_summary.json").read_text())
    assert (summary["orphan_markers"], summary["rows_this_run"], summary["shards"]) == (1, 0, 2)
    assert (summary["inputs"], summary["output_rows"]) == (4, 6)
    assert sorted(output_ids(out)) == sorted(expected)  # its rows are kept
    assert read_markers(out) == first

    write_tar(inp / "0009.tar", [("0009_000.jpg", jpeg_bytes(photos["rocket"][:80, :80]))])
    assert main(cmd) == 0
    summary = json.loads((out / "_summary.json").read_text())
    assert (summary["rows_this_run"], summary["shards_this_run"], summary["shards_skipped_as_done"]) == (1, 1, 2)
    assert sorted(output_ids(out)) == sorted(expected | {f"{inp / '0009.tar'}::0009_000"})
    assert {name: m for name, m in read_markers(out).items() if name != "0009.tar"} == first
