"""What a run's replicas held and used (workers/usage.py), and the cost figures the summary makes of it."""

from __future__ import annotations

import json
import time

import pytest
from helpers import write_tar
from imagefactory import jpeg_bytes

from jobs.annotate import main, read_meter, start_meter, summary_line
from workers.usage import cost_summary


def test_cost_figures_from_reports_and_unknown_with_the_reason_when_there_are_none():
    reports = {"r1": {"started": 100.0, "busy_s": 4.0}, "r0": {"started": 90.0, "busy_s": 0.0}}
    cost = cost_summary(reports, run_end=110.0, device="gpu", units_per_replica=0.5, images=36, hour_price=2.0)
    assert (cost["replicas"], cost["device_seconds_held"], cost["device_seconds_busy"]) == (2, 15.0, 2.0)
    assert cost["per_replica"] == [{"held_s": 20.0, "busy_s": 0.0}, {"held_s": 10.0, "busy_s": 4.0}]  # oldest first
    assert cost["images_per_device_hour"] == 36 / 15 * 3600 and cost["unknown_reason"] is None

    unknown = cost_summary(None, 110.0, "gpu", 0.5, 36, 2.0, unknown_reason="usage meter unreadable (ActorDiedError)")
    assert set(unknown) == set(cost)  # one shape for every reader
    assert unknown["unknown_reason"] == "usage meter unreadable (ActorDiedError)"
    assert {k for k, v in unknown.items() if v is not None} == {"device", "device_hour_price", "unknown_reason"}
    summary = {"errors_by_kind": {}, "shards_redone": {}, "rows_this_run": 36, "shards_this_run": 1,
               "wall_time_s": 1.0, "images_per_s": 36.0, "rows_skipped_as_done": 0, "shards_skipped_as_done": 0,
               "inputs": 36, "ok": 36, "errors": 0, "output": "out", "output_rows": 36, "cost": unknown}  # fmt: skip
    assert summary_line(summary).endswith("; cost unknown: usage meter unreadable (ActorDiedError)")


def test_a_meter_that_is_gone_gives_unknown_cost_not_an_error(ray_cluster):
    """The driver's read of the meter is guarded: a dead meter is a reason, not a traceback."""
    meter = start_meter(f"blip2-usage-test-{time.time_ns()}")
    meter.report.remote("r", 1.0, 2.0)
    assert read_meter(meter) == ({"r": {"started": 1.0, "busy_s": 2.0}}, None)  # and read_meter kills it
    replicas, reason = read_meter(meter)
    assert replicas is None and reason.startswith("usage meter unreadable (ActorDiedError"), reason


@pytest.mark.slow
def test_idle_replicas_are_held_too(ray_cluster, tmp_path, tiny_models, photos, monkeypatch):
    """``--replicas 3`` over one shard: one replica gets the work, all three held a device, from before loading.

    Ray Data's ``wait_for_min_actors_s`` makes the pool wait until all three replicas have
    loaded before any work starts, so each was alive through every model call and the
    three lifetimes are all at least the longest busy time.
    """
    import ray.data

    monkeypatch.setattr(ray.data.DataContext.get_current(), "wait_for_min_actors_s", 300)
    members = [(f"{i}.jpg", jpeg_bytes(photos["coffee"][: 90 + i, :90])) for i in range(4)]
    write_tar(tmp_path / "in" / "one.tar", members)
    out = tmp_path / "out"
    units = 0.3  # three replicas and a decode task in the session cluster's 2 CPUs
    before = time.time()
    assert main(["--input", str(tmp_path / "in"), "--output", str(out), "--model", str(tiny_models["opt"]),
                 "--replicas", "3", "--cpus-per-replica", str(units), "--max-new-tokens", "2"]) == 0  # fmt: skip
    wall = time.time() - before
    cost = json.loads((out / "_summary.json").read_text())["cost"]
    print(cost)
    assert cost["replicas"] == 3 and len(cost["per_replica"]) == 3, cost
    lifetimes = [r["held_s"] for r in cost["per_replica"]]
    longest_busy = max(r["busy_s"] for r in cost["per_replica"])
    assert longest_busy > 0 and all(longest_busy <= t <= wall for t in lifetimes), cost
    assert cost["device_seconds_held"] == pytest.approx(sum(lifetimes) * units, abs=0.01)
    assert cost["device_seconds_busy"] == pytest.approx(longest_busy * units, abs=0.01)  # one replica did the work
