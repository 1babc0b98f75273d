"""``python -m jobs.search index|query``: find captions and answers again.

    python -m jobs.search index OUTPUT_URL [--index PATH] [--text-columns caption,answers]
                                [--model ID_OR_DIR | --no-embeddings] [--overwrite] [--ray]
    python -m jobs.search query OUTPUT_URL "a red car in a tunnel" [--top-k 10] [--json]
                                [--mode hybrid|text|semantic] [--where "frame_time > 60"] [--html hits.html]

Exit codes: 0 done, 2 a problem the user can fix (the message says what), 1 a storage failure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from workers.config import StorageOptions
from workers.embedder import DEFAULT_MODEL, EmbeddingUnavailableError, TextEmbedder
from workers.search_index import EmbedFiles, IndexSpec, build_index
from workers.search_query import MODES, WHERE_SECONDS, QuerySpec, open_searcher
from workers.search_store import IndexLocation, SearchError, staleness
from workers.storage import ALLOW_SOURCE_HELP, join

# CPUs per embedding actor on a cluster without GPUs: a small model's matrix products use two
# cores well (Ray sets the actor's thread count to its CPUs); more per actor scale poorly.
_CPUS_PER_EMBED_ACTOR = 2


def default_cache_dir() -> str:
    """Where remote indexes are worked on and queried: ``$XDG_CACHE_HOME/blip2-annotate/search``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "blip2-annotate", "search")


def embed_with_ray(spec: IndexSpec, jobs: list[tuple[str, str]]) -> tuple[dict[str, int], int]:
    """The embedding phase as a Ray Data job: one Parquet file per task, GPU actors when the cluster has GPUs."""
    import ray

    if not ray.is_initialized():
        ray.init()  # RAY_ADDRESS, when set, joins that cluster
    resources = ray.cluster_resources()
    gpus = resources.get("GPU", 0)
    cpus_each = 1 if gpus else min(_CPUS_PER_EMBED_ACTOR, max(1, int(resources.get("CPU", 1))))
    actors = max(1, int(gpus)) if gpus else max(1, int(resources.get("CPU", 1)) // cpus_each)
    ds = ray.data.from_items([{"path": p, "vectors": v} for p, v in jobs])
    out = ds.map_batches(
        EmbedFiles,
        fn_constructor_args=(
            spec.embedding_model,
            spec.resolved_index_url,
            spec.storage,
            spec.text_columns,
            spec.embed_batch_size,
        ),
        batch_size=1,  # one file per call: its vectors are one atomic write
        concurrency=min(actors, len(jobs)),
        num_gpus=1 if gpus else 0,
        num_cpus=cpus_each,
    ).take_all()
    dims = {int(r["dim"]) for r in out}
    return {r["path"]: int(r["rows"]) for r in out}, (dims.pop() if dims else 0)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("output_url", help="the job's output (local path or s3://...), or any Parquet dataset with an id")
    p.add_argument("--index", default="", help="index folder (default: OUTPUT_URL/_search)")
    p.add_argument("--endpoint-url", help="S3-compatible endpoint (MinIO, R2, ...); credentials: standard AWS chain")
    p.add_argument("--cache-dir", default=None, help="local folder for remote indexes (default: ~/.cache/...)")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.search", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("index", help="build or update the search index")
    _add_common(p)
    p.add_argument("--text-columns", default="caption,answers", help="comma-separated columns to search")
    p.add_argument("--model", default=DEFAULT_MODEL, help="sentence-transformers model: hub id or local folder")
    p.add_argument("--no-embeddings", action="store_true", help="full text only (no semantic or hybrid queries)")
    p.add_argument("--overwrite", action="store_true", help="delete the index and build it again")
    p.add_argument("--ray", default="auto", choices=("auto", "on", "off"),
                   help="embeddings as a Ray Data job, on GPUs when the cluster has them; auto: from 100k rows")
    p.add_argument("--batch-size", type=int, default=256, help="texts per embedding batch")
    q = sub.add_parser("query", help="search the index")
    _add_common(q)
    q.add_argument("text", help="what to look for, in plain words")
    q.add_argument("--top-k", type=int, default=10)
    q.add_argument("--mode", default="hybrid", choices=MODES)
    q.add_argument("--where", default=None, help='SQL filter over the indexed columns, e.g. "frame_time > 60"')
    q.add_argument("--where-seconds", type=float, default=WHERE_SECONDS, help="stop a --where filter after this long")
    q.add_argument("--json", action="store_true", help="print the hits as a JSON list, and nothing else")
    q.add_argument("--html", default=None, help="also write the hits, with thumbnails, to this HTML file")
    q.add_argument("--allow-source", action="append", default=[], metavar="PREFIX", help=ALLOW_SOURCE_HELP)
    return parser


def _storage(args: argparse.Namespace) -> StorageOptions:
    return StorageOptions(endpoint_url=args.endpoint_url)


def run_index(args: argparse.Namespace) -> int:
    spec = IndexSpec(
        output_url=args.output_url,
        index_url=args.index,
        text_columns=tuple(c.strip() for c in args.text_columns.split(",") if c.strip()),
        embedding_model=None if args.no_embeddings else args.model,
        overwrite=args.overwrite,
        use_ray=args.ray,
        embed_batch_size=args.batch_size,
        cache_dir=args.cache_dir or default_cache_dir(),
        storage=_storage(args),
    )
    report = build_index(spec, embed_with_ray)
    print(
        f"indexed {report.rows_indexed} rows from {report.files_indexed} file(s) in {report.text_seconds:.1f} s, "
        f"embedded {report.rows_embedded} in {report.embed_seconds:.1f} s; {report.files_skipped} file(s) already "
        f"indexed, {report.files_removed} dropped; index: {report.index_url}"
    )
    return 0


def run_query(args: argparse.Namespace) -> int:
    storage = _storage(args)
    spec = QuerySpec(text=args.text, top_k=args.top_k, mode=args.mode, where=args.where,
                     where_seconds=args.where_seconds)  # fmt: skip
    location = IndexLocation(
        args.index or join(args.output_url, "_search"), storage, args.cache_dir or default_cache_dir()
    )
    searcher = open_searcher(location, lambda model: TextEmbedder(model))
    try:
        stale = staleness(searcher.conn, args.output_url, storage)
        if stale:
            print(
                f"warning: {stale}; hits come from what it holds. Update it with: "
                f"python -m jobs.search index {args.output_url}",
                file=sys.stderr,
            )
        hits = [h.to_json() for h in searcher.search(spec)]
    finally:
        searcher.close()
    if args.html:
        # Here, not at the top: PyAV, Pillow and the readers cost a plain query's start-up a quarter second.
        from jobs.pages import hits_page
        from workers.thumbnails import job_inputs, thumbnails

        job = job_inputs(args.output_url, storage, tuple(args.allow_source))
        thumbs = thumbnails([(h["source"], h["key"], h["frame_time"]) for h in hits], job, storage)
        Path(args.html).write_text(hits_page(spec.text, spec.mode, hits, thumbs), encoding="utf-8")
    if args.json:
        print(json.dumps(hits, ensure_ascii=False))
    else:
        for i, h in enumerate(hits, 1):
            at = f" @ {h['frame_time']:.3f}s" if h["frame_time"] is not None else ""
            print(f"{i:>3}. {h['score']:.4f}  {h['caption']!s}  [{h['source']} :: {h['key']}{at}]")
            for a in h["answers"]:
                print(f"       Q: {a.get('question')}  A: {a.get('answer')}")
        if not hits:
            print("no hits")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        return run_index(args) if args.command == "index" else run_query(args)
    except (SearchError, EmbeddingUnavailableError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: storage: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
