"""Tests for fastagent.tasks.starter_score: the measured starting metric of an episode, per task and
seed, run through the real sandbox pool on the real task data and cached in
root/<name>-<seed>/starter.json.

Run: .venv/bin/python -m pytest -q tests/test_starter_score.py      (about 30 s on 2 cores)
"""

from __future__ import annotations

import json
import math
import shutil
import threading
from pathlib import Path

import pandas as pd
import pytest

from fastagent.tasks import get_task, load_mlebench, materialize, starter_score
from fastagent.tasks._check import check_task, open_pool

FIXTURE = Path(__file__).parent / "fixtures" / "mlebench" / "tiny-iris"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("starter-root")


@pytest.fixture(scope="module")
def pool(root):
    with open_pool(hide=[root]) as p:
        yield p


def _leftovers(root: Path) -> list[Path]:
    """Scratch copies or temporary cache files that starter_score should have removed."""
    return sorted(p for p in root.rglob(".starter-*"))


@pytest.mark.parametrize("name", ["digits", "car-mpg", "wine-logloss"])
def test_seed_0_matches_task_toml_and_is_cached(name, root, pool):
    task = get_task(name)
    score = starter_score(task, root, 0, pool)
    # Starters are seeded; the slack covers library versions (as in test_tasks' tolerance).
    assert score == pytest.approx(task.starter_score, abs=max(1e-4, 0.05 * abs(task.reference_score - task.starter_score)))
    cache = root / f"{name}-0" / "starter.json"
    record = json.loads(cache.read_text())
    assert record["task"] == name and record["seed"] == 0 and record["score"] == score
    assert record["wall_s"] > 0
    # The cache is what a second call returns: a planted value comes back, nothing is re-run.
    cache.write_text(json.dumps({**record, "score": 123.0}))
    stamp = cache.stat().st_mtime_ns
    assert starter_score(task, root, 0, pool) == 123.0
    assert cache.stat().st_mtime_ns == stamp
    cache.write_text(json.dumps(record))
    assert _leftovers(root) == []


def test_other_seed_has_its_own_value(root, pool, tmp_path):
    task = get_task("car-mpg")  # rmse: a continuous score, equal at two seeds only by accident
    s0, s3 = starter_score(task, root, 0, pool), starter_score(task, root, 3, pool)
    assert s3 != s0
    # The value is the starter's score on seed 3's own split, as check_task measures it.
    run, = check_task(task, root, seed=3, scripts=("train.py",), scratch=tmp_path, pool=pool)
    assert run.ok and run.score == pytest.approx(s3, rel=1e-9)
    assert json.loads((root / "car-mpg-3" / "starter.json").read_text())["seed"] == 3


def test_concurrent_callers_agree_and_measure_once(root, pool, monkeypatch):
    import fastagent.tasks as tasks
    task = get_task("italy-power")
    calls = []
    real = tasks._measure_starter

    def counted(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(tasks, "_measure_starter", counted)
    results: list[float] = []
    threads = [threading.Thread(target=lambda: results.append(starter_score(task, root, 5, pool)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and len(set(results)) == 1 and math.isfinite(results[0])
    assert len(calls) == 1  # the others waited on the lock and read the cache
    assert _leftovers(root) == []


def test_failing_starter_raises_with_task_seed_and_output(tmp_path, pool, monkeypatch):
    folder = tmp_path / "tasks" / "broken-starter"
    shutil.copytree(get_task("car-mpg").dir, folder)
    (folder / "task.toml").write_text((folder / "task.toml").read_text().replace('"car-mpg"', '"broken-starter"'))
    (folder / "train.py").write_text('"""Fails."""\nprint("reading data")\nraise RuntimeError("starter boom")\n')
    monkeypatch.setenv("FASTAGENT_TASK_DIRS", str(tmp_path / "tasks"))
    root = tmp_path / "root"
    with pytest.raises(ValueError, match=r"(?s)'broken-starter' at seed 2 failed.*starter boom"):
        starter_score(get_task("broken-starter"), root, 2, pool)
    assert not (root / "broken-starter-2" / "starter.json").exists()
    assert _leftovers(root) == []
    # A starter that runs but writes no submission is reported the same way.
    (folder / "train.py").write_text('"""Writes nothing."""\nprint("done")\n')
    shutil.rmtree(root)
    with pytest.raises(ValueError, match="bad submission: no submission"):
        starter_score(get_task("broken-starter"), root, 2, pool)
    assert _leftovers(root) == []


def test_mlebench_starter_is_measured_and_the_median_kept_apart(tmp_path, pool):
    task = load_mlebench(FIXTURE)
    assert math.isnan(task.starter_score)  # never the leaderboard median
    assert (task.median_score, task.reference_score) == (0.9556, 1.0)
    score = starter_score(task, tmp_path, 0, pool)
    _, ans = materialize(task, tmp_path, 0)
    answers = pd.read_csv(ans / "test.csv")
    assert score == pytest.approx((answers["species"] == "setosa").mean())  # the copied sample
    assert score < task.median_score
