"""Fused SwiGLU product silu(gate) * up for training Llama / Qwen2 MLPs on CPU.

    from fastagent.kernels import silu_mul
    h = silu_mul(gate_proj(x), up_proj(x))   # LlamaMLP: down_proj(act_fn(gate_proj(x)) * up_proj(x))

gate and up share one shape (..., I) and dtype; y has both. With s = sigmoid(gate):
    y = gate * s * up,   d_gate = dy * up * s * (1 + gate * (1 - s)),   d_up = dy * gate * s
computed in fp32 and rounded once per output (the eager reference in bf16 rounds silu(gate) too).
Memory: the eager reference saves gate, up and silu(gate) for backward and runs 2 ops over (N, I)
forward, 3 backward; the fused op saves gate and up only (backward recomputes s), reads them once
and writes y once forward; backward reads dy, gate, up once and writes d_gate, d_up.
C++ (OpenMP, csrc/swiglu.cpp) on CPU for fp32 / bf16; `silu_mul_ref` otherwise (CUDA, other or
mixed dtypes, a failed build).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastagent.kernels._cpp import try_load_cpp

CPP_DTYPES = (torch.float32, torch.bfloat16)


# ---------------------------------------------------------------- reference (autograd)
def silu_mul_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """LlamaMLP's act_fn(gate) * up with act_fn = SiLU, in the inputs' dtype; autograd gradients."""
    return F.silu(gate) * up


# ---------------------------------------------------------------- custom ops + autograd
def _cpp():
    return try_load_cpp("swiglu", ["swiglu.cpp"])


@torch.library.custom_op("fastagent::silu_mul", mutates_args=())
def _silu_mul_op(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    # gate, up (N,) contiguous CPU, one dtype -> y (N,) in that dtype
    return _cpp().silu_mul_fwd(gate, up)


@_silu_mul_op.register_fake
def _(gate, up):
    return torch.empty_like(gate)


@torch.library.custom_op("fastagent::silu_mul_backward", mutates_args=())
def _silu_mul_backward_op(dy: torch.Tensor, gate: torch.Tensor,
                          up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # -> d_gate, d_up (N,) in gate's dtype
    d_gate, d_up = _cpp().silu_mul_bwd(dy, gate, up)
    return d_gate, d_up


@_silu_mul_backward_op.register_fake
def _(dy, gate, up):
    return torch.empty_like(gate), torch.empty_like(up)


def _silu_mul_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)  # gate, up: no sigmoid, no silu(gate)
    ctx.set_materialize_grads(False)


def _silu_mul_backward(ctx, dy):
    gate, up = ctx.saved_tensors
    if dy is None:
        return None, None
    d_gate, d_up = _silu_mul_backward_op(dy.to(gate.dtype).contiguous(), gate, up)
    return d_gate if ctx.needs_input_grad[0] else None, d_up if ctx.needs_input_grad[1] else None


torch.library.register_autograd("fastagent::silu_mul", _silu_mul_backward, setup_context=_silu_mul_setup)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, gate and up of one shape (..., I). Differentiable in both."""
    if gate.shape != up.shape:
        raise ValueError(f"silu_mul: gate {tuple(gate.shape)} and up {tuple(up.shape)} must share one shape")
    if (gate.device.type == "cpu" and up.device.type == "cpu" and gate.dtype == up.dtype
            and gate.dtype in CPP_DTYPES and _cpp() is not None):
        return _silu_mul_op(gate.reshape(-1).contiguous(), up.reshape(-1).contiguous()).view(gate.shape)
    return silu_mul_ref(gate, up)
