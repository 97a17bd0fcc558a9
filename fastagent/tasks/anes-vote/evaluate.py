"""Score anes-vote submissions: accuracy of `vote`."""
from pathlib import Path

from fastagent.tasks._grading import score_csv


def score(submission: Path, answers: Path) -> float:
    return score_csv(submission, answers / "test.csv", "accuracy", ["vote"])
