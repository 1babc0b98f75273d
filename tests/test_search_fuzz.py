"""Crafted data through index, query (plain, --json, --html) and report: each column a hit or a
page shows, in each wrong type or value, gives exit 0 with the rows that make sense, or exit 2
with a message naming the column; never a traceback."""

from __future__ import annotations

import json
import math
import sqlite3

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import report, search

NAN, INF = float("nan"), float("inf")
ANSWER = pa.struct([("question", pa.string()), ("answer", pa.string())])
# Three good rows; each case below replaces, adds or drops one column.
GOOD = {
    "id": pa.array(["r::0", "r::1", "r::2"]),
    "source": pa.array(["/nowhere/a.tar"] * 3),
    "key": pa.array(["0", "1", "2"]),
    "frame_time": pa.array([None, 1.5, 2.5], pa.float64()),
    "caption": pa.array(["a red kite over a beach", "a green kite in a park", "a blue kite at dusk"]),
    "answers": pa.array([[{"question": "what colour?", "answer": "red"}], [], None], pa.list_(ANSWER)),
    "status": pa.array(["ok"] * 3),
}
DROP = object()
BOTH = ("index", "report")

# (name, column, values (DROP: no such column), which commands refuse it by the column's name)
CASES = [
    ("answers-string", "answers", pa.array(["red", "green", None]), BOTH),
    ("answers-int", "answers", pa.array([1, 2, None]), BOTH),
    ("answers-list-of-strings", "answers", pa.array([["red"], [], None]), BOTH),
    ("answers-struct-wrong-fields", "answers", pa.array([[{"q": "x", "a": "y"}], [], None]), BOTH),
    ("answers-struct-int-question", "answers", pa.array([[{"question": 1, "answer": "y"}], [], None]), BOTH),
    ("answers-all-null", "answers", pa.nulls(3), ()),
    ("answers-all-empty", "answers", pa.array([[], [], None], pa.list_(pa.null())), ()),
    ("answers-null-entries", "answers",
     pa.array([[None, {"question": None, "answer": "red"}], [None], None], pa.list_(ANSWER)), ()),
    ("caption-int", "caption", pa.array([1, 2, 3]), BOTH),
    ("caption-binary", "caption", pa.array([b"a kite", b"\xff\xfe", None]), BOTH),
    ("caption-list", "caption", pa.array([["a", "kite"], [], None]), BOTH),
    ("frame_time-nan", "frame_time", pa.array([NAN, 1.5, NAN]), ()),
    ("frame_time-inf", "frame_time", pa.array([INF, 1.5, 2.5]), ()),
    ("frame_time--inf", "frame_time", pa.array([-INF, 1.5, INF]), ()),
    ("frame_time-string", "frame_time", pa.array(["1.5", "soon", None]), BOTH),
    ("source-missing", "source", DROP, ()),
    ("source-int", "source", pa.array([1, 2, 3]), BOTH),
    ("key-missing", "key", DROP, ()),
    ("key-binary", "key", pa.array([b"0", b"1", b"2"]), BOTH),
    ("id-missing", "id", DROP, ("index",)),  # the report needs no id
    ("id-binary", "id", pa.array([b"0", b"1", b"2"]), BOTH),
    ("id-uint64", "id", pa.array([2**64 - 1, 1, 2], pa.uint64()), BOTH),
    ("status-int", "status", pa.array([0, 0, 0]), ("report",)),  # for the index it is one more --where column
    ("extra-Caption-int", "Caption", pa.array([7, 8, 9]), ()),  # SQLite's column names ignore case
    ("extra-rowid", "rowid", pa.array([5, 5, 5]), ()),
    ("extra-uint64", "width", pa.array([2**64 - 1, 0, 1], pa.uint64()), ()),
]  # fmt: skip


def crafted(folder, column, values):
    columns = dict(GOOD)
    if values is DROP:
        del columns[column]
    else:
        columns[column] = values
    folder.mkdir(parents=True)
    pq.write_table(pa.table(columns), folder / "part-0.parquet")
    return pa.table(columns).to_pylist()


def run(capsys, main, *args) -> tuple[int, str]:
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    text = out.out + out.err
    assert code in (0, 2), text
    assert "Traceback" not in text, text
    return code, text


def sane(row: dict) -> dict:
    """What a hit shows of a crafted row, worked out independently of the code under test."""
    ft = row.get("frame_time")
    answers = row.get("answers")
    return {
        "source": row.get("source"),
        "key": row.get("key"),
        "frame_time": ft if isinstance(ft, float) and math.isfinite(ft) else None,
        "caption": row["caption"],
        "answers": [{"question": a["question"], "answer": a["answer"]} for a in answers or [] if a is not None],
    }


@pytest.mark.parametrize("name, column, values, refused_by", CASES, ids=[c[0] for c in CASES])
def test_crafted_columns_get_rows_or_a_message(tmp_path, capsys, name, column, values, refused_by):
    folder = tmp_path / "ds"
    rows = crafted(folder, column, values)
    named = f"column {column!r}" if column != "id" or values is not DROP else "no 'id' column"

    code, text = run(capsys, search.main, "index", folder, "--no-embeddings")
    if "index" in refused_by:
        assert code == 2 and named in text, text
        code, text = run(capsys, search.main, "query", folder, "kite", "--mode", "text")
        assert code == 2 and "no search index at" in text, text
    else:
        assert code == 0 and "indexed 3 rows" in text, text
        code, text = run(capsys, search.main, "query", folder, "kite", "--mode", "text", "--json")
        assert code == 0, text
        hits = {h["id"]: h for h in json.loads(text)}
        assert sorted(hits) == ["r::0", "r::1", "r::2"]
        for row in rows:
            hit = hits[row["id"]]
            assert {k: hit[k] for k in ("source", "key", "frame_time", "caption", "answers")} == sane(row), name
        code, text = run(capsys, search.main, "query", folder, "kite", "--mode", "text")
        assert code == 0 and all(r["caption"] in text for r in rows), text
        page = tmp_path / "hits.html"
        code, text = run(capsys, search.main, "query", folder, "kite", "--mode", "text", "--html", page)
        assert code == 0 and all(r["caption"] in page.read_text() for r in rows), text

    page = tmp_path / "report.html"
    code, text = run(capsys, report.main, folder, "--html", page)
    if "report" in refused_by:
        assert code == 2 and named in text and not page.exists(), text
    else:
        assert code == 0 and "3 rows" in text, text
        html = page.read_text()
        assert all(str(r.get("caption")) in html for r in rows), name


def test_crafted_values_in_an_index_are_shown_as_nothing(tmp_path, capsys):
    """An index someone else wrote (or a bug) may hold any SQLite value: hits still come out."""
    folder = tmp_path / "ds"
    crafted(folder, "status", pa.array(["ok"] * 3))
    assert run(capsys, search.main, "index", folder, "--no-embeddings")[0] == 0
    db = sqlite3.connect(folder / "_search" / "index.sqlite")
    with db:
        db.execute("UPDATE docs SET answers = 'not json', frame_time = 9e999, source = 5 WHERE id = 'r::0'")
        db.execute("UPDATE docs SET answers = '[1, null, {\"question\": 2, \"answer\": \"x\"}]', "
                   "caption = X'FF00', key = X'00' WHERE id = 'r::1'")  # fmt: skip
        db.execute("UPDATE docs SET answers = '\"a string\"', frame_time = 'soon', id = X'01' WHERE id = 'r::2'")
    db.close()
    code, text = run(capsys, search.main, "query", folder, "kite", "--mode", "text", "--json")
    assert code == 0
    hits = sorted(json.loads(text), key=lambda h: h["score"])
    assert {(h["id"], h["source"], h["key"], h["frame_time"], h["caption"]) for h in hits} == {
        ("r::0", None, "0", None, "a red kite over a beach"),
        ("r::1", "/nowhere/a.tar", None, 1.5, None),
        (None, "/nowhere/a.tar", "2", None, "a blue kite at dusk"),
    }
    assert sorted(json.dumps(h["answers"]) for h in hits) == ["[]", "[]", '[{"question": null, "answer": "x"}]']
    code, text = run(capsys, search.main, "query", folder, "kite", "--mode", "text", "--html", tmp_path / "h.html")
    assert code == 0 and "a blue kite at dusk" in (tmp_path / "h.html").read_text()


def test_a_file_that_is_not_parquet_is_named(tmp_path, capsys):
    folder = tmp_path / "ds"
    crafted(folder, "status", pa.array(["ok"] * 3))
    (folder / "part-1.parquet").write_bytes(b"not parquet at all")
    for main, args in ((search.main, ["index", folder, "--no-embeddings"]),
                       (report.main, [folder, "--html", tmp_path / "r.html"])):  # fmt: skip
        code, text = run(capsys, main, *args)
        assert code == 2 and "part-1.parquet is not a readable Parquet file" in text, text
