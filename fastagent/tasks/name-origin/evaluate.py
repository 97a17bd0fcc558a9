"""Score name-origin submissions: multi-class log loss over the six region columns."""
from pathlib import Path

from fastagent.tasks._grading import score_csv

REGIONS = ["english", "romance", "germanic", "slavic", "asian", "mideast"]


def score(submission: Path, answers: Path) -> float:
    return score_csv(submission, answers / "test.csv", "log_loss", ["region"], classes=REGIONS)
