"""Run a task's starter and reference on fresh copies of its workspace and score them: how task.toml's
starter_score and reference_score are measured, and what tests/test_tasks.py checks.

Use:
    python -m fastagent.tasks check digits,wine-logloss      # prints scores and runtimes
    python -m fastagent.tasks check --split train --write    # also rewrites the task.toml scores

Scripts run through a fastagent.sandbox Pool when one is passed (open_pool gives one: the task
cache with its answers and the packaged raw datasets hidden, limits applied), else in a plain
subprocess with the workspace as cwd and one BLAS/OpenMP thread (trusted scripts only).
Scripts are seeded, so their scores are deterministic.

Before running anything, lint(task) lists what is wrong in the folder itself (a script without a
module docstring, an unknown metric, a direction that contradicts the metric); after the runs,
compare(...) lists what is wrong with the scores (the reference does not beat the starter,
task.toml's scores or alpha differ from the measured ones). Each problem names the file and field.
"""

from __future__ import annotations

import ast
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import Task, materialize, score_submission
from ._grading import DIRECTIONS, metric_direction

THREAD_ENV = {k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}


@dataclass
class Run:
    script: str
    ok: bool
    wall_s: float
    output: str
    score: float | None = None
    error: str = ""
    workspace: Path | None = None  # the copy the script ran in


def open_pool(hide: list[Path], workers: int = 2) -> Any:
    """A fastagent.sandbox Pool hiding `hide` from the scripts (the pool itself hides every
    non-code file of the installed packages, the bundled tasks' raw data included)."""
    from fastagent.sandbox import Pool
    return Pool(workers=workers, hide=list(hide))


def run_script(workspace: Path, script: str, timeout_s: float, pool: Any = None) -> Run:
    """Run `python script` in `workspace`: through `pool` (a fastagent.sandbox Pool) when given,
    else in a subprocess with one BLAS/OpenMP thread."""
    t0 = time.perf_counter()
    if pool is not None:
        from fastagent.sandbox import Limits
        res = pool.run(workspace=workspace, script=script,
                       limits=Limits(wall_s=timeout_s, memory_mb=8192), readonly=[workspace / "data"])
        return Run(script, res.cause == "ok", res.wall_s, res.output)
    env = {**os.environ, **THREAD_ENV}
    try:
        p = subprocess.run([sys.executable, script], cwd=workspace, env=env, capture_output=True,
                           text=True, timeout=timeout_s)
        return Run(script, p.returncode == 0, time.perf_counter() - t0, p.stdout + p.stderr)
    except subprocess.TimeoutExpired as e:
        return Run(script, False, time.perf_counter() - t0, f"timeout after {timeout_s}s: {e.stdout}")


def check_task(task: Task, cache: Path, seed: int = 0, scripts: tuple[str, ...] = ("train.py", "reference.py"),
               scratch: Path | None = None, pool: Any = None, keep: bool = False) -> list[Run]:
    """Materialize `task` under `cache`, run each script on its own fresh copy of the workspace
    (under `scratch`, which must lie outside `cache` when a pool hides `cache`), score its
    submission.csv. With keep=True the copies stay (Run.output names them) for further checks."""
    workspace, answers = materialize(task, cache, seed)
    runs = []
    for script in scripts:
        ws = Path(tempfile.mkdtemp(prefix=f"{task.name}-{Path(script).stem}-", dir=scratch)) / "ws"
        shutil.copytree(workspace, ws)
        if script != "train.py":
            shutil.copy(task.dir / script, ws / script)
        run = run_script(ws, script, task.time_limit_s, pool)
        run.workspace = ws
        if run.ok:
            try:
                run.score = score_submission(task, ws, answers)
            except ValueError as e:
                run.ok, run.error = False, str(e)
        runs.append(run)
        if not keep:
            shutil.rmtree(ws.parent, ignore_errors=True)
    return runs


SCRIPTS = ("train.py", "reference.py", "prepare.py", "evaluate.py")


def lint(task: Task) -> list[str]:
    """Problems visible without running anything, each naming the file and field."""
    out = []
    for name in SCRIPTS:
        path = task.dir / name
        if not path.is_file():
            out.append(f"{path}: missing (every task has {', '.join(SCRIPTS)})")
            continue
        try:
            doc = ast.get_docstring(ast.parse(path.read_text(), filename=str(path)))
        except SyntaxError as e:
            out.append(f"{path}: line {e.lineno}: {e.msg}")
            continue
        if not doc:
            out.append(f"{path}: no module docstring (say what the script does and how to run it)")
    toml = task.dir / "task.toml"
    want = metric_direction(task.metric)
    if want is None:
        out.append(f"{toml}: metric {task.metric!r} is not a known metric (known: {', '.join(DIRECTIONS)})")
    elif task.direction != want:
        better = "higher" if want == "max" else "lower"
        out.append(f"{toml}: direction {task.direction!r} contradicts metric {task.metric!r} "
                   f"({better} is better: direction = {want!r})")
    return out


def tolerance(task: Task, starter: float, reference: float) -> float:
    """How far a re-measured score may drift from task.toml's (other library versions)."""
    return max(1e-4, 0.05 * abs(reference - starter))


def compare(task: Task, starter: float, reference: float, listed: bool = True) -> list[str]:
    """Problems with measured scores: the reference must beat the starter; with listed=True,
    task.toml's starter_score, reference_score and alpha must match the measurement."""
    toml = task.dir / "task.toml"
    if task.sign * (reference - starter) <= 0:
        return [f"{task.dir / 'reference.py'}: reference_score {reference:.6g} does not beat starter_score "
                f"{starter:.6g} ({task.metric}, direction {task.direction})"]
    if not listed:
        return []
    out, tol = [], tolerance(task, starter, reference)
    for key, measured in (("starter_score", starter), ("reference_score", reference)):
        value = getattr(task, key)
        if math.isnan(value):
            out.append(f"{toml}: {key} is missing (measured {measured:.6g}): run check --write")
        elif abs(value - measured) > tol:
            out.append(f"{toml}: {key} = {value:.6g} but measured {measured:.6g} (tolerance {tol:.2g}): "
                       f"run check --write if the change is intended")
    want = alpha_for(task.starter_score, task.reference_score)
    if not out and abs(task.alpha - want) > 0.01 * want:
        out.append(f"{toml}: alpha = {task.alpha:.6g} but 4 / |reference_score - starter_score| = {want:.6g}")
    return out


def alpha_for(starter: float, reference: float) -> float:
    """Reward scale: a move from the starter to the reference gives sigmoid(4) ~ 0.98."""
    gap = abs(reference - starter)
    return float(f"{4.0 / gap:.3g}") if gap > 0 else 1.0


def write_scores(task: Task, starter: float, reference: float) -> None:
    """Rewrite starter_score, reference_score and alpha in the task's task.toml; a missing line is
    added after the one before it (direction, starter_score, reference_score)."""
    path = task.dir / "task.toml"
    text = path.read_text()
    after = "direction"
    for key, value in (("starter_score", starter), ("reference_score", reference),
                       ("alpha", alpha_for(starter, reference))):
        # Keep a trailing comment on the line, replace only the value.
        text, n = re.subn(rf"(?m)^{key}\s*=[^#\n]*?(\s*#.*)?$", lambda m: f"{key} = {value:.6g}" + (m[1] or ""), text)
        if n == 0:
            note = "  # 4 / |reference - starter|: the starter-to-reference move earns sigmoid(4) ~ 0.98" * (key == "alpha")
            text, n = re.subn(rf"(?m)^({after}\s*=.*)$", lambda m: f"{m[1]}\n{key} = {value:.6g}{note}", text, count=1)
        if n != 1:
            raise ValueError(f"{path}: expected exactly one '{key} =' line")
        after = key
    path.write_text(text)
