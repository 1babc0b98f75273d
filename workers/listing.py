"""Turn the job's input URLs into a deterministic list of shards (runs on the driver).

Each input URL may be a single file, a directory (searched recursively) or a
glob (``*``, ``?``, ``[...]``, ``**``) on any fsspec URL: a local path,
``file://`` or ``s3://``.  Every file found is classified by its name:

* ``.tar``, ``.tar.gz``, ``.tgz`` (any case)  -> one ``webdataset`` shard each;
* ``.parquet``                                  -> one ``parquet`` shard each;
* ``.jpg``, ``.jpeg``, ``.png``, ``.webp``      -> ``images``, grouped into one
  shard per directory (split into chunks of at most :data:`IMAGES_PER_SHARD`);
* ``.mp4``, ``.mov``, ``.m4v``, ``.mkv``, ``.webm``, ``.avi`` -> one ``video``
  shard each; one at least ``VideoSpec.split_above_bytes`` large is probed for
  its duration and cut into spans of ``VideoSpec.span_seconds``, one shard each
  (``<name>.t<start seconds>``, with milliseconds when ``span_seconds`` is not whole),
  so a long film spreads over the cluster.

An explicit ``InputSpec.format`` restricts this to that format's extensions.
Anything else is ignored and counted in :class:`ListingStats`; hidden files
(a path component starting with ``.``) and ``_SUCCESS``-style markers found
while walking are skipped and counted separately.

Local files are reported as absolute paths (``/data/x/0001.tar``); other
protocols as full URLs (``s3://bucket/x/0001.tar``).  The same file reached
through ``file://`` or a relative path therefore gets the same URI, so row ids
stay stable across reruns.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import posixpath
import re
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import fsspec

from workers.config import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, InputSpec, StorageOptions, VideoSpec
from workers.storage import filesystem_for, refuse_command_url, relative_path, unstrip

WEBDATASET = "webdataset"
PARQUET = "parquet"
IMAGES = "images"
VIDEO = "video"

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
PARQUET_SUFFIXES = (".parquet",)
# A directory of a million photos must not become a single Ray task: a shard
# of 10k images is minutes of model time, small enough to retry cheaply.
IMAGES_PER_SHARD = 10_000
# Shard names become output directory names; keep them well under NAME_MAX.
MAX_NAME_CHARS = 120

_SUFFIXES = {WEBDATASET: TAR_SUFFIXES, PARQUET: PARQUET_SUFFIXES, IMAGES: IMAGE_EXTENSIONS, VIDEO: VIDEO_EXTENSIONS}
# Concurrent duration probes of large videos while listing (a few ranged reads each).
_PROBE_THREADS = 16
_GLOB_CHARS = ("*", "?", "[")
_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]")
_MAX_EXAMPLES = 10


@dataclass(frozen=True)
class ShardRef:
    """One unit of reading work: a tar, a Parquet file, or a chunk of an image folder."""

    uri: str  # full URL of the file (for ``images``: of the directory)
    format: str  # "webdataset" | "parquet" | "images"
    name: str  # unique within the job, only [A-Za-z0-9._-]
    files: tuple[str, ...] = ()  # ``images`` only: full URIs of the image files, sorted
    root: str = ""  # the input root URL the shard was found under
    # Size and ETag (object stores) or mtime (local disk) of the shard's file,
    # or a digest of its image files', as the listing saw them: a resume redoes
    # a completed shard whose input changed since (see workers/ledger.py).
    fingerprint: str = ""
    # ``video`` spans: the seconds [start_s, end_s) of the file this shard covers (end_s 0: to the end).
    start_s: float = 0.0
    end_s: float = 0.0

    @property
    def content_id(self) -> str:
        """What the shard holds, for resume: its URI, and for an image-folder chunk a digest of its files.

        Chunk names follow the folder's sorted listing, so images added to or
        removed from a folder move other images between chunks of the same
        name; the digest tells a completed chunk from a changed one.
        """
        if self.end_s:
            return f"{self.uri}#t={self.start_s:g},{self.end_s:g}"
        if not self.files:
            return self.uri
        digest = _digest("\n".join(self.files))
        return f"{self.uri}#{len(self.files)}:{digest}"


@dataclass(frozen=True)
class ListingStats:
    """What the listing found, for the job summary and the driver's log."""

    shards: int = 0
    webdataset_shards: int = 0
    parquet_shards: int = 0
    image_shards: int = 0
    image_files: int = 0
    video_shards: int = 0
    video_files: int = 0
    ignored_files: int = 0  # files with an extension that is not an input of this job
    hidden_files: int = 0  # dot-files, files in dot-directories, _SUCCESS-style markers
    duplicate_files: int = 0  # files matched by more than one input URL (read once)
    ignored_examples: tuple[str, ...] = ()  # the first few ignored files, for the log


def format_of(path: str, wanted: str = "auto") -> str | None:
    """The input format a file name implies, or None if the job ignores it."""
    low = posixpath.basename(path).lower()
    for fmt, suffixes in _SUFFIXES.items():
        if wanted in ("auto", fmt) and low.endswith(suffixes):
            return fmt
    return None


def list_shards(
    spec: InputSpec,
    storage: StorageOptions,
    *,
    images_per_shard: int = IMAGES_PER_SHARD,
    video: VideoSpec | None = None,
) -> tuple[list[ShardRef], ListingStats]:
    """Expand ``spec.urls`` into shards, sorted by URI, with unique names.

    ``video`` says which videos are cut into spans (default: ``VideoSpec()``).

    Raises ``FileNotFoundError`` naming the URL when one matches nothing, or
    matches only files that are not inputs of this job; ``ValueError`` for a
    command-running scheme such as ``pipe:``.
    """
    if images_per_shard < 1:
        raise ValueError(f"images_per_shard must be >= 1, got {images_per_shard}")
    files: dict[str, tuple[str, str, str]] = {}  # file uri -> (format, root uri, fingerprint)
    ignored = hidden = duplicates = 0
    examples: list[str] = []
    for url in spec.urls:
        found = _expand(url, storage)
        usable = 0
        url_ignored = 0
        for uri, root, is_hidden, fingerprint in found.files:
            if is_hidden:
                hidden += 1
                continue
            fmt = format_of(uri, spec.format)
            if fmt is None:
                url_ignored += 1
                if len(examples) < _MAX_EXAMPLES:
                    examples.append(uri)
                continue
            usable += 1
            if uri in files:
                duplicates += 1
                continue
            files[uri] = (fmt, root, fingerprint)
        ignored += url_ignored
        if not usable:
            wanted = "input" if spec.format == "auto" else f"{spec.format} input"
            raise FileNotFoundError(
                f"input {url!r}: found no {wanted} files (looked for {_suffix_list(spec.format)}; "
                f"{url_ignored} other file(s) and {found.hidden} hidden file(s) ignored)"
            )

    shards: list[ShardRef] = []
    image_groups: dict[tuple[str, str], list[str]] = defaultdict(list)  # (root, rel dir) -> file uris
    videos: list[ShardRef] = []
    for uri, (fmt, root, fingerprint) in files.items():
        rel = relative_path(uri, root)
        if fmt == IMAGES:
            image_groups[(root, posixpath.dirname(rel))].append(uri)
        else:
            ref = ShardRef(uri=uri, format=fmt, name=_sanitize(rel), root=root, fingerprint=fingerprint)
            (videos if fmt == VIDEO else shards).append(ref)
    shards += _video_spans(videos, storage, video or VideoSpec())
    image_files = 0
    for (root, rel_dir), group in image_groups.items():
        group.sort()
        image_files += len(group)
        base = _sanitize(rel_dir) if rel_dir else "root"
        dir_uri = _join(root, rel_dir)
        chunks = [tuple(group[i : i + images_per_shard]) for i in range(0, len(group), images_per_shard)]
        for index, chunk in enumerate(chunks):
            name = base if len(chunks) == 1 else f"{base}-{index:05d}"
            fingerprint = _digest("\n".join(files[u][2] for u in chunk))
            shards.append(
                ShardRef(uri=dir_uri, format=IMAGES, name=name, files=chunk, root=root, fingerprint=fingerprint)
            )

    shards = _unique_names(sorted(shards, key=lambda s: (s.uri, s.name, s.files[:1])))
    stats = ListingStats(
        shards=len(shards),
        webdataset_shards=sum(s.format == WEBDATASET for s in shards),
        parquet_shards=sum(s.format == PARQUET for s in shards),
        image_shards=sum(s.format == IMAGES for s in shards),
        image_files=image_files,
        video_shards=sum(s.format == VIDEO for s in shards),
        video_files=len(videos),
        ignored_files=ignored,
        hidden_files=hidden,
        duplicate_files=duplicates,
        ignored_examples=tuple(examples),
    )
    return shards, stats


def _video_spans(videos: list[ShardRef], storage: StorageOptions, spec: VideoSpec) -> list[ShardRef]:
    """One shard per video, or per span of ``spec.span_seconds`` for videos at least
    ``spec.split_above_bytes`` large whose header gives a trustworthy duration."""
    large = [v for v in videos if _size(v.fingerprint) >= spec.split_above_bytes]
    with ThreadPoolExecutor(max_workers=_PROBE_THREADS) as pool:
        probed = list(pool.map(lambda v: probe_duration(v.uri, storage), large))
    durations = dict(zip((v.uri for v in large), probed, strict=True))
    out: list[ShardRef] = []
    for ref in videos:
        duration = durations.get(ref.uri)
        if not duration or duration <= spec.span_seconds:
            out.append(ref)
            continue
        spans = math.ceil(duration / spec.span_seconds)
        width = len(str(int(duration)))
        whole = float(spec.span_seconds).is_integer()
        for k in range(spans):
            start = k * spec.span_seconds
            # The last span runs to the end, whatever the header's duration says.
            end = 0.0 if k == spans - 1 else (k + 1) * spec.span_seconds
            # Spans of a fraction of a second need milliseconds to be told apart.
            label = f"{int(start):0{width}d}" if whole else f"{start:0{width + 4}.3f}"
            name = f"{ref.name}.t{label}"
            out.append(dataclasses.replace(ref, name=name, start_s=start, end_s=end))
    return out


def _size(fingerprint: str) -> int:
    size = fingerprint.split(":", 1)[0]
    return int(size) if size.isdigit() else 0


def probe_duration(uri: str, storage: StorageOptions) -> float | None:
    """A video's duration in seconds from its header (a few ranged reads), or None
    when it cannot be read or claims an absurd length: such a video is one shard."""
    import av

    from workers.video import header_duration  # here: workers.video imports this module

    fs, path = filesystem_for(uri, storage)
    try:
        with fs.open(path, "rb", block_size=256 * 1024) as f, av.open(f, metadata_errors="ignore") as container:
            streams = container.streams.video
            return header_duration(container, streams[0]) if streams else None
    except (OSError, av.error.FFmpegError, ValueError):
        return None  # the reader reports what is wrong with it, as an error row


@dataclass
class _Found:
    files: list[tuple[str, str, bool, str]]  # (file uri, root uri, hidden, fingerprint)
    hidden: int


def _expand(url: str, storage: StorageOptions) -> _Found:
    """All files ``url`` names, with the root their shard names are relative to.

    The listing's own metadata gives each file's fingerprint: no request per file.
    """
    refuse_command_url(url, "input")
    fs, path = filesystem_for(url, storage)
    # A long-lived driver may have listed this prefix before; list it afresh.
    fs.invalidate_cache()
    path = path.rstrip("/") or "/"
    out: list[tuple[str, str, bool, str]] = []
    if any(c in path for c in _GLOB_CHARS):
        root = _glob_root(path)
        matches = fs.glob(path, detail=True)
        dirs = sorted(p for p, info in matches.items() if info.get("type") == "directory")
        # Expand only the outermost matched directories: "**" matches every level.
        outer: list[str] = []
        for d in dirs:
            if not any(d == o or d.startswith(o.rstrip("/") + "/") for o in outer):
                outer.append(d)
        infos = {p: info for p, info in matches.items() if info.get("type") != "directory"}
        for d in outer:
            infos.update(fs.find(d, withdirs=False, detail=True))
        for p in sorted(infos):
            out.append((p, root, _is_hidden(p, root), _fingerprint(infos[p])))
    else:
        try:
            info = fs.info(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"input {url!r}: no such file or directory") from None
        if info.get("type") == "directory":
            root = path
            found = fs.find(path, withdirs=False, detail=True)
            for p in sorted(found):
                out.append((p, root, _is_hidden(p, root), _fingerprint(found[p])))
        else:
            # Named explicitly: read it even if its name starts with a dot.
            out.append((path, posixpath.dirname(path), False, _fingerprint(info)))
    if not out:
        raise FileNotFoundError(f"input {url!r}: matches no files")
    hidden = sum(h for _, _, h, _ in out)
    return _Found([(_uri(fs, p), _uri(fs, r), h, f) for p, r, h, f in out], hidden)


def _fingerprint(info: dict) -> str:
    """``size:version`` of one listed file: the ETag where the store gives one, else the mtime."""
    version = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or ""
    return f"{info.get('size')}:{str(version).strip(chr(34))}"


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def _uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    if "file" in protocols:
        return path  # local: a plain absolute path, however the URL spelled it
    return unstrip(fs, path)


def _glob_root(path: str) -> str:
    """The directory part of a glob before its first wildcard component."""
    parts = path.split("/")
    for i, part in enumerate(parts):
        if any(c in part for c in _GLOB_CHARS):
            return "/".join(parts[:i]) or "/"
    return posixpath.dirname(path)


def _is_hidden(path: str, root: str) -> bool:
    rel = relative_path(path, root)
    parts = rel.split("/")
    if any(part.startswith(".") for part in parts):
        return True
    base = parts[-1]
    # _SUCCESS, _metadata, _common_metadata, _committed_*: job markers, not data.
    return base.startswith("_") and format_of(base) is None


def _join(root: str, rel: str) -> str:
    return root if not rel else root.rstrip("/") + "/" + rel


def _sanitize(rel: str) -> str:
    """A partition-safe name from a relative path: ``train/0001.tar`` -> ``train_0001.tar``."""
    name = _UNSAFE_NAME_CHARS.sub("_", rel.strip("/").replace("/", "_"))
    if not name or name.startswith(".") or name.startswith("-"):
        name = "_" + name
    if len(name) > MAX_NAME_CHARS:
        digest = hashlib.sha1(rel.encode("utf-8", "surrogateescape")).hexdigest()[:10]
        name = f"{name[: MAX_NAME_CHARS - 11]}-{digest}"
    return name


def _unique_names(shards: list[ShardRef]) -> list[ShardRef]:
    """Give every shard whose name is shared a deterministic hash suffix."""
    by_name: dict[str, int] = defaultdict(int)
    for s in shards:
        by_name[s.name] += 1
    out: list[ShardRef] = []
    for s in shards:
        if by_name[s.name] > 1:
            ident = f"{s.uri}\0{s.files[:1]}"
            digest = hashlib.sha1(ident.encode("utf-8", "surrogateescape")).hexdigest()[:10]
            s = dataclasses.replace(s, name=f"{s.name}-{digest}")
        out.append(s)
    names = [s.name for s in out]
    if len(set(names)) != len(names):  # only on a SHA-1 prefix collision
        raise RuntimeError("could not give every shard a unique name")
    return out


def _suffix_list(fmt: str) -> str:
    if fmt == "auto":
        suffixes = TAR_SUFFIXES + PARQUET_SUFFIXES + IMAGE_EXTENSIONS + VIDEO_EXTENSIONS
    else:
        suffixes = _SUFFIXES[fmt]
    return ", ".join(suffixes)
