"""Step-wise RL pieces on the tiny model: the PPO micro-step moves the policy the way the advantage
says (and not at all for a zero advantage), and the positions it trains are exactly the completion's."""

from __future__ import annotations

from dataclasses import replace

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
