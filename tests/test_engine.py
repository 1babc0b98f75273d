"""Our engine: token-for-token fidelity to the plain Hugging Face recipe, on supported APIs only."""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest
import torch
from model_inputs import model_input_table, resize_like_processor
from reference import Reference
from transformers import GenerationConfig

from workers import schema
from workers.config import GenerationSpec, ModelSpec, PromptSpec
from workers.decoding import greedy_loop_covers
from workers.engine import Blip2Engine, ImagePrefix
from workers.fast_path import FastPath
from workers.model_loading import load_hf_model, resolve_dtype
from workers.model_store import ModelLoadError, ModelUnavailableError
from workers.replica import Blip2Replica

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

QUESTIONS = ("what is in the picture?", "how many people are there?")
GEN = GenerationSpec(max_new_tokens=16)


def make_replica(path, fast=None, generation: GenerationSpec = GEN, device: str = "cpu", **prompts) -> Blip2Replica:
    """A replica on the CPU in float32 (what the fidelity tests compare), unless ``device`` says otherwise."""
    return Blip2Replica(ModelSpec(model=str(path)), PromptSpec(**prompts), generation, fast=fast, device=device)


def engine_tokens(engine: Blip2Engine, arrays, prompts) -> dict:
    """Token ids per prompt for every image, straight from the engine (one call per prompt)."""
    pixels = np.stack([resize_like_processor(a, engine.height, engine.width) for a in arrays])
    with torch.inference_mode():
        features = engine.encode(pixels)
        prefix = engine.prefix(list(features), [len(prompts)] * len(arrays))
        images = list(range(len(arrays)))
        return {p: engine.generate(prefix, images, [engine.prompt_ids(p)] * len(arrays)) for p in prompts}


@pytest.mark.parametrize("flavor", ["opt", "t5"])
@pytest.mark.parametrize("caption_prompt", [None, "a photo of"])
def test_fidelity_to_plain_generate(tiny_models, references, images, flavor, caption_prompt):
    """Batched output == processor + generate, one image and prompt at a time, token for token."""
    ref = references[flavor]
    names = sorted(images)
    arrays = [images[n] for n in names]
    replica = make_replica(tiny_models[flavor], caption_prompt=caption_prompt, questions=QUESTIONS)
    out = replica(model_input_table(arrays, ref.height, ref.width))  # one batch of all images
    captions = out.column(schema.CAPTION).to_pylist()
    answers = out.column(schema.ANSWERS).to_pylist()
    prompts = [caption_prompt] + [replica.prompts.question_prompt(q) for q in QUESTIONS]
    token_ids = engine_tokens(replica.engine, arrays, prompts)

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
    "penalty-and-minimum": GenerationSpec(max_new_tokens=8, min_new_tokens=5, repetition_penalty=1.3),
}


@pytest.mark.parametrize("flavor", ["opt", "t5"])
@pytest.mark.parametrize("variant", sorted(GENERATION_VARIANTS))
def test_generation_settings_beyond_greedy_match_plain_generate(tiny_models, images, flavor, variant):
    """Beams (plain generate), penalties and min_new_tokens (our loop on OPT) == the plain recipe's text."""
    generation = GENERATION_VARIANTS[variant]
    ref = Reference(tiny_models[flavor], generation)
    names = sorted(images)
    arrays = [images[n] for n in names]
    replica = make_replica(tiny_models[flavor], generation=generation, questions=QUESTIONS[:1])
    assert replica.engine.own_loop == (flavor == "opt" and generation.num_beams == 1)
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
def test_no_deprecated_api_is_used(tiny_models, images, flavor):
    """The whole model stage, load included, with transformers' and torch's deprecations as errors.

    ``generate(past_key_values=...)`` raised "`past_key_values` is deprecated" here
    before the engine had its own loop over a ``Cache``.
    """
    names = sorted(images)
    table = model_input_table([images[n] for n in names], 32, 32)
    with warnings.catch_warnings():
        for category in (FutureWarning, DeprecationWarning, PendingDeprecationWarning):
            warnings.filterwarnings("error", category=category, module=r"(transformers|torch)(\.|$)")
            warnings.filterwarnings("error", category=category, module=r"workers(\.|$)")
        # warnings.warn names the caller's module; transformers' own deprecation helpers name it too.
        warnings.filterwarnings("error", message=".*deprecated.*", category=FutureWarning)
        replica = make_replica(tiny_models[flavor], questions=QUESTIONS)
        out = replica(table)
    assert out.column(schema.STATUS).to_pylist() == [schema.STATUS_OK] * len(names)
    assert replica.engine.use_prefix_cache == (flavor == "opt")


def test_greedy_loop_covers_only_what_it_reproduces():
    plain = GenerationConfig()
    assert greedy_loop_covers(GenerationSpec(), plain)
    assert greedy_loop_covers(GenerationSpec(repetition_penalty=1.2, min_new_tokens=3), plain)
    assert not greedy_loop_covers(GenerationSpec(num_beams=2), plain)
    assert not greedy_loop_covers(GenerationSpec(), GenerationConfig(no_repeat_ngram_size=3))
    assert not greedy_loop_covers(GenerationSpec(), GenerationConfig(do_sample=True))
    assert not greedy_loop_covers(GenerationSpec(), GenerationConfig(bad_words_ids=[[5]]))


@pytest.mark.parametrize("flavor", ["opt", "t5"])
def test_prefix_cache_is_used_for_decoder_only_models_with_several_prompts(tiny_models, images, flavor):
    seen: list[int | None] = []
    for prompts in ({"questions": QUESTIONS}, {}):
        replica = make_replica(tiny_models[flavor], **prompts)
        real = replica.engine.generate

        def spy(prefix: ImagePrefix, images_, prompts_, real=real):
            seen.append(None if prefix.kv is None else prefix.kv[0][0].shape[2])
            return real(prefix, images_, prompts_)

        replica.engine.generate = spy
        replica(model_input_table([images["coffee"], images["rocket"]], 32, 32))
    q = replica.engine.num_query_tokens
    if flavor == "opt":  # caption + 2 questions share the image positions; a caption alone has nothing to share
        assert seen == [q] * (len(seen) - 1) + [None]
    else:  # encoder-decoder: the encoder sees image and prompt together, nothing to cache
        assert set(seen) == {None}


@pytest.mark.parametrize("flavor", ["opt", "t5"])
@pytest.mark.parametrize(
    "fast",
    [
        FastPath(generation_batch=1),  # no batching at all
        FastPath(generation_batch=3, vision_batch=2),  # ragged chunks
        FastPath(attn_implementation="eager"),
        FastPath(compile=True),  # static KV cache through plain generate (torch.compile is CUDA-only)
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
def test_tokens_equal_the_baseline_on_the_small_model(small_models, images, flavor):
    """The small (224 px, 32 queries, 6-layer) models: batched engine == plain generate, token for token."""
    generation = GenerationSpec(max_new_tokens=12)
    ref = Reference(small_models[flavor], generation)
    names = ["astronaut", "coffee", "chelsea", "rocket", "gradient", "noise"]
    arrays = [images[n] for n in names]
    replica = make_replica(small_models[flavor], generation=generation, questions=QUESTIONS)
    assert replica.engine.model.config._attn_implementation == "sdpa"
    out = replica(model_input_table(arrays, ref.height, ref.width))
    prompts = [None] + [replica.prompts.question_prompt(q) for q in QUESTIONS]
    token_ids = engine_tokens(replica.engine, arrays, prompts)
    captions = out.column(schema.CAPTION).to_pylist()
    answers = out.column(schema.ANSWERS).to_pylist()
    for i, rgb in enumerate(arrays):
        for k, prompt in enumerate(prompts):
            text, ids = ref(rgb, prompt)
            assert token_ids[prompt][i] == ids, (flavor, names[i], prompt)
            assert (captions[i] if k == 0 else answers[i][k - 1]["answer"]) == text, (flavor, names[i], prompt)
    assert len(set(captions)) > 1, captions


def test_fast_path_rejects_bad_settings():
    with pytest.raises(ValueError, match="gpu_share"):
        FastPath(gpu_share=0)
    with pytest.raises(ValueError, match="generation_batch"):
        FastPath(generation_batch=0)
    with pytest.raises(ValueError, match="attn_implementation"):
        FastPath(attn_implementation="magic")
    with pytest.raises(ValueError, match="attn_implementation.*BLIP-2"):
        FastPath(attn_implementation="flash_attention_2")  # BLIP-2 rejects it at load time


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
    net, processor = load_hf_model(tiny_models["t5"], torch.float32, torch.device("cpu"), "sdpa")
    engine = Blip2Engine(net, processor, GEN)
    assert engine.device.type == "cpu" and engine.dtype == torch.float32
    assert not engine.model.training


def test_auto_dtype_follows_the_gpu_generation():
    """bf16 where the GPU has it (A100, H100, L40S), fp16 on older ones (T4, V100), fp32 on CPU; names win."""
    cuda = torch.device("cuda")  # a device object needs no GPU: only its facts are passed in
    assert resolve_dtype("auto", cuda, bf16_supported=True) == torch.bfloat16
    assert resolve_dtype("auto", cuda, bf16_supported=False) == torch.float16
    assert resolve_dtype("auto", torch.device("cpu"), bf16_supported=True) == torch.float32
    assert resolve_dtype("float16", cuda, bf16_supported=True) == torch.float16
    assert resolve_dtype("float32", cuda, bf16_supported=True) == torch.float32


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("flavor", ["opt", "t5"])
def test_gpu_engine_runs_in_half_precision(tiny_models, images, flavor):
    replica = Blip2Replica(ModelSpec(model=str(tiny_models[flavor])), PromptSpec(questions=QUESTIONS), GEN)
    engine = replica.engine
    assert engine.device.type == "cuda" and engine.dtype in (torch.bfloat16, torch.float16)
    names = sorted(images)
    out = replica(model_input_table([images[n] for n in names], engine.height, engine.width))
    assert out.column(schema.STATUS).to_pylist() == [schema.STATUS_OK] * len(names)
    assert engine.generation_chunk(10) >= 1
    # The oracle: the plain recipe in the same dtype on the same GPU, one image and prompt at a time.
    ref = Reference(tiny_models[flavor], GEN, device="cuda", dtype=engine.dtype)
    expected = [(ref(images[n], None)[0], [ref(images[n], q)[0] for q in QUESTIONS]) for n in names]
    captions, answers = out.column(schema.CAPTION).to_pylist(), out.column(schema.ANSWERS).to_pylist()
    got = [(c, [a["answer"] for a in qa]) for c, qa in zip(captions, answers, strict=True)]
    same = sum(g == e for g, e in zip(got, expected, strict=True))
    print(f"{flavor} {engine.dtype}: {same}/{len(names)} images equal to the oracle")
    # Half-precision kernels round differently per batch shape; allow one near-tie to flip.
    assert same >= len(names) - 1, list(zip(got, expected, strict=True))


@pytest.mark.gpu
@requires_cuda
def test_gpu_fp32_engine_matches_cpu_reference(tiny_models, images, references):
    ref = references["opt"]
    replica = Blip2Replica(ModelSpec(model=str(tiny_models["opt"]), dtype="float32"), PromptSpec(), GEN)
    names = sorted(images)
    out = replica(model_input_table([images[n] for n in names], ref.height, ref.width))
    same = sum(c == ref(images[n], None)[0] for c, n in zip(out.column(schema.CAPTION).to_pylist(), names, strict=True))
    assert same >= len(names) - 1  # GPU kernels round differently; allow one near-tie to flip
