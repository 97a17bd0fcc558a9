"""The transformers fallback engine: any device, no dependency beyond transformers.

    engine = HFEngine("tiny-random", device="cpu", max_batch=16)   # or make_engine("hf", model_dir, ...)
    outs = engine.generate(prompt_ids, Sampling(n=4, temperature=1.0, max_new_tokens=64), version)

Its own copy of the model (fastagent.model.load_model), eval mode, no grad. Generation is a plain
decode loop over the HF forward with its KV cache (DynamicCache): prompts times n are cut into
batches of at most max_batch sequences (sorted by length, so a batch pads little), LEFT padded with an
attention mask and position ids counted from the first real token, so every new token sits right
after its own prompt. Each step samples from log_softmax(logits / T) after top-p (tokens outside the
nucleus get -inf) with one torch.Generator seeded by (engine seed, Sampling.seed): a call is
reproducible and the caller's global RNG is never touched. The log-prob recorded is the sampled
token's under exactly that distribution (greedy, T=0: the raw log_softmax), in fp32; at top_p=1 it is
what trainer_logprobs computes for the same weights.

Weights change only through sync_weights: each bucket tensor is copied (param.copy_) into the
parameter of the same HF name (tied parameters answer to every name, so the head follows the
embeddings), and a sync must cover every parameter. Sleep level 1 moves the weights to host memory
and empties the CUDA cache (on CPU there is nothing to free: a no-op); level 2 frees the parameters'
storage, and wake() re-creates them empty on the device: until a full sync every generate refuses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import torch

from fastagent.rollout.base import Completion, Engine, EngineStateError, Sampling


# ---------------------------------------------------------------- sampling (the hot path, pure)

def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """logits (B, V) with every token outside the top-p nucleus set to -inf. The nucleus is the
    smallest set of most likely tokens whose probability reaches top_p (the first token always stays)."""
    sorted_logits, idx = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    drop = probs.cumsum(dim=-1) - probs >= top_p  # the mass before this token already reaches top_p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, idx, sorted_logits)


def sample_next(logits: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, V) fp32 -> the next tokens (B,) and their log-probs (B,) under the distribution
    they were drawn from: log_softmax(logits / T) after top-p; greedy (T=0): argmax, raw log_softmax."""
    if temperature == 0:
        tok = logits.argmax(dim=-1)
        logp = logits.log_softmax(dim=-1)
    else:
        logits = logits / temperature
        if top_p < 1:
            logits = top_p_filter(logits, top_p)
        logp = logits.log_softmax(dim=-1)
        tok = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)  # -inf: probability 0
    return tok, logp.gather(-1, tok[:, None]).squeeze(-1)


# ---------------------------------------------------------------- the engine

class HFEngine(Engine):
    """transformers model + KV-cache decode loop; see the module docstring."""

    name = "hf"
    copies_each_bucket = True  # _load_bucket copies: the buckets may be views into one reused buffer

    def __init__(self, model_dir: str | Path, device: str | torch.device = "cpu",
                 dtype: str | torch.dtype = torch.float32, seed: int = 0, max_batch: int = 16,
                 max_model_len: int | None = None, **ignored: Any) -> None:
        """ignored: the vLLM engine's options (gpu_memory_utilization, enable_sleep, ...), accepted so
        callers can pass one set of kwargs to either engine."""
        from fastagent.model import load_model, resolve_device

        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.device = resolve_device(device)
        self.weights_device = self.device
        self.model, _ = load_model(model_dir, dtype=dtype, device=self.device)
        self.model.eval().requires_grad_(False)
        self.seed, self.max_batch = int(seed), int(max_batch)
        cfg = self.model.config
        self.max_model_len = int(max_model_len or getattr(cfg, "max_position_embeddings", None) or 1 << 30)
        pad = getattr(cfg, "pad_token_id", None)
        self.pad_id = int(pad if pad is not None else 0)  # any id works: padded positions are masked
        self.ignored = dict(ignored)
        self._targets = _named_weights(self.model)  # every HF name (tied aliases too) -> its tensor
        self._params = list(self.model.parameters())  # each once, tied ones included once
        self._shapes = [p.shape for p in self._params]
        self._weights_dropped = False  # True from sleep(2) until a complete sync
        self._loaded: set[int] = set()  # ids of the tensors the running sync has set
        super().__init__()

    # --- generation ---
    def _generate(self, prompts: list[list[int]], sampling: Sampling) -> list[list[Completion]]:
        if self._weights_dropped:
            raise EngineStateError("hf engine dropped its weights in sleep(2): call sync_weights before generate")
        for i, p in enumerate(prompts):
            if len(p) >= self.max_model_len:
                raise ValueError(f"prompt {i} has {len(p)} tokens, max_model_len is {self.max_model_len}: "
                                 f"it leaves no room for a new token")
        rows = [(i, j) for i in range(len(prompts)) for j in range(sampling.n)]  # (prompt, sample)
        order = sorted(range(len(rows)), key=lambda r: -len(prompts[rows[r][0]]))  # stable: similar lengths batch
        gen = torch.Generator(device=self.device)
        gen.manual_seed((self.seed * 1_000_003 + sampling.seed) % (1 << 63))
        out: list[list[Any]] = [[None] * sampling.n for _ in prompts]
        for start in range(0, len(order), self.max_batch):
            chunk = order[start:start + self.max_batch]
            done = self._decode([prompts[rows[r][0]] for r in chunk], sampling, gen)
            for r, completion in zip(chunk, done):
                i, j = rows[r]
                out[i][j] = completion
        return out

    @torch.no_grad()
    def _decode(self, prompts: list[list[int]], sampling: Sampling, gen: torch.Generator) -> list[Completion]:
        """One batch: left-padded prefill, then one token per step with the KV cache until every row
        has hit a stop token or its length limit."""
        dev, B, L = self.device, len(prompts), max(len(p) for p in prompts)
        ids = torch.full((B, L), self.pad_id, dtype=torch.long)
        mask = torch.zeros((B, L), dtype=torch.long)
        for b, p in enumerate(prompts):
            ids[b, L - len(p):] = torch.tensor(p)
            mask[b, L - len(p):] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, L): real tokens count from 0 after the padding
        limits = [min(sampling.max_new_tokens, self.max_model_len - len(p)) for p in prompts]
        stops = torch.tensor(sampling.stop_token_ids or [-1], device=dev)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
        tokens, logps = [], []
        finished = torch.zeros(B, dtype=torch.bool, device=dev)
        reached = torch.tensor(limits, device=dev)  # step at which each row is out of room
        for step in range(max(limits)):
            tok, lp = sample_next(out.logits[:, -1].float(), sampling.temperature, sampling.top_p, gen)
            tok = tok.masked_fill(finished, self.pad_id)  # finished rows feed padding (cut below)
            tokens.append(tok)
            logps.append(lp)
            finished |= torch.isin(tok, stops) | (reached <= step + 1)
            if bool(finished.all()):  # host sync, once a step: stop when every row is done
                break
            mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=dev)], dim=-1)
            pos = pos[:, -1:] + 1
            out = self.model(input_ids=tok[:, None], attention_mask=mask, position_ids=pos,
                             past_key_values=out.past_key_values, use_cache=True)
        del out  # the KV cache
        return [_cut(t, lp, limit, set(sampling.stop_token_ids))
                for t, lp, limit in zip(torch.stack(tokens, 1).tolist(), torch.stack(logps, 1).tolist(), limits)]

    # --- weights ---
    def _load(self, buckets: Iterator[list[tuple[str, torch.Tensor]]]) -> dict[str, float]:
        self._loaded = set()
        for bucket in buckets:
            self._load_bucket(bucket)
        missing = [n for n, t in self._targets.items() if id(t) not in self._loaded]
        if missing:  # a part-synced engine would mix two policies (or keep sleep(2)'s empty memory)
            raise ValueError(f"sync_weights left {len(missing)} of the hf engine's weights unset "
                             f"(first: {', '.join(missing[:3])}): the trainer's model is not the engine's")
        self._weights_dropped = False
        return {}

    def _load_bucket(self, named: list[tuple[str, torch.Tensor]]) -> None:
        for name, t in named:
            target = self._targets.get(name)
            if target is None:
                raise ValueError(f"sync_weights sent {name!r}, which the hf engine's model does not have")
            if tuple(t.shape) != tuple(target.shape):
                raise ValueError(f"sync_weights sent {name!r} of shape {tuple(t.shape)}, the hf engine's is "
                                 f"{tuple(target.shape)}")
            with torch.no_grad():
                target.copy_(t)  # copy: the bucket is a view into a buffer that is refilled next
            self._loaded.add(id(target))

    # --- memory ---
    def _sleep(self, level: int) -> None:
        cuda = self.device.type == "cuda"
        if level == 1 and not cuda:
            return  # CPU: the weights already live in host memory, and there is no cache to free
        for p in self._params:  # .data: the Parameter objects (and so ties and _targets) stay the same
            p.data = torch.empty(0, dtype=p.dtype, device=p.device) if level == 2 else _to_host(p.data)
        if level == 2:
            self._weights_dropped = True
        if cuda:
            for b in self.model.buffers():  # rotary tables and the like (small; not synced, so kept)
                b.data = _to_host(b.data)
            torch.cuda.empty_cache()

    def _wake(self, level: int) -> None:
        for p, shape in zip(self._params, self._shapes):
            p.data = torch.empty(shape, dtype=p.dtype, device=self.device) if level == 2 else p.data.to(self.device)
        for b in self.model.buffers():
            b.data = b.data.to(self.device)

    def close(self) -> None:
        self.model = None
        self._targets, self._params = {}, []
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        super().close()


# ---------------------------------------------------------------- helpers

def _named_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and persistent buffer under every name it has (a tied head answers to
    lm_head.weight and model.embed_tokens.weight alike): what iter_weights may send."""
    named: dict[str, torch.Tensor] = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        prefix = f"{mod_name}." if mod_name else ""
        skip = set(getattr(mod, "_non_persistent_buffers_set", ()))
        for name, t in list(mod._parameters.items()) + [(n, b) for n, b in mod._buffers.items() if n not in skip]:
            if t is not None:
                named[prefix + name] = t
    return named


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """A host copy of t; pinned when t is on CUDA (fast copies back on wake)."""
    if t.device.type != "cuda":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t)
    return host


def _cut(tokens: list[int], logps: list[float], limit: int, stops: set[int]) -> Completion:
    """A row of the decode loop -> its Completion: up to and including the first stop token
    (finish "stop"), else its first `limit` tokens (finish "length")."""
    for k, t in enumerate(tokens[:limit]):
        if t in stops:
            return Completion(tokens[:k + 1], logps[:k + 1], "stop")
    return Completion(tokens[:limit], logps[:limit], "length")
