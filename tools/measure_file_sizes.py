"""Bytes per output row, for the file sizes README.md and docs/scaling.md quote.

Writes rows in the job's exact output schema and Parquet settings
(``workers.writer.output_schema`` + ``write_parquet_atomic``: zstd) with
caption texts shaped like BLIP-2's ("a red dog sitting on a park bench")
and, as an upper bound on their entropy, 8-14 words drawn at random from real
English prose (the standard library's docstrings);
three questions with answers of 1-3 words,
ids like a WebDataset run on S3's, and prints bytes per row for files of
256 rows (one write: a model batch on GPU), 10,000 rows (one img2dataset shard) and
100,000 rows (the default max_rows_per_file), then the time compaction takes
for one 10,000-row shard written in model batches of 256 rows.

    python tools/measure_file_sizes.py
"""

from __future__ import annotations

import random
import tempfile
import time

import fsspec
import pyarrow as pa

from workers import schema
from workers.config import OutputSpec
from workers.writer import compact_shard, conform, file_path, output_schema, write_parquet_atomic

SUBJECTS = ["man", "woman", "dog", "cat", "child", "group of people", "bird", "car", "train", "plate of food",
            "bowl of soup", "boy", "girl", "horse", "bus", "truck", "cake", "pizza", "sandwich", "table", "room",
            "kitchen", "bathroom", "bedroom", "living room", "street", "field", "beach", "mountain", "building",
            "laptop", "phone", "clock", "vase of flowers", "giraffe", "elephant", "zebra", "sheep", "cow", "bear"]
ADJ = ["red", "blue", "white", "black", "small", "large", "old", "young", "wooden", "green", "yellow", "brown",
       "busy", "empty", "tall", "little", "bright", "dark", "open", "colorful"]
VERBS = ["sitting on", "standing next to", "riding", "walking down", "holding", "looking at", "lying on",
         "playing with", "eating", "parked in front of", "flying over", "covered with", "in front of", "near"]
PLACES = ["a city street", "a grassy field", "the beach", "a wooden table", "a kitchen counter", "the snow",
          "a dirt road", "a park bench", "the water", "a white plate", "a brick wall", "a crowded sidewalk",
          "the sidewalk", "a living room", "a tree", "the ocean", "a window", "a couch", "a bed", "the sky"]
ANSWERS = ["yes", "no", "two", "three", "red", "a dog", "a man", "outside", "a kitchen", "white", "on a table",
           "a street sign", "nothing", "daytime", "a city", "blue and white"]


def _prose_words() -> list[str]:
    """Real English with a far larger vocabulary than captions have: the standard library's docstrings."""
    import inspect
    import pydoc  # noqa: F401  (imports much of the standard library's documentation)

    words: list[str] = []
    for module in ("argparse", "collections", "email", "http.client", "json", "logging", "os", "pathlib",
                   "subprocess", "tarfile", "textwrap", "threading", "unittest", "urllib.request", "zipfile"):
        mod = __import__(module, fromlist=["_"])
        for _, obj in inspect.getmembers(mod):
            doc = inspect.getdoc(obj) or ""
            words += [w.strip(".,:;()`'\"").lower() for w in doc.split() if w.isascii() and w.isalpha()]
    return words


PROSE = _prose_words()


def caption(rng: random.Random, style: str) -> str:
    """A template caption ("a red dog sitting on a park bench") or 8-14 words of real English as a caption's length."""
    if style == "template":
        return f"a {rng.choice(ADJ)} {rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(PLACES)}"
    # Words drawn independently, by their frequency in the prose: no phrase repeats, which real captions do.
    return " ".join(rng.choice(PROSE) for _ in range(rng.randint(8, 14)))


def rows(n: int, rng: random.Random, shard: int, style: str) -> pa.Table:
    source = f"s3://my-bucket/laion400m/{shard:05d}.tar"
    keys = [f"{shard:05d}{i:04d}" for i in range(n)]
    questions = ["What is in the picture?", "What colour is it?", "Is there text in the image?"]
    return conform(
        pa.table({
            schema.ID: [f"{source}::{k}" for k in keys],
            schema.SOURCE: [source] * n,
            schema.KEY: keys,
            schema.CAPTION: [caption(rng, style) for _ in range(n)],
            schema.ANSWERS: [[{"question": q, "answer": rng.choice(ANSWERS)} for q in questions] for _ in range(n)],
            schema.STATUS: ["ok"] * n,
            schema.WIDTH: [rng.randint(256, 4000) for _ in range(n)],
            schema.HEIGHT: [rng.randint(256, 4000) for _ in range(n)],
            schema.MODEL_ID: ["Salesforce/blip2-opt-2.7b"] * n,
            schema.MODEL_REVISION: ["51572668da0eb669e01a189dc22abe6088589a24"] * n,
        }),  # fmt: skip
        output_schema(),
    ).drop_columns([schema.SHARD])  # the partition column lives in the directory name


def main() -> None:
    rng = random.Random(0)
    fs = fsspec.filesystem("file")
    with tempfile.TemporaryDirectory() as tmp:
        print("captions | rows per file | bytes per row | file size")
        for style in ("template", "prose"):
            for n in (256, 10_000, 100_000):
                path = f"{tmp}/{style}-{n}.parquet"
                write_parquet_atomic(fs, path, rows(n, rng, shard=n % 997, style=style), local=True)
                size = fs.size(path)
                print(f"{style:>8} | {n:>13,} | {size / n:>13.1f} | {size / 1e6:.2f} MB")
        # What completing a shard adds: its write batches rewritten as one file (local disk).
        output = OutputSpec(url=f"{tmp}/out")
        table = rows(10_000, rng, shard=1, style="prose")
        files = {}
        for start in range(0, table.num_rows, 256):
            part = table.slice(start, 256)
            path = file_path(output, output.url, "s", "r1", part.column(schema.ID).to_pylist())
            write_parquet_atomic(fs, path, part, local=True)
            files[path] = part.num_rows
        times = []
        for attempt in range(5):
            started = time.perf_counter()
            compact_shard(fs, output, output.url, "s", files, f"c{attempt}")
            times.append(time.perf_counter() - started)
        print(f"\ncompacting a 10,000-row shard from {len(files)} files: {1000 * min(times):.0f} ms (best of 5)")


if __name__ == "__main__":
    main()
