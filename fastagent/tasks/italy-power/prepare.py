"""Materialize italy-power: sktime's bundled ItalyPowerDemand (TRAIN+TEST pooled), re-split 60/20/20."""
from pathlib import Path

from fastagent.tasks._prepare import load_ts, write_arrays


def prepare(workspace: Path, answers: Path, seed: int) -> None:
    X, y = load_ts("ItalyPowerDemand")
    write_arrays(workspace, answers, X, y, seed, ["label"])
