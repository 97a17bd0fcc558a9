"""Score airline-forecast submissions: mean absolute error of `passengers` over the test months."""
from pathlib import Path

from fastagent.tasks._grading import score_csv


def score(submission: Path, answers: Path) -> float:
    return score_csv(submission, answers / "test.csv", "mae", ["passengers"])
