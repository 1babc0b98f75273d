"""Hostile input, end to end: it never stops the job and never runs code.

One job reads ten hostile shards of every format from the local S3 endpoint
(moto on 127.0.0.1) on the session's real Ray cluster and writes to S3.  The
test then reads every row back and checks, per sample, that:

* affected samples become error rows with the right ``error_kind`` and a
  reason, and the other samples of the same shard are captioned;
* unreadable shards (zero bytes, not a tar, truncated, garbage Parquet) become
  one shard-level error row (key ``""``) after the rows read before the damage,
  and the other shards complete;
* pickled payloads (``.pickle``, ``.pkl``, ``.pyd``, ``.pth`` from
  ``torch.save``) whose unpickling would create a marker file with
  ``os.system`` are never unpickled: the marker never appears, although the
  same payload provably creates its own canary when unpickled;
* tar members named ``../..`` or absolutely, and files written through a
  symlinked directory, land nowhere on disk;
* every sample appears exactly once (unique ids) and the summary adds up.

``pipe:`` (and other command-running) shard URLs are refused as a config error
before anything runs.
"""

from __future__ import annotations

import collections
import gzip
import io
import json
import os
import pickle
import re
import shlex
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import s3fs
from helpers import parquet_bytes, read_output, tar_bytes
from imagefactory import bomb_png, small_jpegs

from jobs.annotate import main

MAX_MEMBER_BYTES = 100_000  # tar members / image files above this are member_too_large
MAX_IMAGE_PIXELS = 10_000_000  # a 4000x4000 header (16 Mpx) is a bomb under this setting
OK, ERR = "ok", "error"


# --------------------------------------------------------------------------- hostile payloads


class _RunsCode:
    """Unpickling an instance runs ``touch <marker>`` (pickle stores ``posix.system``, not this class)."""

    def __init__(self, marker: Path) -> None:
        self.command = f"touch {shlex.quote(str(marker))}"

    def __reduce__(self):
        return (os.system, (self.command,))


def evil_pickle(marker: Path) -> bytes:
    return pickle.dumps(_RunsCode(marker))


def evil_torch(marker: Path) -> bytes:
    """A ``torch.save`` archive; ``torch.load(weights_only=False)`` of it runs the command."""
    import torch

    buf = io.BytesIO()
    torch.save({"state_dict": _RunsCode(marker)}, buf)
    return buf.getvalue()


def test_payloads_are_live(tmp_path):
    """The payloads used below do run code when unpickled or torch.load-ed (canary markers)."""
    import torch

    canary = tmp_path / "canary-pickle"
    pickle.loads(evil_pickle(canary))
    assert canary.exists()
    canary = tmp_path / "canary-torch"
    torch.load(io.BytesIO(evil_torch(canary)), weights_only=False)
    assert canary.exists()


# --------------------------------------------------------------------------- shard builders


def hostile_inputs(tmp_path: Path, marker: Path, photos) -> tuple[dict[str, bytes], dict[tuple[str, str], tuple]]:
    """``(relative path -> bytes to upload, (shard, key) -> (status, error_kind))``."""
    jpg = small_jpegs(photos, 24)
    big = np.random.default_rng(0).bytes(MAX_MEMBER_BYTES + 50_000)
    pickled = evil_pickle(marker)
    torched = evil_torch(marker)
    dotdot = "../" * 12 + str(tmp_path / "dotdot-escape" / "s08.jpg").lstrip("/")
    absolute = str(tmp_path / "absolute-escape" / "s09.jpg")
    files: dict[str, bytes] = {}
    expected: dict[tuple[str, str], tuple] = {}

    # --- one tar with every hostile member kind, good samples in between --------------------
    hostile = [
        ("s00.jpg", jpg[0]),
        ("s00.txt", "sym", "/etc/passwd"),  # a text member that is a link: not followed
        ("s01.png", bomb_png()),  # 50000 x 50000, a few hundred bytes
        ("s02.png", bomb_png(4000, 4000)),  # above --max-image-pixels only
        ("s03.jpg", jpg[1]),
        ("s03.txt", b"caption of s03"),
        ("s03.pickle", pickled),
        ("s03.pkl", pickled),
        ("s03.pth", torched),
        ("s03.pyd", pickled),  # asked for as a passthrough column: read as text only
        ("s04.pth", torched),  # a sample with no image at all: ignored
        ("s04.pickle", pickled),
        ("s04.pyd", pickled),
        ("s05.jpg", pickled),  # a pickle named .jpg: not an image, never unpickled
        ("s06.jpg", "sym", "/etc/passwd"),
        ("s07.jpg", "lnk", "s00.jpg"),
        (dotdot, jpg[2]),
        (absolute, jpg[3]),
        ("linkdir", "sym", str(tmp_path / "symlink-escape")),
        ("linkdir/s10.jpg", jpg[4]),  # just a key with a folder: nothing is extracted
        ("s11.jpg", big),
        ("s12.jpg", jpg[5]),
        ("s13.jpg", jpg[6]),
        ("s12.jpg", jpg[7]),  # the key again, not next to its first members
        ("s15.jpg", "fifo"),
        ("<end>.jpg", jpg[22]),  # the id of the reader's bookkeeping row: an ordinary key here
        ("s14.jpg", jpg[8]),
    ]
    files["hostile.tar"] = tar_bytes(hostile)
    for key, status, kind in [
        ("s00", OK, None),
        ("s01", ERR, "decompression_bomb"),
        ("s02", ERR, "decompression_bomb"),
        ("s03", OK, None),
        ("s05", ERR, "not_an_image"),
        ("s06", ERR, "unsafe_member"),
        ("s07", ERR, "unsafe_member"),
        (dotdot[: -len(".jpg")], ERR, "unsafe_member"),
        (absolute[: -len(".jpg")], ERR, "unsafe_member"),
        ("linkdir/s10", OK, None),
        ("s11", ERR, "member_too_large"),
        ("s12", OK, None),
        ("s13", OK, None),
        ("s12#dup2", ERR, "duplicate_key"),
        ("s15", ERR, "unsafe_member"),
        ("<end>", OK, None),
        ("s14", OK, None),
    ]:
        expected[("hostile.tar", key)] = (status, kind)

    # --- a plain good shard ----------------------------------------------------------------
    files["good.tar"] = tar_bytes(
        [m for i in range(3) for m in ((f"g{i}.jpg", jpg[9 + i]), (f"g{i}.txt", f"good {i}".encode()))]
    )
    expected.update({("good.tar", f"g{i}"): (OK, None) for i in range(3)})

    # --- a tar cut in the middle of its third image: two rows, then the shard error --------
    whole = tar_bytes([(f"t{i}.jpg", jpg[12 + i]) for i in range(4)])
    with tarfile.open(fileobj=io.BytesIO(whole)) as tar:
        cut_member = tar.getmember("t2.jpg")
    files["truncated.tar"] = whole[: cut_member.offset_data + cut_member.size // 2]
    expected.update({("truncated.tar", "t0"): (OK, None), ("truncated.tar", "t1"): (OK, None)})
    expected[("truncated.tar", "")] = (ERR, "shard_unreadable")

    # --- shards that are not what their names say ------------------------------------------
    files["zero.tar"] = b""
    expected[("zero.tar", "")] = (ERR, "empty_shard")
    files["notatar.tar"] = b"<html><body>404 Not Found</body></html>\n" * 30
    expected[("notatar.tar", "")] = (ERR, "shard_unreadable")
    files["badgzip.tar.gz"] = gzip.compress(files["hostile.tar"])[:40] + b"\x00garbage" * 64
    expected[("badgzip.tar.gz", "")] = (ERR, "shard_unreadable")

    # --- Parquet: hostile cells in a good file, and files that are not Parquet -------------
    table = pa.table(
        {
            "uid": ["p0", "p1", "p0", "p3", "p4", "p5"],
            "jpg": [jpg[16], bomb_png(), jpg[17], pickled, jpg[18], None],
        }
    )
    files["table.parquet"] = parquet_bytes(table)
    for key, status, kind in [
        ("p0", OK, None),
        ("p1", ERR, "decompression_bomb"),
        ("p0#dup2", ERR, "duplicate_key"),
        ("p3", ERR, "not_an_image"),
        ("p4", OK, None),
        ("p5", ERR, "missing_image"),
    ]:
        expected[("table.parquet", key)] = (status, kind)
    files["garbage.parquet"] = b"PAR1" + np.random.default_rng(1).bytes(3000) + b"PAR1"
    expected[("garbage.parquet", "")] = (ERR, "shard_unreadable")
    valid = parquet_bytes(pa.table({"uid": ["q0", "q1"], "jpg": [jpg[19], jpg[20]]}))
    files["halfparquet.parquet"] = valid[: len(valid) // 2]
    expected[("halfparquet.parquet", "")] = (ERR, "shard_unreadable")
    files["zero.parquet"] = b""
    expected[("zero.parquet", "")] = (ERR, "empty_shard")

    # --- a folder of image files: the size cap applies to files too ------------------------
    files["imgs/ok.jpg"] = jpg[21]
    files["imgs/big.jpg"] = big
    files["imgs/bomb.png"] = bomb_png()
    expected[("imgs", "imgs/ok.jpg")] = (OK, None)
    expected[("imgs", "imgs/big.jpg")] = (ERR, "member_too_large")
    expected[("imgs", "imgs/bomb.png")] = (ERR, "decompression_bomb")
    return files, expected


# --------------------------------------------------------------------------- the job


@pytest.mark.slow
def test_hostile_shards_on_s3_never_stop_the_job_nor_run_code(
    ray_cluster, s3_endpoint, s3_bucket, s3_storage, tiny_models, photos, tmp_path, capsys
):
    marker = tmp_path / "PWNED"
    files, expected = hostile_inputs(tmp_path, marker, photos)
    opts = s3_storage.fsspec_options()
    fs = s3fs.S3FileSystem(**opts)
    for rel, data in files.items():
        fs.pipe(f"{s3_bucket}/in/{rel}", data)
    out = f"s3://{s3_bucket}/out"
    args = [
        "--input", f"s3://{s3_bucket}/in/",
        "--output", out,
        "--endpoint-url", s3_endpoint,
        "--model", str(tiny_models["opt"]),
        "--max-new-tokens", "3",
        "--key-column", "uid",
        "--passthrough-columns", "txt", "pyd",
        "--max-member-bytes", str(MAX_MEMBER_BYTES),
        "--max-image-pixels", str(MAX_IMAGE_PIXELS),
        "--batch-size", "8",
    ]  # fmt: skip

    started = time.monotonic()
    assert main(args) == 0
    elapsed = time.monotonic() - started
    captured = capsys.readouterr()
    # Python's "--- Logging error ---" reports come from Ray's log handler holding an
    # earlier test's closed capture stream, not from the job; any other traceback fails.
    output = re.sub(r"--- Logging error ---.*?\nArguments: [^\n]*", "", captured.out + captured.err, flags=re.S)
    assert "Traceback" not in output

    rows = read_output(out, opts)
    # Every sample exactly once, with the id the README promises.
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), [i for i, n in collections.Counter(ids).items() if n > 1]
    for r in rows:
        assert r["id"] == f"{r['source']}::{r['key']}"
    got = {(r["shard"], r["key"]): (r["status"], r["error_kind"]) for r in rows}
    assert len(got) == len(rows)
    assert got == expected, {k: (got.get(k), expected.get(k)) for k in got.keys() | expected.keys()
                             if got.get(k) != expected.get(k)}  # fmt: skip

    by_key = {(r["shard"], r["key"]): r for r in rows}
    for r in rows:
        if r["status"] == OK:
            assert isinstance(r["caption"], str) and r["error"] is None, r
            assert r["width"] > 0 and r["height"] > 0
        else:
            assert isinstance(r["error"], str) and r["error"].strip(), r  # a reason, always
            assert r["caption"] is None
    # Shard-level rows name the shard they stand for.
    for (shard, key), r in by_key.items():
        if key == "":
            assert r["source"] == f"s3://{s3_bucket}/in/{shard}"
    # What the reasons say (the kind alone could hide a wrong branch).
    assert "symlink" in by_key[("hostile.tar", "s06")]["error"]
    assert "hard link" in by_key[("hostile.tar", "s07")]["error"]
    assert "FIFO" in by_key[("hostile.tar", "s15")]["error"]
    assert "max_member_bytes" in by_key[("hostile.tar", "s11")]["error"]
    # Bombs are refused from their headers: each one holds the pixel data of only 64 rows,
    # so a decoder that went past the header would have reported a truncated image instead,
    # and the sizes named here exist nowhere but in the IHDR chunk.  (tests/test_decode.py
    # shows the same refusal inside a 64 MiB address-space limit.)
    bomb_rows = [r for r in rows if r["error_kind"] == "decompression_bomb"]
    assert len(bomb_rows) == sum(kind == "decompression_bomb" for _s, kind in expected.values()) == 4
    for (shard, key), side in [(("hostile.tar", "s01"), 50_000), (("hostile.tar", "s02"), 4000),
                               (("table.parquet", "p1"), 50_000), (("imgs", "imgs/bomb.png"), 50_000)]:  # fmt: skip
        # 4000 x 4000 is under Pillow's own limit: only our header check stops it.
        reason = by_key[(shard, key)]["error"]
        assert f"{side * side} pixels" in reason and "limit" in reason, (shard, key, reason)
    assert by_key[("hostile.tar", "s02")]["error"] == (
        f"image is 4000x4000 = 16000000 pixels, above the limit of {MAX_IMAGE_PIXELS}"
    )
    assert "t2" not in {k for _s, k in got}  # the half-read sample is not passed off as an image
    assert "end of data" in by_key[("truncated.tar", "")]["error"]

    # A symlinked text member is not followed; a pickled passthrough member stays text.
    assert by_key[("hostile.tar", "s00")]["txt"] is None
    assert by_key[("hostile.tar", "s03")]["txt"] == "caption of s03"
    assert "system" in by_key[("hostile.tar", "s03")]["pyd"]
    assert by_key[("good.tar", "g1")]["txt"] == "good 1"

    # Nothing was unpickled, torch.load-ed or extracted anywhere.
    assert not marker.exists()
    for escaped in ("dotdot-escape", "absolute-escape", "symlink-escape"):
        assert not (tmp_path / escaped).exists(), escaped

    # The summary adds up and agrees with the rows read back.
    summary = json.loads(fs.cat(f"{s3_bucket}/out/_summary.json"))
    n_ok = sum(r["status"] == OK for r in rows)
    assert summary["inputs"] == len(rows) == len(expected)
    assert (summary["ok"], summary["errors"]) == (n_ok, len(rows) - n_ok)
    assert summary["ok"] + summary["errors"] == summary["inputs"]
    kinds = collections.Counter(r["error_kind"] for r in rows if r["status"] == ERR)
    assert summary["errors_by_kind"] == dict(kinds)
    assert summary["shards"] == len({s for s, _k in expected}) == 11
    partitions = {p.rsplit("/", 1)[-1] for p in fs.ls(f"{s3_bucket}/out/") if "shard=" in p}
    assert partitions == {f"shard={s}" for s, _k in expected}  # every shard, broken or not, has its rows

    # Every hostile shard is complete (has its marker): the same command has nothing left to do.
    assert main(args) == 0
    again = json.loads(fs.cat(f"{s3_bucket}/out/_summary.json"))
    assert (again["rows_this_run"], again["shards_skipped_as_done"]) == (0, 11)
    assert (again["inputs"], again["ok"], again["errors"]) == (summary["inputs"], summary["ok"], summary["errors"])
    assert len(read_output(out, opts)) == len(rows)
    assert not marker.exists()
    print(f"hostile job: {len(rows)} rows in {elapsed:.1f}s")


# --------------------------------------------------------------------------- pipe: URLs


@pytest.fixture()
def no_pipeline(monkeypatch):
    """Fail loudly if a refused job gets as far as building the Ray Data pipeline."""
    import workers.pipeline

    def refuse(*_args, **_kwargs):
        raise AssertionError("the pipeline was built for a job that should have been refused")

    monkeypatch.setattr(workers.pipeline, "build_dataset", refuse)


@pytest.mark.parametrize(
    "case",
    ["input", "input_upper_case", "input_among_good", "input_exec", "yaml", "output", "input_leading_space"],
)
def test_command_running_urls_are_refused_before_anything_runs(case, tmp_path, tiny_models, capsys, no_pipeline):
    marker = tmp_path / "PWNED"
    touch = f"touch {marker}"
    good = tmp_path / "in"
    good.mkdir()
    (good / "a.tar").write_bytes(tar_bytes([("k.jpg", b"x")]))
    out = tmp_path / "out"
    inputs, output = [f"pipe:{touch}"], str(out)
    if case == "input_upper_case":
        inputs = [f"PIPE:{touch}"]
    elif case == "input_among_good":
        inputs = [str(good), f"pipe:{touch}"]
    elif case == "input_exec":
        inputs = [f"exec:{touch}"]
    elif case == "output":
        inputs, output = [str(good)], f"pipe:{touch}"
    elif case == "input_leading_space":
        inputs = [f" pipe:{touch}"]
    if case == "yaml":
        config = tmp_path / "job.yaml"
        config.write_text(json.dumps({"input": [f"pipe:{touch}"], "output": str(out)}))  # JSON is YAML
        argv = ["--config", str(config)]
    else:
        argv = ["--input", *inputs, "--output", output]
    argv += ["--model", str(tiny_models["opt"]), "--max-new-tokens", "3"]

    started = time.monotonic()
    code = main(argv)
    assert code == 2
    assert time.monotonic() - started < 30
    err = capsys.readouterr().err
    assert "command-running scheme" in err and "refused" in err, err
    assert not marker.exists()
    assert not out.exists()  # nothing was written either
