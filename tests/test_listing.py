"""list_shards against real local folders and a real S3 endpoint (moto server)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers import write_file

from workers.config import InputSpec, StorageOptions
from workers.listing import ListingStats, ShardRef, format_of, list_shards

LOCAL = StorageOptions()
NAME_RE = re.compile(r"^[A-Za-z0-9._-]+$")


def names(shards: list[ShardRef]) -> list[str]:
    return [s.name for s in shards]


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    write_file(root / "0001.tar")
    write_file(root / "train" / "0002.TAR")
    write_file(root / "train" / "0003.tar.gz")
    write_file(root / "train" / "0004.Tgz")
    write_file(root / "tables" / "part-0.parquet")
    write_file(root / "cats" / "b.JPG")
    write_file(root / "cats" / "a.jpeg")
    write_file(root / "cats" / "tabby" / "c.png")
    write_file(root / "top.webp")
    write_file(root / "README.md")
    write_file(root / "train" / "0001.idx")
    write_file(root / "tables" / "_SUCCESS")
    write_file(root / ".hidden.tar")
    write_file(root / ".cache" / "x.jpg")
    return root


def test_format_of_is_case_insensitive_and_honours_explicit_format():
    assert format_of("/x/a.TAR") == "webdataset"
    assert format_of("s3://b/a.Tar.Gz") == "webdataset"
    assert format_of("a.tgz") == "webdataset"
    assert format_of("a.PARQUET") == "parquet"
    assert format_of("a.WebP") == "images"
    assert format_of("a.tar.bz2") is None
    assert format_of("a.tar", "parquet") is None
    assert format_of("a.jpg", "images") == "images"


def test_folder_recursion_classification_and_counts(tree: Path):
    shards, stats = list_shards(InputSpec(urls=(str(tree),)), LOCAL)
    by_name = {s.name: s for s in shards}
    assert sorted(by_name) == sorted(
        [
            "0001.tar",
            "train_0002.TAR",
            "train_0003.tar.gz",
            "train_0004.Tgz",
            "tables_part-0.parquet",
            "cats",
            "cats_tabby",
            "root",
        ]
    )
    tar = tree / "train" / "0002.TAR"
    assert by_name["train_0002.TAR"] == ShardRef(
        uri=str(tar), format="webdataset", name="train_0002.TAR", root=str(tree),
        fingerprint=f"{tar.stat().st_size}:{tar.stat().st_mtime}",  # size and mtime, from the listing
    )  # fmt: skip
    assert by_name["tables_part-0.parquet"].format == "parquet"
    cats = by_name["cats"]
    assert cats.format == "images"
    assert cats.uri == str(tree / "cats")
    assert cats.files == (str(tree / "cats" / "a.jpeg"), str(tree / "cats" / "b.JPG"))
    assert by_name["cats_tabby"].files == (str(tree / "cats" / "tabby" / "c.png"),)
    assert by_name["root"].files == (str(tree / "top.webp"),)
    assert by_name["root"].uri == str(tree)
    # Sorted by URI, so the order is the same on every run.
    assert [s.uri for s in shards] == sorted(s.uri for s in shards)
    assert stats == ListingStats(
        shards=8,
        webdataset_shards=4,
        parquet_shards=1,
        image_shards=3,
        image_files=4,
        ignored_files=2,  # README.md, 0001.idx
        hidden_files=3,  # .hidden.tar, .cache/x.jpg, _SUCCESS
        duplicate_files=0,
        ignored_examples=stats.ignored_examples,
    )
    assert sorted(stats.ignored_examples) == sorted([str(tree / "README.md"), str(tree / "train" / "0001.idx")])
    again, _ = list_shards(InputSpec(urls=(str(tree),)), LOCAL)
    assert again == shards


def test_explicit_format_restricts_to_its_extensions(tree: Path):
    shards, stats = list_shards(InputSpec(urls=(str(tree),), format="parquet"), LOCAL)
    assert names(shards) == ["tables_part-0.parquet"]
    assert stats.ignored_files == 2 + 4 + 4  # other files, tars, images
    with pytest.raises(FileNotFoundError, match="train"):
        list_shards(InputSpec(urls=(str(tree / "train"),), format="images"), LOCAL)


def test_glob_list_inputs_and_duplicates(tree: Path):
    spec = InputSpec(urls=(str(tree / "train" / "*.tar*"), str(tree / "**" / "*.jpeg"), str(tree / "0001.tar")))
    shards, stats = list_shards(spec, LOCAL)
    # Glob roots are the directory before the first wildcard.
    assert names(shards) == ["0001.tar", "cats", "0003.tar.gz"]
    assert shards[0].root == str(tree)
    assert shards[1].files == (str(tree / "cats" / "a.jpeg"),)
    assert shards[2].uri == str(tree / "train" / "0003.tar.gz")
    # 0002.TAR matches "*.tar*" only case-insensitively: globs are case-sensitive like the shell.
    assert stats.shards == 3
    shards, stats = list_shards(InputSpec(urls=(str(tree / "train"), str(tree / "train" / "*.TAR"))), LOCAL)
    assert stats.duplicate_files == 1
    assert names(shards) == ["0002.TAR", "0003.tar.gz", "0004.Tgz"]  # relative to the root "train"


def test_glob_matching_a_directory_expands_it(tree: Path):
    shards, _ = list_shards(InputSpec(urls=(str(tree / "ca*"),)), LOCAL)
    assert names(shards) == ["cats", "cats_tabby"]
    shards, _ = list_shards(InputSpec(urls=(str(tree / "**"),)), LOCAL)
    assert len(shards) == 8


def test_single_file_and_file_url_give_the_same_uris(tree: Path):
    plain, _ = list_shards(InputSpec(urls=(str(tree / "train" / "0002.TAR"),)), LOCAL)
    url, _ = list_shards(InputSpec(urls=(f"file://{tree}/train/0002.TAR",)), LOCAL)
    assert (
        plain
        == url
        == [
            ShardRef(
                uri=str(tree / "train" / "0002.TAR"), format="webdataset", name="0002.TAR", root=str(tree / "train"),
                fingerprint=plain[0].fingerprint,
            )
        ]  # fmt: skip
    )


def test_relative_paths_become_absolute(tree: Path, monkeypatch):
    monkeypatch.chdir(tree.parent)
    shards, _ = list_shards(InputSpec(urls=("data/train/0003.tar.gz",)), LOCAL)
    assert shards[0].uri == str(tree / "train" / "0003.tar.gz")


@pytest.mark.parametrize("suffix", ["missing", "nothing-*.tar"])
def test_url_matching_nothing_raises_naming_it(tmp_path: Path, suffix: str):
    write_file(tmp_path / "ok.tar")
    url = str(tmp_path / suffix)
    with pytest.raises(FileNotFoundError, match=re.escape(url)):
        list_shards(InputSpec(urls=(str(tmp_path / "ok.tar"), url)), LOCAL)


def test_empty_directory_and_only_ignored_files_raise(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        list_shards(InputSpec(urls=(str(tmp_path / "empty"),)), LOCAL)
    write_file(tmp_path / "docs" / "notes.txt")
    write_file(tmp_path / "docs" / ".DS_Store")
    with pytest.raises(FileNotFoundError, match=r"docs.*1 other file.*1 hidden"):
        list_shards(InputSpec(urls=(str(tmp_path / "docs"),)), LOCAL)


def test_big_image_folders_are_split_into_chunks(tmp_path: Path):
    for i in range(5):
        write_file(tmp_path / "imgs" / f"{i:03d}.jpg")
    shards, stats = list_shards(InputSpec(urls=(str(tmp_path / "imgs"),)), LOCAL, images_per_shard=2)
    assert names(shards) == ["root-00000", "root-00001", "root-00002"]
    assert [len(s.files) for s in shards] == [2, 2, 1]
    assert [f for s in shards for f in s.files] == [str(tmp_path / "imgs" / f"{i:03d}.jpg") for i in range(5)]
    assert stats.image_shards == 3 and stats.image_files == 5


def test_names_are_sanitised_and_unique(tmp_path: Path):
    write_file(tmp_path / "a" / "0001.tar")
    write_file(tmp_path / "b" / "0001.tar")
    write_file(tmp_path / "a" / "my photos" / "é=1" / "x.png")
    write_file(tmp_path / "a" / "my_photos" / "__1" / "y.png")
    spec = InputSpec(urls=(str(tmp_path / "a"), str(tmp_path / "b")))
    shards, _ = list_shards(spec, LOCAL)
    got = names(shards)
    assert all(NAME_RE.match(n) for n in got), got
    assert len(set(got)) == len(got) == 4
    tars = [s for s in shards if s.format == "webdataset"]
    assert all(re.fullmatch(r"0001\.tar-[0-9a-f]{10}", s.name) for s in tars), names(tars)
    photos = [s for s in shards if s.format == "images"]
    assert all(re.fullmatch(r"my_photos___1-[0-9a-f]{10}", s.name) for s in photos), names(photos)
    assert list_shards(spec, LOCAL)[0] == shards


def test_command_running_schemes_are_refused(tmp_path: Path):
    spec = InputSpec(urls=(str(tmp_path),))
    object.__setattr__(spec, "urls", ("pipe:curl http://x/0001.tar",))  # bypass config validation
    with pytest.raises(ValueError, match="command-running"):
        list_shards(spec, LOCAL)


def test_s3_listing(s3_endpoint: str, s3_bucket: str, s3_storage: StorageOptions):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    for key in ["ds/0001.tar", "ds/sub/0002.tar.gz", "ds/t/x.parquet", "ds/img/a.jpg", "ds/img/b.PNG", "ds/notes.txt"]:
        s3.put_object(Bucket=s3_bucket, Key=key, Body=b"x")
    shards, stats = list_shards(InputSpec(urls=(f"s3://{s3_bucket}/ds/",)), s3_storage)
    root = f"s3://{s3_bucket}/ds"
    assert [(s.uri, s.format, s.name) for s in shards] == [
        (f"{root}/0001.tar", "webdataset", "0001.tar"),
        (f"{root}/img", "images", "img"),
        (f"{root}/sub/0002.tar.gz", "webdataset", "sub_0002.tar.gz"),
        (f"{root}/t/x.parquet", "parquet", "t_x.parquet"),
    ]
    assert shards[1].files == (f"{root}/img/a.jpg", f"{root}/img/b.PNG")
    assert all(s.root == root for s in shards)
    assert stats.ignored_files == 1
    globbed, _ = list_shards(InputSpec(urls=(f"s3://{s3_bucket}/ds/**/*.tar*",)), s3_storage)
    assert names(globbed) == ["0001.tar", "sub_0002.tar.gz"]
    with pytest.raises(FileNotFoundError, match="nope"):
        list_shards(InputSpec(urls=(f"s3://{s3_bucket}/nope/",)), s3_storage)
