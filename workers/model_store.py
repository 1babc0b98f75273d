"""Where BLIP-2 weights come from, and getting them onto a node once.

``ModelSpec.model`` names one of:

* ``tiny-random`` / ``tiny-random-opt`` / ``tiny-random-t5``: a tiny random
  model (:mod:`workers.tiny_model`) built once into the cache directory, for
  offline smoke tests;
* a local directory (or ``file://`` URL) in Hugging Face layout;
* an fsspec URL prefix (``s3://bucket/models/blip2-opt-2.7b``), copied once per
  node into ``<cache>/<sha256(url@revision)>/``;
* a Hugging Face Hub repository id, fetched with ``snapshot_download``.

Only safetensors weights are ever fetched or accepted: pickle checkpoints
(``pytorch_model.bin``, ``*.pt``) can run code when loaded and are refused.

:func:`check_model_reachable` is what the driver calls before any Ray work
starts, so an unreachable model fails the job in seconds, with the fix in the
message, instead of after every replica has timed out.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from workers.config import TINY_MODEL_NAMES, ModelSpec, StorageOptions
from workers.storage import filesystem_for, is_local, protocol_of

# Files a BLIP-2 checkpoint needs: configs, safetensors weights, tokenizer files.
ALLOW_PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*")
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt")
COMPLETE_MARKER = ".complete"
# How long the driver's reachability check may take, all probes together.
PROBE_TIMEOUT_S = 20.0
# Per-request timeouts for the driver's probes of the Hub and of object storage.
HUB_ETAG_TIMEOUT_S = 5.0
S3_CONNECT_TIMEOUT_S = 5
S3_READ_TIMEOUT_S = 10

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")

T = TypeVar("T")


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says why and what to do."""


class ModelUnavailableError(ModelLoadError):
    """The model's files cannot be found or fetched, or are not acceptable (pickle only)."""


# --------------------------------------------------------------------------- kinds


def model_kind(model: str) -> str:
    """``"tiny"``, ``"local"``, ``"remote"`` (fsspec URL) or ``"hub"``."""
    if model in TINY_MODEL_NAMES:
        return "tiny"
    if "://" in model:
        return "local" if is_local(model) else "remote"
    path = Path(model).expanduser()
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1:
        return "local"
    if _HUB_ID.match(model):
        return "hub"
    return "local"


def tiny_flavor(model: str) -> str:
    return "t5" if model == "tiny-random-t5" else "opt"


def default_cache_root() -> Path:
    """Per-node cache when neither the spec nor the caller names one."""
    return Path(tempfile.gettempdir()) / "blip2-annotate-models"


def _cache_root(spec: ModelSpec, cache_root: str | None) -> Path:
    root = spec.cache_dir or cache_root
    return Path(root).expanduser() if root else default_cache_root()


def _local_path(model: str) -> Path:
    if model.startswith("file://"):
        model = model[len("file://") :]
    return Path(model).expanduser()


def _hub_fix(repo_id: str) -> str:
    return (
        f"{repo_id!r} is not a local directory either; download it on a machine with network "
        f"(`hf download {repo_id} --local-dir DIR`; the safetensors, config and tokenizer "
        "files are enough), then pass --model DIR, or copy DIR to object storage and pass "
        "--model s3://bucket/prefix; or run an offline smoke test with --model tiny-random"
    )


# --------------------------------------------------------------------------- validation


def _names(files: list[str]) -> list[str]:
    return [posix_basename(f) for f in files]


def posix_basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in patterns)


def _check_files(where: str, names: list[str]) -> None:
    """Raise :class:`ModelUnavailableError` unless ``names`` look like a safetensors BLIP-2 checkpoint."""
    if "config.json" not in names:
        raise ModelUnavailableError(
            f"{where} is not a Hugging Face model directory: it has no config.json "
            f"(found {sorted(names)[:10]}); pass a directory written by save_pretrained or "
            "`hf download REPO --local-dir DIR`"
        )
    if not any(n.endswith(".safetensors") for n in names):
        pickles = sorted(n for n in names if _matches(n, PICKLE_PATTERNS))
        if pickles:
            raise ModelUnavailableError(
                f"{where} has only pickle weights ({', '.join(pickles[:3])}), which are refused because loading "
                "them can run arbitrary code; convert them to safetensors (load with transformers and "
                "`save_pretrained(DIR, safe_serialization=True)` on a trusted machine) or download the "
                "checkpoint's *.safetensors files"
            )
        raise ModelUnavailableError(f"{where} has no *.safetensors weights")
    if "preprocessor_config.json" not in names and "processor_config.json" not in names:
        raise ModelUnavailableError(
            f"{where} has no preprocessor_config.json (the image processor settings); "
            "save the Blip2Processor next to the weights (`processor.save_pretrained(DIR)`)"
        )


def _local_names(path: Path) -> list[str]:
    return [p.name for p in path.iterdir() if p.is_file()]


def validate_model_dir(path: Path, where: str | None = None) -> Path:
    """Check that ``path`` is a directory holding a safetensors checkpoint; return it."""
    where = where or f"model directory {str(path)!r}"
    if not path.is_dir():
        raise ModelUnavailableError(
            f"{where} does not exist or is not a directory; pass a local model directory, an s3:// prefix, "
            "a Hugging Face Hub id, or tiny-random"
        )
    _check_files(where, _local_names(path))
    return path


# --------------------------------------------------------------------------- image settings


def image_settings(preprocessor: dict[str, Any]) -> dict[str, int]:
    """``{"height", "width", "resample"}`` from a (pre)processor config dict."""
    if "image_processor" in preprocessor and isinstance(preprocessor["image_processor"], dict):
        preprocessor = preprocessor["image_processor"]
    size = preprocessor.get("size", {"height": 224, "width": 224})
    if isinstance(size, int):
        height = width = size
    elif isinstance(size, dict) and "height" in size and "width" in size:
        height, width = int(size["height"]), int(size["width"])
    elif isinstance(size, dict) and "shortest_edge" in size:
        # BLIP's processors resize to a square (default_to_square=True).
        height = width = int(size["shortest_edge"])
    elif isinstance(size, (list, tuple)) and len(size) == 2:
        height, width = int(size[0]), int(size[1])
    else:
        raise ModelUnavailableError(f"preprocessor config has an unsupported size {size!r}")
    resample = int(preprocessor.get("resample", 3))
    return {"height": height, "width": width, "resample": resample}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelUnavailableError(f"cannot read {path}: {exc}") from exc


def _preprocessor_of(model_dir: Path) -> dict[str, Any]:
    pre = model_dir / "preprocessor_config.json"
    if pre.is_file():
        return _read_json(pre)
    return _read_json(model_dir / "processor_config.json")


def _describe(config: dict[str, Any], preprocessor: dict[str, Any]) -> dict[str, Any]:
    model_type = config.get("model_type")
    if model_type != "blip-2":
        raise ModelUnavailableError(
            f"expected a BLIP-2 checkpoint (model_type 'blip-2'), got model_type {model_type!r}"
        )
    info: dict[str, Any] = dict(image_settings(preprocessor))
    info["model_type"] = model_type
    info["text_model_type"] = (config.get("text_config") or {}).get("model_type", "opt")
    return info


def describe_model_dir(model_dir: Path) -> dict[str, Any]:
    """What the decode stage and the summary need to know about a local checkpoint."""
    return _describe(_read_json(model_dir / "config.json"), _preprocessor_of(model_dir))


# --------------------------------------------------------------------------- locking


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path``: one holder per node, across processes and threads."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _once(target: Path, build: Callable[[Path], None]) -> Path:
    """Create ``target`` with ``build(tmp_dir)`` exactly once per node.

    A lock file serialises concurrent callers; a marker written after the
    atomic rename tells later callers the copy is complete, so a crash
    mid-fetch leaves no half-copied directory that looks finished.
    """
    marker = target.parent / f"{target.name}{COMPLETE_MARKER}"
    if marker.exists() and target.is_dir():
        return target
    with _file_lock(target.parent / f"{target.name}.lock"):
        if marker.exists() and target.is_dir():
            return target
        tmp = target.parent / f"{target.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            build(tmp)
            if target.exists():
                shutil.rmtree(target)  # an earlier, interrupted attempt
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        marker.write_text("ok\n")
    return target


# --------------------------------------------------------------------------- fetching


def _remote_fs(url: str, storage: StorageOptions, probe: bool = False):
    if probe and protocol_of(url) in ("s3", "s3a"):
        from fsspec.core import url_to_fs

        options = storage.fsspec_options()
        options["config_kwargs"] = {
            "connect_timeout": S3_CONNECT_TIMEOUT_S,
            "read_timeout": S3_READ_TIMEOUT_S,
            "retries": {"max_attempts": 2, "mode": "standard"},
        }
        options["skip_instance_cache"] = True
        return url_to_fs(url, **options)
    return filesystem_for(url, storage)


def _remote_listing(fs, root: str) -> dict[str, str]:
    """``{relative path: full path}`` of the checkpoint files under ``root``."""
    root = root.rstrip("/")
    files: dict[str, str] = {}
    for full in fs.find(root):
        rel = full[len(root) :].lstrip("/") if full.startswith(root) else posix_basename(full)
        if not rel or any(part.startswith(".") for part in rel.split("/")):
            continue
        files[rel] = full
    return files


def _fetch_prefix(url: str, storage: StorageOptions, dest: Path) -> None:
    """Copy the safetensors checkpoint under ``url`` into the (new) directory ``dest``."""
    fs, root = filesystem_for(url, storage)
    listing = _remote_listing(fs, root)
    top_level = [rel for rel in listing if "/" not in rel]
    _check_files(f"model prefix {url!r}", top_level)
    dest.mkdir(parents=True)
    for rel, full in sorted(listing.items()):
        if not _matches(posix_basename(rel), ALLOW_PATTERNS):
            continue
        local = dest / rel
        local.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(full, str(local))


def _remote_target(spec: ModelSpec, root: Path) -> Path:
    key = hashlib.sha256(f"{spec.model.rstrip('/')}@{spec.revision or ''}".encode()).hexdigest()[:24]
    return root / key


def _tiny_target(spec: ModelSpec, root: Path) -> Path:
    return root / f"tiny-random-{tiny_flavor(spec.model)}"


def resolve_model_dir(spec: ModelSpec, storage: StorageOptions, cache_root: str | None = None) -> Path:
    """A local directory holding the checkpoint ``spec`` names, fetching it first if needed.

    Safe to call from many replicas on one node at once: remote copies and the
    tiny model are made once per node (``spec.cache_dir`` or ``cache_root``).
    Raises :class:`ModelUnavailableError` with the fix in its message.
    """
    kind = model_kind(spec.model)
    if kind == "local":
        return validate_model_dir(_local_path(spec.model).resolve())
    root = _cache_root(spec, cache_root)
    if kind == "tiny":
        from workers.tiny_model import build_tiny_blip2

        flavor = tiny_flavor(spec.model)
        root.mkdir(parents=True, exist_ok=True)
        return _once(_tiny_target(spec, root), lambda tmp: build_tiny_blip2(tmp, flavor=flavor))
    if kind == "remote":
        root.mkdir(parents=True, exist_ok=True)
        try:
            target = _once(_remote_target(spec, root), lambda tmp: _fetch_prefix(spec.model, storage, tmp))
        except ModelUnavailableError:
            raise
        except Exception as exc:
            raise ModelUnavailableError(
                f"cannot copy model from {spec.model!r}: {type(exc).__name__}: {exc}; check the URL, "
                "the storage endpoint/credentials, and that the prefix holds config.json, "
                "preprocessor_config.json, the tokenizer files and *.safetensors"
            ) from exc
        return validate_model_dir(target, f"model copied from {spec.model!r}")
    return _hub_snapshot(spec, root if (spec.cache_dir or cache_root) else None)


def _hub_snapshot(spec: ModelSpec, cache_root: Path | None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(
            spec.model,
            revision=spec.revision,
            allow_patterns=list(ALLOW_PATTERNS),
            cache_dir=str(cache_root / "hub") if cache_root else None,
        )
    except Exception as exc:
        raise ModelUnavailableError(
            f"cannot fetch {spec.model!r} from the Hugging Face Hub ({type(exc).__name__}: {exc}): "
            + _hub_fix(spec.model)
        ) from exc
    return validate_model_dir(Path(path), f"Hub snapshot of {spec.model!r}")


def model_revision(model_dir: Path, spec: ModelSpec) -> str | None:
    """The revision to record in output rows.

    For Hub snapshots, the commit hash the snapshot resolved to (so a branch
    name like ``main`` is pinned in the output); otherwise ``spec.revision``.
    """
    name = Path(model_dir).name
    if Path(model_dir).parent.name == "snapshots" and _COMMIT.match(name):
        return name
    return spec.revision


# --------------------------------------------------------------------------- driver check


def _with_deadline(fn: Callable[[], T], seconds: float, what: str, fix: str) -> T:
    """Run ``fn`` in a daemon thread; raise :class:`ModelUnavailableError` if it takes longer than ``seconds``."""
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            result["error"] = exc

    thread = threading.Thread(target=target, name="model-probe", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise ModelUnavailableError(f"{what}: no answer within {seconds:.0f} s (offline?): {fix}")
    if "error" in result:
        raise result["error"]
    return result["value"]


def _hub_reachable(timeout_s: float = HUB_ETAG_TIMEOUT_S) -> str | None:
    """``None`` if the Hub answers one request (any status), else why not.

    One request, no retries: ``hf_hub_download`` retries connection errors
    with backoff for tens of seconds, which is what this check must avoid.
    Goes through huggingface_hub's own HTTP client, so proxies and a custom
    ``HF_ENDPOINT`` apply.
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    try:
        get_session().head(constants.ENDPOINT, timeout=timeout_s)
    except Exception as exc:  # connect errors, DNS failures, timeouts
        return f"{constants.ENDPOINT} is unreachable ({type(exc).__name__}: {exc})"
    return None


def _check_hub(spec: ModelSpec, deadline_s: float) -> dict[str, Any]:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    fix = _hub_fix(spec.model)
    offline_reason: list[str | None] = [None]

    def fetch(filename: str) -> Path:
        return Path(
            hf_hub_download(
                spec.model,
                filename,
                revision=spec.revision,
                cache_dir=str(Path(spec.cache_dir).expanduser() / "hub") if spec.cache_dir else None,
                etag_timeout=HUB_ETAG_TIMEOUT_S,
                # Offline, a copy already in the local Hugging Face cache still works.
                local_files_only=offline_reason[0] is not None,
            )
        )

    def probe() -> dict[str, Any]:
        offline_reason[0] = _hub_reachable()
        config_path = fetch("config.json")
        try:
            pre_path = fetch("preprocessor_config.json")
        except EntryNotFoundError:  # newer layouts keep the image processor in processor_config.json
            pre_path = fetch("processor_config.json")
        info = _describe(_read_json(config_path), _read_json(pre_path))
        info["revision"] = model_revision(config_path.parent, spec)
        return info

    try:
        return _with_deadline(probe, deadline_s, f"cannot fetch {spec.model!r} from the Hugging Face Hub", fix)
    except ModelUnavailableError:
        raise
    except Exception as exc:
        reason = offline_reason[0] or f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        raise ModelUnavailableError(
            f"cannot fetch {spec.model!r} from the Hugging Face Hub (offline? {reason}) "
            f"and it is not in the local Hugging Face cache: {fix}"
        ) from exc


def _check_remote(spec: ModelSpec, storage: StorageOptions, deadline_s: float) -> dict[str, Any]:
    fix = (
        "check the URL, the endpoint (--s3-endpoint) and credentials, and that the prefix holds "
        "config.json, preprocessor_config.json, the tokenizer files and *.safetensors"
    )

    def probe() -> dict[str, Any]:
        fs, root = _remote_fs(spec.model, storage, probe=True)
        root = root.rstrip("/")
        names = _names(fs.ls(root, detail=False))
        _check_files(f"model prefix {spec.model!r}", names)
        config = json.loads(fs.cat_file(f"{root}/config.json"))
        pre_name = "preprocessor_config.json" if "preprocessor_config.json" in names else "processor_config.json"
        preprocessor = json.loads(fs.cat_file(f"{root}/{pre_name}"))
        info = _describe(config, preprocessor)
        info["revision"] = spec.revision
        return info

    try:
        return _with_deadline(probe, deadline_s, f"cannot reach model prefix {spec.model!r}", fix)
    except ModelUnavailableError:
        raise
    except FileNotFoundError as exc:
        raise ModelUnavailableError(f"model prefix {spec.model!r} does not exist: {fix}") from exc
    except Exception as exc:
        raise ModelUnavailableError(
            f"cannot read model prefix {spec.model!r} ({type(exc).__name__}: {exc}): {fix}"
        ) from exc


def check_model_reachable(spec: ModelSpec, storage: StorageOptions, timeout_s: float = PROBE_TIMEOUT_S) -> dict:
    """Fail fast, on the driver, if the model cannot be had; fetch nothing big.

    Returns ``{"height", "width", "resample", "model_type", "text_model_type",
    "revision"}``: the image size and resampling filter the decode stage must
    resize to (from the checkpoint's preprocessor config), and the revision to
    pin (for the Hub, the commit the revision resolved to when it is known).
    Raises :class:`ModelUnavailableError`, whose message names the fix, within
    about ``timeout_s`` seconds.
    """
    kind = model_kind(spec.model)
    if kind == "tiny":
        from workers import tiny_model

        return {
            "height": tiny_model.IMAGE_SIZE,
            "width": tiny_model.IMAGE_SIZE,
            "resample": 3,
            "model_type": "blip-2",
            "text_model_type": tiny_flavor(spec.model),
            "revision": spec.revision,
        }
    if kind == "local":
        path = validate_model_dir(_local_path(spec.model).resolve())
        info = describe_model_dir(path)
        info["revision"] = spec.revision
        return info
    if kind == "remote":
        return _check_remote(spec, storage, timeout_s)
    return _check_hub(spec, timeout_s)
