"""One code path for local paths, ``file://`` and ``s3://`` (and anything fsspec reaches).

Every read and write in the project goes through :func:`filesystem_for`, so a
test against a local directory exercises the same code as a run against S3.
"""

from __future__ import annotations

import posixpath
from typing import Any

import fsspec
from fsspec.core import url_to_fs

from workers.config import StorageOptions


def protocol_of(url: str) -> str:
    """``"s3"`` for ``s3://b/k``, ``"file"`` for local paths."""
    if "://" not in url:
        return "file"
    return url.split("://", 1)[0].lower()


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
