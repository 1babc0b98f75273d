"""Model engines side by side in one run: baseline, our engine, our vLLM engine, bare vLLM.

``python -m bench.engines [--device cpu|cuda] [--model small|tiny|opt-2.7b|opt-6.7b] [--json out.json]``

Rows, each for captions and for a caption + 3 questions, generation forced to
``--tokens`` new tokens (``min_new_tokens = max_new_tokens``):

``baseline``  the plain transformers loop: ``Blip2Processor`` + ``generate``, one
              image and one prompt at a time (fp32 on CPU, fp16 on CUDA).
``hf``        our model stage with our engine (``--engine hf``) on decode-stage batches.
``vllm``      our model stage with the vLLM engine (``--engine vllm``).
``peer``      bare vLLM, as its users call it: ``LLM.generate`` with text prompts and
              PIL images, one request per (image, prompt).  It shares the ``LLM`` of the
              ``vllm`` row (same settings, one engine process).

Each timed call takes images no earlier call saw (``distinct_images``), so
content-keyed caches never hit between calls.  Rows run one after another
(on a GPU two model copies and vLLM's memory claim would not fit together, and
the baseline's weights are freed before ours load), each for ``--rounds``
rounds after an untimed warm-up on the same images for every row, whose texts
are compared.  Reported: median images/s per row and the ratios.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test helpers, shared not copied
from model_inputs import distinct_images, model_input_table  # noqa: E402

QUESTIONS = ("what is in the picture?", "how many people are there?", "what color is the sky?")
ROWS = ("baseline", "hf", "vllm", "peer")
WARMUP_IMAGES = 8


def prepare_model(name: str, work_dir: Path, device: str) -> Path:
    """A saved BLIP-2 directory: the tiny/small test models, or a full-size config with random weights."""
    from workers.tiny_model import SMALL, TINY, build_blip2

    path = work_dir / name
    if (path / "config.json").exists():
        return path
    if name == "tiny":  # with one text head: vLLM's CPU attention refuses head sizes below 32
        return build_blip2(path, flavor="opt", sizes=TINY.replace(text_heads=1))
    if name == "small":
        return build_blip2(path, flavor="opt", sizes=SMALL)
    import torch

    from bench.benchmark import build_in_memory, full_size

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    net, processor = build_in_memory(full_size(name), "opt", device, dtype)
    net.save_pretrained(path)
    processor.save_pretrained(path)
    del net
    gc.collect()
    return path


def _prompts(questions: bool) -> list[str | None]:
    return [None] + ([f"Question: {q} Answer:" for q in QUESTIONS] if questions else [])


def _texts_from_stage(out) -> list[list[str]]:
    captions, answers = out.column("caption").to_pylist(), out.column("answers").to_pylist()
    return [[c] + [a["answer"] for a in (qa or [])] for c, qa in zip(captions, answers, strict=True)]


class Rows:
    """Runs one row on a list of images and returns each image's texts (caption first)."""

    def __init__(self, model_dir: Path, device: str, tokens: int, threads: int | None) -> None:
        import torch

        from workers.config import GenerationSpec

        self.model_dir, self.device, self.tokens = model_dir, device, tokens
        self.generation = GenerationSpec(max_new_tokens=tokens, min_new_tokens=tokens)
        if threads:
            torch.set_num_threads(threads)
        self._replicas: dict[str, Any] = {}
        self._baseline = None
        self.height = self.width = None

    def start(self, row: str) -> None:
        """Load what ``row`` needs, freeing what the previous rows held."""
        import torch
        from transformers import Blip2Processor

        from bench.benchmark import Baseline
        from workers.config import ModelSpec, PromptSpec
        from workers.replica import Blip2Replica

        if row == "baseline":
            from transformers import Blip2ForConditionalGeneration

            dtype = torch.float16 if self.device == "cuda" else torch.float32
            net = Blip2ForConditionalGeneration.from_pretrained(self.model_dir, dtype=dtype).to(self.device).eval()
            self._baseline = Baseline(net, Blip2Processor.from_pretrained(self.model_dir), self.generation, self.device)
        elif row in ("hf", "vllm") and row not in self._replicas:
            self._free()
            # One replica per engine (one vLLM instance); each variant sets the prompts it asks.
            self._replicas[row] = Blip2Replica(
                ModelSpec(model=str(self.model_dir), engine=row), PromptSpec(), self.generation, device=self.device
            )
        size = Blip2Processor.from_pretrained(self.model_dir).image_processor.size
        self.height, self.width = int(size["height"]), int(size["width"])

    def _free(self) -> None:
        import torch

        self._baseline = None
        self._replicas.pop("hf", None)
        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()

    def run(self, row: str, images: list, questions: bool) -> list[list[str]]:
        import torch

        if row == "baseline":
            return [[self._baseline(image, p) for p in _prompts(questions)] for image in images]
        if row == "peer":
            return self._peer(images, questions)
        from workers.config import PromptSpec

        replica = self._replicas[row]
        replica.prompts = PromptSpec(questions=QUESTIONS if questions else ())
        out = replica(model_input_table(images, self.height, self.width))
        if self.device == "cuda":
            torch.cuda.synchronize()
        return _texts_from_stage(out)

    def _peer(self, images: list, questions: bool) -> list[list[str]]:
        from PIL import Image
        from vllm import SamplingParams

        llm = self._replicas["vllm"].engine.llm
        prompts = _prompts(questions)
        requests = [
            {"prompt": p or "", "multi_modal_data": {"image": Image.fromarray(image)}}
            for image in images
            for p in prompts
        ]
        params = SamplingParams(temperature=0.0, max_tokens=self.tokens, min_tokens=self.tokens)
        outputs = llm.generate(requests, params, use_tqdm=False)
        texts = [o.outputs[0].text.strip() for o in outputs]
        return [texts[i : i + len(prompts)] for i in range(0, len(texts), len(prompts))]


def measure(rows: list[str], model_dir: Path, device: str, images: int, baseline_images: int, rounds: int,
            tokens: int, threads: int | None, log=print) -> dict[str, Any]:  # fmt: skip
    runner = Rows(model_dir, device, tokens, threads)
    results: dict[str, Any] = {}
    warm_texts: dict[tuple[str, bool], list[list[str]]] = {}
    next_image = WARMUP_IMAGES  # images 0..7 are the warm-up set every row sees
    for row in rows:
        started = time.perf_counter()
        runner.start(row)
        log(f"{row}: ready in {time.perf_counter() - started:.1f}s")
        for questions in (False, True):
            variant = "caption+3q" if questions else "caption"
            warm = distinct_images(WARMUP_IMAGES, runner.height, runner.width)
            warm_texts[(row, questions)] = runner.run(row, warm, questions)
            count = baseline_images if row == "baseline" else images
            per_s = []
            for _ in range(rounds):
                batch = distinct_images(count, runner.height, runner.width, start=next_image)
                next_image += count
                t0 = time.perf_counter()
                runner.run(row, batch, questions)
                per_s.append(count / (time.perf_counter() - t0))
            results[f"{row}/{variant}"] = {"row": row, "variant": variant, "images": count, "rounds_per_s": per_s,
                                           "per_s": statistics.median(per_s)}  # fmt: skip
            rounded = [round(x, 2) for x in per_s]
            log(f"{row:9s} {variant:11s} {statistics.median(per_s):8.2f} images/s  rounds {rounded}")
    agreement = {}
    for questions in (False, True):
        variant = "caption+3q" if questions else "caption"
        base = warm_texts.get((rows[0], questions))
        for row in rows[1:]:
            same = sum(a == b for a, b in zip(base, warm_texts[(row, questions)], strict=True))
            agreement[f"{row} vs {rows[0]} ({variant})"] = f"{same}/{WARMUP_IMAGES} images, same texts"
    ratios = {}
    for variant in ("caption", "caption+3q"):
        per_s = {r: results[f"{r}/{variant}"]["per_s"] for r in rows if f"{r}/{variant}" in results}
        for a, b in (("hf", "peer"), ("vllm", "peer"), ("hf", "baseline"), ("vllm", "baseline"), ("peer", "baseline")):
            if a in per_s and b in per_s:
                ratios[f"{a}/{b} ({variant})"] = round(per_s[a] / per_s[b], 3)
    return {"results": results, "ratios": ratios, "agreement": agreement}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.engines", description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    parser.add_argument("--model", default="small", help="tiny, small, opt-2.7b or opt-6.7b (random weights)")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of: {', '.join(ROWS)}")
    parser.add_argument("--images", type=int, default=64, help="images per timed call (default 64)")
    parser.add_argument("--baseline-images", type=int, default=8, help="images per baseline call (default 8)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=20, help="new tokens, forced (default 20)")
    parser.add_argument("--threads", type=int, help="torch threads for baseline and hf (default: torch's)")
    parser.add_argument("--work-dir", type=Path, help="keep the built model here")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    if "peer" in rows and "vllm" not in rows:
        parser.error("--rows: peer shares the vllm row's LLM; include vllm")
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="bench-engines-"))
    model_dir = prepare_model(args.model, work_dir, device)
    report = measure(rows, model_dir, device, args.images, args.baseline_images, args.rounds, args.tokens,
                     args.threads)  # fmt: skip
    report["settings"] = {
        **vars(args),
        "device": device,
        "rows": rows,
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    print(json.dumps({"ratios": report["ratios"], "agreement": report["agreement"]}, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":  # vLLM starts its engine process with spawn
    sys.exit(main())
