"""Score mnist-top3 submissions: MAP@3 of the space-separated `predictions` against the true digit."""
from pathlib import Path

from fastagent.tasks._grading import map_at_k, read_answers, read_submission


def score(submission: Path, answers: Path) -> float:
    ans = read_answers(answers / "test.csv")
    sub = read_submission(submission, ans.index, ["predictions"])
    return map_at_k(ans["label"].astype(str).tolist(), sub["predictions"].astype(str).tolist(), 3)
