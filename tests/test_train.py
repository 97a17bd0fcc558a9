"""The main job end to end, launched the way users launch it: torchrun fastagent/train.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


def run_main(tmp_path: Path, nproc: int, *flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = TORCHRUN + [f"--nproc_per_node={nproc}", "fastagent/train.py", f"--run_dir={tmp_path / 'run'}", *flags]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def test_smoke_preset_on_two_ranks(tmp_path):
    out = run_main(tmp_path, 2, "--preset=smoke")
    assert "[setup] 2 rank(s) on cpu" in out.stdout and "[probe]" in out.stdout
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["probe_tokens"] > 0
    rl = [r for r in rows if "rl_reward_mean" in r]  # step-wise RL on 2 ranks, one vLLM engine per rank
    assert [r["step"] for r in rl] == [1, 2] and all(r["rl_logp_gap"] < 1e-4 for r in rl)
    # the random model cannot write an action: the environment says so and the reward module gives -1
    assert rows[0]["probe_reward"] == -1.0 and "(format_error)" in out.stdout
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model"] == "tiny-random"


@pytest.mark.slow
def test_default_main_job(tmp_path):
    """The README's main command on its default (SmolLM2-135M-Instruct, CPU): model, probe, the expert
    data (10 real episodes), then SFT cut to 2 optimizer steps (the full default stage takes ~20 min,
    too long for CI) and the saved model, then one step-wise RL step (2 states x 2 samples, vLLM) from it,
    then the evaluation of base, SFT and RL cut to one held-out task and 2 turns (the default plays all 11);
    a rerun of --stage=eval reuses every finished episode."""
    cut = ("--sft_max_steps=2", "--rl_steps=1", "--states_per_step=2", "--samples_per_state=2", "--max_new_tokens=96",
           "--eval_tasks=seattle-weather", "--eval_max_steps=2")
    out = run_main(tmp_path, 1, *cut)
    assert "[expert] 10 episodes" in out.stdout
    assert (tmp_path / "run" / "sft" / "model" / "config.json").exists()
    assert "[rl] step 1: reward" in out.stdout and f"start weights {tmp_path / 'run' / 'sft' / 'model'}" in out.stdout
    assert (tmp_path / "run" / "rl" / "model" / "config.json").exists()
    assert "smollm2-135m-instruct" in out.stdout and "[probe] task anes-vote" in out.stdout
    assert "--- observation ---" in out.stdout
    table = (tmp_path / "run" / "eval" / "table.md").read_text()
    assert "seattle-weather" in table and all(f"| {a} |" in table for a in ("base", "sft", "rl"))
    done = next(line for line in out.stdout.splitlines() if line.startswith("[done]"))  # where everything is
    assert all(str(tmp_path / "run" / p) in done for p in ("sft/model", "rl/model", "eval/table.md", "metrics.jsonl"))
    again = run_main(tmp_path, 1, *cut, "--stage=eval")
    assert "[probe]" not in again.stdout and "already in" in again.stdout + again.stderr
