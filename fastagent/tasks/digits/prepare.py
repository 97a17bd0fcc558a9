"""Materialize the digits task: scikit-learn's bundled 8x8 digits, split 60/20/20 with the seed."""
from pathlib import Path

from fastagent.tasks._prepare import write_arrays


def prepare(workspace: Path, answers: Path, seed: int) -> None:
    from sklearn.datasets import load_digits
    d = load_digits()
    write_arrays(workspace, answers, d.images.astype("float32"), d.target.astype("int64"), seed, ["label"])
