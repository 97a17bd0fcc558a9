"""Checkpoints for exact resume: model, optimizer, RNG states (per rank) and the data cursor.

    path = ckpt.save(ckpt_dir, step, model, optimizer, meta={"epoch": 0, "step_in_epoch": 4, ...})
    found = ckpt.latest(ckpt_dir)                     # newest complete checkpoint folder, or None
    meta = ckpt.load(found, model, optimizer)         # restores everything, returns meta

Layout: ckpt_dir/step_000004/ holds the model and optimizer state written with
torch.distributed.checkpoint (every rank writes its own FSDP2 shards in parallel: `__<rank>_0.distcp`
plus `.metadata`), `rng_<rank>.pt` (python, numpy, torch and CUDA generator states of that rank)
and `meta.json` (step, data cursor, whatever the trainer passes; written last). All of it is
written into `.tmp-step_000004` and renamed into place by rank 0 after every rank has finished, so
a process killed mid-save (SIGKILL included) leaves a temp folder that the next start deletes, and
the previous checkpoint stays the latest valid one. `keep` old checkpoints survive each save. A save
that would not fit the free disk space raises DiskFullError before writing anything.

Call save/load on every rank (they are collective). The state dicts come from
get_state_dict/set_state_dict (torch.distributed.checkpoint.state_dict), which work on FSDP2
DTensors and on plain modules alike; without a process group everything runs in one process.
The learning-rate schedule is a pure function of the step (fastagent/train.py), so the step in
meta.json is its whole state. A world size other than the checkpoint's still loads (DCP reshards);
the ranks without their own RNG file then keep their fresh seeds, and the run says so.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as tdist

_STEP = re.compile(r"^step_(\d{6,})$")


def _rank() -> int:
    return tdist.get_rank() if tdist.is_initialized() else 0


def _barrier() -> None:
    if tdist.is_initialized():
        tdist.barrier()


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _checkpoints(ckpt_dir: Path) -> list[Path]:
    """The complete checkpoints in ckpt_dir (`step_N` folders with their meta.json), oldest first."""
    found = []
    for p in ckpt_dir.glob("step_*"):
        m = _STEP.match(p.name)
        if m and (p / "meta.json").is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest(ckpt_dir: str | Path) -> Path | None:
    """The newest complete checkpoint in ckpt_dir, or None."""
    found = _checkpoints(Path(ckpt_dir))
    return found[-1] if found else None


def clean(ckpt_dir: str | Path) -> None:
    """Delete temp folders left by a save that was killed (call on rank 0 before training starts)."""
    for tmp in Path(ckpt_dir).glob(".tmp-step_*"):
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _one_process_ok() -> Iterator[None]:
    """DCP warns on every save/load without a process group; one process is a supported case here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


class DiskFullError(OSError):
    """Not enough free disk space for a checkpoint or a model folder: says how much is needed and what to do."""


def state_bytes(*modules_or_optimizers: Any) -> int:
    """Bytes of every tensor in these modules' state dicts (tied weights count once per key, as they are
    written) and these optimizers' states, at their global size (a sharded DTensor counts whole): the
    same number on every rank."""
    total = 0
    for obj in modules_or_optimizers:
        if isinstance(obj, torch.optim.Optimizer):
            tensors = [t for st in obj.state.values() for t in st.values() if isinstance(t, torch.Tensor)]
        else:
            tensors = list(obj.state_dict().values())
        total += sum(t.numel() * t.element_size() for t in tensors)
    return total


def ensure_space(folder: str | Path, need: int, what: str, after: str = "") -> None:
    """Raise DiskFullError on every rank (collective) when the disk holding `folder` has less than `need`
    bytes (plus 2% and 64 MiB) free on any rank: a clear message before a write that would fail halfway
    (torch's own error on a full disk is 'unexpected pos N vs M')."""
    probe = Path(folder).absolute()
    while not probe.exists():  # the nearest existing folder is on the same disk
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if tdist.is_initialized():
        frees: list[Any] = [None] * tdist.get_world_size()
        tdist.all_gather_object(frees, free)
        free = min(frees)
    if free < need * 1.02 + 64 * 2**20:
        raise DiskFullError(f"not enough disk space for {what}: it needs ~{need / 2**30:.2f} GiB in {folder}, "
                            f"{free / 2**30:.2f} GiB is free. Free some space (old run dirs, pip and "
                            f"pytest caches in /tmp) and rerun the same command{after}")


def _states(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model_sd, optim_sd = get_state_dict(model, optimizer)  # sharded (DTensor) under FSDP2
    return {"model": model_sd, "optim": optim_sd}


def save(ckpt_dir: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         meta: dict[str, Any], keep: int = 1) -> Path:
    """Write checkpoint `step` atomically (collective: every rank calls it); keep the `keep`
    previous checkpoints, delete older ones. Returns the checkpoint folder."""
    import torch.distributed.checkpoint as dcp

    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / f"step_{step:06d}"
    tmp = ckpt_dir / f".tmp-{final.name}"
    last = latest(ckpt_dir)
    ensure_space(ckpt_dir, state_bytes(model, optimizer), f"checkpoint {final.name}",
                 f": it resumes from {last}" if last else ": it starts this stage over")
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    with _one_process_ok():
        dcp.save(_states(model, optimizer), checkpoint_id=str(tmp), no_dist=not tdist.is_initialized())
    torch.save(rng_state(), tmp / f"rng_{_rank()}.pt")
    _barrier()  # every rank's shards and RNG file are on disk
    if _rank() == 0:
        world = tdist.get_world_size() if tdist.is_initialized() else 1
        (tmp / "meta.json").write_text(json.dumps({"step": step, "world": world, **meta}, indent=1))
        if final.exists():  # a checkpoint of the same step (a rerun after a crash): replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        older = [p for p in _checkpoints(ckpt_dir) if p != final]
        for old in older[: max(0, len(older) - keep)]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore model, optimizer and this rank's RNG state from checkpoint folder `path` (collective);
    return its meta.json."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    path = Path(path)
    meta = json.loads((path / "meta.json").read_text())
    states = _states(model, optimizer)  # the structure to load into (each rank's own shards)
    with _one_process_ok():
        dcp.load(states, checkpoint_id=str(path), no_dist=not tdist.is_initialized())
    set_state_dict(model, optimizer, model_state_dict=states["model"], optim_state_dict=states["optim"])
    rng = path / f"rng_{_rank()}.pt"
    if rng.is_file():
        set_rng_state(torch.load(rng, weights_only=False))
    else:
        warnings.warn(f"{path} has no RNG state for rank {_rank()} (saved with world size "
                      f"{meta.get('world')}): this rank keeps its fresh seed", stacklevel=2)
    return meta
