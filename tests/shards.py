"""Building WebDataset shards for tests."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """An uncompressed tar holding ``(name, data)`` members in order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.write_bytes(tar_bytes(members))
    return path
