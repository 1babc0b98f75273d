"""Our greedy decoding loop over a decoder-only language model with a transformers ``Cache``.

The loop the KV-cache docs show (prefill, then one token per step from the
cache), with the logits processors ``generate`` would build for the settings
we support, applied in the same precision (float32 last-position logits).  It
exists because ``generate`` takes a prefilled cache only through the
deprecated ``past_key_values`` argument, and the image prefix KV reuse needs
one.  Whatever it does not cover goes to plain ``generate``
(:func:`greedy_loop_covers`), so no setting silently changes meaning.
"""

from __future__ import annotations

from typing import Any

from workers.config import GenerationSpec

# The language model's generation_config fields that would change what
# generate() produces, with the value that means "off".  Any other value and
# the engine uses generate() itself.
_OFF = {
    "do_sample": False,
    "num_beams": 1,
    "no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "sequence_bias": None,
    "encoder_repetition_penalty": 1.0,
    "exponential_decay_length_penalty": None,
    "renormalize_logits": False,
    "min_length": 0,
    "diversity_penalty": 0.0,
    "max_time": None,
    "stop_strings": None,
    "watermarking_config": None,
}

# Finished rows are checked every few steps, not every step: the check reads a
# flag back from the GPU, a synchronisation that stalls the launch queue.  The
# extra steps only compute tokens that are trimmed after EOS anyway.
FINISHED_CHECK_EVERY = 4

__all__ = ["FINISHED_CHECK_EVERY", "greedy_loop_covers", "greedy_tokens"]


def greedy_loop_covers(generation: GenerationSpec, model_generation_config: Any) -> bool:
    """Whether :func:`greedy_tokens` gives exactly what ``generate`` gives for these settings.

    Greedy search (one beam) with ``repetition_penalty`` and ``min_new_tokens``,
    and a model generation config that sets nothing else that changes tokens.
    """
    if generation.num_beams != 1:
        return False
    for name, off in _OFF.items():
        value = getattr(model_generation_config, name, off)
        if value is not None and value != off:
            return False
    return True


def greedy_tokens(
    decoder: Any,
    head: Any,
    cache: Any,
    cache_kwarg: str,
    first_embeds: Any,
    seen_ids: Any,
    generation: GenerationSpec,
    eos_ids: set[int],
) -> Any:
    """Greedy new tokens, ``(N, steps)``, continuing ``cache`` with ``first_embeds``.

    ``decoder`` is the language model without its head (``OPTDecoder``), ``head``
    the LM head; ``cache`` holds what came before ``first_embeds`` (the image
    positions, or nothing) and is extended in place; ``cache_kwarg`` is the name
    the decoder's ``forward`` takes it by.  ``seen_ids`` ``(N, L)`` are the ids
    ``generate`` would pass its logits processors (image tokens and prompt), for
    the repetition penalty.  Rows are not trimmed at EOS (the caller does);
    steps stop at ``max_new_tokens`` or once every row has produced an EOS.
    Errors from the model propagate unchanged.
    """
    import torch
    from transformers import MinNewTokensLengthLogitsProcessor, RepetitionPenaltyLogitsProcessor

    n, prompt_len = seen_ids.shape
    steps = generation.max_new_tokens
    device = first_embeds.device
    ids = torch.empty((n, prompt_len + steps), dtype=torch.long, device=device)
    ids[:, :prompt_len] = seen_ids
    processors = []
    if generation.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(penalty=generation.repetition_penalty))
    if generation.min_new_tokens > 0 and eos_ids:
        eos = torch.tensor(sorted(eos_ids), device=device)
        processors.append(MinNewTokensLengthLogitsProcessor(prompt_len, generation.min_new_tokens, eos))
    eos_tensor = torch.tensor(sorted(eos_ids), device=device) if eos_ids else None
    finished = torch.zeros(n, dtype=torch.bool, device=device)

    inputs = {"inputs_embeds": first_embeds}
    done = 0
    for step in range(steps):
        hidden = decoder(**inputs, **{cache_kwarg: cache}, use_cache=True, return_dict=True).last_hidden_state
        # generate() takes the last position's logits in float32 before any processor.
        scores = head(hidden[:, -1:, :])[:, -1, :].to(dtype=torch.float32)
        seen = ids[:, : prompt_len + step]
        for processor in processors:
            scores = processor(seen, scores)
        token = scores.argmax(dim=-1)
        ids[:, prompt_len + step] = token
        done = step + 1
        if eos_tensor is not None:
            finished |= torch.isin(token, eos_tensor)
            if done % FINISHED_CHECK_EVERY == 0 and bool(finished.all()):
                break
        inputs = {"input_ids": token[:, None]}
    return ids[:, prompt_len : prompt_len + done]
