"""Search: index + query round trips through the CLI, on a hand-written caption dataset with
known answers and on a real job's output (local and S3), and every bad input's message."""

from __future__ import annotations

import json
import re
import sqlite3

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.search import embed_with_ray, main
from workers.search_index import IndexSpec, build_index

CAPTIONS = [
    # (id, source, key, frame_time, caption, answers)
    ("t::1", "/data/a.tar", "1", None, "a red car drives through a long tunnel", [("what color is the car?", "red")]),
    ("t::2", "/data/a.tar", "2", None, "a car parked near a red tunnel entrance in a long street", []),
    ("t::3", "/data/a.tar", "3", None, "a small dog asleep on a sofa", [("what animal is it?", "a dog")]),
    ("t::4", "/data/a.tar", "4", None, "a man riding a horse on the beach",
     [("what is in the distance?", "a striped lighthouse on the cliffs")]),
    ("t::5", "/data/a.tar", "5", None, "a plate of pasta with tomato sauce", [("is it hot?", "yes")]),
    ("t::6", "/data/a.tar", "6", None, "two children playing football in a park", []),
    ("v::7", "/data/v.mp4", "v.mp4", 12.0, "fireworks explode over a harbour at night", []),
    ("v::8", "/data/v.mp4", "v.mp4", 13.0, "boats in a harbour at dawn", []),
    ("t::9", "/data/a.tar", "9", None, None, None),  # an error row: no text, not indexed
]  # fmt: skip


def write_captions(folder, rows=CAPTIONS, name="part-0.parquet"):
    folder.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(
        [{"id": i, "source": s, "key": k, "frame_time": t, "caption": c,
          "answers": None if a is None else [{"question": q, "answer": x} for q, x in a],
          "status": "ok" if c else "error"} for i, s, k, t, c, a in rows]
    )  # fmt: skip
    pq.write_table(table, folder / name)
    return folder


def cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def query(capsys, url, text, *extra):
    code, out, err = cli(capsys, "query", url, text, "--json", *extra)
    assert code == 0, err
    return json.loads(out)


@pytest.fixture(scope="module")
def captions_index(tmp_path_factory, embedding_model):
    folder = write_captions(tmp_path_factory.mktemp("captions") / "ds")
    assert main(["index", str(folder), "--model", embedding_model]) == 0
    return folder


def test_known_answers_rank_first(captions_index, capsys):
    """Default (hybrid) mode: each kind of query finds its row first."""
    # An exact phrase, over a decoy holding the same words in another order.
    assert query(capsys, captions_index, "red car drives through a long tunnel")[0]["id"] == "t::1"
    # A phrase found only in an answer; the hit carries that answer.
    hit = query(capsys, captions_index, "striped lighthouse")[0]
    assert hit["id"] == "t::4"
    assert hit["answers"] == [{"question": "what is in the distance?", "answer": "a striped lighthouse on the cliffs"}]
    # A semantic query that shares no word with the caption it must find.
    assert query(capsys, captions_index, "puppy napping on a couch")[0]["id"] == "t::3"
    assert query(capsys, captions_index, "spaghetti dinner")[0]["id"] == "t::5"
    # A scene: the video and the second at which it appears.
    hit = query(capsys, captions_index, "fireworks")[0]
    assert (hit["source"], hit["key"], hit["frame_time"]) == ("/data/v.mp4", "v.mp4", 12.0)
    assert set(hit) == {"id", "source", "key", "frame_time", "caption", "answers", "score"}


def test_modes_filters_and_top_k(captions_index, capsys):
    text = query(capsys, captions_index, "tunnel", "--mode", "text")
    assert [h["id"] for h in text] == ["t::1", "t::2"] or [h["id"] for h in text] == ["t::2", "t::1"]
    semantic = query(capsys, captions_index, "a puppy", "--mode", "semantic", "--top-k", "3")
    assert len(semantic) == 3 and semantic[0]["id"] == "t::3"
    assert semantic[0]["score"] >= semantic[1]["score"] >= semantic[2]["score"]
    in_video = query(capsys, captions_index, "harbour", "--where", "frame_time > 12.5")
    assert [h["id"] for h in in_video] == ["v::8"]
    assert "t::9" not in {h["id"] for h in query(capsys, captions_index, "a", "--top-k", "100")}


@pytest.mark.parametrize("text", ['"red car', "car*", "car AND NEAR(tunnel", "red OR", "tunnel)", "^car", "col:car"])
def test_fts_syntax_in_a_query_is_plain_words(captions_index, capsys, text):
    hits = query(capsys, captions_index, text, "--mode", "text")
    assert hits and hits[0]["id"] in {"t::1", "t::2"}


@pytest.mark.parametrize(
    "args, message",
    [
        (["   "], "no words to search for"),
        (["*** !!!"], "no words to search for"),
        (["car", "--top-k", "1000000"], "top_k: must be between 1 and 1000"),
        (["car", "--top-k", "0"], "top_k: must be between 1 and 1000"),
        (["car", "--where", "caption LIKE"], "--where is not a valid SQL filter"),
        (["car", "--where", "1; DROP TABLE docs"], "--where is not a valid SQL filter"),
        (["car", "--where", "1); DROP TABLE docs; SELECT (1"], "--where is not a valid SQL filter"),  # a valid script
        (["car", "--where", "no_such_column = 1"], "no such column: no_such_column"),
        # Reads of anything but the rows' columns, functions that build or reach beyond values, recursion.
        (["car", "--where", "id IN (SELECT name FROM sqlite_master) OR caption = ''"], "it reads sqlite_master"),
        (["car", "--where", "EXISTS (SELECT 1 FROM sqlite_temp_master)"], "it reads sqlite_temp_master"),
        (["car", "--where", "(SELECT count(*) FROM meta) > 0"], "it reads meta"),
        (["car", "--where", "id IN (SELECT path FROM main.files)"], "it reads files"),
        (["car", "--where", "EXISTS (SELECT 1 FROM pragma_table_info('docs'))"], "it calls a table-valued function"),
        (["car", "--where", "EXISTS (SELECT 1 FROM json_each(answers))"], "it calls a table-valued function"),
        (["car", "--where", "length(randomblob(1000000000)) > 0"], "it calls randomblob()"),
        (["car", "--where", "load_extension('/tmp/x.so') IS NULL"], "it calls load_extension()"),
        (["car", "--where", "id IN (WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n) SELECT x FROM n)"],
         "it has a recursive WITH"),
        # Allowed, and would run for days: 8 rows joined 16 times.  Stopped at the limit, however fast the machine.
        (["car", "--where-seconds", "0.2", "--where",
          "(SELECT count(*) FROM " + ", ".join(f"docs d{i}" for i in range(16)) + ") > 0"],
         "--where ran for more than 0.2 s and was stopped"),
        (["car", "--where-seconds", "0", "--where", "1"], "where_seconds: must be in (0, 3600]"),
    ],
)  # fmt: skip
def test_bad_queries_get_a_message_not_a_traceback(captions_index, capsys, args, message):
    code, out, err = cli(capsys, "query", captions_index, *args)
    assert code == 2 and message in err and "Traceback" not in err, err
    assert out == ""
    # Nothing a refused query did changed the index: it still answers, rows and text alike.
    hits = query(capsys, captions_index, "red car drives", "--mode", "text", "--top-k", "1")
    assert [h["id"] for h in hits] == ["t::1"]
    assert len(query(capsys, captions_index, "a", "--mode", "text", "--top-k", "100", "--where", "1")) == 8


def test_filters_read_the_rows_columns_and_call_the_usual_functions(captions_index, capsys):
    for where, ids in [
        ("answers ->> '$[0].answer' = 'red'", ["t::1"]),
        ("json_array_length(answers) > 0 AND lower(caption) LIKE '%RED%'", ["t::1"]),
        ("frame_time > (SELECT avg(frame_time) FROM docs)", ["v::8"]),  # a subquery over the rows is fine
        ("(SELECT count(*) FROM docs) = 8 AND coalesce(frame_time, 0) = 12", ["v::7"]),
    ]:
        assert sorted(h["id"] for h in query(capsys, captions_index, "a", "--mode", "text", "--where", where)) == ids


def test_an_index_under_a_folder_named_with_uri_characters(tmp_path, capsys):
    """The read-only connection opens the index by a file: URI; "#", "?" and "%" in its path must
    not end the path or start a parameter there."""
    folder = write_captions(tmp_path / "a#b?c%d" / "ds")
    assert cli(capsys, "index", folder, "--no-embeddings")[0] == 0
    assert (folder / "_search" / "index.sqlite").exists()
    assert [h["id"] for h in query(capsys, folder, "fireworks", "--mode", "text")] == ["v::7"]
    hits = query(capsys, folder, "harbour", "--mode", "text", "--where", "frame_time > 12.5")
    assert [h["id"] for h in hits] == ["v::8"]


def test_missing_corrupt_and_stale_indexes(tmp_path, capsys, embedding_model):
    code, _, err = cli(capsys, "index", tmp_path / "nothing-here")
    assert code == 2 and "no Parquet files under" in err
    folder = write_captions(tmp_path / "ds")
    code, _, err = cli(capsys, "query", folder, "car")
    assert code == 2 and "no search index at" in err and "python -m jobs.search index" in err
    assert cli(capsys, "index", folder, "--no-embeddings")[0] == 0
    code, _, err = cli(capsys, "query", folder, "car")  # hybrid needs embeddings
    assert code == 2 and "have no embeddings" in err and "--mode text" in err
    write_captions(folder, [("n::1", "/x", "1", None, "a yellow submarine", [])], name="part-1.parquet")
    code, out, err = cli(capsys, "query", folder, "submarine", "--mode", "text", "--json")
    assert code == 0 and json.loads(out) == [] and "older than the output (1 file(s) added" in err
    code, _, err = cli(capsys, "index", folder, "--model", embedding_model)
    assert code == 2 and "embedding_model=None" in err and "--overwrite" in err
    (folder / "_search" / "index.sqlite").write_bytes(b"\x00garbage" * 100)
    code, _, err = cli(capsys, "query", folder, "car", "--mode", "text")
    assert code == 2 and "is corrupt" in err and "--overwrite" in err and "Traceback" not in err
    assert cli(capsys, "index", folder, "--no-embeddings", "--overwrite")[0] == 0
    assert [h["id"] for h in query(capsys, folder, "submarine", "--mode", "text")] == ["n::1"]


def test_updates_are_incremental_by_file(tmp_path, capsys, embedding_model):
    folder = write_captions(tmp_path / "ds", CAPTIONS[:4])
    code, out, _ = cli(capsys, "index", folder, "--model", embedding_model)
    assert code == 0 and "indexed 4 rows from 1 file(s)" in out
    write_captions(folder, CAPTIONS[4:], name="part-1.parquet")
    code, out, _ = cli(capsys, "index", folder, "--model", embedding_model)
    assert "indexed 4 rows from 1 file(s)" in out and "1 file(s) already indexed, 0 dropped" in out
    assert query(capsys, folder, "fireworks")[0]["id"] == "v::7"
    vectors = sorted((folder / "_search" / "vectors").iterdir())
    assert len(vectors) == 2
    (folder / "part-0.parquet").unlink()  # a resumed job compacts its files: old names go away
    code, out, _ = cli(capsys, "index", folder, "--model", embedding_model)
    assert "indexed 0 rows" in out and "1 dropped" in out
    assert len(list((folder / "_search" / "vectors").iterdir())) == 1
    assert "t::1" not in {h["id"] for h in query(capsys, folder, "red car tunnel", "--top-k", "20")}
    code, out, _ = cli(capsys, "index", folder, "--model", embedding_model, "--overwrite")
    assert "indexed 4 rows from 1 file(s)" in out and "0 file(s) already indexed" in out


def test_any_dataset_with_an_id_and_text_columns(tmp_path, capsys):
    folder = tmp_path / "laion"
    folder.mkdir()
    table = pa.table({"id": ["x", "y"], "title": ["sunset over mountains", "a bowl of ramen"],
                      "tags": [["travel", "alps"], ["food"]], "width": [640, 480]})  # fmt: skip
    pq.write_table(table, folder / "a.parquet")
    code, _, err = cli(capsys, "index", folder, "--no-embeddings")
    assert code == 2 and "none of the text columns ['caption', 'answers']" in err and "'title'" in err
    assert cli(capsys, "index", folder, "--no-embeddings", "--text-columns", "title,tags")[0] == 0
    hits = query(capsys, folder, "alps", "--mode", "text", "--where", "width > 600")
    assert [(h["id"], h["caption"]) for h in hits] == [("x", "sunset over mountains")]
    folder2 = tmp_path / "no-id"
    folder2.mkdir()
    pq.write_table(pa.table({"caption": ["x"]}), folder2 / "a.parquet")
    code, _, err = cli(capsys, "index", folder2, "--no-embeddings")
    assert code == 2 and "has no 'id' column" in err


def _unique_phrase_rows(rows):
    """Ok rows whose caption's words, in order, occur in no other row's caption or answers."""
    def words(text):
        return " " + " ".join(re.findall(r"\w+", (text or "").lower())) + " "

    texts = {r["id"]: words(r["caption"]) + words(" ".join(f"{a['question']} {a['answer']}" for a in r["answers"]))
             for r in rows if r["status"] == "ok"}  # fmt: skip
    return [r for r in rows if r["status"] == "ok" and words(r["caption"]).strip()
            and sum(words(r["caption"]) in t for t in texts.values()) == 1]  # fmt: skip


def test_a_real_job_output_locally_and_on_s3(annotated_output, capsys, embedding_model, tmp_path, s3_bucket,
                                             s3_endpoint, s3_storage):  # fmt: skip
    from helpers import read_output

    rows = read_output(str(annotated_output))
    unique = _unique_phrase_rows(rows)
    images = [r for r in unique if r["frame_time"] is None]
    frames = [r for r in unique if r["frame_time"] is not None]
    assert images and frames, "the tiny model gave no distinguishable caption to query for"
    index = tmp_path / "index"  # --index: leave the shared fixture's output as it is
    assert cli(capsys, "index", annotated_output, "--index", index, "--model", embedding_model)[0] == 0
    for row in (images[0], frames[0]):
        hit = query(capsys, annotated_output, row["caption"], "--index", index)[0]
        assert (hit["id"], hit["frame_time"], hit["caption"]) == (row["id"], row["frame_time"], row["caption"])
        assert hit["answers"] == row["answers"] or set(map(json.dumps, hit["answers"])) <= set(
            map(json.dumps, row["answers"]))
    errors = [r for r in rows if r["status"] == "error"]
    assert errors and not {r["id"] for r in errors} & {
        h["id"] for h in query(capsys, annotated_output, "a", "--index", index, "--top-k", "100")}

    import s3fs

    fs = s3fs.S3FileSystem(**s3_storage.fsspec_options())
    fs.put(str(annotated_output) + "/", f"{s3_bucket}/out/", recursive=True)
    url = f"s3://{s3_bucket}/out"
    s3 = ["--endpoint-url", s3_endpoint, "--cache-dir", tmp_path / "cache"]
    code, out, err = cli(capsys, "index", url, "--model", embedding_model, *s3)
    assert code == 0, err
    assert fs.exists(f"{s3_bucket}/out/_search/index.sqlite") and fs.ls(f"{s3_bucket}/out/_search/vectors")
    for row in (images[0], frames[0]):
        hit = query(capsys, url, row["caption"], *s3, "--cache-dir", tmp_path / "other-cache")[0]
        assert (hit["id"], hit["frame_time"]) == (row["id"], row["frame_time"])
    code, out, _ = cli(capsys, "index", url, "--model", embedding_model, *s3)
    assert "indexed 0 rows from 0 file(s)" in out


@pytest.mark.slow
def test_embeddings_as_a_ray_data_job_equal_the_local_ones(ray_cluster, tmp_path, embedding_model):
    folder = write_captions(tmp_path / "ds", CAPTIONS[:5])
    write_captions(folder, CAPTIONS[5:], name="part-1.parquet")
    calls = []

    def runner(spec, jobs):
        calls.append(sorted(jobs))
        return embed_with_ray(spec, jobs)

    # auto: 8 rows are embedded in the driver, without Ray.
    local = build_index(IndexSpec(str(folder), index_url=str(tmp_path / "local"), embedding_model=embedding_model),
                        runner)  # fmt: skip
    assert calls == []
    remote = build_index(IndexSpec(str(folder), index_url=str(tmp_path / "ray"), embedding_model=embedding_model,
                                   use_ray="on"), runner)  # fmt: skip
    assert len(calls) == 1 and len(calls[0]) == 2
    assert local.rows_embedded == remote.rows_embedded == 8
    names = sorted(p.name for p in (tmp_path / "local" / "vectors").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "ray" / "vectors").iterdir()) and len(names) == 2
    for name in names:
        a = np.load(tmp_path / "local" / "vectors" / name)
        b = np.load(tmp_path / "ray" / "vectors" / name)
        assert a.shape[1] == 384 and a.shape[0] in (5, 3) and np.allclose(a, b, atol=1e-5)


def test_a_crash_between_the_text_commit_and_the_sqlite_commit_leaves_no_stale_text(tmp_path, capsys):
    """tantivy commits before SQLite: a crash in between leaves text entries that SQLite never
    recorded.  Their row ids are handed out again on the rerun, so unless the rerun deletes
    them, a query would hit whatever row now holds those ids."""
    folder = write_captions(tmp_path / "ds", CAPTIONS[:4])
    write_captions(folder, CAPTIONS[4:], name="part-2.parquet")
    assert cli(capsys, "index", folder, "--no-embeddings")[0] == 0
    db = sqlite3.connect(folder / "_search" / "index.sqlite")
    with db:  # part-2's transaction "rolled back": SQLite does not know it, tantivy does
        (first,) = db.execute("SELECT first_rowid FROM files WHERE path LIKE '%part-2.parquet'").fetchone()
        db.execute("DELETE FROM docs WHERE rowid >= ?", (first,))
        db.execute("DELETE FROM files WHERE path LIKE '%part-2.parquet'")
    db.close()
    write_captions(folder, [("n::1", "/x", "1", None, "a yellow submarine", [])], name="part-1.parquet")
    code, out, _ = cli(capsys, "index", folder, "--no-embeddings")
    assert code == 0 and "indexed 5 rows from 2 file(s)" in out
    assert [h["id"] for h in query(capsys, folder, "fireworks", "--mode", "text")] == ["v::7"]
    assert sorted(h["id"] for h in query(capsys, folder, "harbour", "--mode", "text")) == ["v::7", "v::8"]


def test_an_unreadable_text_index_is_reported_as_corrupt(tmp_path, capsys):
    folder = write_captions(tmp_path / "ds")
    assert cli(capsys, "index", folder, "--no-embeddings")[0] == 0
    (folder / "_search" / "text" / "meta.json").unlink()
    code, _, err = cli(capsys, "query", folder, "car", "--mode", "text")
    assert code == 2 and "is corrupt" in err and "--overwrite" in err and "Traceback" not in err
    (folder / "_search" / "text" / "meta.json").write_text("{not json")
    code, _, err = cli(capsys, "query", folder, "car", "--mode", "text")
    assert code == 2 and "is corrupt" in err
