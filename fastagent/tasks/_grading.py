"""Metrics and submission checks shared by the bundled tasks' `evaluate.py` files (trusted side).

A task's evaluator is usually two lines:

    from fastagent.tasks._grading import score_csv
    def score(submission, answers): return score_csv(submission, answers / "test.csv", "rmse", ["y"])

`score_csv` reads `submission.csv` (an `id` column plus the prediction columns) and the hidden answers
(`id` plus the true columns), checks the submission (file present, parseable, the expected columns,
exactly the test ids, finite numbers where numbers are needed) and returns the metric. Every problem
raises ValueError saying what is wrong and what to write instead, so an agent can fix it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

ID = "id"


def read_answers(path: Path) -> pd.DataFrame:
    """The hidden answers table (`id` + true columns), indexed by id."""
    return pd.read_csv(path).set_index(ID)


def read_submission(submission: Path, ids: pd.Index, columns: list[str]) -> pd.DataFrame:
    """Read and check a submission; return its `columns`, rows aligned to `ids`."""
    submission = Path(submission)
    want = f"a CSV with columns {', '.join([ID] + columns)} and one row per test id"
    if not submission.is_file():
        raise ValueError(f"no submission at {submission.name}: write {want}")
    try:
        df = pd.read_csv(submission)
    except Exception as e:  # pandas raises several parser error types
        raise ValueError(f"{submission.name} is not a readable CSV ({e}); write {want}") from None
    missing = [c for c in [ID] + columns if c not in df.columns]
    if missing:
        raise ValueError(f"{submission.name} lacks column(s) {', '.join(missing)} "
                         f"(has {', '.join(map(str, df.columns[:12]))}); write {want}")
    if df[ID].duplicated().any():
        raise ValueError(f"{submission.name} repeats ids (e.g. {df[ID][df[ID].duplicated()].iloc[0]}); "
                         f"write one row per test id")
    df = df.set_index(ID)
    if df.index.dtype != ids.dtype:  # e.g. ids written as "7.0" or read as text: compare like the answers
        try:
            df.index = df.index.astype(ids.dtype)
        except (TypeError, ValueError):
            pass  # the ids then simply do not match, reported below
    absent = ids.difference(df.index)
    if len(absent):
        raise ValueError(f"{submission.name} misses {len(absent)} of {len(ids)} test ids "
                         f"(e.g. {absent[0]}); predict every id in data/test")
    extra = df.index.difference(ids)
    if len(extra):
        raise ValueError(f"{submission.name} has {len(extra)} ids that are not test ids (e.g. {extra[0]})")
    out = df.loc[ids, columns]
    if out.isna().any().any():
        col = out.columns[out.isna().any()][0]
        raise ValueError(f"{submission.name} has empty/NaN values in column {col}; fill every prediction")
    return out


def numeric(df: pd.DataFrame, name: str = "submission.csv") -> np.ndarray:
    """The frame as a float array; ValueError if a value is not a finite number."""
    try:
        arr = df.apply(pd.to_numeric).to_numpy(dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: predictions must be numbers ({e})") from None
    if not np.isfinite(arr).all():
        raise ValueError(f"{name}: predictions must be finite numbers (found inf or NaN)")
    return arr


def probabilities(df: pd.DataFrame) -> np.ndarray:
    arr = numeric(df)
    if (arr < 0).any() or (arr > 1).any():
        raise ValueError("submission.csv: probabilities must lie in [0, 1]")
    return arr


# --- metrics on arrays: y_true first, like sklearn -------------------------------------------------

def rmse(y: np.ndarray, p: np.ndarray) -> float:
    return float(np.sqrt(np.mean((y - p) ** 2)))


def mae(y: np.ndarray, p: np.ndarray) -> float:
    return float(np.mean(np.abs(y - p)))


def rmsle(y: np.ndarray, p: np.ndarray) -> float:
    """Mean over columns of the root mean squared log error (the nomad2018 metric)."""
    if (p < 0).any():
        raise ValueError("submission.csv: rmsle needs predictions >= 0 (clip negatives to 0)")
    y, p = y.reshape(len(y), -1), p.reshape(len(p), -1)
    return float(np.mean(np.sqrt(np.mean((np.log1p(y) - np.log1p(p)) ** 2, axis=0))))


def auc(y: np.ndarray, p: np.ndarray) -> float:
    """ROC AUC, averaged over columns for multi-label answers (the jigsaw-toxic metric)."""
    from sklearn.metrics import roc_auc_score
    y, p = y.reshape(len(y), -1), p.reshape(len(p), -1)
    return float(np.mean([roc_auc_score(y[:, j], p[:, j]) for j in range(y.shape[1])]))


def log_loss(y: np.ndarray, p: np.ndarray) -> float:
    """Binary log loss (p: 1-D probability of class 1) or multi-class (p: one column per class;
    rows renormalised), probabilities clipped to [1e-15, 1 - 1e-15] as Kaggle does."""
    eps = 1e-15
    if p.ndim == 1 or p.shape[1] == 1:
        p = np.clip(p.reshape(-1), eps, 1 - eps)
        y = y.reshape(-1)
        return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
    p = np.clip(p, eps, 1 - eps)
    p = p / p.sum(axis=1, keepdims=True)
    return float(-np.mean(np.log(p[np.arange(len(y)), y.astype(int)])))


def qwk(y: np.ndarray, p: np.ndarray) -> float:
    """Quadratic weighted kappa; predictions are rounded to the nearest integer label."""
    from sklearn.metrics import cohen_kappa_score
    return float(cohen_kappa_score(y.astype(int).reshape(-1), np.rint(p).astype(int).reshape(-1),
                                   weights="quadratic"))


def pearson(y: np.ndarray, p: np.ndarray) -> float:
    y, p = y.reshape(-1), p.reshape(-1)
    if np.std(p) == 0:
        raise ValueError("submission.csv: constant predictions have no correlation; vary them")
    return float(np.corrcoef(y, p)[0, 1])


NUMERIC: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "rmse": rmse, "mae": mae, "rmsle": rmsle, "qwk": qwk, "pearson": pearson}

# Every metric score_csv knows, with the direction that is better ("map@K" stands for map@1, map@3, ...).
DIRECTIONS = {"accuracy": "max", "macro_f1": "max", "auc": "max", "qwk": "max", "pearson": "max",
              "map@K": "max", "log_loss": "min", "rmse": "min", "mae": "min", "rmsle": "min"}


def metric_direction(metric: str) -> str | None:
    """"max" or "min" for a metric score_csv knows, None for any other name."""
    if re.fullmatch(r"map@[1-9][0-9]*", metric):
        return "max"
    return DIRECTIONS.get(metric) if metric != "map@K" else None


def score_csv(submission: Path, answers_csv: Path, metric: str, columns: list[str],
              classes: list[str] | None = None) -> float:
    """Score `submission` against `answers_csv` with `metric`.

    columns: the answer columns (and, except for multi-class log loss, the submission columns).
    classes: for multi-class log loss, the class names: the submission has one probability column
    per class and the answer column holds the class name.
    """
    ans = read_answers(Path(answers_csv))
    if metric in ("accuracy", "macro_f1"):
        sub = read_submission(submission, ans.index, columns)
        return _label_metric(metric, ans[columns[0]], sub[columns[0]])
    if metric == "log_loss" and classes is not None:
        sub = probabilities(read_submission(submission, ans.index, [str(c) for c in classes]))
        index = {str(c): i for i, c in enumerate(classes)}
        y = ans[columns[0]].astype(str).map(index).to_numpy()
        return log_loss(y, sub)
    if metric in ("log_loss", "auc"):
        sub = probabilities(read_submission(submission, ans.index, columns))
        fn = log_loss if metric == "log_loss" else auc
        return fn(ans[columns].to_numpy(dtype=np.float64), sub.squeeze(axis=1) if len(columns) == 1 else sub)
    if metric.startswith("map@"):
        sub = read_submission(submission, ans.index, columns)
        return map_at_k(ans[columns[0]].astype(str).tolist(), sub[columns[0]].astype(str).tolist(),
                        int(metric[4:]))
    if metric not in NUMERIC:
        raise ValueError(f"unknown metric {metric!r}; known: {', '.join(DIRECTIONS)}")
    sub = numeric(read_submission(submission, ans.index, columns))
    return NUMERIC[metric](ans[columns].to_numpy(dtype=np.float64), sub)


def _label_metric(metric: str, truth: pd.Series, pred: pd.Series) -> float:
    # Labels compare as text so "3" and 3 match; integral floats ("3.0") are normalised first.
    def norm(s: pd.Series) -> np.ndarray:
        num = pd.to_numeric(s, errors="coerce")
        if num.notna().all() and (num == np.round(num)).all():
            return num.astype(np.int64).astype(str).to_numpy()
        return s.astype(str).to_numpy()
    t, p = norm(truth), norm(pred)
    if metric == "accuracy":
        return float(np.mean(t == p))
    from sklearn.metrics import f1_score
    return float(f1_score(t, p, average="macro", labels=np.unique(t)))


def map_at_k(truth: list[str], preds: list[str], k: int) -> float:
    """Mean average precision at k with one true label per row (the whale-categorization metric):
    1/rank of the true label among the first k space-separated predictions, 0 if absent."""
    total = 0.0
    for t, p in zip(truth, preds):
        guesses = p.split()[:k]
        if not guesses:
            raise ValueError("submission.csv: each row needs up to k space-separated labels")
        for rank, g in enumerate(guesses, 1):
            if g == t:
                total += 1.0 / rank
                break
    return total / len(truth)
