"""The tiny random BLIP-2 loads through the same from_pretrained path as real checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from workers import tiny_model


@pytest.mark.parametrize("flavor", ["opt", "t5"])
def test_saved_like_a_hub_checkpoint(tiny_models, flavor):
    path = tiny_models[flavor]
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "blip-2"
    assert config["text_config"]["model_type"] == flavor
    assert config["vision_config"]["image_size"] == tiny_model.IMAGE_SIZE
    pre = json.loads((path / "preprocessor_config.json").read_text())
    assert pre["size"] == {"height": tiny_model.IMAGE_SIZE, "width": tiny_model.IMAGE_SIZE}
    assert pre["resample"] == 3
    assert json.loads((path / "processor_config.json").read_text())["num_query_tokens"] == tiny_model.NUM_QUERY_TOKENS


@pytest.mark.parametrize("flavor", ["opt", "t5"])
def test_loads_offline_with_from_pretrained(tiny_models, flavor, photos):
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    path = tiny_models[flavor]
    model = Blip2ForConditionalGeneration.from_pretrained(path, use_safetensors=True, local_files_only=True)
    processor = Blip2Processor.from_pretrained(path, local_files_only=True)
    tokenizer = processor.tokenizer

    assert processor.num_query_tokens == model.config.num_query_tokens == tiny_model.NUM_QUERY_TOKENS
    assert model.config.image_token_index == tokenizer.convert_tokens_to_ids("<image>")
    assert model.config.text_config.vocab_size >= len(tokenizer)

    # The processor expands <image> once per query token, before the prompt.
    inputs = processor(images=Image.fromarray(photos["coffee"]), text="a photo of", return_tensors="pt")
    q = model.config.num_query_tokens
    assert inputs["input_ids"][0, :q].tolist() == [model.config.image_token_index] * q
    assert inputs["pixel_values"].shape == (1, 3, tiny_model.IMAGE_SIZE, tiny_model.IMAGE_SIZE)

    # Random weights still depend on the image, and rarely stop at once.
    captions = []
    for name in sorted(photos):
        inputs = processor(images=Image.fromarray(photos[name]), return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        captions.append(processor.batch_decode(out, skip_special_tokens=True)[0].strip())
    assert len(set(captions)) > 1, captions
    assert sum(bool(c) for c in captions) >= len(captions) // 2, captions


@pytest.mark.parametrize("flavor", ["opt", "t5"])
def test_tokenizer_round_trips_text(tiny_models, flavor):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models[flavor], local_files_only=True)
    text = "a photo of a cat sitting on the beach, next to two people."
    ids = tokenizer(text).input_ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.unk_token_id not in ids
    if flavor == "opt":
        assert ids[0] == tokenizer.bos_token_id == tokenizer.eos_token_id  # OPT prepends </s>
    else:
        assert ids[-1] == tokenizer.eos_token_id  # T5 appends </s>
    # Byte-level BPE never needs <unk>, even for text far from the corpus.
    if flavor == "opt":
        odd = "Zürich — 東京 🚀"
        assert tokenizer.decode(tokenizer(odd).input_ids, skip_special_tokens=True) == odd


def test_deterministic_given_seed_and_cli(tiny_models, tmp_path):
    from safetensors.numpy import load_file

    assert tiny_model.main([str(tmp_path / "again"), "--flavor", "opt", "--seed", "0"]) == 0
    reference = load_file(tiny_models["opt"] / "model.safetensors")
    again = load_file(tmp_path / "again" / "model.safetensors")
    assert reference.keys() == again.keys()
    assert all(np.array_equal(reference[k], again[k]) for k in reference)
    assert (tiny_models["opt"] / "tokenizer.json").read_text() == (tmp_path / "again" / "tokenizer.json").read_text()

    other = load_file(tiny_model.build_tiny_blip2(tmp_path / "other", flavor="opt", seed=1) / "model.safetensors")
    assert not np.array_equal(reference["language_model.lm_head.weight"], other["language_model.lm_head.weight"])


def test_unknown_flavor_is_refused(tmp_path):
    with pytest.raises(ValueError, match="flavor"):
        tiny_model.build_tiny_blip2(tmp_path, flavor="llama")
