"""Column names and Arrow types shared by every pipeline stage.

The stages hand each other ``pyarrow.Table`` batches.  Keeping the schema in one
place is what lets an error row produced by the reader, the decoder or the model
stage land in the same Parquet files as the good rows: every stage emits every
column, with nulls where it has nothing to say.
"""

from __future__ import annotations

from types import MappingProxyType

import pyarrow as pa

STATUS_OK = "ok"
STATUS_ERROR = "error"
# A bookkeeping row the reader appends after a shard's last sample; it carries
# the shard's row count in SHARD_ROWS so the driver knows when the shard is
# complete.  Every stage passes it through; the writer never writes it.
STATUS_SHARD_END = "shard_end"

# ----------------------------------------------------------------- error kinds
# The one registry of ``error_kind`` values.  Every stage takes its tags from
# here, the README's failure table lists exactly these (a test holds them
# equal), and ``transient`` says whether the same input may succeed on a rerun
# (``--retry-errors`` redoes shards holding such rows) or the failure is a
# property of the input, which a rerun would only repeat.

# Readers: one sample.
EMPTY_FILE = "empty_file"  # the image payload has zero bytes
MEMBER_TOO_LARGE = "member_too_large"  # tar member / image file above max_member_bytes
UNSAFE_MEMBER = "unsafe_member"  # tar: "..", absolute name, or the image member is a link/device
DUPLICATE_KEY = "duplicate_key"  # the key already appeared earlier in the same shard
MISSING_IMAGE = "missing_image"  # null image cell (or a path-only HF Image value)
MISSING_KEY = "missing_key"  # Parquet: null or empty value in the key column
READ_ERROR = "read_error"  # images format: the file could not be read
BAD_QUESTIONS = "bad_questions"  # the per-row questions value is neither a list nor text
# Readers: one row for the whole shard (key "").
EMPTY_SHARD = "empty_shard"  # the file has zero bytes
SHARD_UNREADABLE = "shard_unreadable"  # not a tar, truncated, corrupt Parquet: the file itself
SHARD_READ_ERROR = "shard_read_error"  # storage failed mid-read past every retry, or the file vanished
MISSING_IMAGE_COLUMN = "missing_image_column"  # no usable image column in a Parquet file
MISSING_KEY_COLUMN = "missing_key_column"  # the configured key column is absent
# Decoding.
NOT_AN_IMAGE = "not_an_image"  # Pillow cannot identify it as an allowed format
DECOMPRESSION_BOMB = "decompression_bomb"  # width*height above max_image_pixels
TRUNCATED_IMAGE = "truncated_image"  # the file ends before the pixel data does
DECODE_FAILED = "decode_failed"  # anything else the decoders reject
# Videos (workers/video.py).  A video's error row has the video's key and no frame_time.
NOT_A_VIDEO = "not_a_video"  # FFmpeg finds no container it can read (e.g. text named .mp4)
TRUNCATED_VIDEO = "truncated_video"  # the file ends before its index (MP4 moov atom) or its data
NO_VIDEO_STREAM = "no_video_stream"  # a container with audio or subtitles only
VIDEO_DECODE_FAILED = "video_decode_failed"  # corrupt data mid-stream: frames before it are kept
FRAME_LIMIT_REACHED = "frame_limit_reached"  # max_frames_per_video sampled; the rest of the video is not
# Model.
GENERATION_FAILED = "generation_failed"  # generate raised for this image alone
OUT_OF_MEMORY = "out_of_memory"  # out of accelerator memory even alone
CONTEXT_EXCEEDED = "context_exceeded"  # a conversation turn would not fit the language model's context

# error_kind -> transient (a rerun of the same input may succeed).
ERROR_KINDS: MappingProxyType[str, bool] = MappingProxyType(
    {
        EMPTY_FILE: False,
        MEMBER_TOO_LARGE: False,
        UNSAFE_MEMBER: False,
        DUPLICATE_KEY: False,
        MISSING_IMAGE: False,
        MISSING_KEY: False,
        READ_ERROR: True,  # a storage failure past every retry
        BAD_QUESTIONS: False,
        EMPTY_SHARD: False,
        SHARD_UNREADABLE: False,  # a changed file is redone anyway (its fingerprint differs)
        SHARD_READ_ERROR: True,
        MISSING_IMAGE_COLUMN: False,
        MISSING_KEY_COLUMN: False,
        NOT_AN_IMAGE: False,
        DECOMPRESSION_BOMB: False,
        TRUNCATED_IMAGE: False,
        DECODE_FAILED: False,
        NOT_A_VIDEO: False,
        TRUNCATED_VIDEO: False,
        NO_VIDEO_STREAM: False,
        VIDEO_DECODE_FAILED: False,
        FRAME_LIMIT_REACHED: False,
        GENERATION_FAILED: True,
        OUT_OF_MEMORY: True,  # a later run may have larger GPUs or a smaller batch
        CONTEXT_EXCEEDED: False,
    }
)
TRANSIENT_ERROR_KINDS = frozenset(kind for kind, transient in ERROR_KINDS.items() if transient)
# Shard-level read failures: a resume retries shards that ended in one even
# without --retry-errors, so an outage never becomes a permanent gap.
SHARD_READ_ERRORS = frozenset({SHARD_READ_ERROR})

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
MEDIA = "media"  # "video" on a tar sample whose media member is a video; null for images
SHARD_ROWS = "shard_rows"  # only on STATUS_SHARD_END rows: rows the shard produced

# Stage 2 (decode) output replaces ``image`` with these.
PIXELS = "pixels"  # uint8 tensor (H, W, 3) at the model's input size
WIDTH = "width"  # original width, before resizing
HEIGHT = "height"
# Video frames only (null on image rows): the frame's presentation time in seconds
# from the stream's start, its index in the stream, and the video's duration.
FRAME_TIME = "frame_time"
FRAME_INDEX = "frame_index"
VIDEO_DURATION = "video_duration"
FRAME_FIELDS = [
    pa.field(FRAME_TIME, pa.float64()),
    pa.field(FRAME_INDEX, pa.int64()),
    pa.field(VIDEO_DURATION, pa.float64()),
]

# Stage 3 (model) output replaces ``pixels`` with these.
CAPTION = "caption"
ANSWERS = "answers"
CONVERSATION = "conversation"  # questions asked in turns, each seeing the earlier answers
MODEL_ID = "model_id"
MODEL_REVISION = "model_revision"

ANSWER_TYPE = pa.struct([("question", pa.string()), ("answer", pa.string())])
TURN_TYPE = pa.struct([("turn", pa.int32()), ("question", pa.string()), ("answer", pa.string())])

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
    pa.field(MEDIA, pa.string()),
]

OUTPUT_FIELDS = [
    pa.field(ID, pa.string(), nullable=False),
    pa.field(SOURCE, pa.string(), nullable=False),
    pa.field(SHARD, pa.string(), nullable=False),
    pa.field(KEY, pa.string(), nullable=False),
    pa.field(CAPTION, pa.string()),
    pa.field(ANSWERS, pa.list_(ANSWER_TYPE)),
    pa.field(CONVERSATION, pa.list_(TURN_TYPE)),
    pa.field(STATUS, pa.string(), nullable=False),
    pa.field(ERROR_KIND, pa.string()),
    pa.field(ERROR, pa.string()),
    pa.field(WIDTH, pa.int32()),
    pa.field(HEIGHT, pa.int32()),
    *FRAME_FIELDS,
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
