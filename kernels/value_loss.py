"""Fused clipped value loss for the PPO critic: one pass computes the loss sums, the clip fraction
and d loss / d values.

    from fastagent.kernels import value_loss, token_mean_weights
    loss, clip_frac = value_loss(values, old_values, returns, token_mean_weights(mask), clip=0.2)

Per token, with v_clip = old_v + clamp(v - old_v, -clip, clip):
    loss = sum(weight * 0.5 * max((v - ret)^2, (v_clip - ret)^2))
Triton on CUDA, C++ (OpenMP, csrc/ppo_loss.cpp's value_fwd) on CPU, closed-form torch otherwise;
`value_loss_ref` is the autograd reference. Gradients flow into values only.
"""

from __future__ import annotations

import torch

from fastagent.kernels.ppo_loss import _cpp

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the C++ and torch paths still work
    triton = None


# ---------------------------------------------------------------- Triton (CUDA)
if triton is not None:
    @triton.jit
    def _value_fwd_kernel(
        values_ptr,  # (N,) critic values
        old_values_ptr,  # (N,) values at rollout time
        returns_ptr,  # (N,) fp32 targets
        weight_ptr,  # (N,) pre-scaled aggregation weights
        dvalues_ptr,  # (N,) out: d loss / d values
        partial_ptr,  # (num_blocks, 3) out: [loss, clipped weight, weight]
        n, clip,
        BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        inb = offs < n
        v = tl.load(values_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        ov = tl.load(old_values_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        ret = tl.load(returns_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        w = tl.load(weight_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        d = v - ov
        vc = tl.where(d > clip, ov + clip, tl.where(d < -clip, ov - clip, v))  # exactly v inside
        e1 = v - ret
        e2 = vc - ret
        clipped = e2 * e2 > e1 * e1  # clamp active and worse: no gradient
        tl.store(dvalues_ptr + offs, tl.where(clipped, 0.0, w * e1).to(dvalues_ptr.dtype.element_ty),
                 mask=inb)
        out = partial_ptr + pid * 3
        tl.store(out + 0, tl.sum(w * 0.5 * tl.where(clipped, e2 * e2, e1 * e1), axis=0))
        tl.store(out + 1, tl.sum(tl.where(clipped, w, 0.0), axis=0))
        tl.store(out + 2, tl.sum(w, axis=0))


# ---------------------------------------------------------------- reference and fused op
def value_loss_ref(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                   weight: torch.Tensor, *, clip: float | None = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager torch clipped value loss: sum(weight * 0.5 * max((v - ret)^2, (v_clip - ret)^2)) with
    v_clip = old_v + clamp(v - old_v, -clip, clip). Returns (loss, clip fraction)."""
    c = float("inf") if clip is None else clip
    v_clip = old_values + torch.clamp(values - old_values, -c, c)
    l1, l2 = (values - returns) ** 2, (v_clip - returns) ** 2
    loss = (weight * 0.5 * torch.maximum(l1, l2)).sum()
    with torch.no_grad():
        w = weight.float()
        clipped = (l2 > l1) & ((values - old_values).abs() > c)  # not ties from rounding
        frac = (w * clipped).sum() / w.sum().clamp_min(torch.finfo(torch.float32).tiny)
    return loss, frac


def _value_fwd_torch(values, old_values, returns, weight, clip):
    v, ov = values.float(), old_values.float()
    e1 = v - returns
    d = v - ov
    e2 = torch.where(d.abs() > clip, ov + torch.clamp(d, -clip, clip), v) - returns  # exact v inside
    clipped = e2 * e2 > e1 * e1
    sums = torch.stack([(weight * 0.5 * torch.where(clipped, e2 * e2, e1 * e1)).sum(),
                        (weight * clipped).sum(), weight.sum()])
    return sums, torch.where(clipped, 0.0, weight * e1).to(values.dtype)


def _value_fwd_triton(values, old_values, returns, weight, clip, block: int = 1024):
    n = values.numel()
    num_blocks = max(triton.cdiv(n, block), 1)
    partial = torch.empty(num_blocks, 3, device=values.device, dtype=torch.float32)
    dvalues = torch.empty_like(values)
    _value_fwd_kernel[(num_blocks,)](values, old_values, returns, weight, dvalues, partial, n, clip,
                                     BLOCK=block)
    return partial.sum(dim=0), dvalues


@torch.library.custom_op("fastagent::value_loss", mutates_args=())
def _value_loss_op(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                   weight: torch.Tensor, clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    # prepared (N,) inputs; returns (sums (3,) = [loss, clipped weight, weight], dvalues (N,))
    if values.is_cuda and triton is not None:
        return _value_fwd_triton(values, old_values, returns, weight, clip)
    if values.device.type == "cpu" and values.dtype in (torch.float32, torch.bfloat16, torch.float16):
        ext = _cpp()
        if ext is not None:
            sums, dvalues = ext.value_fwd(values, old_values, returns, weight, clip)
            return sums, dvalues
    return _value_fwd_torch(values, old_values, returns, weight, clip)


@_value_loss_op.register_fake
def _(values, old_values, returns, weight, clip):
    return values.new_empty(3, dtype=torch.float32), torch.empty_like(values)


def _value_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])  # dvalues (N,)


def _value_backward(ctx, grad_sums, grad_dvalues):
    (dvalues,) = ctx.saved_tensors
    return dvalues * grad_sums[0].to(dvalues.dtype), None, None, None, None


torch.library.register_autograd("fastagent::value_loss", _value_backward, setup_context=_value_setup)


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               weight: torch.Tensor, *, clip: float | None = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused clipped value loss (same contract as value_loss_ref): (loss 0-d fp32, clip fraction).
    All tensors share one shape; weight is pre-scaled (token_mean_weights, ...). clip=None: plain
    squared error. Gradients flow into values only."""
    for name, t in (("old_values", old_values), ("returns", returns), ("weight", weight)):
        if t.shape != values.shape:
            raise ValueError(f"value_loss: {name} has shape {tuple(t.shape)}, values has {tuple(values.shape)}")
        if t.requires_grad:
            raise ValueError(f"value_loss: {name} requires grad; pass {name}.detach()")
    if clip is not None and clip < 0:
        raise ValueError(f"value_loss: clip must be >= 0 (or None), got {clip}")
    dtype = values.dtype if old_values.dtype == values.dtype else torch.float32
    sums, _ = _value_loss_op(values.reshape(-1).to(dtype).contiguous(),
                             old_values.reshape(-1).to(dtype).contiguous(),
                             returns.reshape(-1).float().contiguous(),
                             weight.reshape(-1).float().contiguous(),
                             float("inf") if clip is None else float(clip))
    frac = sums[1].detach() / sums[2].detach().clamp_min(torch.finfo(torch.float32).tiny)
    return sums[0], frac
