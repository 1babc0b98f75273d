"""Conversation turns: each turn continues the previous turn's key/value cache.

Turn k's prompt is the earlier turns' questions and answers followed by the new
question, tokenized as a whole (the transformers oracle tokenizes it so).  The
cache holds the sequence the previous turn saw and produced; the new prompt's
ids share a prefix with it (the image positions, the earlier prompt, most of
the answer: BPE may merge differently at the joins), so only the cache up to
the longest common prefix is kept and only the rest is prefilled.  Causal
attention makes that the same computation as running the whole prompt again,
and turn k costs its new tokens instead of all of them.

Only our engine's own greedy loop continues a cache (and only with
``FastPath.prefix_cache``).  Everything else (T5, beams, vLLM) runs each
turn's whole prompt: the same tokens, recomputed.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

__all__ = ["Session", "continue_conversations", "first_session"]


@dataclass
class Session:
    """One conversation so far: the ids its cache holds and per-layer ``(keys, values)``, batch 1."""

    ids: tuple[int, ...]
    kv: list[tuple[Any, Any]]


def first_session(engine: Any, prefix: Any, image: int) -> Session | None:
    """The image positions as a session (from the prefix cache), or ``None`` where there is none."""
    if not engine.own_loop or prefix.kv is None:
        return None
    row = slice(image, image + 1)
    return Session((engine.image_token_id,) * engine.num_query_tokens, [(k[row], v[row]) for k, v in prefix.kv])


def _common_prefix(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def continue_conversations(
    engine: Any, prefix: Any, images: list[int], prompts: list[tuple[int, ...]], sessions: list[Session | None]
) -> tuple[list[list[int]], list[Session | None]]:
    """New token ids (cut after EOS) per job, and each job's session after this turn.

    ``prompts[i]`` is the whole prompt of image ``images[i]``'s turn, ``sessions[i]``
    what its previous turn left (``None``: start from the image prefix alone).
    Errors from the model propagate unchanged (the stage isolates them).
    """
    if not engine.own_loop:
        return _recompute(engine, prefix, images, prompts), [None] * len(images)
    reuse = engine.use_prefix_cache  # FastPath.prefix_cache=False: every turn from scratch, as the oracle
    sessions = sessions if reuse else [None] * len(images)
    q = engine.num_query_tokens
    plans = []
    groups: dict[int, list[int]] = defaultdict(list)
    for j, (ids, session) in enumerate(zip(prompts, sessions, strict=True)):
        full = (engine.image_token_id,) * q + tuple(ids)
        keep = _common_prefix(session.ids, full) if session is not None else 0
        plans.append((full, min(keep, len(full) - 1)))  # at least one position prefilled: it starts the answer
        groups[len(full)].append(j)
    tokens: list[list[int]] = [[] for _ in images]
    after: list[Session | None] = [None] * len(images)
    for members in groups.values():
        # One call per prompt length (no padding); it keeps what all its members share.
        keep = min(plans[j][1] for j in members)
        keep = keep if keep >= q else 0  # less than the image positions: start from the image embeddings
        new, cache = _run_group(engine, prefix, [images[j] for j in members], [plans[j][0] for j in members],
                                [sessions[j] for j in members], keep)  # fmt: skip
        steps = new.shape[1]
        for r, j in enumerate(members):
            row = new[r].tolist()
            tokens[j] = engine.trim(row)
            # The cache holds the prompt and every generated token but the last (never fed back).
            kv = [(layer.keys[r : r + 1], layer.values[r : r + 1]) for layer in cache.layers]
            after[j] = Session(plans[j][0] + tuple(row[: steps - 1]), kv) if reuse else None
    return tokens, after


def _run_group(engine, prefix, images, fulls, sessions, keep):
    import torch
    from transformers import DynamicCache

    input_ids = torch.tensor(fulls, dtype=torch.long, device=engine.device)
    cache = DynamicCache()
    image_embeds = None
    if keep:
        for layer in range(len(sessions[0].kv)):
            keys = torch.cat([s.kv[layer][0][:, :, :keep] for s in sessions])
            values = torch.cat([s.kv[layer][1][:, :, :keep] for s in sessions])
            cache.update(keys, values, layer)
    else:
        image_embeds = prefix.embeds.index_select(0, torch.tensor(images, device=prefix.embeds.device))
    return engine.greedy_from(cache, input_ids, keep, image_embeds), cache


def _recompute(engine, prefix, images, prompts) -> list[list[int]]:
    """Each turn's whole prompt through ``engine.generate``, in groups it can batch."""
    groups: dict[Any, list[int]] = defaultdict(list)
    for j, ids in enumerate(prompts):
        groups[engine.group_key(ids)].append(j)
    tokens: list[list[int]] = [[] for _ in images]
    for members in groups.values():
        out = engine.generate(prefix, [images[j] for j in members], [prompts[j] for j in members])
        for j, result in zip(members, out, strict=True):
            tokens[j] = result
    return tokens
