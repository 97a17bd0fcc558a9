"""Score car-mpg submissions: RMSE of `Miles_per_Gallon` against the hidden test values."""
from pathlib import Path

from fastagent.tasks._grading import score_csv


def score(submission: Path, answers: Path) -> float:
    return score_csv(submission, answers / "test.csv", "rmse", ["Miles_per_Gallon"])
