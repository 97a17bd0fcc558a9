"""The two ways RL collects its samples (generate -> execute), each returning the turns the update trains
on and the seconds spent in each phase:

  step_rollout     step-wise (the paper's method): K actions from each expert state, each executed from
                   the state's snapshot, all at once on the pool;
  episode_rollout  episode-wise (the paper's comparison): K whole episodes from the start of each drawn
                   state's task, one engine call and one pool round per turn.
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

from fastagent.config import Config
from fastagent.log import print0


class Turn(NamedTuple):
    """One sampled action and what it did: the unit the update trains on."""
    prompt_ids: list[int]
    completion: Any  # rollout.Completion: token ids + the engine's log-probs
    result: tuple | None  # Env.step's (observation, reward, done, info); None: failed on the trusted side
    before: dict[str, Any]  # the episode state it acted from (EnvState dict)
    task: str
    episode: int  # index of its episode in this batch (step-wise: one per action); the group is episode // K


def sampling(cfg: Config, tokenizer, n: int, seed: int):
    """The engine's sampling settings for RL: n samples per prompt, the run's temperature, top-p and
    token cap, stopping at the chat template's end-of-turn tokens."""
    from fastagent.chat import stop_token_ids
    from fastagent.rollout import Sampling
    return Sampling(n=n, temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                    stop_token_ids=tuple(stop_token_ids(tokenizer)), seed=seed)


def execute(envs: list, texts: list[str], where: str) -> list[tuple | None]:
    """Each env steps with its action text, all at once on the pool. A failure on the trusted side is not
    the agent's fault: its result is None (left out of the update) and the line says where it happened."""
    from fastagent.env import StepError, step_many
    try:
        return step_many(envs, texts)
    except StepError as e:
        print0(f"[rl] {where}: {e}")
        return e.results


def step_rollout(starts: list, K: int, engine, version, tokenizer, env_for, cfg: Config,
                 step: int) -> tuple[list[Turn], dict[str, float]]:
    """Step-wise: K actions from each expert state (generate), each executed from the state's snapshot,
    all at once on the pool (execute)."""
    times = {}
    t0 = time.perf_counter()
    outs = engine.generate([s.prompt_ids for s in starts], sampling(cfg, tokenizer, K, cfg.seed + step), version)
    samples = [(s, c) for s, o in zip(starts, outs) for c in o]
    times["generate_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    envs = [env_for(s.task, j, s.store) for j, (s, _) in enumerate(samples)]
    for env, (s, _) in zip(envs, samples):
        env.reset(state=s.env_state)
    results = execute(envs, [tokenizer.decode(c.token_ids, skip_special_tokens=True) for _, c in samples],
                      f"step {step + 1}")
    times["execute_s"] = time.perf_counter() - t0
    turns = [Turn(s.prompt_ids, c, r, s.env_state, s.task, j) for j, ((s, c), r) in enumerate(zip(samples, results))]
    return turns, times


def episode_rollout(starts: list, K: int, engine, version, tokenizer, env_for, cfg: Config,
                    step: int) -> tuple[list[Turn], dict[str, float]]:
    """Episode-wise (the paper's comparison): K episodes from the start of each drawn state's task, up to
    max_episode_steps turns each; every turn the engine writes the next action of every live episode in
    one call (generate) and all run at once on the pool (execute), until each ends (Final Answer, the
    step limit, a prompt over max_seq_len - max_new_tokens, or a trusted-side failure). Turns come back
    grouped by episode, in order."""
    from fastagent.chat import tokenize_chat
    times = {"generate_s": 0.0, "execute_s": 0.0}
    eps = [(s.task, j) for j, s in enumerate(x for x in starts for _ in range(K))]
    envs = [env_for(task, j, None) for task, j in eps]
    for env in envs:
        env.reset()
    by_ep: list[list[Turn]] = [[] for _ in eps]
    live, limit = list(range(len(eps))), cfg.max_seq_len - cfg.max_new_tokens
    for turn in range(cfg.max_episode_steps):
        prompts = {i: tokenize_chat(tokenizer, envs[i].messages(), add_generation_prompt=True)[0] for i in live}
        live = [i for i in live if len(prompts[i]) <= limit]
        if not live:
            break
        t0 = time.perf_counter()
        outs = engine.generate([prompts[i] for i in live],
                               sampling(cfg, tokenizer, 1, (cfg.seed + step) * 1000 + turn), version)
        times["generate_s"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        before = [envs[i].state().to_dict() for i in live]
        results = execute([envs[i] for i in live],
                          [tokenizer.decode(o[0].token_ids, skip_special_tokens=True) for o in outs],
                          f"step {step + 1}, turn {turn + 1}")  # that episode ends there, its turn left out
        times["execute_s"] += time.perf_counter() - t0
        for i, o, r, b in zip(live, outs, results, before):
            by_ep[i].append(Turn(prompts[i], o[0], r, b, eps[i][0], i))
        live = [i for i, r in zip(live, results) if r is not None and not r[2]]
    return [t for turns in by_ep for t in turns], times
