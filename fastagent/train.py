"""The torchrun entry point: one lean loop per stage, read top to bottom.

Run (CPU, the default: SmolLM2-135M-Instruct on the bundled tasks):
    torchrun --standalone --nproc_per_node=1 fastagent/train.py
    torchrun --standalone --nproc_per_node=1 fastagent/train.py --preset=smoke --stage=sft
    torchrun --standalone --nproc_per_node=8 fastagent/train.py --preset=qwen2.5-7b     # GPUs
Every Config field is a `--field=value` flag (fastagent/config.py); `--config=run.toml` reads a file.

Stages, in order: model (obtain, convert and check the base model) -> probe (one real agent step:
the policy writes a turn on the first training task, the environment executes it in the sandbox
pool, the reward module scores it) -> sft (exploration-enriched fine-tuning, below) -> rl (step-wise PPO
from the SFT model: fastagent/rl.py) -> eval (full episodes of the base, SFT and RL models on the held-out
tasks, the paper's Table 1: fastagent/eval.py, into run_dir/eval). `--stage=eval` runs the evaluation alone.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import time
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # torchrun runs this file as a script: put the repository root, not fastagent/, on sys.path so
    # sibling modules never shadow installed packages.
    sys.path[0] = str(Path(__file__).resolve().parents[1])
if __name__ == "__main__":
    # Idle OpenMP threads sleep instead of spinning (read when torch loads, so set before importing
    # it): on a shared CPU machine, threads spinning while they wait for one descheduled by another
    # job's process slowed training steps up to 40x (measured on a 2-core machine). Yours wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch

from fastagent import dist
from fastagent.ckpt import DiskFullError
from fastagent.config import Config, ConfigError, parse_args, usage
from fastagent.kernels import fused_linear_cross_entropy
from fastagent.kernels._cpp import cpu_flags
from fastagent.lean import keep_freed_memory, prepare_for_training
from fastagent.log import Metrics, print0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def probe_step(cfg: Config, model, tokenizer, run_dir: Path, device: torch.device) -> dict:
    """One real agent step on the first training task: the policy writes a turn in the chat format,
    the environment parses and executes it in the sandbox pool, the reward module scores it."""
    from fastagent.chat import stop_token_ids, tokenize_chat
    from fastagent.env import Env
    from fastagent.sandbox import Pool
    from fastagent.tasks import hide_paths, list_tasks

    task = list_tasks(cfg.train_tasks)[0]
    root = run_dir / "env"
    # packaged data is hidden by default; the task cache (answers) and what tasks list are added
    with Pool(workers=cfg.workers, hide=[root, *hide_paths([task])]) as pool:
        env = Env(task, pool, root, seed=cfg.seed, cfg=cfg)
        env.reset()
        prompt, _ = tokenize_chat(tokenizer, env.messages(), add_generation_prompt=True)  # the ids SFT/RL use
        prompt = prompt[-(cfg.max_seq_len - 64):]
        ids = torch.tensor([prompt], device=device)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=min(cfg.max_new_tokens, 64), do_sample=False,
                                 eos_token_id=stop_token_ids(tokenizer), pad_token_id=tokenizer.pad_token_id)
        gen_s = time.perf_counter() - t0
        new = out[0, ids.shape[1]:]
        text = tokenizer.decode(new, skip_special_tokens=True)
        obs, reward, _, info = env.step(text)
        env.close()
    kind = info["reward"]["kind"]
    print0(f"[probe] task {task.name}: prompt {len(prompt)} tokens, {len(new)} new tokens in {gen_s:.1f}s; "
           f"reward {reward:+.3f} ({kind})\n--- agent turn ---\n{text}\n--- observation ---\n{obs[:600]}\n")
    return {"probe_prompt_tokens": len(prompt), "probe_tokens": len(new), "probe_reward": reward,
            "probe_tokens_per_s": len(new) / max(gen_s, 1e-9)}


# ---------------------------------------------------------------- SFT

class DataError(ValueError):
    """The expert data cannot be trained on: says what is wrong and what to do (exit 2)."""


def check_expert_data(path: str) -> None:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"--expert_data={path}: no such file. Pass a trajectory file written by "
                        f"`python -m fastagent.expert` (or fastagent.data.TrajectoryWriter), or leave "
                        f"--expert_data empty to generate expert data into <run_dir>/expert/")
    if p.stat().st_size == 0:
        raise DataError(f"--expert_data={path} is empty (0 bytes): the expert run that writes it has not "
                        f"written a step yet. Rerun `python -m fastagent.expert` (it resumes), or leave "
                        f"--expert_data empty to generate the data here")


def expert_data(cfg: Config, info: dist.DistInfo, run_dir: Path) -> Path | None:
    """The trajectory file to train on: --expert_data, or generated by rank 0 into
    run_dir/expert/expert.traj (the generator resumes a partly written file). None: no generator."""
    if cfg.expert_data:
        return Path(cfg.expert_data)
    try:
        from fastagent.expert import generate_expert_data
    except ImportError as e:  # the same on every rank, so no rank waits at the barrier below
        if "generate_expert_data" not in str(e):
            raise
        print0(f"[sft] no expert data generator yet ({e}): pass --expert_data=FILE; skipping SFT")
        return None
    path = run_dir / "expert" / "expert.traj"
    # the other ranks wait in a gloo barrier with a long timeout: generation takes hours at the
    # paper's scale, the default group's timeout is 30 min (gloo) / 10 min (nccl)
    wait = (torch.distributed.new_group(backend="gloo", timeout=timedelta(days=7))
            if torch.distributed.is_initialized() else None)
    if info.is_main:
        generate_expert_data(cfg, path)  # a failure here ends the run: torchrun stops the other ranks
    if wait is not None:
        torch.distributed.barrier(group=wait)
    return path


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warmup over `warmup` steps, then cosine to 0 at `total` (step counts from 0): a pure
    function of the step, so a checkpoint's step is the schedule's whole state."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def micro_step(model: torch.nn.Module, batch: dict, scale: float, amp: torch.dtype | None,
               device: torch.device) -> torch.Tensor:
    """Forward + backward of one micro-batch. Loss = scale * sum of the CE of its trained tokens,
    from the decoder's last hidden states at ONLY the positions whose next token is trained (rows)
    and the lm_head weight: no (B, T, V) logits, and the head's matmul and softmax run on the
    trained rows alone (most tokens are prompt). Returns the unscaled CE sum (detached)."""
    ids = batch["input_ids"].to(device, non_blocking=True)  # (B, T), right-padded
    rows = batch["rows"].to(device, non_blocking=True)  # (N,) flat b * T + t
    targets = batch["targets"].to(device, non_blocking=True)  # (N,)
    with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
        # No attention mask: with right padding and causal attention no real token ever sees a pad
        # (pads come after it; their outputs are never read), and without a mask sdpa takes its
        # causal kernel (the masked one: 1.7x slower attention at 1800 tokens on CPU, measured).
        # logits_to_keep=[] : the model's own lm_head runs on zero rows; hidden_states[-1] is the
        # final-norm output. Calling model(), not model.model(), keeps FSDP2's root hooks.
        out = model(input_ids=ids, output_hidden_states=True, use_cache=False,
                    logits_to_keep=torch.zeros(0, dtype=torch.long, device=device))
        hidden = out.hidden_states[-1]  # (B, T, H)
        h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)  # (N, H)
        weight = model.get_output_embeddings().weight  # (V, H); gathered by FSDP2 for the forward
        dtype = amp or weight.dtype
        loss = fused_linear_cross_entropy(h.to(dtype), weight.to(dtype), targets)  # () fp32, a sum
    (loss * scale).backward()
    return loss.detach()


def sft_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: list[dict],
             scale: float, amp: torch.dtype | None, grad_clip: float,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over this rank's micro-batches (gradient accumulation); scale = world /
    (trained tokens in the whole step, all ranks): FSDP averages gradients over ranks, so the
    gradient is that of the global token mean. Returns (this rank's CE sum, grad norm)."""
    loss_sum = torch.zeros((), device=device)
    for batch in batches:
        loss_sum += micro_step(model, batch, scale, amp, device)
    # max_norm inf: the norm is measured and the gradients scaled by exactly 1.0
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW, fused kernel where torch has one for these parameters; no decay on norms (1-d)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    try:
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    except (RuntimeError, ValueError):  # no fused kernel for this device/dtype/tensor type
        return torch.optim.AdamW(groups, lr=lr, foreach=True)


def save_hf_model(model: torch.nn.Module, tokenizer, path: Path, is_main: bool) -> None:
    """The whole model as a Hugging Face folder (collective: gathers the shards on every rank, rank 0
    writes): a plain model is built on the meta device and given the gathered tensors."""
    from transformers import AutoModelForCausalLM

    from fastagent.ckpt import ensure_space, state_bytes
    from fastagent.model import save_model
    ensure_space(path, state_bytes(model), f"the model folder {path}",
                 ": it resumes from the stage's last checkpoint")
    state = dist.full_state_dict(model)
    if is_main:
        with torch.device("meta"):
            plain = AutoModelForCausalLM.from_config(model.config)
        plain.load_state_dict(state, assign=True)
        plain.tie_weights()
        plain.generation_config = model.generation_config
        save_model(plain, tokenizer, path)
    dist.barrier()


def train_sft(cfg: Config, info: dist.DistInfo, model: torch.nn.Module, tokenizer, run_dir: Path,
              metrics: Metrics, data: Path) -> torch.nn.Module:
    """Exploration-enriched fine-tuning: cross-entropy on the expert's turns, FSDP2, exact resume."""
    from fastagent import ckpt
    from fastagent.data import read_records, sft_batch, sft_collate, sft_samples, sft_steps_per_epoch
    from fastagent.log import progress

    # ---- data: one sample per expert step (prompt as the policy saw it + the expert's turn)
    t_start = time.perf_counter()
    records = read_records(data)
    if not records:
        raise DataError(f"{data} holds no intact trajectory records: regenerate it with "
                        f"`python -m fastagent.expert`, or pass another file with --expert_data=FILE")
    samples, dropped = sft_samples(records, tokenizer, cfg.max_seq_len)
    if len(samples) < cfg.batch_size:
        raise DataError(f"{data}: {len(samples)} samples fit max_seq_len={cfg.max_seq_len} "
                        f"({dropped} of {len(records)} are longer and were dropped), fewer than one "
                        f"batch (batch_size={cfg.batch_size}): raise --max_seq_len or lower --batch_size")
    if cfg.batch_size % info.world:
        raise ConfigError(f"batch_size ({cfg.batch_size}) must be a multiple of the number of ranks ({info.world})")
    micro_bs = min(cfg.micro_batch_size, cfg.batch_size // info.world)  # per rank, per forward
    if (cfg.batch_size // info.world) % micro_bs:
        raise ConfigError(f"batch_size / ranks ({cfg.batch_size} / {info.world}) must be a multiple of "
                          f"micro_batch_size ({cfg.micro_batch_size})")
    lengths = [len(ids) for ids, _ in samples]
    trained = [sum(mask[1:]) for _, mask in samples]  # next-token targets per sample
    per_epoch = sft_steps_per_epoch(len(samples), cfg.batch_size)
    total = per_epoch * cfg.sft_epochs
    total = min(total, cfg.sft_max_steps) if cfg.sft_max_steps > 0 else total
    warmup = math.ceil(cfg.warmup_ratio * total)
    print0(f"[sft] {len(samples)} samples from {data} ({dropped} dropped: longer than max_seq_len="
           f"{cfg.max_seq_len}), {sum(lengths)} tokens ({sum(trained)} trained); {total} steps of "
           f"{cfg.batch_size} samples ({per_epoch} per epoch; {micro_bs} per forward on each of {info.world} "
           f"rank(s)), warmup {warmup}")

    # ---- model: fp32 master weights, bf16 compute (FSDP2 mixed precision on GPU, autocast everywhere)
    amp = torch.bfloat16 if model_dtype(cfg, info) == torch.bfloat16 else None
    flags = cpu_flags()
    if info.device.type == "cpu" and flags is not None:
        if amp is not None and not flags & {"avx512_bf16", "amx_bf16"}:
            print0("[sft] note: this CPU has no native bf16 (AVX512-BF16 / AMX): bf16 autocast runs ~3.5x "
                   "slower than fp32 here (measured on SmolLM2-135M); --dtype=fp32 is faster")
        elif amp is None and "amx_bf16" in flags:
            print0("[sft] note: this CPU has AMX: --dtype=bf16 (autocast over fp32 weights) trained 1.7x faster "
                   "than fp32 on one (SmolLM2-135M, 4 x 512); auto keeps fp32 on CPU for exact vLLM parity")
    model.to(torch.float32)
    prepare_for_training(model, cfg.grad_checkpointing)  # sparse tied embedding, fused layers
    model = dist.shard_model(model, bf16_compute=amp is not None and info.device.type == "cuda")
    optimizer = make_optimizer(model, cfg.sft_lr, cfg.weight_decay)
    pad_id = tokenizer.pad_token_id
    print0(f"[sft] AdamW ({'fused' if optimizer.defaults.get('fused') else 'foreach'}), lr {cfg.sft_lr} "
           f"cosine, {'bf16' if amp else 'fp32'} compute, grad checkpointing {cfg.grad_checkpointing}")

    # ---- resume from the latest complete checkpoint in run_dir/sft/ckpt
    ckpt_dir = run_dir / "sft" / "ckpt"
    if info.is_main:
        ckpt.clean(ckpt_dir)
    dist.barrier()
    cursor = {"n_samples": len(samples), "batch_size": cfg.batch_size, "seed": cfg.seed}
    start = 0
    found = ckpt.latest(ckpt_dir)
    if found is not None:
        meta = ckpt.load(found, model, optimizer)
        changed = {k: (meta.get(k), v) for k, v in cursor.items() if meta.get(k) != v}
        if changed:
            raise DataError(f"cannot resume from {found}: it was made with a different "
                            + ", ".join(f"{k} ({a} then, {b} now)" for k, (a, b) in changed.items())
                            + f"; use a new --run_dir (or delete {ckpt_dir}) to start over")
        start = meta["step"]
        if meta.get("total_steps") != total:
            print0(f"[sft] note: the checkpoint's run had {meta.get('total_steps')} steps in all, this one "
                   f"has {total}: the learning-rate schedule continues on the new length")
        print0(f"[sft] resumed from {found} at step {start} (epoch {meta['epoch']}, "
               f"step {meta['step_in_epoch']} of it)")

    # ---- the loop: batch -> forward/backward per micro-batch -> clip -> AdamW step -> log -> save
    tokens_done, step_s = 0, 0.0
    bar = progress(range(start, total), total=total - start, desc="sft", unit="step")
    for step in bar:
        t0 = time.perf_counter()
        epoch, in_epoch = divmod(step, per_epoch)
        take, micro = sft_batch(lengths, cfg.batch_size, micro_bs, info.world, info.rank,
                                cfg.seed, epoch, in_epoch)
        n_trained = sum(trained[i] for i in take)  # the whole step's, known on every rank: no sync
        n_tokens = sum(lengths[i] for i in take)
        lr = lr_at(step, total, warmup, cfg.sft_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batches = [sft_collate(samples, idx, pad_id) for idx in micro]
        loss_sum, grad_norm = sft_step(model, optimizer, batches, info.world / n_trained, amp,
                                       cfg.grad_clip, info.device)
        loss = dist_sum(loss_sum).item() / n_trained  # host sync: one per step, for the log
        dt = time.perf_counter() - t0
        tokens_done, step_s = tokens_done + n_tokens, step_s + dt
        metrics.log(step + 1, sft_loss=loss, sft_lr=lr, sft_grad_norm=grad_norm.item(),
                    sft_tokens=n_tokens, sft_trained_tokens=n_trained, sft_tokens_per_s=n_tokens / dt,
                    sft_s_per_step=dt, sft_epoch=epoch)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{n_tokens / dt:.0f}")
        if (cfg.save_every > 0 and (step + 1) % cfg.save_every == 0) or step + 1 == total:
            ckpt.save(ckpt_dir, step + 1, model, optimizer,
                      {"epoch": (step + 1) // per_epoch, "step_in_epoch": (step + 1) % per_epoch,
                       "total_steps": total, **cursor})

    # ---- the fine-tuned model as a Hugging Face folder (transformers, vLLM)
    out = run_dir / "sft" / "model"
    save_hf_model(model, tokenizer, out, info.is_main)
    steps = total - start
    print0(f"[sft] done: {len(samples)} samples, {dropped} dropped, {steps} steps this run "
           f"({total} in all), {tokens_done / max(step_s, 1e-9):.0f} tokens/s, "
           f"{step_s / max(steps, 1):.2f} s/step, wall {time.perf_counter() - t_start:.1f}s; model in {out}")
    return model


# ---------------------------------------------------------------- evaluation

# set by torchrun for its workers; the evaluation's child process is a plain single process
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                 "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT")


def eval_stage(cfg: Config, info: dist.DistInfo, run_dir: Path) -> int:
    """Evaluate the base model (cfg.model), run_dir/sft/model and run_dir/rl/model, those that exist, on
    cfg.eval_tasks into run_dir/eval (table.md, results.json, PNGs; fastagent/eval.py) and print the table.

    Rank 0 runs `python -m fastagent.eval` in a child process while the other ranks wait at a barrier:
    the child is a fresh single process, so it gets vLLM's single-process executor and none of the
    trainer's process-wide state (the torchrun process group, vLLM's state from the RL engine), and it
    evaluates the models one after another, one engine alive at a time. Splitting the episodes over ranks
    would be faster on several GPUs; on one machine the sandbox pool, not the ranks, runs the episodes
    in parallel. Returns the child's exit code (0 on the other ranks)."""
    agents = [f"base={cfg.model}"] + [f"{stage}={run_dir / stage / 'model'}" for stage in ("sft", "rl")
                                      if (run_dir / stage / "model" / "config.json").is_file()]
    # the other ranks may wait for hours at the paper's scale: a gloo group with a long timeout
    wait = (torch.distributed.new_group(backend="gloo", timeout=timedelta(days=7))
            if torch.distributed.is_initialized() else None)
    rc = 0
    if info.is_main:
        # every setting but the model (eval's --model names an agent; the agents are listed below)
        flags = [f"--{k}={v}" for k, v in asdict(cfg).items() if k not in ("stage", "model")]
        cmd = [sys.executable, "-m", "fastagent.eval", *flags, f"--out={run_dir / 'eval'}", f"--hide={run_dir}",
               "--agents", *agents]
        env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS and not k.startswith("TORCHELASTIC_")}
        root = str(Path(__file__).resolve().parents[1])  # this checkout's fastagent, not an installed one
        # after what PYTHONPATH already names (an overlay with fastagent.kernels, as bench/gpu_check.sh makes)
        env["PYTHONPATH"] = os.pathsep.join([*filter(None, [env.get("PYTHONPATH")]), root])
        print0(f"[eval] {', '.join(agents)} on {cfg.eval_tasks} tasks, {cfg.eval_episodes} episode(s) each")
        rc = subprocess.run(cmd, env=env).returncode
    if wait is not None:
        torch.distributed.barrier(group=wait)
    return rc


def model_dtype(cfg: Config, info: dist.DistInfo) -> torch.dtype:
    from fastagent.model import resolve_dtype
    return resolve_dtype(cfg.dtype, info.device)


def dist_sum(x: torch.Tensor) -> torch.Tensor:
    """x summed over ranks (a no-op in one process)."""
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(x)
    return x


def main(argv: list[str] | None = None) -> int:
    if {"-h", "--help"} & set(sys.argv[1:] if argv is None else argv):
        print(usage())
        return 0
    try:
        cfg = parse_args(argv)
        if cfg.expert_data and cfg.stage in ("sft", "all"):
            check_expert_data(cfg.expert_data)  # before minutes of model loading
    except (ConfigError, DataError) as e:
        print0(f"error: {e}", file=sys.stderr)
        return 2
    t_main = time.perf_counter()
    keep_freed_memory()  # no page faults for the steps' re-allocations (fastagent/lean.py)
    info = dist.init(cfg.device)
    seed_everything(cfg.seed + info.rank)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if info.is_main:
        (run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
    metrics = Metrics(run_dir, tensorboard=cfg.tensorboard)
    print0(f"[setup] {info.world} rank(s) on {info.device}, run dir {run_dir}, model {cfg.model}")

    # ---- model: obtain, convert once, check the conversion, load (the evaluation loads its own)
    from fastagent.model import load_model
    if cfg.stage != "eval":
        t0 = time.perf_counter()
        model, tokenizer = load_model(cfg.model, dtype=cfg.dtype, device=info.device,
                                      cache_dir=cfg.cache_dir)
        n_params = sum(p.numel() for p in model.parameters())
        print0(f"[model] {cfg.model}: {n_params / 1e6:.1f}M parameters loaded in {time.perf_counter() - t0:.1f}s")

        # ---- one real agent step: policy -> env (sandbox pool) -> reward
        if info.is_main:
            metrics.log(0, params_m=n_params / 1e6, **probe_step(cfg, model, tokenizer, run_dir, info.device))
        dist.barrier()

    # ---- SFT on the expert trajectories
    if cfg.stage in ("sft", "all"):
        data = expert_data(cfg, info, run_dir)
        if data is not None:
            try:
                model = train_sft(cfg, info, model, tokenizer, run_dir, metrics, data)
            except (ConfigError, DataError, DiskFullError) as e:  # raised on every rank: all stop here
                print0(f"error: {e}", file=sys.stderr)
                metrics.close()
                return 2

    # ---- RL
    if cfg.stage in ("rl", "all"):
        from fastagent.rl import train_rl
        data = expert_data(cfg, info, run_dir)
        if data is not None:
            del model  # RL loads its start weights (run_dir/sft/model, or cfg.model) itself
            try:
                train_rl(cfg, info, tokenizer, run_dir, metrics, data)
            except (ConfigError, DataError, DiskFullError) as e:
                print0(f"error: {e}", file=sys.stderr)
                metrics.close()
                return 2

    # ---- evaluation: base vs SFT vs RL in full episodes on the held-out tasks (Table 1)
    if cfg.stage in ("eval", "all"):
        rc = eval_stage(cfg, info, run_dir)
        if rc:
            print0(f"error: the evaluation failed (exit code {rc}); see its output above. Rerun with "
                   f"--stage=eval: finished episodes in {run_dir / 'eval' / 'episodes'} are kept", file=sys.stderr)
            metrics.close()
            return rc
    metrics.close()
    made = {"expert data": Path(cfg.expert_data) if cfg.expert_data else run_dir / "expert" / "expert.traj",
            "SFT model": run_dir / "sft" / "model", "RL model": run_dir / "rl" / "model",
            "evaluation table (charts beside it)": run_dir / "eval" / "table.md"}
    print0(f"[done] in {time.perf_counter() - t_main:.0f}s; "
           + "".join(f"{name}: {p}; " for name, p in made.items() if p.exists())
           + f"metrics log: {metrics.path} (plots: python -m fastagent.plot {metrics.path} [--rl])")
    dist.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
