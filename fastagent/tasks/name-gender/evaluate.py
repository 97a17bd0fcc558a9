"""Score name-gender submissions: ROC AUC of the `female` probabilities."""
from pathlib import Path

from fastagent.tasks._grading import score_csv


def score(submission: Path, answers: Path) -> float:
    return score_csv(submission, answers / "test.csv", "auc", ["female"])
