"""The driver's progress report: images done of the total, rate, ETA and errors by kind so far.

Ray Data's own "Total Progress" counts blocks of the last stage, which here are
write reports, one per file, so it reads ``0/?`` for most of a run and then
counts files.  The driver knows better: the listing gives the shards (and the
images of image folders), every write report says how many rows became durable,
and a shard's end report says how many rows it had.  So the total is exact for
image folders and, for tars and Parquet files, exact once a shard has been read
and estimated from the shards read so far until then.  Reports are keyed by
file, as the ledger keys them: a retried write that reports a file again
replaces its first report, so done never passes the total.

On a terminal this is a tqdm bar; elsewhere (logs, ``ray job submit``) a plain
line every ``interval_s`` seconds and one at the end.  A resumed run starts from
what earlier runs already completed.
"""

from __future__ import annotations

import collections
import json
import logging
import sys
import time
from typing import Any

log = logging.getLogger("jobs.progress")

__all__ = ["Progress"]


class Progress:
    """Fed the write reports as they stream in; never raises into the run."""

    def __init__(self, shards: list[Any], done_rows: int, interval_s: float, tty: bool | None = None) -> None:
        """``shards``: the shards this run does; ``done_rows``: the rows earlier runs completed."""
        self.todo_shards = len(shards)
        self.done_before = done_rows
        # Images per shard where the listing knows them (image folders); None where only reading tells.
        self._listed = {s.name: len(s.files) for s in shards if s.files}
        self._expected: dict[str, int] = {}
        # Shards in flight: file -> (rows, errors) of its latest report.  A shard whose rows have all
        # arrived is folded into the sums and its files dropped, so memory follows the shards in flight.
        self._files: dict[str, dict[str, tuple[int, collections.Counter[str]]]] = collections.defaultdict(dict)
        self._shard_rows: collections.Counter[str] = collections.Counter()
        self._complete: set[str] = set()
        self.rows = 0
        self.errors: collections.Counter[str] = collections.Counter()
        self.interval_s = interval_s
        self._started = time.monotonic()
        self._last_line = float("-inf")
        tty = sys.stderr.isatty() if tty is None else tty
        self._bar = None
        if tty:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total(), initial=self.done_before, unit="img", dynamic_ncols=True)

    def total(self) -> int | None:
        """Images of the whole output: exact, estimated from the shards read so far, or None (nothing to go on)."""
        known = {**self._listed, **self._expected}
        unknown = self.todo_shards - len(known)
        if unknown and not known:
            return None
        per_shard = sum(known.values()) / len(known) if known else 0
        total = sum(known.values()) + unknown * per_shard
        # A shard still being read counts at least the rows it already wrote (a folder's videos
        # give more rows than files), so the total never falls below done.
        for shard, rows in self._shard_rows.items():
            if shard not in self._expected:
                total += max(0.0, rows - known.get(shard, per_shard))
        return self.done_before + round(total)

    def done(self) -> int:
        return self.done_before + self.rows

    def update(self, reports: Any) -> None:
        for rep in reports.to_pylist():
            shard = rep["shard"]
            if shard in self._complete:
                continue  # a late or repeated report for a shard already counted in full
            if rep["file"] is None:
                self._expected[shard] = rep["shard_rows"]
            else:
                self._count(shard, rep["file"], rep["rows"], collections.Counter(json.loads(rep["errors"])))
            if self._shard_rows[shard] == self._expected.get(shard):
                self._complete.add(shard)
                self._files.pop(shard, None)
        if self._bar is not None:
            self._bar.total = self.total()
            self._bar.n = self.done()
            self._bar.set_postfix_str(self._errors_text(), refresh=False)
            self._bar.refresh()
        elif time.monotonic() - self._last_line >= self.interval_s:
            self._line()

    def _count(self, shard: str, file: str, rows: int, errors: collections.Counter[str]) -> None:
        """Add a file's report, replacing an earlier report of the same file."""
        old_rows, old_errors = self._files[shard].get(file, (0, collections.Counter()))
        self._files[shard][file] = (rows, errors)
        self.rows += rows - old_rows
        self._shard_rows[shard] += rows - old_rows
        self.errors.subtract(old_errors)
        self.errors.update(errors)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._line()

    def _errors_text(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in sorted(self.errors.items()) if v) or "none"

    def _line(self) -> None:
        self._last_line = time.monotonic()
        elapsed = self._last_line - self._started
        total = self.total()
        rate = self.rows / elapsed if elapsed > 0 else 0.0
        left = (total - self.done()) / rate if total is not None and rate > 0 else None
        share = f" ({100 * self.done() / total:.1f}%)" if total else ""
        eta = f", ETA {_duration(left)}" if left is not None else ""
        exact = "" if total is None or len(self._listed) + len(self._expected) >= self.todo_shards else " (estimated)"
        shown = "?" if total is None else total
        log.info("progress: %d/%s images%s%s, %.1f images/s%s; errors so far: %s",
                 self.done(), shown, share, exact, rate, eta, self._errors_text())  # fmt: skip


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"
