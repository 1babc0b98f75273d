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

import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs.annotate import SUMMARY_NAME
from jobs.pages import report_page
from workers import schema
from workers.config import StorageOptions
from workers.search_store import SearchError, check_row_columns, clean_row, list_data_files, readable_parquet
from workers.storage import ALLOW_SOURCE_HELP, filesystem_for, join
from workers.thumbnails import job_inputs, thumbnails

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


def _error_counts(pf: pq.ParquetFile) -> collections.Counter[str]:
    if schema.STATUS not in pf.schema_arrow.names:
        return collections.Counter()
    table = pf.read(columns=_columns(pf, (schema.STATUS, schema.ERROR_KIND)))
    failed = table.filter(pc.equal(table.column(schema.STATUS), schema.STATUS_ERROR))
    kinds = failed.column(schema.ERROR_KIND) if schema.ERROR_KIND in failed.column_names else None
    return collections.Counter(
        {"unknown": failed.num_rows}
        if kinds is None
        else {k or "unknown": n for k, n in collections.Counter(kinds.to_pylist()).items()}
    )


def collect(output_url: str, storage: StorageOptions, sample_rows: int, error_rows: int) -> dict[str, Any]:
    """Counts and the sample; :class:`SearchError` when there is no data.

    Counting reads two small columns of every file; the sample reads whole rows
    only from the first batches of the first files that have what it still needs.
    """
    files = sorted(list_data_files(output_url, storage))
    errors: collections.Counter[str] = collections.Counter()
    total = 0
    ok_sample: list[dict[str, Any]] = []
    error_sample: list[dict[str, Any]] = []
    per_file = max(1, math.ceil(sample_rows / len(files)))
    for url in files:
        fs, path = filesystem_for(url, storage)
        with fs.open(path, "rb") as f, readable_parquet(url):
            pf = pq.ParquetFile(f)
            check_row_columns(url, pf.schema_arrow, _SAMPLE_COLUMNS)  # a binary caption: a message, not a traceback
            total += pf.metadata.num_rows
            file_errors = _error_counts(pf)
            errors += file_errors
            want_ok = min(per_file, sample_rows - len(ok_sample))
            want_errors = (error_rows - len(error_sample)) if file_errors else 0
            for batch in pf.iter_batches(batch_size=1024, columns=_columns(pf, _SAMPLE_COLUMNS)):
                if want_ok <= 0 and want_errors <= 0:
                    break
                for row in map(clean_row, batch.to_pylist()):  # NaN frame times, malformed answers
                    if row.get(schema.STATUS) == schema.STATUS_ERROR:
                        if want_errors > 0:
                            error_sample.append(row)
                            want_errors -= 1
                    elif want_ok > 0:
                        ok_sample.append(row)
                        want_ok -= 1
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
    p.add_argument("--allow-source", action="append", default=[], metavar="PREFIX", help=ALLOW_SOURCE_HELP)
    return p


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    storage = StorageOptions(endpoint_url=args.endpoint_url)
    try:
        if args.sample < 0 or args.error_sample < 0:
            raise SearchError("--sample and --error-sample must be >= 0")
        found = collect(args.output_url, storage, args.sample, args.error_sample)
        wanted = [(r.get(schema.SOURCE), r.get(schema.KEY), r.get(schema.FRAME_TIME)) for r in found["sample"]]
        thumbs = thumbnails(wanted, job_inputs(args.output_url, storage, tuple(args.allow_source)), storage)
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
