"""K2 (GAE) and K3 (PPO loss) benchmarks; bench/suite_kernels.py merges bench_gae and bench_ppo.

    python bench/throughput.py --suite kernels [--quick] [--threads 2]
    python bench/_kernels_b.py [--quick]                 # just K2/K3, 2 threads
    python bench/_kernels_b.py --gpu [--dry-run]       # Triton GAE / PPO on CUDA (bench/gpu_check.sh);
                                                       # --dry-run: same calls on CPU, Triton interpreter

K2_speedup    gae_ref (the usual Python loop over t) time / gae (C++ kernel) time, (B=64, T=2048)
              with a mask with holes and right padding; target >= 50
K3_speedup    ppo_loss_ref (eager torch) fwd+bwd / ppo_loss (fused) fwd+bwd, B*T = 64*2048 tokens,
              clip-higher + dual clip + k3 KL + entropy bonus, fp32; target >= 2
K3_mem_ratio  fused / eager intermediate memory over one fwd+bwd; target <= 0.33. Each variant runs
              in a fresh subprocess with MALLOC_MMAP_THRESHOLD_=65536, so every (N,) tensor is its
              own mapping and freeing it returns its pages at once; intermediate memory = growth of
              the peak resident set (VmHWM, reset via /proc/self/clear_refs) over the resident set
              just before the timed call (inputs allocated, one warm-up done, grads cleared). The
              gradients of logp and entropy both produce count in both variants.
K3_saved_ratio the same comparison counted exactly: bytes of non-input tensors saved for backward
              (saved_tensors_hooks); a cross-check of K3_mem_ratio without allocator effects.
Times are minima over repeats, variants interleaved so machine load hits both; --quick uses
(B=16, T=256) for the times (memory is always measured at the full size). bench_gae_gpu /
bench_ppo_gpu (Triton on CUDA, `--gpu`) report kernel time and achieved GB/s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import device_ms, peak_extra_bytes, status_kb  # noqa: E402


PPO_CFG = dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0, kl_coef=0.05, kl_estimator="k3",
               entropy_coef=0.01)


def _gae_inputs(B: int, T: int, device="cpu"):
    g = torch.Generator().manual_seed(0)
    rewards = 0.1 * torch.randn(B, T, generator=g)
    values = torch.randn(B, T, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.2  # holes: observation tokens
    mask &= torch.arange(T)[None, :] < torch.randint(T // 2, T + 1, (B, 1), generator=g)  # padding
    return rewards.to(device), values.to(device), mask.to(device)


def _ppo_inputs(n: int, device="cpu", dtype=torch.float32):
    """logp, old_logp, adv, weight, ref_logp, entropy (n,); weight a token mean over a mask."""
    from fastagent.kernels import token_mean_weights

    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(n, generator=g) * 4
    old_logp = logp + 0.3 * torch.randn(n, generator=g)
    adv = torch.randn(n, generator=g)
    weight = token_mean_weights(torch.rand(n, generator=g) > 0.2)
    ref_logp = logp + 0.2 * torch.randn(n, generator=g)
    entropy = torch.rand(n, generator=g) * 3
    pol = [t.to(device, dtype) for t in (logp, old_logp, ref_logp, entropy)]
    return pol[0], pol[1], adv.to(device), weight.to(device), pol[2], pol[3]


def _ppo_step(variant: str, inputs):
    """A closure running one fwd+bwd of the eager reference or the fused op; grads are left on
    fresh leaves (logp, entropy) that the closure returns."""
    from fastagent.kernels import ppo_loss, ppo_loss_ref

    fn = ppo_loss_ref if variant == "eager" else ppo_loss
    logp, old_logp, adv, weight, ref_logp, entropy = inputs

    def step():
        logp.grad = entropy.grad = None
        loss, _ = fn(logp, old_logp, adv, weight, ref_logp, entropy, **PPO_CFG)
        loss.backward()
    return step


def _min_time(fns: dict, rounds: int, inner: dict | None = None) -> dict:
    """Minimum seconds per call of each fn; every round runs each fn inner[name] times (default 1),
    rounds interleave the fns so that machine load hits all of them."""
    inner = inner or {}
    best = {k: float("inf") for k in fns}
    for f in fns.values():
        f()  # warm-up: C++ build/load, dispatcher caches
    for _ in range(rounds):
        for k, f in fns.items():
            for _ in range(inner.get(k, 1)):
                t0 = time.perf_counter()
                f()
                best[k] = min(best[k], time.perf_counter() - t0)
    return best


def bench_gae(quick: bool) -> dict:
    """K2: Python loop over t (gae_ref) vs the C++ kernel, same padded inputs with a mask."""
    from fastagent.kernels import gae, gae_ref

    B, T = (16, 256) if quick else (64, 2048)
    r, v, m = _gae_inputs(B, T)
    cu = torch.arange(B + 1, dtype=torch.int64) * T  # the same rows as a packed (N,) layout
    best = _min_time({
        "ref": lambda: gae_ref(r, v, m, gamma=0.99, lam=0.95),
        "cpp": lambda: gae(r, v, m, gamma=0.99, lam=0.95),
        "cpp_packed": lambda: gae(r.flatten(), v.flatten(), m.flatten(), cu_seqlens=cu, gamma=0.99,
                                  lam=0.95),
    }, rounds=3 if quick else 5, inner={"cpp": 20, "cpp_packed": 20})  # the loop is ~100x slower
    return {"K2_speedup": round(best["ref"] / best["cpp"], 1),
            "K2_ref_ms": round(best["ref"] * 1e3, 2), "K2_cpp_ms": round(best["cpp"] * 1e3, 3),
            "K2_cpp_packed_ms": round(best["cpp_packed"] * 1e3, 3), "K2_shape": [B, T]}


# ---------------------------------------------------------------- K3 memory (fresh subprocesses)
def _saved_bytes(step, inputs) -> int:
    """Bytes of tensors saved for backward that are not inputs (deduplicated by storage)."""
    input_ptrs = {t.untyped_storage().data_ptr() for t in inputs}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in input_ptrs:
            seen[ptr] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())


def mem_worker(variant: str, n: int, threads: int) -> dict:
    """Run in a fresh process: peak extra resident memory (KiB) of one fwd+bwd, and saved bytes."""
    torch.set_num_threads(threads)
    inputs = _ppo_inputs(n)
    for t in (inputs[0], inputs[5]):
        t.requires_grad_()
    step = _ppo_step(variant, inputs)
    step()
    saved = _saved_bytes(step, inputs)
    inputs[0].grad = inputs[5].grad = None
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    before = status_kb("VmRSS")
    step()
    peak = status_kb("VmHWM")
    return {"peak_extra_kb": peak - before, "saved_bytes": saved}


def _run_mem_worker(variant: str, n: int, threads: int) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--mem-worker", variant,
                          str(n), str(threads)], env=env, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"K3 memory worker {variant} failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_ppo(quick: bool) -> dict:
    """K3: eager torch PPO loss fwd+bwd vs the fused op: time ratio and intermediate memory ratio."""
    n = 16 * 256 if quick else 64 * 2048
    threads = torch.get_num_threads()
    steps = {}
    for variant in ("eager", "fused"):
        inputs = _ppo_inputs(n)
        for t in (inputs[0], inputs[5]):
            t.requires_grad_()
        steps[variant] = _ppo_step(variant, inputs)
    best = _min_time(steps, rounds=20 if quick else 50)
    # memory always at the full size: at --quick sizes the tensors fall under the mmap threshold
    mem = {v: _run_mem_worker(v, 64 * 2048, threads) for v in ("eager", "fused")}
    ratio = mem["fused"]["peak_extra_kb"] / max(mem["eager"]["peak_extra_kb"], 1)
    return {"K3_speedup": round(best["eager"] / best["fused"], 2),
            "K3_eager_ms": round(best["eager"] * 1e3, 3), "K3_fused_ms": round(best["fused"] * 1e3, 3),
            "K3_mem_ratio": round(ratio, 3),
            "K3_eager_peak_extra_mb": round(mem["eager"]["peak_extra_kb"] / 1024, 2),
            "K3_fused_peak_extra_mb": round(mem["fused"]["peak_extra_kb"] / 1024, 2),
            "K3_saved_ratio": round(mem["fused"]["saved_bytes"] / max(mem["eager"]["saved_bytes"], 1), 3),
            "K3_tokens": n}


# ---------------------------------------------------------------- GPU (Triton), for gpu_check.sh
# Kernel times go through the Triton launchers (_gae_triton, _ppo_fwd_triton: what gae() and the
# PPO ops call on CUDA), so the dry run (gpu_check.sh --dry-run: device="cpu", DRY_* shapes,
# TRITON_INTERPRET=1) runs the same Triton kernels in the interpreter; op-level comparisons go
# through the public ops (C++ on CPU). Each kernel result is checked against the torch path first.
GAE_SHAPES, GAE_DRY = ((64, 2048), (1024, 8192)), ((2, 64), (3, 300))
PPO_SIZES, PPO_DRY = (64 * 2048, 1 << 24), (2000, 5000)


def bench_gae_gpu(shapes=GAE_SHAPES, peak_gbs: float = 4800.0, device: str = "cuda") -> dict:
    """Triton GAE: kernel time, achieved GB/s (reads r, v, mask; writes adv, ret) and its share of
    the HBM peak (H200: ~4800 GB/s); at the first shape also gae() vs the gae_ref loop."""
    from fastagent.kernels import gae, gae_ref
    from fastagent.kernels.gae import _gae_triton

    out = {}
    for i, (B, T) in enumerate(shapes):
        r, v, m = _gae_inputs(B, T, device=device)  # (B, T) fp32, fp32, bool
        cu = torch.arange(B + 1, device=device, dtype=torch.int64) * T  # the rows as packed (N,)
        flat = (r.flatten(), v.flatten(), m.flatten(), cu, 0.99, 0.95)
        key = f"gae_gpu_{B}x{T}"
        if i == 0:
            adv, ret = _gae_triton(*flat)
            adv_ref, ret_ref = gae_ref(r, v, m, gamma=0.99, lam=0.95)
            err = max((adv.view(B, T) - adv_ref).abs().max().item(),
                      (ret.view(B, T) - ret_ref).abs().max().item())  # host sync
            assert err <= 1e-4, f"Triton GAE vs gae_ref: max error {err:.2e}"
            ref_ms = device_ms(lambda: gae_ref(r, v, m, gamma=0.99, lam=0.95), device)
            op_ms = device_ms(lambda: gae(r, v, m, gamma=0.99, lam=0.95), device)
            out[f"{key}_speedup_vs_loop"] = round(ref_ms / op_ms, 1)
        ms = device_ms(lambda: _gae_triton(*flat), device)
        gbs = B * T * (4 + 4 + 1 + 4 + 4) / (ms * 1e-3) / 1e9
        out.update({f"{key}_us": round(ms * 1e3, 1), f"{key}_gbs": float(f"{gbs:.4g}"),
                    f"{key}_hbm_frac": float(f"{gbs / peak_gbs:.3g}")})
    return out


def bench_ppo_gpu(sizes=PPO_SIZES, dtype=torch.float32, peak_gbs: float = 4800.0,
                  device: str = "cuda") -> dict:
    """Triton PPO loss: forward kernel time and GB/s (reads 6 (N,) tensors, writes dlogp), fused
    fwd+bwd vs eager fwd+bwd time ratio, and the peak-extra-memory ratio."""
    from fastagent.kernels.ppo_loss import _ppo_fwd_torch, _ppo_fwd_triton, _prep

    cfg = PPO_CFG
    consts = (cfg["clip_low"], cfg["clip_high"], cfg["dual_clip"], cfg["kl_coef"],
              cfg["kl_estimator"] == "k3", cfg["entropy_coef"])  # the launchers' positional floats
    out = {}
    for n in sizes:
        inputs = _ppo_inputs(n, device=device, dtype=dtype)
        flat = _prep(*inputs)  # (N,) contiguous: what ppo_loss hands the kernel
        sums, dlogp = _ppo_fwd_triton(*flat, *consts)
        sums_ref, dlogp_ref = _ppo_fwd_torch(*flat, *consts)
        err = max((sums - sums_ref).abs().max().item(), (dlogp - dlogp_ref).abs().max().item())
        assert err <= 1e-4, f"Triton PPO forward vs torch: max error {err:.2e}"
        es = inputs[0].element_size()
        fwd_ms = device_ms(lambda: _ppo_fwd_triton(*flat, *consts), device)
        gbs = n * (4 * es + 2 * 4 + es) / (fwd_ms * 1e-3) / 1e9
        key = f"ppo_gpu_{n}"
        out.update({f"{key}_fwd_us": round(fwd_ms * 1e3, 1), f"{key}_fwd_gbs": float(f"{gbs:.4g}"),
                    f"{key}_fwd_hbm_frac": float(f"{gbs / peak_gbs:.3g}")})
        times, peaks = {}, {}
        for t in (inputs[0], inputs[5]):
            t.requires_grad_()
        for variant in ("eager", "fused"):
            step = _ppo_step(variant, inputs)
            times[variant] = device_ms(step, device)
            inputs[0].grad = inputs[5].grad = None
            peaks[variant] = peak_extra_bytes(step, device)
        out.update({f"{key}_speedup": round(times["eager"] / times["fused"], 2),
                    f"{key}_fused_fwd_bwd_us": round(times["fused"] * 1e3, 1),
                    f"{key}_mem_ratio": round(peaks["fused"] / max(peaks["eager"], 1), 3)})
    return out


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--mem-worker":
        print(json.dumps(mem_worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
    elif "--gpu" in sys.argv:
        dry = "--dry-run" in sys.argv
        if dry:  # before fastagent.kernels imports triton
            os.environ.setdefault("TRITON_INTERPRET", "1")
        device = "cpu" if dry else "cuda"
        print(json.dumps({**bench_gae_gpu(GAE_DRY if dry else GAE_SHAPES, device=device),
                          **bench_ppo_gpu(PPO_DRY if dry else PPO_SIZES, device=device)}))
    else:
        torch.set_num_threads(2)
        quick = "--quick" in sys.argv
        print(json.dumps({**bench_gae(quick), **bench_ppo(quick)}))
