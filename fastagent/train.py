"""The torchrun entry point: one lean loop per stage, read top to bottom.

Run (CPU, the default: SmolLM2-135M-Instruct on the bundled tasks):
    torchrun --standalone --nproc_per_node=1 fastagent/train.py
    torchrun --standalone --nproc_per_node=1 fastagent/train.py --preset=smoke --stage=sft
    torchrun --standalone --nproc_per_node=8 fastagent/train.py --preset=qwen2.5-7b     # GPUs
Every Config field is a `--field=value` flag (fastagent/config.py); `--config=run.toml` reads a file.

Stages, in order: model (obtain, convert and check the base model) -> probe (one real agent step:
the policy writes a turn on the first training task, the environment executes it in the sandbox
pool, the reward module scores it) -> sft (exploration-enriched fine-tuning) -> rl (step-wise PPO). Stages that are not built yet
are reported as such and skipped; the run still exits 0 after the stages that exist.
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # torchrun runs this file as a script: put the repository root, not fastagent/, on sys.path so
    # sibling modules never shadow installed packages.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np
import torch

from fastagent import dist
from fastagent.config import Config, ConfigError, parse_args, usage
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


def main(argv: list[str] | None = None) -> int:
    if {"-h", "--help"} & set(sys.argv[1:] if argv is None else argv):
        print(usage())
        return 0
    try:
        cfg = parse_args(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    info = dist.init(cfg.device)
    seed_everything(cfg.seed + info.rank)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if info.is_main:
        (run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
    metrics = Metrics(run_dir, tensorboard=cfg.tensorboard)
    print0(f"[setup] {info.world} rank(s) on {info.device}, run dir {run_dir}, model {cfg.model}")

    # ---- model: obtain, convert once, check the conversion, load
    from fastagent.model import load_model
    t0 = time.perf_counter()
    model, tokenizer = load_model(cfg.model, dtype=cfg.dtype, device=info.device,
                                  cache_dir=cfg.cache_dir)
    n_params = sum(p.numel() for p in model.parameters())
    print0(f"[model] {cfg.model}: {n_params / 1e6:.1f}M parameters loaded in {time.perf_counter() - t0:.1f}s")

    # ---- one real agent step: policy -> env (sandbox pool) -> reward
    if info.is_main:
        metrics.log(0, params_m=n_params / 1e6, **probe_step(cfg, model, tokenizer, run_dir, info.device))
    dist.barrier()

    # ---- SFT and RL
    for stage in ("sft", "rl"):
        if cfg.stage in (stage, "all"):
            print0(f"[{stage}] stage not built yet (see the open issues): skipping")
    metrics.close()
    print0(f"[done] metrics in {metrics.path}; plot them with: python -m fastagent.plot {metrics.path}")
    dist.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
