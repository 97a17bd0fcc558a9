"""Token log-probs and entropy straight from hidden states and the lm_head, without (N, V) logits.

    from fastagent.kernels import logprob
    logp, entropy = logprob(hidden, lm_head.weight, labels, temperature=1.0)  # (N,) fp32 each
    # hidden (N, H) or (B, T, H); lm_head weight (V, H), same dtype; labels (N,) / (B, T) int64.

Math, with z = hidden @ weight.T / temperature (one row per token):
    lse = logsumexp(z),  logp = z[label] - lse,  entropy = lse - sum_j softmax(z)_j z_j
Labels < 0 (e.g. -100 on prompt tokens) are ignored tokens: logp = 0, no gradient through it; a
label >= V raises ValueError on every backend.

How: a loop over blocks of the logits, (C tokens, Vb vocabulary columns) each, computed by one
BLAS / cuBLAS matmul into a reused buffer and never all at once (CHUNK_ELEMENTS per block): on CPU
Vb = VOCAB_BLOCK columns, on CUDA whole rows. A row pass merges each block into per-row running
state with an online logsumexp (max m, sum exp(z - m), sum exp(z - m) (z - m), the label's logit),
without the (C, V) log_softmax / exp temporaries of the torch path: C++ (csrc/logprob.cpp, CPU:
two reads of each cache-resident row slice, parallel over rows) or Triton (kernels/logprob_triton.py,
CUDA: vocabulary tiles). The backward (for generic use) recomputes each block from the saved lse and
entropy, turns it into dL/dlogits in place, and accumulates grad_hidden += dlogits @ weight_block
and grad_weight_block += dlogits.T @ hidden_block. Memory traffic: each block is written by the
matmul and read once by the row pass (the naive path materialises the logits and the log_softmax
output, and two more (N, V) tensors in backward).

For training, prefer fastagent.kernels.fused_linear (the loss gradient is known inside the chunk
loop, so nothing is recomputed). `logprob_ref` is the plain autograd reference.
Set FASTAGENT_KERNELS=torch|cpp|triton to force a row-pass backend (default: auto).
"""

from __future__ import annotations

import os
from typing import Callable, NamedTuple

import torch

from fastagent.kernels._cpp import try_load_cpp

# Logits per block: 2^24 fp32 = 64 MiB on CPU, 2^27 on CUDA (fewer, larger cuBLAS calls). On CPU
# the log-prob op also splits the vocabulary into VOCAB_BLOCK columns: each MKL call then streams
# its slice of the lm_head once (full-row chunks re-pack all of it per chunk: measured 3.48 s vs
# 2.77 s for K1's forward matmul). The fused losses need whole rows (their gradient needs the
# full-row lse). Tests shrink both to force many blocks.
CHUNK_ELEMENTS = {"cpu": 1 << 24, "cuda": 1 << 27}
VOCAB_BLOCK = {"cpu": 4096}


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
# A row pass works on a logits block (C, Vb) = vocabulary columns [v0, v0 + Vb) of C rows:
#   stats_(logits, labels, v0, vocab, inv_temp, m, s, t, zl): merge into the (C,) fp32 row state
#       m = max z, s = sum exp(z - m), t = sum exp(z - m) (z - m), zl = z[label] (finish_stats)
#   grad_(logits, labels, v0, lse, entropy, dlogp, dent | None, inv_temp): logits := dL/dlogits
# with z = logits * inv_temp and global label ids (< 0: ignored token).
def _torch_row_stats_(logits, labels, v0, vocab, inv_temp, m, s, t, zl):
    z = logits.float() * inv_temp  # (C, Vb)
    m_new = torch.maximum(m, z.max(dim=1).values)
    alpha = torch.exp(m - m_new)  # 0 while m = -inf
    d = z - m_new[:, None]
    e = d.exp()
    t.copy_(alpha * (t + torch.where(s > 0, s * (m - m_new), 0.0)) + (e * d).sum(1))
    s.copy_(alpha * s + e.sum(1))
    m.copy_(m_new)
    local = labels - v0
    here = (labels >= 0) & (local >= 0) & (local < z.shape[1])
    zl.copy_(torch.where(here, z.gather(1, local.clamp(0, z.shape[1] - 1)[:, None])[:, 0], zl))


def _torch_row_grad_(logits, labels, v0, lse, entropy, dlogp, dent, inv_temp):
    lp = logits.float() * inv_temp - lse[:, None]  # (C, Vb) log p
    p = lp.exp()
    g = torch.where(labels >= 0, dlogp, 0.0)[:, None]  # ignored tokens: no logp gradient
    coef = g if dent is None else g + dent[:, None] * (lp + entropy[:, None])
    logits.copy_(p.mul_(coef).mul_(-inv_temp))
    local = labels - v0
    here = (labels >= 0) & (local >= 0) & (local < logits.shape[1])
    logits.scatter_add_(1, local.clamp(0, logits.shape[1] - 1)[:, None],
                        torch.where(here[:, None], inv_temp * g, 0.0).to(logits.dtype))


def _cpp():
    return try_load_cpp("logprob", ["logprob.cpp"])


def _cpp_row_stats_(*args):
    _cpp().row_stats_(*args)


def _cpp_row_grad_(*args):
    _cpp().row_grad_(*args)


class RowPass(NamedTuple):
    name: str
    stats_: Callable
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
            return RowPass("triton", lt.row_stats_, lt.row_grad_, False)
        except ImportError:  # no triton installed: fall through to torch
            pass
    if want in ("auto", "cpp") and device.type == "cpu" and _cpp() is not None:
        return RowPass("cpp", _cpp_row_stats_, _cpp_row_grad_, True)
    return RowPass("torch", _torch_row_stats_, _torch_row_grad_, True)


# ---------------------------------------------------------------- block loop pieces
def block_shape(n: int, v: int, device: torch.device, whole_rows: bool) -> tuple[int, int]:
    """(tokens, vocabulary columns) per logits block: about CHUNK_ELEMENTS logits."""
    vb = v if whole_rows or device.type not in VOCAB_BLOCK else min(v, VOCAB_BLOCK[device.type])
    budget = CHUNK_ELEMENTS.get(device.type, CHUNK_ELEMENTS["cuda"])
    return max(1, min(n, budget // max(vb, 1))), vb


def block_buffer(tb: int, vb: int, weight: torch.Tensor, rp: RowPass) -> torch.Tensor:
    """One flat logits buffer reused by every block (fp32 if the row pass needs it): no allocation,
    page faults or zeroing per block."""
    dtype = torch.float32 if rp.fp32_logits else weight.dtype
    return torch.empty(tb * vb, dtype=dtype, device=weight.device)


def block_logits(h: torch.Tensor, w: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """(C, H) @ (Vb, H).T -> a contiguous (C, Vb) view of buf."""
    out = buf[: h.shape[0] * w.shape[0]].view(h.shape[0], w.shape[0])
    if buf.dtype == w.dtype:
        torch.mm(h, w.T, out=out)
    else:  # low-precision matmul, fp32 row pass (CPU)
        out.copy_(h @ w.T)
    return out


def new_state(c: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Row state (m, s, t, zl), each (c,) fp32, for row_pass().stats_."""
    m = torch.full((c,), float("-inf"), device=device)
    return m, torch.zeros(c, device=device), torch.zeros(c, device=device), torch.zeros(c, device=device)


def finish_stats(labels: torch.Tensor, m: torch.Tensor, s: torch.Tensor, t: torch.Tensor,
                 zl: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row state -> (logp, entropy, lse), (c,) fp32: lse = m + log s, H = log s - t / s."""
    log_s = torch.log(s)
    lse = m + log_s
    return torch.where(labels >= 0, zl - lse, 0.0), log_s - t / s, lse


def add_matmul(dst: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool) -> None:
    """dst = a @ b (first) or dst += a @ b; a fp32 dst takes low-precision products via a temporary."""
    if dst.dtype == a.dtype:
        torch.mm(a, b, out=dst) if first else dst.addmm_(a, b)
    else:
        dst.copy_(a @ b) if first else dst.add_(a @ b)


def new_grads(hidden: torch.Tensor, weight: torch.Tensor, need_h: bool,
              need_w: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Accumulators for grad_hidden (N, H) and grad_weight (V, H): fp32 on CPU; on CUDA the
    parameters' dtype, accumulated in place by cuBLAS (fp32 inside each block's matmul, one
    rounding per block, as Liger-Kernel does; a fp32 copy would add (V, H) traffic per block).
    Uninitialised when there are tokens: the callers' first block of each row / column range
    writes it (`first=True`), so zero-filling the (V, H) one cost a page-faulting pass for nothing
    (~0.1 s per call for SmolLM2's 113 MB on CPU, measured)."""
    new = torch.empty if hidden.shape[0] > 0 else torch.zeros

    def acc(p, need):
        dtype = p.dtype if p.is_cuda else torch.float32
        return new(p.shape, dtype=dtype, device=p.device) if need else None

    return acc(hidden, need_h), acc(weight, need_w)


def grads_out(hidden: torch.Tensor, weight: torch.Tensor, grad_h: torch.Tensor | None,
              grad_w: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """In the parameters' dtypes; custom ops cannot return None: a gradient not asked for is empty."""
    gh = grad_h.to(hidden.dtype) if grad_h is not None else hidden.new_empty(0)
    gw = grad_w.to(weight.dtype) if grad_w is not None else weight.new_empty(0)
    return gh, gw


def check_inputs(op: str, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                 temperature: float) -> None:
    """ValueError for user errors (shapes, dtypes, devices, temperature)."""
    if hidden.dim() < 1 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{op}: need hidden (..., H) and weight (V, H), got {tuple(hidden.shape)} "
                         f"and {tuple(weight.shape)}")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"{op}: labels must have shape {tuple(hidden.shape[:-1])}, "
                         f"got {tuple(labels.shape)}")
    if labels.dtype != torch.int64:
        raise ValueError(f"{op}: labels must be int64, got {labels.dtype}")
    if hidden.dtype != weight.dtype or hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"{op}: hidden and weight must share a float dtype (fp32, bf16 or fp16), "
                         f"got {hidden.dtype}, {weight.dtype}")
    if hidden.device != weight.device or labels.device != hidden.device:
        raise ValueError(f"{op}: hidden, weight and labels must be on one device")
    if not temperature > 0:
        raise ValueError(f"{op}: temperature must be > 0, got {temperature}")


def check_labels(op: str, labels: torch.Tensor, vocab: int) -> None:
    """ValueError if a label is >= vocab (labels < 0 are ignored tokens, any negative value). One
    max() reduction and one host sync per call, not per chunk. Called inside the custom ops (so
    torch.compile does not trace the sync): every row pass, not only C++'s, refuses such labels
    (Triton and torch would silently give a wrong logp)."""
    if labels.numel() == 0:
        return
    top = int(labels.max())  # host sync (one per call)
    if top >= vocab:
        raise ValueError(f"{op}: label {top} out of range for vocabulary size {vocab} "
                         "(labels < 0 are ignored tokens)")


# ---------------------------------------------------------------- forward / backward
def _logprob_fwd_impl(hidden, weight, labels, temperature):
    n, v = hidden.shape[0], weight.shape[0]
    check_labels("logprob", labels, v)
    rp = row_pass(hidden.device)
    tb, vb = block_shape(n, v, hidden.device, whole_rows=False)
    buf = block_buffer(tb, vb, weight, rp)
    state = new_state(n, hidden.device)
    for t0 in range(0, n, tb):
        rows = slice(t0, min(n, t0 + tb))
        for v0 in range(0, v, vb):
            logits = block_logits(hidden[rows], weight[v0:v0 + vb], buf)  # (C, Vb)
            rp.stats_(logits, labels[rows], v0, v, 1.0 / temperature, *(x[rows] for x in state))
    return finish_stats(labels, *state)


def _logprob_bwd_impl(dlogp, dent, hidden, weight, labels, lse, entropy, temperature, need_h, need_w):
    n, v = hidden.shape[0], weight.shape[0]
    rp = row_pass(hidden.device)
    grad_h, grad_w = new_grads(hidden, weight, need_h, need_w)
    # Incoming grads may be expanded (stride 0, from .sum()) or low precision: (N,) fp32 contiguous.
    dlogp = torch.zeros_like(lse) if dlogp is None else dlogp.float().contiguous()
    dent = None if dent is None else dent.float().contiguous()
    tb, vb = block_shape(n, v, hidden.device, whole_rows=False)
    buf = block_buffer(tb, vb, weight, rp)
    for t0 in range(0, n, tb):
        rows = slice(t0, min(n, t0 + tb))
        h = hidden[rows]
        for v0 in range(0, v, vb):
            w = weight[v0:v0 + vb]
            logits = block_logits(h, w, buf)  # recomputed (C, Vb), then dL/dlogits in place
            rp.grad_(logits, labels[rows], v0, lse[rows], entropy[rows], dlogp[rows],
                     None if dent is None else dent[rows], 1.0 / temperature)
            d = logits.to(weight.dtype)
            if grad_h is not None:
                add_matmul(grad_h[rows], d, w, first=v0 == 0)
            if grad_w is not None:
                add_matmul(grad_w[v0:v0 + vb], d.T, h, first=t0 == 0)
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
    return (hidden.new_empty(hidden.shape) if need_h else hidden.new_empty(0),
            weight.new_empty(weight.shape) if need_w else weight.new_empty(0))


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
                                   labels.reshape(-1).contiguous(), float(temperature))
    return logp.view(lead), entropy.view(lead)
