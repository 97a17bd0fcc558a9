"""lm_head + loss fused: cross-entropy (SFT) and the PPO policy loss (RL), straight from hidden states.

    from fastagent.kernels import fused_linear_cross_entropy, fused_linear_ppo_loss, token_mean_weights
    w = token_mean_weights(mask)                         # (N,) fp32: the loss is a token mean
    loss = fused_linear_cross_entropy(hidden, lm_head.weight, labels, w)
    loss, stats = fused_linear_ppo_loss(hidden, lm_head.weight, labels, old_logp, adv, w,
                                        ref_logp, clip_low=0.2, clip_high=0.28, kl_coef=1e-3)
    loss.backward()                                      # grads into hidden and lm_head.weight

Why: the per-token gradient of these losses is known as soon as a chunk's log-probs are, so the
gradients to hidden and weight are produced inside the forward chunk loop (as Liger-Kernel's
fused linear cross entropy does): no logit recompute, no (N, V) tensor. Per chunk of C tokens:
    logits (C, V) = hidden_c @ weight.T                 BLAS / cuBLAS
    logp, entropy, lse = row pass                        C++ (CPU) / Triton (CUDA), online logsumexp
    loss_c, dL/dlogp, dL/dentropy = token loss           CE: -w; PPO: kernels/ppo_loss.py
    logits := dL/dlogits                                 same row pass, in place
    grad_hidden_c = dlogits @ weight;  grad_weight += dlogits.T @ hidden_c
Peak extra memory: one (C, V) chunk + grad_hidden + grad_weight (fp32 on CPU); the backward only
scales the stored gradients by grad_output, in place. Both ops are torch.library custom ops
(fastagent::fused_linear_ce, fastagent::fused_linear_ppo) with fake kernels, so torch.compile
traces them; `*_ref` are the plain autograd references (logits materialised).
Token weights are pre-scaled: the loss is sum_i w_i * loss_i (token_mean_weights and
seq_mean_weights from ppo_loss give means); labels < 0 are ignored tokens.
"""

from __future__ import annotations

import torch

from fastagent.kernels.logprob import (add_matmul, block_buffer, block_logits, block_shape,
                                       check_inputs, check_labels, finish_stats, grads_out, logprob_ref,
                                       new_grads, new_state, row_pass)
from fastagent.kernels.ppo_loss import (KL_ESTIMATORS, NUM_SUMS, SUM_LOSS, PPOStats, _clamp_value,
                                        ppo_loss_ref, ppo_stats, ppo_token_sums_and_grads)


# ---------------------------------------------------------------- references (autograd)
def fused_linear_cross_entropy_ref(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                   token_weight: torch.Tensor | None = None,
                                   temperature: float = 1.0) -> torch.Tensor:
    """-sum_i w_i log p(label_i), through logprob_ref (materialised logits)."""
    logp, _ = logprob_ref(hidden, weight, labels, temperature)
    w = torch.ones_like(logp) if token_weight is None else token_weight.float()
    return -(w * logp).sum()


def fused_linear_ppo_loss_ref(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                              old_logp: torch.Tensor, adv: torch.Tensor, token_weight: torch.Tensor,
                              ref_logp: torch.Tensor | None = None, *, temperature: float = 1.0,
                              clip_low: float = 0.2, clip_high: float = 0.2,
                              dual_clip: float | None = None, kl_coef: float = 0.0,
                              kl_estimator: str = "k3", entropy_coef: float = 0.0,
                              log_ratio_clamp: float | None = 20.0,
                              kl_clamp: float | None = 10.0) -> tuple[torch.Tensor, PPOStats]:
    """ppo_loss_ref on logprob_ref's log-probs and entropy."""
    logp, entropy = logprob_ref(hidden, weight, labels, temperature)
    return ppo_loss_ref(logp, old_logp.float(), adv.float(), token_weight.float(),
                        None if ref_logp is None else ref_logp.float(), entropy,
                        clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
                        kl_coef=kl_coef, kl_estimator=kl_estimator, entropy_coef=entropy_coef,
                        log_ratio_clamp=log_ratio_clamp, kl_clamp=kl_clamp)


# ---------------------------------------------------------------- the chunk loop
def _fused_chunks(hidden, weight, labels, temperature, need_h, need_w, token_loss):
    """Run the fused loop. token_loss(s, e, logp_c, entropy_c) -> (sums_c, dlogp_c, dent_c | None)
    returns this chunk's loss sums (any fixed shape, added up) and per-token loss gradients.
    Returns (sums, grad_hidden | None, grad_weight | None) (accumulator dtypes: see new_grads)."""
    n, v = hidden.shape[0], weight.shape[0]
    check_labels("fused_linear", labels, v)
    rp = row_pass(hidden.device)
    grad_h, grad_w = new_grads(hidden, weight, need_h, need_w)
    inv_temp = 1.0 / temperature
    rows, _ = block_shape(n, v, hidden.device, whole_rows=True)  # the gradient needs full rows
    buf = block_buffer(rows, v, weight, rp)
    sums = None
    for s in range(0, n, rows):
        e = min(n, s + rows)
        h, y = hidden[s:e], labels[s:e]
        logits = block_logits(h, weight, buf)  # (C, V)
        state = new_state(e - s, hidden.device)
        rp.stats_(logits, y, 0, v, inv_temp, *state)
        logp, entropy, lse = finish_stats(y, *state)  # (C,) fp32 each
        sums_c, dlogp, dent = token_loss(s, e, logp, entropy)
        sums = sums_c if sums is None else sums + sums_c
        if need_h or need_w:
            rp.grad_(logits, y, 0, lse, entropy, dlogp, dent, inv_temp)  # logits := dL/dlogits
            d = logits.to(weight.dtype)  # no copy unless a fp32 row pass ran for bf16 weights
            if grad_h is not None:
                add_matmul(grad_h[s:e], d, weight, first=True)
            if grad_w is not None:
                add_matmul(grad_w, d.T, h, first=s == 0)
    return sums, grad_h, grad_w


def _scale_stored_grads(ctx, g):
    """Backward of both ops: the gradients were computed in forward for grad_output = 1; scale them
    in place (as Liger-Kernel does): an out-of-place product would hold a second (V, H) gradient
    (K1 measured: peak extra memory 0.156 of naive instead of 0.10). Consequences: a second
    backward through a retained graph raises (the saved tensors' version changed) instead of
    scaling twice, and the private ops' gradient outputs must not leave a torch.compile region
    (the public functions drop them)."""
    grad_h, grad_w = ctx.saved_tensors
    need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    return (grad_h.mul_(g.to(grad_h.dtype)) if need_h else None,
            grad_w.mul_(g.to(grad_w.dtype)) if need_w else None)


# ---------------------------------------------------------------- cross-entropy
@torch.library.custom_op("fastagent::fused_linear_ce", mutates_args=())
def _fused_ce_op(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                 token_weight: torch.Tensor, temperature: float, need_h: bool,
                 need_w: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # hidden (N, H), weight (V, H), labels (N,), token_weight (N,) fp32
    # -> loss () fp32, grad_hidden (N, H) or empty, grad_weight (V, H) or empty
    def token_loss(s, e, logp, entropy):
        w = token_weight[s:e]
        return -(w * logp).sum(), -w, None  # d(-w logp)/dlogp = -w; no entropy term

    loss, grad_h, grad_w = _fused_chunks(hidden, weight, labels, temperature, need_h, need_w,
                                           token_loss)
    if loss is None:  # no tokens
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    return (loss, *grads_out(hidden, weight, grad_h, grad_w))


@_fused_ce_op.register_fake
def _(hidden, weight, labels, token_weight, temperature, need_h, need_w):
    return (hidden.new_empty((), dtype=torch.float32),
            hidden.new_empty(hidden.shape) if need_h else hidden.new_empty(0),
            weight.new_empty(weight.shape) if need_w else weight.new_empty(0))


def _ce_setup(ctx, inputs, output):
    # The stored grads are results, not functions of the inputs autograd should differentiate.
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.save_for_backward(output[1], output[2])


def _ce_backward(ctx, grad_loss, _gh, _gw):
    return (*_scale_stored_grads(ctx, grad_loss), None, None, None, None, None)


torch.library.register_autograd("fastagent::fused_linear_ce", _ce_backward, setup_context=_ce_setup)


def _flat(hidden, labels, *per_token):
    """(..., H) -> (N, H); (...) -> (N,) fp32 for per-token inputs (None stays None)."""
    vecs = [None if t is None else t.reshape(-1).float().contiguous() for t in per_token]
    return hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1).contiguous(), vecs


def _needs(hidden, weight) -> tuple[bool, bool]:
    grad = torch.is_grad_enabled()
    return grad and hidden.requires_grad, grad and weight.requires_grad


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               token_weight: torch.Tensor | None = None,
                               temperature: float = 1.0) -> torch.Tensor:
    """sum_i w_i * -log softmax(hidden_i @ weight.T / temperature)[label_i], a 0-d fp32 loss.

    hidden (..., H) and weight (V, H) share a dtype; labels (...) int64 (< 0: ignored);
    token_weight (...) float or bool mask (None: all ones, a plain sum). For a token mean pass
    token_mean_weights(mask). Gradients flow into hidden and weight."""
    check_inputs("fused_linear_cross_entropy", hidden, weight, labels, temperature)
    if token_weight is not None and token_weight.shape != labels.shape:
        raise ValueError(f"fused_linear_cross_entropy: token_weight must have shape "
                         f"{tuple(labels.shape)}, got {tuple(token_weight.shape)}")
    if token_weight is None:
        token_weight = torch.ones(labels.shape, dtype=torch.float32, device=labels.device)
    h, y, (w,) = _flat(hidden, labels, token_weight.detach())
    loss, _, _ = _fused_ce_op(h, weight, y, w, float(temperature), *_needs(hidden, weight))
    return loss


# ---------------------------------------------------------------- PPO
@torch.library.custom_op("fastagent::fused_linear_ppo", mutates_args=())
def _fused_ppo_op(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                  old_logp: torch.Tensor, adv: torch.Tensor, token_weight: torch.Tensor,
                  ref_logp: torch.Tensor | None, temperature: float, clip_low: float,
                  clip_high: float, dual_clip: float, kl_coef: float, kl_estimator: str,
                  entropy_coef: float, log_ratio_clamp: float, kl_clamp: float, need_h: bool,
                  need_w: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # per-token inputs (N,) fp32, clamps as floats (inf: off); -> sums (NUM_SUMS,) fp32 (see
    # ppo_loss), grad_hidden, grad_weight
    def token_loss(s, e, logp, entropy):
        sums, dlogp, dent = ppo_token_sums_and_grads(
            logp, old_logp[s:e], adv[s:e], token_weight[s:e],
            None if ref_logp is None else ref_logp[s:e], entropy,  # entropy also feeds the stats
            clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip or None, kl_coef=kl_coef,
            kl_estimator=kl_estimator, entropy_coef=entropy_coef, log_ratio_clamp=log_ratio_clamp,
            kl_clamp=kl_clamp)
        return sums, dlogp, dent if entropy_coef != 0 else None  # all-zero dent: skip its math

    sums, grad_h, grad_w = _fused_chunks(hidden, weight, labels, temperature, need_h, need_w,
                                           token_loss)
    if sums is None:  # no tokens
        sums = torch.zeros(NUM_SUMS, dtype=torch.float32, device=hidden.device)
    return (sums, *grads_out(hidden, weight, grad_h, grad_w))


@_fused_ppo_op.register_fake
def _(hidden, weight, labels, old_logp, adv, token_weight, ref_logp, temperature, clip_low, clip_high,
      dual_clip, kl_coef, kl_estimator, entropy_coef, log_ratio_clamp, kl_clamp, need_h, need_w):
    return (hidden.new_empty(NUM_SUMS, dtype=torch.float32),
            hidden.new_empty(hidden.shape) if need_h else hidden.new_empty(0),
            weight.new_empty(weight.shape) if need_w else weight.new_empty(0))


def _ppo_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.save_for_backward(output[1], output[2])


def _ppo_backward(ctx, grad_sums, _gh, _gw):
    g = grad_sums[SUM_LOSS]  # only the loss entry is differentiable (stats are detached)
    return (*_scale_stored_grads(ctx, g), *([None] * 16))


torch.library.register_autograd("fastagent::fused_linear_ppo", _ppo_backward, setup_context=_ppo_setup)


def fused_linear_ppo_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          old_logp: torch.Tensor, adv: torch.Tensor, token_weight: torch.Tensor,
                          ref_logp: torch.Tensor | None = None, *, temperature: float = 1.0,
                          clip_low: float = 0.2, clip_high: float = 0.2,
                          dual_clip: float | None = None, kl_coef: float = 0.0,
                          kl_estimator: str = "k3", entropy_coef: float = 0.0,
                          log_ratio_clamp: float | None = 20.0,
                          kl_clamp: float | None = 10.0) -> tuple[torch.Tensor, PPOStats]:
    """PPO policy loss (kernels/ppo_loss.py's, same arguments, the same verl-style clamps on by
    default: log_ratio_clamp before exp, kl_clamp on the k3 KL; None or 0: off) on the log-probs
    and entropy of hidden @ weight.T / temperature, fused with the lm_head. hidden (..., H),
    weight (V, H); labels, old_logp, adv, token_weight, ref_logp shaped (...). Returns (loss 0-d
    fp32, PPOStats with the entropy mean filled in). Gradients flow into hidden and weight."""
    check_inputs("fused_linear_ppo_loss", hidden, weight, labels, temperature)
    for name, t in (("old_logp", old_logp), ("adv", adv), ("token_weight", token_weight),
                    ("ref_logp", ref_logp)):
        if t is not None and t.shape != labels.shape:
            raise ValueError(f"fused_linear_ppo_loss: {name} must have shape {tuple(labels.shape)}, "
                             f"got {tuple(t.shape)}")
        if t is not None and t.requires_grad:
            raise ValueError(f"fused_linear_ppo_loss: {name} requires grad; pass {name}.detach()")
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"fused_linear_ppo_loss: kl_estimator must be one of {KL_ESTIMATORS}")
    if kl_coef != 0 and ref_logp is None:
        raise ValueError("fused_linear_ppo_loss: kl_coef != 0 needs ref_logp")
    for name, c in (("log_ratio_clamp", log_ratio_clamp), ("kl_clamp", kl_clamp)):
        if c is not None and not c >= 0:
            raise ValueError(f"fused_linear_ppo_loss: {name} must be > 0 (or 0 / None: off), got {c}")
    h, y, (old, a, w, ref) = _flat(hidden, labels, old_logp, adv, token_weight, ref_logp)
    sums, _, _ = _fused_ppo_op(h, weight, y, old, a, w, ref, float(temperature), float(clip_low),
                               float(clip_high), float(dual_clip or 0.0), float(kl_coef),
                               kl_estimator, float(entropy_coef), _clamp_value(log_ratio_clamp),
                               _clamp_value(kl_clamp), *_needs(hidden, weight))
    return sums[SUM_LOSS], ppo_stats(sums)
