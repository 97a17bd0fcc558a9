"""FSDP2 on CPU (gloo, 2 ranks under torchrun): one sharded optimizer step equals the same step taken
unsharded in one process on the whole batch (SGD, so the comparison is of the gradients themselves:
Adam's first step divides near-zero gradients by their own size and amplifies float noise)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

STEP = textwrap.dedent("""
    import sys, torch
    from fastagent import dist
    from fastagent.model import load_model
    out = sys.argv[1]
    info = dist.init("cpu")
    torch.manual_seed(0)
    model, tok = load_model("tiny-random")
    ids = torch.randint(3, 1000, (4, 24), generator=torch.Generator().manual_seed(1))
    if info.world > 1:       # each rank takes its half of the batch; FSDP averages the gradients
        ids = ids.chunk(info.world)[info.rank]
    model = dist.shard_model(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)  # linear in the gradient: compares grads exactly
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    state = dist.full_state_dict(model)
    if info.is_main:
        torch.save(state, out)
    dist.teardown()
""")


def run(tmp_path: Path, nproc: int) -> dict:
    out = tmp_path / f"state{nproc}.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "--no-python", sys.executable, "-c", STEP, str(out)]
    res = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return torch.load(out)


def test_fsdp2_step_matches_single_process(tmp_path):
    single, sharded = run(tmp_path, 1), run(tmp_path, 2)
    assert single.keys() == sharded.keys() and len(single) > 10
    from fastagent.model import load_model
    before = load_model("tiny-random")[0].state_dict()
    assert max((single[k] - before[k]).abs().max().item() for k in single) > 1e-3, "the step changed nothing"
    for name, value in single.items():
        assert type(sharded[name]) is torch.Tensor, f"{name} came back as {type(sharded[name]).__name__}"
        torch.testing.assert_close(sharded[name], value, atol=1e-6, rtol=1e-5)
