"""HFEngine (fastagent.rollout.hf) on CPU with real models, no mocks: trainer-vs-engine log-prob parity
after a real AdamW step and sync (tiny model and SmolLM2-135M), staleness, sleep/wake, stop tokens,
lengths, batching with left padding, reproducibility. `python -m pytest -q tests/test_rollout_hf.py`.
"""

from __future__ import annotations

import time

import pytest
import torch

from fastagent.model import load_model, load_tokenizer, resolve_model
from fastagent.rollout import (EngineStateError, Sampling, StaleWeightsError, WeightVersion, make_engine,
                               sync_weights, trainer_logprobs)
from fastagent.rollout.hf import HFEngine, top_p_filter

PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]]  # lengths differ: left padding
ATOL = 1e-4  # fp32, same weights: engine vs trainer log-prob per token


@pytest.fixture(scope="module")
def tiny() -> str:
    return str(resolve_model("tiny-random"))


def adamw_step(model: torch.nn.Module, lr: float = 1e-2) -> float:
    """One real AdamW step on next-token cross entropy; returns the largest weight change."""
    before = [p.detach().clone() for p in model.parameters()]
    ids = torch.randint(3, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(7))
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    model.eval()
    return max((p.detach() - b).abs().max().item() for p, b in zip(model.parameters(), before))


def max_logprob_diff(model, prompts, outs, temperature: float) -> float:
    """Largest |engine - trainer| log-prob over every sampled token of every completion."""
    diff = 0.0
    for prompt, completions in zip(prompts, outs):
        for c in completions:
            assert len(c.logprobs) == len(c.token_ids) > 0
            ref = trainer_logprobs(model, prompt, c.token_ids, temperature)
            diff = max(diff, (torch.tensor(c.logprobs) - ref).abs().max().item())
    return diff


def tokens(outs) -> list[list[list[int]]]:
    return [[c.token_ids for c in row] for row in outs]


def test_parity_after_optimizer_step(tiny):
    engine, (model, _) = HFEngine(tiny, seed=0), load_model(tiny)
    version = WeightVersion()
    assert adamw_step(model) > 5e-3, "the step changed nothing"
    version.advance()
    sampling = Sampling(n=2, temperature=1.0, max_new_tokens=12)
    stale = engine.generate(PROMPTS, sampling, version, allow_stale=True)
    assert max_logprob_diff(model, PROMPTS, stale, 1.0) > 1e-2  # the test can fail: old weights differ

    stats = sync_weights(engine, model, version)
    assert engine.synced_step == 1 and stats.tensors == len(list(model.parameters()))
    head, emb = engine.model.get_output_embeddings().weight, engine.model.get_input_embeddings().weight
    assert head.data_ptr() == emb.data_ptr()  # tied: the head followed the embeddings
    torch.testing.assert_close(head, model.get_output_embeddings().weight, atol=0, rtol=0)
    for temperature in (1.0, 0.7, 0.0):
        outs = engine.generate(PROMPTS, Sampling(n=2, temperature=temperature, max_new_tokens=12), version)
        diff = max_logprob_diff(model, PROMPTS, outs, temperature)
        print(f"tiny T={temperature}: max |engine - trainer| log-prob {diff:.3g}")
        assert diff <= ATOL, (temperature, diff)


def test_top_p():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]]).log()
    kept = top_p_filter(logits, 0.7).isfinite()  # 0.5 < 0.7 <= 0.5 + 0.3: the nucleus is two tokens
    assert kept.tolist() == [[True, True, False, False], [False, False, True, True]]
    assert top_p_filter(logits, 0.4).isfinite().sum(-1).tolist() == [1, 1]  # the top token always stays
    torch.testing.assert_close(top_p_filter(logits, 1.0), logits)


def test_top_p_sampling_logprobs(tiny):
    """Sampled under top-p: finite log-probs of the renormalised nucleus, so never below the full
    distribution's, and at most log(1) = 0."""
    engine, (model, _) = HFEngine(tiny), load_model(tiny)
    outs = engine.generate(PROMPTS, Sampling(n=2, temperature=1.0, top_p=0.5, max_new_tokens=8))
    for prompt, row in zip(PROMPTS, outs):
        for c in row:
            lp = torch.tensor(c.logprobs)
            assert lp.isfinite().all() and (lp <= 1e-6).all()
            assert (lp >= trainer_logprobs(model, prompt, c.token_ids, 1.0) - ATOL).all()


def test_staleness_and_sync_errors(tiny):
    engine = make_engine("hf", tiny, kv_cache_memory_bytes=1 << 30, gpu_memory_utilization=0.5, enable_sleep=True)
    assert isinstance(engine, HFEngine) and engine.synced_step == 0  # vLLM's kwargs accepted, ignored
    model, _ = load_model(tiny)
    version, sampling = WeightVersion(), Sampling(temperature=0, max_new_tokens=4)
    engine.generate(PROMPTS, sampling, version)  # step 0: both loaded from one folder
    version.advance()
    with pytest.raises(StaleWeightsError, match="step 0 but the trainer is at step 1"):
        engine.generate(PROMPTS, sampling, version)
    assert len(engine.generate(PROMPTS, sampling, version, allow_stale=True)) == 3
    assert len(engine.generate(PROMPTS, sampling)) == 3  # no version: no check

    emb = model.get_input_embeddings().weight
    with pytest.raises(ValueError, match="'model.nope.weight'"):
        engine._load_bucket([("model.nope.weight", emb)])
    with pytest.raises(ValueError, match=r"'model.norm.weight' of shape \(3,\)"):
        engine._load_bucket([("model.norm.weight", torch.ones(3))])
    part = torch.nn.Module()  # a "trainer" holding only the embeddings: the sync must not count
    part.model = torch.nn.Module()
    part.model.embed_tokens = model.get_input_embeddings()
    with pytest.raises(ValueError, match="weights unset"):
        sync_weights(engine, part, version)
    assert engine.synced_step is None
    with pytest.raises(StaleWeightsError, match="unknown weights"):
        engine.generate(PROMPTS, sampling, version)
    sync_weights(engine, model, version)
    engine.generate(PROMPTS, sampling, version)

    engine.close()
    assert engine.model is None
    with pytest.raises(EngineStateError, match="closed"):
        engine.generate(PROMPTS, sampling)


def test_greedy_sleep_wake(tiny):
    engine, (model, _) = HFEngine(tiny), load_model(tiny)
    version, greedy = WeightVersion(), Sampling(n=2, temperature=0, max_new_tokens=10)
    before = tokens(engine.generate(PROMPTS, greedy, version))
    assert before == tokens(engine.generate(PROMPTS, greedy, version))
    assert all(row[0] == row[1] for row in before)  # greedy: the n samples agree

    engine.sleep(1)
    with pytest.raises(EngineStateError, match="asleep"):
        engine.generate(PROMPTS, greedy, version)
    with pytest.raises(EngineStateError, match="asleep"):
        sync_weights(engine, model, version)
    engine.wake()
    assert tokens(engine.generate(PROMPTS, greedy, version)) == before

    engine.sleep(2)
    assert all(p.numel() == 0 for p in engine.model.parameters())  # the weights' memory is gone
    engine.wake()
    assert [p.shape for p in engine.model.parameters()] == [p.shape for p in model.parameters()]
    with pytest.raises(StaleWeightsError):
        engine.generate(PROMPTS, greedy, version)
    with pytest.raises(EngineStateError, match="sync_weights"):
        engine.generate(PROMPTS, greedy)  # not even off-policy: the memory is uninitialised
    sync_weights(engine, model, version)
    head, emb = engine.model.get_output_embeddings().weight, engine.model.get_input_embeddings().weight
    assert head.data_ptr() == emb.data_ptr()  # still tied after the storage was re-created
    assert tokens(engine.generate(PROMPTS, greedy, version)) == before


def test_stop_tokens_lengths_and_batching(tiny):
    engine = HFEngine(tiny, max_batch=16)
    greedy = Sampling(n=2, temperature=0, max_new_tokens=8)
    full = engine.generate(PROMPTS, greedy)
    assert all(c.finish == "length" and len(c.token_ids) == 8 for row in full for c in row)

    # batches of 2 (3 prompts x n=2 = 6 rows) give what one batch gives, and what each prompt alone
    # (no padding at all) gives: the left padding changes nothing
    small = HFEngine(tiny, max_batch=2).generate(PROMPTS, greedy)
    assert tokens(small) == tokens(full)
    for prompt, row in zip(PROMPTS, full):
        alone = engine.generate([prompt], Sampling(temperature=0, max_new_tokens=8))[0][0]
        assert alone.token_ids == row[0].token_ids
        torch.testing.assert_close(torch.tensor(alone.logprobs), torch.tensor(row[0].logprobs), atol=1e-5, rtol=0)

    seq = full[0][0].token_ids
    stop = seq[2]
    k = seq.index(stop)  # the first time the stop token comes
    never = next(t for t in range(3, 1024) if t not in seq)  # a second stop id that does not come
    outs = engine.generate(PROMPTS, Sampling(temperature=0, max_new_tokens=8, stop_token_ids=(never, stop)))
    c = outs[0][0]
    assert (c.token_ids, c.finish, len(c.logprobs)) == (seq[:k + 1], "stop", k + 1)  # the stop token included
    assert c.logprobs == pytest.approx(full[0][0].logprobs[:k + 1], abs=1e-5)

    c = engine.generate(PROMPTS, Sampling(temperature=0, max_new_tokens=3))[1][0]
    assert (c.token_ids, c.finish) == (full[1][0].token_ids[:3], "length")
    short = HFEngine(tiny, max_model_len=len(PROMPTS[0]) + 2)  # room for 2 new tokens
    c = short.generate([PROMPTS[0]], Sampling(temperature=0, max_new_tokens=8))[0][0]
    assert (c.token_ids, c.finish) == (seq[:2], "length")
    with pytest.raises(ValueError, match="max_model_len"):
        short.generate([PROMPTS[2]], greedy)


def test_reproducible_and_caller_rng_untouched(tiny):
    sampling = Sampling(n=3, temperature=1.0, max_new_tokens=10, seed=5)
    engine = HFEngine(tiny, seed=1)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = tokens(engine.generate(PROMPTS, sampling))
    assert torch.equal(torch.get_rng_state(), state)  # the caller's global RNG did not move
    assert tokens(engine.generate(PROMPTS, sampling)) == first
    assert tokens(HFEngine(tiny, seed=1).generate(PROMPTS, sampling)) == first  # a fresh engine, same seed
    assert len({tuple(t) for t in first[0]}) > 1  # the n samples of one prompt differ
    assert tokens(engine.generate(PROMPTS, Sampling(n=3, temperature=1.0, max_new_tokens=10, seed=6))) != first
    assert tokens(HFEngine(tiny, seed=2).generate(PROMPTS, sampling)) != first


def test_smollm2_parity_after_step():
    t0 = time.perf_counter()
    engine, (model, _) = HFEngine("smollm2-135m-instruct"), load_model("smollm2-135m-instruct")
    tok = load_tokenizer("smollm2-135m-instruct")
    prompt = tok.apply_chat_template([{"role": "user", "content": "Name one way to reduce overfitting."}],
                                     tokenize=True, add_generation_prompt=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    version = WeightVersion()
    assert adamw_step(model, lr=1e-3) > 5e-4
    version.advance()
    sync_weights(engine, model, version)
    outs = engine.generate([prompt], Sampling(n=1, temperature=1.0, max_new_tokens=16), version)
    assert len(outs[0][0].token_ids) == 16 or outs[0][0].finish == "stop"
    diff = max_logprob_diff(model, [prompt], outs, 1.0)
    print(f"smollm2: max |engine - trainer| log-prob {diff:.3g} ({time.perf_counter() - t0:.1f} s)")
    assert diff <= ATOL, diff
