"""Score co2-forecast submissions: mean absolute error of `co2` over the test months."""
from pathlib import Path

from fastagent.tasks._grading import score_csv


def score(submission: Path, answers: Path) -> float:
    return score_csv(submission, answers / "test.csv", "mae", ["co2"])
