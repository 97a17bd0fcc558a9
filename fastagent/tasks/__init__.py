"""The offline ML task suite: one folder per task, plus a loader for competitions in MLE-bench layout.

A task folder `fastagent/tasks/<name>/` holds `task.toml` (name, split, metric, direction,
time_limit_s, source; starter_score, reference_score and alpha as measured by `check --write`;
optional `hide`), `description.md` (what the agent reads), `prepare.py` (`prepare(workspace,
answers, seed)`: data from a PyPI package, split with a fixed seed), `train.py` (the weak starter
the agent improves), `evaluate.py` (`score(submission, answers)`) and `reference.py` (a known
stronger solution, run by the tests). A new task is a new folder. Outside tasks are loaded the
same way: get_task takes a folder path as well as a name, and the folders listed in the
environment variable FASTAGENT_TASK_DIRS (os.pathsep-separated; each a parent of task folders or
a task folder itself) join the suite. Two folders with the same task name are an error.

Use:
    from fastagent.tasks import list_tasks, get_task, materialize, score_submission, starter_score
    task = get_task("digits")                       # or get_task("/path/to/my-task")
    root = Path("/tmp/fa-tasks")                    # hide it from agent code: Pool(hide=[root, *hide_paths([task])])
    workspace, answers = materialize(task, root, seed=0)   # cached, read-only data
    ... run a copy of workspace/train.py (it writes submission.csv) ...
    print(score_submission(task, copy_of_workspace, answers), task.direction)
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
           "hide_paths", "load_mlebench"]

HERE = Path(__file__).resolve().parent
SPLITS = ("train", "heldout")
_REQUIRED = ("name", "split", "metric", "direction", "time_limit_s")


@dataclass(frozen=True)
class Task:
    name: str  # folder name, unique
    split: str  # train | heldout (mlebench for loaded competitions)
    metric: str  # accuracy, rmse, log_loss, auc, qwk, ... (see _grading.py)
    direction: str  # max | min: which way is better
    starter_score: float  # the starter train.py's test score on the seed-0 data (NaN: not measured)
    reference_score: float  # reference.py's test score on the seed-0 data (NaN: not measured)
    alpha: float  # reward scale in sigmoid(alpha * sign * (m' - m)) (1 until measured)
    time_limit_s: float  # wall-clock budget for one run of a training script
    dir: Path  # the task folder
    description: str  # description.md: what the agent reads
    median_score: float = math.nan  # MLE-bench: the leaderboard's median team (for evaluation only)
    hide: tuple[Path, ...] = ()  # task.toml `hide`: more paths agent code must not read (absolute)

    @property
    def sign(self) -> int:
        """+1 where higher is better, -1 where lower is better."""
        return 1 if self.direction == "max" else -1


def _task_dirs() -> dict[str, Path]:
    """Task folders by name: the bundled ones, then FASTAGENT_TASK_DIRS' (parents of task folders,
    or task folders). A name that two folders define is an error: caches are keyed by name."""
    entries = [Path(p).expanduser() for p in os.environ.get("FASTAGENT_TASK_DIRS", "").split(os.pathsep) if p]
    for e in entries:
        if not e.is_dir():
            raise ValueError(f"FASTAGENT_TASK_DIRS names {e}, which is not a folder")
    out: dict[str, Path] = {}
    for parent in [HERE, *entries]:
        children = [parent] if (parent / "task.toml").is_file() else sorted(parent.iterdir())
        for d in (c.resolve() for c in children if (c / "task.toml").is_file()):
            _claim(out, d)
    return dict(sorted(out.items()))


def _claim(names: dict[str, Path], folder: Path) -> None:
    other = names.setdefault(folder.name, folder)
    if other != folder:
        what = "a bundled task" if other.parent == HERE else "another task"
        raise ValueError(f"task name {folder.name!r} of {folder} collides with {what} at {other}: "
                         f"rename the folder and its task.toml name")


def _hide_path(entry: object, toml: Path) -> Path | None:
    """One task.toml `hide` entry as an absolute path; None for a package that is not installed."""
    if isinstance(entry, str) and entry.startswith("/"):
        return Path(entry).resolve()
    package, sep, rel = entry.partition(":") if isinstance(entry, str) else ("", "", "")
    if not (sep and package.isidentifier() and rel and not rel.startswith("/")):
        raise ValueError(f"{toml}: hide entry {entry!r} must be an absolute path or 'package:relpath'")
    spec = importlib.util.find_spec(package)  # top-level name: finds it without importing it
    if spec is None:
        return None  # not installed: nothing of it to hide
    base = Path(list(spec.submodule_search_locations)[0]) if spec.submodule_search_locations else Path(spec.origin).parent
    return (base / rel).resolve()


def _number(meta: dict, key: str, default: float, toml: Path) -> float:
    value = meta.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{toml}: {key} must be a number, got {value!r}")
    return float(value)


def _load_task(folder: Path) -> Task:
    toml = folder / "task.toml"
    try:
        meta = tomllib.loads(toml.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{toml} is not valid TOML: {e}") from None
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise ValueError(f"{toml} lacks {', '.join(missing)}: see the README's Task format")
    if meta["split"] not in SPLITS or meta["direction"] not in ("max", "min"):
        raise ValueError(f"{toml}: split must be train|heldout and direction max|min, "
                         f"got {meta['split']!r} and {meta['direction']!r}")
    if meta["name"] != folder.name:
        raise ValueError(f"{toml}: name {meta['name']!r} must equal the folder name")
    for f in ("description.md", "prepare.py", "train.py", "evaluate.py"):
        if not (folder / f).is_file():
            raise ValueError(f"task folder {folder} lacks {f}: see the README's Task format")
    hide = meta.get("hide", [])
    if not isinstance(hide, list):
        raise ValueError(f"{toml}: hide must be a list of paths, got {hide!r}")
    return Task(name=meta["name"], split=meta["split"], metric=str(meta["metric"]),
                direction=meta["direction"], starter_score=_number(meta, "starter_score", math.nan, toml),
                reference_score=_number(meta, "reference_score", math.nan, toml),
                alpha=_number(meta, "alpha", 1.0, toml), time_limit_s=_number(meta, "time_limit_s", 0, toml),
                dir=folder, description=(folder / "description.md").read_text(),
                hide=tuple(p for p in (_hide_path(e, toml) for e in hide) if p is not None))


def list_tasks(split: str = "all") -> list[Task]:
    """Tasks of a split ("train" | "heldout" | "all") or a comma-separated list of task names
    and task folder paths."""
    if split == "all" or split in SPLITS:
        tasks = [_load_task(d) for d in _task_dirs().values()]
        return [t for t in tasks if split in ("all", t.split)]
    return [get_task(name.strip()) for name in split.split(",") if name.strip()]


def get_task(name: str | Path) -> Task:
    """The task called `name`, or the task folder at path `name` (a Path, or text with a '/' or a
    leading '.' or '~'); ValueError naming the closest task on a typo, or the collision when the
    folder's task name is already taken by another folder."""
    dirs = _task_dirs()
    text = str(name)
    is_path = isinstance(name, Path) or "/" in text or text.startswith((".", "~")) or (
        text not in dirs and (Path(text) / "task.toml").is_file())
    if is_path:
        folder = Path(text).expanduser().resolve()
        if not (folder / "task.toml").is_file():
            raise ValueError(f"{folder} is not a task folder: it has no task.toml")
        _claim(dirs, folder)
        return _load_task(folder)
    if text not in dirs:
        close = difflib.get_close_matches(text, list(dirs), n=1, cutoff=0.0)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"unknown task '{text}'{hint} (python -m fastagent.tasks list shows all)")
    return _load_task(dirs[text])


def hide_paths(tasks: list[Task]) -> list[Path]:
    """Every path the tasks' task.toml `hide` lists, deduplicated: pass them to the sandbox pool's
    hide= along with the task cache root."""
    return sorted({p for t in tasks for p in t.hide})


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
    workspace, _ = materialize(task, root, seed)
    cache = workspace.parent / "starter.json"
    with open(workspace.parent / ".starter.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # per open file: also serialises threads of one process
        if cache.is_file():
            return float(json.loads(cache.read_text())["score"])
        score, wall_s = _measure_starter(task, root, seed, pool)
        tmp = cache.with_name(f".starter-{os.getpid()}-{uuid.uuid4().hex[:8]}.json")
        tmp.write_text(json.dumps({"task": task.name, "seed": seed, "score": score, "wall_s": wall_s}) + "\n")
        os.replace(tmp, cache)  # atomic: a reader never sees half a file
    return score


def _measure_starter(task: Task, root: Path, seed: int, pool: Any) -> tuple[float, float]:
    from ._check import check_task  # _check imports this module
    prefix = f".starter-{task.name}-{seed}-"
    _remove_stale(root, prefix)
    scratch = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=root))
    try:  # check_task: a fresh copy of the pristine workspace, the run, the score
        run = check_task(task, root, seed, scripts=("train.py",), scratch=scratch, pool=pool)[0]
        where = f"the starter of task {task.name!r} at seed {seed}"
        if run.error:
            raise ValueError(f"{where} wrote a bad submission: {run.error}\n{run.output[-2000:]}")
        if not run.ok:
            raise ValueError(f"{where} failed:\n{run.output[-2000:]}")
        score = run.score
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
