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

A second size, ``"small"`` (:func:`build_small_blip2`), is a CPU-sized
BLIP-2 with the real model's shape (224 px input, patch 14, 32 query tokens,
a multi-layer Q-Former with cross-attention every other layer) but narrow and
shallow towers: big enough that the vision encoder and batched generation cost
what they cost in the real model relative to each other, small enough for
benchmarks and fidelity tests on two CPU cores.  :class:`Sizes` also describes
the full-size configurations the benchmark builds (see ``bench/benchmark.py``).

Usage: ``python -m workers.tiny_model OUT_DIR [--flavor opt|t5] [--seed N] [--size tiny|small]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Sizes:
    """The shape of a BLIP-2: vision tower, Q-Former, language model.

    ``text_vocab=None`` sizes the language model's vocabulary to the tokenizer
    (the tiny and small models); a number forces it (full-size configs, whose
    real vocabulary is larger than the locally trained tokenizer's).
    """

    image_size: int = IMAGE_SIZE
    patch_size: int = PATCH_SIZE
    vision_hidden: int = VISION_HIDDEN
    vision_layers: int = NUM_LAYERS
    vision_heads: int = NUM_HEADS
    vision_intermediate: int = 4 * VISION_HIDDEN
    qformer_hidden: int = QFORMER_HIDDEN
    qformer_layers: int = NUM_LAYERS
    qformer_heads: int = NUM_HEADS
    qformer_intermediate: int = 4 * QFORMER_HIDDEN
    qformer_vocab: int = 128
    qformer_max_positions: int = 64
    cross_attention_frequency: int = 1
    num_query_tokens: int = NUM_QUERY_TOKENS
    text_hidden: int = TEXT_HIDDEN
    text_layers: int = NUM_LAYERS
    text_heads: int = NUM_HEADS
    text_ffn: int | None = None  # None: 4x hidden for OPT, 2x for T5 (the tiny model's choice)
    text_vocab: int | None = None
    text_max_positions: int = 512
    t5_relative_buckets: int = 8
    t5_relative_max_distance: int = 32

    def replace(self, **changes) -> Sizes:
        return dataclasses.replace(self, **changes)


TINY = Sizes()
# CPU-sized but shaped like the real thing: 224 px / patch 14 -> 256 patches, 32
# query tokens, Q-Former cross-attention every other layer (as in BLIP-2).
# About 11 M vision + 5 M Q-Former + 20 M language-model parameters.
SMALL = Sizes(
    image_size=224,
    patch_size=14,
    vision_hidden=256,
    vision_layers=6,
    vision_heads=4,
    vision_intermediate=1024,
    qformer_hidden=256,
    qformer_layers=4,
    qformer_heads=4,
    qformer_intermediate=1024,
    qformer_max_positions=512,
    cross_attention_frequency=2,
    num_query_tokens=32,
    text_hidden=512,
    text_layers=6,
    text_heads=8,
    text_ffn=2048,
    t5_relative_buckets=32,
    t5_relative_max_distance=128,
)
SIZES = {"tiny": TINY, "small": SMALL}

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


def _text_config(flavor: str, vocab_size: int, tokenizer, sizes: Sizes = TINY):
    if flavor == "opt":
        from transformers import OPTConfig

        return OPTConfig(
            vocab_size=vocab_size,
            hidden_size=sizes.text_hidden,
            word_embed_proj_dim=sizes.text_hidden,
            num_hidden_layers=sizes.text_layers,
            num_attention_heads=sizes.text_heads,
            ffn_dim=sizes.text_ffn or 4 * sizes.text_hidden,
            max_position_embeddings=sizes.text_max_positions,
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
        d_model=sizes.text_hidden,
        d_kv=sizes.text_hidden // sizes.text_heads,
        d_ff=sizes.text_ffn or 2 * sizes.text_hidden,
        num_layers=sizes.text_layers,
        num_decoder_layers=sizes.text_layers,
        num_heads=sizes.text_heads,
        relative_attention_num_buckets=sizes.t5_relative_buckets,
        relative_attention_max_distance=sizes.t5_relative_max_distance,
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


def train_tokenizer(flavor: str):
    """The flavour's tokenizer, trained on the built-in corpus (deterministic)."""
    if flavor not in FLAVORS:
        raise ValueError(f"flavor: must be one of {FLAVORS}, got {flavor!r}")
    return _train_opt_tokenizer() if flavor == "opt" else _train_t5_tokenizer()


def make_image_processor(sizes: Sizes = TINY):
    """The PIL-backend BLIP image processor at ``sizes.image_size`` (bicubic, CLIP mean/std)."""
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    return BlipImageProcessorPil(
        size={"height": sizes.image_size, "width": sizes.image_size},
        resample=3,  # PIL.Image.BICUBIC, as in the real checkpoints
        do_resize=True,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        do_convert_rgb=True,
    )


def make_processor(tokenizer, sizes: Sizes = TINY):
    """A ``Blip2Processor``; as for the hub checkpoints it adds ``<image>`` to the tokenizer."""
    from transformers import Blip2Processor

    return Blip2Processor(make_image_processor(sizes), tokenizer, num_query_tokens=sizes.num_query_tokens)


def blip2_config(flavor: str, tokenizer, sizes: Sizes = TINY):
    """A ``Blip2Config`` of shape ``sizes`` for ``tokenizer`` (which must already hold ``<image>``)."""
    from transformers import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig

    image_token_index = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    # Exactly the tokenizer's size unless forced: with padding rows a random
    # model would often emit ids that decode to nothing.
    vocab_size = sizes.text_vocab or len(tokenizer)

    vision_config = Blip2VisionConfig(
        hidden_size=sizes.vision_hidden,
        intermediate_size=sizes.vision_intermediate,
        num_hidden_layers=sizes.vision_layers,
        num_attention_heads=sizes.vision_heads,
        image_size=sizes.image_size,
        patch_size=sizes.patch_size,
        # The default (1e-10) would make every image embed to the same vector,
        # and tests comparing per-image outputs would prove nothing.
        initializer_range=0.02,
    )
    qformer_config = Blip2QFormerConfig(
        vocab_size=sizes.qformer_vocab,
        hidden_size=sizes.qformer_hidden,
        num_hidden_layers=sizes.qformer_layers,
        num_attention_heads=sizes.qformer_heads,
        intermediate_size=sizes.qformer_intermediate,
        max_position_embeddings=sizes.qformer_max_positions,
        cross_attention_frequency=sizes.cross_attention_frequency,
        encoder_hidden_size=sizes.vision_hidden,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return Blip2Config(
        vision_config=vision_config.to_dict(),
        qformer_config=qformer_config.to_dict(),
        text_config=_text_config(flavor, vocab_size, tokenizer, sizes).to_dict(),
        num_query_tokens=sizes.num_query_tokens,
        image_token_index=image_token_index,
    )


def build_blip2(out_dir: Path, flavor: str = "opt", seed: int = 0, sizes: Sizes | str = TINY) -> Path:
    """Build, randomly initialise (deterministically from ``seed``) and save a BLIP-2 of shape ``sizes``.

    ``sizes`` is a :class:`Sizes` or a name in :data:`SIZES`.  Returns
    ``out_dir``, which then loads with ``from_pretrained`` like any downloaded
    checkpoint (safetensors only).
    """
    if flavor not in FLAVORS:
        raise ValueError(f"flavor: must be one of {FLAVORS}, got {flavor!r}")
    if isinstance(sizes, str):
        if sizes not in SIZES:
            raise ValueError(f"size: must be one of {tuple(SIZES)}, got {sizes!r}")
        sizes = SIZES[sizes]
    import torch
    from transformers import Blip2ForConditionalGeneration

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = train_tokenizer(flavor)
    processor = make_processor(tokenizer, sizes)  # adds <image> to the tokenizer
    config = blip2_config(flavor, tokenizer, sizes)

    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG alone
        torch.manual_seed(seed)
        model = Blip2ForConditionalGeneration(config)
    _reinitialise(model, seed)
    model.eval()

    model.save_pretrained(out_dir, safe_serialization=True)
    # The hub checkpoints' layout: preprocessor_config.json for the image
    # processor, the tokenizer files, and a processor_config.json that only
    # records num_query_tokens.
    processor.image_processor.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "processor_config.json").write_text(
        json.dumps({"num_query_tokens": sizes.num_query_tokens, "processor_class": "Blip2Processor"}, indent=2) + "\n"
    )
    return out_dir


def build_tiny_blip2(out_dir: Path, flavor: str = "opt", seed: int = 0) -> Path:
    """Build, randomly initialise (deterministically from ``seed``) and save a tiny BLIP-2.

    Returns ``out_dir``, which then loads with ``from_pretrained`` like any
    downloaded checkpoint (safetensors only).
    """
    return build_blip2(out_dir, flavor=flavor, seed=seed, sizes=TINY)


def build_small_blip2(out_dir: Path, flavor: str = "opt", seed: int = 0) -> Path:
    """Like :func:`build_tiny_blip2` with the CPU-sized :data:`SMALL` shape (224 px, 32 query tokens)."""
    return build_blip2(out_dir, flavor=flavor, seed=seed, sizes=SMALL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers.tiny_model", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--flavor", choices=FLAVORS, default="opt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", choices=tuple(SIZES), default="tiny")
    args = parser.parse_args(argv)
    path = build_blip2(args.out_dir, flavor=args.flavor, seed=args.seed, sizes=args.size)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
