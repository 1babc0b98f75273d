"""read_shard against real tars, Parquet files and image folders, locally and on S3."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import parquet_bytes, tar_bytes, write_file
from imagefactory import jpeg_bytes, noise_png
from PIL import Image

from workers.config import InputSpec, StorageOptions
from workers.listing import ShardRef, list_shards
from workers.readers import parse_questions, read_shard, split_key
from workers.schema import read_schema

LOCAL = StorageOptions()


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def jpegs() -> dict[str, bytes]:
    """Small real JPEGs (skimage photos, downscaled so the tests stay fast)."""
    from skimage import data

    return {
        name: jpeg_bytes(np.asarray(Image.fromarray(getattr(data, name)()).resize((48, 32))), quality=85)
        for name in ("astronaut", "coffee", "chelsea", "rocket")
    }


def shard_for(path: Path, fmt: str = "webdataset", name: str = "s0") -> ShardRef:
    return ShardRef(uri=str(path), format=fmt, name=name, root=str(path.parent))


def read_rows(shard: ShardRef, spec: InputSpec, storage: StorageOptions = LOCAL, batch_rows: int = 256) -> list[dict]:
    tables = list(read_shard(shard, spec, storage, batch_rows=batch_rows))
    expected = read_schema(spec.passthrough_columns)
    for table in tables:
        assert table.schema == expected
        assert 1 <= table.num_rows <= batch_rows
    rows = [row for table in tables for row in table.to_pylist()]
    ids = [r["id"] for r in rows]
    assert len(set(ids)) == len(ids), ids
    return rows


def spec_for(path: Path | str, **kwargs) -> InputSpec:
    return InputSpec(urls=(str(path),), **kwargs)


def kinds(rows: list[dict]) -> list[tuple[str, str | None]]:
    return [(r["key"], r["error_kind"]) for r in rows]


# --------------------------------------------------------------------------- webdataset


def test_split_key_follows_webdataset():
    assert split_key("a/b/x.0001.jpg") == ("a/b/x", "0001.jpg")
    assert split_key("./x.JPG") == ("x", "JPG")
    assert split_key("x.seg.png") == ("x", "seg.png")
    assert split_key("dir/.hidden.jpg") is None
    assert split_key("README") is None


def test_tar_samples_keys_passthrough_and_upper_case(tmp_path: Path, jpegs):
    members = [
        ("a/b/x.0001.jpg", jpegs["astronaut"]),
        ("a/b/x.0001.txt", b"an astronaut"),
        ("a/b/x.json", b'{"w": 48}'),  # key "a/b/x" too: same sample
        ("IMG_7.JPG", jpegs["coffee"]),
        ("IMG_7.TXT", "café".encode()),
        ("c.png", noise_png(1)),
        ("c.cls", b"3"),
        ("c.pth", b"\x80\x04K\x03."),  # a pickle: never loaded
    ]
    path = write_file(tmp_path / "shard-0.tar", tar_bytes(members))
    spec = spec_for(path, passthrough_columns=("txt", "json", "cls"))
    rows = read_rows(shard_for(path, name="shard-0.tar"), spec)
    assert [r["key"] for r in rows] == ["a/b/x", "IMG_7", "c"]
    x, img7, c = rows
    assert x["id"] == f"{path}::a/b/x"
    assert x["source"] == str(path) and x["shard"] == "shard-0.tar"
    assert x["status"] == "ok" and x["error_kind"] is None and x["error"] is None
    assert x["image"] == jpegs["astronaut"]
    assert x["txt"] is None  # its extension is "0001.txt", not "txt"
    assert x["json"] == '{"w": 48}'
    assert img7["image"] == jpegs["coffee"] and img7["txt"] == "café"
    assert c["image"] == noise_png(1) and c["cls"] == "3" and c["txt"] is None
    assert all(r["row_questions"] is None for r in rows)


@pytest.mark.parametrize("suffix,compress", [(".tar.gz", "gz"), (".TGZ", "gz"), (".tar", "")])
def test_compressed_tars(tmp_path: Path, jpegs, suffix: str, compress: str):
    members = [(f"{i:04d}.jpg", jpegs[n]) for i, n in enumerate(["rocket", "chelsea"])]
    path = write_file(tmp_path / f"s{suffix}", tar_bytes(members, compress))
    rows = read_rows(shard_for(path), spec_for(path))
    assert [(r["key"], r["image"]) for r in rows] == [("0000", jpegs["rocket"]), ("0001", jpegs["chelsea"])]


def test_batches_are_bounded_and_ordered(tmp_path: Path):
    members = [(f"{i:03d}.png", noise_png(i)) for i in range(5)]
    path = write_file(tmp_path / "s.tar", tar_bytes(members))
    tables = list(read_shard(shard_for(path), spec_for(path), LOCAL, batch_rows=2))
    assert [t.num_rows for t in tables] == [2, 2, 1]
    assert [k for t in tables for k in t.column("key").to_pylist()] == ["000", "001", "002", "003", "004"]


def test_first_image_member_wins_and_directories_are_skipped(tmp_path: Path, jpegs):
    members = [("d", "dir"), ("d/x.jpg", jpegs["rocket"]), ("d/x.png", noise_png(2)), ("d/x.webp", b"never")]
    path = write_file(tmp_path / "s.tar", tar_bytes(members))
    rows = read_rows(shard_for(path), spec_for(path))
    assert [(r["key"], r["image"]) for r in rows] == [("d/x", jpegs["rocket"])]


def test_questions_member(tmp_path: Path, jpegs):
    members = [
        ("a.jpg", jpegs["rocket"]),
        ("a.questions.json", json.dumps(["what is it?", "  ", "what colour?"]).encode()),
        ("b.jpg", jpegs["coffee"]),
        ("b.questions.txt", b"how many cups?\nis it hot?\n"),
        ("c.jpg", jpegs["chelsea"]),
        ("c.questions.json", b"[1, 2]"),
        ("d.jpg", jpegs["astronaut"]),
    ]
    path = write_file(tmp_path / "s.tar", tar_bytes(members))
    rows = read_rows(shard_for(path), spec_for(path, questions_column="questions"))
    assert [r["row_questions"] for r in rows] == [
        ["what is it?", "what colour?"],
        ["how many cups?", "is it hot?"],
        None,
        None,
    ]
    assert kinds(rows) == [("a", None), ("b", None), ("c", "bad_questions"), ("d", None)]
    assert rows[2]["image"] is None


def test_parse_questions():
    assert parse_questions('["a?", "b?"]') == ["a?", "b?"]
    assert parse_questions('"only one?"') == ["only one?"]
    assert parse_questions("x?\n\ny?") == ["x?", "y?"]
    assert parse_questions(["p?", " "]) == ["p?"]
    assert parse_questions("") is None and parse_questions(None) is None
    with pytest.raises(ValueError):
        parse_questions("[not json")
    with pytest.raises(ValueError):
        parse_questions('{"q": 1}')


# --------------------------------------------------------------------------- hostile tars


def test_links_devices_and_unsafe_names(tmp_path: Path, jpegs):
    members = [
        ("ok1.jpg", jpegs["rocket"]),
        ("sym.jpg", "sym", "/etc/passwd"),
        ("hard.jpg", "lnk", "ok1.jpg"),
        ("fifo.png", "fifo"),
        ("linked_txt.jpg", jpegs["coffee"]),
        ("linked_txt.txt", "sym", "/etc/shadow"),
        ("../evil.jpg", jpegs["chelsea"]),
        ("/abs/path.jpg", jpegs["chelsea"]),
        ("inner/../../up.jpg", jpegs["chelsea"]),
        ("ok2.jpg", jpegs["astronaut"]),
    ]
    path = write_file(tmp_path / "s.tar", tar_bytes(members))
    rows = read_rows(shard_for(path), spec_for(path, passthrough_columns=("txt",)))
    assert kinds(rows) == [
        ("ok1", None),
        ("sym", "unsafe_member"),
        ("hard", "unsafe_member"),
        ("fifo", "unsafe_member"),
        ("linked_txt", None),
        ("../evil", "unsafe_member"),
        ("/abs/path", "unsafe_member"),
        ("inner/../../up", "unsafe_member"),
        ("ok2", None),
    ]
    by_key = {r["key"]: r for r in rows}
    assert "symlink" in by_key["sym"]["error"] and "hard link" in by_key["hard"]["error"]
    assert "'..'" in by_key["../evil"]["error"] and "absolute" in by_key["/abs/path"]["error"]
    assert by_key["linked_txt"]["txt"] is None and by_key["linked_txt"]["image"] == jpegs["coffee"]
    for r in rows:
        if r["status"] == "error":
            assert r["image"] is None
    assert by_key["ok2"]["image"] == jpegs["astronaut"]


def test_oversized_member_is_not_read(tmp_path: Path, jpegs):
    small = noise_png(3)
    big = jpegs["astronaut"]
    assert len(small) < 300 < len(big)
    members = [("a.png", small), ("b.jpg", big), ("c.png", small), ("c.txt", b"x" * 400), ("d.png", small)]
    path = write_file(tmp_path / "s.tar", tar_bytes(members))
    rows = read_rows(shard_for(path), spec_for(path, max_member_bytes=300, passthrough_columns=("txt",)))
    assert kinds(rows) == [("a", None), ("b", "member_too_large"), ("c", "member_too_large"), ("d", None)]
    assert str(len(big)) in rows[1]["error"]
    assert rows[1]["image"] is None and rows[3]["image"] == small


def test_duplicate_keys_get_error_rows_with_distinct_ids(tmp_path: Path):
    members = [("a.png", noise_png(1)), ("b.png", noise_png(2)), ("a.png", noise_png(3)), ("a.txt", b"x"),
               ("c.png", noise_png(4))]  # fmt: skip
    members += [("a.png", noise_png(5)), ("a.png", noise_png(6))]  # consecutive: one sample, first image wins
    path = write_file(tmp_path / "s.tar", tar_bytes(members))
    rows = read_rows(shard_for(path), spec_for(path))  # read_rows asserts the ids are unique
    assert kinds(rows) == [
        ("a", None),
        ("b", None),
        ("a#dup2", "duplicate_key"),
        ("c", None),
        ("a#dup3", "duplicate_key"),
    ]
    assert rows[0]["image"] == noise_png(1)
    assert rows[2]["image"] is None and "'a'" in rows[2]["error"]


def test_samples_without_an_image_are_ignored(tmp_path: Path):
    members = [
        ("model.pth", b"\x80\x04\x95 pickle bytes"),
        ("model.pyd", b"MZ\x90\x00"),
        ("label.cls", b"1"),
        ("label.txt", b"text only"),
        ("img.png", noise_png(5)),
    ]
    path = write_file(tmp_path / "s.tar", tar_bytes(members))
    rows = read_rows(shard_for(path), spec_for(path, passthrough_columns=("txt",)))
    assert kinds(rows) == [("img", None)]
    only_pickle = write_file(tmp_path / "p.tar", tar_bytes(members[:2]))
    assert list(read_shard(shard_for(only_pickle), spec_for(only_pickle), LOCAL)) == []


def test_zero_byte_shard(tmp_path: Path):
    path = write_file(tmp_path / "empty.tar", b"")
    rows = read_rows(shard_for(path, name="empty.tar"), spec_for(path))
    assert len(rows) == 1
    (row,) = rows
    assert row["id"] == f"{path}::" and row["key"] == "" and row["shard"] == "empty.tar"
    assert row["status"] == "error" and row["error_kind"] == "empty_shard" and row["image"] is None


@pytest.mark.parametrize("payload", [b"this is not a tar file at all" * 40, gzip.compress(b"not a tar" * 200)])
def test_not_a_tar(tmp_path: Path, payload: bytes):
    path = write_file(tmp_path / "bogus.tar", payload)
    rows = read_rows(shard_for(path), spec_for(path))
    assert kinds(rows) == [("", "shard_unreadable")]
    assert rows[0]["error"].startswith("ReadError")


def test_missing_shard_file(tmp_path: Path):
    path = tmp_path / "gone.tar"
    rows = read_rows(shard_for(path), spec_for(tmp_path))
    assert kinds(rows) == [("", "shard_read_error")]  # gone since it was listed: a rerun may find it
    assert "FileNotFoundError" in rows[0]["error"]


def test_truncated_tar_keeps_complete_samples(tmp_path: Path):
    members = []
    for i in range(4):
        members += [(f"{i}.png", noise_png(i) + b"\0" * 2000), (f"{i}.txt", f"caption {i}".encode())]
    data = tar_bytes(members)
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        cut = tf.getmember("2.png").offset_data + 100  # inside sample 2's image
    path = write_file(tmp_path / "cut.tar", data[:cut])
    rows = read_rows(shard_for(path), spec_for(path, passthrough_columns=("txt",)))
    assert kinds(rows) == [("0", None), ("1", None), ("", "shard_unreadable")]
    assert [r["txt"] for r in rows[:2]] == ["caption 0", "caption 1"]
    assert rows[1]["image"] == noise_png(1) + b"\0" * 2000
    assert "ReadError" in rows[2]["error"] and "unexpected end of data" in rows[2]["error"]


def test_truncated_gzip_tar(tmp_path: Path):
    members = [(f"{i:02d}.png", np.random.default_rng(i).bytes(3000)) for i in range(10)]
    data = tar_bytes(members, "gz")
    path = write_file(tmp_path / "cut.tar.gz", data[: len(data) // 2])
    rows = read_rows(shard_for(path), spec_for(path))
    assert rows[-1]["error_kind"] == "shard_unreadable"
    good = rows[:-1]
    assert 1 <= len(good) < 10
    assert [r["key"] for r in good] == [f"{i:02d}" for i in range(len(good))]
    assert all(r["image"] == members[i][1] for i, r in enumerate(good))


def test_command_scheme_shard_is_refused(tmp_path: Path):
    shard = ShardRef(uri="pipe:curl -s http://x/a.tar", format="webdataset", name="a", root="")
    with pytest.raises(ValueError, match="command-running"):
        list(read_shard(shard, spec_for(tmp_path), LOCAL))


# --------------------------------------------------------------------------- parquet


def test_parquet_auto_column_row_index_keys_and_passthrough(tmp_path: Path, jpegs):
    images = [jpegs["rocket"], None, jpegs["coffee"], b"", jpegs["chelsea"]]
    table = pa.table(
        {
            "caption": ["r", "n", "c", "e", "k"],
            "width": [1, 2, 3, 4, 5],
            "meta": [{"a": 1}, None, {"a": 3}, None, {"a": 5}],
            "jpg": pa.array(images, pa.binary()),
        }
    )
    path = tmp_path / "t.parquet"
    pq.write_table(table, path, row_group_size=2)
    spec = spec_for(path, passthrough_columns=("caption", "width", "meta", "absent"))
    shard = shard_for(path, "parquet", "t.parquet")
    rows = read_rows(shard, spec, batch_rows=2)
    assert kinds(rows) == [
        ("000000000", None),
        ("000000001", "missing_image"),
        ("000000002", None),
        ("000000003", "empty_file"),
        ("000000004", None),
    ]
    assert rows[0]["id"] == f"{path}::000000000" and rows[0]["shard"] == "t.parquet"
    assert [r["image"] for r in rows] == [jpegs["rocket"], None, jpegs["coffee"], None, jpegs["chelsea"]]
    assert [r["input_caption"] for r in rows] == ["r", "n", "c", "e", "k"]
    assert [r["input_width"] for r in rows] == ["1", "2", "3", "4", "5"]
    assert rows[0]["meta"] == '{"a": 1}' and rows[1]["meta"] is None
    assert all(r["absent"] is None for r in rows)
    tables = list(read_shard(shard, spec, LOCAL, batch_rows=2))
    assert [t.num_rows for t in tables] == [2, 2, 1]


def _img2dataset_parquet(path: Path, jpegs) -> Path:
    """A shard in img2dataset's Parquet layout: key, url, caption, jpg, status, error_message, width, height, ..."""
    table = pa.table(
        {
            "key": ["000010000", "000010001", "000010002"],
            "url": ["https://x/r.jpg", "https://x/gone.jpg", "https://x/c.jpg"],
            "caption": ["a rocket", "a missing photo", "a cup of coffee"],
            "jpg": pa.array([jpegs["rocket"], None, jpegs["coffee"]], pa.binary()),
            "status": ["success", "failed_to_download", "success"],
            "error_message": [None, "HTTP 404", None],
            "width": [512, None, 400],
            "height": [512, None, 400],
            "original_width": [1024, None, 800],
            "original_height": [1024, None, 800],
            "exif": ["{}", None, "{}"],
            "sha256": ["aa", None, "cc"],
        }
    )
    pq.write_table(table, path)
    return path


def test_img2dataset_parquet_keys_come_from_its_key_column(tmp_path: Path, jpegs):
    path = _img2dataset_parquet(tmp_path / "00001.parquet", jpegs)
    rows = read_rows(shard_for(path, "parquet"), spec_for(path, passthrough_columns=("url", "caption")))
    assert kinds(rows) == [("000010000", None), ("000010001", "missing_image"), ("000010002", None)]
    assert [r["id"] for r in rows] == [f"{path}::000010000", f"{path}::000010001", f"{path}::000010002"]
    assert [r["url"] for r in rows] == ["https://x/r.jpg", "https://x/gone.jpg", "https://x/c.jpg"]
    assert [r["input_caption"] for r in rows] == ["a rocket", "a missing photo", "a cup of coffee"]


def test_explicit_key_column_wins_over_the_auto_detected_key(tmp_path: Path, jpegs):
    path = _img2dataset_parquet(tmp_path / "00001.parquet", jpegs)
    rows = read_rows(shard_for(path, "parquet"), spec_for(path, key_column="url"))
    assert [r["key"] for r in rows] == ["https://x/r.jpg", "https://x/gone.jpg", "https://x/c.jpg"]
    # A "key" column that holds neither text nor integers is not a key: row index, as before.
    pq.write_table(pa.table({"key": [[1], [2]], "jpg": pa.array([jpegs["rocket"]] * 2, pa.binary())}), path)
    rows = read_rows(shard_for(path, "parquet"), spec_for(path))
    assert [r["key"] for r in rows] == ["000000000", "000000001"]


def test_parquet_hf_image_struct_key_column_and_questions(tmp_path: Path, jpegs):
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {
            "id_str": ["cat", "rocket", "cat", None, "remote"],
            "image": pa.array(
                [
                    {"bytes": jpegs["chelsea"], "path": "cat.jpg"},
                    {"bytes": jpegs["rocket"], "path": None},
                    {"bytes": jpegs["coffee"], "path": None},
                    {"bytes": jpegs["astronaut"], "path": None},
                    {"bytes": None, "path": "https://example.com/x.jpg"},
                ],
                image_type,
            ),
            "qs": pa.array([["what animal?"], None, None, None, ["q?"]], pa.list_(pa.string())),
        }
    )
    path = tmp_path / "hf.parquet"
    pq.write_table(table, path)
    spec = spec_for(path, key_column="id_str", questions_column="qs")
    rows = read_rows(shard_for(path, "parquet"), spec)
    assert kinds(rows) == [
        ("cat", None),
        ("rocket", None),
        ("cat#dup2", "duplicate_key"),
        ("000000003", "missing_key"),
        ("remote", "missing_image"),
    ]
    assert rows[0]["image"] == jpegs["chelsea"] and rows[0]["row_questions"] == ["what animal?"]
    assert rows[1]["image"] == jpegs["rocket"] and rows[1]["row_questions"] is None
    assert "not fetched" in rows[4]["error"]


def test_parquet_explicit_image_column_and_string_questions(tmp_path: Path):
    table = pa.table({"pixels": [noise_png(1), noise_png(2)], "q": ['["a?"]', "b?\nc?"], "jpg": ["not", "bytes"]})
    path = tmp_path / "x.parquet"
    pq.write_table(table, path)
    rows = read_rows(shard_for(path, "parquet"), spec_for(path, image_column="pixels", questions_column="q"))
    assert [(r["image"], r["row_questions"]) for r in rows] == [(noise_png(1), ["a?"]), (noise_png(2), ["b?", "c?"])]


def test_parquet_without_image_column(tmp_path: Path):
    path = tmp_path / "noimg.parquet"
    pq.write_table(pa.table({"url": ["http://x"], "jpg": ["a string"]}), path)
    rows = read_rows(shard_for(path, "parquet"), spec_for(path))
    assert kinds(rows) == [("", "missing_image_column")]
    assert "url: string" in rows[0]["error"] and "jpg: string" in rows[0]["error"]
    rows = read_rows(shard_for(path, "parquet"), spec_for(path, image_column="img"))
    assert kinds(rows) == [("", "missing_image_column")] and "'img' not found" in rows[0]["error"]
    pq.write_table(pa.table({"jpg": [noise_png(1)]}), path)
    rows = read_rows(shard_for(path, "parquet"), spec_for(path, key_column="name"))
    assert kinds(rows) == [("", "missing_key_column")]


def test_unreadable_parquet(tmp_path: Path):
    garbage = write_file(tmp_path / "bad.parquet", b"PAR1" + b"\x07" * 500)
    rows = read_rows(shard_for(garbage, "parquet"), spec_for(garbage))
    assert kinds(rows) == [("", "shard_unreadable")]
    assert rows[0]["id"] == f"{garbage}::"
    assert rows[0]["error"].startswith("ArrowInvalid")
    empty = write_file(tmp_path / "empty.parquet", b"")
    assert kinds(read_rows(shard_for(empty, "parquet"), spec_for(empty))) == [("", "empty_shard")]


def test_parquet_failing_mid_file_keeps_earlier_rows(tmp_path: Path):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"jpg": [noise_png(i) for i in range(6)]}), path, row_group_size=2)
    meta = pq.ParquetFile(path).metadata
    rg = meta.row_group(2).column(0)
    start = rg.dictionary_page_offset or rg.data_page_offset
    data = bytearray(path.read_bytes())
    data[start : start + rg.total_compressed_size] = b"\xff" * rg.total_compressed_size  # corrupt the last group
    path.write_bytes(bytes(data))
    rows = read_rows(shard_for(path, "parquet"), spec_for(path), batch_rows=2)
    assert kinds(rows)[:4] == [(f"{i:09d}", None) for i in range(4)]
    assert kinds(rows)[4:] == [("", "shard_unreadable")]


# --------------------------------------------------------------------------- image folders


def test_image_folder_rows(tmp_path: Path, jpegs):
    root = tmp_path / "photos"
    write_file(root / "b.jpg", jpegs["rocket"])
    write_file(root / "A.PNG", noise_png(1))
    write_file(root / "big.jpg", b"\xff" * 100_000)
    write_file(root / "zero.webp", b"")
    write_file(root / "gone.jpg", b"deleted after listing")
    write_file(root / "sub" / "c.jpeg", jpegs["coffee"])
    shards, _ = list_shards(spec_for(root), LOCAL)
    (root / "gone.jpg").unlink()
    spec = spec_for(root, max_member_bytes=99_999, passthrough_columns=("txt",))
    top, sub = shards
    rows = read_rows(top, spec)
    assert kinds(rows) == [
        ("A.PNG", None),
        ("b.jpg", None),
        ("big.jpg", "member_too_large"),
        ("gone.jpg", "read_error"),
        ("zero.webp", "empty_file"),
    ]
    assert rows[0]["id"] == f"{root}/A.PNG::A.PNG" and rows[0]["source"] == f"{root}/A.PNG"
    assert rows[0]["shard"] == "root" and rows[0]["image"] == noise_png(1)
    assert rows[1]["image"] == jpegs["rocket"] and rows[1]["txt"] is None
    assert "FileNotFoundError" in rows[3]["error"]
    sub_rows = read_rows(sub, spec)
    assert [(r["key"], r["shard"], r["image"]) for r in sub_rows] == [("sub/c.jpeg", "sub", jpegs["coffee"])]


# --------------------------------------------------------------------------- S3


def test_s3_round_trip(s3_endpoint: str, s3_bucket: str, s3_storage: StorageOptions, jpegs):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")

    def put(key: str, body: bytes) -> None:
        s3.put_object(Bucket=s3_bucket, Key=key, Body=body)

    put("in/wds/000.tar", tar_bytes([("x/a.jpg", jpegs["rocket"]), ("x/a.txt", b"rocket"), ("b.png", noise_png(7))]))
    put("in/wds/001.tar.gz", tar_bytes([("c.jpg", jpegs["coffee"])], "gz"))
    put("in/wds/002.tar", b"")
    put("in/pq/part.parquet", parquet_bytes(pa.table({"png": [noise_png(8)], "key": ["k8"], "txt": ["eight"]})))
    put("in/imgs/cat.jpg", jpegs["chelsea"])
    put("in/imgs/empty.jpg", b"")
    put("in/imgs/large.jpg", b"y" * 5000)

    spec = InputSpec(
        urls=(f"s3://{s3_bucket}/in",), key_column="key", passthrough_columns=("txt",), max_member_bytes=4000
    )
    shards, stats = list_shards(spec, s3_storage)
    assert stats.shards == 5
    rows = [row for shard in shards for row in read_rows(shard, spec, s3_storage)]
    base = f"s3://{s3_bucket}/in"
    got = [(r["id"], r["shard"], r["status"], r["error_kind"], r["txt"]) for r in rows]
    assert got == [
        # Image keys are relative to the input root, so they stay unique across folders.
        (f"{base}/imgs/cat.jpg::imgs/cat.jpg", "imgs", "ok", None, None),
        (f"{base}/imgs/empty.jpg::imgs/empty.jpg", "imgs", "error", "empty_file", None),
        (f"{base}/imgs/large.jpg::imgs/large.jpg", "imgs", "error", "member_too_large", None),
        (f"{base}/pq/part.parquet::k8", "pq_part.parquet", "ok", None, "eight"),
        (f"{base}/wds/000.tar::x/a", "wds_000.tar", "ok", None, "rocket"),
        (f"{base}/wds/000.tar::b", "wds_000.tar", "ok", None, None),
        (f"{base}/wds/001.tar.gz::c", "wds_001.tar.gz", "ok", None, None),
        (f"{base}/wds/002.tar::", "wds_002.tar", "error", "empty_shard", None),
    ]
    images = {r["id"].split("::")[1]: r["image"] for r in rows if r["status"] == "ok"}
    assert images == {
        "imgs/cat.jpg": jpegs["chelsea"],
        "k8": noise_png(8),
        "x/a": jpegs["rocket"],
        "b": noise_png(7),
        "c": jpegs["coffee"],
    }
    missing = ShardRef(uri=f"{base}/wds/404.tar", format="webdataset", name="404.tar", root=base)
    assert kinds(read_rows(missing, spec, s3_storage)) == [("", "shard_read_error")]  # gone since listed


def test_non_utf8_and_dot_slash_member_names(tmp_path: Path):
    members = [("./x.png", noise_png(1)), ("caf\udce9.png", noise_png(2))]  # a Latin-1 byte in the name
    path = write_file(tmp_path / "s.tar", tar_bytes(members))
    rows = read_rows(shard_for(path), spec_for(path))
    assert [(r["key"], r["image"]) for r in rows] == [("x", noise_png(1)), ("caf\ufffd", noise_png(2))]


def test_parquet_empty_key_is_missing_key(tmp_path: Path):
    path = tmp_path / "k.parquet"
    pq.write_table(pa.table({"jpg": [noise_png(1), noise_png(2)], "k": ["", "b"]}), path)
    rows = read_rows(shard_for(path, "parquet"), spec_for(path, key_column="k"))
    assert kinds(rows) == [("000000000", "missing_key"), ("b", None)]
    assert "empty" in rows[0]["error"]
