"""What the tests share besides fixtures: building inputs, reading a job's output back,
free ports and the environment of a driver subprocess.

Fixtures (the Ray cluster, the S3 server, tiny models, photos) live in ``conftest.py``;
image bytes of every kind in ``imagefactory.py``.
"""

from __future__ import annotations

import io
import json
import os
import socket
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from imagefactory import jpeg_bytes

_LINK_TYPES = {"sym": tarfile.SYMTYPE, "lnk": tarfile.LNKTYPE, "dir": tarfile.DIRTYPE, "fifo": tarfile.FIFOTYPE}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- inputs


def tar_bytes(members: list[tuple], compress: str = "") -> bytes:
    """A tar of ``members`` in order: ``(name, bytes)`` for files, ``(name, kind)`` or
    ``(name, kind, target)`` with kind ``sym``, ``lnk``, ``dir`` or ``fifo`` for the rest.
    Names are stored as given (``..`` and absolute ones too); ``compress`` is ``""``, ``gz``, ..."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=f"w:{compress}", format=tarfile.GNU_FORMAT) as tar:
        for name, data, *target in members:
            info = tarfile.TarInfo(name)
            if isinstance(data, bytes):
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                info.type = _LINK_TYPES[data]
                info.linkname = target[0] if target else ""
                tar.addfile(info)
    return buf.getvalue()


def write_file(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def write_tar(path: Path, members: list[tuple], compress: str = "") -> Path:
    return write_file(path, tar_bytes(members, compress))


def parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def photo_shards(photos: dict[str, np.ndarray], n_shards: int, per_shard: int) -> dict[str, list[tuple[str, bytes]]]:
    """WebDataset shards of real photos (each sample a different crop), some members in
    sub-folders and with upper-case extensions, each with a ``.txt`` caption."""
    names = sorted(photos)
    shards = {}
    for s in range(n_shards):
        members = []
        for i in range(per_shard):
            arr = photos[names[(s + i) % len(names)]][: 200 + 10 * i, : 240 + 7 * s]
            key = f"sub/{s:02d}{i:03d}" if i % 2 else f"{s:02d}{i:03d}"
            ext = "JPG" if i % 3 == 0 else "jpg"
            members += [(f"{key}.{ext}", jpeg_bytes(arr)), (f"{key}.txt", f"orig caption {s}-{i}".encode())]
        shards[f"shard-{s:05d}.tar"] = members
    return shards


# --------------------------------------------------------------------------- outputs


def output_table(url: str, storage_options: dict | None = None, columns: list[str] | None = None) -> pa.Table:
    """Every row a job wrote under ``url`` (local or ``s3://``), read as the README says users read it."""
    if url.startswith("s3://"):
        import s3fs

        fs = s3fs.S3FileSystem(**(storage_options or {}))
        fs.invalidate_cache()  # the listing may have been cached before the job wrote
        return pads.dataset(url[5:], format="parquet", partitioning="hive", filesystem=fs).to_table(columns=columns)
    return pads.dataset(str(url), format="parquet", partitioning="hive").to_table(columns=columns)


def read_output(url: str, storage_options: dict | None = None) -> list[dict]:
    return output_table(url, storage_options).to_pylist()


def output_ids(url: str | Path, storage_options: dict | None = None) -> list[str]:
    return output_table(str(url), storage_options, columns=["id"]).column("id").to_pylist()


def read_markers(out: Path) -> dict[str, dict]:
    """Shard name -> completion marker of a local output."""
    folder = out / "_markers"
    return {p.stem: json.loads(p.read_text()) for p in folder.glob("*.json")} if folder.exists() else {}


# --------------------------------------------------------------------------- driver processes


def driver_env(gcs_address: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a ``python -m jobs.annotate`` subprocess that joins the cluster at
    ``gcs_address``, as under ``ray job submit`` (which sets RAY_ADDRESS too)."""
    return {**os.environ, "RAY_ADDRESS": gcs_address, **(extra or {})}
