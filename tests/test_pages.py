"""The HTML pages (jobs/pages.py) and their thumbnails (workers/thumbnails.py), checked in real
headless Chromium: thumbnails decode (naturalWidth > 0), captions are shown, reasons replace
images that are gone, and a screenshot is taken."""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from jobs import report, search


def _open(chromium, path):
    page = chromium.new_page(viewport={"width": 1200, "height": 900})
    page.goto(path.as_uri())
    page.wait_for_load_state("load")
    return page


def _images(page) -> list[dict]:
    return page.evaluate(
        "[...document.querySelectorAll('img.thumb')].map(i => ({w: i.naturalWidth, h: i.naturalHeight,"
        " done: i.complete, id: i.closest('.card').dataset.id}))"
    )


def _captions(page) -> list[str]:
    return page.evaluate("[...document.querySelectorAll('.card .caption')].map(e => e.textContent)")


def _screenshot(page, path) -> None:
    page.screenshot(path=str(path), full_page=True)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    with Image.open(path) as im:
        assert im.width >= 1200 and im.height >= 300


def test_report_page_of_a_real_run(annotated_output, chromium, tmp_path, capsys):
    from helpers import read_output

    rows = read_output(str(annotated_output))
    html = tmp_path / "report.html"
    assert report.main([str(annotated_output), "--html", str(html)]) == 0
    assert "10 rows, 1 error rows, 10 shown (1 without a thumbnail)" in capsys.readouterr().out
    page = _open(chromium, html)
    images = _images(page)
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(images) == len(ok) == 9  # four photos in the tar, one loose, four video frames
    assert all(i["done"] and i["w"] > 0 and i["h"] > 0 for i in images), images
    assert {i["id"] for i in images} == {r["id"] for r in ok}
    assert sorted(_captions(page)) == sorted(r["caption"] for r in ok)
    bars = page.evaluate("[...document.querySelectorAll('#errors-chart g.bar')].map(g => [g.dataset.kind,"
                         " g.dataset.count, g.querySelector('rect').getBBox().width])")  # fmt: skip
    assert bars == [["truncated_image", "1", 360]]
    broken = page.locator(".card[data-id$='::broken'] .placeholder")
    assert "does not decode" in broken.inner_text()
    table = page.evaluate("Object.fromEntries([...document.querySelectorAll('table.summary tr')]"
                          ".map(r => [r.cells[0].textContent, r.cells[1].textContent]))")  # fmt: skip
    assert table["output"] == str(annotated_output)
    assert {k: table.get(k) for k in ("rows", "error rows", "inputs", "ok", "errors", "shards")} == {
        "rows": "10", "error rows": "1", "inputs": "10", "ok": "9", "errors": "1", "shards": "3"}  # fmt: skip
    _screenshot(page, tmp_path / "report.png")
    page.close()


def test_hits_page_shows_the_hits_with_their_frames(annotated_output, chromium, tmp_path, capsys, embedding_model):
    from helpers import read_output

    frames = [r for r in read_output(str(annotated_output)) if r["frame_time"] is not None]
    index = tmp_path / "index"
    assert search.main(["index", str(annotated_output), "--index", str(index), "--model", embedding_model]) == 0
    capsys.readouterr()
    html = tmp_path / "hits.html"
    assert search.main(["query", str(annotated_output), frames[1]["caption"], "--index", str(index), "--json",
                        "--top-k", "6", "--html", str(html)]) == 0  # fmt: skip
    hits = json.loads(capsys.readouterr().out)
    page = _open(chromium, html)
    images = _images(page)
    assert [i["id"] for i in images] == [h["id"] for h in hits] and len(hits) == 6
    assert all(i["done"] and i["w"] > 0 for i in images), images
    assert _captions(page) == [h["caption"] for h in hits]
    assert frames[1]["id"] in [h["id"] for h in hits]  # the query is its caption
    for h in hits:  # a frame's card says where in the video it is; a photo's says nothing of the kind
        meta = page.locator(f".card[data-id='{h['id']}'] .meta").inner_text()
        at = re.search(r" at (\d+:\d\d\.\d) · score", meta)
        assert (at and at.group(1)) == (f"0:{h['frame_time']:04.1f}" if h["frame_time"] is not None else None), meta
    _screenshot(page, tmp_path / "hits.png")
    page.close()


def _decode_data_uri(uri: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB"), dtype=float)


def test_a_video_thumbnail_is_the_frame_at_frame_time(photos, tmp_path):
    from videofactory import encode, shots

    from workers.config import StorageOptions
    from workers.thumbnails import JobInputs, thumbnails

    clip = tmp_path / "clip.mp4"
    clip.write_bytes(encode(shots([photos["rocket"], photos["chelsea"]], [2.0, 2.0], fps=10, size=(96, 64)), "h264"))
    job = JobInputs(None, (str(tmp_path),))
    got = thumbnails([(str(clip), "clip.mp4", 0.5), (str(clip), "clip.mp4", 3.0)], job, StorageOptions())
    for t, name, other in ((0.5, "rocket", "chelsea"), (3.0, "chelsea", "rocket")):
        thumb = _decode_data_uri(got[(str(clip), "clip.mp4", t)].data_uri)
        size = (thumb.shape[1] * 2, thumb.shape[0])  # the clip pans across a photo twice its width

        def mean_colour(photo, size=size):
            return np.asarray(Image.fromarray(photo).resize(size), dtype=float).reshape(-1, 3).mean(0)
        colour = thumb.reshape(-1, 3).mean(0)
        assert np.abs(colour - mean_colour(photos[name])).sum() < np.abs(colour - mean_colour(photos[other])).sum()


def test_images_that_are_gone_become_placeholders_with_a_reason(photos, chromium, tmp_path, capsys):
    from helpers import write_tar
    from imagefactory import jpeg_bytes

    (tmp_path / "in").mkdir()
    present = tmp_path / "in" / "here.jpg"
    present.write_bytes(jpeg_bytes(photos["coffee"]))
    tar = write_tar(tmp_path / "in" / "s.tar", [("kept.jpg", jpeg_bytes(photos["astronaut"]))])
    out = tmp_path / "out"
    out.mkdir()
    rows = [(f"{present}::here.jpg", str(present), "here.jpg", "a cup of coffee <script>alert(1)</script>"),
            (f"{tar}::kept", str(tar), "kept", "an astronaut"),
            (f"{tar}::gone", str(tar), "gone", "a key the shard no longer holds"),
            ("x::y", str(tmp_path / "in" / "deleted.tar"), "y", "a shard that was deleted"),
            ("z::w", str(tmp_path / "in" / "deleted.jpg"), "deleted.jpg", "an image that was deleted")]  # fmt: skip
    pq.write_table(pa.Table.from_pylist([{"id": i, "source": s, "key": k, "caption": c, "status": "ok"}
                                         for i, s, k, c in rows]), out / "part-0.parquet")  # fmt: skip
    html = tmp_path / "report.html"
    # A dataset no job of ours wrote (no manifest): its images live beside it, so they are allowed by name.
    assert report.main([str(out), "--html", str(html), "--allow-source", str(tmp_path / "in")]) == 0
    assert "(3 without a thumbnail)" in capsys.readouterr().out
    page = _open(chromium, html)
    assert {i["id"] for i in _images(page) if i["w"] > 0} == {f"{present}::here.jpg", f"{tar}::kept"}
    reasons = page.evaluate("Object.fromEntries([...document.querySelectorAll('.placeholder')]"
                            ".map(p => [p.closest('.card').dataset.id, p.textContent]))")  # fmt: skip
    assert "'gone' is no longer in" in reasons[f"{tar}::gone"]
    assert "deleted.tar" in reasons["x::y"] and "deleted.jpg is gone" in reasons["z::w"]
    assert page.evaluate("document.querySelectorAll('script').length") == 0  # the caption stayed text
    assert "<script>alert(1)</script>" in _captions(page)[0]
    page.close()
