"""Score wine-logloss submissions: multi-class log loss over the columns 0, 1, 2."""
from pathlib import Path

from fastagent.tasks._grading import score_csv


def score(submission: Path, answers: Path) -> float:
    return score_csv(submission, answers / "test.csv", "log_loss", ["cultivar"], classes=["0", "1", "2"])
