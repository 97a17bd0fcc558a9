"""Score word-stress submissions: macro F1 of `stress` over the four classes."""
from pathlib import Path

from fastagent.tasks._grading import score_csv


def score(submission: Path, answers: Path) -> float:
    return score_csv(submission, answers / "test.csv", "macro_f1", ["stress"])
