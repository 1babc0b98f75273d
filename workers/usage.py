"""What a run's model replicas held and used: the figures its cost is computed from.

Each replica reports when it starts (before loading its weights, so a replica
that never gets a batch, or dies loading, is counted too) and after every
batch: when it started and how long it has been inside model calls, to one
small Ray actor per run (:class:`UsageMeter`), which the driver pins to its own
node so that losing a worker node cannot lose it.  The driver reads the totals
at the end (:func:`cost_summary`); figures it cannot read are reported as
unknown, with the reason.  Reports are cumulative and keyed by replica, so a
lost report costs nothing but that report's increment, and a replica Ray
restarts counts as the new replica it is (it held the device too).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

__all__ = ["ReplicaUsage", "UsageMeter", "cost_summary", "stage_busy_seconds"]


class UsageMeter:
    """Ray actor (``ray.remote(UsageMeter)``): the latest report of every replica."""

    def __init__(self) -> None:
        self._replicas: dict[str, dict[str, float]] = {}

    def report(self, replica: str, started: float, busy_s: float) -> None:
        self._replicas[replica] = {"started": started, "busy_s": busy_s}

    def totals(self) -> dict[str, dict[str, float]]:
        return dict(self._replicas)


class ReplicaUsage:
    """The stage's side: clocks a replica's lifetime and busy time and reports them to the meter by name.

    Reporting never fails a batch: without the meter (tests, a meter that is
    gone) the figures are only kept here.
    """

    def __init__(self, meter_name: str | None) -> None:
        self.started = time.time()
        self.busy_s = 0.0
        self._id = uuid.uuid4().hex
        self._meter = None
        if meter_name:
            import ray

            try:
                self._meter = ray.get_actor(meter_name)
            except ValueError:  # no such actor: the driver did not start one
                self._meter = None
        # Now, not after the first batch: the device is held from here, whether or not work ever comes.
        self._report()

    def add(self, busy_s: float) -> None:
        self.busy_s += busy_s
        self._report()

    def _report(self) -> None:
        if self._meter is not None:
            self._meter.report.remote(self._id, self.started, self.busy_s)


def stage_busy_seconds(ds: Any) -> dict[str, float] | None:
    """Busy seconds per stage (read+decode, model, write) from Ray Data's statistics of ``ds``, after it ran.

    Sums the task wall times of the operators.  Ray Data has no public API for
    these numbers (``ds.stats()`` is text), so this reads its stats summary and
    returns ``None`` where that changed shape.
    """
    try:
        pending, operators = [ds._get_stats_summary()], []
        while pending:  # the last operator's summary; the earlier ones are its parents
            summary = pending.pop()
            operators += summary.operators_stats
            pending += summary.parents
    except (AttributeError, TypeError, RuntimeError):
        return None
    out = {"read_decode": 0.0, "model": 0.0, "write": 0.0}
    for op in operators:
        if op.wall_time is None:
            continue
        name = op.operator_name
        stage = "model" if "Blip2Replica" in name else "write" if "RowWriter" in name else "read_decode"
        out[stage] += float(op.wall_time.sum)
    return {k: round(v, 3) for k, v in out.items()}


def cost_summary(
    replicas: dict[str, dict[str, float]] | None, run_end: float, device: str, units_per_replica: float,
    images: int, hour_price: float | None, unknown_reason: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The summary's cost figures.

    ``device_seconds_held``: each replica's lifetime, from the start of its
    load to the end of the run (a replica the pool scaled down earlier is
    counted to the end: an upper bound), times the devices it holds
    (``gpus_per_replica``, or ``cpus_per_replica`` on CPU-only runs).
    ``device_seconds_busy``: time inside model calls, times the same.
    ``per_replica``: each replica's lifetime and busy seconds (not times the
    devices), oldest first.

    ``replicas`` None (the meter could not be read): the same keys, every
    figure that needs the replicas' reports None, and ``unknown_reason`` says
    why; otherwise ``unknown_reason`` is None.
    """
    out: dict[str, Any] = {
        "device": device,
        "replicas": None,
        "device_seconds_held": None,
        "device_seconds_busy": None,
        "busy_share": None,
        "images_per_device_hour": None,
        "device_hour_price": hour_price,
        "cost_per_1k_images": None,
        "cost_per_1m_images": None,
        "per_replica": None,
        "unknown_reason": (unknown_reason or "no replica usage reports") if replicas is None else None,
    }
    if replicas is None:
        return out
    ordered = sorted(replicas.values(), key=lambda r: r["started"])
    lifetimes = [max(0.0, run_end - r["started"]) for r in ordered]
    held = sum(lifetimes) * units_per_replica
    busy = sum(r["busy_s"] for r in ordered) * units_per_replica
    per_hour = images / held * 3600 if held > 0 else None
    out.update({
        "replicas": len(replicas),
        "device_seconds_held": round(held, 3),
        "device_seconds_busy": round(busy, 3),
        "busy_share": round(busy / held, 4) if held > 0 else None,
        "images_per_device_hour": round(per_hour, 1) if per_hour else None,
        "per_replica": [{"held_s": round(t, 3), "busy_s": round(r["busy_s"], 3)}
                        for t, r in zip(lifetimes, ordered, strict=True)],
    })  # fmt: skip
    if hour_price is not None and per_hour:
        out["cost_per_1k_images"] = round(hour_price / per_hour * 1e3, 6)
        out["cost_per_1m_images"] = round(hour_price / per_hour * 1e6, 2)
    return out
