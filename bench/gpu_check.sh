#!/usr/bin/env bash
# GPU check of the fused kernels (issue 5, item 7), for a machine with one CUDA GPU and no network.
#
#   bash bench/gpu_check.sh             # PYTHON=/path/to/python to pick the interpreter
#   bash bench/gpu_check.sh --dry-run   # no GPU: the same Python calls on CPU (tests/test_gpu_check.py)
#
# 1. the kernel tests on CUDA: Triton log-prob / fused CE / fused PPO (tests/test_logprob.py -k cuda)
#    and the GAE / PPO-loss tests, whatever of them selects on cuda/gpu/triton;
# 2. kernel benchmarks at Qwen2.5-7B shapes (H=3584, V=152064, bf16, T=4096 and 16384): fused CE,
#    fused PPO and the no-grad log-prob op against the torch reference path, a matmul-only floor,
#    and Liger-Kernel's fused linear cross entropy where it is installed; time (ms), peak extra
#    memory (CUDA allocator) and the Triton row passes' achieved GB/s (bench/suite_kernels.py --gpu);
# 3. the GAE and PPO-loss Triton kernels' time and GB/s (bench/_kernels_b.py --gpu).
# Each step has its own timeout; the whole script stays under 8 minutes on an H200. The last line
# of each benchmark is one JSON object. Exit status: 0 when every step passed.
#
# --dry-run runs steps 2 and 3 with device="cpu", tiny shapes and TRITON_INTERPRET=1 (the Triton
# kernels run in Triton's interpreter on CPU tensors; perf_counter times, resident-set memory) and
# only collects step 1's tests (on CPU the CUDA ones would skip). Its numbers mean nothing: it proves
# that every import and call of the GPU run works. No nvidia-smi.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
export FASTAGENT_CACHE="${FASTAGENT_CACHE:-/tmp/fastagent-cache}"  # C++ builds of the CPU tests
export PYTHONDONTWRITEBYTECODE=1
status=0
dry=()  # extra benchmark arguments
pytest_mode=()
if [ "${1:-}" = "--dry-run" ]; then
  dry=(--dry-run)
  pytest_mode=(--collect-only)
  export TRITON_INTERPRET=1 FASTAGENT_KERNELS=triton  # before anything imports triton
elif [ $# -gt 0 ]; then
  echo "usage: bash bench/gpu_check.sh [--dry-run]"; exit 2
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, \
'cuda', torch.cuda.is_available())" || exit 1

# fastagent.kernels lives in kernels/ (a package-dir mapping in pyproject.toml): without an install,
# expose it through a throwaway overlay package on PYTHONPATH (links only, nothing is copied). The
# checkout's own fastagent/ (no kernels/) must not come first: pytest runs with -P (no cwd on
# sys.path), and tests/_proc.py keeps PYTHONPATH ahead of the root in its subprocesses.
if ! "$PY" -c "import fastagent.kernels" 2>/dev/null; then
  overlay="$(mktemp -d)/fastagent"
  mkdir -p "$overlay"
  for entry in "$PWD"/fastagent/*; do ln -s "$entry" "$overlay/"; done
  ln -s "$PWD/kernels" "$overlay/kernels"
  export PYTHONPATH="$(dirname "$overlay")${PYTHONPATH:+:$PYTHONPATH}"
  "$PY" -P -c "import fastagent.kernels" || { echo "cannot import fastagent.kernels"; exit 1; }
fi

step() {  # step NAME TIMEOUT_S CMD...: run, time, and record a failure without stopping
  local name="$1" limit="$2"; shift 2
  echo "== $name"
  local t0=$SECONDS
  timeout "$limit" "$@"
  local rc=$?
  echo "== $name: exit $rc in $((SECONDS - t0)) s"
  [ "$rc" -eq 0 ] || status=1
}

tests=(tests/test_logprob.py)
for f in tests/test_gae.py tests/test_ppo_loss.py; do [ -f "$f" ] && tests+=("$f"); done
step "kernel tests on CUDA" 180 "$PY" -P -m pytest -q -p no:cacheprovider "${pytest_mode[@]}" \
  "${tests[@]}" -k "cuda or gpu or triton"
step "lm_head kernels at Qwen2.5-7B shapes" 200 "$PY" bench/suite_kernels.py --gpu "${dry[@]}"
step "GAE and PPO-loss kernels" 90 "$PY" bench/_kernels_b.py --gpu "${dry[@]}"
echo "gpu_check: $([ $status -eq 0 ] && echo PASS || echo FAIL)"
exit $status
