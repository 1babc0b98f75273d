"""Shard-level bookkeeping that makes runs exactly-once and resumable.

Layout under the output URL (names starting with ``_`` are skipped by Parquet
readers such as PyArrow datasets and DuckDB globs of ``*.parquet``):

* ``_manifest.json`` — the settings that shape the rows (model and revision,
  prompts, questions, generation, input columns, partitioning) and the code
  version.  A resumed run whose settings differ is refused.
* ``_markers/<shard>.json`` — written by the driver only after every row of
  that shard is durable in Parquet, listing the shard's files and counts.

Invariant: a shard with a marker has exactly its listed files; a shard
without one may have stray files from a run that died, and those are deleted
before the shard is processed again and once more just before its marker is
written (catching a write that was still in flight when a driver died).  So
the output holds exactly one row per input sample after any sequence of
crashes and reruns, and a rerun recomputes only shards without markers: at
most what was in flight when the job died.

The driver's memory holds one entry per shard *in flight*, never per image.
"""

from __future__ import annotations

import collections
import json
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from workers.config import WRITE_MODES, OutputSpec, StorageOptions
from workers.storage import filesystem_for, join, protocol_of
from workers.writer import shard_file_prefix

log = logging.getLogger(__name__)

MANIFEST_NAME = "_manifest.json"
MARKERS_DIR = "_markers"


class OutputConflictError(RuntimeError):
    """The output location cannot be used as asked (exists in error mode, or settings differ)."""


class LedgerError(RuntimeError):
    """Bookkeeping found an impossible state (e.g. more rows written for a shard than it has)."""


def _write_json_atomic(fs, path: str, payload: Any, local: bool) -> None:
    text = json.dumps(payload, indent=2, sort_keys=True)
    if local:
        parent = path.rsplit("/", 1)[0]
        fs.makedirs(parent, exist_ok=True)
        tmp = f"{parent}/.{path.rsplit('/', 1)[1]}.{uuid.uuid4().hex}.tmp"
        fs.pipe_file(tmp, text.encode())
        fs.mv(tmp, path)
    else:
        fs.pipe_file(path, text.encode())


def manifest_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Human-readable differences between two manifests (``code_version`` is informational)."""
    diffs = []
    for key in sorted(set(old) | set(new)):
        if key == "code_version" and not prefix:
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += manifest_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: was {a!r}, now {b!r}")
    return diffs


@dataclass
class ResumePlan:
    """What a run must do: which shards are done, and their counts."""

    done: dict[str, dict[str, Any]]  # shard name -> marker payload
    removed_files: int = 0


@dataclass
class _InFlight:
    files: dict[str, tuple[int, int, dict[str, int]]] = field(default_factory=dict)  # path -> (rows, ok, errors)
    expected: int | None = None
    source: str | None = None


class ShardLedger:
    """Reads and writes the manifest and shard markers of one output location.

    Filesystem errors propagate (``OSError`` and subclasses): the driver stops,
    and a rerun resumes from the markers already written.
    """

    def __init__(self, output: OutputSpec, storage: StorageOptions, run_id: str):
        self.output = output
        self.run_id = run_id
        self.fs, self.root = filesystem_for(output.url, storage)
        self.local = protocol_of(output.url) == "file"
        self.in_flight: dict[str, _InFlight] = collections.defaultdict(_InFlight)
        self.completed_this_run: dict[str, dict[str, Any]] = {}

    # ----------------------------------------------------------------- start of a run

    def _has_data(self) -> bool:
        return bool(self.fs.exists(self.root) and self.fs.ls(self.root))

    def prepare(self, mode: str, manifest: dict[str, Any], shard_names: list[str]) -> ResumePlan:
        """Apply the write mode and return what is already done.

        Raises OutputConflictError in ``error`` mode when the output holds data,
        and in ``resume`` mode when the stored manifest differs from ``manifest``.
        """
        if mode not in WRITE_MODES:
            raise ValueError(f"mode must be one of {WRITE_MODES}, got {mode!r}")
        if self._has_data():
            if mode == "error":
                raise OutputConflictError(
                    f"output: {self.output.url} already holds data (write mode 'error'); "
                    "use --mode resume to finish it or --mode overwrite to replace it"
                )
            if mode == "overwrite":
                log.warning("write mode overwrite: deleting existing output at %s", self.output.url)
                self.fs.rm(self.root, recursive=True)
        old = self._read_manifest()
        if old is not None:
            diffs = manifest_diff(old, manifest)
            if diffs:
                raise OutputConflictError(
                    f"output: {self.output.url} was written with different settings; refusing to mix them "
                    f"(use --mode overwrite to replace it, or another output): " + "; ".join(diffs)
                )
            if old.get("code_version") != manifest.get("code_version"):
                log.warning("resuming output written by code version %s with %s",
                            old.get("code_version"), manifest.get("code_version"))  # fmt: skip
        _write_json_atomic(self.fs, join(self.root, MANIFEST_NAME), manifest, self.local)
        done = self._read_markers()
        plan = ResumePlan(done={name: done[name] for name in shard_names if name in done})
        todo = [name for name in shard_names if name not in done]
        plan.removed_files = self._remove_stray_files(todo) if old is not None else 0
        if plan.done:
            log.info("resume: %d of %d shards already complete, %d stray files removed",
                     len(plan.done), len(shard_names), plan.removed_files)  # fmt: skip
        return plan

    def _read_manifest(self) -> dict[str, Any] | None:
        path = join(self.root, MANIFEST_NAME)
        if not self.fs.exists(path):
            return None
        return json.loads(self.fs.cat_file(path))

    def _read_markers(self) -> dict[str, dict[str, Any]]:
        marker_dir = join(self.root, MARKERS_DIR)
        if not self.fs.exists(marker_dir):
            return {}
        paths = [p for p in self.fs.ls(marker_dir, detail=False) if p.endswith(".json")]
        # One batched fetch: s3fs fetches concurrently, local reads are cheap.
        contents = self.fs.cat(paths) if paths else {}
        markers = {}
        for raw in contents.values():
            payload = json.loads(raw)
            markers[payload["shard"]] = payload
        return markers

    def _remove_stray_files(self, shard_names: list[str]) -> int:
        """Delete files of shards that have no marker (left by a run that died)."""
        if not shard_names:
            return 0
        wanted = {shard_file_prefix(self.output, self.root, name): name for name in shard_names}
        stray = [
            path
            for path in self.fs.find(self.root)
            if not path.rsplit("/", 1)[-1].startswith("_")
            and any(path.startswith(prefix) for prefix in self._prefix_candidates(path, wanted))
        ]
        if stray:
            self.fs.rm(stray)
        return len(stray)

    def _prefix_candidates(self, path: str, wanted: dict[str, str]) -> list[str]:
        if self.output.partition_by == "shard":
            prefix = path.rsplit("/", 1)[0] + "/"
            return [prefix] if prefix in wanted else []
        return [p for p in wanted if path.startswith(p)]

    # ----------------------------------------------------------------- during a run

    def record(self, reports: pa.Table) -> list[str]:
        """Fold write reports in; write markers for shards now complete; return their names.

        Raises LedgerError when more rows are reported for a shard than it has.
        """
        finished = []
        for rep in reports.to_pylist():
            state = self.in_flight[rep["shard"]]
            if rep["file"] is None:
                state.expected = rep["shard_rows"]
                state.source = rep["source"]
            else:
                # Keyed by path: a retried write task reports the same file again.
                state.files[rep["file"]] = (rep["rows"], rep["ok"], json.loads(rep["errors"]))
            written = sum(rows for rows, _, _ in state.files.values())
            if state.expected is not None and written > state.expected:
                raise LedgerError(f"shard {rep['shard']}: {written} rows written but the shard has {state.expected}")
            if state.expected is not None and written == state.expected:
                self._complete(rep["shard"], self.in_flight.pop(rep["shard"]))
                finished.append(rep["shard"])
        return finished

    def _complete(self, shard: str, state: _InFlight) -> None:
        prefix = shard_file_prefix(self.output, self.root, shard)
        # A write from a previous, killed driver may have landed after this run
        # cleaned up: remove anything of this shard that this run did not write.
        existing = [p for p in self.fs.glob(prefix + "*") if not p.rsplit("/", 1)[-1].startswith(".")]
        strays = [p for p in existing if self._strip(p) not in {self._strip(f) for f in state.files}]
        if strays:
            log.warning("shard %s: removing %d files left by an earlier attempt", shard, len(strays))
            self.fs.rm(strays)
        errors: collections.Counter[str] = collections.Counter()
        for _, _, errs in state.files.values():
            errors.update(errs)
        payload = {
            "shard": shard,
            "source": state.source,
            "rows": state.expected,
            "ok": sum(ok for _, ok, _ in state.files.values()),
            "errors": dict(sorted(errors.items())),
            "files": sorted(state.files),
            "run_id": self.run_id,
        }
        _write_json_atomic(self.fs, join(self.root, MARKERS_DIR, f"{shard}.json"), payload, self.local)
        self.completed_this_run[shard] = payload

    def _strip(self, path: str) -> str:
        return self.fs._strip_protocol(path)

    def incomplete(self) -> list[str]:
        """Shards that started but whose rows did not all arrive (should be empty after a run)."""
        return sorted(self.in_flight)
