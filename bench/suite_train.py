"""T1: SFT training throughput and peak memory, the lean loop vs a plain transformers loop.

    python bench/throughput.py --suite train                  # SmolLM2-135M-Instruct, fp32, 4 x 512
    python bench/throughput.py --suite train --dtype=bf16     # bf16 autocast over fp32 master weights
    python bench/throughput.py --suite train --quick --model=tiny-random     # CI smoke

Both loops train on the same batches in the same dtype (default: the cpu preset's, dtype=auto, which
is fp32 on CPU; on a CPU without native bf16 (no AVX512-BF16 / AMX) bf16 autocast runs ~3.5x slower
than fp32, measured on one such machine; on one with AMX it runs 1.7x faster: lean 5.1 vs 8.7 s per
step, plain 6.2 vs 12.2, 2026-12-07): realistic agent samples (tests/_sft_data.py: prompts exactly as the policy
sees them, MLAgentBench-format expert turns), each cut to its LAST 512 tokens for this fixed 4 x 512
shape (the trainer itself never cuts a sample; it drops it), trained on the response part only.
  plain: model(input_ids, attention_mask, labels=labels_with_-100).loss.backward(); AdamW.step()
  lean:  what train.py does (imported, not copied): fastagent.lean.keep_freed_memory at process
         start, fastagent.lean.prepare_for_training (sparse tied-embedding gradient, fused RMSNorm
         and SwiGLU), fastagent.train.sft_step (fused linear CE on the trained rows only, fused
         AdamW), the step's 4 samples in micro-batches of the cpu preset's micro_batch_size
         (gradient accumulation); with micro_batch_size=4 as well (one forward, like plain)
Each loop runs in its own subprocess (`python bench/suite_train.py --child ...`), so each peak is
its own: peak memory = growth of the resident set (VmHWM after the loop minus VmRSS before its first
step, the way bench/_measure.py measures): gradients, optimizer state and activations. tokens/s
counts every token of the batch, warm-up steps excluded, at the median timed step; plain and lean
run twice each, alternately (plain, lean, plain, lean), and each one's median is over both runs'
timed steps: this machine's speed drifts by 10-20% over minutes. Output keys end with T1_ratio
(lean over plain tokens/s; target >= 1.3) and T1_mem_ratio (lean over plain peak; target <= 0.7).
T1_alloc_ratio is an ablation: the plain loop given the lean loop's allocator setting alone
(keep_freed_memory), over plain, so the share of T1 that is the allocator's can be read off.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEQ, BATCH = 512, 4
TASKS = ["digits", "car-mpg", "anes-vote", "penguins-size"]


def batches(tokenizer, n: int) -> list[list[tuple[list[int], list[int]]]]:
    """n batches of BATCH samples of exactly SEQ tokens (each sample's last SEQ tokens)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from _sft_data import expert_records

    from fastagent.data import sft_sample
    samples = []
    for r in expert_records(TASKS, episodes=2, seed=0):
        ids, mask = sft_sample(tokenizer, r)
        if len(ids) >= SEQ and sum(mask[-SEQ:]) == sum(mask):  # the whole response stays trained
            samples.append((ids[-SEQ:], mask[-SEQ:]))
    assert len(samples) >= BATCH, f"only {len(samples)} samples of {SEQ} tokens"
    return [[samples[(b * BATCH + i) % len(samples)] for i in range(BATCH)] for b in range(n)]


def _rss_kb(field: str) -> int:
    sys.path.insert(0, str(ROOT / "bench"))
    from _measure import status_kb
    return status_kb(field)


def child(kind: str, model_name: str, dtype: str, micro: int, warmup: int, steps: int) -> dict:
    """One loop in this process: returns tokens/s, s/step and peak memory growth."""
    import gc

    import torch

    sys.path.insert(0, str(ROOT))
    from fastagent.data import sft_collate
    from fastagent.lean import keep_freed_memory, prepare_for_training
    from fastagent.model import load_model
    from fastagent.train import make_optimizer, sft_step

    if kind in ("lean", "plain+alloc"):
        keep_freed_memory()  # as train.py's main does, before anything is allocated
    model, tok = load_model(model_name)  # fp32 master weights
    model.config.use_cache = False
    model.train()
    if kind == "lean":
        prepare_for_training(model)
    amp = torch.bfloat16 if dtype == "bf16" else None
    data = batches(tok, warmup + steps)
    cpu = torch.device("cpu")
    if kind.startswith("plain"):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

        def step(samples):
            b = sft_collate(samples, list(range(BATCH)), tok.pad_token_id)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp is not None):
                loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                             labels=b["labels"]).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        opt = make_optimizer(model, 1e-5, 0.0)

        def step(samples):
            mbs = [sft_collate(samples, list(range(i, i + micro)), tok.pad_token_id) for i in range(0, BATCH, micro)]
            sft_step(model, opt, mbs, 1.0 / sum(b["n_trained"] for b in mbs), amp, 1.0, cpu)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    rss0 = _rss_kb("VmRSS")
    times = []
    for samples in data:
        t0 = time.perf_counter()
        step(samples)
        times.append(time.perf_counter() - t0)
    median = sorted(times[warmup:])[(len(times) - warmup) // 2]
    return {"tokens_per_s": BATCH * SEQ / median, "s_per_step": median,
            "peak_mb": (_rss_kb("VmHWM") - rss0) / 1024, "steps_s": [round(t, 2) for t in times]}


def _spawn(kind: str, model: str, dtype: str, micro: int, warmup: int, steps: int, threads: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, model, dtype, str(micro),
           str(warmup), str(steps), str(threads)]
    # idle OpenMP threads sleep instead of spinning: on a shared 2-core machine a spinning thread that
    # waits for one descheduled by another job's process slowed steps up to 40x (measured here)
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"   {kind:5s} micro {micro}: {res['tokens_per_s']:7.1f} tokens/s, {res['s_per_step']:.2f} s/step, "
          f"peak +{res['peak_mb']:.0f} MB (steps {res['steps_s']})", file=sys.stderr, flush=True)
    return res


def _pool(runs: list[dict], warmup: int) -> dict:
    """One loop's runs pooled: tokens/s at the median of all their timed steps, the highest peak."""
    timed = sorted(t for r in runs for t in r["steps_s"][warmup:])
    median = timed[len(timed) // 2]
    return {"tokens_per_s": BATCH * SEQ / median, "s_per_step": median, "peak_mb": max(r["peak_mb"] for r in runs)}


def run(args) -> dict:
    from fastagent.config import cpu
    model = getattr(args, "model", "") or "smollm2-135m-instruct"
    dtype = getattr(args, "dtype", "") or ("bf16" if cpu().dtype == "bf16" else "fp32")  # auto: fp32 on CPU
    warmup, steps = (1, 2) if args.quick else (2, 4)
    micro = cpu().micro_batch_size
    threads = args.threads or 0
    print(f"   T1: {model}, {dtype}, batch {BATCH} x {SEQ}, {warmup} warm-up + {steps} timed steps per loop",
          file=sys.stderr, flush=True)
    plain_runs, lean_runs = [], []
    for _ in range(1 if args.quick else 2):  # alternately: a drift of the machine's speed hits both alike
        plain_runs.append(_spawn("plain", model, dtype, BATCH, warmup, steps, threads))
        lean_runs.append(_spawn("lean", model, dtype, micro, warmup, steps, threads))
    plain, lean = _pool(plain_runs, warmup), _pool(lean_runs, warmup)
    out = {"T1_model": model, "T1_dtype": dtype, "T1_batch": f"{BATCH}x{SEQ}", "T1_micro_batch_size": micro,
           "T1_plain_tokens_per_s": round(plain["tokens_per_s"], 1),
           "T1_lean_tokens_per_s": round(lean["tokens_per_s"], 1),
           "T1_plain_s_per_step": round(plain["s_per_step"], 3), "T1_lean_s_per_step": round(lean["s_per_step"], 3),
           "T1_plain_peak_mb": round(plain["peak_mb"]), "T1_lean_peak_mb": round(lean["peak_mb"])}
    if not args.quick and micro != BATCH:  # the lean loop in one forward per step, as plain does
        one = _spawn("lean", model, dtype, BATCH, warmup, steps, threads)
        out |= {"T1_lean_mb4_tokens_per_s": round(one["tokens_per_s"], 1), "T1_lean_mb4_peak_mb": round(one["peak_mb"]),
                "T1_mb4_ratio": round(one["tokens_per_s"] / plain["tokens_per_s"], 3),
                "T1_mb4_mem_ratio": round(one["peak_mb"] / plain["peak_mb"], 3)}
        alloc = _spawn("plain+alloc", model, dtype, BATCH, warmup, steps, threads)
        out |= {"T1_plain_alloc_tokens_per_s": round(alloc["tokens_per_s"], 1),
                "T1_alloc_ratio": round(alloc["tokens_per_s"] / plain["tokens_per_s"], 3)}
    out["T1_ratio"] = round(lean["tokens_per_s"] / plain["tokens_per_s"], 3)
    out["T1_mem_ratio"] = round(lean["peak_mb"] / plain["peak_mb"], 3)
    return out


if __name__ == "__main__" and sys.argv[1:2] == ["--child"]:
    kind, model_name, dtype, micro, warmup, steps, threads = sys.argv[2:9]
    if int(threads):
        import torch
        torch.set_num_threads(int(threads))
    print(json.dumps(child(kind, model_name, dtype, int(micro), int(warmup), int(steps))), flush=True)
