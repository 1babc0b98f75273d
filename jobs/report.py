"""``python -m jobs.report OUTPUT_URL --html report.html``: one page that shows what a run produced.

The page holds the run's ``_summary.json``, error rows counted by kind (a bar
chart), and a sample of rows with thumbnails read back from their shards
(video rows: the frame at ``frame_time``).  The sample is deterministic: the
first ok rows of each output file in turn, then the first error rows, so two
reports of the same output show the same rows.

Exit codes: 0 written, 2 a problem the user can fix (no data at the URL), 1 a storage failure.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import sys
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from jobs.annotate import SUMMARY_NAME
from jobs.pages import report_page
from workers import schema
from workers.config import StorageOptions
from workers.search_store import SearchError, list_data_files
from workers.storage import filesystem_for, join
from workers.thumbnails import job_input_settings, thumbnails

_SAMPLE_COLUMNS = (
    schema.ID,
    schema.SOURCE,
    schema.KEY,
    schema.CAPTION,
    schema.ANSWERS,
    schema.FRAME_TIME,
    schema.STATUS,
    schema.ERROR_KIND,
    schema.ERROR,
)


def _columns(pf: pq.ParquetFile, wanted: tuple[str, ...]) -> list[str]:
    return [c for c in wanted if c in pf.schema_arrow.names]


def collect(output_url: str, storage: StorageOptions, sample_rows: int, error_rows: int) -> dict[str, Any]:
    """Counts and the sample, reading only the columns it needs; :class:`SearchError` when there is no data."""
    files = sorted(list_data_files(output_url, storage))
    errors: collections.Counter[str] = collections.Counter()
    total = 0
    ok_sample: list[dict[str, Any]] = []
    error_sample: list[dict[str, Any]] = []
    per_file = max(1, math.ceil(sample_rows / len(files)))
    for url in files:
        fs, path = filesystem_for(url, storage)
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            table = pf.read(columns=_columns(pf, _SAMPLE_COLUMNS))
        total += table.num_rows
        rows = table.to_pylist() if schema.STATUS in table.column_names else []
        taken = 0
        for row in rows:
            if row[schema.STATUS] == schema.STATUS_ERROR:
                errors[row.get(schema.ERROR_KIND) or "unknown"] += 1
                if len(error_sample) < error_rows:
                    error_sample.append(row)
            elif taken < per_file and len(ok_sample) < sample_rows:
                ok_sample.append(row)
                taken += 1
        if not rows:  # a plain dataset without a status column: every row is a sample candidate
            ok_sample += table.slice(0, max(0, min(per_file, sample_rows - len(ok_sample)))).to_pylist()
    return {"rows": total, "errors": dict(errors), "sample": ok_sample + error_sample}


def _summary(output_url: str, storage: StorageOptions) -> dict[str, Any] | None:
    fs, path = filesystem_for(join(output_url, SUMMARY_NAME), storage)
    try:
        return json.loads(fs.cat_file(path))
    except (FileNotFoundError, ValueError):
        return None


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.report", description=__doc__.split("\n")[0])
    p.add_argument("output_url", help="the job's output (local path or s3://...)")
    p.add_argument("--html", required=True, help="the HTML file to write")
    p.add_argument("--sample", type=int, default=24, help="ok rows to show")
    p.add_argument("--error-sample", type=int, default=8, help="error rows to show")
    p.add_argument("--endpoint-url", help="S3-compatible endpoint (MinIO, R2, ...); credentials: standard AWS chain")
    return p


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    storage = StorageOptions(endpoint_url=args.endpoint_url)
    try:
        if args.sample < 0 or args.error_sample < 0:
            raise SearchError("--sample and --error-sample must be >= 0")
        found = collect(args.output_url, storage, args.sample, args.error_sample)
        wanted = [(r.get(schema.SOURCE), r.get(schema.KEY), r.get(schema.FRAME_TIME)) for r in found["sample"]]
        thumbs = thumbnails(wanted, job_input_settings(args.output_url, storage), storage)
        page = report_page(
            args.output_url, _summary(args.output_url, storage), found["errors"], found["rows"], found["sample"], thumbs
        )
        Path(args.html).write_text(page, encoding="utf-8")
    except SearchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: storage: {exc}", file=sys.stderr)
        return 1
    missing = sum(1 for t in thumbs.values() if t.data_uri is None)
    print(
        f"wrote {args.html}: {found['rows']} rows, {sum(found['errors'].values())} error rows, "
        f"{len(found['sample'])} shown ({missing} without a thumbnail)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
