"""torch.distributed set-up and teardown, rank helpers (gloo on CPU, nccl on CUDA), FSDP2 sharding.

Works with and without torchrun: without RANK/WORLD_SIZE in the environment it is a single process
and no process group is created.

    info = dist.init("auto")      # DistInfo(rank, world, local_rank, device)
    ...
    dist.teardown()
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist


@dataclass(frozen=True)
class DistInfo:
    rank: int  # global rank
    world: int  # number of processes
    local_rank: int  # rank on this machine (picks the GPU)
    device: torch.device  # where this rank's model lives

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(device: str = "auto") -> DistInfo:
    """Create the process group when launched by torchrun (world > 1), pick this rank's device."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device=cuda but no CUDA GPU is visible; use --device=cpu or --device=auto")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
        # torchrun exports OMP_NUM_THREADS=1; give each rank its share of the cores instead
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if world > 1 and not tdist.is_initialized():
        tdist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
    return DistInfo(rank, world, local_rank, dev)


def barrier() -> None:
    if tdist.is_initialized():
        tdist.barrier()


def teardown() -> None:
    """Every rank waits for the others, then the group goes: a rank that destroyed its gloo group
    while a peer was still working aborted once in CI ("terminate called without an active
    exception", SIGABRT in the 2-rank FSDP2 test)."""
    if tdist.is_initialized():
        tdist.barrier()
        tdist.destroy_process_group()


# ---------------------------------------------------------------- FSDP2 sharding

def shard_model(model: torch.nn.Module, bf16_compute: bool = False) -> torch.nn.Module:
    """Shard a Hugging Face decoder with FSDP2 (`fully_shard`): each decoder layer is one unit (its
    parameters are gathered just before it runs, freed after), then the root (embeddings, norm, head:
    tied weights must live in one unit). A no-op without a process group. On CPU this runs over gloo.
    bf16_compute: parameters gathered in bf16 for compute, gradients reduced in fp32."""
    if not tdist.is_initialized() or tdist.get_world_size() == 1:
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16_compute else None
    kwargs = {"mp_policy": mp} if mp else {}
    layers = getattr(getattr(model, "model", model), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no .model.layers: shard_model expects a HF decoder")
    for layer in layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's parameters as plain CPU tensors, gathered from every rank (call on all
    ranks; every rank gets the full dict). For a model that is not sharded, a detached CPU copy."""
    if not tdist.is_initialized() or tdist.get_world_size() == 1:
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
