"""Score syllables submissions: quadratic weighted kappa of the rounded `syllables`."""
from pathlib import Path

from fastagent.tasks._grading import score_csv


def score(submission: Path, answers: Path) -> float:
    return score_csv(submission, answers / "test.csv", "qwk", ["syllables"])
