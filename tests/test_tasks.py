"""Tests for the offline task suite (fastagent/tasks): the suite's shape and metadata, the `list`
command, materialization (cached, read-only, answers outside the workspace, crash-safe), the
evaluators' rejection of bad submissions, the metrics, the MLE-bench loader on a fixture
competition, the sandbox hiding answers and packaged labels, and (slow) every starter and
reference run end to end through the sandbox pool, scoring as task.toml lists.

Run: .venv/bin/pytest tests/test_tasks.py            (about 1 minute on 2 cores with the sandbox
                                                     pool; about 3 with plain subprocesses)
     .venv/bin/pytest tests/test_tasks.py -m 'not slow'   (seconds)
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fastagent.tasks import get_task, list_tasks, load_mlebench, materialize, score_submission
from fastagent.tasks import _grading
from fastagent.tasks._check import check_task, open_pool, run_script

FIXTURE = Path(__file__).parent / "fixtures" / "mlebench" / "tiny-iris"
TASKS = list_tasks()
METRICS = {"accuracy", "macro_f1", "log_loss", "auc", "rmse", "mae", "rmsle", "qwk", "pearson", "map@3"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("task-cache")


# --- the suite's shape ---------------------------------------------------------------------------

def test_suite_has_the_paper_split_sizes_and_diverse_tasks():
    splits = [t.split for t in TASKS]
    assert splits.count("train") >= 9 and splits.count("heldout") >= 10
    assert len({t.name for t in TASKS}) == len(TASKS)
    assert len({t.metric for t in TASKS}) >= 8  # varied metrics, as in the paper's Kaggle tasks


@pytest.mark.parametrize("task", TASKS, ids=lambda t: t.name)
def test_task_metadata_is_complete_and_consistent(task):
    assert task.metric in METRICS
    assert task.direction == ("min" if task.metric in ("log_loss", "rmse", "mae", "rmsle") else "max")
    assert task.sign == (1 if task.direction == "max" else -1)
    gap = task.sign * (task.reference_score - task.starter_score)
    # Measured headroom: the reference beats the starter by at least 3% of the starter's score.
    assert gap > 0.03 * abs(task.starter_score), (task.starter_score, task.reference_score)
    assert task.alpha == pytest.approx(4.0 / abs(task.reference_score - task.starter_score), rel=0.01)
    assert 0 < task.time_limit_s <= 600
    assert "submission.csv" in task.description and "data/" in task.description
    assert (task.dir / "reference.py").is_file()
    for f in ("train.py", "reference.py", "prepare.py", "evaluate.py"):
        assert (task.dir / f).read_text().startswith('"""'), f"{task.name}/{f} needs a docstring"


def test_list_json_prints_one_object_per_task():
    out = subprocess.run([sys.executable, "-m", "fastagent.tasks", "list", "--json"],
                         capture_output=True, text=True, check=True).stdout
    rows = json.loads(out)
    assert [r["name"] for r in rows] == [t.name for t in TASKS]
    for r in rows:
        assert set(r) >= {"name", "split", "metric", "direction", "starter_score", "reference_score"}
    heldout = json.loads(subprocess.run([sys.executable, "-m", "fastagent.tasks", "list", "--json",
                                         "--split", "heldout"], capture_output=True, text=True,
                                        check=True).stdout)
    assert {r["split"] for r in heldout} == {"heldout"}


def test_list_tasks_by_names_and_typo_hint():
    assert [t.name for t in list_tasks("digits, car-mpg")] == ["digits", "car-mpg"]
    with pytest.raises(ValueError, match="did you mean 'digits'"):
        get_task("digitz")


# --- materialization -----------------------------------------------------------------------------

def test_materialize_is_cached_read_only_and_hides_answers(cache):
    task = get_task("car-mpg")
    stale = cache / ".tmp-car-mpg-0-999999999-deadbeef"  # left by a killed process (no such pid)
    (stale / "workspace").mkdir(parents=True)
    ws, ans = materialize(task, cache, seed=0)
    assert not stale.exists()
    assert sorted(p.name for p in ws.iterdir()) == ["data", "description.md", "train.py"]
    assert not ans.is_relative_to(ws) and not ws.is_relative_to(ans)
    test = pd.read_csv(ws / "data" / "test.csv")
    assert "Miles_per_Gallon" not in test.columns
    assert set(pd.read_csv(ans / "test.csv")["id"]) == set(test["id"])
    for f in (ws / "data").iterdir():
        assert not os.access(f, os.W_OK) or os.geteuid() == 0  # root ignores mode bits
        assert not f.stat().st_mode & 0o222
    stamp = (ws / "data" / "train.csv").stat().st_mtime_ns
    assert materialize(task, cache, seed=0) == (ws, ans)  # cached: not rebuilt
    assert (ws / "data" / "train.csv").stat().st_mtime_ns == stamp
    ws1, _ = materialize(task, cache, seed=1)  # another seed, another split
    assert not pd.read_csv(ws1 / "data" / "test.csv")["id"].equals(test["id"])


def test_materialize_leaves_nothing_behind_when_prepare_fails(tmp_path, monkeypatch):
    folder = tmp_path / "tasks" / "broken"
    shutil.copytree(get_task("car-mpg").dir, folder)
    (folder / "task.toml").write_text((folder / "task.toml").read_text().replace('"car-mpg"', '"broken"'))
    (folder / "prepare.py").write_text('"""Fails half-way."""\ndef prepare(workspace, answers, seed):\n'
                                       '    (workspace / "data").mkdir()\n    raise RuntimeError("boom")\n')
    monkeypatch.setenv("FASTAGENT_TASK_DIRS", str(tmp_path / "tasks"))
    with pytest.raises(RuntimeError, match="boom"):
        materialize(get_task("broken"), tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


# --- evaluators ----------------------------------------------------------------------------------

@pytest.mark.parametrize("task", TASKS, ids=lambda t: t.name)
def test_evaluator_rejects_missing_and_malformed_submissions(task, cache, tmp_path):
    _, ans = materialize(task, cache)
    with pytest.raises(ValueError, match="no submission"):
        score_submission(task, tmp_path, ans)
    (tmp_path / "submission.csv").write_text("id,wrong_column\n1,2\n")
    with pytest.raises(ValueError, match="lacks column"):
        score_submission(task, tmp_path, ans)
    (tmp_path / "submission.csv").write_bytes(b"\x00\xff\xfe garbage")
    with pytest.raises(ValueError):
        score_submission(task, tmp_path, ans)


def test_grading_metrics_match_sklearn():
    from sklearn import metrics
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p = np.clip(y * 0.6 + rng.random(200) * 0.5, 0, 1)
    assert _grading.auc(y, p) == pytest.approx(metrics.roc_auc_score(y, p))
    assert _grading.log_loss(y, p) == pytest.approx(metrics.log_loss(y, np.clip(p, 1e-15, 1 - 1e-15)))
    yk = rng.integers(0, 3, 200)
    pk = rng.dirichlet(np.ones(3), 200)
    assert _grading.log_loss(yk, pk) == pytest.approx(metrics.log_loss(yk, pk))
    assert _grading.qwk(yk, yk + 0.4) == pytest.approx(1.0)
    assert _grading.map_at_k(["a", "b", "c"], ["a b", "x b", "x y z"], 3) == pytest.approx(0.5)
    assert _grading.rmsle(np.array([[1.0, 3.0]]), np.array([[1.0, 3.0]])) == 0.0
    with pytest.raises(ValueError, match=">= 0"):
        _grading.rmsle(np.array([1.0]), np.array([-1.0]))


# --- MLE-bench layout ----------------------------------------------------------------------------

def test_mlebench_fixture_loads_materializes_and_grades(tmp_path):
    task = load_mlebench(FIXTURE)
    assert (task.name, task.split, task.metric, task.direction) == ("tiny-iris", "mlebench", "accuracy", "max")
    assert (task.median_score, task.reference_score) == (0.9556, 1.0)  # leaderboard median and top
    assert math.isnan(task.starter_score)  # measured by starter_score, never the median
    assert "Tiny Iris" in task.description
    ws, ans = materialize(task, tmp_path / "cache")
    assert sorted(p.name for p in (ws / "data").iterdir()) == ["sample_submission.csv", "test.csv", "train.csv"]
    assert (ans / "test.csv").is_file() and not ans.is_relative_to(ws)
    work = tmp_path / "work"
    shutil.copytree(ws, work)
    run = run_script(work, "train.py", 60)
    assert run.ok, run.output
    baseline = score_submission(task, work, ans)  # the starter copies the all-setosa sample
    answers = pd.read_csv(ans / "test.csv")
    assert baseline == pytest.approx((answers["species"] == "setosa").mean())
    answers.to_csv(work / "submission.csv", index=False)
    assert score_submission(task, work, ans) == 1.0
    answers.rename(columns={"species": "label"}).to_csv(work / "submission.csv", index=False)
    with pytest.raises(ValueError, match="columns must be id,species"):
        score_submission(task, work, ans)
    with pytest.raises(ValueError, match="raw data"):
        load_mlebench(FIXTURE, data_dir=tmp_path / "nowhere")


# --- every starter and reference, end to end (slow) ---------------------------------------------

@pytest.fixture(scope="module")
def pool(cache):
    with open_pool(hide=[cache]) as p:
        yield p


def _tolerance(task) -> float:
    # Scripts are seeded and single-threaded; the slack covers other library versions only.
    return max(1e-4, 0.05 * abs(task.reference_score - task.starter_score))


@pytest.mark.slow
@pytest.mark.parametrize("task", TASKS, ids=lambda t: t.name)
def test_starter_and_reference_score_as_listed(task, cache, pool, tmp_path):
    starter, reference = check_task(task, cache, scratch=tmp_path, pool=pool, keep=True)
    for run in (starter, reference):
        assert run.ok, f"{run.script}: {run.error}\n{run.output[-3000:]}"
        assert "validation" in run.output  # each script reports its validation score
        assert not (run.workspace / "answers").exists()
    assert starter.score == pytest.approx(task.starter_score, abs=_tolerance(task))
    assert reference.score == pytest.approx(task.reference_score, abs=_tolerance(task))
    assert task.sign * (reference.score - starter.score) > 0.5 * abs(task.reference_score - task.starter_score)
    # A valid submission broken in the usual ways is rejected with a clear message.
    sub_path = starter.workspace / "submission.csv"
    sub = pd.read_csv(sub_path)
    _, ans = materialize(task, cache)
    sub.iloc[:-1].to_csv(sub_path, index=False)
    with pytest.raises(ValueError, match="misses 1 of"):
        score_submission(task, starter.workspace, ans)
    broken = sub.copy()
    broken.iloc[0, 1] = np.nan
    broken.to_csv(sub_path, index=False)
    with pytest.raises(ValueError, match="NaN"):
        score_submission(task, starter.workspace, ans)
    assert math.isfinite(starter.score)


def test_agent_code_cannot_read_answers_or_packaged_labels(cache, pool, tmp_path):
    """Through the sandbox pool, the hidden answers and the packaged raw source of this task are
    unreadable (tests/test_sandbox_adversarial.py searches every task's source everywhere)."""
    assert pool is not None, "fastagent.sandbox is missing: agent code would see the answers"
    from fastagent.tasks._prepare import package_file
    ws, ans = materialize(get_task("name-gender"), cache)
    work = tmp_path / "ws"
    shutil.copytree(ws, work)
    targets = [ans / "test.csv", package_file("gender_guesser", "data/nam_dict.txt")]
    (work / "peek.py").write_text(
        "import sys\nfor path in sys.argv[1:]:\n    try:\n        open(path, 'rb').read(1)\n"
        "        print('READABLE', path)\n    except OSError:\n        pass\nprint('done')\n")
    res = pool.run(workspace=work, script="peek.py", args=[str(t) for t in targets])
    assert res.cause == "ok" and "done" in res.output, res.output
    assert "READABLE" not in res.output, res.output
