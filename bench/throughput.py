"""Benchmarks: `python bench/throughput.py --suite NAME` ends with one JSON line of ratios.

Each suite lives in bench/suite_<name>.py and exposes `run(args) -> dict`; ratios are measured in
the same run (these machines are noisy), never compared against numbers from another run.
Suites: kernels (K1-K3), sandbox (E1), env (E2), train (T1), rollout (G1), rl (S1, P1, rl_samples_per_hour
and the time of each phase of one RL iteration). `--suite all` runs every suite present and merges their
JSON; a suite that fails prints its traceback, adds `<suite>_error` to the JSON, the others still run, and
the exit status is 1.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import traceback
from pathlib import Path

BENCH = Path(__file__).resolve().parent


def suites() -> list[str]:
    return sorted(p.stem.removeprefix("suite_") for p in BENCH.glob("suite_*.py"))


def load(name: str):
    path = BENCH / f"suite_{name}.py"
    spec = importlib.util.spec_from_file_location(f"suite_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default="all", help=f"one of: all, {', '.join(suites())}")
    parser.add_argument("--quick", action="store_true", help="smaller shapes and fewer repeats (smoke check)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    parser.add_argument("--model", default="", help="train suite: model to train (default smollm2-135m-instruct)")
    parser.add_argument("--dtype", default="", choices=["", "bf16", "fp32"], help="train suite: compute dtype (default: the cpu preset's, fp32 on CPU)")
    args = parser.parse_args(argv)
    names = suites() if args.suite == "all" else [args.suite]
    unknown = [n for n in names if n not in suites()]
    if unknown:
        parser.error(f"unknown suite {unknown[0]!r}; available: {', '.join(suites()) or 'none yet'}")
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    result: dict = {}
    for name in names:  # a suite that fails says why (traceback on stderr, <suite>_error in the JSON); the rest run
        print(f"== suite {name}", file=sys.stderr, flush=True)
        try:
            result.update(load(name).run(args))
        except Exception as e:  # noqa: BLE001 (any failure of one suite)
            traceback.print_exc()
            result[f"{name}_error"] = f"{type(e).__name__}: {e}"[:500]
            print(f"== suite {name} failed: {result[name + '_error']}", file=sys.stderr, flush=True)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    out = main()
    sys.exit(1 if any(f"{name}_error" in out for name in suites()) else 0)
