"""Score word-sounds submissions: ROC AUC per sound column, averaged."""
from pathlib import Path

from fastagent.tasks._grading import score_csv


def score(submission: Path, answers: Path) -> float:
    return score_csv(submission, answers / "test.csv", "auc", ["th", "sh", "ch", "jh", "ng", "zh"])
