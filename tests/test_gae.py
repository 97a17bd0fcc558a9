"""Tests for kernels/gae.py: masked GAE (C++ on CPU, Triton under the interpreter, torch fallback)
against the Python-loop reference, padded vs packed layouts, the skip rule, and group baselines.

    pytest tests/test_gae.py -q
"""

from __future__ import annotations

import importlib
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastagent.kernels import gae, gae_ref, group_advantages, masked_whiten
from _proc import run_triton_interpreted
gae_mod = importlib.import_module("fastagent.kernels.gae")  # the package exports gae(), the function

# Error of a result against gae_ref in fp32 on the same (bf16-rounded) inputs, as
# max|x - ref| / max(1, max|ref|). The kernel computes in fp32 whatever its inputs, so it stays at
# fp32 rounding; the reference run in bf16 accumulates bf16 rounding along the recursion.
KERNEL_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-5}  # seen: <= 3e-7
REF_LOWP_TOL = {torch.float32: 1e-5, torch.bfloat16: 0.05}  # bf16 seen: <= 0.013


def make_inputs(B: int, T: int, *, seed: int = 0, hole_prob: float = 0.3, dtype=torch.float32):
    """rewards, values, mask (B, T): per-token shaping noise plus a reward on each row's last
    masked-in token, holes in the mask (observation tokens) and right padding of random length."""
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(B, T, generator=g)
    rewards = 0.1 * torch.randn(B, T, generator=g)
    mask = torch.rand(B, T, generator=g) >= hole_prob
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    mask &= torch.arange(T)[None, :] < lengths[:, None]
    last = torch.where(mask, torch.arange(T), -1).max(dim=1).values  # (B,) -1: empty row
    rows = torch.nonzero(last >= 0)[:, 0]
    rewards[rows, last[rows]] += torch.randn(rows.numel(), generator=g)
    # bf16-representable values, so fp32 and bf16 runs see identical inputs
    return rewards.to(dtype).float(), values.to(dtype).float(), mask


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.float() - ref).abs().max() / ref.abs().max().clamp_min(1.0)).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,T", [(1, 1), (1, 37), (3, 37), (8, 129), (64, 2048)])
def test_gae_matches_reference(B, T, dtype):
    rewards, values, mask = make_inputs(B, T, seed=B * 1000 + T, dtype=dtype)
    mask[0, :] = False  # an all-masked row
    if T > 2:
        mask[-1, 1::2] = False  # a row with holes every other token
    kw = dict(gamma=0.99, lam=0.95)
    adv32, ret32 = gae_ref(rewards, values, mask, **kw)
    adv, ret = gae(rewards.to(dtype), values.to(dtype), mask, **kw)
    adv_lp, ret_lp = gae_ref(rewards.to(dtype), values.to(dtype), mask, **kw)
    assert adv.dtype == ret.dtype == torch.float32 and adv.shape == (B, T)
    assert rel_err(adv, adv32) <= KERNEL_TOL[dtype] and rel_err(ret, ret32) <= KERNEL_TOL[dtype]
    assert rel_err(adv_lp, adv32) <= REF_LOWP_TOL[dtype]
    assert rel_err(ret_lp, ret32) <= REF_LOWP_TOL[dtype]
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()


def test_gamma_lam_one_is_reward_to_go():
    """gamma = lam = 1: A_t = (sum of rewards on masked-in tokens at or after t) - v_t."""
    rewards, values, mask = make_inputs(4, 50, seed=3)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    togo = torch.flip(torch.cumsum(torch.flip(rewards * mask, [1]), 1), [1])
    torch.testing.assert_close(adv, torch.where(mask, togo - values, 0.0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ret, torch.where(mask, togo, 0.0), atol=1e-5, rtol=1e-5)


def pack(rewards, values, mask, lengths):
    """Padded (B, T) -> packed (N,) keeping the first lengths[b] tokens of each row."""
    keep = torch.arange(rewards.shape[1])[None, :] < lengths[:, None]
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    cu[1:] = torch.cumsum(lengths, 0)
    return rewards[keep], values[keep], mask[keep], cu, keep


@pytest.mark.parametrize("B,T", [(1, 1), (5, 37), (64, 2048)])
def test_packed_matches_padded(B, T):
    rewards, values, mask = make_inputs(B, T, seed=7)
    lengths = torch.randint(0, T + 1, (B,), generator=torch.Generator().manual_seed(1))
    lengths[0] = 0  # an empty sequence in the pack
    mask &= torch.arange(T)[None, :] < lengths[:, None]
    adv, ret = gae(rewards, values, mask, gamma=0.97, lam=0.9)
    r, v, m, cu, keep = pack(rewards, values, mask, lengths)
    adv_p, ret_p = gae(r, v, m, cu_seqlens=cu, gamma=0.97, lam=0.9)
    torch.testing.assert_close(adv_p, adv[keep], atol=0, rtol=0)  # same kernel, same order
    torch.testing.assert_close(ret_p, ret[keep], atol=0, rtol=0)
    assert (adv[~keep] == 0).all()


def test_torch_fallback_matches_cpp():
    """The path taken when the C++ build fails (and for dtypes it does not cover)."""
    rewards, values, mask = make_inputs(6, 45, seed=11)
    adv, ret = gae(rewards, values, mask, gamma=0.99, lam=0.9)
    cu = torch.arange(7, dtype=torch.int64) * 45
    adv_t, ret_t = gae_mod._gae_torch_packed(rewards.flatten(), values.flatten(), mask.flatten(), cu,
                                             0.99, 0.9)
    torch.testing.assert_close(adv_t.view(6, 45), adv, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ret_t.view(6, 45), ret, atol=1e-5, rtol=1e-5)
    adv64, _ = gae(rewards.double(), values.double(), mask, gamma=0.99, lam=0.9)  # torch path
    torch.testing.assert_close(adv64, adv, atol=1e-5, rtol=1e-5)


@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 40), seed=st.integers(0, 10_000), gamma=st.floats(0.5, 1.0),
       lam=st.floats(0.0, 1.0), hole_prob=st.floats(0.0, 0.9))
def test_skip_rule(T, seed, gamma, lam, hole_prob):
    """Masked-out tokens get 0 and are invisible: deleting them (or changing their rewards and
    values) leaves every masked-in token's advantage and return unchanged."""
    rewards, values, mask = make_inputs(3, T, seed=seed, hole_prob=hole_prob)
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()
    noise = torch.randn(3, T, generator=torch.Generator().manual_seed(seed + 1))
    adv2, ret2 = gae(torch.where(mask, rewards, noise), torch.where(mask, values, -noise), mask,
                     gamma=gamma, lam=lam)
    assert torch.equal(adv, adv2) and torch.equal(ret, ret2)
    for b in range(3):
        m = mask[b]
        adv_c, ret_c = gae(rewards[b, m][None], values[b, m][None], m[m][None], gamma=gamma, lam=lam)
        torch.testing.assert_close(adv_c[0], adv[b, m], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(ret_c[0], ret[b, m], atol=1e-6, rtol=1e-6)


def test_gae_input_errors():
    r, v, m = make_inputs(2, 5)
    with pytest.raises(ValueError, match="share one shape"):
        gae(r, v[:, :4], m)
    with pytest.raises(ValueError, match="gamma"):
        gae(r, v, m, gamma=1.5)
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        gae(r.flatten(), v.flatten(), m.flatten())
    with pytest.raises(ValueError, match="cu_seqlens"):
        gae(r.flatten(), v.flatten(), m.flatten(), cu_seqlens=torch.tensor([0, 3, 9]))
    with pytest.raises(ValueError, match="cu_seqlens"):
        gae(r.flatten(), v.flatten(), m.flatten(), cu_seqlens=torch.tensor([0, 7, 3, 10]))


def test_gae_custom_op_registration():
    r, v, m = make_inputs(3, 17, seed=5)
    cu = torch.arange(4, dtype=torch.int64) * 17
    torch.library.opcheck(torch.ops.fastagent.gae.default,
                          (r.flatten(), v.flatten(), m.flatten(), cu, 0.99, 0.95),
                          test_utils=("test_schema", "test_faketensor"))


def test_group_advantages():
    rewards = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 0.0, 5.0, 7.0])
    ids = torch.tensor([4, 4, 4, 9, 9, 9, 2, 2])
    adv = group_advantages(rewards, ids)
    for gid in ids.unique():
        sel = ids == gid
        r = rewards[sel]
        expect = (r - r.mean()) / (r.std() + 1e-6)
        torch.testing.assert_close(adv[sel], expect)
    assert (adv[3:6] == 0).all()  # zero-variance group: no signal
    by_size = group_advantages(rewards[:6], group_size=3)
    torch.testing.assert_close(by_size, adv[:6])
    centered = group_advantages(rewards, ids, normalize_std=False)
    torch.testing.assert_close(centered[6:], torch.tensor([-1.0, 1.0]))
    single = group_advantages(torch.tensor([3.0, 1.0, 2.0]), torch.tensor([0, 1, 1]))
    assert single[0] == 0 and torch.isfinite(single).all()
    with pytest.raises(ValueError, match="exactly one"):
        group_advantages(rewards)
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(rewards, group_size=3)


@pytest.mark.parametrize("value", [-2.93, 0.0, 1e6, -7.1e-5, 3e38])
@pytest.mark.parametrize("size", [2, 7, 64])
def test_group_advantages_equal_group_is_exactly_zero(value, size):
    """All-equal scores carry no signal: 0, not (rounding of the mean) / (~0 std + eps)."""
    r = torch.full((size,), value)
    assert (group_advantages(r, group_size=size) == 0).all()
    assert (group_advantages(r, group_size=size, normalize_std=False) == 0).all()
    two = torch.cat([r, r - 1.0 if value != 3e38 else r / 2])  # two equal groups, different values
    assert (group_advantages(two, group_size=size) == 0).all()


@pytest.mark.parametrize("scale", [3.0, 1e6, -0.5])
def test_group_advantages_near_equal_group_stays_small(scale):
    """A spread at fp32 rounding level (differences ~1e-7 of the reward scale) gives ~0, not +-1."""
    g = torch.Generator().manual_seed(0)
    r = (scale * (1 + 1e-7 * torch.randn(64, generator=g)))
    assert r.unique().numel() > 1  # really not all equal after rounding
    adv = group_advantages(r, group_size=64)
    assert adv.abs().max() < 0.1, adv.abs().max()
    # the floor is what keeps it small: without it the noise is normalized to unit scale
    raw = group_advantages(r, group_size=64, std_floor=0.0, eps=0.0)
    assert raw.abs().max() > 0.5


def test_group_advantages_normal_group_matches_formula():
    """Away from the floor: (r - mean) / (std + eps), in fp64, within 1e-6 (verl's GRPO form)."""
    g = torch.Generator().manual_seed(1)
    for r in (torch.randn(16, generator=g) * 2 + 5, (torch.rand(8, generator=g) > 0.5).float(),
              torch.tensor([0.0, 1.0, 1.0, 1.0]), torch.randn(64, generator=g) * 1e-3 + 0.5):
        r64 = r.double()
        std = r64.std()
        for eps in (1e-6, 0.0):
            expect = (r64 - r64.mean()) / (std + eps)
            got = group_advantages(r, group_size=r.numel(), eps=eps)
            assert (got.double() - expect).abs().max() <= 1e-6
        assert abs(got.double().mean()) <= 1e-6


def test_group_advantages_singletons_and_mixed_groups():
    assert (group_advantages(torch.tensor([3.0, -1.0, 7.5]), group_size=1) == 0).all()
    g = torch.Generator().manual_seed(2)
    normal = torch.randn(6, generator=g)
    near = 3 + 1e-7 * torch.randn(5, generator=g)
    groups = {11: torch.full((5,), -2.93), 3: normal, 7: torch.tensor([4.0]), -2: near}
    r = torch.cat(list(groups.values()))
    ids = torch.cat([torch.full((t.numel(),), k) for k, t in groups.items()])
    perm = torch.randperm(r.numel(), generator=g)  # interleaved groups
    adv = torch.empty_like(r)
    adv[perm] = group_advantages(r[perm], ids[perm])
    sel = {k: ids == k for k in groups}
    assert (adv[sel[11]] == 0).all() and (adv[sel[7]] == 0).all()
    assert adv[sel[-2]].abs().max() < 0.1
    n64 = normal.double()
    expect = (n64 - n64.mean()) / (n64.std() + 1e-6)
    assert (adv[sel[3]].double() - expect).abs().max() <= 1e-6
    with pytest.raises(ValueError, match="std_floor"):
        group_advantages(r, ids, std_floor=-1.0)


def test_masked_whiten():
    x = torch.randn(4, 30, generator=torch.Generator().manual_seed(0)) * 3 + 2
    mask = torch.rand(4, 30, generator=torch.Generator().manual_seed(1)) > 0.4
    y = masked_whiten(x, mask)
    assert abs(y[mask].mean().item()) < 1e-5 and abs(y[mask].std().item() - 1) < 1e-4
    assert (y[~mask] == 0).all()
    torch.testing.assert_close(masked_whiten(x, mask, shift_mean=False)[mask],
                               y[mask] + x[mask].mean())


TRITON_SCRIPT = textwrap.dedent("""
    import importlib
    import torch
    G = importlib.import_module("fastagent.kernels.gae")
    from tests.test_gae import make_inputs, pack
    for B, T, block in [(1, 1, 16), (2, 37, 16), (3, 64, 32), (4, 40, 64)]:
        for dtype in (torch.float32, torch.bfloat16):
            r, v, m = make_inputs(B, T, seed=B + T, dtype=dtype)
            m[0, :] = False
            adv_ref, ret_ref = G.gae_ref(r, v, m, gamma=0.99, lam=0.95)
            cu = torch.arange(B + 1, dtype=torch.int64) * T
            adv, ret = G._gae_triton(r.to(dtype).flatten(), v.to(dtype).flatten(), m.flatten(), cu,
                                     0.99, 0.95, block=block)
            torch.testing.assert_close(adv.view(B, T), adv_ref, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(ret.view(B, T), ret_ref, atol=1e-5, rtol=1e-5)
    r, v, m = make_inputs(5, 37, seed=9)
    lengths = torch.tensor([0, 37, 5, 20, 1])
    m &= torch.arange(37)[None, :] < lengths[:, None]
    adv_ref, _ = G.gae_ref(r, v, m, gamma=0.9, lam=0.8)
    rp, vp, mp, cu, keep = pack(r, v, m, lengths)
    adv, _ = G._gae_triton(rp, vp, mp, cu, 0.9, 0.8, block=16)
    torch.testing.assert_close(adv, adv_ref[keep], atol=1e-5, rtol=1e-5)
    print("TRITON_OK")
""")


def test_triton_kernel_under_interpreter():
    """The CUDA kernel's code, run by Triton's CPU interpreter on small shapes (fresh process: the
    interpreter must be switched on before triton is imported)."""
    run_triton_interpreted(TRITON_SCRIPT)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (no GPU on this machine)")
def test_gae_cuda_matches_reference():
    rewards, values, mask = make_inputs(64, 2048, seed=2)
    adv_ref, ret_ref = gae_ref(rewards, values, mask, gamma=0.99, lam=0.95)
    adv, ret = gae(rewards.cuda(), values.cuda(), mask.cuda(), gamma=0.99, lam=0.95)
    assert rel_err(adv.cpu(), adv_ref) <= 1e-5 and rel_err(ret.cpu(), ret_ref) <= 1e-5
