"""Masked generalized advantage estimation (GAE) for agent text, plus the critic-free group baseline.

    from fastagent.kernels import gae, group_advantages
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)            # padded (B, T)
    adv, ret = gae(rewards, values, mask, cu_seqlens=cu, gamma=1.0)       # packed (N,), cu (S+1,)
    adv_seq = group_advantages(scores, group_size=8)                      # (B,) GRPO-style

Masked-out tokens (observations, tool output, padding in multi-turn text) are skipped by the
recursion: they get advantage and return 0 and the "next value" of a masked-in token is the value of
the next masked-in token of its sequence (0 after the last), as in verl's multi-turn GAE:
    delta_t = r_t + gamma * next_value_t - v_t,   A_t = delta_t + gamma * lam * A_{next masked-in}
Rewards on masked-out tokens are ignored: put each reward on a masked-in token (usually the last).
Outputs are fp32 (B, T) / (N,). Triton on CUDA (a chunked associative scan per sequence), C++
(OpenMP over sequences, csrc/gae.cpp) on CPU, `gae_ref` (the usual Python loop over t) otherwise.
Memory traffic: reads r, v, mask once, writes adv, ret once; the loop reference launches ~6 torch
ops per time step.
"""

from __future__ import annotations

import torch

from fastagent.kernels._cpp import try_load_cpp

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the C++ and reference paths still work
    triton = None


# ---------------------------------------------------------------- reference: Python loop over t
def gae_ref(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0,
            lam: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The usual loop over t on padded (B, T) tensors, in the inputs' dtype: (advantages, returns)."""
    mask = mask.bool()
    B, T = rewards.shape
    next_value = torch.zeros(B, dtype=values.dtype, device=values.device)  # (B,)
    last_gae = torch.zeros_like(next_value)  # (B,)
    adv = torch.zeros_like(rewards)
    for t in reversed(range(T)):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_gae = torch.where(m, delta + gamma * lam * last_gae, last_gae)  # skip masked-out tokens
        next_value = torch.where(m, values[:, t], next_value)
        adv[:, t] = torch.where(m, last_gae, 0)
    ret = torch.where(mask, adv + values, 0)
    return adv, ret


def _gae_torch_packed(rewards, values, mask, cu_seqlens, gamma, lam):
    """Reference for packed (N,) inputs: scatter each sequence into a padded row, run gae_ref."""
    lens = torch.diff(cu_seqlens)  # (S,)
    S, T = lens.numel(), int(lens.max()) if lens.numel() else 0  # host sync: fallback path only
    row = torch.repeat_interleave(torch.arange(S, device=rewards.device), lens)  # (N,)
    col = torch.arange(rewards.numel(), device=rewards.device) - cu_seqlens[row]  # (N,)
    pads = [torch.zeros(S, T, dtype=x.dtype, device=x.device) for x in (rewards, values, mask)]
    for pad, x in zip(pads, (rewards, values, mask)):
        pad[row, col] = x
    adv, ret = gae_ref(pads[0].float(), pads[1].float(), pads[2], gamma=gamma, lam=lam)
    return adv[row, col], ret[row, col]


# ---------------------------------------------------------------- Triton (CUDA)
if triton is not None:
    @triton.jit
    def _affine_combine(a1, b1, a2, b2):
        # compose x -> a1 * x + b1 (applied first) with x -> a2 * x + b2
        return a1 * a2, a2 * b1 + b2

    @triton.jit
    def _gae_kernel(
        rewards_ptr,  # (N,) rewards
        values_ptr,  # (N,) critic values
        mask_ptr,  # (N,) uint8 response mask (bool viewed as bytes)
        cu_ptr,  # (S+1,) int64 sequence boundaries
        adv_ptr,  # (N,) fp32 out: advantages
        ret_ptr,  # (N,) fp32 out: returns
        gamma, lam,
        BLOCK: tl.constexpr,
    ):
        # One program per sequence, chunks of BLOCK tokens from the end. Within a chunk the tokens
        # are loaded in reverse time order, so both recursions become forward affine scans:
        #   z_t = m_{t+1} ? v_{t+1} : z_{t+1}          (next masked-in value, carried across chunks)
        #   A_t = m_t ? delta_t + gamma*lam*A_{t+1} : A_{t+1}
        seq = tl.program_id(0)
        start = tl.load(cu_ptr + seq)
        end = tl.load(cu_ptr + seq + 1)
        i = tl.arange(0, BLOCK)
        next_value = 0.0  # z at the first token of the previous (later) chunk
        last_gae = 0.0  # A at the first token of the previous (later) chunk
        for c in range(0, tl.cdiv(end - start, BLOCK)):
            t = end - 1 - c * BLOCK - i  # (BLOCK,) descending times
            valid = t >= start
            nxt = valid & (t + 1 < end)
            m = tl.load(mask_ptr + t, mask=valid, other=0) != 0
            m_next = tl.load(mask_ptr + t + 1, mask=nxt, other=0) != 0
            v = tl.load(values_ptr + t, mask=valid, other=0.0).to(tl.float32)
            v_next = tl.load(values_ptr + t + 1, mask=nxt, other=0.0).to(tl.float32)
            r = tl.load(rewards_ptr + t, mask=valid, other=0.0).to(tl.float32)
            za, zb = tl.associative_scan((tl.where(m_next, 0.0, 1.0), tl.where(m_next, v_next, 0.0)),
                                         0, _affine_combine)
            z = za * next_value + zb
            delta = r + gamma * z - v
            ga, gb = tl.associative_scan((tl.where(m, gamma * lam, 1.0), tl.where(m, delta, 0.0)),
                                         0, _affine_combine)
            g = ga * last_gae + gb
            tl.store(adv_ptr + t, tl.where(m, g, 0.0), mask=valid)
            tl.store(ret_ptr + t, tl.where(m, g + v, 0.0), mask=valid)
            # carry the state at the chunk's earliest token; invalid tail lanes are identity maps
            next_value = tl.sum(tl.where(i == BLOCK - 1, z, 0.0), axis=0)
            last_gae = tl.sum(tl.where(i == BLOCK - 1, g, 0.0), axis=0)


def _gae_triton(rewards, values, mask, cu_seqlens, gamma, lam, block: int = 1024):
    adv = torch.empty(rewards.shape, dtype=torch.float32, device=rewards.device)
    ret = torch.empty_like(adv)
    num_seqs = cu_seqlens.numel() - 1
    if num_seqs > 0:
        _gae_kernel[(num_seqs,)](rewards, values, mask.view(torch.uint8), cu_seqlens, adv, ret,
                                 gamma, lam, BLOCK=block)
    return adv, ret


# ---------------------------------------------------------------- dispatch + custom op
def _cpp():
    return try_load_cpp("gae", ["gae.cpp"])


@torch.library.custom_op("fastagent::gae", mutates_args=())
def _gae_op(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, cu_seqlens: torch.Tensor,
            gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    # prepared inputs: (N,) contiguous rewards/values of one dtype, bool mask, int64 cu_seqlens
    if rewards.is_cuda and triton is not None:
        return _gae_triton(rewards, values, mask, cu_seqlens, gamma, lam)
    if rewards.device.type == "cpu" and rewards.dtype in (torch.float32, torch.bfloat16, torch.float16):
        ext = _cpp()
        if ext is not None:
            adv, ret = ext.gae_fwd(rewards, values, mask, cu_seqlens, gamma, lam)
            return adv, ret
    return _gae_torch_packed(rewards, values, mask, cu_seqlens, gamma, lam)


@_gae_op.register_fake
def _(rewards, values, mask, cu_seqlens, gamma, lam):
    adv = torch.empty(rewards.shape, dtype=torch.float32, device=rewards.device)
    return adv, torch.empty_like(adv)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0,
        lam: float = 1.0, cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked GAE: (advantages, returns), fp32, shaped like rewards and 0 outside the mask.

    Padded: rewards, values, mask (B, T). Packed: (N,) with cu_seqlens (S+1,) (cu[0] = 0,
    cu[-1] = N). No gradients (advantages and returns are targets)."""
    if values.shape != rewards.shape or mask.shape != rewards.shape:
        raise ValueError(f"gae: rewards {tuple(rewards.shape)}, values {tuple(values.shape)} and mask "
                         f"{tuple(mask.shape)} must share one shape")
    if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
        raise ValueError(f"gae: gamma and lam must lie in [0, 1], got {gamma}, {lam}")
    if cu_seqlens is None:
        if rewards.dim() != 2:
            raise ValueError(f"gae: padded inputs must be (B, T), got {tuple(rewards.shape)}; "
                             "pass cu_seqlens for packed (N,) inputs")
        B, T = rewards.shape
        cu = torch.arange(B + 1, device=rewards.device, dtype=torch.int64) * T
    else:
        if rewards.dim() != 1 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
            raise ValueError("gae: packed inputs must be (N,) with cu_seqlens (S+1,)")
        cu = cu_seqlens.to(device=rewards.device, dtype=torch.int64).contiguous()
        bad = (cu[0] != 0) | (cu[-1] != rewards.numel()) | (cu[1:] < cu[:-1]).any()
        if bool(bad):  # host sync (one): a bad cu_seqlens would read/write out of bounds in a kernel
            raise ValueError("gae: cu_seqlens must start at 0, end at N and never decrease")
    dtype = rewards.dtype if values.dtype == rewards.dtype else torch.float32
    r = rewards.detach().reshape(-1).to(dtype).contiguous()
    v = values.detach().reshape(-1).to(dtype).contiguous()
    adv, ret = _gae_op(r, v, (mask.reshape(-1) != 0).contiguous(), cu, float(gamma), float(lam))
    return adv.view(rewards.shape), ret.view(rewards.shape)


# ---------------------------------------------------------------- critic-free baselines
def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor | None = None, *,
                     group_size: int | None = None, normalize_std: bool = True,
                     eps: float = 1e-6, std_floor: float = 1e-5) -> torch.Tensor:
    """GRPO-style advantages (B,) fp32: reward minus its group's mean, divided by
    max(std, std_floor * max(1, |mean|)) + eps when normalize_std (std: the group's unbiased std).
    Groups are given by group_ids (B,) (any integers) or by consecutive blocks of group_size.
    Broadcast to tokens with `adv[:, None] * mask`.

    Groups without real spread get ~0, not +-1 from rounding noise:
    - the mean is taken of r - ref, ref = the group's max (an exact shift for nearby values), so a
      group of equal rewards (and a group of one) centers to exactly 0, whatever their magnitude;
    - std_floor (relative to the group's magnitude, floored at 1) keeps a spread at rounding level
      (e.g. 1e-7 on rewards ~3) from being scaled up to unit size. The default 1e-5 is ~100 fp32
      ulps: a spread of a few ulps gets |adv| < 0.1. A group whose std is above the floor gets the
      usual (r - mean) / (std + eps), as in verl's GRPO. std_floor=0 turns the floor off."""
    if rewards.dim() != 1:
        raise ValueError(f"group_advantages: rewards must be (B,), got {tuple(rewards.shape)}")
    if (group_ids is None) == (group_size is None):
        raise ValueError("group_advantages: pass exactly one of group_ids and group_size")
    if std_floor < 0 or eps < 0:
        raise ValueError(f"group_advantages: eps and std_floor must be >= 0, got {eps}, {std_floor}")
    r = rewards.float()
    if group_size is not None:
        if group_size < 1 or r.numel() % group_size:
            raise ValueError(f"group_advantages: {r.numel()} rewards do not split into groups of {group_size}")
        group_ids = torch.arange(r.numel(), device=r.device) // group_size
    if group_ids.shape != r.shape:
        raise ValueError(f"group_advantages: group_ids {tuple(group_ids.shape)} != rewards {tuple(r.shape)}")
    uniq, gid = torch.unique(group_ids, return_inverse=True)  # gid (B,): dense ids 0..G-1
    G = uniq.numel()
    zeros = torch.zeros(G, device=r.device)
    count = zeros.index_add(0, gid, torch.ones_like(r))  # (G,)
    ref = torch.full((G,), float("-inf"), device=r.device).scatter_reduce(0, gid, r, "amax")  # (G,)
    d = r - ref[gid]  # (B,) exact for nearby values: 0 for equal rewards
    d_mean = zeros.index_add(0, gid, d) / count  # (G,)
    centered = d - d_mean[gid]  # (B,)
    if not normalize_std:
        return centered
    var = zeros.index_add(0, gid, centered * centered) / (count - 1).clamp_min(1)
    std = torch.where(count > 1, var.sqrt(), 1.0)  # (G,) singletons: centered is 0 anyway
    floor = std_floor * torch.clamp((ref + d_mean).abs(), min=1.0)  # (G,) ref + d_mean: the mean
    return centered / (torch.maximum(std, floor)[gid] + eps)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True,
                  eps: float = 1e-8) -> torch.Tensor:
    """Normalize x to unit variance (and zero mean when shift_mean) over the masked-in entries;
    masked-out entries become 0. The usual post-processing of GAE advantages."""
    m = mask.to(x.dtype)
    n = m.sum().clamp_min(1)
    mean = (x * m).sum() / n
    var = ((x - mean) ** 2 * m).sum() / (n - 1).clamp_min(1)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m
