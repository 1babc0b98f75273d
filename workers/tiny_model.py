"""A tiny, randomly initialised BLIP-2 saved in Hugging Face format.

Tests and offline smoke runs (``--model tiny-random``) load it through exactly
the path real weights take: ``Blip2ForConditionalGeneration.from_pretrained``
and ``Blip2Processor.from_pretrained`` on a directory holding ``config.json``,
``model.safetensors``, ``preprocessor_config.json``, ``processor_config.json``
and the tokenizer files.  Nothing is downloaded: the tokenizer is trained here,
with the ``tokenizers`` library, on a small built-in English corpus.

Two flavours mirror the two BLIP-2 families:

* ``"opt"``: a decoder-only OPT language model and a byte-level BPE tokenizer
  that, like OPT's, prepends ``</s>`` as BOS (``Salesforce/blip2-opt-*``);
* ``"t5"``: a T5 encoder-decoder (gated-GELU, untied head, like Flan-T5) and a
  Unigram tokenizer that appends ``</s>`` (``Salesforce/blip2-flan-t5-*``).

The ``<image>`` placeholder token is added to the tokenizer and
``config.image_token_index`` points at it, the way the current hub checkpoints
are laid out; ``processor_config.json`` records ``num_query_tokens`` so the
processor expands the placeholder once per query token.

Usage: ``python -m workers.tiny_model OUT_DIR [--flavor opt|t5] [--seed N]``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

FLAVORS = ("opt", "t5")

# Sizes: small enough that loading and generating 30 tokens for a batch of
# images takes well under a second on one CPU core.
IMAGE_SIZE = 32
PATCH_SIZE = 4
VISION_HIDDEN = 32
QFORMER_HIDDEN = 32
TEXT_HIDDEN = 32
NUM_LAYERS = 2
NUM_HEADS = 4
NUM_QUERY_TOKENS = 4
BPE_VOCAB = 512
UNIGRAM_VOCAB = 320
IMAGE_TOKEN = "<image>"
GAIN = 1.0

# OPT-style special tokens (ids 0..3, as in facebook/opt-*): BOS and EOS are both "</s>".
OPT_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
# T5-style special tokens: pad=0, eos=1, unk=2.
T5_SPECIALS = ("<pad>", "</s>", "<unk>")

_CORPUS = """\
a photo of a cat sitting on a red sofa next to a window
a dog running on the beach with a ball in its mouth
two people riding bicycles down a city street at night
an astronaut in a white space suit holding a flag
a cup of coffee on a wooden table with a saucer and a spoon
a rocket on the launch pad under a clear blue sky
a close up of a tabby cat with green eyes
a bowl of fruit with apples, bananas and oranges
a man standing in front of a large building
a woman holding an umbrella in the rain
children playing football in a green park
a train passing through the mountains covered in snow
a plate of food with rice, vegetables and chicken
a black and white picture of an old car parked on the road
a group of birds flying over the ocean at sunset
a small boat on a calm lake surrounded by trees
a kitchen with white cabinets and a stainless steel fridge
a bedroom with a bed, a lamp and a painting on the wall
a bus stopped at a traffic light in the city
a horse grazing in a field of yellow flowers
Question: what is in the picture? Answer: a cat
Question: what color is the sky? Answer: blue
Question: how many people are there? Answer: two
Question: is this photo taken indoors? Answer: no
Question: what is the man holding? Answer: a flag
Question: what animal is this? Answer: a dog
Question: where was this picture taken? Answer: on the beach
Question: what is on the table? Answer: a cup of coffee
Question: what time of day is it? Answer: night
Question: what is the woman wearing? Answer: a red dress
The quick brown fox jumps over the lazy dog. It was a bright, cold day in April.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 2024. Punctuation: , . ! ? ; : ' " ( ) - /
"""


def corpus_lines() -> list[str]:
    """The built-in training corpus, one sentence per line."""
    return [line for line in _CORPUS.splitlines() if line.strip()]


def _train_opt_tokenizer():
    """Byte-level BPE with OPT's special tokens, wrapped as transformers' GPT2Tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Tokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB,
        special_tokens=list(OPT_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_lines(), trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return GPT2Tokenizer(
        vocab=model["vocab"],
        merges=merges,
        unk_token="<unk>",
        bos_token="</s>",
        eos_token="</s>",
        pad_token="<pad>",
        add_bos_token=True,  # OPT prepends </s> to every prompt
        add_prefix_space=False,
    )


def _train_t5_tokenizer():
    """Unigram (SentencePiece-style) with T5's special tokens, wrapped as T5Tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import T5Tokenizer

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    trainer = trainers.UnigramTrainer(
        vocab_size=UNIGRAM_VOCAB,
        special_tokens=list(T5_SPECIALS),
        unk_token="<unk>",
        show_progress=False,
    )
    tok.train_from_iterator(corpus_lines(), trainer=trainer)
    vocab = [(piece, float(score)) for piece, score in json.loads(tok.to_str())["model"]["vocab"]]
    if [piece for piece, _ in vocab[:3]] != list(T5_SPECIALS):
        raise RuntimeError(f"unexpected special-token layout {vocab[:3]}")
    return T5Tokenizer(vocab=vocab, extra_ids=0, eos_token="</s>", unk_token="<unk>", pad_token="<pad>")


def _text_config(flavor: str, vocab_size: int, tokenizer):
    if flavor == "opt":
        from transformers import OPTConfig

        return OPTConfig(
            vocab_size=vocab_size,
            hidden_size=TEXT_HIDDEN,
            word_embed_proj_dim=TEXT_HIDDEN,
            num_hidden_layers=NUM_LAYERS,
            num_attention_heads=NUM_HEADS,
            ffn_dim=4 * TEXT_HIDDEN,
            max_position_embeddings=512,
            dropout=0.0,
            attention_dropout=0.0,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            # Untied, so a random model does not just echo its last input token
            # (after BOS that would be EOS, i.e. an empty caption every time).
            tie_word_embeddings=False,
        )
    from transformers import T5Config

    return T5Config(
        vocab_size=vocab_size,
        d_model=TEXT_HIDDEN,
        d_kv=TEXT_HIDDEN // NUM_HEADS,
        d_ff=2 * TEXT_HIDDEN,
        num_layers=NUM_LAYERS,
        num_decoder_layers=NUM_LAYERS,
        num_heads=NUM_HEADS,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        # T5 has no BOS.  BLIP-2's generate() starts an unprompted caption with
        # [<image> x num_query_tokens, text_config.bos_token_id]; pointing it at
        # </s> makes that identical to tokenizing the empty prompt ("" -> [</s>]),
        # which is what LAVIS feeds Flan-T5 for an unprompted caption.
        bos_token_id=tokenizer.eos_token_id,
    )


def _reinitialise(model, seed: int, gain: float = GAIN) -> None:
    """Give every weight matrix fan-in scaled random values (std ``gain/sqrt(fan_in)``).

    The library's defaults (std 0.02, zero query tokens, 1e-10 for the vision
    tower) suit training from scratch but make a *random* model ignore its
    input: every image would get the same caption, and a test comparing
    per-image outputs would prove nothing.  Fan-in scaling keeps activations
    O(1) through every layer, so different images give different captions.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _name, param in sorted(model.named_parameters()):
            if param.ndim < 2:
                continue  # LayerNorm weights/biases and linear biases keep their defaults
            fan_in = 1
            for dim in param.shape[1:]:
                fan_in *= dim
            param.copy_(torch.randn(param.shape, generator=gen) * (gain / fan_in**0.5))


def build_tiny_blip2(out_dir: Path, flavor: str = "opt", seed: int = 0) -> Path:
    """Build, randomly initialise (deterministically from ``seed``) and save a tiny BLIP-2.

    Returns ``out_dir``, which then loads with ``from_pretrained`` like any
    downloaded checkpoint (safetensors only).
    """
    if flavor not in FLAVORS:
        raise ValueError(f"flavor: must be one of {FLAVORS}, got {flavor!r}")
    import torch
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        Blip2QFormerConfig,
        Blip2VisionConfig,
    )
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = _train_opt_tokenizer() if flavor == "opt" else _train_t5_tokenizer()
    image_processor = BlipImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        resample=3,  # PIL.Image.BICUBIC, as in the real checkpoints
        do_resize=True,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        do_convert_rgb=True,
    )
    # The processor adds <image> as a special token (as for the hub checkpoints).
    Blip2Processor(image_processor, tokenizer, num_query_tokens=NUM_QUERY_TOKENS)
    image_token_index = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    # Exactly the tokenizer's size: with padding rows a random model would
    # often emit ids that decode to nothing.
    vocab_size = len(tokenizer)

    vision_config = Blip2VisionConfig(
        hidden_size=VISION_HIDDEN,
        intermediate_size=4 * VISION_HIDDEN,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        # The default (1e-10) would make every image embed to the same vector,
        # and tests comparing per-image outputs would prove nothing.
        initializer_range=0.02,
    )
    qformer_config = Blip2QFormerConfig(
        vocab_size=128,
        hidden_size=QFORMER_HIDDEN,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        intermediate_size=4 * QFORMER_HIDDEN,
        max_position_embeddings=64,
        cross_attention_frequency=1,
        encoder_hidden_size=VISION_HIDDEN,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    config = Blip2Config(
        vision_config=vision_config.to_dict(),
        qformer_config=qformer_config.to_dict(),
        text_config=_text_config(flavor, vocab_size, tokenizer).to_dict(),
        num_query_tokens=NUM_QUERY_TOKENS,
        image_token_index=image_token_index,
    )

    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG alone
        torch.manual_seed(seed)
        model = Blip2ForConditionalGeneration(config)
    _reinitialise(model, seed)
    model.eval()

    model.save_pretrained(out_dir, safe_serialization=True)
    # The hub checkpoints' layout: preprocessor_config.json for the image
    # processor, the tokenizer files, and a processor_config.json that only
    # records num_query_tokens.
    image_processor.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "processor_config.json").write_text(
        json.dumps({"num_query_tokens": NUM_QUERY_TOKENS, "processor_class": "Blip2Processor"}, indent=2) + "\n"
    )
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers.tiny_model", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--flavor", choices=FLAVORS, default="opt")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = build_tiny_blip2(args.out_dir, flavor=args.flavor, seed=args.seed)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
