"""fastagent.kernels: fused ops for RL on LLMs (token log-probs + entropy, GAE, PPO loss,
RMSNorm and SwiGLU for the decoder layers).

Triton on CUDA, C++ (OpenMP) on CPU, pure-torch references as the fallback.
"""

# Token log-probs + entropy from hidden states and the lm_head; lm_head fused with CE / PPO losses.
from fastagent.kernels.logprob import logprob, logprob_ref
from fastagent.kernels.fused_linear import (fused_linear_cross_entropy, fused_linear_cross_entropy_ref,
                                            fused_linear_ppo_loss, fused_linear_ppo_loss_ref)

# Masked GAE (padded or packed) and critic-free group baselines.
from fastagent.kernels.gae import gae, gae_ref, group_advantages, masked_whiten
# Fused PPO policy loss (clip-higher, dual-clip, KL, entropy) and clipped value loss; the
# elementwise entry ppo_token_sums_and_grads is what fused_linear_ppo_loss calls per chunk.
from fastagent.kernels.ppo_loss import (PPOStats, ppo_loss, ppo_loss_ref, ppo_stats,
                                        ppo_token_loss_and_grads, ppo_token_sums_and_grads,
                                        seq_mean_weights, token_mean_weights)
from fastagent.kernels.value_loss import value_loss, value_loss_ref
# Decoder-layer elementwise chains for training on CPU: LlamaRMSNorm and LlamaMLP's silu(gate) * up.
from fastagent.kernels.rmsnorm import rms_norm, rms_norm_ref
from fastagent.kernels.swiglu import silu_mul, silu_mul_ref
