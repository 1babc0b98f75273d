"""Shard-level bookkeeping that makes runs exactly-once and resumable.

Layout under the output URL (names starting with ``_`` are skipped by Parquet
readers such as PyArrow datasets and DuckDB globs of ``*.parquet``):

* ``_manifest.json`` — the settings that shape the rows (model and revision,
  prompts, questions, generation, input columns, partitioning) and the code
  version.  A resumed run whose settings differ is refused.
* ``_markers/<shard>.json`` — written by the driver only after every row of
  that shard is durable in Parquet, listing the shard's files and counts and
  what the shard held (:attr:`ShardRef.content_id`).

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
written twice.

The driver's memory holds one entry per shard *in flight*, never per image.
"""

from __future__ import annotations

import collections
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from workers.config import WRITE_MODES, OutputSpec, StorageOptions
from workers.listing import IMAGES as IMAGES_FORMAT
from workers.listing import ShardRef
from workers.storage import filesystem_for, join, protocol_of
from workers.writer import PARTITION_COLUMN, put_atomic, shard_of_file

log = logging.getLogger(__name__)

MANIFEST_NAME = "_manifest.json"
MARKERS_DIR = "_markers"


class OutputConflictError(RuntimeError):
    """The output location cannot be used as asked (exists in error mode, or settings differ)."""


class LedgerError(RuntimeError):
    """Bookkeeping found an impossible state (e.g. more rows written for a shard than it has)."""


def _write_json_atomic(fs, path: str, payload: Any, local: bool) -> None:
    put_atomic(fs, path, json.dumps(payload, indent=2, sort_keys=True).encode(), local)


# Settings added after outputs were first written, with the value that older
# code used without recording it: a resume compares against that value, so an
# output decoded one way is not silently continued another way.
LEGACY_VALUES: dict[str, Any] = {"decode.mode": "exact"}


def manifest_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Human-readable differences between two manifests.

    ``code_version`` is informational.  A setting the old manifest does not
    know (added by a newer version of this code) is compared against its
    :data:`LEGACY_VALUES` entry when it has one, and ignored otherwise.
    """
    diffs = []
    for key in sorted(set(old) | set(new)):
        path = f"{prefix}{key}"
        if key == "code_version" and not prefix:
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
    changed_folders: list[str] = field(default_factory=list)  # image folders redone because their files changed


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
        self.content_ids: dict[str, str] = {}

    # ----------------------------------------------------------------- start of a run

    def _has_data(self) -> bool:
        return bool(self.fs.exists(self.root) and self.fs.ls(self.root))

    def prepare(self, mode: str, manifest: dict[str, Any], shards: Sequence[ShardRef]) -> ResumePlan:
        """Apply the write mode, reconcile files with markers, and return what is already done.

        Raises OutputConflictError in ``error`` mode when the output holds data,
        and in ``resume`` mode when the stored manifest differs from ``manifest``
        or cannot be read.
        """
        self.content_ids = {s.name: s.content_id for s in shards}
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
        plan = ResumePlan(done={}, orphan_markers=sorted(set(markers) - listed), changed_folders=changed)
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
                wanted = {self._strip(f) for f in marker["files"]}
                if wanted <= present:
                    plan.done[name] = marker
                    stray += sorted(present - wanted)
                    continue
                log.warning("shard %s: marker lists files that are gone; redoing the shard", name)
                self.fs.rm(join(self.root, MARKERS_DIR, f"{name}.json"))
            stray += sorted(present)
        if stray:
            self.fs.rm(stray)
        plan.removed_files = len(stray)
        if plan.done or stray:
            log.info("resume: %d of %d shards already complete, %d stray files removed",
                     len(plan.done), len(shard_names), len(stray))  # fmt: skip
        return plan

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
        current = {s.name: s for s in shards}
        folders = {s.uri for s in shards if s.format == IMAGES_FORMAT}
        changed = set()
        for name, marker in markers.items():
            source = marker.get("source")
            if source not in folders:
                continue
            shard = current.get(name)
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
        """Fold write reports in; write markers for shards now complete; return their names.

        Raises LedgerError when more rows are reported for a shard than it has.
        """
        finished = []
        for rep in reports.to_pylist():
            done = self.completed_this_run.get(rep["shard"])
            if done is not None:
                self._late_report(rep, done)
                continue
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

    def _late_report(self, rep: dict[str, Any], marker: dict[str, Any]) -> None:
        """A report for a shard already complete: a retried write of a listed file is
        harmless; any other file would duplicate rows and is deleted."""
        if rep["file"] is None or self._strip(rep["file"]) in {self._strip(f) for f in marker["files"]}:
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

    def _complete(self, shard: str, state: _InFlight) -> None:
        # A write from a previous, killed driver may have landed after this run
        # cleaned up: remove anything of this shard that this run did not write.
        ours = {self._strip(f) for f in state.files}
        strays = [p for p in self._shard_files(shard) if self._strip(p) not in ours]
        if strays:
            log.warning("shard %s: removing %d files left by an earlier attempt", shard, len(strays))
            self.fs.rm(strays)
        errors: collections.Counter[str] = collections.Counter()
        for _, _, errs in state.files.values():
            errors.update(errs)
        payload = {
            "shard": shard,
            "source": state.source,
            "content_id": self.content_ids.get(shard),
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
