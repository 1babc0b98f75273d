"""A tiny OPT BLIP-2 whose answers are whole words, so they tokenize back to the ids that were generated.

The random tiny model's answers are byte-level BPE soup: decoded and tokenized
again inside the next turn's prompt, they merge differently, so a conversation
turn cannot keep the earlier answer's cache (``workers/conversation.py``).  A
trained model answers in words.  :func:`build_whole_words_blip2` builds the
usual tiny (or small) model and then bars every token but whole words of the
tokenizer's vocabulary and EOS from the language model's greedy choice, in its
weights, so the transformers oracle and our engine see the same model.
Used by tests/test_conversation.py and bench/conversation.py; not the product.
"""

from __future__ import annotations

from pathlib import Path

from workers.tiny_model import TINY, Sizes, build_blip2, corpus_lines

# Where a barred token's logit sits: an allowed token's logit is bounded by
# |its LM head row| x |final layer norm output|, a few units for these models.
BARRED_LOGIT = -1000.0


def whole_word_ids(tokenizer) -> list[int]:
    """Ids of tokens that are a word of the training corpus with its leading space (" cat").

    Each tokenizes back to itself, alone or between other words and
    punctuation: byte-level BPE never merges across the space before a word.
    """
    words = {w for line in corpus_lines() for w in line.lower().split() if w.isalpha()}
    return sorted(
        i
        for i in tokenizer.get_vocab().values()
        if (text := tokenizer.decode([i])).startswith(" ")
        and text[1:] in words
        and tokenizer(text, add_special_tokens=False)["input_ids"] == [i]
    )


def build_whole_words_blip2(out_dir: Path, sizes: Sizes | str = TINY, seed: int = 0) -> Path:
    """The OPT model of :func:`build_blip2`, re-saved so its greedy tokens are whole words or EOS.

    The final layer norm's first channel becomes the constant 1 (weight 0, bias
    1); the LM head reads it with weight 0 for allowed tokens and
    :data:`BARRED_LOGIT` for the others, whose other weights are zeroed: a
    barred token's logit is exactly ``BARRED_LOGIT`` whatever the input.
    Raises ``RuntimeError`` if the vocabulary holds too few words to answer with.
    """
    import torch
    from transformers import AutoTokenizer, Blip2ForConditionalGeneration

    out_dir = build_blip2(Path(out_dir), flavor="opt", seed=seed, sizes=sizes)
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    words = whole_word_ids(tokenizer)
    if len(words) < 20:
        raise RuntimeError(f"only {len(words)} whole-word tokens in the tiny vocabulary")
    model = Blip2ForConditionalGeneration.from_pretrained(out_dir)
    head = model.get_output_embeddings().weight
    allowed = torch.zeros(head.shape[0], dtype=torch.bool)
    allowed[words + [tokenizer.eos_token_id]] = True
    norm = model.language_model.get_decoder().final_layer_norm
    with torch.no_grad():
        norm.weight[0], norm.bias[0] = 0.0, 1.0
        head[~allowed] = 0.0
        head[~allowed, 0] = BARRED_LOGIT
        head[allowed, 0] = 0.0
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir
