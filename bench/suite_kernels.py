"""Benchmark suite `kernels`: fused lm_head + loss and the log-prob op (K1), GAE (K2), PPO loss (K3).

    python bench/throughput.py --suite kernels [--quick] [--threads 2]
    python bench/suite_kernels.py --gpu [--quick]      # CUDA: Qwen2.5-7B shapes (bench/gpu_check.sh)
    python bench/suite_kernels.py --gpu --dry-run      # same calls on CPU: tiny shapes, Triton interpreter

K1 (DESIGN.md), at T=4096, H=576, V=49152, fp32, 2 torch threads (--quick: T=512, V=8192):
  K1_time_ratio      fused_linear_cross_entropy fwd+bwd time / naive fwd+bwd; target <= 1.0
  K1_mem_ratio       its peak extra memory / naive's; target <= 0.125
  K1_fwd_time_ratio  logprob() forward under no_grad / naive forward under no_grad; target <= 1.0
  K1_fwd_mem_ratio   the same pair's peak extra memory ratio
  K1_ppo_time_ratio, K1_ppo_mem_ratio  fused_linear_ppo_loss vs naive logp -> ppo_loss_ref, fwd+bwd
  K1_<variant>_s, K1_<variant>_mb      the raw numbers behind the ratios
naive = log_softmax(h @ W.T).gather(labels): what most RL stacks run.
Time: all variants in this process, interleaved round by round (naive, fused, ..., naive, fused,
...) so machine load hits them alike; each variant's minimum over the rounds.
Memory: each variant in its own fresh subprocess with MALLOC_MMAP_THRESHOLD_=65536 (every tensor
over 64 KiB is its own mapping, returned at free, so the resident set tracks live tensors); peak
extra memory = growth of the peak resident set (VmHWM, reset via /proc/self/clear_refs) over the
resident set just before one fwd+bwd, inputs allocated and a small warm-up run done. Gradients
the run produces (hidden and weight) count in both variants.
K2/K3 come from bench/_kernels_b.py (bench_gae, bench_ppo), merged when that file exists.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import device_ms, peak_extra_bytes, status_kb  # noqa: E402


BENCH = Path(__file__).resolve().parent
VARIANTS = ("naive", "fused_ce", "naive_fwd", "logprob_fwd", "naive_ppo", "fused_ppo")
PPO_ARGS = dict(clip_low=0.2, clip_high=0.28, kl_coef=0.0, entropy_coef=0.0)


def _make_steps(t: int, h: int, v: int, device: str = "cpu", dtype=None) -> tuple[dict, tuple]:
    """Inputs and one closure per variant: ({variant: (step, no_grad)}, (hidden, weight, labels))."""
    import torch

    from fastagent.kernels import fused_linear_cross_entropy, fused_linear_ppo_loss, logprob
    from fastagent.kernels.ppo_loss import ppo_loss_ref

    dtype = dtype or torch.float32
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(t, h, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) * h ** -0.5).to(device, dtype).requires_grad_()
    labels = torch.randint(0, v, (t,), generator=g).to(device)
    w = torch.full((t,), 1.0 / t, device=device)
    old_logp = (-torch.rand(t, generator=g) * 5 - 8).to(device)  # near a random lm_head's log-probs
    adv = torch.randn(t, generator=g).to(device)

    def naive_logp():
        logits = (hidden @ weight.T).float()  # (T, V)
        return torch.log_softmax(logits, dim=-1).gather(1, labels[:, None])[:, 0]

    steps = {
        "naive": (lambda: (-(w * naive_logp()).sum()).backward(), False),
        "fused_ce": (lambda: fused_linear_cross_entropy(hidden, weight, labels, w).backward(), False),
        "naive_fwd": (naive_logp, True),
        "logprob_fwd": (lambda: logprob(hidden, weight, labels), True),
        "naive_ppo": (lambda: ppo_loss_ref(naive_logp(), old_logp, adv, w, **PPO_ARGS)[0].backward(),
                      False),
        "fused_ppo": (lambda: fused_linear_ppo_loss(hidden, weight, labels, old_logp, adv, w,
                                                    **PPO_ARGS)[0].backward(), False),
    }
    return steps, (hidden, weight, labels)


def _run_once(step, no_grad: bool, params) -> None:
    import torch

    for p in params:
        p.grad = None  # labels have none: harmless
    with torch.set_grad_enabled(not no_grad):
        step()


# ---------------------------------------------------------------- memory (one variant per process)
def mem_worker(variant: str, t: int, h: int, v: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    small, _ = _make_steps(64, h, 1024)  # warm-up: C++ load, MKL/OpenMP thread start
    _run_once(small[variant][0], small[variant][1], ())
    steps, params = _make_steps(t, h, v)
    del small
    gc.collect()
    rss0 = status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS (Linux >= 4.0)
    _run_once(*steps[variant], params)
    return {"peak_extra_bytes": (status_kb("VmHWM") - rss0) * 1024}


def _mem(variant: str, shape: tuple[int, int, int], threads: int) -> int:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--mem-worker", variant,
           *map(str, shape), str(threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"memory worker {variant} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_extra_bytes"]


# ---------------------------------------------------------------- time (interleaved, in process)
def _times(shape: tuple[int, int, int], threads: int, rounds: int) -> dict[str, float]:
    import torch

    torch.set_num_threads(threads)
    small, _ = _make_steps(64, shape[1], 1024)
    for step, no_grad in small.values():  # warm-up
        _run_once(step, no_grad, ())
    steps, params = _make_steps(*shape)
    best = {name: float("inf") for name in steps}
    for r in range(rounds):
        for name, (step, no_grad) in steps.items():
            t0 = time.perf_counter()
            _run_once(step, no_grad, params)
            best[name] = min(best[name], time.perf_counter() - t0)
            print(f"   K1 round {r}: {name} {time.perf_counter() - t0:.3f} s", file=sys.stderr, flush=True)
    return best


def bench_k1(quick: bool, threads: int) -> dict:
    shape = (512, 576, 8192) if quick else (4096, 576, 49152)
    times = _times(shape, threads, rounds=2 if quick else 4)
    mem = {name: _mem(name, shape, threads) for name in VARIANTS}
    out = {"K1_shape": "T=%d,H=%d,V=%d" % shape, "K1_threads": threads}
    for name in VARIANTS:
        out[f"K1_{name}_s"] = round(times[name], 4)
        out[f"K1_{name}_mb"] = round(mem[name] / 2**20, 1)
    for key, (a, b) in {"": ("fused_ce", "naive"), "_fwd": ("logprob_fwd", "naive_fwd"),
                        "_ppo": ("fused_ppo", "naive_ppo")}.items():
        out[f"K1{key}_time_ratio"] = round(times[a] / times[b], 4)
        out[f"K1{key}_mem_ratio"] = round(mem[a] / max(mem[b], 1), 4)
    return out


def _kernels_b():
    path = BENCH / "_kernels_b.py"
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location("_kernels_b", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(args) -> dict:
    threads = args.threads or 2
    result = bench_k1(args.quick, threads)
    b = _kernels_b()
    if b is not None:  # GAE (K2) and PPO loss (K3), from the GAE / PPO kernels' author
        result.update(b.bench_gae(args.quick))
        result.update(b.bench_ppo(args.quick))
    return result


# ---------------------------------------------------------------- GPU (bench/gpu_check.sh)
# On CUDA: CUDA-event timing (triton.testing.do_bench, median) and the CUDA allocator's peak. The
# dry run (bench/gpu_check.sh --dry-run) calls the same functions with device="cpu", DRY_SHAPES and
# TRITON_INTERPRET=1: the Triton kernels then run in Triton's interpreter on CPU tensors, times come
# from perf_counter and peak memory from the resident set. Its numbers mean nothing; it proves that
# every call the GPU run makes works and gives the reference results.
GPU_SHAPES = dict(h=3584, v=152064, tokens=(4096, 16384))  # Qwen2.5-7B lm_head, bf16
DRY_SHAPES = dict(h=32, v=4500, tokens=(8, 24))  # V > VOCAB_BLOCK["cpu"]: two vocab blocks on CPU
TOL = {"bfloat16": 3e-2, "float32": 1e-4}  # max |err| / max(|ref|, 1), as in tests/test_logprob.py


def _ms(fn, device: str) -> float:
    return device_ms(fn, device, warmup=2, rep=20)  # large shapes: fewer repeats


def _step_stats(step, no_grad: bool, params, device: str) -> tuple[float, int]:
    """(ms per fwd(+bwd), peak extra bytes of one run)."""
    ms = _ms(lambda: _run_once(step, no_grad, params), device)
    for p in params:
        p.grad = None  # grads of the timed runs are not part of this run's peak
    return ms, peak_extra_bytes(lambda: _run_once(step, no_grad, params), device)


def _rel_err(actual, expected) -> float:
    actual, expected = actual.float(), expected.float()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1.0)).item()  # host sync


def _liger_step(hidden, weight, labels):
    """Liger-Kernel's fused linear cross entropy (token mean), or None when not installed."""
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    loss_fn = LigerFusedLinearCrossEntropyLoss(reduction="mean")

    def step():
        out = loss_fn(weight, hidden, labels)  # (lin_weight, input, target) in all versions seen
        (out[0] if isinstance(out, tuple) else out).backward()  # some versions add a z-loss
    return step


def _row_pass_gbs(c: int, v: int, dtype, device: str) -> dict:
    """Achieved GB/s of the Triton row passes (kernels/logprob_triton.py) on one (C, V) block of
    whole rows: stats reads C*V values, grad reads and writes them. Checks lse and entropy first."""
    import torch

    from fastagent.kernels.logprob import finish_stats, new_state
    from fastagent.kernels.logprob_triton import row_grad_, row_stats_

    g = torch.Generator().manual_seed(1)
    logits = (3 * torch.randn(c, v, generator=g)).to(device, dtype)  # (C, V), entropy ~ 8
    labels = torch.randint(0, v, (c,), generator=g).to(device)
    state = new_state(c, logits.device)  # (m, s, t, zl), each (C,) fp32
    row_stats_(logits, labels, 0, v, 1.0, *state)
    logp, ent, lse = finish_stats(labels, *state)
    ref = torch.log_softmax(logits.float(), dim=-1)
    name = str(dtype).removeprefix("torch.")
    for what, got, want in (("lse", lse, torch.logsumexp(logits.float(), -1)),
                            ("entropy", ent, -(ref.exp() * ref).sum(-1)),
                            ("logp", logp, ref.gather(1, labels[:, None])[:, 0])):
        err = _rel_err(got, want)
        assert err <= TOL[name], f"row_stats_ {name} {what}: error {err:.2e} vs torch"
    dlogp, dent = torch.randn(c, generator=g).to(device), torch.randn(c, generator=g).to(device)
    work = logits.clone()
    row_grad_(work, labels, 0, lse, ent, dlogp, dent, 1.0)  # work := dL/dlogits
    p = ref.exp()
    want = -p * (dlogp[:, None] + dent[:, None] * (ref + ent[:, None]))
    want.scatter_add_(1, labels[:, None], dlogp[:, None])
    err = _rel_err(work, want)
    assert err <= TOL[name], f"row_grad_ {name}: error {err:.2e} vs torch"
    # Timed: stats merges the block into the same state again (s doubles per call and may reach
    # inf), grad overwrites its own output: the values change, the memory traffic does not.
    stats_ms = _ms(lambda: row_stats_(logits, labels, 0, v, 1.0, *state), device)
    grad_ms = _ms(lambda: row_grad_(work, labels, 0, lse, ent, dlogp, dent, 1.0), device)
    nbytes = c * v * logits.element_size()
    return {f"row_stats_gbs_{name}": float(f"{nbytes / stats_ms / 1e6:.4g}"),  # 4 significant digits
            f"row_grad_gbs_{name}": float(f"{2 * nbytes / grad_ms / 1e6:.4g}")}


def _matmul_floor(hidden, weight):
    """The three matmuls any lm_head fwd+bwd needs (logits, grad_hidden, grad_weight), bf16."""
    def step():
        logits = hidden @ weight.T  # (T, V)
        logits @ weight  # grad_hidden
        logits.T @ hidden  # grad_weight
    return step


def _logprob_err(hidden, weight, labels) -> float:
    """logprob() vs log_softmax of the same-dtype logits: the benchmarked op computes the right thing."""
    import torch

    from fastagent.kernels import logprob

    with torch.no_grad():
        logp, _ = logprob(hidden, weight, labels)
        want = torch.log_softmax((hidden @ weight.T).float(), -1).gather(1, labels[:, None])[:, 0]
    return _rel_err(logp, want)


def gpu_bench(quick: bool, h: int, v: int, tokens: tuple[int, ...], device: str = "cuda") -> dict:
    """lm_head + loss at (T, H, V), bf16: ours vs torch, a matmul floor, Liger if installed; and
    the Triton row passes' GB/s. GPU_SHAPES on CUDA; DRY_SHAPES with device="cpu" (dry run)."""
    import torch

    from fastagent.kernels.logprob import row_pass

    rp = row_pass(torch.device(device)).name
    assert rp == "triton", f"row pass on {device} is {rp!r}, not triton (dry run: TRITON_INTERPRET=1)"
    out = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton interpreter)",
           "torch": torch.__version__, "row_pass": rp, "shape": f"H={h},V={v}"}
    for t in (tokens[:1] if quick else tokens):
        steps, params = _make_steps(t, h, v, device=device, dtype=torch.bfloat16)
        err = _logprob_err(*(p.detach() for p in params))
        assert err <= TOL["bfloat16"], f"T={t}: logprob vs torch error {err:.2e}"
        out[f"T{t}_logprob_err"] = round(err, 5)
        steps["matmul_floor"] = (_matmul_floor(params[0].detach(), params[1].detach()), True)
        liger = _liger_step(*params)
        if liger is not None:
            steps["liger_ce"] = (liger, False)
        for name, (step, no_grad) in steps.items():
            try:
                ms, peak = _step_stats(step, no_grad, params, device)
            except Exception as exc:  # only Liger: another API version, or no CPU support
                if name != "liger_ce":
                    raise
                out[f"T{t}_{name}_error"] = repr(exc)[:200]
                continue
            out[f"T{t}_{name}_ms"] = round(ms, 3)
            out[f"T{t}_{name}_peak_mb"] = round(peak / 2**20, 2)
            print(f"   T={t} {name}: {ms:.2f} ms, peak extra {peak / 2**20:.1f} MiB", file=sys.stderr,
                  flush=True)
        for a, b in (("fused_ce", "naive"), ("logprob_fwd", "naive_fwd"), ("fused_ppo", "naive_ppo"),
                     ("fused_ce", "liger_ce"), ("fused_ce", "matmul_floor")):
            if f"T{t}_{a}_ms" in out and f"T{t}_{b}_ms" in out:
                out[f"T{t}_{a}_over_{b}_time"] = round(out[f"T{t}_{a}_ms"] / out[f"T{t}_{b}_ms"], 3)
                out[f"T{t}_{a}_over_{b}_mem"] = round(
                    out[f"T{t}_{a}_peak_mb"] / max(out[f"T{t}_{b}_peak_mb"], 1e-3), 3)
        del steps, params
        if device == "cuda":
            torch.cuda.empty_cache()
    for dtype in (torch.bfloat16, torch.float32):
        out.update(_row_pass_gbs(min(tokens[0], 1024), v, dtype, device))
    return out


if __name__ == "__main__":
    if len(sys.argv) == 7 and sys.argv[1] == "--mem-worker":
        name, *nums = sys.argv[2:]
        print(json.dumps(mem_worker(name, *map(int, nums))), flush=True)
    elif "--gpu" in sys.argv:
        if "--dry-run" in sys.argv:  # before fastagent.kernels imports triton
            os.environ.setdefault("TRITON_INTERPRET", "1")
            os.environ.setdefault("FASTAGENT_KERNELS", "triton")
        dry = "--dry-run" in sys.argv
        result = gpu_bench("--quick" in sys.argv, **(DRY_SHAPES if dry else GPU_SHAPES),
                           device="cpu" if dry else "cuda")
        print(json.dumps(result), flush=True)
    else:
        sys.exit("run through bench/throughput.py --suite kernels, or: "
                 "suite_kernels.py --gpu [--quick] [--dry-run]")
