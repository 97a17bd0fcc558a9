"""What the lean loop does to a Hugging Face decoder, and to its own process, before it trains.

    from fastagent.lean import keep_freed_memory, prepare_for_training
    keep_freed_memory()                        # once, at process start (train.py's main does it)
    prepare_for_training(model)                # SFT policy, RL policy; fuse_layers(critic / reference)

Each change leaves the loss and the gradients what plain transformers computes (tests/test_sft.py
compares them with the plain model's); each one is here because it was measured on the T1 benchmark
(`python bench/throughput.py --suite train`, SmolLM2-135M, CPU, 4 x 512 tokens per step):

- keep_freed_memory: glibc serves large blocks with mmap (above a threshold that starts at 128 KiB
  and rises with freed blocks, never above 32 MB) and unmaps them on free, and trims the heap's
  top, so every training step page-faults its activations and gradients in again: 0.1-0.5 M minor
  faults and 0.5-4 s of kernel time per step at 4 x 512. Keeping freed memory in the heap, the CPU
  equivalent of PyTorch's CUDA caching allocator, takes that to ~0 (measured: 1-7 faults per
  step). The resident set then stays at its peak; the lean loop's peak did not grow (VmHWM 4.83 vs
  4.88 GB), the plain loop's grew 12% (its (N, V) logits fragment the heap).
- sparse tied embedding: with tied weights the lm_head's gradient is dense (V, H) anyway; the input
  embedding's own dense gradient was a second (V, H) tensor zero-filled and added per micro-batch.
  Its sparse gradient (one row per input token) is added into the head's.
- fuse_layers: RMSNorm and the SwiGLU product run as fused C++ ops (fastagent.kernels.rmsnorm,
  .swiglu) that save fewer activations for backward. Per module instance (its `forward` attribute),
  never by patching a library's class or source.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from functools import partial

import torch

from fastagent.kernels import rms_norm, silu_mul

# glibc mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4


def keep_freed_memory() -> bool:
    """Serve every allocation from the heap and never give freed memory back to the kernel (glibc:
    mallopt M_MMAP_MAX=0, M_TRIM_THRESHOLD=max). Process-wide; returns False where it cannot apply
    (not glibc). Call it in the training process only: a short-lived process gains nothing."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def sparse_tied_embedding(model: torch.nn.Module) -> bool:
    """Make the input embedding's gradient sparse when its weight IS the lm_head's (tied): autograd
    then adds it into the head's dense gradient, so the parameter's .grad stays dense (AdamW and
    FSDP2 need that). Untied weights are left alone (their .grad would be sparse). Returns whether
    it applied."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or emb.weight is not head.weight:
        return False
    emb.sparse = True
    return True


def _rms_norm_forward(module: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    return rms_norm(hidden_states, module.weight, module.variance_epsilon)


def _swiglu_forward(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return module.down_proj(silu_mul(module.gate_proj(x), module.up_proj(x)))


def fuse_layers(model: torch.nn.Module) -> int:
    """Route the RMSNorm modules (Llama, Qwen2, ...: a `weight` and a `variance_epsilon`) and the
    SwiGLU MLPs (gate_proj, up_proj, down_proj, a SiLU act_fn) through the fused ops, by setting
    each instance's `forward`. Returns how many modules now use them."""
    n = 0
    for module in model.modules():
        name = type(module).__name__
        if name.endswith("RMSNorm") and hasattr(module, "variance_epsilon") and module.weight.dim() == 1:
            module.forward = partial(_rms_norm_forward, module)
            n += 1
        elif (all(hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn"))
              and type(module.act_fn).__name__ in ("SiLU", "SiLUActivation")):
            module.forward = partial(_swiglu_forward, module)
            n += 1
    return n


def prepare_for_training(model: torch.nn.Module, grad_checkpointing: bool = False) -> torch.nn.Module:
    """The policy model as the lean loop trains it (before FSDP2 sharding): no KV cache, optional
    activation checkpointing, the sparse tied embedding, the fused layers, train mode."""
    model.config.use_cache = False
    if grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    sparse_tied_embedding(model)
    fuse_layers(model)
    return model.train()
