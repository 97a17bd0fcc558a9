"""Score mnist-4-vs-9 submissions: binary log loss of the `nine` probabilities."""
from pathlib import Path

from fastagent.tasks._grading import score_csv


def score(submission: Path, answers: Path) -> float:
    return score_csv(submission, answers / "test.csv", "log_loss", ["nine"])
