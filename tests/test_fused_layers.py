"""Tests for kernels/rmsnorm.py and kernels/swiglu.py: the fused decoder-layer ops (C++ on CPU)
against their eager references (transformers' LlamaRMSNorm and LlamaMLP's silu(gate) * up), values
and gradients, fp32 and bf16, odd and realistic shapes; what the ops save for backward; fallbacks.

    pytest tests/test_fused_layers.py -q
"""

from __future__ import annotations

import importlib

import pytest
import torch

from fastagent.kernels import rms_norm, rms_norm_ref, silu_mul, silu_mul_ref

R = importlib.import_module("fastagent.kernels.rmsnorm")
S = importlib.import_module("fastagent.kernels.swiglu")

# (value, gradient) errors against the reference in fp32 on the same (bf16-representable) inputs:
# values as max|y - ref| / max(1, max|ref|), gradients as ||g - ref|| / ||ref||. In bf16 both the
# kernel and the eager reference round y (rms_norm: twice, as HF does) and each gradient; the kernel
# computes in fp32 inside, so its gradients are a little closer (seen: 1.7e-3 vs 2.3e-3).
KERNEL_TOL = {torch.float32: (1e-6, 1e-6), torch.bfloat16: (1e-2, 5e-3)}  # seen 1.4e-7 1.9e-7, 3.9e-3 2.7e-3
REF_LOWP_TOL = {torch.float32: (1e-6, 1e-6), torch.bfloat16: (1e-2, 5e-3)}  # bf16 seen 4.1e-3, 2.9e-3
RMS_SHAPES = [(1, 1, 5), (3, 7, 33), (2, 37, 576), (2, 512, 576)]
SILU_SHAPES = [(1, 1, 5), (3, 7, 33), (2, 37, 576), (2, 512, 1536)]
EPS = 1e-6


def bf16_exact(t: torch.Tensor) -> torch.Tensor:
    """Round to bf16 and back, so fp32 and bf16 runs see identical inputs."""
    return t.bfloat16().float()


def val_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1.0)).item()


def grad_err(g: torch.Tensor, ref: torch.Tensor) -> float:
    return ((g.float() - ref).norm() / ref.norm().clamp_min(1e-12)).item()


def rms_inputs(shape, seed: int = 0):
    """x (activations of scale ~2), weight ~1 +- 0.2, dy, all fp32 and bf16-representable."""
    g = torch.Generator().manual_seed(seed)
    x = bf16_exact(2 * torch.randn(shape, generator=g))
    w = bf16_exact(1 + 0.2 * torch.randn(shape[-1], generator=g))
    dy = bf16_exact(torch.randn(shape, generator=g))
    return x, w, dy


def run_rms(fn, x, w, dy, x_dtype, w_dtype):
    """y and (dx, dw) of fn, on fresh leaves of the given dtypes."""
    xx = x.to(x_dtype, copy=True).requires_grad_()
    ww = w.to(w_dtype, copy=True).requires_grad_()
    y = fn(xx, ww, EPS)
    y.backward(dy.to(y.dtype))
    return y, xx.grad, ww.grad


def silu_inputs(shape, seed: int = 0):
    """gate (pre-activations of scale ~2: both tails of the sigmoid), up, dy; bf16-representable."""
    g = torch.Generator().manual_seed(seed)
    return tuple(bf16_exact(s * torch.randn(shape, generator=g)) for s in (2.0, 1.0, 1.0))


def run_silu(fn, gate, up, dy, dtype):
    gg = gate.to(dtype, copy=True).requires_grad_()
    uu = up.to(dtype, copy=True).requires_grad_()
    y = fn(gg, uu)
    y.backward(dy.to(y.dtype))
    return y, gg.grad, uu.grad


def extra_saved_bytes(fn, *args) -> int:
    """Bytes autograd saves for fn's backward, beyond the storage of the tensors in args."""
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
    return sum(n for ptr, n in saved.items() if ptr not in inputs)


def check_three_way(kern, ref_lowp, ref32, dtype):
    """kern and ref_lowp: (y, *grads) in dtype; ref32 the same in fp32."""
    for name, res, tol in (("kernel", kern, KERNEL_TOL[dtype]), ("ref_lowp", ref_lowp, REF_LOWP_TOL[dtype])):
        assert val_err(res[0], ref32[0]) <= tol[0], (name, "value", val_err(res[0], ref32[0]))
        for i, (g, g32) in enumerate(zip(res[1:], ref32[1:])):
            assert grad_err(g, g32) <= tol[1], (name, f"grad {i}", grad_err(g, g32))


# ---------------------------------------------------------------- rms_norm
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", RMS_SHAPES)
def test_rms_norm_matches_reference(shape, dtype):
    x, w, dy = rms_inputs(shape, seed=sum(shape))
    ref32 = run_rms(rms_norm_ref, x, w, dy, torch.float32, torch.float32)
    kern = run_rms(rms_norm, x, w, dy, dtype, dtype)
    ref_lowp = run_rms(rms_norm_ref, x, w, dy, dtype, dtype)
    assert kern[0].dtype == ref_lowp[0].dtype == dtype and kern[0].shape == shape
    assert kern[1].dtype == dtype and kern[2].dtype == dtype
    check_three_way(kern, ref_lowp, ref32, dtype)
    if dtype == torch.float32:
        for a, b in zip(kern, ref32):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("x_dtype,w_dtype",
                         [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("shape", [(3, 7, 33), (2, 512, 576)])
def test_rms_norm_mixed_dtypes(shape, x_dtype, w_dtype):
    """Autocast style (fp32 weight, bf16 activations) and the reverse: y in result_type(weight, x)
    (fp32 here), the normalised x rounded to x's dtype before the weight as in the reference, dx in
    x's dtype and dw in the weight's."""
    x, w, dy = rms_inputs(shape, seed=7)
    ref32 = run_rms(rms_norm_ref, x, w, dy, torch.float32, torch.float32)
    kern = run_rms(rms_norm, x, w, dy, x_dtype, w_dtype)
    ref_lowp = run_rms(rms_norm_ref, x, w, dy, x_dtype, w_dtype)
    assert kern[0].dtype == ref_lowp[0].dtype == torch.float32
    assert kern[1].dtype == x_dtype and kern[2].dtype == w_dtype
    check_three_way(kern, ref_lowp, ref32, torch.bfloat16)
    # same roundings as the reference: the fp32 y differs from it only where rstd's last bit flips a
    # bf16 rounding of x * rstd (one bf16 ulp at most)
    torch.testing.assert_close(kern[0], ref_lowp[0], rtol=8e-3, atol=1e-5)


def test_rms_norm_saves_only_x_weight_rstd():
    """The C++ op is taken on CPU and keeps x (the input itself, no copy), weight and rstd (N,) fp32
    for backward; not the normalised tensor (nor, in bf16, an fp32 copy of x)."""
    assert R._cpp() is not None, "the C++ kernel must build on the CI machine"
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(64, requires_grad=True)
    y = rms_norm(x, w)
    node = y.grad_fn.next_functions[0][0]  # y.grad_fn: the view back to (2, 5, 64)
    assert "fastagent_rms_norm" in type(node).__name__
    saved = node.saved_tensors
    assert len(saved) == 3
    assert saved[0].data_ptr() == x.data_ptr() and saved[0].shape == (10, 64)
    assert saved[1].data_ptr() == w.data_ptr()
    assert saved[2].shape == (10,) and saved[2].dtype == torch.float32
    # beyond the inputs: rstd only; the reference keeps an fp32 copy of x and the bf16 normalised x
    assert extra_saved_bytes(rms_norm, x, w) == 10 * 4
    assert extra_saved_bytes(rms_norm_ref, x, w) == 3 * x.nbytes + 10 * 4


def test_rms_norm_frozen_weight_and_no_grad():
    x, w, dy = rms_inputs((3, 7, 33), seed=3)
    xx = x.clone().requires_grad_()
    y = rms_norm(xx, w)  # weight without grad: no dw pass
    y.backward(dy)
    xr = x.clone().requires_grad_()
    rms_norm_ref(xr, w).backward(dy)
    torch.testing.assert_close(xx.grad, xr.grad, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(rms_norm(x, w), rms_norm_ref(x, w), rtol=1e-5, atol=1e-5)


def test_rms_norm_threads_agree():
    """2 threads (per-thread dw rows, summed at the end) vs 1 thread, at a size that uses both."""
    x, w, dy = rms_inputs((2, 512, 576), seed=1)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_rms(rms_norm, x, w, dy, torch.float32, torch.float32)
        torch.set_num_threads(2)
        two = run_rms(rms_norm, x, w, dy, torch.float32, torch.float32)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])  # row-wise: bit-identical
    torch.testing.assert_close(one[2], two[2], rtol=1e-5, atol=1e-5)  # dw: another summation order


def test_rms_norm_fallbacks(monkeypatch):
    """fp64 (no kernel) and a failed build take the reference; results equal the kernel's."""
    x, w, dy = rms_inputs((3, 7, 33), seed=2)
    kern = run_rms(rms_norm, x, w, dy, torch.float32, torch.float32)
    y64 = rms_norm(x.double(), w.double())
    assert "fastagent" not in type(y64.grad_fn).__name__
    torch.testing.assert_close(y64.float(), kern[0], rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(R, "_cpp", lambda: None)  # what a failed C++ build leaves
    for a, b in zip(run_rms(rms_norm, x, w, dy, torch.float32, torch.float32), kern):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_rms_norm_rejects_bad_weight():
    x = torch.randn(2, 3, 8)
    for w in (torch.ones(7), torch.ones(1, 8), torch.ones(())):
        with pytest.raises(ValueError, match="rms_norm"):
            rms_norm(x, w)


def test_rms_norm_opcheck():
    """Schema, fake (meta) implementation and autograd registration of the custom op."""
    x = torch.randn(6, 33, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(33, requires_grad=True)
    torch.library.opcheck(R._rms_norm_op, (x, w, EPS))


# ---------------------------------------------------------------- silu_mul
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SILU_SHAPES)
def test_silu_mul_matches_reference(shape, dtype):
    gate, up, dy = silu_inputs(shape, seed=sum(shape))
    ref32 = run_silu(silu_mul_ref, gate, up, dy, torch.float32)
    kern = run_silu(silu_mul, gate, up, dy, dtype)
    ref_lowp = run_silu(silu_mul_ref, gate, up, dy, dtype)
    assert all(t.dtype == dtype for t in kern) and kern[0].shape == shape
    check_three_way(kern, ref_lowp, ref32, dtype)
    if dtype == torch.float32:
        for a, b in zip(kern, ref32):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_silu_mul_extreme_gates():
    """Large |gate| of both signs: no overflow in the sigmoid (exp(-|gate|) only), exact tails."""
    gate = torch.tensor([-1e4, -100.0, -88.0, -20.0, -1e-3, 0.0, 1e-3, 20.0, 88.0, 100.0, 1e4])
    up, dy = torch.full_like(gate, 0.5), torch.ones_like(gate)
    kern = run_silu(silu_mul, gate, up, dy, torch.float32)
    ref = run_silu(silu_mul_ref, gate, up, dy, torch.float32)
    for a, b in zip(kern, ref):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_silu_mul_saves_only_gate_and_up():
    """The C++ op is taken on CPU and keeps exactly gate and up (no copies, no silu(gate))."""
    assert S._cpp() is not None, "the C++ kernel must build on the CI machine"
    gate = torch.randn(2, 5, 48, dtype=torch.bfloat16, requires_grad=True)
    up = torch.randn(2, 5, 48, dtype=torch.bfloat16, requires_grad=True)
    y = silu_mul(gate, up)
    node = y.grad_fn.next_functions[0][0]  # y.grad_fn: the view back to (2, 5, 48)
    assert "fastagent_silu_mul" in type(node).__name__
    saved = node.saved_tensors
    assert len(saved) == 2
    assert saved[0].data_ptr() == gate.data_ptr() and saved[1].data_ptr() == up.data_ptr()
    assert extra_saved_bytes(silu_mul, gate, up) == 0
    assert extra_saved_bytes(silu_mul_ref, gate, up) == gate.nbytes  # silu(gate)


def test_silu_mul_noncontiguous_and_one_grad():
    """gate and up as halves of one fused gate_up projection (non-contiguous views); up frozen."""
    gate_up, _, dy = silu_inputs((3, 7, 66), seed=4)
    dy = dy[..., :33]
    gu = gate_up.clone().requires_grad_()
    gate, up = gu.chunk(2, dim=-1)
    silu_mul(gate, up.detach()).backward(dy)
    gr = gate_up.clone().requires_grad_()
    g2, u2 = gr.chunk(2, dim=-1)
    silu_mul_ref(g2, u2.detach()).backward(dy)
    torch.testing.assert_close(gu.grad, gr.grad, rtol=1e-5, atol=1e-5)


def test_silu_mul_fallbacks(monkeypatch):
    """Mixed dtypes (no kernel) and a failed build take the reference."""
    gate, up, dy = silu_inputs((3, 7, 33), seed=5)
    kern = run_silu(silu_mul, gate, up, dy, torch.float32)
    y = silu_mul(gate.bfloat16(), up.clone().requires_grad_())  # mixed dtypes: the reference
    assert y.dtype == torch.float32 and "fastagent" not in type(y.grad_fn).__name__
    torch.testing.assert_close(y, silu_mul_ref(gate.bfloat16(), up), rtol=0, atol=0)
    monkeypatch.setattr(S, "_cpp", lambda: None)  # what a failed C++ build leaves
    for a, b in zip(run_silu(silu_mul, gate, up, dy, torch.float32), kern):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_silu_mul_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="silu_mul"):
        silu_mul(torch.randn(2, 8), torch.randn(2, 9))


def test_silu_mul_opcheck():
    gate = torch.randn(40, dtype=torch.bfloat16, requires_grad=True)
    up = torch.randn(40, dtype=torch.bfloat16, requires_grad=True)
    torch.library.opcheck(S._silu_mul_op, (gate, up))
