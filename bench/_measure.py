"""Timing and memory helpers shared by the kernel benchmarks (bench/suite_kernels.py, bench/_kernels_b.py).

    ms = device_ms(fn, "cuda")            # median of triton.testing.do_bench; on CPU one timed run
    extra = peak_extra_bytes(fn, "cpu")   # CUDA allocator peak on CUDA; VmHWM growth on CPU
"""

from __future__ import annotations

import gc
import time


def status_kb(field: str) -> int:
    """A /proc/self/status field in kB (VmRSS, VmHWM, ...)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def device_ms(fn, device: str, warmup: int = 25, rep: int = 100) -> float:
    """Median ms over CUDA-event timed runs on CUDA; elsewhere (the dry run) one perf_counter run."""
    if device == "cuda":
        import triton

        return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def peak_extra_bytes(fn, device: str) -> int:
    """Peak extra memory of one call: CUDA allocator on CUDA, resident-set growth (VmHWM) on CPU."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    rss0 = status_kb("VmRSS")  # read after the reset: VmHWM >= rss0
    fn()
    return (status_kb("VmHWM") - rss0) * 1024
