"""Triton row passes over a logits chunk (CUDA; CPU only under TRITON_INTERPRET=1, for tests).

    from fastagent.kernels.logprob_triton import row_stats, row_grad_
    logp, entropy, lse = row_stats(logits, labels, inv_temp)      # logits (C, V) fp32/bf16/fp16
    row_grad_(logits, labels, lse, entropy, dlogp, dent, inv_temp)  # logits := dL/dlogits

One program per token row walks the vocabulary in BLOCK_V tiles with an online logsumexp: it keeps
the running max m, s = sum exp(z - m) and t = sum exp(z - m) * z, rescaling both by exp(m_old - m)
when the max grows, so a row is read once and nothing (C, V)-sized is allocated. Values are loaded
in the logits' dtype and computed in fp32. With z = logits * inv_temp, p = softmax(z):
    lse = m + log s,  entropy = lse - t / s,  logp = z[label] - lse
    dL/dz_j = -p_j (dlogp + dent (log p_j + H)) + [j == label] dlogp,  dL/dlogits = inv_temp dL/dz
The grad kernel writes dL/dlogits over the logits (in their dtype), which the caller then feeds
to the two weight/hidden matmuls. Memory traffic per row: stats reads V values, grad reads and
writes V values; the kernels are bandwidth bound (elementwise exp per value).
Imported lazily by kernels/logprob.py only when Triton is the chosen row pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _row_stats_kernel(
    logits_ptr,  # (C, V) logits chunk, any float dtype, last dim contiguous
    row_stride,  # elements between consecutive rows
    labels_ptr,  # (C,) int64 labels, < 0 = ignored token
    logp_ptr,  # (C,) fp32 out: log-prob of the label (0 for ignored tokens)
    entropy_ptr,  # (C,) fp32 out: entropy of the row's softmax
    lse_ptr,  # (C,) fp32 out: logsumexp of the scaled row (saved for the grad pass)
    V,  # vocabulary size
    inv_temp,  # 1 / temperature
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * row_stride
    m = float("-inf")  # running max of z
    s = 0.0  # sum exp(z - m)
    t = 0.0  # sum exp(z - m) * z
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        inb = offs < V
        z = tl.load(base + offs, mask=inb, other=float("-inf")).to(tl.float32) * inv_temp
        m_new = tl.maximum(m, tl.max(z, axis=0))
        alpha = tl.exp(m - m_new)  # 0 on the first tile (m = -inf), where s = t = 0
        e = tl.where(inb, tl.exp(z - m_new), 0.0)
        s = s * alpha + tl.sum(e, axis=0)
        t = t * alpha + tl.sum(e * tl.where(inb, z, 0.0), axis=0)  # 0 * -inf would be nan
        m = m_new
    lse = m + tl.log(s)
    label = tl.load(labels_ptr + row)
    valid = (label >= 0) & (label < V)
    z_label = tl.load(base + label, mask=valid, other=0.0).to(tl.float32) * inv_temp
    tl.store(logp_ptr + row, tl.where(valid, z_label - lse, 0.0))
    tl.store(entropy_ptr + row, lse - t / s)
    tl.store(lse_ptr + row, lse)


@triton.jit
def _row_grad_kernel(
    logits_ptr,  # (C, V) in: logits chunk; out: dL/dlogits, same dtype
    row_stride,  # elements between consecutive rows
    labels_ptr,  # (C,) int64 labels, < 0 = ignored token
    lse_ptr,  # (C,) fp32 logsumexp from _row_stats_kernel
    entropy_ptr,  # (C,) fp32 entropy from _row_stats_kernel
    dlogp_ptr,  # (C,) fp32 dL/dlogp
    dent_ptr,  # (C,) fp32 dL/dentropy (read only if HAS_DENT)
    V,  # vocabulary size
    inv_temp,  # 1 / temperature
    HAS_DENT: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * row_stride
    label = tl.load(labels_ptr + row)
    lse = tl.load(lse_ptr + row)
    ent = tl.load(entropy_ptr + row)
    g = tl.where(label >= 0, tl.load(dlogp_ptr + row), 0.0)  # ignored token: no logp gradient
    d = 0.0
    if HAS_DENT:
        d = tl.load(dent_ptr + row)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        inb = offs < V
        logp = tl.load(base + offs, mask=inb, other=0.0).to(tl.float32) * inv_temp - lse
        p = tl.exp(logp)
        dz = -p * (g + d * (logp + ent))
        dz = tl.where(offs == label, dz + g, dz)
        tl.store(base + offs, (dz * inv_temp).to(logits_ptr.dtype.element_ty), mask=inb)


def _launch_config(v: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps): tiles of up to 4096 values; 8 warps keep enough loads in flight."""
    block = min(triton.next_power_of_2(v), 4096)
    return block, 8 if block >= 2048 else 4


def row_stats(logits: torch.Tensor, labels: torch.Tensor,
              inv_temp: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(C, V) logits -> (logp, entropy, lse), each (C,) fp32."""
    assert logits.dim() == 2 and logits.stride(1) == 1, "logits must be (C, V), last dim contiguous"
    c, v = logits.shape
    labels = labels.contiguous()
    logp, entropy, lse = (torch.empty(c, dtype=torch.float32, device=logits.device) for _ in range(3))
    if c == 0:
        return logp, entropy, lse
    block, warps = _launch_config(v)
    _row_stats_kernel[(c,)](logits, logits.stride(0), labels, logp, entropy, lse, v, float(inv_temp),
                            BLOCK_V=block, num_warps=warps)
    return logp, entropy, lse


def row_grad_(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor,
              dlogp: torch.Tensor, dent: torch.Tensor | None, inv_temp: float) -> None:
    """Overwrite (C, V) logits with dL/dlogits given dL/dlogp and dL/dentropy (C,) (dent may be None)."""
    assert logits.dim() == 2 and logits.stride(1) == 1, "logits must be (C, V), last dim contiguous"
    c, v = logits.shape
    if c == 0:
        return
    dlogp = dlogp.float().contiguous()
    dent_arg = dlogp if dent is None else dent.float().contiguous()
    block, warps = _launch_config(v)
    _row_grad_kernel[(c,)](logits, logits.stride(0), labels.contiguous(), lse, entropy, dlogp,
                           dent_arg, v, float(inv_temp), HAS_DENT=dent is not None, BLOCK_V=block,
                           num_warps=warps)
