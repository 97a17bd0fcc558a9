"""Command line for the task suite.

    python -m fastagent.tasks list [--json] [--split train|heldout|all|NAME,NAME]
    python -m fastagent.tasks check [TASKS] [--split S] [--root DIR] [--seed N] [--write]
    python -m fastagent.tasks materialize TASK DIR [--seed N]

TASK is a task name or the path of a task folder (with a '/': ./my-task, /data/tasks/my-task);
TASKS is a comma-separated list of them. `list` prints the suite (JSON: one object per task with
name, split, metric, direction, starter_score, reference_score, alpha). `check` lints each task
folder (module docstrings, metric name, direction), runs its starter and reference in the sandbox
pool, prints their scores and runtimes, and exits non-zero naming the file and field of every
problem: a lint failure, a script that fails, a reference that does not beat the starter, or
scores that differ from task.toml. With --write it stores the measured scores and alpha in
task.toml instead (adding the lines when task.toml has none yet). `materialize` builds a task's
workspace and hidden answers under DIR and prints both paths.

Outside tasks: set FASTAGENT_TASK_DIRS to folders (separated by ':', os.pathsep), each a parent
of task folders or a task folder itself; their tasks join the suite (list, check, get_task, the
Env) as if bundled. A task name defined by two folders (e.g. an outside copy of a bundled task
that keeps its name) is an error.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from . import Task, get_task, hide_paths, list_tasks, materialize


def _list(args: argparse.Namespace) -> None:
    tasks = list_tasks(args.split)
    if args.json:
        print(json.dumps([{"name": t.name, "split": t.split, "metric": t.metric, "direction": t.direction,
                           "starter_score": t.starter_score, "reference_score": t.reference_score,
                           "alpha": t.alpha} for t in tasks], indent=1))
        return
    print(f"{'name':<20} {'split':<8} {'metric':<10} {'dir':<4} {'starter':>9} {'reference':>9} {'alpha':>7}")
    for t in tasks:
        print(f"{t.name:<20} {t.split:<8} {t.metric:<10} {t.direction:<4} {t.starter_score:>9.4f} "
              f"{t.reference_score:>9.4f} {t.alpha:>7.3g}")


def _check(args: argparse.Namespace) -> int:
    from ._check import open_pool
    tasks = list_tasks(args.names or args.split)
    temp = []  # removed on every exit path: errors, Ctrl-C, SIGTERM
    try:
        cache = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="fa-tasks-"))
        temp += [] if args.root else [cache]
        scratch = Path(tempfile.mkdtemp(prefix="fa-scratch-"))  # outside the hidden cache
        temp.append(scratch)
        print(f"{'name':<20} {'starter':>9} {'(s)':>6} {'reference':>9} {'(s)':>6}  listed")
        with open_pool(hide=[cache, *hide_paths(tasks)]) as pool:
            problems = sum(_check_one(t, cache, scratch, pool, args) for t in tasks)
    finally:
        for d in temp:
            shutil.rmtree(d, ignore_errors=True)
    if problems:
        print(f"check: {problems} problem(s) in {len(tasks)} task(s)", file=sys.stderr)
    return 1 if problems else 0


def _check_one(t: Task, cache: Path, scratch: Path, pool: object, args: argparse.Namespace) -> int:
    """Lint, run and compare one task; print its row and its problems; return how many."""
    from ._check import check_task, compare, lint, write_scores
    problems = lint(t)
    if not problems:
        try:
            materialize(t, cache, args.seed)
        except Exception as e:  # the task's own prepare.py: report it, check the other tasks
            problems.append(f"{t.dir / 'prepare.py'}: raised {type(e).__name__}: {e}")
    if not problems:
        s, ref = check_task(t, cache, args.seed, scratch=scratch, pool=pool)
        problems += [f"{t.dir / r.script}: failed: {r.error}\n{r.output[-2000:]}" for r in (s, ref) if not r.ok]
        nan = float("nan")
        print(f"{t.name:<20} {nan if s.score is None else s.score:>9.4f} {s.wall_s:>6.1f} "
              f"{nan if ref.score is None else ref.score:>9.4f} {ref.wall_s:>6.1f}  "
              f"{t.starter_score:.4f} {t.reference_score:.4f}", flush=True)
        if not problems:
            problems += compare(t, s.score, ref.score, listed=not args.write and args.seed == 0)
        if args.write and not problems:
            write_scores(t, s.score, ref.score)
    for p in problems:
        print(f"error: {p}", file=sys.stderr, flush=True)
    return len(problems)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastagent.tasks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("list", help="print the task suite")
    p.add_argument("--json", action="store_true")
    p.add_argument("--split", default="all")
    p = sub.add_parser("check", help="lint tasks, run starters and references, compare their scores")
    p.add_argument("names", nargs="?", default="", help="task names or task folder paths, comma-separated")
    p.add_argument("--split", default="all")
    p.add_argument("--root", default="")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--write", action="store_true", help="store measured scores and alpha in task.toml")
    p = sub.add_parser("materialize", help="build a task's workspace and answers")
    p.add_argument("name", help="a task name or task folder path")
    p.add_argument("dir")
    p.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so that `check` removes its temporary folders either way.
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        if args.cmd == "list":
            _list(args)
        elif args.cmd == "check":
            return _check(args)
        else:
            ws, ans = materialize(get_task(args.name), Path(args.dir), args.seed)
            print(f"workspace: {ws}\nanswers:   {ans}")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
