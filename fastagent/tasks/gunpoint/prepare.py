"""Materialize gunpoint: sktime's bundled GunPoint (TRAIN+TEST pooled), y = 1 for "point"
(UCR class 2), 0 for "gun" (class 1); re-split 60/20/20 (stratified) with the seed."""
from pathlib import Path

from fastagent.tasks._prepare import load_ts, write_arrays


def prepare(workspace: Path, answers: Path, seed: int) -> None:
    X, label = load_ts("GunPoint")
    write_arrays(workspace, answers, X, (label == "2").astype("int64"), seed, ["point"])
