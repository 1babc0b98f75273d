"""Conversation turns: continuing each turn's cache against recomputing every turn, side by side in one run.

``python -m bench.conversation [--model small] [--images 32] [--turns 4] [--tokens 20] [--rounds 3]``

Both rows are our model stage on the same decode-stage batches with a
``--turns``-turn conversation (no caption, no independent questions), greedy,
``--tokens`` new tokens forced per turn:

``reuse``      the default: turn k continues turn k-1's key/value cache from the
               longest common prefix of the cached ids and turn k's whole prompt
``recompute``  ``FastPath(prefix_cache=False)``: every turn prefills its whole prompt,
               image positions included, as the transformers oracle does

for two models of the same shape and weights:

``random``       the random-weight model: its answers are byte-level BPE soup that
                 tokenizes back to other ids, so a turn keeps the earlier prompts only
``whole-words``  the same model barred from all but whole words and EOS
                 (tests/whole_words.py), as a trained model answers: the earlier
                 answers tokenize back to their ids and are kept too

Reported: median images/s over the rounds (each round on new images, the same for every row),
the ratio, and the positions x rows every prefill forward computed, for the
warm-up batch and for all timed rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test helpers, shared not copied
from model_inputs import distinct_images, model_input_table  # noqa: E402
from whole_words import build_whole_words_blip2  # noqa: E402

TURNS = ("what is in the picture?", "what is the man doing?", "what color is it?", "where is this?",
         "why?", "how many are there?")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.conversation", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small", choices=("tiny", "small"))
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--turns", type=int, default=4, choices=range(1, len(TURNS) + 1))
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from workers.config import GenerationSpec, ModelSpec, PromptSpec
    from workers.fast_path import FastPath
    from workers.replica import Blip2Replica
    from workers.tiny_model import build_blip2

    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="bench-conversation-"))
    models = {"random": build_blip2(root / args.model, sizes=args.model),
              "whole-words": build_whole_words_blip2(root / f"{args.model}-words", sizes=args.model)}  # fmt: skip
    generation = GenerationSpec(max_new_tokens=args.tokens, min_new_tokens=args.tokens)
    prompts = PromptSpec(caption=False, conversation=TURNS[: args.turns])
    rows = {(model, name): Blip2Replica(ModelSpec(model=str(path)), prompts, generation, fast=fast, device="cpu")
            for model, path in models.items()
            for name, fast in (("reuse", FastPath()), ("recompute", FastPath(prefix_cache=False)))}  # fmt: skip
    counts = {row: [0] for row in rows}  # positions x rows of every prefill forward, since the last reset
    for row, replica in rows.items():
        real = replica.engine.decoder

        def spy(real=real, count=counts[row], **kwargs):
            if "inputs_embeds" in kwargs:  # a prefill; decode steps pass input_ids
                count[0] += kwargs["inputs_embeds"].shape[0] * kwargs["inputs_embeds"].shape[1]
            return real(**kwargs)

        replica.engine.decoder = spy
    engine = rows["random", "reuse"].engine
    warm = model_input_table(distinct_images(4, engine.height, engine.width), engine.height, engine.width)
    texts = {row: replica(warm).column("conversation").to_pylist() for row, replica in rows.items()}
    warm_prefilled = {row: c[0] for row, c in counts.items()}
    for c in counts.values():
        c[0] = 0
    per_s: dict[tuple[str, str], list[float]] = {row: [] for row in rows}
    start = 4
    for _ in range(args.rounds):
        batch = distinct_images(args.images, engine.height, engine.width, start=start)
        start += args.images
        for row, replica in rows.items():  # the same new images for every row, rows alternating
            t0 = time.perf_counter()
            replica(model_input_table(batch, engine.height, engine.width))
            per_s[row].append(args.images / (time.perf_counter() - t0))
    report: dict = {"settings": {**vars(args), "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                                 "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}}  # fmt: skip
    for model in models:
        reuse, recompute = (model, "reuse"), (model, "recompute")
        report[model] = {
            "per_s": {name: statistics.median(per_s[model, name]) for name in ("reuse", "recompute")},
            "rounds_per_s": {name: per_s[model, name] for name in ("reuse", "recompute")},
            "ratio": statistics.median(per_s[reuse]) / statistics.median(per_s[recompute]),
            "same_texts": texts[reuse] == texts[recompute],
            "prefilled_positions_x_rows": {
                "warmup": {name: warm_prefilled[model, name] for name in ("reuse", "recompute")},
                "timed_rounds": {name: counts[model, name][0] for name in ("reuse", "recompute")},
            },
        }
    print(json.dumps(report, indent=2, default=str))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
