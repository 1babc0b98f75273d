"""The model stage: fidelity to the plain Hugging Face recipe, batching, error rows, schema."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image
from reference import Reference

from workers import schema
from workers.config import GenerationSpec, ModelSpec, PromptSpec
from workers.model_store import ModelLoadError, ModelUnavailableError
from workers.replica import GENERATION_FAILED, Blip2Replica, normalize_pixels, resolve_dtype

QUESTIONS = ("what is in the picture?", "how many people are there?")
GEN = GenerationSpec(max_new_tokens=16)


# --------------------------------------------------------------------------- helpers


def synthetic_images() -> dict[str, np.ndarray]:
    """Inputs unlike the photos: odd sizes and aspect ratios, grey, RGBA, noise."""
    rng = np.random.RandomState(7)
    yy, xx = np.mgrid[0:97, 0:61]
    gradient = np.stack([xx * 4, yy * 2, (xx + yy) % 256], axis=-1).astype(np.uint8)
    grey = np.asarray(Image.fromarray((rng.rand(50, 200) * 255).astype(np.uint8), mode="L").convert("RGB"))
    rgba = np.asarray(Image.fromarray((rng.rand(33, 33, 4) * 255).astype(np.uint8), mode="RGBA").convert("RGB"))
    return {"gradient": gradient, "grey": grey, "rgba": rgba, "noise": (rng.rand(300, 17, 3) * 255).astype(np.uint8)}


@pytest.fixture(scope="module")
def images(photos) -> dict[str, np.ndarray]:
    return {**photos, **synthetic_images()}


def resize_like_processor(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """What the decode stage hands the model: the processor's PIL bicubic resize, as uint8."""
    return np.asarray(Image.fromarray(rgb).convert("RGB").resize((width, height), resample=Image.BICUBIC))


def model_input_table(
    arrays: list[np.ndarray],
    height: int,
    width: int,
    status: list[str] | None = None,
    row_questions: list[list[str] | None] | None = None,
) -> pa.Table:
    """A decode-stage batch: reader columns without ``image``, plus ``pixels``/``width``/``height``."""
    from ray.data.extensions import ArrowTensorArray

    n = len(arrays)
    status = status or [schema.STATUS_OK] * n
    pixels = np.stack(
        [
            resize_like_processor(a, height, width) if s == schema.STATUS_OK else np.zeros((height, width, 3), np.uint8)
            for a, s in zip(arrays, status, strict=True)
        ]
    )
    return pa.table(
        {
            schema.ID: [f"shard-0.tar::{i:04d}" for i in range(n)],
            schema.SOURCE: ["s3://bucket/shard-0.tar"] * n,
            schema.SHARD: ["shard-0.tar"] * n,
            schema.KEY: [f"{i:04d}" for i in range(n)],
            schema.STATUS: status,
            schema.ERROR_KIND: [None if s == schema.STATUS_OK else "decode_failed" for s in status],
            schema.ERROR: [None if s == schema.STATUS_OK else "cannot identify image file" for s in status],
            schema.ROW_QUESTIONS: pa.array(row_questions or [None] * n, pa.list_(pa.string())),
            schema.PIXELS: ArrowTensorArray.from_numpy(pixels),
            schema.WIDTH: pa.array([a.shape[1] for a in arrays], pa.int32()),
            schema.HEIGHT: pa.array([a.shape[0] for a in arrays], pa.int32()),
        }
    )


@pytest.fixture(scope="module")
def references(tiny_models):
    return {flavor: Reference(path, GEN) for flavor, path in tiny_models.items()}


def make_replica(path, **prompts) -> Blip2Replica:
    return Blip2Replica(ModelSpec(model=str(path)), PromptSpec(**prompts), GEN)


# --------------------------------------------------------------------------- fidelity


def test_pixels_normalised_bit_identically(tiny_models, images, references):
    ref = references["opt"]
    replica = make_replica(tiny_models["opt"])
    for rgb in images.values():
        expected = ref.processor.image_processor(Image.fromarray(rgb), return_tensors="np")["pixel_values"]
        resized = resize_like_processor(rgb, ref.height, ref.width)[None]
        got = normalize_pixels(resized, replica.rescale_factor, replica.image_mean, replica.image_std)
        assert got.dtype == np.float32 and got.shape == expected.shape
        assert np.array_equal(got, expected)


@pytest.mark.parametrize("flavor", ["opt", "t5"])
@pytest.mark.parametrize("caption_prompt", [None, "a photo of"])
def test_fidelity_to_plain_generate(tiny_models, references, images, flavor, caption_prompt):
    """Batched replica output == processor + generate, one image and prompt at a time, token for token."""
    ref = references[flavor]
    names = sorted(images)
    arrays = [images[n] for n in names]
    replica = make_replica(tiny_models[flavor], caption_prompt=caption_prompt, questions=QUESTIONS)
    table = model_input_table(arrays, ref.height, ref.width)

    out = replica(table)  # one batch of all images: batching is exercised
    captions = out.column(schema.CAPTION).to_pylist()
    answers = out.column(schema.ANSWERS).to_pylist()

    # Token ids through the same code path __call__ uses, for a token-level comparison.
    pixels = np.stack([resize_like_processor(a, ref.height, ref.width) for a in arrays])
    pixel_values = torch.from_numpy(
        normalize_pixels(pixels, replica.rescale_factor, replica.image_mean, replica.image_std)
    )
    prompts = [caption_prompt] + [replica.prompts.question_prompt(q) for q in QUESTIONS]
    with torch.inference_mode():
        prefix = replica._image_prefix(pixel_values)
        token_ids = {p: replica._generate(prefix, [replica.prompt_ids(p)] * len(arrays)) for p in prompts}

    for i, (name, rgb) in enumerate(zip(names, arrays, strict=True)):
        text, ids = ref(rgb, caption_prompt)
        assert captions[i] == text, (flavor, name, caption_prompt)
        assert token_ids[caption_prompt][i] == ids, (flavor, name, caption_prompt)
        assert [a["question"] for a in answers[i]] == list(QUESTIONS)
        for k, question in enumerate(QUESTIONS):
            prompt = f"Question: {question} Answer:"
            text, ids = ref(rgb, prompt)
            assert answers[i][k]["answer"] == text, (flavor, name, question)
            assert token_ids[prompt][i] == ids, (flavor, name, question)

    # The comparison means something: outputs depend on the image.
    assert len(set(captions)) > len(captions) // 2, captions
    assert sum(bool(c) for c in captions) >= len(captions) // 2, captions


@pytest.mark.parametrize("flavor", ["opt", "t5"])
def test_per_row_questions(tiny_models, references, images, flavor):
    ref = references[flavor]
    names = ["astronaut", "coffee", "chelsea", "rocket", "gradient"]
    row_questions = [
        ["what is the man holding?", "is this photo taken indoors?"],
        None,
        [],
        ["what is the man holding?", "where was this picture taken, and when?", "  ", "why?"],
        ["why?"],
    ]
    arrays = [images[n] for n in names]
    replica = make_replica(tiny_models[flavor], caption=False, questions=("what color is the sky?",))
    out = replica(model_input_table(arrays, ref.height, ref.width, row_questions=row_questions))

    assert out.column(schema.CAPTION).to_pylist() == [None] * len(names)  # captioning is off
    for rgb, asked, got in zip(arrays, row_questions, out.column(schema.ANSWERS).to_pylist(), strict=True):
        expected_questions = ["what color is the sky?"] + [q for q in (asked or []) if q.strip()]
        assert [a["question"] for a in got] == expected_questions
        for item in got:
            assert item["answer"] == ref(rgb, f"Question: {item['question'].strip()} Answer:")[0]


# --------------------------------------------------------------------------- rows and schema


def test_error_rows_pass_through_and_output_schema(tiny_models, references, images):
    ref = references["opt"]
    arrays = [images["astronaut"], images["coffee"], images["chelsea"]]
    status = [schema.STATUS_OK, schema.STATUS_ERROR, schema.STATUS_OK]
    table = model_input_table(arrays, ref.height, ref.width, status=status, row_questions=[None, ["why?"], ["why?"]])
    replica = make_replica(tiny_models["opt"], questions=QUESTIONS)
    out = replica(table)

    expected_names = [c for c in table.column_names if c != schema.PIXELS] + [
        schema.CAPTION,
        schema.ANSWERS,
        schema.MODEL_ID,
        schema.MODEL_REVISION,
    ]
    assert out.column_names == expected_names
    types = {f.name: f.type for f in schema.OUTPUT_FIELDS}
    for name in out.column_names:
        if name in types:
            assert out.schema.field(name).type == types[name], name
    assert out.schema.field(schema.ANSWERS).type == pa.list_(schema.ANSWER_TYPE)

    rows = out.to_pylist()
    # Untouched: the error row keeps its status and reason, and gets no caption or answers.
    for name in (schema.ID, schema.STATUS, schema.ERROR_KIND, schema.ERROR, schema.WIDTH, schema.HEIGHT):
        assert out.column(name).to_pylist() == table.column(name).to_pylist()
    assert rows[1][schema.CAPTION] is None and rows[1][schema.ANSWERS] is None
    assert rows[0][schema.CAPTION] == ref(arrays[0], None)[0]
    assert rows[2][schema.CAPTION] == ref(arrays[2], None)[0]
    assert [a["question"] for a in rows[0][schema.ANSWERS]] == list(QUESTIONS)
    assert [a["question"] for a in rows[2][schema.ANSWERS]] == [*QUESTIONS, "why?"]
    assert {r[schema.MODEL_ID] for r in rows} == {str(tiny_models["opt"])}
    assert {r[schema.MODEL_REVISION] for r in rows} == {None}


def test_batches_without_ok_rows_skip_the_model(tiny_models, images, monkeypatch):
    replica = make_replica(tiny_models["t5"], questions=QUESTIONS)
    monkeypatch.setattr(replica, "_image_prefix", lambda *_: pytest.fail("model called for error rows"))
    table = model_input_table([images["coffee"]] * 2, replica.height, replica.width, status=["error", "error"])
    out = replica(table)
    assert out.column(schema.CAPTION).to_pylist() == [None, None]
    assert out.column(schema.STATUS).to_pylist() == ["error", "error"]

    empty = replica(table.slice(0, 0))
    assert empty.num_rows == 0
    assert schema.PIXELS not in empty.column_names and schema.CAPTION in empty.column_names


def test_generation_failure_marks_only_that_image(tiny_models, images):
    replica = make_replica(tiny_models["opt"], questions=QUESTIONS)
    arrays = [images["astronaut"], images["coffee"], images["chelsea"]]
    table = model_input_table(arrays, replica.height, replica.width)
    expected = replica(table).to_pylist()

    pixel_values = torch.from_numpy(
        normalize_pixels(
            table.column(schema.PIXELS).chunk(0).to_numpy()[1:2],
            replica.rescale_factor,
            replica.image_mean,
            replica.image_std,
        )
    )
    with torch.inference_mode():
        poisoned = replica._image_prefix(pixel_values)[0]
    real_generate = replica.model.language_model.generate
    q = replica.num_query_tokens

    def flaky_generate(**kwargs):
        embeds = kwargs["inputs_embeds"]
        if any(torch.allclose(embeds[i, :q], poisoned, atol=1e-5) for i in range(embeds.shape[0])):
            raise RuntimeError("probability tensor contains inf or nan")
        return real_generate(**kwargs)

    replica.model.language_model.generate = flaky_generate
    rows = replica(table).to_pylist()
    assert rows[1][schema.STATUS] == schema.STATUS_ERROR
    assert rows[1][schema.ERROR_KIND] == GENERATION_FAILED
    assert "inf or nan" in rows[1][schema.ERROR]
    assert rows[1][schema.CAPTION] is None and rows[1][schema.ANSWERS] is None
    assert [rows[0], rows[2]] == [expected[0], expected[2]]

    def oom(**kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    replica.model.language_model.generate = oom
    with pytest.raises(torch.cuda.OutOfMemoryError):  # a later stage splits the batch
        replica(table)


def test_pixels_at_the_wrong_size_are_a_pipeline_bug(tiny_models, images):
    replica = make_replica(tiny_models["opt"])
    table = model_input_table([images["coffee"]], replica.height * 2, replica.width)
    with pytest.raises(ValueError, match="input size"):
        replica(table)


# --------------------------------------------------------------------------- loading


def test_load_failures_raise_model_load_error(tiny_models, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_models["opt"], broken)
    (broken / "model.safetensors").write_bytes(b"\0" * 64)
    with pytest.raises(ModelLoadError, match="cannot load BLIP-2"):
        make_replica(broken)

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_models["opt"], pickled)
    (pickled / "model.safetensors").unlink()
    (pickled / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ModelUnavailableError, match="pickle"):
        make_replica(pickled)


def test_dtype_and_device_on_cpu(tiny_models):
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    replica = make_replica(tiny_models["t5"])
    if not torch.cuda.is_available():
        assert replica.device.type == "cpu"
        assert next(replica.model.parameters()).dtype == torch.float32
    assert not replica.model.training


@pytest.mark.slow
def test_runs_as_a_ray_data_actor_stage(ray_cluster, tiny_models, images):
    import ray

    replica_kwargs = {
        "model": ModelSpec(model=str(tiny_models["t5"])),
        "prompts": PromptSpec(questions=QUESTIONS),
        "generation": GEN,
    }
    direct = Blip2Replica(**replica_kwargs)
    names = sorted(images)
    table = model_input_table([images[n] for n in names], direct.height, direct.width)
    expected = direct(table)

    ds = ray.data.from_arrow(table).map_batches(
        Blip2Replica,
        batch_format="pyarrow",
        batch_size=3,
        fn_constructor_kwargs=replica_kwargs,
        concurrency=1,
        num_cpus=1,
    )
    got = pa.concat_tables(ray.get(ds.to_arrow_refs())).sort_by(schema.ID)
    assert got.column(schema.CAPTION).to_pylist() == expected.column(schema.CAPTION).to_pylist()
    assert got.column(schema.ANSWERS).to_pylist() == expected.column(schema.ANSWERS).to_pylist()
