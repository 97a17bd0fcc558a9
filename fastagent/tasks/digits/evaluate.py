"""Score digits submissions: accuracy of `label` against the hidden test labels."""
from pathlib import Path

from fastagent.tasks._grading import score_csv


def score(submission: Path, answers: Path) -> float:
    return score_csv(submission, answers / "test.csv", "accuracy", ["label"])
