"""Load and run a competition stored in the MLE-bench layout, as a fastagent Task.

Layout read (as MLE-bench keeps it; `<id>` is the competition id):
    <competition dir>/config.yaml      id, name, dataset.answers, dataset.sample_submission, grader.name
    <competition dir>/description.md   what the agent reads
    <competition dir>/prepare.py       prepare(raw: Path, public: Path, private: Path) -> None
    <competition dir>/grade.py         grade(submission: DataFrame, answers: DataFrame) -> float
    <competition dir>/leaderboard.csv  optional: a `score` column, best team first
    raw data: the data_dir argument, else <competition dir>/raw, else ~/.cache/mle-bench/data/<id>/raw

Mapping to the fastagent task contract: public/ becomes workspace/data, private/ the hidden answers.
The metric's direction and the reference score come from the leaderboard (lower is better when the
top team's score is below the last team's; reference = the top team); the median team is kept as
Task.median_score, for evaluation only: an episode starts from the measured starter
(fastagent.tasks.starter_score), so Task.starter_score is NaN unless config.yaml sets one.
alpha = 4 / |top - median| (the scale of a meaningful gain on this leaderboard). Without a
leaderboard, optional fastagent keys `direction`, `starter_score`, `reference_score` in config.yaml
are used, else max / NaN / NaN and alpha 1. The starter is the competition's own train.py if it
has one, else a script that copies sample_submission.csv. grade.py files that import the
`mlebench` package need it installed.

Use:
    task = load_mlebench(Path("mle-bench/mlebench/competitions/spooky-author-identification"),
                         data_dir=Path("~/mle-data/spooky-author-identification/raw").expanduser())
    workspace, answers = materialize(task, Path("/tmp/fa-tasks"))
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pandas as pd

from . import Task, _module

_RAW: dict[Path, Path] = {}  # competition dir -> its raw data folder (Task has no field for it)
_CONFIG: dict[Path, dict] = {}

_STARTER = '''"""Starter for an MLE-bench competition: copies the sample submission (a valid, weak baseline).
Improve it: read data/, train a model, write submission.csv in the same format."""
import shutil
shutil.copy("data/sample_submission.csv", "submission.csv")
print("wrote submission.csv (a copy of data/sample_submission.csv); no validation score")
'''


def _config(path: Path) -> dict:
    import yaml  # PyYAML ships with transformers/huggingface_hub, a core dependency
    cfg_file = path / "config.yaml"
    if not cfg_file.is_file():
        raise ValueError(f"{path} is not an MLE-bench competition folder: no config.yaml")
    cfg = yaml.safe_load(cfg_file.read_text()) or {}
    for key in ("id", "dataset", "grader"):
        if key not in cfg:
            raise ValueError(f"{cfg_file} lacks '{key}': MLE-bench configs have id, dataset, grader")
    for f in ("description.md", "prepare.py", "grade.py"):
        if not (path / f).is_file():
            raise ValueError(f"MLE-bench competition {path} lacks {f}")
    return cfg


def _leaderboard(path: Path) -> tuple[str, float, float] | None:
    board = path / "leaderboard.csv"
    if not board.is_file():
        return None
    df = pd.read_csv(board)
    col = next((c for c in ("score", "scoreNullable") if c in df.columns), None)
    if col is None or df[col].dropna().empty:
        return None
    scores = df[col].dropna().to_numpy(dtype=float)
    direction = "min" if scores[0] < scores[-1] else "max"
    return direction, float(pd.Series(scores).median()), float(scores[0])


def _default_raw(path: Path, cfg: dict) -> Path:
    local = path / "raw"
    return local if local.is_dir() else Path("~/.cache/mle-bench/data").expanduser() / str(cfg["id"]) / "raw"


def load(path: Path, data_dir: Path | None = None) -> Task:
    path = path.resolve()
    cfg = _config(path)
    raw = Path(data_dir) if data_dir else _default_raw(path, cfg)
    if not Path(raw).is_dir():
        raise ValueError(f"raw data for {cfg['id']} not found at {raw}: pass data_dir= "
                         f"(the folder MLE-bench's prepare reads)")
    board = _leaderboard(path)
    starter = float(cfg.get("starter_score", math.nan))
    if board:
        direction, median, reference = board
    else:
        direction, median = cfg.get("direction", "max"), math.nan
        reference = float(cfg.get("reference_score", math.nan))
    gap = abs(reference - (median if board else starter))
    alpha = 4.0 / gap if gap > 0 and math.isfinite(gap) else 1.0
    _RAW[path] = Path(raw)
    _CONFIG[path] = cfg
    return Task(name=str(cfg["id"]), split="mlebench", metric=str(cfg["grader"].get("name", "score")),
                direction=direction, starter_score=starter, reference_score=reference, alpha=alpha,
                time_limit_s=float(cfg.get("time_limit_s", 600.0)), dir=path,
                description=(path / "description.md").read_text(), median_score=median)


def prepare(task: Task, workspace: Path, answers: Path) -> None:
    """Run the competition's prepare(raw, public, private) into workspace/data and answers."""
    # A Task passed to another process has lost its data_dir: fall back to the default places.
    raw = _RAW.get(task.dir) or _default_raw(task.dir, _config(task.dir))
    public = workspace / "data"
    public.mkdir(parents=True, exist_ok=True)
    _module(task.dir / "prepare.py").prepare(raw, public, answers)
    starter = task.dir / "train.py"
    if starter.is_file():
        shutil.copy(starter, workspace / "train.py")
    else:
        (workspace / "train.py").write_text(_STARTER)
    shutil.copy(task.dir / "description.md", workspace / "description.md")


def score(task: Task, submission: Path, answers: Path) -> float:
    """grade(submission_df, answers_df) with MLE-bench's answers file from the private folder."""
    cfg = _CONFIG.get(task.dir) or _config(task.dir)
    answers_file = answers / Path(cfg["dataset"]["answers"]).name
    if not submission.is_file():
        raise ValueError(f"no submission at {submission.name}: write it in the format of "
                         f"data/{Path(cfg['dataset'].get('sample_submission', 'sample_submission.csv')).name}")
    try:
        sub = pd.read_csv(submission)
    except Exception as e:  # pandas raises several parser error types
        raise ValueError(f"{submission.name} is not a readable CSV ({e})") from None
    try:
        return float(_module(task.dir / "grade.py").grade(sub, pd.read_csv(answers_file)))
    except Exception as e:
        # MLE-bench graders raise their own InvalidSubmissionError; report every grading failure
        # as the submission's problem, with the grader's message.
        raise ValueError(f"{submission.name} was rejected by {task.name}'s grader: {e}") from e
