"""Tests for kernels/ppo_loss.py: the fused PPO policy loss and clipped value loss (C++ on CPU,
Triton under the interpreter, torch fallback) against the eager autograd references, values,
gradients and stats, in fp32 and bf16, on odd and realistic shapes; the aggregation weights.

    pytest tests/test_ppo_loss.py -q
"""

from __future__ import annotations

import importlib
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastagent.kernels import (ppo_loss, ppo_loss_ref, ppo_token_loss_and_grads, ppo_token_sums_and_grads,
                               seq_mean_weights, token_mean_weights, value_loss, value_loss_ref)
from _proc import run_triton_interpreted

P = importlib.import_module("fastagent.kernels.ppo_loss")  # the package exports ppo_loss(), the function

CONFIGS = {
    "full": dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0, kl_coef=0.05, kl_estimator="k3",
                 entropy_coef=0.01),
    "k1": dict(clip_low=0.2, clip_high=0.2, dual_clip=None, kl_coef=0.1, kl_estimator="k1",
               entropy_coef=0.0),
    "plain": dict(clip_low=0.2, clip_high=0.2, dual_clip=None, kl_coef=0.0, kl_estimator="k3",
                  entropy_coef=0.0),
}
# Errors against ppo_loss_ref in fp32 on the same (bf16-representable) inputs: |loss - ref| and
# ||grad - ref|| / ||ref||. The kernel computes in fp32 from bf16 inputs and rounds only the
# stored gradients to bf16; the eager reference in bf16 rounds every intermediate (and flips
# some clip decisions).
KERNEL_TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-5, 1e-2)}  # bf16 seen: 6e-8 / 2e-3
REF_LOWP_TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (5e-3, 0.25)}  # bf16 seen: 7e-4 / 0.1


def make_inputs(shape, *, seed: int = 0, hole_prob: float = 0.3, seq_mean: bool = False):
    """logp, old_logp, adv, weight, ref_logp, entropy, mask, all fp32 and bf16-representable. The
    ratio spread is wide enough that the clip (both sides) and the dual clip are active."""
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(shape, generator=g) * 4
    old_logp = logp + 0.3 * torch.randn(shape, generator=g)
    old_logp -= 1.5 * (torch.rand(shape, generator=g) < 0.05)  # ratio ~4.5: dual clip territory
    adv = torch.randn(shape, generator=g)
    ref_logp = logp + 0.2 * torch.randn(shape, generator=g)
    entropy = torch.rand(shape, generator=g) * 3
    mask = torch.rand(shape, generator=g) >= hole_prob
    if len(shape) == 2:
        weight = seq_mean_weights(mask) if seq_mean else token_mean_weights(mask)
    else:
        weight = token_mean_weights(mask)
    bf = [t.bfloat16().float() for t in (logp, old_logp, adv, ref_logp, entropy)]
    return bf[0], bf[1], bf[2], weight, bf[3], bf[4], mask


def run(fn, inputs, dtype, cfg, adv_weight_dtype=torch.float32):
    """Loss, stats and (logp, entropy) gradients of fn, policy tensors in dtype."""
    logp, old_logp, adv, weight, ref_logp, entropy, _ = inputs
    lp = logp.detach().to(dtype, copy=True).requires_grad_()  # fresh leaves: inputs stay untouched
    ent = entropy.detach().to(dtype, copy=True).requires_grad_()
    loss, stats = fn(lp, old_logp.to(dtype), adv.to(adv_weight_dtype), weight.to(adv_weight_dtype),
                     ref_logp.to(dtype) if cfg["kl_coef"] else None, ent, **cfg)
    loss.backward()
    return loss.float(), stats, lp.grad.float(), ent.grad.float()


def grad_err(g: torch.Tensor, ref: torch.Tensor) -> float:
    return ((g - ref).norm() / ref.norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("cfg", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1,), (1, 1), (1, 37), (3, 37), (64, 2048)])
def test_ppo_loss_matches_reference(shape, dtype, cfg):
    inputs = make_inputs(shape, seed=sum(shape), seq_mean=cfg == "k1")
    c = CONFIGS[cfg]
    loss32, stats32, g32, e32 = run(ppo_loss_ref, inputs, torch.float32, c)
    loss, stats, g, e = run(ppo_loss, inputs, dtype, c)
    loss_lp, _, g_lp, e_lp = run(ppo_loss_ref, inputs, dtype, c, adv_weight_dtype=dtype)
    loss_tol, grad_tol = KERNEL_TOL[dtype]
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert abs(loss - loss32) <= loss_tol and grad_err(g, g32) <= grad_tol
    assert grad_err(e, e32) <= grad_tol if c["entropy_coef"] else (e == 0).all()
    loss_tol, grad_tol = REF_LOWP_TOL[dtype]
    assert abs(loss_lp - loss32) <= loss_tol and grad_err(g_lp, g32) <= grad_tol
    for name, s, s32 in zip(stats._fields, stats, stats32):
        assert abs(s - s32) <= 1e-4 * max(1.0, abs(s32)), name
    if shape == (64, 2048) and cfg == "full":  # the branches under test are really taken
        assert 0.05 < stats.clip_frac < 0.9 and stats.dual_clip_frac > 0.005


def test_all_masked_and_zero_weight_tokens():
    logp, old_logp, adv, _, ref_logp, entropy, _ = make_inputs((4, 9), seed=1)
    weight = token_mean_weights(torch.zeros(4, 9, dtype=torch.bool))
    assert (weight == 0).all()
    loss, stats, g, e = run(ppo_loss, (logp, old_logp, adv, weight, ref_logp, entropy, None),
                            torch.float32, CONFIGS["full"])
    assert loss == 0 and (g == 0).all() and (e == 0).all()
    assert all(torch.isfinite(s) and s == 0 for s in stats)


def test_weights_helpers():
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    torch.testing.assert_close(token_mean_weights(mask), mask.float() / 5)
    torch.testing.assert_close(token_mean_weights(mask, num_tokens=10), mask.float() / 10)
    expect = torch.tensor([[1 / 4, 1 / 4, 0, 0], [1 / 6, 0, 1 / 6, 1 / 6], [0, 0, 0, 0]])
    torch.testing.assert_close(seq_mean_weights(mask), expect)  # 2 non-empty sequences
    flat = mask.flatten()
    cu = torch.tensor([0, 4, 8, 12])
    torch.testing.assert_close(seq_mean_weights(flat, cu), expect.flatten())
    packed = torch.tensor([1, 1, 1, 0, 1], dtype=torch.bool)  # sequences of 2 and 3 tokens
    torch.testing.assert_close(seq_mean_weights(packed, torch.tensor([0, 2, 5])),
                               torch.tensor([0.25, 0.25, 0.25, 0.0, 0.25]))
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        seq_mean_weights(flat)


def test_token_function_matches_autograd_and_adds_over_chunks():
    """The elementwise entry that fused_linear_ppo_loss calls per lm_head chunk."""
    logp, old_logp, adv, weight, ref_logp, entropy, _ = make_inputs((3000,), seed=4)
    c = CONFIGS["full"]
    loss, dlogp, dent = ppo_token_loss_and_grads(logp, old_logp, adv, weight, ref_logp, entropy, **c)
    _, _, g32, e32 = run(ppo_loss_ref, (logp, old_logp, adv, weight, ref_logp, entropy, None),
                         torch.float32, c)
    loss32 = ppo_loss_ref(logp, old_logp, adv, weight, ref_logp, entropy, **c)[0]
    assert loss.shape == () and abs(loss - loss32) <= 1e-5
    assert grad_err(dlogp, g32) <= 1e-5 and grad_err(dent, e32) <= 1e-6
    sums, _, _ = ppo_token_sums_and_grads(logp, old_logp, adv, weight, ref_logp, entropy, **c)
    parts = [ppo_token_sums_and_grads(*(t[i:i + 1000] for t in (logp, old_logp, adv, weight, ref_logp,
                                                                 entropy)), **c)[0] for i in (0, 1000, 2000)]
    torch.testing.assert_close(sum(parts), sums, atol=1e-5, rtol=1e-5)
    none_ent = ppo_token_loss_and_grads(logp, old_logp, adv, weight, **CONFIGS["plain"])
    assert none_ent[2] is None


def test_cpp_deterministic_across_threads_and_matches_fallback():
    inputs = make_inputs(((1 << 19) + 77,), seed=5)[:6]  # big enough for 2 threads in the kernel
    args = (0.2, 0.28, 3.0, 0.05, True, 0.01)
    ext = P._cpp()
    assert ext is not None, "the C++ kernel must build on the CI machine"
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ext.ppo_fwd(*inputs, *args)
        torch.set_num_threads(2)
        two = ext.ppo_fwd(*inputs, *args)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
    sums, dlogp = P._ppo_fwd_torch(*inputs, *args)  # the fallback when the build fails
    torch.testing.assert_close(one[0], sums, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(one[1], dlogp, atol=1e-7, rtol=1e-5)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 64), seed=st.integers(0, 10_000), clip_low=st.floats(0.0, 0.5),
       clip_high=st.floats(0.0, 1.0), dual=st.one_of(st.none(), st.floats(1.5, 10.0)),
       kl_coef=st.floats(0.0, 1.0), k1=st.booleans(), entropy_coef=st.floats(0.0, 0.1))
def test_random_configs_match_reference(n, seed, clip_low, clip_high, dual, kl_coef, k1, entropy_coef):
    cfg = dict(clip_low=clip_low, clip_high=clip_high, dual_clip=dual, kl_coef=kl_coef,
               kl_estimator="k1" if k1 else "k3", entropy_coef=entropy_coef)
    inputs = make_inputs((n,), seed=seed)
    loss32, stats32, g32, e32 = run(ppo_loss_ref, inputs, torch.float32, cfg)
    loss, stats, g, e = run(ppo_loss, inputs, torch.float32, cfg)
    assert abs(loss - loss32) <= 1e-5 * max(1.0, abs(loss32))
    torch.testing.assert_close(g, g32, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(e, e32, atol=1e-7, rtol=1e-5)
    assert (g[inputs[3] == 0] == 0).all()  # zero-weight (masked-out) tokens get no gradient


@pytest.mark.parametrize("clip", [0.2, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1,), (3, 37), (64, 2048)])
def test_value_loss_matches_reference(shape, dtype, clip):
    g = torch.Generator().manual_seed(sum(shape))
    old = torch.randn(shape, generator=g).bfloat16().float()
    values = (old + 0.3 * torch.randn(shape, generator=g)).bfloat16().float()
    returns = torch.randn(shape, generator=g)
    weight = token_mean_weights(torch.rand(shape, generator=g) > 0.3)
    v32 = values.clone().requires_grad_()
    loss32, frac32 = value_loss_ref(v32, old, returns, weight, clip=clip)
    loss32.backward()
    v = values.to(dtype).requires_grad_()
    loss, frac = value_loss(v, old.to(dtype), returns, weight, clip=clip)
    loss.backward()
    grad_tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: stored gradient rounding
    assert abs(loss - loss32) <= 1e-5 and abs(frac - frac32) <= 1e-5
    assert grad_err(v.grad.float(), v32.grad) <= grad_tol
    if clip is None:
        assert frac == 0


def test_input_errors():
    logp, old_logp, adv, weight, ref_logp, entropy, _ = make_inputs((10,))
    with pytest.raises(ValueError, match="requires grad"):
        ppo_loss(logp, old_logp, adv.requires_grad_(), weight)
    adv = adv.detach()
    with pytest.raises(ValueError, match="kl_estimator"):
        ppo_loss(logp, old_logp, adv, weight, ref_logp, kl_coef=0.1, kl_estimator="k2")
    with pytest.raises(ValueError, match="needs ref_logp"):
        ppo_loss(logp, old_logp, adv, weight, kl_coef=0.1)
    with pytest.raises(ValueError, match="needs entropy"):
        ppo_loss(logp, old_logp, adv, weight, entropy_coef=0.1)
    with pytest.raises(ValueError, match="dual_clip"):
        ppo_loss(logp, old_logp, adv, weight, dual_clip=0.5)
    with pytest.raises(ValueError, match="shape"):
        ppo_loss(logp, old_logp[:5], adv, weight)
    with pytest.raises(ValueError, match="clip"):
        value_loss(logp, old_logp, adv, weight, clip=-1.0)


def test_custom_op_registration():
    logp, old_logp, adv, weight, ref_logp, entropy, _ = make_inputs((50,), seed=2)
    torch.library.opcheck(torch.ops.fastagent.ppo_loss.default,
                          (logp.clone().requires_grad_(), old_logp, adv, weight, ref_logp,
                           entropy.clone().requires_grad_(), 0.2, 0.28, 3.0, 0.05, True, 0.01),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    torch.library.opcheck(torch.ops.fastagent.value_loss.default,
                          (logp.clone().requires_grad_(), old_logp, adv, weight, 0.2),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


TRITON_SCRIPT = textwrap.dedent("""
    import importlib
    import torch
    P = importlib.import_module("fastagent.kernels.ppo_loss")
    from tests.test_ppo_loss import make_inputs
    for n, block in [(1, 16), (37, 16), (1000, 128)]:
        logp, old_logp, adv, weight, ref_logp, entropy, _ = make_inputs((n,), seed=n)
        for args in [(0.2, 0.28, 3.0, 0.05, True, 0.01), (0.2, 0.2, 0.0, 0.1, False, 0.0)]:
            for dtype in (torch.float32, torch.bfloat16):
                pol = [t.to(dtype) for t in (logp, old_logp, ref_logp, entropy)]
                expect = P._ppo_fwd_torch(pol[0], pol[1], adv, weight, pol[2], pol[3], *args)
                got = P._ppo_fwd_triton(pol[0], pol[1], adv, weight, pol[2], pol[3], *args, block=block)
                torch.testing.assert_close(got[0], expect[0], atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(got[1].float(), expect[1].float(), atol=1e-6, rtol=1e-2)
        plain = P._ppo_fwd_triton(logp, old_logp, adv, weight, None, None, 0.2, 0.2, 0.0, 0.0, True, 0.0,
                                  block=block)
        expect = P._ppo_fwd_torch(logp, old_logp, adv, weight, None, None, 0.2, 0.2, 0.0, 0.0, True, 0.0)
        torch.testing.assert_close(plain[0], expect[0], atol=1e-5, rtol=1e-5)
        for clip in (0.2, float("inf")):
            got = P._value_fwd_triton(logp, old_logp, adv, weight, clip, block=block)
            expect = P._value_fwd_torch(logp, old_logp, adv, weight, clip)
            torch.testing.assert_close(got[0], expect[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got[1], expect[1], atol=1e-7, rtol=1e-5)
    print("TRITON_OK")
""")


def test_triton_kernels_under_interpreter():
    """The CUDA kernels' code, run by Triton's CPU interpreter on small shapes (fresh process: the
    interpreter must be switched on before triton is imported)."""
    run_triton_interpreted(TRITON_SCRIPT)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (no GPU on this machine)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ppo_loss_cuda_matches_reference(dtype):
    inputs = make_inputs((64, 2048), seed=3)
    loss32, _, g32, e32 = run(ppo_loss_ref, inputs, torch.float32, CONFIGS["full"])
    cuda_inputs = tuple(t.cuda() for t in inputs)
    loss, _, g, e = run(ppo_loss, cuda_inputs, dtype, CONFIGS["full"])
    loss_tol, grad_tol = KERNEL_TOL[dtype]
    assert abs(loss.cpu() - loss32) <= loss_tol and grad_err(g.cpu(), g32) <= grad_tol
    assert grad_err(e.cpu(), e32) <= grad_tol
