"""Score mnist-attributes submissions: ROC AUC per attribute column, averaged."""
from pathlib import Path

from fastagent.tasks._grading import score_csv


def score(submission: Path, answers: Path) -> float:
    return score_csv(submission, answers / "test.csv", "auc", ["odd", "prime", "large", "loop"])
