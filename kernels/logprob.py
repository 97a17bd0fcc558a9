"""Token log-probs and entropy straight from hidden states and the lm_head, without (N, V) logits.

    from fastagent.kernels import logprob
    logp, entropy = logprob(hidden, lm_head.weight, labels, temperature=1.0)  # (N,) fp32 each
    # hidden (N, H) or (B, T, H); lm_head weight (V, H), same dtype; labels (N,) / (B, T) int64.

Math, with z = hidden @ weight.T / temperature (one row per token):
    lse = logsumexp(z),  logp = z[label] - lse,  entropy = lse - sum_j softmax(z)_j z_j
Labels < 0 (e.g. -100 on prompt tokens) are ignored tokens: logp = 0, no gradient through it.

How: a loop over token chunks of C rows. Each chunk's logits (C, V) come from one BLAS / cuBLAS
matmul into a reused buffer; a row pass turns them into logp, entropy and lse without the (C, V)
log_softmax / exp temporaries of the torch path: Triton (kernels/logprob_triton.py, CUDA) walks
each row in vocabulary tiles with an online logsumexp; C++ (csrc/logprob.cpp, CPU) reads each
L2-resident row twice (max, then blocked sums of exp), parallel over rows. C is chosen so a chunk
holds CHUNK_ELEMENTS logits, so the full (N, V) fp32 logits never exist. The backward (for generic use) recomputes each
chunk's logits from the saved lse and entropy, turns them into dL/dlogits in place, and
accumulates grad_hidden = dlogits @ weight and grad_weight += dlogits.T @ hidden_chunk.
Memory traffic per chunk: forward writes + reads C*V logits once (the naive path materialises
logits, log_softmax output and, in backward, two more (N, V) tensors).

For training, prefer fastagent.kernels.fused_linear (the loss gradient is known inside the chunk
loop, so nothing is recomputed). `logprob_ref` is the plain autograd reference.
Set FASTAGENT_KERNELS=torch|cpp|triton to force a row-pass backend (default: auto).
"""

from __future__ import annotations

import os
from typing import Callable, NamedTuple

import torch

from fastagent.kernels._cpp import try_load_cpp

# Logits per chunk (C * V): 2^24 fp32 = 64 MiB on CPU (K1: C = 341 rows at V = 49152); GPUs take
# bigger chunks (fewer, larger matmuls). Tests shrink these to force many chunks.
CHUNK_ELEMENTS = {"cpu": 1 << 24, "cuda": 1 << 27}


# ---------------------------------------------------------------- reference (autograd)
def logprob_ref(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch: logits in the inputs' dtype, log-softmax in fp32. Returns (logp, entropy),
    fp32, shaped like labels. Materialises (N, V) logits: the reference, not the fast path."""
    z = (hidden @ weight.T).float() / temperature  # (..., V) fp32
    logp_all = torch.log_softmax(z, dim=-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    picked = logp_all.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(labels >= 0, picked, 0.0), entropy


# ---------------------------------------------------------------- row passes
# A row pass works on one logits chunk (C, V):
#   stats(logits, labels, inv_temp) -> (logp, entropy, lse), each (C,) fp32
#   grad_(logits, labels, lse, entropy, dlogp, dent | None, inv_temp): logits := dL/dlogits
def _torch_row_stats(logits, labels, inv_temp):
    z = logits.float() * inv_temp  # (C, V)
    lse = torch.logsumexp(z, dim=-1)
    logp_all = z - lse[:, None]
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    picked = z.gather(1, labels.clamp(min=0)[:, None])[:, 0] - lse
    return torch.where(labels >= 0, picked, 0.0), entropy, lse


def _torch_row_grad_(logits, labels, lse, entropy, dlogp, dent, inv_temp):
    lp = logits.float() * inv_temp - lse[:, None]  # (C, V) log p
    p = lp.exp()
    g = torch.where(labels >= 0, dlogp, 0.0)[:, None]  # ignored tokens: no logp gradient
    coef = g if dent is None else g + dent[:, None] * (lp + entropy[:, None])
    logits.copy_(p.mul_(coef).mul_(-inv_temp))
    logits.scatter_add_(1, labels.clamp(min=0)[:, None], (inv_temp * g).to(logits.dtype))


def _cpp():
    return try_load_cpp("logprob", ["logprob.cpp"])


def _cpp_row_stats(logits, labels, inv_temp):
    return _cpp().row_stats(logits, labels, inv_temp)


def _cpp_row_grad_(logits, labels, lse, entropy, dlogp, dent, inv_temp):
    _cpp().row_grad_(logits, labels, lse, entropy, dlogp, dent, inv_temp)


class RowPass(NamedTuple):
    name: str
    stats: Callable
    grad_: Callable
    fp32_logits: bool  # the pass needs fp32 logits (else it reads the matmul's dtype)


def row_pass(device: torch.device) -> RowPass:
    """The row pass for this device: Triton on CUDA, C++ on CPU, torch where neither runs.
    FASTAGENT_KERNELS=torch|cpp|triton forces one (triton on CPU needs TRITON_INTERPRET=1)."""
    want = os.environ.get("FASTAGENT_KERNELS", "auto")
    if want not in ("auto", "torch", "cpp", "triton"):
        raise ValueError(f"FASTAGENT_KERNELS must be auto, torch, cpp or triton, got {want!r}")
    if want == "triton" or (want == "auto" and device.type == "cuda"):
        try:
            from fastagent.kernels import logprob_triton as lt
            return RowPass("triton", lt.row_stats, lt.row_grad_, False)
        except ImportError:  # no triton installed: fall through to torch
            pass
    if want in ("auto", "cpp") and device.type == "cpu" and _cpp() is not None:
        return RowPass("cpp", _cpp_row_stats, _cpp_row_grad_, True)
    return RowPass("torch", _torch_row_stats, _torch_row_grad_, True)


# ---------------------------------------------------------------- chunk loop pieces
def chunk_rows(n: int, v: int, device: torch.device) -> int:
    """Tokens per chunk: CHUNK_ELEMENTS logits, at least one row, at most n."""
    budget = CHUNK_ELEMENTS.get(device.type, CHUNK_ELEMENTS["cuda"])
    return max(1, min(n, budget // max(v, 1)))


def chunk_buffer(rows: int, weight: torch.Tensor, rp: RowPass) -> torch.Tensor:
    """One (rows, V) logits buffer reused by every chunk (fp32 if the row pass needs it): no
    allocation, page faults or zeroing per chunk."""
    dtype = torch.float32 if rp.fp32_logits else weight.dtype
    return torch.empty(rows, weight.shape[0], dtype=dtype, device=weight.device)


def chunk_logits(h: torch.Tensor, weight: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """(C, H) @ (V, H).T -> the first C rows of buf, (C, V) contiguous."""
    out = buf[: h.shape[0]]
    if buf.dtype == weight.dtype:
        torch.mm(h, weight.T, out=out)
    else:  # low-precision matmul, fp32 row pass (CPU)
        out.copy_(h @ weight.T)
    return out


def accumulate_grads(dlogits: torch.Tensor, h: torch.Tensor, weight: torch.Tensor,
                     grad_h: torch.Tensor | None, grad_w: torch.Tensor | None) -> None:
    """grad_h (C, H) := dlogits @ weight;  grad_w (V, H) += dlogits.T @ h (see new_grads)."""
    d = dlogits.to(weight.dtype)  # no copy when the row pass wrote the weight's dtype
    if grad_h is not None:
        torch.mm(d, weight, out=grad_h)
    if grad_w is not None:
        if grad_w.dtype == d.dtype:
            grad_w.addmm_(d.T, h)
        else:  # CPU low precision: a (V, H) bf16 product per chunk, accumulated in fp32
            grad_w.add_(d.T @ h)


def new_grads(hidden: torch.Tensor, weight: torch.Tensor, need_h: bool,
              need_w: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """grad_hidden (N, H) and the grad_weight accumulator (V, H): fp32 on CPU; on CUDA the weight's
    dtype, accumulated in place by cuBLAS (fp32 inside each chunk's matmul, one rounding per chunk,
    as Liger-Kernel does): a fp32 copy would add a (V, H) temporary and its traffic per chunk."""
    grad_h = torch.empty_like(hidden) if need_h else None
    dtype = weight.dtype if weight.is_cuda else torch.float32
    grad_w = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if need_w else None
    return grad_h, grad_w


def grads_out(hidden: torch.Tensor, weight: torch.Tensor, grad_h: torch.Tensor | None,
              grad_w: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Custom ops cannot return None: a gradient not asked for is an empty tensor."""
    gh = grad_h if grad_h is not None else hidden.new_empty(0)
    gw = grad_w.to(weight.dtype) if grad_w is not None else weight.new_empty(0)
    return gh, gw


def check_inputs(op: str, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                 temperature: float) -> None:
    """ValueError for user errors (shapes, dtypes, devices, temperature)."""
    if hidden.dim() < 1 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{op}: need hidden (..., H) and weight (V, H), got {tuple(hidden.shape)} "
                         f"and {tuple(weight.shape)}")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"{op}: labels must have shape {tuple(hidden.shape[:-1])}, got {tuple(labels.shape)}")
    if labels.dtype != torch.int64:
        raise ValueError(f"{op}: labels must be int64, got {labels.dtype}")
    if hidden.dtype != weight.dtype or not hidden.is_floating_point():
        raise ValueError(f"{op}: hidden and weight must share a float dtype, got {hidden.dtype}, {weight.dtype}")
    if hidden.device != weight.device or labels.device != hidden.device:
        raise ValueError(f"{op}: hidden, weight and labels must be on one device")
    if not temperature > 0:
        raise ValueError(f"{op}: temperature must be > 0, got {temperature}")


# ---------------------------------------------------------------- forward / backward
def _logprob_fwd_impl(hidden, weight, labels, temperature):
    n, v = hidden.shape[0], weight.shape[0]
    rp = row_pass(hidden.device)
    logp, entropy, lse = (torch.empty(n, dtype=torch.float32, device=hidden.device) for _ in range(3))
    rows = chunk_rows(n, v, hidden.device)
    buf = chunk_buffer(rows, weight, rp)
    for s in range(0, n, rows):
        e = min(n, s + rows)
        out = rp.stats(chunk_logits(hidden[s:e], weight, buf), labels[s:e], 1.0 / temperature)
        for dst, src in zip((logp, entropy, lse), out):
            dst[s:e] = src
    return logp, entropy, lse


def _logprob_bwd_impl(dlogp, dent, hidden, weight, labels, lse, entropy, temperature, need_h, need_w):
    n, v = hidden.shape[0], weight.shape[0]
    rp = row_pass(hidden.device)
    grad_h, grad_w = new_grads(hidden, weight, need_h, need_w)
    # Incoming grads may be expanded (stride 0, from .sum()) or low precision: (N,) fp32 contiguous.
    dlogp = torch.zeros_like(lse) if dlogp is None else dlogp.float().contiguous()
    dent = None if dent is None else dent.float().contiguous()
    rows = chunk_rows(n, v, hidden.device)
    buf = chunk_buffer(rows, weight, rp)
    for s in range(0, n, rows):
        e = min(n, s + rows)
        h = hidden[s:e]
        logits = chunk_logits(h, weight, buf)  # recomputed: (C, V)
        rp.grad_(logits, labels[s:e], lse[s:e], entropy[s:e], dlogp[s:e],
                 None if dent is None else dent[s:e], 1.0 / temperature)
        accumulate_grads(logits, h, weight, None if grad_h is None else grad_h[s:e], grad_w)
    return grads_out(hidden, weight, grad_h, grad_w)


# ---------------------------------------------------------------- custom ops (torch.compile-able)
@torch.library.custom_op("fastagent::logprob", mutates_args=())
def _logprob_op(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # hidden (N, H), weight (V, H), labels (N,) -> logp, entropy, lse: (N,) fp32
    return _logprob_fwd_impl(hidden, weight, labels, temperature)


@_logprob_op.register_fake
def _(hidden, weight, labels, temperature):
    n = hidden.shape[0]
    return tuple(hidden.new_empty(n, dtype=torch.float32) for _ in range(3))


@torch.library.custom_op("fastagent::logprob_backward", mutates_args=())
def _logprob_backward_op(dlogp: torch.Tensor | None, dent: torch.Tensor | None, hidden: torch.Tensor,
                         weight: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
                         entropy: torch.Tensor, temperature: float, need_h: bool,
                         need_w: bool) -> tuple[torch.Tensor, torch.Tensor]:
    # -> grad_hidden (N, H) (or empty), grad_weight (V, H) (or empty)
    return _logprob_bwd_impl(dlogp, dent, hidden, weight, labels, lse, entropy, temperature,
                             need_h, need_w)


@_logprob_backward_op.register_fake
def _(dlogp, dent, hidden, weight, labels, lse, entropy, temperature, need_h, need_w):
    return (torch.empty_like(hidden) if need_h else hidden.new_empty(0),
            torch.empty_like(weight) if need_w else weight.new_empty(0))


def _logprob_setup(ctx, inputs, output):
    hidden, weight, labels, temperature = inputs
    ctx.save_for_backward(hidden, weight, labels, output[2], output[1])  # lse, entropy
    ctx.temperature = temperature
    ctx.set_materialize_grads(False)  # an unused output's grad stays None: less work in backward


def _logprob_backward(ctx, dlogp, dent, dlse):
    hidden, weight, labels, lse, entropy = ctx.saved_tensors
    if dlogp is None and dent is None:
        return None, None, None, None
    need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    gh, gw = _logprob_backward_op(dlogp, dent, hidden, weight, labels, lse, entropy,
                                  ctx.temperature, need_h, need_w)
    return gh if need_h else None, gw if need_w else None, None, None


torch.library.register_autograd("fastagent::logprob", _logprob_backward, setup_context=_logprob_setup)


def logprob(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
            temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each label and entropy of each token's distribution, (logp, entropy), fp32,
    shaped like labels. hidden (..., H) and weight (V, H) share a dtype (fp32/bf16/fp16); labels
    int64, < 0 for ignored tokens. Differentiable in hidden and weight (chunks recomputed)."""
    check_inputs("logprob", hidden, weight, labels, temperature)
    lead = labels.shape
    logp, entropy, _ = _logprob_op(hidden.reshape(-1, hidden.shape[-1]), weight,
                                   labels.reshape(-1), float(temperature))
    return logp.view(lead), entropy.view(lead)
