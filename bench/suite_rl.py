"""S1: collecting one RL batch episode-wise over step-wise, and step-wise samples fully processed per hour.

    python bench/throughput.py --suite rl                                  # SmolLM2 (or --model=run/sft/model)
    python bench/throughput.py --suite rl --quick --model=tiny-random      # smoke

Same model, engine (the RL loop's), B and machine, in one run:
  step-wise:    B states drawn from scripted-expert trajectories (fastagent.states), one action each from
                the engine, executed concurrently from their snapshots (`step_many`);
  episode-wise: B episodes from the task's start, up to L = max_episode_steps turns each: every turn the
                engine writes the next action of every live episode (their prompts grow with the history
                window), all executed concurrently, until each episode ends (Final Answer) or hits L.
S1_ratio = episode-wise wall seconds / step-wise wall seconds (target >= 10; the paper reports ~24x in
GPU-hours). rl_samples_per_hour: one full step-wise iteration of the cpu preset's shape (B states x K
samples: generate, execute, score, group advantages, one PPO update through the fused loss, weight sync)
timed phase by phase, samples / its wall time. P1_ratio: that update's forward + backward with each
state's K samples in their own padded rows over the prompt shared through its KV cache (the loop's
default: the prompt once per state, the completions on its cache); P1_mask_ratio: over one masked row per
state (share_prefix=mask); on the same samples.
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path


def run(args) -> dict:
    import torch

    from fastagent.chat import stop_token_ids, tokenize_chat
    from fastagent.config import cpu
    from fastagent.env import Env, step_many
    from fastagent.expert.generate import generate_expert_data
    from fastagent.kernels import group_advantages
    from fastagent.model import load_model, resolve_model
    from fastagent.rl import micro_batches, ppo_micro_step, share_mode
    from fastagent.rollout import Sampling, WeightVersion, make_engine, sync_weights
    from fastagent.sandbox import Pool
    from fastagent.states import StateSampler, StatesPool
    from fastagent.tasks import get_task, hide_paths, list_tasks
    from fastagent.train import make_optimizer
    from fastagent.workspace import Store

    cfg = cpu()
    if args.quick:
        cfg = replace(cfg, max_episode_steps=3, max_new_tokens=32, states_per_step=2, samples_per_state=2)
    name = args.model or cfg.model
    model_dir = resolve_model(name)
    B, K = cfg.states_per_step, cfg.samples_per_state  # episodes end at cfg.max_episode_steps (the Env)
    tmp = Path(tempfile.mkdtemp(prefix="bench-rl-"))
    tasks = list_tasks(cfg.train_tasks)[:B]
    traj = generate_expert_data(replace(cfg, num_diverse_ideas=3), tmp / "expert" / "expert.traj", episodes=B,
                                tasks=",".join(t.name for t in tasks))
    model, tok = load_model(model_dir)
    states = StateSampler(StatesPool.build([traj], tok, set(), cfg.max_seq_len - cfg.max_new_tokens), seed=0)
    stops = tuple(stop_token_ids(tok))
    one = Sampling(n=1, temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, stop_token_ids=stops)
    engine = make_engine(cfg.engine, model_dir, max_model_len=cfg.max_seq_len, seed=0)
    root = tmp / "env"
    out: dict = {}
    with Pool(workers=cfg.workers, hide=[tmp, *hide_paths(tasks)]) as pool:
        def env_for(task_name: str, store: str | None = None) -> Env:
            return Env(get_task(task_name), pool, root, seed=cfg.seed, cfg=cfg,
                       store=Store(store) if store else None)
        # ---- step-wise: B single steps from expert states
        batch = states.next(B)
        envs = [env_for(s.task, s.store) for s in batch]
        engine.generate([batch[0].prompt_ids], Sampling(max_new_tokens=4))  # warm-up, outside the timing
        t0 = time.perf_counter()
        comps = engine.generate([s.prompt_ids for s in batch], one)
        for env, s in zip(envs, batch):
            env.reset(state=s.env_state)
        step_many(envs, [tok.decode(c[0].token_ids, skip_special_tokens=True) for c in comps])
        step_s = time.perf_counter() - t0
        print(f"[rl-bench] step-wise: {B} steps in {step_s:.1f}s", file=sys.stderr, flush=True)

        # ---- episode-wise: B episodes of up to L turns from each task's start
        envs = [env_for(t.name) for t in tasks]
        t0 = time.perf_counter()
        for env in envs:
            env.reset()
        live, turns = list(range(len(envs))), 0
        while live:
            prompts = [tokenize_chat(tok, envs[i].messages(), add_generation_prompt=True)[0]
                       [-(cfg.max_seq_len - cfg.max_new_tokens):] for i in live]
            comps = engine.generate(prompts, one)
            res = step_many([envs[i] for i in live], [tok.decode(c[0].token_ids, skip_special_tokens=True)
                                                       for c in comps])
            turns += len(live)
            live = [i for i, (_, _, done, _) in zip(live, res) if not done]
        episode_s = time.perf_counter() - t0
        print(f"[rl-bench] episode-wise: {B} episodes, {turns} turns in {episode_s:.1f}s", file=sys.stderr, flush=True)
        out.update(S1_step_wise_s=round(step_s, 2), S1_episode_wise_s=round(episode_s, 2), S1_turns=turns,
                   S1_ratio=round(episode_s / step_s, 2))

        # ---- one full step-wise iteration: B states x K samples, generate -> ... -> sync
        model.train()
        optimizer = make_optimizer(model, cfg.rl_lr, 0.0)
        version = WeightVersion()
        sync_weights(engine, model, version)
        phases: dict[str, float] = {}
        t_all = time.perf_counter()
        t0 = time.perf_counter()
        batch = states.next(B)
        comps = engine.generate([s.prompt_ids for s in batch], replace(one, n=K), version)
        phases["generate_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        samples = [(s, c) for s, cs in zip(batch, comps) for c in cs]
        envs = [env_for(s.task, s.store) for s, _ in samples]
        for env, (s, _) in zip(envs, samples):
            env.reset(state=s.env_state)
        res = step_many(envs, [tok.decode(c.token_ids, skip_special_tokens=True) for _, c in samples])
        phases["execute_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        adv = group_advantages(torch.tensor([r[1] for r in res]), group_size=K)
        seqs = [(s.prompt_ids, c.token_ids, c.logprobs, float(a)) for (s, c), a in zip(samples, adv) if c.token_ids]
        n_tok = sum(len(x[1]) for x in seqs)

        def update(share: bool | str) -> float:  # forward + backward of the whole batch, as the loop cuts it
            t = time.perf_counter()
            micro = max(cfg.micro_batch_size // K, 1) if share else cfg.micro_batch_size  # as the loop cuts it
            for chunk, _ in micro_batches(seqs, micro, None, share):
                ppo_micro_step(model, None, chunk, 1.0 / max(n_tok, 1), cfg, tok.pad_token_id or 0,
                               torch.device("cpu"), share)
            return time.perf_counter() - t
        update(share_mode(model, cfg.share_prefix))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        phases["update_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        version.advance()
        sync_weights(engine, model, version)
        phases["sync_s"] = time.perf_counter() - t0
        wall = time.perf_counter() - t_all
        for env in envs:
            env.close()
    engine.close()
    # ---- P1: the same update with each state's K samples in separate padded rows, one masked row, on the KV cache
    separate, masked, kv = update(False), update(True), update("kv")
    optimizer.zero_grad(set_to_none=True)
    out.update(P1_update_separate_s=round(separate, 2), P1_update_mask_s=round(masked, 2),
               P1_update_kv_s=round(kv, 2), P1_ratio=round(separate / kv, 2), P1_mask_ratio=round(separate / masked, 2))
    out.update(rl_samples_per_hour=round(len(samples) * 3600 / wall, 1), rl_iteration_s=round(wall, 1),
               rl_batch=f"{B}x{K}", rl_new_tokens=n_tok, **{f"rl_{k}": round(v, 2) for k, v in phases.items()})
    return out
