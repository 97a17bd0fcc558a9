"""Fused PPO policy loss (clip-higher, dual-clip, KL to a reference, entropy bonus): one pass computes
the loss sums, the stats and the per-token gradients. The clipped value loss is in value_loss.py.

    from fastagent.kernels import ppo_loss, token_mean_weights
    w = token_mean_weights(mask)                                  # (B, T) fp32, sums to 1
    loss, stats = ppo_loss(logp, old_logp, adv, w, ref_logp, entropy,
                           clip_low=0.2, clip_high=0.28, kl_coef=1e-3, entropy_coef=1e-3)
    loss.backward()                                               # grads into logp and entropy

Aggregation lives in `weight` (token-mean, sequence-mean, ... via the helpers below), so the
kernels only sum. Per token, with c = log_ratio_clamp and clamp(x, c) = clamp(x, -c, c):
    ratio = exp(clamp(logp - old_logp, c))
    pg    = max(-adv * ratio, -adv * clamp(ratio, 1 - clip_low, 1 + clip_high))
    pg    = min(pg, -adv * dual_clip)           where adv < 0 (dual-clip, when dual_clip is set)
    kl    = logp - ref_logp                                                (k1)
    kl    = clamp(exp(x) - x - 1, kl_clamp),  x = clamp(ref_logp - logp, c)   (k3)
    loss  = sum(weight * (pg + kl_coef * kl - entropy_coef * entropy))
The two clamps are verl's (log-ratio to [-20, 20] before exp, the k3 KL to [-10, 10]) and on by
default: a token whose log-ratio is far off (a stale or broken old_logp / ref_logp) gives a finite
loss and, where a clamp is active, no gradient (torch.clamp's gradient) instead of inf / nan.
log_ratio_clamp=None (or 0) and kl_clamp=None (or 0) turn them off.
Memory traffic: the eager reference reads/writes ~20 (N,) tensors forward and backward; the fused
op reads the 4-6 inputs once, writes d loss / d logp once (saved for backward), and backward is one
scale. Triton on CUDA, C++ (OpenMP, csrc/ppo_loss.cpp) on CPU, closed-form torch otherwise;
`ppo_loss_ref` is the autograd reference. Gradients flow into logp and entropy only.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from fastagent.kernels._cpp import try_load_cpp

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the C++ and torch paths still work
    triton = None

KL_ESTIMATORS = ("k1", "k3")
# Layout of the sums vector (mirrors the enum in csrc/ppo_loss.cpp).
SUM_LOSS, SUM_PG, SUM_KL, SUM_ENT, SUM_CLIP, SUM_DUAL, SUM_APPROX_KL, SUM_WEIGHT = range(8)
NUM_SUMS = 8


class PPOStats(NamedTuple):
    """Weighted means over the tokens (weights as given), 0-d fp32 tensors; no host sync."""
    pg_loss: torch.Tensor
    kl: torch.Tensor  # to the reference policy, with the chosen estimator (0 without ref_logp)
    entropy: torch.Tensor
    clip_frac: torch.Tensor  # share where the ratio clip is active
    dual_clip_frac: torch.Tensor  # share where the dual clip is active
    approx_kl: torch.Tensor  # k3 estimate of KL(old || new): ratio - 1 - log(ratio)


def ppo_stats(sums: torch.Tensor) -> PPOStats:
    """Turn a sums vector (NUM_SUMS,) (possibly accumulated over chunks) into weighted means."""
    sums = sums.detach()
    mean = sums / sums[SUM_WEIGHT].clamp_min(torch.finfo(torch.float32).tiny)
    return PPOStats(mean[SUM_PG], mean[SUM_KL], mean[SUM_ENT], mean[SUM_CLIP], mean[SUM_DUAL],
                    mean[SUM_APPROX_KL])


# ---------------------------------------------------------------- aggregation weights
def token_mean_weights(mask: torch.Tensor, num_tokens: float | torch.Tensor | None = None) -> torch.Tensor:
    """fp32 weights mask / num_tokens (default: the mask's token count): the loss sum is a token mean.

    Pass num_tokens = the step's token count when micro-batches are summed (gradient accumulation).
    Under DDP / FSDP, which average gradients over world_size ranks, verl's "token-mean" over the
    global batch is num_tokens = global_tokens / world_size on every rank (global_tokens: masked-in
    tokens over all ranks and micro-batches of the step); num_tokens=global_tokens would give a
    loss world_size times smaller. num_tokens may be fractional; 0 (no tokens anywhere) gives 0s."""
    m = mask.to(torch.float32)
    denom = m.sum() if num_tokens is None else torch.as_tensor(num_tokens, dtype=torch.float32,
                                                               device=m.device)
    return m / torch.where(denom > 0, denom, 1.0)  # not clamp_min(1): fractional counts stay exact


def seq_mean_weights(mask: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                     num_seqs: float | torch.Tensor | None = None) -> torch.Tensor:
    """fp32 weights mask / (len(seq) * num_seqs): the loss sum is a mean over sequences of their token
    means. mask is (B, T), or packed (N,) with cu_seqlens (S+1,). num_seqs defaults to the number
    of sequences with at least one masked-in token (empty ones get weight 0)."""
    m = mask.to(torch.float32)
    if cu_seqlens is None:
        if m.dim() != 2:
            raise ValueError(f"seq_mean_weights: mask must be (B, T) without cu_seqlens, got {tuple(m.shape)}")
        lens = m.sum(dim=1, keepdim=True)  # (B, 1)
        per_tok_len = lens.expand_as(m)
    else:
        if m.dim() != 1:
            raise ValueError(f"seq_mean_weights: packed mask must be (N,), got {tuple(m.shape)}")
        seq_lens = torch.diff(cu_seqlens.to(torch.int64))  # (S,) tokens per sequence
        seq_id = torch.repeat_interleave(torch.arange(seq_lens.numel(), device=m.device), seq_lens)
        lens = torch.zeros(seq_lens.numel(), device=m.device).index_add_(0, seq_id, m)  # (S,)
        per_tok_len = lens[seq_id]  # (N,)
    n = (lens > 0).sum() if num_seqs is None else torch.as_tensor(num_seqs, dtype=torch.float32)
    return m / (per_tok_len.clamp_min(1.0) * n.clamp_min(1))


# ---------------------------------------------------------------- reference (autograd)
def ppo_loss_ref(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, weight: torch.Tensor,
                 ref_logp: torch.Tensor | None = None, entropy: torch.Tensor | None = None, *,
                 clip_low: float = 0.2, clip_high: float = 0.2, dual_clip: float | None = None,
                 kl_coef: float = 0.0, kl_estimator: str = "k3", entropy_coef: float = 0.0,
                 log_ratio_clamp: float | None = 20.0,
                 kl_clamp: float | None = 10.0) -> tuple[torch.Tensor, PPOStats]:
    """Eager torch PPO loss in the inputs' dtype; autograd gives the gradients. Same contract as
    ppo_loss."""
    c, kc = _clamp_value(log_ratio_clamp), _clamp_value(kl_clamp)
    log_ratio = torch.clamp(logp - old_logp, -c, c)
    ratio = torch.exp(log_ratio)
    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    pg = torch.maximum(pg1, pg2)
    dual = torch.zeros_like(pg, dtype=torch.bool)
    if dual_clip is not None:
        pg3 = -adv * dual_clip
        dual = (adv < 0) & (pg > pg3)
        pg = torch.where(adv < 0, torch.minimum(pg, pg3), pg)
    kl = torch.zeros_like(pg)
    if ref_logp is not None:
        if kl_estimator == "k1":
            kl = logp - ref_logp
        else:
            x = torch.clamp(ref_logp - logp, -c, c)
            kl = torch.clamp(torch.exp(x) - x - 1, -kc, kc)
    ent = entropy if entropy is not None else torch.zeros_like(pg)
    loss = (weight * (pg + kl_coef * kl - entropy_coef * ent)).sum()
    with torch.no_grad():
        w = weight.float()
        sums = torch.stack([loss.float(), (w * pg).sum(), (w * kl).sum(), (w * ent).sum(),
                            (w * (pg2 > pg1)).sum(), (w * dual).sum(),
                            (w * (ratio - 1 - log_ratio)).sum(), w.sum()])
    return loss, ppo_stats(sums)


# ---------------------------------------------------------------- closed-form torch fallback
def _ppo_fwd_torch(logp, old_logp, adv, weight, ref_logp, entropy, clip_low, clip_high, dual_clip,
                   kl_coef, kl_k3, entropy_coef, log_ratio_clamp=20.0,
                   kl_clamp=10.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Same outputs as the kernels ((NUM_SUMS,) sums, dlogp (N,)) with explicit gradients, fp32.
    The clamps are floats here (inf: off); a clamped value has zero gradient (as torch.clamp's)."""
    lp, adv, w = logp.float(), adv.float(), weight.float()
    c, kc = log_ratio_clamp, kl_clamp
    raw = lp - old_logp.float()
    log_ratio = torch.clamp(raw, -c, c)
    ratio = torch.exp(log_ratio)
    pg1 = -adv * ratio  # also d pg1 / d logp, unless the log-ratio clamp is active
    pg2 = -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    clipped = pg2 > pg1
    pg = torch.where(clipped, pg2, pg1)
    dpg = torch.where(clipped | (raw.abs() > c), 0.0, pg1)  # NaN is not clamped: it stays NaN
    dual = torch.zeros_like(clipped)
    if dual_clip > 0:
        pg3 = -adv * dual_clip
        dual = (adv < 0) & (pg > pg3)
        pg, dpg = torch.where(dual, pg3, pg), torch.where(dual, 0.0, dpg)
    kl, dkl = torch.zeros_like(pg), torch.zeros_like(pg)
    if ref_logp is not None:
        x_raw = ref_logp.float() - lp
        if kl_k3:
            x = torch.clamp(x_raw, -c, c)
            ex = torch.exp(x)
            kl_raw = ex - x - 1
            kl = torch.clamp(kl_raw, -kc, kc)
            outside = (x_raw.abs() > c) | (kl_raw.abs() > kc)
            dkl = torch.where(outside, 0.0, 1 - ex)
        else:
            kl, dkl = -x_raw, torch.ones_like(x_raw)
    ent = entropy.float() if entropy is not None else torch.zeros_like(pg)
    sums = torch.stack([(w * (pg + kl_coef * kl - entropy_coef * ent)).sum(), (w * pg).sum(),
                        (w * kl).sum(), (w * ent).sum(), (w * clipped).sum(), (w * dual).sum(),
                        (w * (ratio - 1 - log_ratio)).sum(), w.sum()])
    return sums, (w * (dpg + kl_coef * dkl)).to(logp.dtype)


# ---------------------------------------------------------------- Triton (CUDA)
if triton is not None:
    @triton.jit
    def _ppo_fwd_kernel(
        logp_ptr,  # (N,) log-probs of the sampled tokens under the current policy
        old_logp_ptr,  # (N,) same under the behaviour policy
        adv_ptr,  # (N,) advantages
        weight_ptr,  # (N,) pre-scaled aggregation weights (0 outside the mask)
        ref_logp_ptr,  # (N,) reference-policy log-probs (read only if HAS_REF)
        entropy_ptr,  # (N,) per-token entropy (read only if HAS_ENT)
        dlogp_ptr,  # (N,) out: d loss / d logp
        partial_ptr,  # (num_blocks, NUM_SUMS) out: this block's weighted sums
        n, clip_low, clip_high, dual_clip, kl_coef, entropy_coef,
        lr_clamp,  # log-ratio clamp (inf: off)
        kl_clamp,  # k3 KL clamp (inf: off)
        HAS_REF: tl.constexpr, HAS_ENT: tl.constexpr, HAS_DUAL: tl.constexpr, KL_K3: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        inb = offs < n
        lp = tl.load(logp_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        raw = lp - tl.load(old_logp_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        adv = tl.load(adv_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        w = tl.load(weight_ptr + offs, mask=inb, other=0.0).to(tl.float32)  # 0 past the end
        log_ratio = tl.minimum(tl.maximum(raw, -lr_clamp), lr_clamp)
        ratio = tl.exp(log_ratio)
        pg1 = -adv * ratio  # also d pg1 / d logp, unless the log-ratio clamp is active
        pg2 = -adv * tl.minimum(tl.maximum(ratio, 1.0 - clip_low), 1.0 + clip_high)
        clipped = pg2 > pg1
        pg = tl.where(clipped, pg2, pg1)
        dpg = tl.where(clipped | (tl.abs(raw) > lr_clamp), 0.0, pg1)
        dual = tl.zeros_like(clipped)  # no dual clip unless HAS_DUAL
        if HAS_DUAL:
            pg3 = -adv * dual_clip
            dual = (adv < 0.0) & (pg > pg3)
            pg = tl.where(dual, pg3, pg)
            dpg = tl.where(dual, 0.0, dpg)
        kl = tl.zeros_like(pg)
        dkl = tl.zeros_like(pg)
        if HAS_REF:
            x_raw = tl.load(ref_logp_ptr + offs, mask=inb, other=0.0).to(tl.float32) - lp
            if KL_K3:
                x = tl.minimum(tl.maximum(x_raw, -lr_clamp), lr_clamp)
                ex = tl.exp(x)
                kl_raw = ex - x - 1.0
                kl = tl.minimum(tl.maximum(kl_raw, -kl_clamp), kl_clamp)
                outside = (tl.abs(x_raw) > lr_clamp) | (tl.abs(kl_raw) > kl_clamp)
                dkl = tl.where(outside, 0.0, 1.0 - ex)
            else:
                kl = -x_raw
                dkl = tl.full(x_raw.shape, 1.0, tl.float32)
        ent = tl.zeros_like(pg)
        if HAS_ENT:
            ent = tl.load(entropy_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        tl.store(dlogp_ptr + offs, (w * (dpg + kl_coef * dkl)).to(dlogp_ptr.dtype.element_ty), mask=inb)
        out = partial_ptr + pid * 8
        tl.store(out + 0, tl.sum(w * (pg + kl_coef * kl - entropy_coef * ent), axis=0))
        tl.store(out + 1, tl.sum(w * pg, axis=0))
        tl.store(out + 2, tl.sum(w * kl, axis=0))
        tl.store(out + 3, tl.sum(w * ent, axis=0))
        tl.store(out + 4, tl.sum(tl.where(clipped, w, 0.0), axis=0))
        tl.store(out + 5, tl.sum(tl.where(dual, w, 0.0), axis=0))
        tl.store(out + 6, tl.sum(w * (ratio - 1.0 - log_ratio), axis=0))
        tl.store(out + 7, tl.sum(w, axis=0))

def _ppo_fwd_triton(logp, old_logp, adv, weight, ref_logp, entropy, clip_low, clip_high, dual_clip,
                    kl_coef, kl_k3, entropy_coef, log_ratio_clamp=20.0, kl_clamp=10.0,
                    block: int = 1024):
    n = logp.numel()
    num_blocks = max(triton.cdiv(n, block), 1)
    partial = torch.empty(num_blocks, NUM_SUMS, device=logp.device, dtype=torch.float32)
    dlogp = torch.empty_like(logp)
    _ppo_fwd_kernel[(num_blocks,)](
        logp, old_logp, adv, weight, ref_logp if ref_logp is not None else logp,
        entropy if entropy is not None else logp, dlogp, partial,
        n, clip_low, clip_high, dual_clip, kl_coef, entropy_coef, log_ratio_clamp, kl_clamp,
        HAS_REF=ref_logp is not None, HAS_ENT=entropy is not None, HAS_DUAL=dual_clip > 0,
        KL_K3=kl_k3, BLOCK=block)
    return partial.sum(dim=0), dlogp  # fixed-order block partials: deterministic


# ---------------------------------------------------------------- dispatch
def _cpp():
    return try_load_cpp("ppo_loss", ["ppo_loss.cpp"])


def _prep(logp, old_logp, adv, weight, ref_logp, entropy):
    """Flatten to contiguous (N,); adv/weight fp32; policy tensors share one dtype (fp32 if mixed)."""
    pol = [t for t in (logp, old_logp, ref_logp, entropy) if t is not None]
    dtype = logp.dtype if all(t.dtype == logp.dtype for t in pol) else torch.float32

    def flat(t, dt):
        return None if t is None else t.reshape(-1).to(dt).contiguous()

    return (flat(logp, dtype), flat(old_logp, dtype), flat(adv, torch.float32),
            flat(weight, torch.float32), flat(ref_logp, dtype), flat(entropy, dtype))


def _ppo_fwd(logp, old_logp, adv, weight, ref_logp, entropy, clip_low, clip_high, dual_clip, kl_coef,
             kl_k3, entropy_coef, log_ratio_clamp, kl_clamp):
    """(sums (NUM_SUMS,) fp32, dlogp (N,)) on prepared (N,) inputs; picks Triton, C++ or torch."""
    args = (logp, old_logp, adv, weight, ref_logp, entropy, clip_low, clip_high, dual_clip, kl_coef,
            kl_k3, entropy_coef, log_ratio_clamp, kl_clamp)
    if logp.is_cuda and triton is not None:
        return _ppo_fwd_triton(*args)
    if logp.device.type == "cpu" and logp.dtype in (torch.float32, torch.bfloat16, torch.float16):
        ext = _cpp()
        if ext is not None:
            sums, dlogp = ext.ppo_fwd(*args)
            return sums, dlogp
    return _ppo_fwd_torch(*args)


def _clamp_value(c: float | None) -> float:
    """A clamp argument as the kernels take it: None or 0 (off) -> inf."""
    return float("inf") if not c else float(c)


def _check(logp, old_logp, adv, weight, ref_logp, entropy, clip_low, clip_high, dual_clip, kl_coef,
           kl_estimator, entropy_coef, log_ratio_clamp, kl_clamp) -> None:
    for name, t in (("old_logp", old_logp), ("adv", adv), ("weight", weight), ("ref_logp", ref_logp),
                    ("entropy", entropy)):
        if t is not None and t.shape != logp.shape:
            raise ValueError(f"ppo_loss: {name} has shape {tuple(t.shape)}, logp has {tuple(logp.shape)}")
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"ppo_loss: kl_estimator must be one of {KL_ESTIMATORS}, got {kl_estimator!r}")
    if not (0 <= clip_low < 1 and clip_high >= 0):
        raise ValueError(f"ppo_loss: need 0 <= clip_low < 1 and clip_high >= 0, got {clip_low}, {clip_high}")
    if dual_clip is not None and dual_clip <= 1:
        raise ValueError(f"ppo_loss: dual_clip must be > 1 (or None), got {dual_clip}")
    if kl_coef != 0 and ref_logp is None:
        raise ValueError("ppo_loss: kl_coef != 0 needs ref_logp")
    if entropy_coef != 0 and entropy is None:
        raise ValueError("ppo_loss: entropy_coef != 0 needs entropy")
    for name, c in (("log_ratio_clamp", log_ratio_clamp), ("kl_clamp", kl_clamp)):
        if c is not None and not c >= 0:
            raise ValueError(f"ppo_loss: {name} must be > 0 (or 0 / None: off), got {c}")


# ---------------------------------------------------------------- elementwise entry (fused lm_head)
def ppo_token_sums_and_grads(
        logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, weight: torch.Tensor,
        ref_logp: torch.Tensor | None = None, entropy: torch.Tensor | None = None, *,
        clip_low: float, clip_high: float, dual_clip: float | None, kl_coef: float,
        kl_estimator: str, entropy_coef: float, log_ratio_clamp: float | None = 20.0,
        kl_clamp: float | None = 10.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """No-autograd PPO terms on (N,) tensors: (sums (NUM_SUMS,) fp32, dloss_dlogp (N,),
    dloss_dentropy (N,) or None). Sums from several chunks add up; `ppo_stats(sums)` gives means."""
    _check(logp, old_logp, adv, weight, ref_logp, entropy, clip_low, clip_high, dual_clip, kl_coef,
           kl_estimator, entropy_coef, log_ratio_clamp, kl_clamp)
    inputs = _prep(logp, old_logp, adv, weight, ref_logp, entropy)
    sums, dlogp = _ppo_fwd(*inputs, float(clip_low), float(clip_high), float(dual_clip or 0.0),
                           float(kl_coef), kl_estimator == "k3", float(entropy_coef),
                           _clamp_value(log_ratio_clamp), _clamp_value(kl_clamp))
    dent = None if entropy is None else (inputs[3] * -entropy_coef).to(entropy.dtype)
    return sums, dlogp.view(logp.shape), None if dent is None else dent.view(entropy.shape)


def ppo_token_loss_and_grads(
        logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, weight: torch.Tensor,
        ref_logp: torch.Tensor | None = None, entropy: torch.Tensor | None = None, *,
        clip_low: float, clip_high: float, dual_clip: float | None, kl_coef: float,
        kl_estimator: str, entropy_coef: float, log_ratio_clamp: float | None = 20.0,
        kl_clamp: float | None = 10.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Pure elementwise PPO loss for callers that fuse it into their own loop (the lm_head chunk
    loop in logprob.py): fp32 (N,) inputs, weight pre-scaled so the loss is a plain sum. Returns
    (loss_sum 0-d fp32, dloss_dlogp (N,), dloss_dentropy (N,) or None); no autograd graph."""
    sums, dlogp, dent = ppo_token_sums_and_grads(
        logp, old_logp, adv, weight, ref_logp, entropy, clip_low=clip_low, clip_high=clip_high,
        dual_clip=dual_clip, kl_coef=kl_coef, kl_estimator=kl_estimator, entropy_coef=entropy_coef,
        log_ratio_clamp=log_ratio_clamp, kl_clamp=kl_clamp)
    return sums[SUM_LOSS], dlogp, dent


# ---------------------------------------------------------------- custom ops + autograd
@torch.library.custom_op("fastagent::ppo_loss", mutates_args=())
def _ppo_loss_op(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, weight: torch.Tensor,
                 ref_logp: torch.Tensor | None, entropy: torch.Tensor | None, clip_low: float,
                 clip_high: float, dual_clip: float, kl_coef: float, kl_k3: bool,
                 entropy_coef: float, log_ratio_clamp: float,
                 kl_clamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    # inputs already prepared (N,), clamps as floats (inf: off); returns (sums (NUM_SUMS,) fp32,
    # dlogp (N,) saved for backward)
    return _ppo_fwd(logp, old_logp, adv, weight, ref_logp, entropy, clip_low, clip_high, dual_clip,
                    kl_coef, kl_k3, entropy_coef, log_ratio_clamp, kl_clamp)


@_ppo_loss_op.register_fake
def _(logp, old_logp, adv, weight, ref_logp, entropy, clip_low, clip_high, dual_clip, kl_coef, kl_k3,
      entropy_coef, log_ratio_clamp, kl_clamp):
    return logp.new_empty(NUM_SUMS, dtype=torch.float32), torch.empty_like(logp)


def _ppo_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1], inputs[3])  # dlogp (N,), weight (N,) (an input: no extra memory)
    ctx.entropy_coef = inputs[11]
    ctx.entropy_dtype = None if inputs[5] is None else inputs[5].dtype


def _ppo_backward(ctx, grad_sums, grad_dlogp):
    dlogp, weight = ctx.saved_tensors
    g = grad_sums[SUM_LOSS]  # only the loss entry is differentiable (stats are detached)
    grad_ent = None
    if ctx.entropy_dtype is not None:
        grad_ent = (weight * (-ctx.entropy_coef * g)).to(ctx.entropy_dtype)
    return dlogp * g.to(dlogp.dtype), None, None, None, None, grad_ent, *([None] * 8)


torch.library.register_autograd("fastagent::ppo_loss", _ppo_backward, setup_context=_ppo_setup)


def ppo_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, weight: torch.Tensor,
             ref_logp: torch.Tensor | None = None, entropy: torch.Tensor | None = None, *,
             clip_low: float = 0.2, clip_high: float = 0.2, dual_clip: float | None = None,
             kl_coef: float = 0.0, kl_estimator: str = "k3", entropy_coef: float = 0.0,
             log_ratio_clamp: float | None = 20.0,
             kl_clamp: float | None = 10.0) -> tuple[torch.Tensor, PPOStats]:
    """Fused PPO policy loss. All tensors share one shape ((B, T) or (N,)); weight is the pre-scaled
    aggregation weight (token_mean_weights / seq_mean_weights, 0 outside the response mask).
    log_ratio_clamp bounds logp - old_logp (and ref_logp - logp in k3) before exp, kl_clamp the k3
    KL (k1 is linear and not clamped), as verl does; None or 0 turns a clamp off.
    Returns (loss 0-d fp32, PPOStats). Gradients flow into logp and entropy only: pass old_logp,
    adv, weight and ref_logp detached."""
    _check(logp, old_logp, adv, weight, ref_logp, entropy, clip_low, clip_high, dual_clip, kl_coef,
           kl_estimator, entropy_coef, log_ratio_clamp, kl_clamp)
    for name, t in (("old_logp", old_logp), ("adv", adv), ("weight", weight), ("ref_logp", ref_logp)):
        if t is not None and t.requires_grad:
            raise ValueError(f"ppo_loss: {name} requires grad; this op differentiates logp and entropy "
                             f"only: pass {name}.detach()")
    sums, _ = _ppo_loss_op(*_prep(logp, old_logp, adv, weight, ref_logp, entropy), float(clip_low),
                           float(clip_high), float(dual_clip or 0.0), float(kl_coef),
                           kl_estimator == "k3", float(entropy_coef), _clamp_value(log_ratio_clamp),
                           _clamp_value(kl_clamp))
    return sums[SUM_LOSS], ppo_stats(sums)
