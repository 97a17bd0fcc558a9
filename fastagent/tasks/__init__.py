"""The offline ML task suite: one folder per task, plus a loader for competitions in MLE-bench layout.

A task folder `fastagent/tasks/<name>/` holds `task.toml` (name, split, metric, direction,
starter_score, reference_score, alpha, source, time_limit_s), `description.md` (what the agent reads),
`prepare.py` (`prepare(workspace, answers, seed)`: data from a PyPI package, split with a fixed seed),
`train.py` (the weak starter the agent improves), `evaluate.py` (`score(submission, answers)`) and
`reference.py` (a known stronger solution, run by the tests). A new task is a new folder; folders
listed in the environment variable FASTAGENT_TASK_DIRS (os.pathsep-separated parents) are found too.

Use:
    from fastagent.tasks import list_tasks, get_task, materialize, score_submission
    task = get_task("digits")
    workspace, answers = materialize(task, Path("/tmp/fa-tasks"), seed=0)   # cached, read-only data
    ... run workspace/train.py (it writes workspace/submission.csv) ...
    print(score_submission(task, workspace, answers), task.direction)
    start = starter_score(task, root, seed, pool)   # the metric an episode starts from (cached)

    python -m fastagent.tasks list [--json] [--split train|heldout|all]
"""

from __future__ import annotations

import difflib
import fcntl
import importlib.util
import json
import math
import os
import shutil
import stat
import tempfile
import tomllib
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = ["Task", "list_tasks", "get_task", "materialize", "score_submission", "starter_score",
           "load_mlebench"]

HERE = Path(__file__).resolve().parent
SPLITS = ("train", "heldout")
_REQUIRED = ("name", "split", "metric", "direction", "starter_score", "reference_score", "alpha",
             "time_limit_s")


@dataclass(frozen=True)
class Task:
    name: str  # folder name, unique
    split: str  # train | heldout (mlebench for loaded competitions)
    metric: str  # accuracy, rmse, log_loss, auc, qwk, ... (see _grading.py)
    direction: str  # max | min: which way is better
    starter_score: float  # the starter train.py's test score on the seed-0 data
    reference_score: float  # reference.py's test score on the seed-0 data
    alpha: float  # reward scale in sigmoid(alpha * sign * (m' - m))
    time_limit_s: float  # wall-clock budget for one run of a training script
    dir: Path  # the task folder
    description: str  # description.md: what the agent reads
    median_score: float = math.nan  # MLE-bench: the leaderboard's median team (for evaluation only)

    @property
    def sign(self) -> int:
        """+1 where higher is better, -1 where lower is better."""
        return 1 if self.direction == "max" else -1


def _task_dirs() -> list[Path]:
    parents = [HERE] + [Path(p) for p in os.environ.get("FASTAGENT_TASK_DIRS", "").split(os.pathsep) if p]
    return sorted((d for p in parents if p.is_dir() for d in p.iterdir() if (d / "task.toml").is_file()),
                  key=lambda d: d.name)


def _load_task(folder: Path) -> Task:
    meta = tomllib.loads((folder / "task.toml").read_text())
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise ValueError(f"{folder / 'task.toml'} lacks {', '.join(missing)}: see the README's Task format")
    if meta["split"] not in SPLITS or meta["direction"] not in ("max", "min"):
        raise ValueError(f"{folder / 'task.toml'}: split must be train|heldout and direction max|min, "
                         f"got {meta['split']!r} and {meta['direction']!r}")
    if meta["name"] != folder.name:
        raise ValueError(f"{folder / 'task.toml'}: name {meta['name']!r} must equal the folder name")
    for f in ("description.md", "prepare.py", "train.py", "evaluate.py"):
        if not (folder / f).is_file():
            raise ValueError(f"task folder {folder} lacks {f}: see the README's Task format")
    return Task(name=meta["name"], split=meta["split"], metric=meta["metric"],
                direction=meta["direction"], starter_score=float(meta["starter_score"]),
                reference_score=float(meta["reference_score"]), alpha=float(meta["alpha"]),
                time_limit_s=float(meta["time_limit_s"]), dir=folder,
                description=(folder / "description.md").read_text())


def list_tasks(split: str = "all") -> list[Task]:
    """Tasks of a split ("train" | "heldout" | "all") or a comma-separated list of task names."""
    tasks = [_load_task(d) for d in _task_dirs()]
    if split == "all":
        return tasks
    if split in SPLITS:
        return [t for t in tasks if t.split == split]
    return [get_task(name.strip()) for name in split.split(",") if name.strip()]


def get_task(name: str) -> Task:
    """The task called `name`; ValueError naming the closest task on a typo."""
    dirs = {d.name: d for d in _task_dirs()}
    if name not in dirs:
        close = difflib.get_close_matches(name, list(dirs), n=1, cutoff=0.0)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"unknown task '{name}'{hint} (python -m fastagent.tasks list shows all)")
    return _load_task(dirs[name])


_modules: dict[Path, ModuleType] = {}


def _module(path: Path) -> ModuleType:
    """Import a task file by path (task folders have dashes, so they are not importable packages)."""
    path = path.resolve()
    if path not in _modules:
        name = f"fastagent_task_{abs(hash(str(path)))}_{path.stem}"
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        _modules[path] = mod
    return _modules[path]


def _is_mlebench(task: Task) -> bool:
    return task.split == "mlebench"


def _read_only(folder: Path) -> None:
    # Files only: read-only folders would stop the owner's own rmtree later.
    for p in folder.rglob("*"):
        if p.is_file():
            p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def _remove_stale(root: Path, prefix: str) -> None:
    """Remove temporary build folders left by killed processes (their pid no longer runs)."""
    for old in root.glob(prefix + "*"):
        pid = old.name[len(prefix):].split("-")[0]
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(old, ignore_errors=True)
        except (ValueError, PermissionError):  # not our naming, or another user's live process
            pass


def materialize(task: Task, root: Path, seed: int = 0) -> tuple[Path, Path]:
    """Build (once) the pristine workspace and the hidden answers of `task` for `seed`.

    Returns (root/<name>-<seed>/workspace, root/<name>-<seed>/answers). The workspace holds
    train.py, description.md and data/ (files read-only); the answers folder sits beside it, outside
    the workspace. Idempotent and crash-safe: built in a temporary folder, then renamed into place,
    so a crash leaves no half-built cache entry and concurrent callers agree on one result.
    """
    root = Path(root)
    dest = root / f"{task.name}-{seed}"
    if (dest / ".complete").is_file():
        return dest / "workspace", dest / "answers"
    _remove_stale(root, f".tmp-{task.name}-{seed}-")
    tmp = root / f".tmp-{task.name}-{seed}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    workspace, answers = tmp / "workspace", tmp / "answers"
    workspace.mkdir(parents=True)
    answers.mkdir()
    try:
        if _is_mlebench(task):
            from ._mlebench import prepare as mle_prepare
            mle_prepare(task, workspace, answers)
        else:
            _module(task.dir / "prepare.py").prepare(workspace, answers, seed)
            shutil.copy(task.dir / "train.py", workspace / "train.py")
            shutil.copy(task.dir / "description.md", workspace / "description.md")
        _read_only(workspace / "data")
        _read_only(answers)
        (tmp / ".complete").write_text(f"{task.name} seed={seed}\n")
        try:
            os.rename(tmp, dest)
        except OSError:  # another process finished first: keep its result
            if not (dest / ".complete").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest / "workspace", dest / "answers"


def score_submission(task: Task, workspace: Path, answers: Path) -> float:
    """Score workspace/submission.csv against the hidden answers (runs in the trusted process).
    Raises ValueError with a clear message on a missing or malformed submission."""
    if _is_mlebench(task):
        from ._mlebench import score as mle_score
        return mle_score(task, Path(workspace) / "submission.csv", Path(answers))
    return float(_module(task.dir / "evaluate.py").score(Path(workspace) / "submission.csv", Path(answers)))


def starter_score(task: Task, root: Path, seed: int, pool: Any) -> float:
    """The starter train.py's test score on the `seed` data: the metric an episode starts from.

    Materializes the task under `root`, runs the pristine starter in a scratch copy under `root`
    (through `pool`, a fastagent.sandbox Pool; None runs it as a plain subprocess, trusted scripts
    only) with the task's time limit, scores its submission and caches the result in
    root/<name>-<seed>/starter.json ({"task", "seed", "score", "wall_s"}). One process measures,
    concurrent callers (threads or processes) wait for it and read the same file. A starter that
    fails or writes a bad submission raises ValueError with its output tail.
    """
    root = Path(root)
    workspace, answers = materialize(task, root, seed)
    cache = workspace.parent / "starter.json"
    with open(workspace.parent / ".starter.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # per open file: also serialises threads of one process
        if cache.is_file():
            return float(json.loads(cache.read_text())["score"])
        score, wall_s = _measure_starter(task, workspace, answers, root, seed, pool)
        tmp = cache.with_name(f".starter-{os.getpid()}-{uuid.uuid4().hex[:8]}.json")
        tmp.write_text(json.dumps({"task": task.name, "seed": seed, "score": score, "wall_s": wall_s}) + "\n")
        os.replace(tmp, cache)  # atomic: a reader never sees half a file
    return score


def _measure_starter(task: Task, workspace: Path, answers: Path, root: Path, seed: int,
                     pool: Any) -> tuple[float, float]:
    from ._check import run_script  # _check imports this module
    prefix = f".starter-{task.name}-{seed}-"
    _remove_stale(root, prefix)
    scratch = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=root))
    try:
        ws = scratch / "workspace"
        shutil.copytree(workspace, ws)
        run = run_script(ws, "train.py", task.time_limit_s, pool)
        where = f"the starter of task {task.name!r} at seed {seed}"
        if not run.ok:
            raise ValueError(f"{where} failed:\n{run.output[-2000:]}")
        try:
            score = score_submission(task, ws, answers)
        except ValueError as e:
            raise ValueError(f"{where} wrote a bad submission: {e}\n{run.output[-2000:]}") from None
        if not math.isfinite(score):
            raise ValueError(f"{where} scored {score}:\n{run.output[-2000:]}")
        return score, run.wall_s
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def load_mlebench(path: Path, data_dir: Path | None = None) -> Task:
    """A competition in the MLE-bench layout on disk (config.yaml, description.md, prepare.py,
    grade.py, optional leaderboard.csv); raw data in data_dir, else path/raw, else
    ~/.cache/mle-bench/data/<id>/raw. See _mlebench.py."""
    from ._mlebench import load
    return load(Path(path), data_dir)
