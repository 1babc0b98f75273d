#!/usr/bin/env bash
# The GPU side in one go, for an H100/H200 machine (budget: under 8 minutes):
#   1. installs what is missing (torch, vllm, this project), from $WHEELS if set (machines
#      without an index), else from the package index;
#   2. runs the gpu-marked tests;
#   3. runs bench/engines.py for the full-size opt-2.7b and opt-6.7b configurations with
#      random weights: baseline, our engine, our vLLM engine and bare vLLM, 30 tokens forced,
#      median of 5 rounds of 1,024 images;
# and writes everything to $OUT/gpu.json ($OUT defaults to the current directory).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-.}
PY=${PYTHON:-python3}
mkdir -p "$OUT_DIR"
started=$(date +%s)

install() {
    if [ -n "${WHEELS:-}" ]; then "$PY" -m pip install -q --no-index --find-links "$WHEELS" "$@"
    else "$PY" -m pip install -q "$@"; fi
}
"$PY" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null || install "torch>=2.4,<2.15"
"$PY" -c "import vllm" 2>/dev/null || install "vllm>=0.11,<0.33"
"$PY" -c "import workers, pytest, skimage" 2>/dev/null || install -e '.[test]'
"$PY" -c "import torch, transformers, vllm; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'vllm', vllm.__version__, torch.cuda.get_device_name())" \
    | tee "$OUT_DIR/versions.txt"

timeout 120 "$PY" -m pytest -q -m gpu tests/ -p no:cacheprovider --junitxml "$OUT_DIR/gpu-tests.xml" \
    > "$OUT_DIR/gpu-tests.log" 2>&1
echo "gpu tests: rc=$? ($(tail -1 "$OUT_DIR/gpu-tests.log"))"

for model in opt-2.7b opt-6.7b; do
    timeout 160 "$PY" -m bench.engines --device cuda --model "$model" --images 1024 --baseline-images 16 \
        --rounds 5 --tokens 30 --work-dir "${WORK_DIR:-/tmp/bench-gpu}" --json "$OUT_DIR/engines-$model.json" \
        > "$OUT_DIR/engines-$model.log" 2>&1
    echo "$model: rc=$?"
done

"$PY" - "$OUT_DIR" "$started" <<'PY'
import json, pathlib, sys, time
out, started = pathlib.Path(sys.argv[1]), int(sys.argv[2])
report = {"seconds": round(time.time() - started), "versions": (out / "versions.txt").read_text().strip()}
report["gpu_tests"] = (out / "gpu-tests.log").read_text().strip().splitlines()[-1:]
for model in ("opt-2.7b", "opt-6.7b"):
    path = out / f"engines-{model}.json"
    report[model] = json.loads(path.read_text()) if path.exists() else {"error": (out / f"engines-{model}.log").read_text()[-2000:]}
(out / "gpu.json").write_text(json.dumps(report, indent=2) + "\n")
print(f"wrote {out / 'gpu.json'} after {report['seconds']} s")
PY
