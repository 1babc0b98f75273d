"""Shard-level bookkeeping that makes runs exactly-once and resumable.

Layout under the output URL (names starting with ``_`` are skipped by Parquet
readers such as PyArrow datasets and DuckDB globs of ``*.parquet``):

* ``_manifest.json`` — the settings that shape the rows (model and revision,
  prompts, questions, generation, input columns, partitioning) and the code
  version.  A resumed run whose settings differ is refused.
* ``_markers/<shard>.json`` — written by the driver only after every row of
  that shard is durable in Parquet and its files are compacted to
  ``max_rows_per_file``, listing the shard's files and counts and what the
  shard held (:attr:`ShardRef.content_id`, :attr:`ShardRef.fingerprint`).

Invariant: a shard with a marker has exactly its listed files; a shard
without one may have stray files from a run that died, and those are deleted
before the shard is processed again and once more just before its marker is
written (catching a write that was still in flight when a driver died).  So
the output holds exactly one row per input sample after any sequence of
crashes and reruns, and a rerun recomputes only shards without markers: at
most what was in flight when the job died.

An image folder whose files changed since its chunks were completed (images
added or removed move others between chunks of the same names) is redone as a
whole: its markers and files are removed first, so no image is skipped or
written twice.  A completed shard is also redone, marker first and then its
files, when its input changed since (size and ETag or mtime from the listing),
when it ended in a shard-level read error (a storage outage must not become a
permanent gap), and with ``retry_errors`` when it holds error rows of a
transient kind (``schema.TRANSIENT_ERROR_KINDS``).

The driver's memory holds one entry per shard *in flight*, never per image.
"""

from __future__ import annotations

import collections
import json
import logging
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from workers.config import WRITE_MODES, OutputSpec, StorageOptions
from workers.listing import IMAGES as IMAGES_FORMAT
from workers.listing import ShardRef
from workers.schema import SHARD_READ_ERRORS, TRANSIENT_ERROR_KINDS
from workers.storage import filesystem_for, is_local, join
from workers.writer import PARTITION_COLUMN, compact_shard, put_atomic, shard_of_file

log = logging.getLogger(__name__)

MANIFEST_NAME = "_manifest.json"
# Where the job's inputs live (workers.storage.input_root of each URL): what pages may read
# thumbnails from.  Not a setting: a resume may add inputs, and keeps the earlier roots.
INPUT_ROOTS = "input_roots"
MARKERS_DIR = "_markers"
# Completing a shard is a few storage round trips (compaction, stray check,
# marker) that must not hold up the driver's stream of reports: a 1,000-GPU
# run completes several shards a second, each ~0.1-0.3 s of S3 latency.
COMPLETION_THREADS = 4


class OutputConflictError(RuntimeError):
    """The output location cannot be used as asked (exists in error mode, or settings differ)."""


class LedgerError(RuntimeError):
    """Bookkeeping found an impossible state (e.g. more rows written for a shard than it has)."""


def _write_json_atomic(fs, path: str, payload: Any, local: bool) -> None:
    put_atomic(fs, path, json.dumps(payload, indent=2, sort_keys=True).encode(), local)


# Settings added after outputs were first written, with the value that older
# code used without recording it: a resume compares against that value, so an
# output decoded one way is not silently continued another way.
LEGACY_VALUES: dict[str, Any] = {"decode.mode": "exact", "input.key_column_auto": []}


def manifest_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Human-readable differences between two manifests.

    ``code_version`` and ``input_roots`` are informational.  A setting the old manifest does not
    know (added by a newer version of this code) is compared against its
    :data:`LEGACY_VALUES` entry when it has one, and ignored otherwise.
    """
    diffs = []
    for key in sorted(set(old) | set(new)):
        path = f"{prefix}{key}"
        if key in ("code_version", INPUT_ROOTS) and not prefix:
            continue
        if key not in old and path not in LEGACY_VALUES:
            continue
        a, b = old.get(key, LEGACY_VALUES.get(path)), new.get(key)
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
    orphan_markers: list[str] = field(default_factory=list)  # done shards no longer in the input listing
    orphan_rows: int = 0  # their rows, which stay in the output
    changed_folders: list[str] = field(default_factory=list)  # image folders redone because their files changed
    # Completed shards redone by this run, by reason: "input_changed",
    # "read_failed" (a shard-level read error), "retry_errors" (transient error rows).
    redone: dict[str, list[str]] = field(default_factory=dict)


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
        self.local = is_local(output.url)
        self.in_flight: dict[str, _InFlight] = collections.defaultdict(_InFlight)
        self.completed_this_run: dict[str, dict[str, Any]] = {}
        self.shards: dict[str, ShardRef] = {}
        self._completing: dict[str, Future] = {}
        self._late: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
        self._pool: ThreadPoolExecutor | None = None  # started by the first completion, ended by finish()

    # ----------------------------------------------------------------- start of a run

    def _has_data(self) -> bool:
        return bool(self.fs.exists(self.root) and self.fs.ls(self.root))

    def prepare(self, mode: str, manifest: dict[str, Any], shards: Sequence[ShardRef]) -> ResumePlan:
        """Apply the write mode, reconcile files with markers, and return what is already done.

        Raises OutputConflictError in ``error`` mode when the output holds data,
        and in ``resume`` mode when the stored manifest differs from ``manifest``
        or cannot be read.
        """
        self.shards = {s.name: s for s in shards}
        if mode not in WRITE_MODES:
            raise ValueError(f"mode must be one of {WRITE_MODES}, got {mode!r}")
        self.fs.invalidate_cache()  # other processes (earlier drivers, workers) wrote here
        if self._has_data():
            if mode == "error":
                raise OutputConflictError(
                    f"output: {self.output.url} already holds data (write mode 'error'); "
                    "use --mode resume to finish it or --mode overwrite to replace it"
                )
            if mode == "overwrite":
                log.warning("write mode overwrite: deleting existing output at %s", self.output.url)
                # Markers first, then the manifest, then data: if this is
                # interrupted, no marker survives whose files are gone.
                for path in (join(self.root, MARKERS_DIR), join(self.root, MANIFEST_NAME), self.root):
                    if self.fs.exists(path):
                        self.fs.rm(path, recursive=True)
                self.fs.invalidate_cache()
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
            if isinstance(old.get(INPUT_ROOTS), list) and INPUT_ROOTS in manifest:
                # The earlier runs' rows stay in the output, and so does the right to show them.
                manifest = {**manifest, INPUT_ROOTS: list(dict.fromkeys(old[INPUT_ROOTS] + manifest[INPUT_ROOTS]))}
        _write_json_atomic(self.fs, join(self.root, MANIFEST_NAME), manifest, self.local)
        return self._reconcile(self._read_markers(), list(shards))

    def _reconcile(self, markers: dict[str, dict[str, Any]], shards: list[ShardRef]) -> ResumePlan:
        """Make the files agree with the markers, from one listing of the output.

        * an image folder whose files changed is redone: files, then markers, of
          all its chunks are removed (see :meth:`_drop_changed_folders`);
        * a marker whose files are not all there is dropped (its shard is redone);
        * files of a marked shard that its marker does not list (a write that
          landed after the marker) are deleted;
        * files of shards without a marker (a run that died) are deleted.
        """
        files_by_shard: dict[str, set[str]] = collections.defaultdict(set)
        for path in self.fs.find(self.root):
            shard = shard_of_file(self.output, self.root, path)
            if shard is not None:
                files_by_shard[shard].add(path)
        changed = self._drop_changed_folders(markers, shards, files_by_shard)
        shard_names = [s.name for s in shards]
        listed = set(shard_names)
        orphans = sorted(set(markers) - listed)
        plan = ResumePlan(done={}, orphan_markers=orphans, changed_folders=changed,
                          orphan_rows=sum(markers[name].get("rows") or 0 for name in orphans))  # fmt: skip
        if plan.orphan_markers:
            log.warning("%d completed shards are not in the input listing any more (e.g. %s); their rows stay",
                        len(plan.orphan_markers), plan.orphan_markers[:3])  # fmt: skip
        # Files of shards that are neither listed nor marked: left by a run that
        # died while the input listed other shards.  No marker counts them.
        stray: list[str] = sorted(p for name, paths in files_by_shard.items()
                                  if name not in listed and name not in markers for p in paths)  # fmt: skip
        for name in shard_names:
            present = files_by_shard.get(name, set())
            marker = markers.get(name)
            if marker is not None:
                reason = self._redo_reason(marker, self.shards[name])
                if reason is None and set(marker["files"]) <= present:
                    plan.done[name] = marker
                    stray += sorted(present - set(marker["files"]))
                    continue
                if reason is None:
                    log.warning("shard %s: marker lists files that are gone; redoing the shard", name)
                else:
                    plan.redone.setdefault(reason, []).append(name)
                # Marker first, then its files (below): an interruption leaves
                # files without a marker, which the next run removes.
                self.fs.rm(join(self.root, MARKERS_DIR, f"{name}.json"))
            stray += sorted(present)
        if stray:
            self.fs.rm(stray)
        plan.removed_files = len(stray)
        for reason, names in plan.redone.items():
            log.warning("resume: redoing %d completed shards (%s), e.g. %s", len(names), reason, names[:3])
        if plan.done or stray:
            log.info("resume: %d of %d shards already complete, %d stray files removed",
                     len(plan.done), len(shard_names), len(stray))  # fmt: skip
        return plan

    def _redo_reason(self, marker: dict[str, Any], shard: ShardRef) -> str | None:
        """Why a completed shard must be computed again, or None to keep it.

        Markers written before fingerprints were recorded carry none and are
        kept: an upgrade does not redo a whole output.
        """
        recorded = marker.get("fingerprint")
        if recorded and shard.fingerprint and recorded != shard.fingerprint:
            return "input_changed"
        kinds = set(marker.get("errors") or {})
        if kinds & SHARD_READ_ERRORS:
            return "read_failed"
        if self.output.retry_errors and kinds & TRANSIENT_ERROR_KINDS:
            return "retry_errors"
        return None

    def _drop_changed_folders(
        self,
        markers: dict[str, dict[str, Any]],
        shards: list[ShardRef],
        files_by_shard: dict[str, set[str]],
    ) -> list[str]:
        """Redo image folders whose files changed since their chunks were completed; return their URIs.

        A folder changed when one of its current chunks has a marker that
        recorded other contents, or a marker of the folder names a chunk that
        no longer exists.  Every chunk of it is then forgotten, files first and
        markers last, so an interruption never leaves a marker without its files.
        Shards of other formats (one per file) are never affected.
        """
        folders = {s.uri for s in shards if s.format == IMAGES_FORMAT}
        changed = set()
        for name, marker in markers.items():
            source = marker.get("source")
            if source not in folders:
                continue
            shard = self.shards.get(name)
            recorded = marker.get("content_id")
            if shard is None or shard.uri != source or (recorded is not None and recorded != shard.content_id):
                changed.add(source)
        if not changed:
            return []
        doomed = sorted(name for name, marker in markers.items() if marker.get("source") in changed)
        log.warning("image folders changed since they were annotated, redoing them: %s (%d completed chunks dropped)",
                    sorted(changed), len(doomed))  # fmt: skip
        paths = sorted(p for name in doomed for p in files_by_shard.pop(name, ()))
        if paths:
            self.fs.rm(paths)
        self.fs.rm([join(self.root, MARKERS_DIR, f"{name}.json") for name in doomed])
        for name in doomed:
            del markers[name]
        return sorted(changed)

    def _read_manifest(self) -> dict[str, Any] | None:
        path = join(self.root, MANIFEST_NAME)
        if not self.fs.exists(path):
            return None
        try:
            return json.loads(self.fs.cat_file(path))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise OutputConflictError(
                f"output: {join(self.output.url, MANIFEST_NAME)} is not readable JSON ({e}); "
                "use --mode overwrite to start this output again"
            ) from e

    def _read_markers(self) -> dict[str, dict[str, Any]]:
        marker_dir = join(self.root, MARKERS_DIR)
        if not self.fs.exists(marker_dir):
            return {}
        paths = [p for p in self.fs.ls(marker_dir, detail=False) if p.endswith(".json")]
        # One batched fetch: s3fs fetches concurrently, local reads are cheap.
        contents = self.fs.cat(paths) if paths else {}
        markers = {}
        for path, raw in contents.items():
            try:
                payload = json.loads(raw)
                markers[payload["shard"]] = payload
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
                log.warning("ignoring unreadable marker %s (%s); its shard will be redone", path, e)
        return markers

    # ----------------------------------------------------------------- during a run

    def record(self, reports: pa.Table) -> list[str]:
        """Fold write reports in; start completing shards whose rows are all durable.

        Returns the shards whose markers were written since the last call
        (completion runs on a few threads; :meth:`finish` waits for the rest).
        Raises LedgerError when more rows are reported for a shard than it
        has, and the storage error of a completion that failed.
        """
        for rep in reports.to_pylist():
            shard = rep["shard"]
            if shard in self.completed_this_run:
                self._late_report(rep, self.completed_this_run[shard])
                continue
            if shard in self._completing:
                self._late[shard].append(rep)
                continue
            state = self.in_flight[shard]
            if rep["file"] is None:
                state.expected = rep["shard_rows"]
                state.source = rep["source"]
            else:
                # Keyed by path: a retried write task reports the same file again.
                state.files[rep["file"]] = (rep["rows"], rep["ok"], json.loads(rep["errors"]))
            written = sum(rows for rows, _, _ in state.files.values())
            if state.expected is not None and written > state.expected:
                raise LedgerError(f"shard {shard}: {written} rows written but the shard has {state.expected}")
            if state.expected is not None and written == state.expected:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(COMPLETION_THREADS, thread_name_prefix="ledger")
                self._completing[shard] = self._pool.submit(self._complete, shard, self.in_flight.pop(shard))
        return self._collect(wait=False)

    def finish(self) -> list[str]:
        """Wait for the completions in progress; return the shards they completed.

        Reports recorded later start a new set of completion threads.
        """
        try:
            return self._collect(wait=True)
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None

    def _collect(self, wait: bool) -> list[str]:
        finished = [shard for shard, future in self._completing.items() if wait or future.done()]
        for shard in finished:
            marker = self._completing.pop(shard).result()  # re-raises the completion's storage error
            self.completed_this_run[shard] = marker
            for rep in self._late.pop(shard, []):
                self._late_report(rep, marker)
        return finished

    def _late_report(self, rep: dict[str, Any], marker: dict[str, Any]) -> None:
        """A report for a shard already complete: a retried write of a listed file is
        harmless; any other file (a retried write of a file since compacted, say)
        holds rows the listed files already have, and is deleted."""
        if rep["file"] is None or rep["file"] in marker["files"]:
            return
        log.warning("shard %s: deleting %s, written after the shard was complete", rep["shard"], rep["file"])
        self.fs.rm(rep["file"])

    def _shard_files(self, shard: str) -> list[str]:
        """The shard's data files as they are in storage now (bypassing listing caches)."""
        directory = self.root if self.output.partition_by == "none" else join(self.root, f"{PARTITION_COLUMN}={shard}")
        try:
            paths = self.fs.ls(directory, detail=False, refresh=True)
        except FileNotFoundError:
            return []
        return [p for p in paths if shard_of_file(self.output, self.root, p) == shard]

    def _complete(self, shard: str, state: _InFlight) -> dict[str, Any]:
        """Compact the shard's files, remove anything else of it, then write its marker (on a ledger thread)."""
        files = compact_shard(
            self.fs, self.output, self.root, shard, {p: rows for p, (rows, _, _) in state.files.items()}, self.run_id
        )
        # Also removes a write from a previous, killed driver that landed after
        # this run cleaned up: anything of this shard that is not in ``files``.
        strays = [p for p in self._shard_files(shard) if p not in set(files)]
        foreign = [p for p in strays if p not in state.files]
        if foreign:
            log.warning("shard %s: removing %d files left by an earlier attempt", shard, len(foreign))
        if strays:
            self.fs.rm(strays)
        errors: collections.Counter[str] = collections.Counter()
        for _, _, errs in state.files.values():
            errors.update(errs)
        ref = self.shards.get(shard)
        payload = {
            "shard": shard,
            "source": state.source,
            "content_id": ref.content_id if ref else None,
            "fingerprint": ref.fingerprint if ref else None,
            "rows": state.expected,
            "ok": sum(ok for _, ok, _ in state.files.values()),
            "errors": dict(sorted(errors.items())),
            "files": files,
            "run_id": self.run_id,
        }
        _write_json_atomic(self.fs, join(self.root, MARKERS_DIR, f"{shard}.json"), payload, self.local)
        return payload

    def incomplete(self) -> list[str]:
        """Shards that started but whose rows did not all arrive (should be empty after a run)."""
        return sorted(self.in_flight)
