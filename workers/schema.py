"""Column names and Arrow types shared by every pipeline stage.

The stages hand each other ``pyarrow.Table`` batches.  Keeping the schema in one
place is what lets an error row produced by the reader, the decoder or the model
stage land in the same Parquet files as the good rows: every stage emits every
column, with nulls where it has nothing to say.
"""

from __future__ import annotations

import pyarrow as pa

STATUS_OK = "ok"
STATUS_ERROR = "error"
# A bookkeeping row the reader appends after a shard's last sample; it carries
# the shard's row count in SHARD_ROWS so the driver knows when the shard is
# complete.  Every stage passes it through; the writer never writes it.
STATUS_SHARD_END = "shard_end"

# Stage 1 (reader) output.  ``image`` holds the undecoded bytes.
ID = "id"  # f"{source}::{key}", stable across reruns
SOURCE = "source"  # full URI of the input shard (or image file)
SHARD = "shard"  # partition-safe name of the shard ([A-Za-z0-9._-] only)
KEY = "key"  # WebDataset key, Parquet key column value, or relative file path
IMAGE = "image"
STATUS = "status"
ERROR_KIND = "error_kind"  # short snake_case tag, e.g. "truncated_image"
ERROR = "error"  # human-readable reason
ROW_QUESTIONS = "row_questions"  # per-row questions from an input column
SHARD_ROWS = "shard_rows"  # only on STATUS_SHARD_END rows: rows the shard produced

# Stage 2 (decode) output replaces ``image`` with these.
PIXELS = "pixels"  # uint8 tensor (H, W, 3) at the model's input size
WIDTH = "width"  # original width, before resizing
HEIGHT = "height"

# Stage 3 (model) output replaces ``pixels`` with these.
CAPTION = "caption"
ANSWERS = "answers"
MODEL_ID = "model_id"
MODEL_REVISION = "model_revision"

ANSWER_TYPE = pa.struct([("question", pa.string()), ("answer", pa.string())])

READ_FIELDS = [
    pa.field(ID, pa.string(), nullable=False),
    pa.field(SOURCE, pa.string(), nullable=False),
    pa.field(SHARD, pa.string(), nullable=False),
    pa.field(KEY, pa.string(), nullable=False),
    pa.field(IMAGE, pa.binary()),
    pa.field(STATUS, pa.string(), nullable=False),
    pa.field(ERROR_KIND, pa.string()),
    pa.field(ERROR, pa.string()),
    pa.field(ROW_QUESTIONS, pa.list_(pa.string())),
    pa.field(SHARD_ROWS, pa.int64()),
]

OUTPUT_FIELDS = [
    pa.field(ID, pa.string(), nullable=False),
    pa.field(SOURCE, pa.string(), nullable=False),
    pa.field(SHARD, pa.string(), nullable=False),
    pa.field(KEY, pa.string(), nullable=False),
    pa.field(CAPTION, pa.string()),
    pa.field(ANSWERS, pa.list_(ANSWER_TYPE)),
    pa.field(STATUS, pa.string(), nullable=False),
    pa.field(ERROR_KIND, pa.string()),
    pa.field(ERROR, pa.string()),
    pa.field(WIDTH, pa.int32()),
    pa.field(HEIGHT, pa.int32()),
    pa.field(MODEL_ID, pa.string()),
    pa.field(MODEL_REVISION, pa.string()),
]


# Every column a stage owns.  An input column with one of these names (LAION's
# Parquet has "caption") is passed through as "input_<name>" instead.
RESERVED_COLUMNS = frozenset(
    f.name for f in READ_FIELDS + OUTPUT_FIELDS + [pa.field(PIXELS, pa.null()), pa.field(IMAGE, pa.null())]
)


def passthrough_name(name: str) -> str:
    """Output column name for input column ``name``."""
    return f"input_{name}" if name in RESERVED_COLUMNS else name


def read_schema(passthrough: tuple[str, ...] = ()) -> pa.Schema:
    """Schema of reader output.  Passthrough columns are strings, named by :func:`passthrough_name`.

    Passthrough values are carried as strings so that shards of different
    formats (a Parquet ``url`` column next to a tar's ``.txt`` member) always
    concatenate; users who need the original types can join on ``id``.
    """
    return pa.schema(READ_FIELDS + [pa.field(passthrough_name(name), pa.string()) for name in passthrough])
