"""The model stage: Arrow rows to jobs and back, error rows, out-of-memory splitting, the engine choice."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch
from model_inputs import model_input_table
from ray.data import ActorPoolStrategy

from workers import schema
from workers.config import ConfigError, GenerationSpec, ModelSpec, PromptSpec
from workers.model_store import ModelLoadError
from workers.replica import Blip2Replica, SizeCap, pick_engine, run_in_parts

QUESTIONS = ("what is in the picture?", "how many people are there?")
GEN = GenerationSpec(max_new_tokens=16)


def make_replica(path, generation: GenerationSpec = GEN, engine: str = "auto", **prompts) -> Blip2Replica:
    return Blip2Replica(ModelSpec(model=str(path), engine=engine), PromptSpec(**prompts), generation, device="cpu")


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


def test_error_rows_pass_through_and_output_schema(tiny_models, references, images):
    ref = references["opt"]
    arrays = [images["astronaut"], images["coffee"], images["chelsea"]]
    status = [schema.STATUS_OK, schema.STATUS_ERROR, schema.STATUS_OK]
    table = model_input_table(arrays, ref.height, ref.width, status=status, row_questions=[None, ["why?"], ["why?"]])
    out = make_replica(tiny_models["opt"], questions=QUESTIONS)(table)

    extra = [schema.CAPTION, schema.ANSWERS, schema.CONVERSATION, schema.MODEL_ID, schema.MODEL_REVISION]
    assert out.column_names == [c for c in table.column_names if c != schema.PIXELS] + extra
    types = {f.name: f.type for f in schema.OUTPUT_FIELDS}
    for name in out.column_names:
        if name in types:
            assert out.schema.field(name).type == types[name], name
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
    monkeypatch.setattr(replica.engine, "encode", lambda *_: pytest.fail("model called for error rows"))
    table = model_input_table([images["coffee"]] * 2, 32, 32, status=["error", "error"])
    out = replica(table)
    assert out.column(schema.CAPTION).to_pylist() == [None, None]
    assert out.column(schema.STATUS).to_pylist() == ["error", "error"]
    empty = replica(table.slice(0, 0))
    assert empty.num_rows == 0
    assert schema.PIXELS not in empty.column_names and schema.CAPTION in empty.column_names


def test_generation_failure_marks_only_that_image(tiny_models, images):
    replica = make_replica(tiny_models["opt"], questions=QUESTIONS)
    table = model_input_table([images["astronaut"], images["coffee"], images["chelsea"]], 32, 32)
    expected = replica(table).to_pylist()
    real = replica.engine.generate

    def flaky(prefix, images_, prompts):
        if 1 in images_:
            raise RuntimeError("probability tensor contains inf or nan")
        return real(prefix, images_, prompts)

    replica.engine.generate = flaky
    rows = replica(table).to_pylist()
    assert rows[1][schema.STATUS] == schema.STATUS_ERROR
    assert rows[1][schema.ERROR_KIND] == schema.GENERATION_FAILED
    assert "RuntimeError: probability tensor contains inf or nan" in rows[1][schema.ERROR]
    assert rows[1][schema.CAPTION] is None and rows[1][schema.ANSWERS] is None
    assert [rows[0], rows[2]] == [expected[0], expected[2]]

    def oom(*_):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    # Out of memory even one image at a time: every image becomes an out_of_memory
    # error row (nothing raised, nothing dropped), not a generation_failed one.
    replica.engine.generate = oom
    rows = replica(table).to_pylist()
    assert [r[schema.ID] for r in rows] == table.column(schema.ID).to_pylist()
    assert {r[schema.STATUS] for r in rows} == {schema.STATUS_ERROR}
    assert {r[schema.ERROR_KIND] for r in rows} == {schema.OUT_OF_MEMORY}
    assert all("out of memory" in r[schema.ERROR] for r in rows)


def test_pixels_at_the_wrong_size_are_a_pipeline_bug(tiny_models, images):
    replica = make_replica(tiny_models["opt"])
    with pytest.raises(ValueError, match="input size"):
        replica(model_input_table([images["coffee"]], 64, 32))


class _Limit:
    """Wraps an engine call: raises an out-of-memory error whenever its batch exceeds ``limit``."""

    def __init__(self, real, limit: int, batch_of, error=torch.cuda.OutOfMemoryError):
        self.real, self.limit, self.batch_of, self.error = real, limit, batch_of, error
        self.sizes: list[int] = []
        self.failures = 0

    def __call__(self, *args):
        size = self.batch_of(*args)
        self.sizes.append(size)
        if size > self.limit:
            self.failures += 1
            raise self.error(f"CUDA out of memory. Tried to allocate {size} GiB")
        return self.real(*args)


@pytest.mark.parametrize("where", ["generate", "encode"])
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
    table = model_input_table([images[n] for n in names], 32, 32, status=status, row_questions=row_questions)
    expected = _ids_and_outputs(replica(table))
    if where == "generate":
        wrapper = _Limit(replica.engine.generate, limit, lambda prefix, imgs, prompts: len(imgs), error)
    else:
        wrapper = _Limit(replica.engine.encode, limit, lambda pixels: pixels.shape[0], error)
    setattr(replica.engine, where, wrapper)
    got = replica(table)
    assert wrapper.failures > 0  # the limit was hit...
    assert got.num_rows == table.num_rows  # ...and no row was lost or duplicated
    assert _ids_and_outputs(got) == expected
    assert got.column(schema.ERROR_KIND).to_pylist()[2] == "decode_failed"  # untouched error row
    # The replica remembers what fitted: the next batch does not start with an oversized call,
    # and at most probes once whether more fits again (SizeCap).
    first_failures = wrapper.failures
    wrapper.sizes.clear()
    wrapper.failures = 0
    assert _ids_and_outputs(replica(table)) == expected
    assert wrapper.sizes[0] <= limit and wrapper.failures <= 1 < first_failures + 1


def test_image_too_big_alone_is_the_only_error_row(tiny_models, images):
    """Only an image that does not fit even alone becomes an ``out_of_memory`` row; its neighbours are fine."""
    names = ["astronaut", "coffee", "chelsea", "rocket", "gradient"]
    replica = make_replica(tiny_models["t5"], questions=QUESTIONS)
    table = model_input_table([images[n] for n in names], 32, 32)
    expected = replica(table).to_pylist()
    real = replica.engine.generate

    def generate(prefix, images_, prompts):
        if 3 in images_ or len(images_) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return real(prefix, images_, prompts)

    replica.engine.generate = generate
    rows = replica(table).to_pylist()
    assert len(rows) == len(names)
    assert rows[3][schema.STATUS] == schema.STATUS_ERROR and rows[3][schema.ERROR_KIND] == schema.OUT_OF_MEMORY
    assert rows[3][schema.CAPTION] is None and rows[3][schema.ANSWERS] is None
    assert [rows[i] for i in (0, 1, 2, 4)] == [expected[i] for i in (0, 1, 2, 4)]


def test_size_cap_recovers_after_a_run_of_successes():
    """Halved after an OOM, the cap doubles back after RECOVER_AFTER full calls, and goes once above the ask."""
    cap = SizeCap()
    sizes: list[int] = []
    fits = {"limit": 16}

    def call(part):
        sizes.append(len(part))
        if len(part) > fits["limit"]:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    failed: dict = {}
    run_in_parts(list(range(64)), call, int, failed, 64, cap, lambda: None, "testing")
    assert not failed and cap.limit == 16
    fits["limit"] = 64  # the memory is free again
    for _ in range(SizeCap.RECOVER_AFTER):
        run_in_parts(list(range(16)), call, int, failed, 64, cap, lambda: None, "testing")
    assert cap.limit == 32
    for _ in range(SizeCap.RECOVER_AFTER):
        run_in_parts(list(range(32)), call, int, failed, 64, cap, lambda: None, "testing")
    assert cap.limit is None
    sizes.clear()
    run_in_parts(list(range(64)), call, int, failed, 64, cap, lambda: None, "testing")
    assert sizes == [64]
    # A doubling that fails again backs off: the next probe waits twice as long.
    fits["limit"] = 16
    run_in_parts(list(range(64)), call, int, failed, 64, cap, lambda: None, "testing")
    assert cap.limit == 16 and cap.recover_after == SizeCap.RECOVER_AFTER
    for _ in range(SizeCap.RECOVER_AFTER):
        run_in_parts(list(range(16)), call, int, failed, 64, cap, lambda: None, "testing")
    run_in_parts(list(range(32)), call, int, failed, 64, cap, lambda: None, "testing")  # the probe fails
    assert cap.limit == 16 and cap.recover_after == 2 * SizeCap.RECOVER_AFTER and not failed


def test_run_in_parts_uses_even_parts_and_skips_failed_images():
    seen: list[list[int]] = []
    failed = {3: ("decode_failed", "x")}
    run_in_parts(list(range(11)), seen.append, int, failed, 4, SizeCap(), lambda: None, "testing")
    assert [len(p) for p in seen] == [4, 3, 3] and 3 not in sum(seen, [])


def test_engine_choice():
    never_t5 = lambda: False  # noqa: E731
    assert pick_engine("auto", never_t5) == "hf"
    assert pick_engine("hf", lambda: pytest.fail("hf needs no model facts")) == "hf"
    assert pick_engine("vllm", never_t5) == "vllm"
    with pytest.raises(ValueError, match="OPT language models only"):
        pick_engine("vllm", lambda: True)
    with pytest.raises(ConfigError, match="engine"):
        ModelSpec(engine="tensorrt")


def test_vllm_engine_for_t5_is_a_clear_load_error(tiny_models):
    with pytest.raises(ModelLoadError, match="vllm runs BLIP-2 with OPT language models only"):
        make_replica(tiny_models["t5"], engine="vllm")


def test_vllm_engine_without_vllm_installed_says_how_to_get_it(tiny_models):
    pytest.importorskip("torch")
    try:
        import vllm  # noqa: F401

        pytest.skip("vllm is installed here: its tests are in test_vllm_engine.py")
    except ImportError:
        pass
    with pytest.raises(ModelLoadError, match=r"vllm is not installed.*blip2-annotate\[vllm\]"):
        make_replica(tiny_models["opt"], engine="vllm")


@pytest.mark.slow
def test_runs_as_a_ray_data_actor_stage(ray_cluster, tiny_models, images):
    import ray

    kwargs = {"model": ModelSpec(model=str(tiny_models["t5"])), "prompts": PromptSpec(questions=QUESTIONS),
              "generation": GEN, "device": "cpu"}  # fmt: skip
    names = sorted(images)
    table = model_input_table([images[n] for n in names], 32, 32)
    expected = Blip2Replica(**kwargs)(table)
    ds = ray.data.from_arrow(table).map_batches(
        Blip2Replica, batch_format="pyarrow", batch_size=3, fn_constructor_kwargs=kwargs,
        compute=ActorPoolStrategy(size=1), num_cpus=1,
    )  # fmt: skip
    got = pa.concat_tables(ray.get(ds.to_arrow_refs())).sort_by(schema.ID)
    assert got.column(schema.CAPTION).to_pylist() == expected.column(schema.CAPTION).to_pylist()
    assert got.column(schema.ANSWERS).to_pylist() == expected.column(schema.ANSWERS).to_pylist()


class _TightReplica(Blip2Replica):
    """A replica whose "GPU" holds at most two sequences per generation call (simulated OOM beyond)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        real = self.engine.generate

        def generate(prefix, images, prompts):
            if len(prompts) > 2:
                raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (simulated, {len(prompts)} sequences)")
            return real(prefix, images, prompts)

        self.engine.generate = generate


@pytest.mark.slow
def test_out_of_memory_splitting_in_a_ray_data_actor_stage(ray_cluster, tiny_models, images):
    """Through Ray Data's actor pool: every row comes back once, with the outputs of a run that fitted."""
    import sys

    import ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
    kwargs = {"model": ModelSpec(model=str(tiny_models["opt"])), "prompts": PromptSpec(questions=QUESTIONS),
              "generation": GEN, "device": "cpu"}  # fmt: skip
    names = sorted(images)
    table = model_input_table([images[n] for n in names], 32, 32)
    expected = sorted(_ids_and_outputs(Blip2Replica(**kwargs)(table)))
    ds = ray.data.from_arrow(table).map_batches(
        _TightReplica, batch_format="pyarrow", batch_size=5, fn_constructor_kwargs=kwargs,
        compute=ActorPoolStrategy(size=1), num_cpus=1,
    )  # fmt: skip
    got = pa.concat_tables(ray.get(ds.to_arrow_refs()))
    assert got.num_rows == table.num_rows
    assert sorted(_ids_and_outputs(got)) == expected
    assert set(got.column(schema.STATUS).to_pylist()) == {schema.STATUS_OK}


def test_caption_prompts_from_a_template_and_from_a_per_row_column(tiny_models, references, images):
    """Conditional captions: "{column}" filled from the row's passed-through input, or the row's own prompt."""
    from workers.config import AnnotateConfig, InputSpec, OutputSpec

    ref = references["opt"]
    arrays = [images["astronaut"], images["coffee"], images["rocket"]]
    table = model_input_table(arrays, ref.height, ref.width)
    table = table.append_column("title", pa.array(["a man", None, "a rocket"], pa.string()))
    table = table.append_column("prompt", pa.array([None, "a cup of", " "], pa.string()))
    prompts = PromptSpec(caption_prompt="a photo of {title},", caption_prompt_column="prompt")
    replica = Blip2Replica(ModelSpec(model=str(tiny_models["opt"])), prompts, GEN, device="cpu")
    captions = replica(table).column(schema.CAPTION).to_pylist()
    asked = ["a photo of a man,", "a cup of", "a photo of a rocket,"]  # row 2's prompt is blank: the template
    assert captions == [ref(rgb, prompt)[0] for rgb, prompt in zip(arrays, asked, strict=True)]
    assert captions[1] != ref(arrays[1], "a photo of ,")[0]  # the column's prompt won, and it matters

    with pytest.raises(ConfigError, match="caption_prompt: input column 'title' must also be one of passthrough"):
        AnnotateConfig(InputSpec(urls=("x",)), OutputSpec(url="y"), prompts=PromptSpec(caption_prompt="{title}"))
    with pytest.raises(ConfigError, match="caption_prompt_column"):
        AnnotateConfig(InputSpec(urls=("x",), passthrough_columns=("title",)), OutputSpec(url="y"), prompts=prompts)
