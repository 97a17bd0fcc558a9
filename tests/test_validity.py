"""The held-out validity measurement: states from eval-purpose expert episodes, turns judged by the real
Env + Pool from each state's snapshot. The expert's own turns are valid; garbage is not; a real (tiny)
model's sampled turns go through the whole path."""

from __future__ import annotations

from dataclasses import replace

import pytest

from fastagent.config import smoke
from fastagent.expert.generate import generate_expert_data, store_of
from fastagent.model import load_model
from fastagent.sandbox import Pool
from fastagent.validity import judge_turns, measure_validity, pick_states


@pytest.fixture(scope="module")
def states_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("validity")
    cfg = replace(smoke(), eval_tasks="gunpoint,seattle-weather", max_episode_steps=8, history_k=1,
                  num_diverse_ideas=3)
    return cfg, generate_expert_data(cfg, root / "states" / "heldout.traj", episodes=2, purpose="eval")


def test_states_are_heldout_and_marked_eval(states_file):
    cfg, path = states_file
    states = pick_states(path, 6, seed=0)
    assert len(states) == 6 and {r.task for r, _ in states} == {"gunpoint", "seattle-weather"}
    assert all(r.meta["purpose"] == "eval" for r, _ in states)
    assert pick_states(path, 6, seed=0) == states  # the same states for a before/after comparison


def test_expert_turns_are_valid_and_garbage_is_not(states_file, tmp_path):
    cfg, path = states_file
    states = pick_states(path, 8, seed=1)
    with Pool(workers=2, hide=[tmp_path, path.parent]) as pool:
        own = judge_turns(states, [[r.response] for r, _ in states], pool, tmp_path / "env", cfg, store_of(path))
        bad = judge_turns(states, [["I think we should try a random forest."]] * len(states), pool,
                          tmp_path / "env", cfg, store_of(path))
    assert own["valid_rate"] == 1.0 and own["samples"] == 8
    # replaying each expert step from its own start state reproduces its reward kind (failures included)
    assert own["reward_kinds"] == dict(__import__("collections").Counter(r.reward_parts["kind"] for r, _ in states))
    assert bad["valid_rate"] == 0.0 and bad["execute_rate"] == 0.0 and bad["reward_kinds"] == {"format_error": 8}


def test_tiny_model_end_to_end(states_file, tmp_path):
    cfg, path = states_file
    cfg = replace(cfg, max_new_tokens=16, max_seq_len=4096)
    model, tok = load_model("tiny-random")
    states = pick_states(path, 2, seed=0)
    with Pool(workers=1, hide=[tmp_path, path.parent]) as pool:
        res = measure_validity(model, tok, states, pool, tmp_path / "env", cfg, store_of(path), samples=2)
    assert res["engine"] == "hf" and res["samples"] == 4 and res["new_tokens"] > 0
    assert res["valid_rate"] == 0.0 and res["reward_kinds"] == {"format_error": 4}  # a random model writes no action
