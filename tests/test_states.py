"""The RL states pool: every expert step as a restartable state (prompt ids the env would render, the
start snapshot), held-out tasks refused, task-weighted sampling whose checkpoint resumes exactly."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pytest

from fastagent.chat import tokenize_chat
from fastagent.config import smoke
from fastagent.data import read_records
from fastagent.env import Env
from fastagent.expert.generate import generate_expert_data, store_of
from fastagent.model import build_tiny_random, load_tokenizer
from fastagent.sandbox import Pool
from fastagent.states import StateSampler, StatesPool
from fastagent.tasks import get_task
from fastagent.workspace import Store


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("states")
    cfg = replace(smoke(), train_tasks="car-mpg,digits", max_episode_steps=8, history_k=1, num_diverse_ideas=3)
    path = generate_expert_data(cfg, root / "expert" / "expert.traj", episodes=2)
    tok = load_tokenizer(build_tiny_random(root / "tiny"))
    return cfg, path, tok, root


def test_every_step_is_a_state_with_the_prompt_the_env_renders(made):
    cfg, path, tok, root = made
    pool = StatesPool.build([path], tok, heldout=set(), max_prompt_tokens=100_000)
    assert len(pool) == len(read_records(path)) and pool.dropped == 0 and set(pool.by_task) == {"car-mpg", "digits"}
    with Pool(workers=1, hide=[root]) as sandbox:
        envs = {}
        for s in pool.states[::3]:
            if s.task not in envs:
                envs[s.task] = Env(get_task(s.task), sandbox, root / "env", seed=cfg.seed, cfg=cfg,
                                   store=Store(s.store))
            env = envs[s.task]
            env.reset(state=s.env_state)
            assert tokenize_chat(tok, env.messages(), add_generation_prompt=True)[0] == s.prompt_ids
            assert s.store == str(store_of(path)) and s.snapshot == s.env_state["snapshot"]
        for env in envs.values():
            env.close()
    short = StatesPool.build([path], tok, heldout=set(), max_prompt_tokens=min(len(s.prompt_ids) for s in pool.states))
    assert short.dropped > 0 and len(short) + short.dropped == len(pool)
    pool.save(root / "states.pt")
    again = StatesPool.load(root / "states.pt")
    assert [s.__dict__ for s in again.states] == [s.__dict__ for s in pool.states]


def test_heldout_tasks_are_refused(made):
    _, path, tok, _ = made
    with pytest.raises(ValueError, match="held-out task 'digits'"):
        StatesPool.build([path], tok, heldout={"digits"}, max_prompt_tokens=100_000)


def test_sampler_weights_and_exact_resume(made):
    _, path, tok, _ = made
    pool = StatesPool.build([path], tok, heldout=set(), max_prompt_tokens=100_000)
    a = StateSampler(pool, seed=3)
    first = a.next(7)
    ckpt = a.state_dict()
    rest = a.next(9)
    b = StateSampler(pool, seed=3)
    b.load_state_dict(ckpt)
    assert [(s.episode, s.step) for s in b.next(9)] == [(s.episode, s.step) for s in rest]
    assert [(s.episode, s.step) for s in StateSampler(pool, seed=3).next(7)] == [(s.episode, s.step) for s in first]
    counts = Counter(s.task for s in StateSampler(pool, seed=0).next(2000))
    assert abs(counts["digits"] / 2000 - 0.5) < 0.05  # uniform over tasks whatever their step counts
    only = Counter(s.task for s in StateSampler(pool, seed=0, weights={"car-mpg": 1.0}).next(50))
    assert set(only) == {"car-mpg"}
    with pytest.raises(ValueError, match="not in the pool"):
        StateSampler(pool, weights={"gunpoint": 1.0})
    with pytest.raises(ValueError, match="seed"):
        StateSampler(pool, seed=4).load_state_dict(ckpt)


def test_a_pool_whose_store_moved_says_to_rebuild(tmp_path):
    """states.pt keeps each state's snapshot store path: after the expert data moves, loading it fails
    with what to do instead of the first RL step failing on a missing snapshot."""
    import pytest

    from fastagent.states import State, StatesPool
    store = tmp_path / "store"
    (store / "snapshots").mkdir(parents=True)
    state = State(task="digits", episode="e", step=0, prompt_ids=[1, 2], env_state={"snapshot": "a" * 64},
                  store=str(store), metric=0.5)
    StatesPool([state], 0).save(tmp_path / "states.pt")
    assert len(StatesPool.load(tmp_path / "states.pt")) == 1
    store.rename(tmp_path / "moved")
    with pytest.raises(ValueError, match="delete .*states.pt and rerun"):
        StatesPool.load(tmp_path / "states.pt")
