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
# 3. the GAE and PPO-loss Triton kernels' time and GB/s (bench/_kernels_b.py --gpu);
# 4. the HF rollout engine (fastagent/rollout/hf.py) on one GPU: trainer model on cuda, one AdamW
#    step, sync_weights into HFEngine(device="cuda"), 8 prompts x 64 sampled tokens, log-prob parity
#    with trainer_logprobs (fp32 <= 1e-4; bf16 loose), greedy tokens unchanged by sleep(1)/wake and by
#    sleep(2)/wake/sync, memory freed by each sleep; sync seconds and generate tokens/s, for
#    tiny-random and random weights in SmolLM2-135M's shapes. Its result line is `hf_engine {...}`;
# 5. the whole trainer on one GPU (tiny model, smoke preset, HF engine): SFT, 2 RL iterations and the
#    evaluation (2 held-out tasks) under torchrun; its result line is `rl_gpu {...}` (time per RL phase).
# Each step has its own timeout; the whole script should stay under 10 minutes on an H200. The last line
# of each benchmark is one JSON object. Exit status: 0 when every step passed.
#
# --dry-run runs steps 2, 3 and 4 with device="cpu", tiny shapes and TRITON_INTERPRET=1 (the Triton
# kernels run in Triton's interpreter on CPU tensors; perf_counter times, resident-set memory; step
# 4 with 1 layer and 8 tokens) and only collects step 1's tests (on CPU the CUDA ones would skip).
# Its numbers mean nothing: it proves that every import and call of the GPU run works. No nvidia-smi.
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
IFS= read -r -d '' HF_CHECK <<'PY' || true
# HF engine on the GPU: one AdamW step, sync_weights, generate 8 prompts, log-prob parity with the
# trainer, sleep(1)/sleep(2) round trips. Models: tiny-random, and random weights in SmolLM2-135M's
# shapes (built here: the GPU machine has no download). --dry-run: CPU, 1 layer, 8 tokens.
import json, sys, tempfile, time
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from fastagent.model import load_model, resolve_model
from fastagent.rollout import Sampling, WeightVersion, sync_weights, trainer_logprobs
from fastagent.rollout.hf import HFEngine

dry = "--dry-run" in sys.argv[1:]
dev, new_tokens = ("cpu", 8) if dry else ("cuda", 64)
cuda = dev == "cuda"
TOL = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (0.5, 0.05)}  # (max, mean) |engine - trainer| log-prob

def wait():
    if cuda:
        torch.cuda.synchronize()

def allocated_mb():
    return torch.cuda.memory_allocated() / 2**20 if cuda else 0.0

def smollm2_shaped(out):
    tiny = resolve_model("tiny-random")
    cfg = LlamaConfig.from_pretrained(tiny)
    cfg.update(dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=1 if dry else 30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=4096 if dry else 49152,
                    initializer_range=0.02))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny).save_pretrained(out)
    return out

def case(path, dtype):
    model, _ = load_model(path, dtype=dtype, device=dev)
    engine = HFEngine(path, device=dev, dtype=dtype, max_batch=8)
    version = WeightVersion()
    ids = torch.randint(3, 1000, (2, 32), generator=torch.Generator().manual_seed(0)).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    del opt
    model.zero_grad(set_to_none=True)
    model.eval()
    version.advance()
    wait()
    stats = sync_weights(engine, model, version)
    wait()
    prompts = [list(range(10 + i, 26 + 5 * i)) for i in range(8)]  # 16 .. 51 tokens: left padding
    engine.generate(prompts[:1], Sampling(max_new_tokens=2))  # warm-up
    wait()
    t0 = time.perf_counter()
    outs = engine.generate(prompts, Sampling(temperature=1.0, max_new_tokens=new_tokens), version)
    wait()
    gen_s = time.perf_counter() - t0
    ntok = sum(len(row[0].token_ids) for row in outs)
    diff = torch.cat([(torch.tensor(row[0].logprobs) - trainer_logprobs(model, p, row[0].token_ids, 1.0).cpu()).abs()
                      for p, row in zip(prompts, outs)])
    greedy = Sampling(temperature=0, max_new_tokens=8)
    before = engine.generate(prompts, greedy, version)
    mem = [allocated_mb()]
    engine.sleep(1)
    mem.append(allocated_mb())
    engine.wake()
    same1 = [r[0].token_ids for r in engine.generate(prompts, greedy, version)] == [r[0].token_ids for r in before]
    engine.sleep(2)
    mem.append(allocated_mb())
    engine.wake()
    wait()
    t0 = time.perf_counter()
    sync_weights(engine, model, version)
    wait()
    resync_s = time.perf_counter() - t0
    same2 = [r[0].token_ids for r in engine.generate(prompts, greedy, version)] == [r[0].token_ids for r in before]
    weights_mb = stats.bytes / 2**20
    freed1, freed2 = mem[0] - mem[1], mem[0] - mem[2]
    tol_max, tol_mean = TOL[dtype]
    ok = (diff.max().item() <= tol_max and diff.mean().item() <= tol_mean and same1 and same2
          and (not cuda or min(freed1, freed2) >= 0.9 * weights_mb))
    engine.close()
    return ok, {"sync_s": round(stats.seconds, 4), "resync_after_sleep2_s": round(resync_s, 4),
                "weights_mb": round(weights_mb, 1), "gen_tokens": ntok, "gen_s": round(gen_s, 3),
                "gen_tokens_per_s": round(ntok / gen_s, 1), "logprob_max_abs_diff": diff.max().item(),
                "logprob_mean_abs_diff": diff.mean().item(), "tol_max": tol_max, "tol_mean": tol_mean,
                "greedy_same_after_sleep1": same1, "greedy_same_after_sleep2_sync": same2,
                "freed_mb_sleep1": round(freed1, 1), "freed_mb_sleep2": round(freed2, 1), "ok": ok}

res, passed = {"device": torch.cuda.get_device_name() if cuda else "cpu (dry run)"}, True
with tempfile.TemporaryDirectory() as tmp:
    shaped = smollm2_shaped(tmp)
    for name, path, dtype in [("tiny_fp32", resolve_model("tiny-random"), torch.float32),
                              ("smollm2_shape_fp32", shaped, torch.float32),
                              ("smollm2_shape_bf16", shaped, torch.bfloat16)]:
        ok, res[name] = case(path, dtype)
        passed &= ok
        print(name, res[name], flush=True)
print("hf_engine " + json.dumps(res))  # not a bare {...} line: the kernel benchmarks' JSON lines come first
sys.exit(0 if passed else 1)
PY
step "HF engine: sync, generate, sleep on the GPU" 180 "$PY" -P -c "$HF_CHECK" "${dry[@]}"

# 5. The whole trainer on one GPU: train.py --preset=smoke --stage=all (probe, scripted expert data,
# SFT, 2 step-wise RL iterations with the group baseline, evaluation of base/SFT/RL) under torchrun
# with one rank (FSDP2 on one GPU, nccl), the HF engine, the tiny model. Prints `rl_gpu {...}`: the
# time of each RL phase and the log-prob gap per iteration, and whether the eval table came out.
# The task scripts need the task packages (scikit-learn, pandas): without them the step says so.
# --dry-run: the same run with --device=cpu (the real kernels, not the interpreter).
IFS= read -r -d '' RL_CHECK <<'PY' || true
import json, os, subprocess, sys, tempfile
from pathlib import Path
dry = "--dry-run" in sys.argv
try:
    import pandas, sklearn  # noqa: F401  (the bundled tasks' scripts import them)
except ImportError as e:
    sys.exit(f"rl_gpu: the task packages are missing ({e}): carry them or pip install -e . first")
run = Path(tempfile.mkdtemp(prefix="gpu-rl-")) / "run"
env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTAGENT_KERNELS")}
# -m from a scratch folder: fastagent is the one on sys.path (the overlay above, or the install), not the
# checkout's fastagent/ without kernels/ that running the file as a script would put first
cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "fastagent.train",
       "--preset=smoke", "--stage=all", "--engine=hf", "--rl_steps=2", f"--device={'cpu' if dry else 'cuda'}",
       "--eval_tasks=seattle-weather,gunpoint", f"--run_dir={run}"]  # 2 held-out tasks: the plumbing, quickly
out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=run.parent)
tail = out.stdout[-3000:] + (out.stderr[-3000:] if out.returncode else "")
print("\n".join("  " + line for line in tail.splitlines()), flush=True)  # indented: no bare {...} line
rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()] if (run / "metrics.jsonl").exists() else []
rl = [r for r in rows if "rl_update_s" in r]
res = {"rc": out.returncode, "rl_steps": len(rl), "eval_table": (run / "eval" / "table.md").is_file(),
       **{f"step{r['step']}_{k}": round(r[k], 3) for r in rl for k in r
          if k.startswith("rl_") and k.endswith("_s") or k == "rl_logp_gap"}}
print("rl_gpu " + json.dumps(res))
sys.exit(0 if out.returncode == 0 and len(rl) == 2 and res["eval_table"] else 1)
PY
step "trainer: SFT, RL and eval on the GPU" 300 "$PY" -P -c "$RL_CHECK" "${dry[@]}"
echo "gpu_check: $([ $status -eq 0 ] && echo PASS || echo FAIL)"
exit $status
