"""The model stage: fidelity to the plain Hugging Face recipe, batching, error rows, schema."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image
from ray.data import ActorPoolStrategy
from reference import Reference

from workers import schema
from workers.config import GenerationSpec, ModelSpec, PromptSpec
from workers.decode import pixels_from_table
from workers.model_store import ModelLoadError, ModelUnavailableError
from workers.replica import (
    CPU_GENERATION_BATCH,
    GPU_MAX_GENERATION_BATCH,
    Blip2Replica,
    FastPath,
    generation_chunk,
    is_out_of_memory,
    make_normalizer,
    normalization_table,
    normalize_pixels,
    normalize_with_table,
    padded_batch,
    resolve_dtype,
    usable_gpu_bytes,
)

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

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


def make_replica(
    path, fast: FastPath | None = None, generation: GenerationSpec = GEN, device: str = "cpu", **prompts
) -> Blip2Replica:
    """A replica on the CPU in float32 (what the fidelity tests compare), unless ``device`` says otherwise."""
    return Blip2Replica(ModelSpec(model=str(path)), PromptSpec(**prompts), generation, fast=fast, device=device)


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


GENERATION_VARIANTS = {
    "beams": GenerationSpec(max_new_tokens=8, num_beams=3),
    "beams-length-penalty": GenerationSpec(max_new_tokens=8, num_beams=3, length_penalty=0.4),
    "repetition-penalty": GenerationSpec(max_new_tokens=8, repetition_penalty=1.3),
    # The tiny OPT ends its rocket caption after 4 tokens and answer after 2: a minimum of 6 changes them.
    "min-new-tokens": GenerationSpec(max_new_tokens=8, min_new_tokens=6),
}


@pytest.mark.parametrize("flavor", ["opt", "t5"])
@pytest.mark.parametrize("variant", sorted(GENERATION_VARIANTS))
def test_generation_settings_beyond_greedy_match_plain_generate(tiny_models, images, flavor, variant):
    """Beam search (which switches the prefix cache off), penalties and min_new_tokens == the plain recipe's text."""
    generation = GENERATION_VARIANTS[variant]
    ref = Reference(tiny_models[flavor], generation)
    names = sorted(images)
    arrays = [images[n] for n in names]
    replica = make_replica(tiny_models[flavor], generation=generation, questions=QUESTIONS[:1])
    out = replica(model_input_table(arrays, ref.height, ref.width))
    captions = out.column(schema.CAPTION).to_pylist()
    answers = out.column(schema.ANSWERS).to_pylist()
    greedy = Reference(tiny_models[flavor], GenerationSpec(max_new_tokens=8))
    question = f"Question: {QUESTIONS[0]} Answer:"
    differs = 0
    for i, rgb in enumerate(arrays):
        caption, answer = ref(rgb, None)[0], ref(rgb, question)[0]
        assert captions[i] == caption, (flavor, variant, names[i])
        assert answers[i][0]["answer"] == answer, (flavor, variant, names[i])
        differs += (caption, answer) != (greedy(rgb, None)[0], greedy(rgb, question)[0])
    # The tiny T5 never ends within 8 tokens, so a minimum length cannot change its output.
    if not (variant == "min-new-tokens" and flavor == "t5"):
        assert differs, f"{variant} gives greedy's output on every image: the comparison would show nothing"


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
    assert rows[1][schema.ERROR_KIND] == schema.GENERATION_FAILED
    assert "inf or nan" in rows[1][schema.ERROR]
    assert rows[1][schema.CAPTION] is None and rows[1][schema.ANSWERS] is None
    assert [rows[0], rows[2]] == [expected[0], expected[2]]

    def oom(**kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    # Out of memory even one image at a time: every image becomes an out_of_memory
    # error row (nothing raised, nothing dropped), not a generation_failed one.
    replica.model.language_model.generate = oom
    rows = replica(table).to_pylist()
    assert [r[schema.ID] for r in rows] == table.column(schema.ID).to_pylist()
    assert {r[schema.STATUS] for r in rows} == {schema.STATUS_ERROR}
    assert {r[schema.ERROR_KIND] for r in rows} == {schema.OUT_OF_MEMORY}
    assert all("out of memory" in r[schema.ERROR] for r in rows)


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
        "device": "cpu",
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
        compute=ActorPoolStrategy(size=1),
        num_cpus=1,
    )
    got = pa.concat_tables(ray.get(ds.to_arrow_refs())).sort_by(schema.ID)
    assert got.column(schema.CAPTION).to_pylist() == expected.column(schema.CAPTION).to_pylist()
    assert got.column(schema.ANSWERS).to_pylist() == expected.column(schema.ANSWERS).to_pylist()


# --------------------------------------------------------------------------- out of memory


def test_is_out_of_memory():
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert is_out_of_memory(
        RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
    )
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("probability tensor contains inf or nan"))
    assert not is_out_of_memory(ValueError("out of memory"))  # only the error types allocators raise


class _Limit:
    """Wraps a model call: raises an out-of-memory error whenever its batch exceeds ``limit``."""

    def __init__(self, real, limit: int, batch_of, error=torch.cuda.OutOfMemoryError):
        self.real, self.limit, self.batch_of, self.error = real, limit, batch_of, error
        self.sizes: list[int] = []
        self.failures = 0

    def __call__(self, *args, **kwargs):
        size = self.batch_of(*args, **kwargs)
        self.sizes.append(size)
        if size > self.limit:
            self.failures += 1
            raise self.error(f"CUDA out of memory. Tried to allocate {size} GiB")
        return self.real(*args, **kwargs)


def _ids_and_outputs(table: pa.Table) -> list[tuple]:
    return list(
        zip(
            table.column(schema.ID).to_pylist(),
            table.column(schema.STATUS).to_pylist(),
            table.column(schema.CAPTION).to_pylist(),
            table.column(schema.ANSWERS).to_pylist(),
            strict=True,
        )
    )


@pytest.mark.parametrize("where", ["generate", "vision"])
@pytest.mark.parametrize("limit", [1, 2, 3])
@pytest.mark.parametrize(
    "error", [torch.cuda.OutOfMemoryError, lambda m: RuntimeError(f"CUDA error: {m} (out of memory)")]
)
def test_out_of_memory_splits_the_batch(tiny_models, images, where, limit, error):
    """A batch that does not fit is halved until it does; outputs equal the run that fitted, row for row."""
    names = sorted(images)
    row_questions = [["why?"] if i % 3 == 0 else None for i in range(len(names))]
    status = [schema.STATUS_ERROR if i == 2 else schema.STATUS_OK for i in range(len(names))]
    replica = make_replica(tiny_models["opt"], questions=QUESTIONS)
    table = model_input_table(
        [images[n] for n in names], replica.height, replica.width, status=status, row_questions=row_questions
    )
    expected = _ids_and_outputs(replica(table))

    if where == "generate":
        wrapper = _Limit(replica.model.language_model.generate, limit, lambda **kw: kw["inputs_embeds"].shape[0], error)
        replica.model.language_model.generate = wrapper
    else:
        wrapper = _Limit(replica._image_prefix, limit, lambda pixel_values: pixel_values.shape[0], error)
        replica._image_prefix = wrapper
    got = replica(table)

    assert wrapper.failures > 0  # the limit was hit...
    assert got.num_rows == table.num_rows  # ...and no row was lost or duplicated
    assert _ids_and_outputs(got) == expected
    assert got.column(schema.ERROR_KIND).to_pylist()[2] == "decode_failed"  # untouched error row

    # The replica remembers what fitted: the next batch does not start with an oversized call.
    wrapper.sizes.clear()
    wrapper.failures = 0
    assert _ids_and_outputs(replica(table)) == expected
    assert wrapper.failures == 0 and max(wrapper.sizes) <= limit


def test_image_too_big_alone_is_the_only_error_row(tiny_models, images):
    """Only an image that does not fit even alone becomes an ``out_of_memory`` row; its neighbours are fine."""
    names = ["astronaut", "coffee", "chelsea", "rocket", "gradient"]
    replica = make_replica(tiny_models["t5"], questions=QUESTIONS)
    table = model_input_table([images[n] for n in names], replica.height, replica.width)
    expected = replica(table).to_pylist()

    with torch.inference_mode():
        pixel_values = replica._pixel_values(pixels_from_table(table)[3:4])
        heavy = replica._image_prefix(pixel_values)[0]
    real = replica.model.language_model.generate
    q = replica.num_query_tokens

    def generate(**kwargs):
        embeds = kwargs["inputs_embeds"]
        holds_heavy = any(torch.allclose(embeds[i, :q], heavy, atol=1e-5) for i in range(embeds.shape[0]))
        if holds_heavy or embeds.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return real(**kwargs)

    replica.model.language_model.generate = generate
    rows = replica(table).to_pylist()
    assert len(rows) == len(names)
    assert rows[3][schema.STATUS] == schema.STATUS_ERROR and rows[3][schema.ERROR_KIND] == schema.OUT_OF_MEMORY
    assert rows[3][schema.CAPTION] is None and rows[3][schema.ANSWERS] is None
    assert [rows[i] for i in (0, 1, 2, 4)] == [expected[i] for i in (0, 1, 2, 4)]


# --------------------------------------------------------------------------- fast path


def test_normalization_table_is_bit_identical(images):
    mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    table = normalization_table(1 / 255, mean, std)
    assert table.dtype == np.float32 and table.shape == (3, 256)
    # Every value of every channel.
    every = np.broadcast_to(np.arange(256, dtype=np.uint8)[None, :, None, None], (2, 256, 5, 3)).copy()
    assert np.array_equal(normalize_with_table(every, table), normalize_pixels(every, 1 / 255, mean, std))
    for rgb in images.values():
        pixels = resize_like_processor(rgb, 24, 40)[None]
        assert np.array_equal(normalize_with_table(pixels, table), normalize_pixels(pixels, 1 / 255, mean, std))


@pytest.mark.parametrize(
    "rescale, mean, std",
    [
        (1 / 255, [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]),  # BLIP-2 (CLIP)
        (1 / 255, [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),
        (0.00392156862745098, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),  # ImageNet
        (1 / 127.5, [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]),
        (0.003, [0.1, 0.2, 0.3], [0.7, 0.11, 0.13]),  # arbitrary: may need the table
        (1.0, [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]),
    ],
)
def test_cpu_normalizer_is_bit_identical(images, rescale, mean, std):
    normalize = make_normalizer(rescale, mean, std)
    every = np.broadcast_to(np.arange(256, dtype=np.uint8)[None, :, None, None], (2, 256, 5, 3)).copy()
    assert np.array_equal(normalize(every), normalize_pixels(every, rescale, mean, std))
    batch = np.stack([resize_like_processor(rgb, 24, 40) for rgb in images.values()])
    got = normalize(batch)
    assert got.dtype == np.float32 and got.flags.c_contiguous
    assert np.array_equal(got, normalize_pixels(batch, rescale, mean, std))


def test_replica_pixel_values_match_the_processor(tiny_models, images, references):
    ref = references["opt"]
    for fast in (FastPath(), FastPath(device_normalize=False)):
        replica = make_replica(tiny_models["opt"], fast=fast)
        arrays = [resize_like_processor(rgb, ref.height, ref.width) for rgb in images.values()]
        got = replica._pixel_values(np.stack(arrays)).cpu().numpy()
        expected = np.concatenate(
            [
                ref.processor.image_processor(Image.fromarray(rgb), return_tensors="np")["pixel_values"]
                for rgb in images.values()
            ]
        )
        assert np.array_equal(got, expected)


def test_auto_dtype_follows_the_gpu_generation():
    """bf16 where the GPU has it (A100, H100, L40S), fp16 on older ones (T4, V100), fp32 on CPU; names win."""
    cuda = torch.device("cuda")  # a device object needs no GPU: only its facts are passed in
    assert resolve_dtype("auto", cuda, bf16_supported=True) == torch.bfloat16
    assert resolve_dtype("auto", cuda, bf16_supported=False) == torch.float16
    assert resolve_dtype("auto", torch.device("cpu"), bf16_supported=True) == torch.float32
    assert resolve_dtype("float16", cuda, bf16_supported=True) == torch.float16
    assert resolve_dtype("float32", cuda, bf16_supported=True) == torch.float32


def _chunk(**facts) -> int:
    return generation_chunk(**{"on_gpu": True, "free_bytes": 0, "bytes_per_sequence": 1, "fixed": None, "cap": None,
                               "compile": False, **facts})  # fmt: skip


def test_generation_chunk_is_sized_from_free_gpu_memory():
    mib = 1024**2
    assert _chunk(free_bytes=300 * mib, bytes_per_sequence=2 * mib) == 150
    assert _chunk(free_bytes=80 * 1024 * mib, bytes_per_sequence=2 * mib) == GPU_MAX_GENERATION_BATCH  # a cap
    assert _chunk(free_bytes=mib, bytes_per_sequence=2 * mib) == 1  # never zero: a lone sequence may still fit
    assert _chunk(free_bytes=300 * mib, bytes_per_sequence=2 * mib, cap=40) == 40  # after an out-of-memory error
    assert _chunk(free_bytes=300 * mib, bytes_per_sequence=2 * mib, fixed=64) == 64  # the setting wins
    assert _chunk(fixed=64, cap=16) == 16
    assert _chunk(on_gpu=False, free_bytes=300 * mib) == CPU_GENERATION_BATCH


def test_compiled_batches_are_padded_within_the_memory_sized_chunk():
    assert [padded_batch(n) for n in (1, 2, 3, 5, 8, 9, 150)] == [1, 2, 4, 8, 8, 16, 256]
    for free in range(1, 3000, 7):
        chunk = _chunk(free_bytes=free, bytes_per_sequence=1, compile=True)
        assert padded_batch(chunk) == chunk <= free  # a full chunk is not padded past what fits
        assert all(padded_batch(n) <= chunk for n in range(1, chunk + 1))
    assert _chunk(free_bytes=150, compile=True, on_gpu=False) == CPU_GENERATION_BATCH  # no compile on CPU


def test_usable_gpu_memory_respects_a_shared_gpu():
    gib = 1 << 30
    # A whole GPU: the device's free memory plus the allocator's unused cache, 60% of it.
    whole = usable_gpu_bytes(free=70 * gib, total=80 * gib, reserved=6 * gib, allocated=5 * gib)
    assert whole == int(71 * gib * 0.6)
    # Half of the same GPU, its other half still empty: only this replica's half, minus what it uses.
    half = usable_gpu_bytes(free=70 * gib, total=80 * gib, reserved=6 * gib, allocated=5 * gib, share=0.5)
    assert half == int(35 * gib * 0.6)
    # The neighbour took more than its half: the device's free memory is the tighter bound.
    assert usable_gpu_bytes(free=10 * gib, total=80 * gib, reserved=5 * gib, allocated=5 * gib, share=0.5) == int(
        10 * gib * 0.6
    )
    # Already over its share: nothing to plan for (the OOM splitting takes over), never negative.
    assert usable_gpu_bytes(free=30 * gib, total=80 * gib, reserved=45 * gib, allocated=45 * gib, share=0.5) == 0


def test_fast_path_rejects_bad_settings():
    with pytest.raises(ValueError, match="gpu_share"):
        FastPath(gpu_share=0)
    with pytest.raises(ValueError, match="generation_batch"):
        FastPath(generation_batch=0)
    with pytest.raises(ValueError, match="attn_implementation"):
        FastPath(attn_implementation="magic")


@pytest.mark.parametrize("flavor", ["opt", "t5"])
@pytest.mark.parametrize(
    "fast",
    [
        FastPath(generation_batch=1),  # no batching at all
        FastPath(generation_batch=3, vision_batch=2),  # ragged chunks
        FastPath(attn_implementation="eager"),
        FastPath(compile=True),  # static KV cache (torch.compile itself is CUDA-only)
        FastPath(device_normalize=False),
        FastPath(prefix_cache=False),
    ],
    ids=["gen1", "ragged", "eager", "static-cache", "numpy-normalize", "no-prefix-cache"],
)
def test_every_fast_path_setting_gives_the_same_tokens(tiny_models, images, references, flavor, fast):
    ref = references[flavor]
    names = sorted(images)
    arrays = [images[n] for n in names]
    replica = make_replica(tiny_models[flavor], fast=fast, questions=QUESTIONS)
    out = replica(model_input_table(arrays, ref.height, ref.width))
    captions = out.column(schema.CAPTION).to_pylist()
    answers = out.column(schema.ANSWERS).to_pylist()
    for i, rgb in enumerate(arrays):
        assert captions[i] == ref(rgb, None)[0], (flavor, names[i])
        for k, question in enumerate(QUESTIONS):
            assert answers[i][k]["answer"] == ref(rgb, f"Question: {question} Answer:")[0], (flavor, names[i])


@pytest.fixture(scope="module")
def small_models(tmp_path_factory) -> dict[str, object]:
    from workers.tiny_model import build_small_blip2

    root = tmp_path_factory.mktemp("small-models")
    return {flavor: build_small_blip2(root / flavor, flavor=flavor) for flavor in ("opt", "t5")}


@pytest.mark.parametrize("flavor", ["opt", "t5"])
def test_fast_path_tokens_equal_baseline_on_small_model(small_models, images, flavor):
    """The small (224 px, 32 queries, 6-layer) models: batched fast path == plain generate, token for token."""
    generation = GenerationSpec(max_new_tokens=12)
    ref = Reference(small_models[flavor], generation)
    names = ["astronaut", "coffee", "chelsea", "rocket", "gradient", "noise"]
    arrays = [images[n] for n in names]
    replica = make_replica(small_models[flavor], generation=generation, questions=QUESTIONS)
    assert replica.model.config._attn_implementation == "sdpa"
    table = model_input_table(arrays, ref.height, ref.width)
    out = replica(table)

    pixels = np.stack([resize_like_processor(a, ref.height, ref.width) for a in arrays])
    prompts = [None] + [replica.prompts.question_prompt(q) for q in QUESTIONS]
    with torch.inference_mode():
        prefix = replica._image_prefix(replica._pixel_values(pixels))
        token_ids = {p: replica._generate(prefix, [replica.prompt_ids(p)] * len(arrays)) for p in prompts}

    captions = out.column(schema.CAPTION).to_pylist()
    answers = out.column(schema.ANSWERS).to_pylist()
    for i, rgb in enumerate(arrays):
        for k, prompt in enumerate(prompts):
            text, ids = ref(rgb, prompt)
            assert token_ids[prompt][i] == ids, (flavor, names[i], prompt)
            assert (captions[i] if k == 0 else answers[i][k - 1]["answer"]) == text, (flavor, names[i], prompt)
    assert len(set(captions)) > 1, captions


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@requires_cuda
def test_gpu_normalisation_is_bit_identical(tiny_models, images):
    replica = make_replica(tiny_models["opt"], fast=FastPath(), device="cuda", questions=QUESTIONS)
    replica.dtype = torch.float32  # compare the normalised values themselves
    arrays = np.stack([resize_like_processor(rgb, replica.height, replica.width) for rgb in images.values()])
    for _ in range(2):  # the second call reuses the pinned buffer
        got = replica._pixel_values(arrays)
        assert got.device.type == "cuda"
        expected = normalize_pixels(arrays, replica.rescale_factor, replica.image_mean, replica.image_std)
        assert np.array_equal(got.cpu().numpy(), expected)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("flavor", ["opt", "t5"])
def test_gpu_replica_runs_in_half_precision(tiny_models, images, flavor):
    replica = Blip2Replica(ModelSpec(model=str(tiny_models[flavor])), PromptSpec(questions=QUESTIONS), GEN)
    assert replica.device.type == "cuda" and replica.dtype in (torch.bfloat16, torch.float16)
    names = sorted(images)
    table = model_input_table([images[n] for n in names], replica.height, replica.width)
    out = replica(table)
    assert out.column(schema.STATUS).to_pylist() == [schema.STATUS_OK] * table.num_rows
    assert replica._generation_chunk(replica.num_query_tokens + 10) >= 1
    # The oracle: the plain recipe in the same dtype on the same GPU, one image and prompt at a time.
    ref = Reference(tiny_models[flavor], GEN, device="cuda", dtype=replica.dtype)
    expected = [(ref(images[n], None)[0], [ref(images[n], q)[0] for q in QUESTIONS]) for n in names]
    captions, answers = out.column(schema.CAPTION).to_pylist(), out.column(schema.ANSWERS).to_pylist()
    got = [(c, [a["answer"] for a in qa]) for c, qa in zip(captions, answers, strict=True)]
    same = sum(g == e for g, e in zip(got, expected, strict=True))
    print(f"{flavor} {replica.dtype}: {same}/{len(names)} images equal to the oracle")
    # Half-precision kernels round differently per batch shape; allow one near-tie to flip.
    assert same >= len(names) - 1, list(zip(got, expected, strict=True))


@pytest.mark.gpu
@requires_cuda
def test_gpu_fp32_fast_path_matches_cpu_reference(tiny_models, images, references):
    ref = references["opt"]
    replica = Blip2Replica(ModelSpec(model=str(tiny_models["opt"]), dtype="float32"), PromptSpec(), GEN)
    names = sorted(images)
    out = replica(model_input_table([images[n] for n in names], ref.height, ref.width))
    same = sum(c == ref(images[n], None)[0] for c, n in zip(out.column(schema.CAPTION).to_pylist(), names, strict=True))
    assert same >= len(names) - 1  # GPU kernels round differently; allow one near-tie to flip


@pytest.mark.parametrize("flavor", ["opt", "t5"])
def test_prefix_cache_is_used_for_decoder_only_models_with_several_prompts(tiny_models, images, flavor):
    seen: list[int | None] = []
    for prompts in ({"questions": QUESTIONS}, {}):
        replica = make_replica(tiny_models[flavor], **prompts)
        real = replica.model.language_model.generate

        def spy(real=real, **kwargs):
            cache = kwargs.get("past_key_values")
            seen.append(None if cache is None else cache.get_seq_length())
            return real(**kwargs)

        replica.model.language_model.generate = spy
        replica(model_input_table([images["coffee"], images["rocket"]], replica.height, replica.width))
        assert replica._prefix_kv is None  # not kept between batches
    q = replica.num_query_tokens
    if flavor == "opt":  # caption + 2 questions share the image positions; a caption alone has nothing to share
        assert seen == [q] * (len(seen) - 1) + [None]
    else:  # encoder-decoder: the encoder sees image and prompt together, nothing to cache
        assert set(seen) == {None}


class _TightReplica(Blip2Replica):
    """A replica whose "GPU" holds at most two sequences per generate call (simulated OOM beyond)."""

    def _generate(self, prefix, prompts, kv=None):
        if len(prompts) > 2:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (simulated, {len(prompts)} sequences)")
        return super()._generate(prefix, prompts, kv)


@pytest.mark.slow
def test_out_of_memory_splitting_in_a_ray_data_actor_stage(ray_cluster, tiny_models, images):
    """Through Ray Data's actor pool: every row comes back once, with the outputs of a run that fitted."""
    import sys

    import ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
    kwargs = {
        "model": ModelSpec(model=str(tiny_models["opt"])),
        "prompts": PromptSpec(questions=QUESTIONS),
        "generation": GEN,
        "device": "cpu",
    }
    names = sorted(images)
    table = model_input_table([images[n] for n in names], 32, 32)
    expected = sorted(_ids_and_outputs(Blip2Replica(**kwargs)(table)))
    ds = ray.data.from_arrow(table).map_batches(
        _TightReplica, batch_format="pyarrow", batch_size=5, fn_constructor_kwargs=kwargs,
        compute=ActorPoolStrategy(size=1), num_cpus=1,
    )
    got = pa.concat_tables(ray.get(ds.to_arrow_refs()))
    assert got.num_rows == table.num_rows
    assert sorted(_ids_and_outputs(got)) == expected
    assert set(got.column(schema.STATUS).to_pylist()) == {schema.STATUS_OK}
