"""How RL samples become model input: one right-padded row per sample, or the K samples of a state
sharing their prompt, computed once: in one masked row (`Packed`), or as the prompt's own forward with
the completions in one masked row on its KV cache (`KVShared`, the default); and the cut into
micro-batches that every rank runs the same number of. Used by the update, the reference pass and the
critic (fastagent/rl.py).

Measured on SmolLM2, one state (prompt 1,600 tokens, completions of 640/300/200/450), forward + backward
of the PPO micro-step alone on 2 cores (2026-12-01): separate padded rows 46-52 s and 8.5 GB peak, one
masked row 26-31 s and 8.0 GB, the prompt's KV cache 21 s and 7.0 GB. `python bench/throughput.py
--suite rl` measures the three on a real RL batch (P1)."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch


def rollout_rows(prompt_lens: list[int], comp_lens: list[int], width: int) -> torch.Tensor:
    """Flat indices b * width + t of the positions whose next token is a completion token."""
    rows = [b * width + t for b, (p, c) in enumerate(zip(prompt_lens, comp_lens)) for t in range(p - 1, p + c - 1)]
    return torch.tensor(rows, dtype=torch.long)


class Packed(NamedTuple):
    """One micro-batch as model input: ids (R, T); positions and a (R, 1, T, T) attention mask when
    samples share a row (None: plain right-padded rows, causal attention); rows (N,) the flat positions
    predicting completion tokens; labels (N,) those tokens."""
    ids: torch.Tensor
    positions: torch.Tensor | None
    mask: torch.Tensor | None
    rows: torch.Tensor
    labels: torch.Tensor

    def forward(self, model, **kw):
        """model(...) on this batch; kw passes through (output_hidden_states, logits_to_keep)."""
        extra = {} if self.mask is None else {"attention_mask": self.mask, "position_ids": self.positions}
        return model(input_ids=self.ids, use_cache=False, **extra, **kw)


def share_groups(seqs: list[tuple]) -> list[list[tuple]]:
    """Consecutive samples with the same prompt ids (the K actions of a state), in order."""
    groups: list[list[tuple]] = []
    for x in seqs:
        if groups and groups[-1][0][0] == x[0]:
            groups[-1].append(x)
        else:
            groups.append([x])
    return groups


def pack(seqs: list[tuple], pad_id: int, device: torch.device, share: bool | str = False) -> Packed | KVShared:
    """Model input for samples (prompt ids, completion ids, ...).

    share="kv": each state's prompt once, its completions on the prompt's KV cache (`KVShared`).
    share=False: one right-padded row per sample, causal attention, no mask (pads are never read).
    share=True (shared-prefix packing): one row per group of consecutive samples with the same prompt,
    laid out prompt, completion 1, ..., completion K; every completion restarts its positions where the
    prompt ends and attends to the prompt and to its own earlier tokens only (the mask keeps samples
    apart), so each sample sees exactly what it would alone while the prompt is computed once. The last
    prompt position predicts the first token of every completion. Labels keep the order of seqs."""
    if share == "kv":
        return _pack_kv(seqs, pad_id, device)
    if not share:
        width = max(len(x[0]) + len(x[1]) for x in seqs)
        ids = torch.tensor([x[0] + x[1] + [pad_id] * (width - len(x[0]) - len(x[1])) for x in seqs], device=device)
        rows = rollout_rows([len(x[0]) for x in seqs], [len(x[1]) for x in seqs], width).to(device)
        labels = torch.tensor([t for x in seqs for t in x[1]], device=device)
        return Packed(ids, None, None, rows, labels)
    groups = share_groups(seqs)
    width = max(len(g[0][0]) + sum(len(x[1]) for x in g) for g in groups)
    ids = torch.full((len(groups), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(groups), width), dtype=torch.long)
    segment = torch.full((len(groups), width), -1, dtype=torch.long)  # 0: prompt, k: completion k, -1: pad
    rows: list[int] = []
    for b, g in enumerate(groups):
        p = len(g[0][0])
        ids[b, :p] = torch.tensor(g[0][0])
        positions[b, :p] = torch.arange(p)
        segment[b, :p] = 0
        at = p
        for k, x in enumerate(g, start=1):
            n = len(x[1])
            ids[b, at:at + n] = torch.tensor(x[1], dtype=torch.long)
            positions[b, at:at + n] = torch.arange(p, p + n)
            segment[b, at:at + n] = k
            rows += [b * width + p - 1] + [b * width + t for t in range(at, at + n - 1)]
            at += n
    q, kv = segment.unsqueeze(2), segment.unsqueeze(1)  # (R, T, 1), (R, 1, T)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    # a pad attends to itself only (no row of the mask is empty)
    mask = causal & (((kv == 0) & (q >= 0)) | (kv == q)) | torch.eye(width, dtype=torch.bool)
    labels = torch.tensor([t for x in seqs for t in x[1]], device=device)
    return Packed(ids.to(device), positions.to(device), mask.unsqueeze(1).to(device),
                  torch.tensor(rows, dtype=torch.long, device=device), labels)


class KVShared(NamedTuple):
    """One micro-batch where each state's prompt is computed ONCE, as its own causal forward, and its K
    completions then run in one row on top of the prompt's KV cache (`share="kv"` in `pack`): each
    completion's positions restart where the prompt ends and a boolean mask lets it see the whole prompt
    and its own earlier tokens only. Gradients flow through the cache into the prompt's computation, so
    loss and gradients equal separate rows'; the attention costs P^2/2 (causal, no mask) + L*(P + L) for
    L completion tokens, against the single masked row's dense (P + L)^2, and nothing is padded. Same
    interface as Packed: forward(model) returns an object whose hidden_states[-1], flattened, rows index.
    Always two forwards per state: under FSDP2 every rank must run as many forwards, so micro-batches hold
    one state each (`micro_batches(..., share="kv")`)."""
    groups: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]  # prompt, comps, positions, mask
    rows: torch.Tensor
    labels: torch.Tensor

    def forward(self, model, output_hidden_states=True, logits_to_keep=None):
        """The model's final hidden states of every group, flattened into one (1, N, H) tensor in the
        order `rows` indexes: per group, the prompt's last position, then the completions' inputs."""
        from types import SimpleNamespace
        keep = {} if logits_to_keep is None else {"logits_to_keep": logits_to_keep}
        flat = []
        for prompt, comps, positions, mask in self.groups:
            out = model(input_ids=prompt, use_cache=True, output_hidden_states=True, **keep)
            flat.append(out.hidden_states[-1][0, -1:])
            h = model(input_ids=comps, position_ids=positions, attention_mask=mask, past_key_values=out.past_key_values,
                      use_cache=True, output_hidden_states=True, **keep).hidden_states[-1]
            flat.append(h[0])
        return SimpleNamespace(hidden_states=[torch.cat(flat).unsqueeze(0)])


def _pack_kv(seqs: list[tuple], pad_id: int, device: torch.device) -> KVShared:
    groups, rows, at = [], [], 0
    for g in share_groups(seqs):
        p = len(g[0][0])
        inputs = [x[1][:-1] for x in g]  # completion inputs: every token but the last
        n = max(sum(map(len, inputs)), 1)  # one pad when every completion is a single token
        ids = torch.full((1, n), pad_id, dtype=torch.long)
        positions = torch.full((1, n), p, dtype=torch.long)
        segment = torch.full((n,), -1, dtype=torch.long)  # k: completion k, -1: the pad
        c = 0
        for k, inp in enumerate(inputs):
            ids[0, c:c + len(inp)] = torch.tensor(inp, dtype=torch.long)
            positions[0, c:c + len(inp)] = torch.arange(p, p + len(inp))
            segment[c:c + len(inp)] = k
            # the prompt's last position predicts token 0; completion input t predicts token t + 1
            rows += [at] + [at + 1 + c + t for t in range(len(inp))]
            c += len(inp)
        own = (segment[:, None] == segment[None, :]) & torch.ones(n, n, dtype=torch.bool).tril()
        mask = torch.cat([torch.ones(n, p, dtype=torch.bool), own], dim=1)  # the whole prompt, then its own past
        groups.append((torch.tensor([g[0][0]], device=device), ids.to(device), positions.to(device),
                       mask[None, None].to(device)))
        at += 1 + n
    labels = torch.tensor([t for x in seqs for t in x[1]], device=device)
    return KVShared(groups, torch.tensor(rows, dtype=torch.long, device=device), labels)


def can_share(model) -> bool:
    """Both ways of sharing a prompt need an attention that takes an arbitrary boolean 4D mask: sdpa
    does; eager adds the mask to the scores (a boolean one would be wrong) and flash-attention's packed
    format cannot express a shared prefix, so those get separate rows."""
    cfg = getattr(model, "config", None)
    return getattr(cfg, "_attn_implementation", "sdpa") == "sdpa"


def share_mode(model, choice: str = "auto") -> bool | str:
    """How the K samples of a state share their prompt in the update (Config.share_prefix): "kv" (the
    prompt's own forward, the completions in one masked row on its KV cache; auto), True (prompt and
    completions in one masked row: "mask"), or False (a padded row per sample: "off", and auto where the
    attention cannot take a boolean mask, see `can_share`)."""
    if choice in ("kv", "mask") and not can_share(model):
        raise ValueError(f"share_prefix={choice} needs sdpa attention (a boolean mask), not "
                         f"{model.config._attn_implementation}; use share_prefix=auto or off")
    if choice == "auto":
        return "kv" if can_share(model) else False
    return {"kv": "kv", "mask": True, "off": False}[choice]


def micro_batches(seqs: list, micro: int, dummy: Any, share: bool | str = False) -> list[tuple[list, bool]]:
    """seqs cut into micro-batches of micro samples (share: of micro states' groups of samples, one
    packed row each, see `pack`; share="kv": of one state each), then padded with (one dummy sample,
    False) up to the largest count on any rank: FSDP2 gathers parameters in every forward, so every rank
    must run as many (a dummy is computed with weight 0 and its outputs dropped)."""
    if share:
        micro = 1 if share == "kv" else micro
        groups = share_groups(seqs)
        chunks = [([x for g in groups[i:i + micro] for x in g], True) for i in range(0, len(groups), micro)]
    else:
        chunks = [(seqs[i:i + micro], True) for i in range(0, len(seqs), micro)]
    most = torch.tensor(len(chunks))
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
    return chunks + [([dummy], False)] * (int(most) - len(chunks))
