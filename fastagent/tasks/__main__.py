"""Command line for the task suite.

    python -m fastagent.tasks list [--json] [--split train|heldout|all|NAME,NAME]
    python -m fastagent.tasks check [NAMES] [--split S] [--root DIR] [--seed N] [--write]
    python -m fastagent.tasks materialize NAME DIR [--seed N]

`list` prints the suite (JSON: one object per task with name, split, metric, direction,
starter_score, reference_score, alpha). `check` runs each task's starter and reference and prints
their scores and runtimes (with --write it stores the scores and alpha in task.toml).
`materialize` builds a task's workspace and hidden answers under DIR and prints both paths.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

from . import get_task, list_tasks, materialize


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
    from ._check import check_task, open_pool, write_scores
    tasks = list_tasks(args.names or args.split)
    cache = Path(args.root or tempfile.mkdtemp(prefix="fa-tasks-"))
    scratch = Path(tempfile.mkdtemp(prefix="fa-scratch-"))  # outside the hidden cache
    pool = open_pool(hide=[cache])
    failed = 0
    print(f"{'name':<20} {'starter':>9} {'(s)':>6} {'reference':>9} {'(s)':>6}  listed")
    with pool or contextlib.nullcontext():
        for t in tasks:
            runs = check_task(t, cache, args.seed, scratch=scratch, pool=pool)
            for r in runs:
                if not r.ok:
                    failed += 1
                    print(f"{t.name}: {r.script} failed: {r.error}\n{r.output[-2000:]}", file=sys.stderr)
            s, ref = runs
            nan = float("nan")
            print(f"{t.name:<20} {nan if s.score is None else s.score:>9.4f} {s.wall_s:>6.1f} "
                  f"{nan if ref.score is None else ref.score:>9.4f} {ref.wall_s:>6.1f}  "
                  f"{t.starter_score:.4f} {t.reference_score:.4f}", flush=True)
            if args.write and s.ok and ref.ok:
                write_scores(t, s.score, ref.score)
    shutil.rmtree(scratch, ignore_errors=True)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastagent.tasks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("list", help="print the task suite")
    p.add_argument("--json", action="store_true")
    p.add_argument("--split", default="all")
    p = sub.add_parser("check", help="run starters and references, print scores")
    p.add_argument("names", nargs="?", default="")
    p.add_argument("--split", default="all")
    p.add_argument("--root", default="")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--write", action="store_true", help="store measured scores and alpha in task.toml")
    p = sub.add_parser("materialize", help="build a task's workspace and answers")
    p.add_argument("name")
    p.add_argument("dir")
    p.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
