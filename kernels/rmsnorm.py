"""Fused RMSNorm for training Llama / Qwen2 decoders on CPU: one op forward, one op backward.

    from fastagent.kernels import rms_norm
    y = rms_norm(x, weight, eps=1e-6)        # x (..., H), weight (H,): LlamaRMSNorm.forward

Computes exactly what transformers' LlamaRMSNorm computes (`rms_norm_ref` is that code):
    rstd = rsqrt(mean(x^2) + eps) in fp32,   y = weight * (x * rstd).to(x.dtype)
y's dtype is torch.result_type(weight, x) (fp32 for an fp32 weight with bf16 x, as under autocast).
Memory: for backward the eager reference saves, besides x and weight, the normalised tensor in x's
dtype and (bf16 x) an fp32 copy of x: 3x x's bytes in bf16, 1x in fp32; it makes ~7 passes over
(N, H). The fused op saves x and weight (alive anyway) and rstd (N,) fp32, reads x twice per row
while it sits in cache and writes y once; backward reads dy and x once, writes dx, and sums dw per
thread.
C++ (OpenMP, csrc/rmsnorm.cpp) on CPU for fp32 / bf16; the reference otherwise (CUDA, other dtypes,
a failed build).
"""

from __future__ import annotations

import torch

from fastagent.kernels._cpp import try_load_cpp

CPP_DTYPES = (torch.float32, torch.bfloat16)


# ---------------------------------------------------------------- reference (autograd)
def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """transformers' LlamaRMSNorm.forward, line for line; autograd gives the gradients."""
    input_dtype = x.dtype
    h = x.to(torch.float32)
    var = h.pow(2).mean(-1, keepdim=True)  # (..., 1)
    h = h * torch.rsqrt(var + eps)
    return weight * h.to(input_dtype)


# ---------------------------------------------------------------- custom ops + autograd
def _cpp():
    return try_load_cpp("rmsnorm", ["rmsnorm.cpp"])


@torch.library.custom_op("fastagent::rms_norm", mutates_args=())
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    # x (N, H) contiguous CPU, weight (H,): -> y (N, H) in result_type(weight, x), rstd (N,) fp32
    y, rstd = _cpp().rms_norm_fwd(x, weight, eps)
    return y, rstd


@_rms_norm_op.register_fake
def _(x, weight, eps):
    return (x.new_empty(x.shape, dtype=torch.result_type(weight, x)),
            x.new_empty(x.shape[0], dtype=torch.float32))


@torch.library.custom_op("fastagent::rms_norm_backward", mutates_args=())
def _rms_norm_backward_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                          need_dw: bool) -> tuple[torch.Tensor, torch.Tensor]:
    # -> dx (N, H) in x's dtype, dw (H,) in weight's dtype (empty when not need_dw)
    dx, dw = _cpp().rms_norm_bwd(dy, x, weight, rstd, need_dw)
    return dx, dw


@_rms_norm_backward_op.register_fake
def _(dy, x, weight, rstd, need_dw):
    return torch.empty_like(x), weight.new_empty(weight.shape if need_dw else (0,))


def _rms_norm_setup(ctx, inputs, output):
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight, output[1])  # x, weight (inputs: no extra memory), rstd (N,)
    ctx.set_materialize_grads(False)


def _rms_norm_backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    if dy is None:
        return None, None, None
    need_dw = ctx.needs_input_grad[1]
    dy = dy.to(torch.result_type(weight, x)).contiguous()
    dx, dw = _rms_norm_backward_op(dy, x, weight, rstd, need_dw)
    return dx if ctx.needs_input_grad[0] else None, dw if need_dw else None, None


torch.library.register_autograd("fastagent::rms_norm", _rms_norm_backward, setup_context=_rms_norm_setup)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim, as LlamaRMSNorm: x (..., H), weight (H,) -> (..., H) in
    result_type(weight, x). Differentiable in x and weight."""
    if weight.dim() != 1 or x.dim() < 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(f"rms_norm: weight must be (H,) with H = x.shape[-1], got x {tuple(x.shape)}, "
                         f"weight {tuple(weight.shape)}")
    if (x.device.type == "cpu" and weight.device.type == "cpu" and x.dtype in CPP_DTYPES
            and weight.dtype in CPP_DTYPES and _cpp() is not None):
        y, _ = _rms_norm_op(x.reshape(-1, x.shape[-1]).contiguous(), weight.contiguous(), float(eps))
        return y.view(x.shape)
    return rms_norm_ref(x, weight, eps)
