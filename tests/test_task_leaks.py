"""Order leaks: for every task and several seeds, a test row's label cannot be read off its position
in data/test.* or off its id better than chance.

Statistics (n test rows, labels taken from the hidden answers, aligned by id):
  * categorical target (classification and ranking metrics, qwk's ordinal labels included): A = the
    number of adjacent pairs
    (in file order, and in id order) with the same label. Under a random order each of the n - 1
    pairs agrees with probability p = sum_c n_c (n_c - 1) / (n (n - 1)), so A has mean (n - 1) p and,
    taking the pairs as independent (binomial), sd sqrt((n - 1) p (1 - p)). Bound: |A - mean| <= Z sd.
  * numeric target (rmse, mae, rmsle, pearson): Spearman's rho of the target against the position,
    and against the id. Under a random order rho has mean 0 and sd 1 / sqrt(n - 1). Bound:
    |rho| <= Z / sqrt(n - 1); for n < 30, where that exceeds 1 or the normal approximation is poor,
    the bound is instead the 1 - 6.3e-5 quantile of |rho| over 200,000 random orders of the same
    values (the same two-sided level as Z = 4).
  * ids carry no order: Spearman's rho of the id against the position, same bound.
  Z = 4: about 6.3e-5 two-sided per statistic, so the few hundred checked here stay quiet unless
  the order carries the label. With tiny test sets (airline-forecast: 12 rows, co2-forecast: 24)
  only a strong order (e.g. ids counting up) is detectable.
Multi-column targets are checked column by column; mnist-denoise, whose answers hold one row per
pixel, is checked on each test image's mean clean pixel value.

Measure (prints every statistic as a z-score, or rho against its bound):
    .venv/bin/python tests/test_task_leaks.py [NAME,NAME] [--seeds 0,1,2]
Run the tests: .venv/bin/python -m pytest -q tests/test_task_leaks.py   (about 1 minute)
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastagent.tasks import list_tasks, materialize

Z = 4.0
SEEDS = (0, 1, 2)
TASKS = list_tasks()


def test_labels_in_file_order(workspace: Path, answers: Path) -> pd.DataFrame:
    """The hidden test targets, one row per test row in data/test.* order, with its `id`."""
    csv = workspace / "data" / "test.csv"
    ids = pd.read_csv(csv)["id"].to_numpy() if csv.is_file() else np.load(workspace / "data" / "test.npz")["id"]
    ans = pd.read_csv(answers / "test.csv")
    if not set(ans["id"].astype(str)) >= set(map(str, ids)):  # per-pixel answers: "<image id>_<row>_<col>"
        ans = ans.assign(id=ans["id"].astype(str).str.split("_").str[0]).groupby("id", sort=False).mean()
    else:
        ans = ans.assign(id=ans["id"].astype(str)).set_index("id")
    out = ans.loc[[str(i) for i in ids]].reset_index(drop=True)
    out.insert(0, "id", ids)
    return out


test_labels_in_file_order.__test__ = False  # a helper, not a test


NUMERIC_METRICS = ("rmse", "mae", "rmsle", "pearson")
LEVEL = math.erfc(Z / math.sqrt(2))  # two-sided tail of a normal beyond Z sd: 6.3e-5


def agreement_z(y: np.ndarray) -> float:
    """(A - mean) / sd for the adjacent-pair agreement A of the sequence y (see the module doc)."""
    n = len(y)
    _, counts = np.unique(y, return_counts=True)
    p = float((counts * (counts - 1)).sum()) / (n * (n - 1))
    agree = int((y[1:] == y[:-1]).sum())
    sd = math.sqrt((n - 1) * p * (1 - p))
    return 0.0 if sd == 0 else (agree - (n - 1) * p) / sd


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = pd.Series(a).rank().to_numpy(), pd.Series(b).rank().to_numpy()
    return float(np.corrcoef(ra, rb)[0, 1]) if ra.std() > 0 and rb.std() > 0 else 0.0


def rho_bound(values: np.ndarray) -> float:
    """Bound on |Spearman rho| of `values` against the position under a random order."""
    n = len(values)
    if n >= 30:
        return Z / math.sqrt(n - 1)
    rng = np.random.default_rng(0)
    r = pd.Series(values).rank().to_numpy()
    perms = r[np.argsort(rng.random((200_000, n)), axis=1)]  # (200000, n) random orders
    pos = np.arange(n) - (n - 1) / 2
    rho = ((perms - perms.mean(axis=1, keepdims=True)) @ pos) / (perms.std(axis=1) * pos.std() * n)
    return float(np.quantile(np.abs(rho), 1 - LEVEL))


def leak_stats(task, root: Path, seed: int) -> list[tuple[str, float, float]]:
    """(what, statistic, bound) for every check on `task` at `seed`; a leak is |statistic| > bound."""
    df = test_labels_in_file_order(*materialize(task, root, seed))
    n, ids = len(df), df["id"].to_numpy()
    by_id = np.argsort(ids, kind="stable")
    out = [("id~position rho", spearman(ids, np.arange(n)), rho_bound(ids))] if np.issubdtype(ids.dtype, np.number) else []
    for col in df.columns[1:]:
        y = df[col]
        if task.metric not in NUMERIC_METRICS:
            v = y.astype(str).to_numpy()
            for order, seq in (("file", v), ("id", v[by_id])):
                same = float((seq[1:] == seq[:-1]).mean())
                out.append((f"{col}: agreement z, {order} order ({same:.0%} of pairs)", agreement_z(seq), Z))
        else:
            v = y.to_numpy(dtype=float)
            out += [(f"{col}: rho vs position", spearman(v, np.arange(n)), rho_bound(v)),
                    (f"{col}: rho vs id", spearman(v, ids), rho_bound(v))]
    return out


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("leak-cache")


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("task", TASKS, ids=lambda t: t.name)
def test_test_labels_cannot_be_read_from_row_order_or_ids(task, seed, root):
    stats = leak_stats(task, root, seed)
    assert stats
    leaks = [(what, round(s, 3), round(b, 3)) for what, s, b in stats if abs(s) > b]
    assert not leaks, f"{task.name} seed {seed}: order leaks (statistic, bound): {leaks}"


def test_the_statistics_catch_a_sorted_order():
    """The checks are not vacuous: a label-sorted or target-sorted order fails them."""
    y = np.repeat(np.arange(3), 12)  # wine-sized: 36 rows, 3 classes
    assert abs(agreement_z(y)) > Z
    assert abs(agreement_z(np.random.default_rng(0).permutation(y))) < Z
    x = np.linspace(0, 1, 200) + np.random.default_rng(0).normal(0, 0.3, 200)
    assert abs(spearman(x, np.arange(200))) > rho_bound(x)
    assert 0.8 < rho_bound(np.arange(12.0)) < 1.0  # 12 rows: only a near-monotone order is caught


def main(argv: list[str]) -> None:
    import argparse
    import tempfile
    ap = argparse.ArgumentParser(description="print the order-leak statistics of the task suite")
    ap.add_argument("names", nargs="?", default="all", help="comma-separated task names (default all)")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fa-leaks-") as tmp:
        for task in list_tasks(args.names):
            for seed in map(int, args.seeds.split(",")):
                for what, s, b in leak_stats(task, Path(tmp), seed):
                    flag = "LEAK" if abs(s) > b else "ok"
                    print(f"{task.name:<18} seed {seed}  {what:<46} {s:>8.3f}  bound {b:.3f}  {flag}")


if __name__ == "__main__":
    main(sys.argv[1:])
