"""Triton row passes over a logits block (CUDA; CPU only under TRITON_INTERPRET=1, for tests).

    from fastagent.kernels.logprob_triton import row_stats_, row_grad_
    row_stats_(logits, labels, v0, vocab, inv_temp, m, s, t, zl)   # logits (C, Vb) fp32/bf16/fp16
    row_grad_(logits, labels, v0, lse, entropy, dlogp, dent, inv_temp)  # logits := dL/dlogits

A block holds vocabulary columns [v0, v0 + Vb) of C token rows (on CUDA kernels/logprob.py passes
whole rows: v0 = 0, Vb = V). One program per row walks the block in BLOCK_V tiles with an online
logsumexp, continuing the row's state from earlier blocks: the running max m, s = sum exp(z - m)
and t = sum exp(z - m) (z - m), rescaled by exp(m_old - m) when the max grows; zl = z at the label.
A row is read once and nothing (C, V)-sized is allocated; values load in the logits' dtype and are
computed in fp32. With z = logits * inv_temp, p = softmax(z), the caller finishes
    lse = m + log s,  entropy = log s - t / s,  logp = zl - lse
and the grad kernel writes, over the logits (in their dtype),
    dL/dz_j = -p_j (dlogp + dent (log p_j + H)) + [j == label] dlogp,  dL/dlogits = inv_temp dL/dz
for the caller's two matmuls (grad_hidden, grad_weight). Memory traffic per row: stats reads Vb
values, grad reads and writes Vb values; both are bandwidth bound (one exp per value).
Imported lazily by kernels/logprob.py only when Triton is the chosen row pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _row_stats_kernel(
    logits_ptr,  # (C, Vb) logits block (columns v0 .. v0 + Vb), any float dtype, last dim contiguous
    row_stride,  # elements between consecutive rows
    labels_ptr,  # (C,) int64 global label ids, < 0 = ignored token
    m_ptr,  # (C,) fp32 in/out: running max of z = logits * inv_temp
    s_ptr,  # (C,) fp32 in/out: running sum exp(z - m)
    t_ptr,  # (C,) fp32 in/out: running sum exp(z - m) * (z - m)
    zl_ptr,  # (C,) fp32 in/out: z at the label, written by the block that holds it
    v0,  # first vocabulary id of the block
    Vb,  # columns in the block
    inv_temp,  # 1 / temperature
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * row_stride
    m = tl.load(m_ptr + row)
    s = tl.load(s_ptr + row)
    t = tl.load(t_ptr + row)
    for j0 in range(0, Vb, BLOCK_V):
        offs = j0 + tl.arange(0, BLOCK_V)
        inb = offs < Vb
        z = tl.load(base + offs, mask=inb, other=float("-inf")).to(tl.float32) * inv_temp
        m_new = tl.maximum(m, tl.max(z, axis=0))
        alpha = tl.exp(m - m_new)  # 0 while m = -inf (then s = t = 0)
        d = tl.where(inb, z - m_new, 0.0)  # -inf - m_new would turn e * d into nan
        e = tl.where(inb, tl.exp(d), 0.0)
        # shift the old t from reference m to m_new: sum e_old (z - m_new) = alpha (t + s (m - m_new))
        t = alpha * (t + tl.where(s > 0.0, s * (m - m_new), 0.0)) + tl.sum(e * d, axis=0)
        s = alpha * s + tl.sum(e, axis=0)
        m = m_new
    tl.store(m_ptr + row, m)
    tl.store(s_ptr + row, s)
    tl.store(t_ptr + row, t)
    local = tl.load(labels_ptr + row) - v0
    here = (local >= 0) & (local < Vb)  # an ignored label (< 0) is never here: v0 >= 0
    z_label = tl.load(base + local, mask=here, other=0.0).to(tl.float32) * inv_temp
    tl.store(zl_ptr + row, z_label, mask=here)


@triton.jit
def _row_grad_kernel(
    logits_ptr,  # (C, Vb) in: logits block; out: dL/dlogits, same dtype
    row_stride,  # elements between consecutive rows
    labels_ptr,  # (C,) int64 global label ids, < 0 = ignored token
    lse_ptr,  # (C,) fp32 logsumexp of the full rows
    entropy_ptr,  # (C,) fp32 entropy of the full rows
    dlogp_ptr,  # (C,) fp32 dL/dlogp
    dent_ptr,  # (C,) fp32 dL/dentropy (read only if HAS_DENT)
    v0,  # first vocabulary id of the block
    Vb,  # columns in the block
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
    local = label - v0  # the label's column in this block (may be outside it)
    for j0 in range(0, Vb, BLOCK_V):
        offs = j0 + tl.arange(0, BLOCK_V)
        inb = offs < Vb
        logp = tl.load(base + offs, mask=inb, other=0.0).to(tl.float32) * inv_temp - lse
        p = tl.exp(logp)
        dz = -p * (g + d * (logp + ent))
        dz = tl.where(offs == local, dz + g, dz)  # g = 0 for ignored tokens
        tl.store(base + offs, (dz * inv_temp).to(logits_ptr.dtype.element_ty), mask=inb)


def _launch_config(v: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps): tiles of up to 4096 values; 8 warps keep enough loads in flight."""
    block = min(triton.next_power_of_2(v), 4096)
    return block, 8 if block >= 2048 else 4


def row_stats_(logits: torch.Tensor, labels: torch.Tensor, v0: int, vocab: int, inv_temp: float,
               m: torch.Tensor, s: torch.Tensor, t: torch.Tensor, zl: torch.Tensor) -> None:
    """Merge a (C, Vb) logits block (columns v0 ..) into the per-row state (m, s, t, zl), (C,) fp32.
    vocab (the full vocabulary size) is not needed on the GPU: labels are not bounds-checked here
    (kernels/logprob.py's check_labels does it once per call)."""
    assert logits.dim() == 2 and logits.stride(1) == 1, "logits must be (C, Vb), last dim contiguous"
    c, vb = logits.shape
    if c == 0:
        return
    block, warps = _launch_config(vb)
    _row_stats_kernel[(c,)](logits, logits.stride(0), labels.contiguous(), m, s, t, zl, v0, vb,
                            float(inv_temp), BLOCK_V=block, num_warps=warps)


def row_grad_(logits: torch.Tensor, labels: torch.Tensor, v0: int, lse: torch.Tensor,
              entropy: torch.Tensor, dlogp: torch.Tensor, dent: torch.Tensor | None,
              inv_temp: float) -> None:
    """Overwrite a (C, Vb) logits block with dL/dlogits given dL/dlogp and dL/dentropy (C,)."""
    assert logits.dim() == 2 and logits.stride(1) == 1, "logits must be (C, Vb), last dim contiguous"
    c, vb = logits.shape
    if c == 0:
        return
    dlogp = dlogp.float().contiguous()
    dent_arg = dlogp if dent is None else dent.float().contiguous()
    block, warps = _launch_config(vb)
    _row_grad_kernel[(c,)](logits, logits.stride(0), labels.contiguous(), lse, entropy, dlogp,
                           dent_arg, v0, vb, float(inv_temp), HAS_DENT=dent is not None,
                           BLOCK_V=block, num_warps=warps)
