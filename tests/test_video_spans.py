"""A video split into spans gives the rows of the same video unsplit, in every sampling mode.

The spans come from workers.listing (a small ``span_seconds``, ``split_above_bytes=1``)
and are read by workers.video.read_video_shard, as the pipeline does; the unsplit
run is the same listing with splitting off.  Rows are compared whole: id, time,
index, status and pixels.
"""

from __future__ import annotations

import io

import av
import numpy as np
import pyarrow as pa
import pytest
from videofactory import CUES_ID, encode, mkv_without_cues, pan_frames, remux, shots

from workers import schema
from workers.config import DecodeSpec, InputSpec, StorageOptions, VideoSpec
from workers.listing import list_shards
from workers.video import read_video_shard, video_rows

SIZE = (96, 64)
DECODE = DecodeSpec(height=16, width=16, mode="fast")
NAMES = ("astronaut", "coffee", "chelsea", "rocket")


@pytest.fixture(scope="module")
def film(photos) -> bytes:
    """The issue's clip: 16 s at 10 fps, four 4-second scenes, a keyframe every 2 s (and at cuts)."""
    return encode(shots([photos[n] for n in NAMES], [4.0] * 4, fps=10, size=SIZE), "h264", fps=10)


def listed_rows(path, video: VideoSpec) -> tuple[list, list[tuple]]:
    """``(shards, rows)`` of the file as the job lists and reads it: rows are (id, time, index, status, pixels)."""
    shards, _ = list_shards(InputSpec(urls=(str(path),)), StorageOptions(), video=video)
    tables = [t for s in shards for t in read_video_shard(s, InputSpec(urls=(str(path),)), StorageOptions(),
                                                          DECODE, video, batch_rows=8)]  # fmt: skip
    table = pa.concat_tables(tables)
    columns = [table.column(c).to_pylist() for c in (schema.ID, schema.FRAME_TIME, schema.FRAME_INDEX, schema.STATUS)]
    pixels = [bytes(p) for p in table.column(schema.PIXELS).to_pylist()]
    return shards, list(zip(*columns, pixels, strict=True))


def split_and_whole(path, **spec) -> tuple[list, list[tuple], list[tuple]]:
    whole_spec = VideoSpec(split_above_bytes=2**62, **spec)
    split_spec = VideoSpec(split_above_bytes=1, **spec)
    whole_shards, whole = listed_rows(path, whole_spec)
    assert [(s.start_s, s.end_s) for s in whole_shards] == [(0.0, 0.0)]
    shards, parts = listed_rows(path, split_spec)
    return shards, whole, parts


@pytest.mark.parametrize("mode", ["interval", "scene", "keyframes"])
@pytest.mark.parametrize("span", [5.0, 3.0, 1.5])
def test_a_split_video_gives_the_rows_of_the_unsplit_one(tmp_path, film, mode, span):
    """Spans of 5 s (the issue's), 3 s (one boundary on a cut) and 1.5 s: boundaries inside
    scenes, and held frames of a long shot (its extras at 5 and 6 s are kept only at 7 s,
    max_scene_seconds 3) waiting past a span's end."""
    (tmp_path / "film.mp4").write_bytes(film)
    shards, whole, parts = split_and_whole(tmp_path / "film.mp4", frame_sampling=mode, max_scene_seconds=3.0,
                                           span_seconds=span)  # fmt: skip
    assert len(shards) == int(np.ceil(16 / span)) and shards[1].start_s == span
    assert {r[3] for r in whole} == {schema.STATUS_OK}
    if mode != "keyframes":  # a shot of 4 s: its start and its extras at +1, +2, +3 s
        assert [r[1] for r in whole] == pytest.approx([float(t) for t in range(16)])
    assert [r[:4] for r in parts] == [r[:4] for r in whole]
    assert [r[4] for r in parts] == [r[4] for r in whole]


def test_a_scene_span_after_a_strobe_looks_back_until_the_cut_state_is_known(tmp_path, photos, monkeypatch):
    """Six seconds of two photos alternating every frame (no frame tells the cut rule's
    state), then a shot of 2.5 s from 8 s and a long one from 10.5 s.  The span at 10 s
    learns the state only at 8.3 s, too late to know where its shot began (a frame at 10 s
    of a shot from 8 s is held, then dropped at 10.5 s), so it starts again, twice as far
    back each time, down to the stream's start; its rows are still the unsplit ones."""
    from workers import video

    a, b = (pan_frames(photos[n], 60, SIZE) for n in NAMES[:2])
    strobe = [a[i] if i % 2 else b[i] for i in range(60)]
    rocket, chelsea = pan_frames(photos["rocket"], 25, SIZE), pan_frames(photos["chelsea"], 75, SIZE)
    (tmp_path / "strobe.mp4").write_bytes(encode(chelsea[:20] + strobe + rocket + chelsea[20:], "h264", fps=10))
    starts: list[float] = []
    real = video._Decoder.start_at
    monkeypatch.setattr(video._Decoder, "start_at", lambda self, s: (starts.append(s), real(self, s))[1])
    shards, whole, parts = split_and_whole(tmp_path / "strobe.mp4", frame_sampling="scene", max_scene_seconds=3.0,
                                           span_seconds=10.0)  # fmt: skip
    assert [s.start_s for s in shards] == [0.0, 10.0]
    times = [r[1] for r in whole]
    assert 8.0 in times and 10.0 not in times and times[-6:] == pytest.approx([10.5, 11, 12, 13, 14, 15])
    assert [r[:4] for r in parts] == [r[:4] for r in whole]
    assert [r[4] for r in parts] == [r[4] for r in whole]
    assert starts[-1] <= 0 and len([s for s in starts if s > 0]) >= 2, starts  # the span at 10 s tried again


def test_the_cut_flags_known_after_a_seek_are_the_unsplit_ones():
    """Grey frames with cuts, one- and two-frame flashes and strobes: from whatever frame
    the rule starts, each flag it gives (once it knows its state) is the flag the run from
    the stream's start gives that frame."""
    import random

    from workers.video import _cuts

    rng = random.Random(20261207)
    levels, level = [], 0
    while len(levels) < 160:
        kind = rng.choice(["hold", "hold", "cut", "flash", "strobe"])
        other = rng.choice([v for v in (0, 80, 160, 240) if v != level])
        if kind == "cut":
            level = other
        seq = {"hold": [level] * rng.randint(1, 6), "cut": [level] * rng.randint(1, 4),
               "flash": [other] * rng.randint(1, 2) + [level], "strobe": [other, level] * rng.randint(2, 4)}[kind]
        levels += seq
    levels += [level] * 10  # a still end: every start learns its state by then
    frames = [(i / 10, i, av.VideoFrame.from_ndarray(np.full((36, 64, 3), v, np.uint8), format="rgb24"))
              for i, v in enumerate(levels)]  # fmt: skip
    truth = [cut for _t, _i, _f, cut in _cuts(frames, 0.15, known=True)]
    assert 10 < sum(truth) < len(truth) / 2  # cuts, not every frame
    late = []
    for k in range(1, len(frames) - 10):
        flags = [cut for _t, _i, _f, cut in _cuts(frames[k:], 0.15, known=False)]
        known = [i for i, f in enumerate(flags) if f is not None]
        assert known and known == list(range(known[0], len(flags))), k
        assert flags[known[0] :] == truth[k + known[0] :], k
        late.append(known[0])
    assert max(late) > 4  # some starts must wait out a strobe


# --------------------------------------------------------------------------- containers without an index


def test_the_cue_less_matroska_file_really_has_no_index(film):
    """A seek in a Matroska file with Cues reads every keyframe's entry; without them FFmpeg
    knows only the keyframes it scanned on its way to the target."""
    cued, bare = remux(film, "matroska", {"write_crc32": "0"}), mkv_without_cues(film)
    assert CUES_ID in cued and CUES_ID not in bare
    entries = []
    for data in (cued, bare):
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            assert container.duration == 16_000_000  # the duration is kept: the listing splits it
            container.seek(int(3 / stream.time_base), stream=stream)
            entries.append(len(stream.index_entries))
    assert entries[0] == 8 and entries[1] < 8, entries


def unindexed(film: bytes) -> dict[str, bytes]:
    return {"mkv": mkv_without_cues(film), "ts": remux(film, "mpegts")}


@pytest.mark.parametrize("container", ["mkv", "ts"])
@pytest.mark.parametrize("mode", ["interval", "scene", "keyframes"])
def test_a_span_of_a_video_without_an_index_starts_with_its_first_target(film, container, mode):
    """MPEG-TS: FFmpeg's seek to 5 s lands on a packet after the keyframe at 4 s, and the
    decoder waits for the one at 6 s.  (Matroska without Cues: FFmpeg scans the clusters on
    its way, so it lands right; held to the same.)  A span starting at 5, 6.5 or 9 s must
    still give the unsplit run's rows from its start on (the frame shown at 5 s first)."""
    data = unindexed(film)[container]
    spec = VideoSpec(frame_sampling=mode, max_scene_seconds=3.0)
    whole = [(r.time, r.index, r.pixels.tobytes()) for r in video_rows(io.BytesIO(data), spec, DECODE)]
    assert {r[0] for r in whole} >= ({5.0, 9.0} if mode != "keyframes" else {6.0, 10.0})
    for start in (5.0, 6.5, 9.0):
        rows = list(video_rows(io.BytesIO(data), spec, DECODE, start=start))
        assert [r.kind for r in rows] == [None] * len(rows)
        span = [(r.time, r.index, r.pixels.tobytes()) for r in rows]
        assert span == [r for r in whole if r[0] >= start - 1e-9], (container, mode, start)


@pytest.mark.parametrize("name", ["film.mkv", "film.ts"])
def test_spans_of_an_index_less_file_from_the_listing_give_the_unsplit_rows(tmp_path, film, name):
    (tmp_path / name).write_bytes(mkv_without_cues(film) if name.endswith(".mkv") else remux(film, "mpegts"))
    shards, whole, parts = split_and_whole(tmp_path / name, span_seconds=5.0)
    assert [s.start_s for s in shards] == [0.0, 5.0, 10.0, 15.0]
    assert [r[:4] for r in parts] == [r[:4] for r in whole] and len(whole) == 16
    assert [r[4] for r in parts] == [r[4] for r in whole]


def test_spans_shorter_than_a_second_get_names_of_their_own(tmp_path, film):
    """Spans of 0.9 s start at 0, 0.9, 1.8, ...: whole seconds alone would name two of them t00."""
    (tmp_path / "film.mp4").write_bytes(film)
    shards, whole, parts = split_and_whole(tmp_path / "film.mp4", frame_interval=0.3, span_seconds=0.9)
    assert [s.name for s in shards[:3]] == ["film.mp4.t00.000", "film.mp4.t00.900", "film.mp4.t01.800"]
    assert len({s.name for s in shards}) == len(shards) == 18
    assert [r[:4] for r in parts] == [r[:4] for r in whole] and len(whole) == 54
