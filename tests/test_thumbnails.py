"""Thumbnails (workers/thumbnails.py) read only what the job read.

Every test here feeds a crafted Parquet file to ``jobs.report`` or ``jobs.search query --html``
whose ``source`` column points elsewhere: a local file outside the input roots, an object in a
second bucket, an HTTP URL.  What must not be read is watched where reading happens: the
kernel's inotify queue for local opens, a counting proxy in front of the S3 server, an HTTP
server's own hit counter.  Each test also reads one thing it may read, and shows that the
watcher sees it, so a blind watcher cannot pass.
"""

from __future__ import annotations

import base64
import ctypes
import html
import json
import math
import os
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from faulty_proxy import FaultyProxy
from helpers import parquet_bytes, write_tar
from imagefactory import jpeg_bytes

from jobs import report, search
from jobs.pages import clock
from workers import thumbnails as thumbs_module
from workers.config import StorageOptions
from workers.storage import input_root
from workers.thumbnails import JobInputs, image_thumbnail, thumbnails

IN_OPEN = 0x20  # inotify(7)
OUTSIDE = "not under the job's inputs"


class OpenWatch:
    """Counts opens of anything in the watched folders, from the kernel's inotify queue.

    An event is queued by the open(2) call itself, so once the code under test has returned,
    every open it made is in the queue: nothing here waits or depends on timing.
    """

    def __init__(self, *folders: Path):
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        assert self.fd >= 0, os.strerror(ctypes.get_errno())
        self.names = {}
        for folder in folders:
            wd = self.libc.inotify_add_watch(self.fd, os.fsencode(folder), IN_OPEN)
            assert wd >= 0, os.strerror(ctypes.get_errno())
            self.names[wd] = folder

    def opened(self) -> list[str]:
        """What was opened since the last call: ``folder/name`` (``folder/`` for the folder itself)."""
        seen = []
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return seen
            offset = 0
            while offset < len(data):
                wd, _mask, _cookie, size = struct.unpack_from("iIII", data, offset)
                name = data[offset + 16 : offset + 16 + size].rstrip(b"\0").decode()
                seen.append(f"{self.names[wd]}/{name}")
                offset += 16 + size

    def close(self) -> None:
        os.close(self.fd)


def _crafted(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist([{"id": f"row{i}", "caption": f"caption {i}", "status": "ok", "frame_time": None,
                                  **row} for i, row in enumerate(rows)])  # fmt: skip


def _payload(uri: str) -> str:
    return uri.split(",", 1)[1]


def _placeholders(page: str) -> list[str]:
    return [html.unescape(p.split("</div>", 1)[0]) for p in page.split("image unavailable: ")[1:]]


@pytest.mark.parametrize("how", ["manifest", "allow-source"])
def test_a_local_file_outside_the_inputs_is_never_opened(photos, tmp_path, capsys, how):
    inputs, secret, sibling, out = (tmp_path / n for n in ("in", "secret", "in-other", "out"))
    for folder in (inputs, secret, sibling, out):
        folder.mkdir()
    (inputs / "inside.jpg").write_bytes(jpeg_bytes(photos["coffee"]))
    secret_jpeg = jpeg_bytes(photos["astronaut"])
    (secret / "outside.jpg").write_bytes(secret_jpeg)
    write_tar(secret / "outside.tar", [("k.jpg", secret_jpeg)])
    (sibling / "x.jpg").write_bytes(secret_jpeg)
    sources = [str(secret / "outside.jpg"), f"file://{secret}/outside.jpg", f"{inputs}/../secret/outside.jpg",
               f"{inputs}/./../secret/outside.jpg", str(sibling / "x.jpg"), str(secret / "outside.tar")]  # fmt: skip
    rows = [{"source": str(inputs / "inside.jpg"), "key": "inside.jpg"}]
    rows += [{"source": s, "key": "outside.jpg" if s.endswith(".jpg") else "k"} for s in sources]
    pq.write_table(_crafted(rows), out / "part-0.parquet")
    flags = []
    if how == "manifest":
        (out / "_manifest.json").write_text(json.dumps({"input": {}, "input_roots": [input_root(str(inputs))]}))
    else:
        flags = ["--allow-source", f"file://{inputs}/"]
    watch = OpenWatch(secret, sibling)
    try:
        assert report.main([str(out), "--html", str(tmp_path / "r.html"), *flags]) == 0
        opened = watch.opened()
        page = (tmp_path / "r.html").read_text()
        # The watcher sees an open when one happens.
        (secret / "outside.jpg").read_bytes()
        assert watch.opened() == [f"{secret}/outside.jpg"]
    finally:
        watch.close()
    assert opened == []
    assert _payload(image_thumbnail(secret_jpeg).data_uri) not in page
    assert base64.b64encode(secret_jpeg[:300]).decode()[:200] not in page
    assert _payload(image_thumbnail((inputs / "inside.jpg").read_bytes()).data_uri) in page
    reasons = _placeholders(page)
    assert len(reasons) == len(sources) and all(OUTSIDE in r for r in reasons), reasons
    assert "(6 without a thumbnail)" in capsys.readouterr().out


def test_an_object_in_a_second_bucket_is_never_requested(photos, tmp_path, s3_endpoint, s3_bucket, capsys):
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    other = f"{s3_bucket}-other"
    s3.create_bucket(Bucket=other)
    secret_jpeg = jpeg_bytes(photos["astronaut"])
    s3.put_object(Bucket=other, Key="in/secret.jpg", Body=secret_jpeg)
    s3.put_object(Bucket=s3_bucket, Key="in-other/secret.jpg", Body=secret_jpeg)
    s3.put_object(Bucket=s3_bucket, Key="in/inside.jpg", Body=jpeg_bytes(photos["coffee"]))
    rows = [{"source": f"s3://{s3_bucket}/in/inside.jpg", "key": "inside.jpg"},
            {"source": f"s3://{other}/in/secret.jpg", "key": "secret.jpg"},
            {"source": f"s3a://{other}/in/secret.jpg", "key": "secret.jpg"},
            {"source": f"s3://{s3_bucket}/in-other/secret.jpg", "key": "secret.jpg"},
            {"source": f"s3://{s3_bucket}/in/../in-other/secret.jpg", "key": "secret.jpg"}]  # fmt: skip
    s3.put_object(Bucket=s3_bucket, Key="out/part-0.parquet", Body=parquet_bytes(_crafted(rows)))
    manifest = {"input": {}, "input_roots": [input_root(f"s3://{s3_bucket}/in/")]}
    s3.put_object(Bucket=s3_bucket, Key="out/_manifest.json", Body=json.dumps(manifest).encode())
    with FaultyProxy(s3_endpoint, every=0) as proxy:
        code = report.main([f"s3://{s3_bucket}/out", "--html", str(tmp_path / "r.html"), "--endpoint-url", proxy.url])
    assert code == 0
    asked = list(proxy.paths)
    assert [p for p in asked if other in p or "in-other" in p] == []
    assert any(p.endswith(f"/{s3_bucket}/in/inside.jpg") for p in asked), asked  # the proxy sees what is read
    page = (tmp_path / "r.html").read_text()
    assert _payload(image_thumbnail(secret_jpeg).data_uri) not in page
    reasons = _placeholders(page)
    assert len(reasons) == 4 and all(OUTSIDE in r for r in reasons), reasons
    assert "(4 without a thumbnail)" in capsys.readouterr().out


class _CountingServer:
    """An HTTP server on 127.0.0.1 that answers every GET and HEAD with a JPEG, and counts them."""

    def __init__(self, body: bytes):
        self.hits: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.hits.append(f"{self.command} {self.path}")
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command == "GET":
                    self.wfile.write(body)

            do_HEAD = do_GET

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.http.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        self.thread = threading.Thread(target=self.http.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.http.shutdown()
        self.http.server_close()


def test_an_http_source_is_never_fetched_unless_allowed(photos, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    jpeg = jpeg_bytes(photos["chelsea"])
    with _CountingServer(jpeg) as server:
        rows = [{"source": f"{server.url}/x.jpg", "key": "x.jpg", "caption": "a cat on a mat"}]
        pq.write_table(_crafted(rows), out / "part-0.parquet")
        # A job whose inputs were local files: its manifest does not open the web either.
        (out / "_manifest.json").write_text(json.dumps({"input": {}, "input_roots": [str(tmp_path / "in")]}))
        assert report.main([str(out), "--html", str(tmp_path / "r.html")]) == 0
        assert server.hits == []
        assert [OUTSIDE in r for r in _placeholders((tmp_path / "r.html").read_text())] == [True]

        index = str(tmp_path / "index")
        assert search.main(["index", str(out), "--index", index, "--no-embeddings", "--ray", "off"]) == 0
        query = ["query", str(out), "cat", "--index", index, "--mode", "text", "--html", str(tmp_path / "h.html")]
        assert search.main(query) == 0
        assert server.hits == []
        page = (tmp_path / "h.html").read_text()
        assert "data:image/jpeg" not in page and OUTSIDE in html.unescape(page)

        # Allowed by name, the same row is fetched and shown: the counter sees fetches.
        assert search.main([*query, "--allow-source", server.url]) == 0
    assert server.hits and all(h.endswith(" /x.jpg") for h in server.hits), server.hits
    assert _payload(image_thumbnail(jpeg).data_uri) in (tmp_path / "h.html").read_text()
    capsys.readouterr()


@pytest.fixture()
def clip(photos, tmp_path) -> Path:
    from videofactory import encode, shots

    path = tmp_path / "in" / "clip.mp4"
    path.parent.mkdir()
    path.write_bytes(encode(shots([photos["rocket"], photos["chelsea"]], [1.0, 1.0], fps=10, size=(96, 64)), "h264"))
    return path


def test_video_frames_get_the_image_pixel_limit(clip, monkeypatch):
    job = JobInputs(None, (str(clip.parent),))
    wanted = [(str(clip), "clip.mp4", 0.5)]
    assert thumbnails(wanted, job, StorageOptions())[wanted[0]].data_uri  # 96x64 is within the limit
    monkeypatch.setattr(thumbs_module, "MAX_PIXELS", 96 * 64 - 1)
    got = thumbnails(wanted, job, StorageOptions())[wanted[0]]
    assert got.data_uri is None and got.reason == "video of 96x64 pixels is too large to show"


def test_a_frame_time_that_is_not_finite_is_a_placeholder(clip):
    nan, inf = math.nan, math.inf
    job = JobInputs(None, (str(clip.parent),))
    wanted = [(str(clip), "clip.mp4", t) for t in (nan, inf, -inf)]
    got = thumbnails(wanted, job, StorageOptions())
    assert [got[w].reason for w in wanted] == [f"frame_time {t} is not a finite number of seconds"
                                               for t in ("nan", "inf", "-inf")]  # fmt: skip
    # A page shows such a time as written rather than failing on it.
    assert (clock(nan), clock(inf), clock("12"), clock(83.5)) == ("nan", "inf", "12", "1:23.5")


def test_a_report_row_whose_frame_time_is_not_finite_gets_a_placeholder(clip, tmp_path):
    """The report cleans a NaN time to no time; the page still shows no frame for it, and the next row's frame."""
    data = tmp_path / "crafted"
    data.mkdir()
    rows = [{"source": str(clip), "key": "clip.mp4", "frame_time": t} for t in (math.nan, math.inf, 0.5)]
    pq.write_table(_crafted(rows), data / "part.parquet")
    page_path = tmp_path / "page.html"
    assert report.main([str(data), "--html", str(page_path), "--allow-source", str(clip.parent)]) == 0
    page = page_path.read_text()
    assert _placeholders(page) == ["the row has no finite frame_time: which frame to show is unknown"] * 2
    assert page.count("<img class=thumb") == 1
