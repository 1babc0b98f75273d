"""One code path for local paths, ``file://`` and ``s3://`` (and anything fsspec reaches).

Every read and write in the project goes through :func:`filesystem_for`, so a
test against a local directory exercises the same code as a run against S3.
This module is also the one home of the project's rules about URLs: which
schemes are refused, what counts as local, and how a path is named relative
to its input root.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import fsspec
from fsspec.core import split_protocol, url_to_fs
from fsspec.implementations.local import LocalFileSystem

if TYPE_CHECKING:  # config imports this module for refuse_command_url
    from workers.config import StorageOptions

# URL schemes that run commands (WebDataset's "pipe:") or are otherwise not
# plain storage: refused before anything is read or written.
COMMAND_SCHEMES = ("pipe:", "exec:", "shell:")
_GLOB_CHARS = ("*", "?", "[")


class UnsafeURLError(ValueError):
    """A URL uses a command-running scheme."""


def refuse_command_url(url: str, what: str) -> None:
    """Raise :class:`UnsafeURLError` (a ``ValueError``) naming ``what`` when ``url`` would run a command.

    Leading whitespace does not hide the scheme (``" pipe:cat x"`` is refused too).
    """
    if url.strip().lower().startswith(COMMAND_SCHEMES):
        raise UnsafeURLError(f"{what}: {url!r} uses a command-running scheme, which is refused")


def protocol_of(url: str) -> str:
    """``"s3"`` for ``s3://b/k``, ``"file"`` for local paths."""
    if "://" not in url:
        return "file"
    return url.split("://", 1)[0].lower()


def is_local(url: str) -> bool:
    """Whether ``url`` is on local disk (a plain path or ``file://``): writes there need temp file + rename."""
    return protocol_of(url) in ("file", "local")


def filesystem_for(url: str, storage: StorageOptions) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return ``(filesystem, path-within-it)`` for ``url``.

    S3-style URLs get the endpoint/region from ``storage``; credentials come
    from the AWS default chain.  Raises ``ValueError`` for an unknown protocol
    (with fsspec's message naming it).
    """
    options: dict[str, Any] = {}
    if protocol_of(url) in ("s3", "s3a"):
        options = storage.fsspec_options()
    fs, path = url_to_fs(url, **options)
    return fs, path


def unstrip(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Turn a filesystem path back into a full URL (``bucket/k`` -> ``s3://bucket/k``)."""
    return fs.unstrip_protocol(path)


def join(url: str, *parts: str) -> str:
    """Join URL path segments with ``/`` on every platform and protocol."""
    return posixpath.join(url.rstrip("/"), *parts)


def relative_path(path: str, root: str) -> str:
    """``path`` relative to ``root`` (``s3://b/in/a/x.jpg`` under ``s3://b/in`` -> ``a/x.jpg``).

    A path outside ``root`` (a file named explicitly) is named by its basename.
    """
    prefix = root.rstrip("/") + "/"
    return path[len(prefix) :] if path.startswith(prefix) else posixpath.basename(path)


def _components(url: str) -> tuple[str, ...] | None:
    """``url`` as ``(protocol, segment, ...)``, or None for a chained URL (``a::b``), which is never compared.

    Local paths, ``file://`` and ``local://`` become the absolute path fsspec opens (relative
    paths and ``~`` resolved as fsspec resolves them), so every spelling agrees; other URLs keep
    their bucket or host and key as written (``s3a`` is ``s3``).  Empty and ``.`` segments drop out.
    """
    if "::" in url:
        return None
    protocol, path = split_protocol(url)
    protocol = (protocol or "file").lower()
    if protocol in ("file", "local"):
        protocol, path = "file", LocalFileSystem._strip_protocol(url)
    elif protocol == "s3a":
        protocol = "s3"
    return (protocol, *(part for part in path.split("/") if part not in ("", ".")))


def input_root(url: str) -> str:
    """The location an input URL reads from, spelled as the listing spells its files.

    ``file://in/`` -> ``/abs/in``, ``s3a://b/in/`` -> ``s3://b/in``, a glob -> the folder before its
    first wildcard; a chained URL (``a::b``) is returned as is and holds nothing (:func:`is_under`).
    """
    parts = _components(url)
    if parts is None:
        return url
    protocol, segments = parts[0], list(parts[1:])
    for i, part in enumerate(segments):
        if any(c in part for c in _GLOB_CHARS):
            del segments[i:]
            break
    return "/" + "/".join(segments) if protocol == "file" else f"{protocol}://" + "/".join(segments)


# The --allow-source flag of the commands that make pages (jobs.report, jobs.search query --html).
ALLOW_SOURCE_HELP = (
    "also read thumbnails from under PREFIX (repeatable); otherwise only from under the inputs the "
    "job's _manifest.json records, or without one, from under OUTPUT_URL"
)


def is_under(url: str, roots: Iterable[str]) -> bool:
    """Whether ``url`` is one of ``roots`` or inside one, compared segment by segment.

    So ``/data/in`` holds ``file:///data/in/a.jpg`` but not ``/data/in-other/a.jpg``, ``s3://b/in``
    holds nothing in another bucket, and a ``..`` below a root (also ``%2e%2e``) is never inside
    it: the path is not resolved, so a symlink in the root cannot lead ``..`` out of it.
    False for a chained URL and for a protocol no root uses.
    """
    parts = _components(url)
    if parts is None:
        return False
    for root in roots:
        base = _components(root)
        if base is not None and parts[: len(base)] == base:
            if not any(unquote(part) == ".." for part in parts[len(base) :]):
                return True
    return False
