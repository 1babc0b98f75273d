"""The driver's progress: images done of the total, rising to the input count; totals exact or estimated."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pyarrow as pa
from helpers import photo_shards, tar_bytes

from jobs.annotate import main
from jobs.progress import Progress
from workers.writer import REPORT_SCHEMA


def _reports(*reports: dict) -> pa.Table:
    base = {"shard": None, "file": None, "rows": None, "ok": None, "errors": "{}", "shard_rows": None, "source": None}
    return pa.Table.from_pylist([{**base, **r} for r in reports], schema=REPORT_SCHEMA)


def _shard(name: str, files: int = 0):
    return SimpleNamespace(name=name, files=tuple(f"f{i}" for i in range(files)))


def test_totals_are_exact_for_listed_images_and_estimated_for_tars_until_read(caplog):
    caplog.set_level("INFO", logger="jobs.progress")
    folders = Progress([_shard("a", 3), _shard("b", 5)], done_rows=0, interval_s=0, tty=False)
    assert folders.total() == 8
    tars = Progress([_shard("t1"), _shard("t2"), _shard("t3")], done_rows=10, interval_s=0, tty=False)
    assert tars.total() is None  # nothing read yet: unknown, shown as "?"
    tars.update(_reports({"shard": "t1", "file": "f", "rows": 4, "ok": 3, "errors": json.dumps({"decode_failed": 1})}))
    assert tars.done() == 14 and tars.total() is None
    tars.update(_reports({"shard": "t1", "shard_rows": 6}))
    assert tars.total() == 10 + 6 * 3  # the earlier run's rows, then t1's size for all three
    tars.update(_reports({"shard": "t2", "shard_rows": 2}, {"shard": "t3", "shard_rows": 4}))
    assert tars.total() == 10 + 6 + 2 + 4
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("progress: 14/? images") and "decode_failed=1" in lines[0]
    assert "(estimated)" in lines[1] and "(estimated)" not in lines[2]


def test_a_file_reported_again_replaces_its_first_report_so_done_never_passes_the_total():
    """A retried write reports the same file again: it counts once, as in the ledger, errors included."""
    progress = Progress([_shard("a"), _shard("b")], done_rows=0, interval_s=3600, tty=False)
    seen = []
    first = {"shard": "a", "file": "a/part-1", "rows": 3, "ok": 2, "errors": json.dumps({"decode_failed": 1})}
    for reports in (
        _reports(first, {"shard": "a", "shard_rows": 5}),
        _reports(first),  # the retry's report of the same file
        _reports({"shard": "a", "file": "a/part-2", "rows": 2, "ok": 2}, {"shard": "b", "shard_rows": 4}),
        _reports({"shard": "b", "file": "b/part-1", "rows": 4, "ok": 4}),
        _reports({"shard": "a", "file": "a/part-2", "rows": 2, "ok": 2}, first),  # late repeats, shard a complete
    ):
        progress.update(reports)
        seen.append((progress.done(), progress.total()))
    assert seen == [(3, 10), (3, 10), (5, 9), (9, 9), (9, 9)], seen
    assert dict(progress.errors) == {"decode_failed": 1}


def test_a_shard_that_outgrows_the_estimate_raises_the_total_with_it():
    """Until its end report, a shard counts at least the rows it wrote: a folder of videos has more rows than files."""
    progress = Progress([_shard("videos", 2), _shard("t")], done_rows=0, interval_s=3600, tty=False)
    assert progress.total() == 4  # 2 listed files, the tar estimated at that
    progress.update(_reports({"shard": "videos", "file": "v/1", "rows": 7, "ok": 7}))
    assert (progress.done(), progress.total()) == (7, 7 + 2)  # the tar still at the estimate
    progress.update(_reports({"shard": "t", "file": "t/1", "rows": 9, "ok": 9}))
    assert (progress.done(), progress.total()) == (16, 16)


def test_a_runs_log_shows_images_done_rising_to_the_input_count(ray_cluster, tmp_path, tiny_models, photos, capsys):
    shards = photo_shards(photos, n_shards=3, per_shard=4)
    src = tmp_path / "in"
    src.mkdir()
    for name, members in shards.items():
        (src / name).write_bytes(tar_bytes(members))
    out = tmp_path / "out"
    args = ["--input", str(src), "--output", str(out), "--model", str(tiny_models["opt"]), "--max-new-tokens", "4",
            "--batch-size", "2", "--max-rows-per-file", "2", "--progress-interval-s", "0"]  # fmt: skip
    assert main(args) == 0
    done = [(int(a), b) for a, b in re.findall(r"progress: (\d+)/(\d+|\?) images", capsys.readouterr().err)]
    assert len(done) >= 3, done
    counts = [d for d, _ in done]
    assert counts == sorted(counts) and counts[-1] == 12  # rising, to the 3 x 4 inputs
    assert done[-1][1] == "12"
    # A resume that finds everything done does no work and reports nothing new.
    assert main(args) == 0
    assert "progress:" not in capsys.readouterr().err
