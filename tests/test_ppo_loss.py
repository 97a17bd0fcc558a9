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


@pytest.mark.parametrize("world_size", [2, 3])
def test_token_mean_across_ranks_matches_global_token_mean(world_size):
    """README's mapping: with gradients averaged over world_size ranks (DDP / FSDP), verl's global
    token-mean is num_tokens = global_tokens / world_size on every rank (micro-batches summed).
    Simulated in one process: a shared parameter theta shifts every logp, so d loss / d theta is
    what the ranks all-reduce."""
    c = CONFIGS["full"]
    # per rank, 2 micro-batches of uneven token counts; one rank has a micro-batch with no tokens
    ranks = [[make_inputs((2, 11 + 5 * r + m), seed=10 * r + m, hole_prob=0.2 + 0.2 * m)
              for m in range(2)] for r in range(world_size)]
    ranks[-1][1][6].zero_()
    global_tokens = sum(int(mb[6].sum()) for mbs in ranks for mb in mbs)

    def rank_loss_and_grad(mbs, num_tokens):  # gradient accumulation: micro-batch losses summed
        theta = torch.zeros((), requires_grad=True)
        loss = sum(ppo_loss(mb[0] + theta, *mb[1:3], token_mean_weights(mb[6], num_tokens=num_tokens),
                            *mb[4:6], **c)[0] for mb in mbs)
        loss.backward()
        return loss.detach(), theta.grad

    per_rank = [rank_loss_and_grad(mbs, global_tokens / world_size) for mbs in ranks]
    ddp_loss = sum(x[0] for x in per_rank) / world_size  # what DDP's gradient averaging computes
    ddp_grad = sum(x[1] for x in per_rank) / world_size
    flat = [torch.cat([mb[i].flatten() for mbs in ranks for mb in mbs]) for i in range(7)]
    theta = torch.zeros((), requires_grad=True)
    loss, _ = ppo_loss(flat[0] + theta, *flat[1:3], token_mean_weights(flat[6]), *flat[4:6], **c)
    loss.backward()  # the global token mean in one process
    torch.testing.assert_close(ddp_loss, loss.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ddp_grad, theta.grad, atol=1e-6, rtol=1e-5)
    # num_tokens=global_tokens would be world_size times smaller
    small = sum(rank_loss_and_grad(mbs, global_tokens)[0] for mbs in ranks) / world_size
    torch.testing.assert_close(small * world_size, loss.detach(), atol=1e-6, rtol=1e-5)


def test_token_mean_weights_fractional_and_empty_counts():
    """global_tokens / world_size may be below 1 (one token on two ranks): no clamp to 1."""
    mask = torch.tensor([0, 1, 0], dtype=torch.bool)
    torch.testing.assert_close(token_mean_weights(mask, num_tokens=0.5), torch.tensor([0.0, 2.0, 0.0]))
    assert (token_mean_weights(torch.zeros(4, dtype=torch.bool)) == 0).all()
    assert (token_mean_weights(torch.zeros(4, dtype=torch.bool), num_tokens=0) == 0).all()


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
    args = (0.2, 0.28, 3.0, 0.05, True, 0.01, 20.0, 10.0)
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


# ---------------------------------------------------------------- verl-style clamps
def extreme_inputs(n: int = 64, seed: int = 7):
    """make_inputs plus far-off old / reference log-probs: log-ratios of +-100 and +-20.5 (beyond the
    clamp), 19.5 (inside), and reference gaps of +-100 and +-15 (k3 clamped), on both adv signs."""
    logp, old_logp, adv, weight, ref_logp, entropy, mask = make_inputs((n,), seed=seed, hole_prob=0.0)
    gaps = torch.tensor([100.0, -100.0, 20.5, -20.5, 19.5, -19.5, 100.0, -100.0])
    old_logp[:8] = logp[:8] - gaps
    ref_logp[8:16] = logp[8:16] + torch.tensor([100.0, -100.0, 15.0, -15.0, 30.0, -30.0, 2.0, -3.0])
    adv[:16] = torch.tensor([-1.0, 1.0] * 8)  # the ratio clip alone would not zero these gradients
    return logp, old_logp, adv, weight, ref_logp, entropy, mask


def _force_torch_path(monkeypatch):
    monkeypatch.setattr(P, "_cpp", lambda: None)  # what a failed C++ build leaves: the torch path


@pytest.mark.parametrize("path", ["cpp", "torch"])
@pytest.mark.parametrize("cfg", ["full", "k1"])
def test_extreme_log_ratios_are_clamped(path, cfg, monkeypatch):
    """Log-ratio and reference gaps of +-100: finite loss, stats and gradients, equal to autograd
    through the clamped reference (zero gradient where a clamp is active, as torch.clamp's)."""
    if path == "torch":
        _force_torch_path(monkeypatch)
    inputs = extreme_inputs()
    c = CONFIGS[cfg]
    loss, stats, g, e = run(ppo_loss, inputs, torch.float32, c)
    loss32, stats32, g32, e32 = run(ppo_loss_ref, inputs, torch.float32, c)
    assert torch.isfinite(loss) and torch.isfinite(g).all() and torch.isfinite(e).all()
    assert all(torch.isfinite(s) for s in stats)
    assert abs(loss - loss32) <= 1e-5 * max(1.0, abs(loss32))
    torch.testing.assert_close(g, g32, atol=1e-7, rtol=1e-5)
    for name, s, s32 in zip(stats._fields, stats, stats32):
        assert abs(s - s32) <= 1e-4 * max(1.0, abs(s32)), name
    _, _, g_pg, _ = run(ppo_loss, inputs, torch.float32, dict(c, kl_coef=0.0, entropy_coef=0.0))
    assert (g_pg[:4] == 0).all() and (g_pg[6:8] == 0).all()  # ratio clamp active: no pg gradient
    if c["dual_clip"] is None:
        assert (g_pg[4:6] != 0).all()  # |log-ratio| 19.5: inside the clamp, gradient kept
    if c["kl_estimator"] == "k3":  # k3 clamped (|gap| 100, 15, 30): only the pg part is left
        _, _, g_pg, _ = run(ppo_loss_ref, inputs, torch.float32, dict(c, kl_coef=0.0))
        torch.testing.assert_close(g[8:14], g_pg[8:14], atol=1e-7, rtol=1e-5)
    # the same inputs without the clamps: what the clamps prevent
    off = dict(c, log_ratio_clamp=None, kl_clamp=None)
    loss_off, _, g_off, _ = run(ppo_loss_ref, inputs, torch.float32, off)
    assert not (torch.isfinite(loss_off) and torch.isfinite(g_off).all())


@pytest.mark.parametrize("path", ["cpp", "torch"])
def test_clamps_configurable_and_off(path, monkeypatch):
    """Custom clamps and clamps off (0 or None) agree with the reference on each path."""
    if path == "torch":
        _force_torch_path(monkeypatch)
    logp, old_logp, adv, weight, ref_logp, entropy, mask = make_inputs((200,), seed=9)
    old_logp[:10] -= 3.0  # log-ratios ~3: clamped by log_ratio_clamp=1, not by 20
    ref_logp[10:20] += 4.0  # k3 KL ~50: clamped by 10 and by 2
    inputs = (logp, old_logp, adv, weight, ref_logp, entropy, mask)
    c = CONFIGS["full"]
    results = []
    for clamps in (dict(log_ratio_clamp=1.0, kl_clamp=2.0), dict(log_ratio_clamp=0, kl_clamp=None),
                   {}):
        cfg = dict(c, **clamps)
        loss, stats, g, e = run(ppo_loss, inputs, torch.float32, cfg)
        loss32, stats32, g32, _ = run(ppo_loss_ref, inputs, torch.float32, cfg)
        assert abs(loss - loss32) <= 1e-5 * max(1.0, abs(loss32))
        torch.testing.assert_close(g, g32, atol=1e-7, rtol=1e-5)
        for name, s, s32 in zip(stats._fields, stats, stats32):
            assert abs(s - s32) <= 1e-4 * max(1.0, abs(s32)), name
        results.append(float(loss.detach()))
    assert len(set(results)) == 3  # each setting changes the loss here
    with pytest.raises(ValueError, match="log_ratio_clamp"):
        ppo_loss(logp, old_logp, adv, weight, log_ratio_clamp=-1.0)
    with pytest.raises(ValueError, match="kl_clamp"):
        ppo_token_sums_and_grads(logp, old_logp, adv, weight, ref_logp, clip_low=0.2, clip_high=0.2,
                                 dual_clip=None, kl_coef=0.1, kl_estimator="k3", entropy_coef=0.0,
                                 kl_clamp=float("nan"))


def test_token_function_clamps_like_ppo_loss():
    """The fused lm_head's per-chunk entry clamps the same way (defaults and overrides)."""
    logp, old_logp, adv, weight, ref_logp, entropy, _ = extreme_inputs()
    for clamps in ({}, dict(log_ratio_clamp=5.0, kl_clamp=1.0)):
        c = dict(CONFIGS["full"], **clamps)
        loss, dlogp, _ = ppo_token_loss_and_grads(logp, old_logp, adv, weight, ref_logp, entropy, **c)
        _, _, g32, _ = run(ppo_loss_ref, extreme_inputs(), torch.float32, c)
        assert torch.isfinite(loss) and torch.isfinite(dlogp).all()
        assert abs(loss - ppo_loss_ref(logp, old_logp, adv, weight, ref_logp, entropy, **c)[0]) <= 1e-5
        torch.testing.assert_close(dlogp, g32, atol=1e-7, rtol=1e-5)


def test_custom_op_registration():
    logp, old_logp, adv, weight, ref_logp, entropy, _ = make_inputs((50,), seed=2)
    torch.library.opcheck(torch.ops.fastagent.ppo_loss.default,
                          (logp.clone().requires_grad_(), old_logp, adv, weight, ref_logp,
                           entropy.clone().requires_grad_(), 0.2, 0.28, 3.0, 0.05, True, 0.01, 20.0,
                           10.0),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    torch.library.opcheck(torch.ops.fastagent.value_loss.default,
                          (logp.clone().requires_grad_(), old_logp, adv, weight, 0.2),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


TRITON_SCRIPT = textwrap.dedent("""
    import importlib
    import torch
    P = importlib.import_module("fastagent.kernels.ppo_loss")
    V = importlib.import_module("fastagent.kernels.value_loss")
    from tests.test_ppo_loss import extreme_inputs, make_inputs
    inf = float("inf")
    for n, block in [(1, 16), (37, 16), (1000, 128)]:
        logp, old_logp, adv, weight, ref_logp, entropy, _ = make_inputs((n,), seed=n)
        for args in [(0.2, 0.28, 3.0, 0.05, True, 0.01), (0.2, 0.2, 0.0, 0.1, False, 0.0),
                     (0.2, 0.28, 3.0, 0.05, True, 0.01, 0.5, 0.02),  # tight clamps: active often
                     (0.2, 0.2, 0.0, 0.1, True, 0.0, inf, inf)]:  # clamps off
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
            got = V._value_fwd_triton(logp, old_logp, adv, weight, clip, block=block)
            expect = V._value_fwd_torch(logp, old_logp, adv, weight, clip)
            torch.testing.assert_close(got[0], expect[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got[1], expect[1], atol=1e-7, rtol=1e-5)
    # log-ratio / reference gaps of +-100: finite, and the same clamps as the torch path and the reference
    logp, old_logp, adv, weight, ref_logp, entropy, _ = extreme_inputs()
    for args in [(0.2, 0.28, 3.0, 0.05, True, 0.01), (0.2, 0.2, 0.0, 0.1, False, 0.0, 5.0, 1.0)]:
        got = P._ppo_fwd_triton(logp, old_logp, adv, weight, ref_logp, entropy, *args, block=16)
        expect = P._ppo_fwd_torch(logp, old_logp, adv, weight, ref_logp, entropy, *args)
        assert torch.isfinite(got[0]).all() and torch.isfinite(got[1]).all()
        torch.testing.assert_close(got[0], expect[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[1], expect[1], atol=1e-7, rtol=1e-5)
        clamps = dict(zip(("log_ratio_clamp", "kl_clamp"), args[6:]))
        lp = logp.clone().requires_grad_()
        ref_loss, _ = P.ppo_loss_ref(lp, old_logp, adv, weight, ref_logp, entropy, clip_low=args[0],
                                     clip_high=args[1], dual_clip=args[2] or None, kl_coef=args[3],
                                     kl_estimator="k3" if args[4] else "k1", entropy_coef=args[5], **clamps)
        ref_loss.backward()
        torch.testing.assert_close(got[0][0], ref_loss.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[1], lp.grad, atol=1e-7, rtol=1e-5)
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
