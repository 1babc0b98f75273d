"""Flags + YAML -> one frozen, validated AnnotateConfig (jobs/settings.py, workers/config.py)."""

from __future__ import annotations

import dataclasses

import pytest

from jobs.settings import build_config, config_from_argv
from workers.config import AnnotateConfig, ConfigError


def test_flags_build_typed_config():
    cfg = config_from_argv(
        [
            "--input", "s3://b/shards/", "/data/more/*.tar",
            "--output", "s3://b/out/",
            "--questions", "What is shown?", "How many people?",
            "--caption-prompt", "a photo of",
            "--batch-size", "8",
            "--replicas", "1:4",
            "--gpus-per-replica", "0.5",
            "--dtype", "bfloat16",
            "--endpoint-url", "http://127.0.0.1:9000",
        ]
    )  # fmt: skip
    assert cfg.input.urls == ("s3://b/shards/", "/data/more/*.tar")
    assert cfg.output.url == "s3://b/out/"
    assert cfg.prompts.questions == ("What is shown?", "How many people?")
    assert cfg.prompts.caption_prompt == "a photo of"
    assert cfg.resources.batch_size == 8
    assert (cfg.resources.replicas_min, cfg.resources.replicas_max) == (1, 4)
    assert cfg.resources.gpus_per_replica == 0.5
    assert cfg.model.dtype == "bfloat16"
    assert cfg.storage.endpoint_url == "http://127.0.0.1:9000"


def test_fast_path_settings_from_flags_and_yaml(tmp_path):
    cfg = config_from_argv(["--input", "a", "--output", "b"])
    assert (cfg.decode.mode, cfg.model.generation_batch, cfg.model.compile) == ("fast", None, False)
    # No batch size given: the default follows where the replicas run.
    assert (cfg.resources.model_batch_size(0.0), cfg.resources.model_batch_size(1.0)) == (128, 256)
    cfg = config_from_argv(
        ["--input", "a", "--output", "b", "--decode-mode", "exact", "--generation-batch", "32", "--compile",
         "--batch-size", "24"]
    )  # fmt: skip
    assert (cfg.decode.mode, cfg.model.generation_batch, cfg.model.compile) == ("exact", 32, True)
    assert cfg.resources.model_batch_size(1.0) == 24
    path = tmp_path / "job.yaml"
    path.write_text("input: [a]\noutput: b\ndecode_mode: exact\ncompile: true\ngeneration_batch: 8\n")
    cfg = config_from_argv(["--config", str(path)])
    assert (cfg.decode.mode, cfg.model.generation_batch, cfg.model.compile) == ("exact", 8, True)
    assert config_from_argv(["--config", str(path), "--no-compile"]).model.compile is False  # the flag wins


def test_config_is_frozen():
    cfg = config_from_argv(["--input", "a", "--output", "b"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.resources.batch_size = 3  # type: ignore[misc]


def test_yaml_file_then_flags_override(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(
        "input: [s3://b/in/]\noutput: s3://b/out/\nbatch_size: 32\n"
        "questions: ['What colour is it?']\nmodel: tiny-random\nmax_new_tokens: 12\n"
    )
    cfg = config_from_argv(["--config", str(path), "--batch-size", "4"])
    assert cfg.resources.batch_size == 4  # flag wins
    assert cfg.generation.max_new_tokens == 12  # file value kept
    assert cfg.prompts.questions == ("What colour is it?",)
    assert cfg.model.model == "tiny-random"


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"bach_size": 3}, "bach_size: unknown setting (did you mean 'batch_size'?)"),
        ({"batch_size": 0}, "batch_size: must be >= 1"),
        ({"batch_size": "many"}, "batch_size: expected an integer"),
        ({"dtype": "float8"}, "dtype: must be one of"),
        ({"replicas_min": 3, "replicas_max": 2}, "replicas_max: must be >= replicas_min"),
        ({"question_template": "Q: A:"}, "question_template: must contain '{q}'"),
        ({"input_format": "zip"}, "input_format: must be one of"),
        ({"caption": False}, "caption: nothing to do"),
        ({"min_new_tokens": 50}, "min_new_tokens: must be between"),
        ({"gpus_per_replica": -1}, "gpus_per_replica: must be >= 0"),
        ({"decode_mode": "quick"}, "decode_mode: must be one of"),
        ({"generation_batch": 0}, "generation_batch: must be >= 1"),
        ({"compile": "yes"}, "compile: expected true or false"),
    ],
)
def test_bad_values_name_the_field(settings, field):
    base = {"input": ["in/"], "output": "out/"}
    with pytest.raises(ConfigError) as err:
        build_config({**base, **settings})
    assert str(err.value).startswith(field)


def test_missing_input_and_output_are_named():
    with pytest.raises(ConfigError, match="^input: "):
        build_config({"output": "o"})
    with pytest.raises(ConfigError, match="^output: "):
        build_config({"input": ["i"]})


def test_command_running_shard_schemes_are_refused():
    with pytest.raises(ConfigError, match="^input: .*command-running"):
        build_config({"input": ["pipe:curl -s http://x/a.tar"], "output": "o"})


def test_yaml_must_be_a_mapping(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="^config: .*mapping"):
        config_from_argv(["--config", str(path)])


def test_summary_dict_round_trips_without_secrets():
    cfg = build_config({"input": ["s3://b/i/"], "output": "s3://b/o/", "endpoint_url": "http://127.0.0.1:1"})
    d = cfg.to_dict()
    assert d["storage"]["endpoint_url"] == "http://127.0.0.1:1"
    assert (d["input"]["urls"], d["output"]["url"], d["storage"]["anon"]) == (("s3://b/i/",), "s3://b/o/", False)
    assert AnnotateConfig(**{k: type(getattr(cfg, k))(**v) for k, v in d.items()}) == cfg  # round trip
    flat = repr(d).lower()
    assert "secret" not in flat and "access_key" not in flat


def test_readme_documents_every_setting():
    from pathlib import Path

    from jobs.settings import SETTINGS

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    missing = [name for name in SETTINGS if f"`{name}`" not in readme]
    assert missing == []


def test_local_output_becomes_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert build_config({"input": ["i"], "output": "out/x"}).output.url == str(tmp_path / "out" / "x")
    assert build_config({"input": ["i"], "output": "s3://b/o"}).output.url == "s3://b/o"
