"""The value model of PPO with a critic: the start (SFT) model's decoder with a scalar head.

    critic = Critic.from_pretrained(start_dir)            # backbone = the SFT decoder, head = zeros
    values = critic(input_ids)                            # (B, T) fp32: V of the state before each next token

With one action per sample and gamma = lambda = 1 (the paper's step-wise setting), GAE reduces to
A_t = R - V(s_t) on every token t of the action and the return of every token is R: the critic learns
the expected reward of acting from that point of the state's prompt and partial action. The head starts
at zero, so the first update's advantages are the raw rewards. FSDP2 shards it like the policy
(`dist.shard_model`: the decoder layers, then the root holding embeddings and head).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


class Critic(nn.Module):
    def __init__(self, backbone: nn.Module, hidden_size: int) -> None:
        super().__init__()
        self.model = backbone  # a HF decoder body (LlamaModel, Qwen2Model): has .layers for shard_model
        self.value_head = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: torch.device | str = "cpu") -> "Critic":
        from fastagent.model import load_model
        lm, _ = load_model(path, dtype=torch.float32, device=device)
        critic = cls(lm.model, lm.config.hidden_size).to(device)
        critic.model.config.use_cache = False
        return critic

    def forward(self, input_ids: torch.Tensor, rows: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Values (B, T), or only at the flat positions rows (b * T + t) when given: (N,). A 4D mask and
        positions come from shared-prefix packing (fastagent.packing.pack)."""
        extra = {} if attention_mask is None else {"attention_mask": attention_mask, "position_ids": position_ids}
        h = self.model(input_ids=input_ids, use_cache=False, **extra).last_hidden_state  # (B, T, H), final norm
        if rows is not None:
            h = h.reshape(-1, h.shape[-1]).index_select(0, rows)
        return self.value_head(h).squeeze(-1).float()
