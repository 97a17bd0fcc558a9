"""Score penguins-size submissions: RMSLE of each target, averaged."""
from pathlib import Path

from fastagent.tasks._grading import score_csv


def score(submission: Path, answers: Path) -> float:
    return score_csv(submission, answers / "test.csv", "rmsle", ["body_mass_g", "flipper_length_mm"])
