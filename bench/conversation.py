"""Conversation turns: continuing each turn's cache against recomputing every turn, side by side in one run.

``python -m bench.conversation [--model small] [--images 32] [--turns 4] [--tokens 20] [--rounds 3]``

Both rows are our model stage on the same decode-stage batches with a
``--turns``-turn conversation (no caption, no independent questions), greedy,
``--tokens`` new tokens forced per turn:

``reuse``      the default: turn k continues turn k-1's key/value cache from the
               longest common prefix of the cached ids and turn k's whole prompt
``recompute``  ``FastPath(prefix_cache=False)``: every turn prefills its whole prompt,
               image positions included, as the transformers oracle does

Reported: median images/s over the rounds (each round on images no earlier call
saw), the ratio, and the positions each row prefilled per turn.
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
    model_dir = build_blip2(Path(tempfile.mkdtemp(prefix="bench-conversation-")) / args.model, sizes=args.model)
    generation = GenerationSpec(max_new_tokens=args.tokens, min_new_tokens=args.tokens)
    prompts = PromptSpec(caption=False, conversation=TURNS[: args.turns])
    rows = {name: Blip2Replica(ModelSpec(model=str(model_dir)), prompts, generation, fast=fast, device="cpu")
            for name, fast in (("reuse", FastPath()), ("recompute", FastPath(prefix_cache=False)))}  # fmt: skip
    prefilled: dict[str, list[int]] = {}
    for name, replica in rows.items():  # count the positions the first forward of every call prefills
        real, widths = replica.engine.decoder, prefilled.setdefault(name, [])

        def spy(real=real, widths=widths, **kwargs):
            if "inputs_embeds" in kwargs:
                widths.append(kwargs["inputs_embeds"].shape[1])
            return real(**kwargs)

        replica.engine.decoder = spy
    engine = rows["reuse"].engine
    warm = model_input_table(distinct_images(4, engine.height, engine.width), engine.height, engine.width)
    texts = {name: replica(warm).column("conversation").to_pylist() for name, replica in rows.items()}
    per_prefill = {name: list(widths) for name, widths in prefilled.items()}
    per_s: dict[str, list[float]] = {name: [] for name in rows}
    start = 4
    for _ in range(args.rounds):
        for name, replica in rows.items():
            batch = distinct_images(args.images, engine.height, engine.width, start=start)
            start += args.images
            t0 = time.perf_counter()
            replica(model_input_table(batch, engine.height, engine.width))
            per_s[name].append(args.images / (time.perf_counter() - t0))
    report = {
        "per_s": {name: statistics.median(v) for name, v in per_s.items()},
        "rounds_per_s": per_s,
        "ratio": statistics.median(per_s["reuse"]) / statistics.median(per_s["recompute"]),
        "same_texts": texts["reuse"] == texts["recompute"],
        "warmup_prefill_widths": per_prefill,
        "settings": {**vars(args), "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                     "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},  # fmt: skip
    }
    print(json.dumps(report, indent=2, default=str))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
