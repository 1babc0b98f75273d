"""Conversations: each turn sees the earlier answers, equals the oracle run turn by turn, and reuses the cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from model_inputs import model_input_table, resize_like_processor
from reference import Reference
from whole_words import build_whole_words_blip2

from workers import schema
from workers.config import ConfigError, GenerationSpec, ModelSpec, PromptSpec
from workers.conversation import continue_conversations, first_session
from workers.replica import Blip2Replica

TURNS = ("what is in the picture?", "what color is it?", "why?")
GEN = GenerationSpec(max_new_tokens=8)
NAMES = ["astronaut", "coffee", "chelsea", "rocket", "gradient", "grey", "noise"]


def make_replica(path, **prompts) -> Blip2Replica:
    return Blip2Replica(ModelSpec(model=str(path)), PromptSpec(**prompts), GEN, device="cpu")


def oracle_turns(ref: Reference, spec: PromptSpec, rgb, turns) -> list[tuple[str, list[int]]]:
    """The transformers oracle, one turn at a time, each prompt holding its own earlier answers."""
    history, out = [], []
    for question in turns:
        text, ids = ref(rgb, spec.turn_prompt(history, question))
        out.append((text, ids))
        history.append((question, text))
    return out


@pytest.fixture(scope="module")
def models(tiny_models, tmp_path_factory):
    """The tiny models, and "opt-words": tiny OPT answering in whole words (tests/whole_words.py)."""
    return {**tiny_models, "opt-words": build_whole_words_blip2(tmp_path_factory.mktemp("models") / "opt-words")}


@pytest.fixture(scope="module")
def oracles(models):
    return {flavor: Reference(path, GEN) for flavor, path in models.items()}


def test_turn_prompt_is_the_blip2_paper_format():
    spec = PromptSpec()
    assert spec.turn_prompt([], "q1?") == "Question: q1? Answer:"
    assert spec.turn_prompt([("q1?", "a1")], "q2?") == "Question: q1? Answer: a1. Question: q2? Answer:"
    custom = PromptSpec(question_template="Q: {q} A:", answered_turn_template="Q: {q} A: {a}\n")
    assert custom.turn_prompt([("x", "y")], "z") == "Q: x A: y\n Q: z A:"
    with pytest.raises(ConfigError, match="answered_turn_template"):
        PromptSpec(answered_turn_template="Question: {q}")
    with pytest.raises(ConfigError, match="conversation"):
        PromptSpec(conversation=("fine", " "))


@pytest.mark.parametrize("flavor", ["opt", "t5", "opt-words"])
def test_turns_see_the_earlier_answers_and_equal_the_oracle(models, oracles, images, flavor):
    ref = oracles[flavor]
    arrays = [images[n] for n in NAMES]
    replica = make_replica(models[flavor], questions=("how many?",), conversation=TURNS)
    out = replica(model_input_table(arrays, ref.height, ref.width))
    assert out.schema.field(schema.CONVERSATION).type == pa_turns()
    rows = out.to_pylist()
    sees_history = 0
    for name, rgb, row in zip(NAMES, arrays, rows, strict=True):
        expected = oracle_turns(ref, replica.prompts, rgb, TURNS)
        assert [t["turn"] for t in row[schema.CONVERSATION]] == [1, 2, 3]
        assert [t["question"] for t in row[schema.CONVERSATION]] == list(TURNS)
        assert [t["answer"] for t in row[schema.CONVERSATION]] == [text for text, _ in expected], (flavor, name)
        # Independent answers stay independent, next to the conversation.
        assert row[schema.ANSWERS] == [{"question": "how many?", "answer": ref(rgb, "Question: how many? Answer:")[0]}]
        for k in (1, 2):
            sees_history += expected[k][0] != ref(rgb, replica.prompts.question_prompt(TURNS[k]))[0]
    assert sees_history, "no later turn differs from asking it alone: the comparison would show nothing"


@pytest.mark.parametrize("flavor", ["opt", "t5", "opt-words"])
def test_conversation_tokens_equal_the_oracle(models, oracles, images, flavor):
    """Token ids, through the conversation module the stage uses (cache reuse on OPT, recomputation on T5)."""
    ref = oracles[flavor]
    engine = make_replica(models[flavor], conversation=TURNS).engine
    arrays = [images[n] for n in NAMES]
    pixels = np.stack([resize_like_processor(a, engine.height, engine.width) for a in arrays])
    spec = PromptSpec()
    with torch.inference_mode():
        prefix = engine.prefix(list(engine.encode(pixels)), [len(TURNS)] * len(arrays))
        sessions = [first_session(engine, prefix, i) for i in range(len(arrays))]
        assert all(s is not None for s in sessions) == flavor.startswith("opt")
        histories: list[list[tuple[str, str]]] = [[] for _ in arrays]
        for k, question in enumerate(TURNS):
            prompts = [engine.prompt_ids(spec.turn_prompt(h, question)) for h in histories]
            tokens, sessions = continue_conversations(engine, prefix, list(range(len(arrays))), prompts, sessions)
            for i, rgb in enumerate(arrays):
                expected = oracle_turns(ref, spec, rgb, TURNS)[k]
                assert tokens[i] == expected[1], (flavor, NAMES[i], k)
                histories[i].append((question, engine.decode([tokens[i]])[0]))


def test_later_turns_prefill_only_their_new_tokens(tiny_models, images):
    """OPT: turn k's first forward starts where turn k-1's prompt ended, at the latest.

    (Its answer is reused too where the answer's text tokenizes back to the same
    ids; the random tiny model's byte soup mostly does not, a real model's does.)
    """
    replica = make_replica(tiny_models["opt"], caption=False, conversation=TURNS)
    engine = replica.engine
    real = engine.decoder
    widths: list[int] = []

    def spy(**kwargs):
        if "inputs_embeds" in kwargs:
            widths.append(kwargs["inputs_embeds"].shape[1])
        return real(**kwargs)

    engine.decoder = spy
    row = replica(model_input_table([images["coffee"]], engine.height, engine.width)).to_pylist()[0]
    history = [(t["question"], t["answer"]) for t in row[schema.CONVERSATION]]
    whole = [engine.num_query_tokens + len(engine.prompt_ids(replica.prompts.turn_prompt(history[:k], q)))
             for k, q in enumerate(TURNS)]  # fmt: skip
    assert widths[0] == engine.num_query_tokens  # the image positions' cache, once
    prefills = widths[1:]
    assert len(prefills) == len(TURNS)
    assert prefills[0] == whole[0] - engine.num_query_tokens  # turn 1 starts after the image positions
    for k in (1, 2):  # recomputing would prefill whole[k] positions
        assert prefills[k] <= whole[k] - whole[k - 1], (prefills, whole)


def test_when_answers_tokenize_back_a_turn_prefills_only_its_new_tokens(models, oracles, images, monkeypatch):
    """OPT answering in whole words (as a trained model does): turn k keeps the earlier prompts *and* answers.

    Counted as positions x rows of every prefill forward, per turn, for a batch
    of images.  A row's new tokens are its prompt's ids past what the cache
    holds: the previous prompt and answer, except the answer's last token when
    generation stopped at ``max_new_tokens`` (the last token is never fed back).
    """
    import workers.replica as replica_module

    ref, arrays = oracles["opt-words"], [images[n] for n in NAMES]
    replica = make_replica(models["opt-words"], caption=False, conversation=TURNS)
    engine, q = replica.engine, replica.engine.num_query_tokens
    real_decoder, real_continue = engine.decoder, replica_module.continue_conversations
    prefilled: list[int] = []  # positions x rows, one total per turn

    def spy(**kwargs):
        if "inputs_embeds" in kwargs and prefilled:  # before the first turn: the image positions' cache
            prefilled[-1] += kwargs["inputs_embeds"].shape[0] * kwargs["inputs_embeds"].shape[1]
        return real_decoder(**kwargs)

    def each_turn(*args):
        prefilled.append(0)
        return real_continue(*args)

    engine.decoder = spy
    monkeypatch.setattr(replica_module, "continue_conversations", each_turn)
    rows = replica(model_input_table(arrays, engine.height, engine.width)).to_pylist()
    assert len(prefilled) == len(TURNS)  # one call per turn: the whole batch fits one chunk

    expected, whole = [0] * len(TURNS), [0] * len(TURNS)
    for rgb, row in zip(arrays, rows, strict=True):
        oracle = oracle_turns(ref, replica.prompts, rgb, TURNS)
        assert [t["answer"] for t in row[schema.CONVERSATION]] == [text for text, _ in oracle]
        history = [(t["question"], t["answer"]) for t in row[schema.CONVERSATION]]
        prompts = [engine.prompt_ids(replica.prompts.turn_prompt(history[:k], t)) for k, t in enumerate(TURNS)]
        expected[0] += len(prompts[0])
        for k in range(1, len(TURNS)):
            ids = oracle[k - 1][1]
            stopped = bool(ids) and ids[-1] in engine.eos_ids
            words = ids[:-1] if stopped else ids
            # The answer tokenizes back to the generated ids inside the next prompt.
            assert prompts[k][: len(prompts[k - 1]) + len(words)] == prompts[k - 1] + tuple(words)
            expected[k] += len(prompts[k]) - len(prompts[k - 1]) - len(words) + (0 if stopped else 1)
            whole[k] += q + len(prompts[k])
    assert prefilled == expected
    assert all(expected[k] < whole[k] - q * len(arrays) for k in (1, 2))  # less than the prompts alone

def test_a_conversation_beyond_the_context_is_an_error_row_and_spares_the_rest(tiny_models, images):
    replica = make_replica(tiny_models["opt"], row_questions_in_turns=True)
    engine = replica.engine
    long_question = "what is " + "very " * 150 + "in the picture?"
    row_turns = [["what is in the picture?", "why?"], [long_question, long_question], ["what color is it?"]]
    arrays = [images["astronaut"], images["coffee"], images["rocket"]]
    table = model_input_table(arrays, engine.height, engine.width, row_questions=row_turns)
    assert engine.num_query_tokens + len(engine.prompt_ids(long_question)) + GEN.max_new_tokens < engine.max_context
    rows = replica(table).to_pylist()
    assert rows[1][schema.STATUS] == schema.STATUS_ERROR and rows[1][schema.ERROR_KIND] == schema.CONTEXT_EXCEEDED
    assert "turn 2" in rows[1][schema.ERROR] and f"context holds {engine.max_context}" in rows[1][schema.ERROR]
    assert rows[1][schema.CONVERSATION] is None and rows[1][schema.CAPTION] is None
    # The other rows equal a batch without the long conversation.
    alone = replica(model_input_table([arrays[0], arrays[2]], engine.height, engine.width,
                                      row_questions=[row_turns[0], row_turns[2]])).to_pylist()  # fmt: skip
    outputs = (schema.STATUS, schema.CAPTION, schema.ANSWERS, schema.CONVERSATION)
    assert [[r[c] for c in outputs] for r in (rows[0], rows[2])] == [[r[c] for c in outputs] for r in alone]
    assert [t["question"] for t in rows[0][schema.CONVERSATION]] == row_turns[0]


def pa_turns():
    import pyarrow as pa

    return pa.list_(schema.TURN_TYPE)
