"""Benchmark suite `env`: workspace snapshot/restore (E2) and environment step throughput.

    python bench/throughput.py --suite env [--quick]

Reports (all measured in this run; every snapshot runs the trusted-side checks of
fastagent.safefs: safefs.sanitize, then Store.snapshot's capped walk and fd-beneath hashing):
  E2_restore_ms           median restore of a 10 MB workspace snapshot (data linked, scripts copied);
                          target <= 10
  E2_snapshot_ms          median sanitize + snapshot of that workspace after an edit of train.py
  E2_snapshot_restore_ms  the two together (DESIGN.md's E2: snapshot + restore, target <= 10)
  E2_ingest_ms            first snapshot of the 10 MB into an empty store (hash + copy everything)
  E2_restore_copy_ms      median restore when all 10 MB are agent-written files (copied, the worst
                          case: nothing can be linked), reported as measured
  E2_snapshot_copy_ms     median sanitize + snapshot of that workspace after an edit of train.py
                          (every agent-written file is rehashed: nothing can be trusted unchanged)
  E2_snapshot_restore_copy_ms  the two together for the copied workspace
  E2_copytree_ms          shutil.copytree of the same workspace, the naive baseline
  E2_speedup_vs_copytree  E2_copytree_ms / E2_restore_ms
  env_steps_per_s         agent turns per second, a fixed mix of actions (list, inspect, edit,
                          execute, copy, undo, a format error, final answer) on every bundled task,
                          two environments per task stepped together with step_many on a 2-worker pool
  env_execute_share       fraction of that time spent waiting for script runs
  env_setup_s             time to build the environments (task data materialized once per task)
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fastagent import safefs  # noqa: E402
from fastagent.env import Env, step_many  # noqa: E402
from fastagent.sandbox import Pool  # noqa: E402
from fastagent.workspace import Store  # noqa: E402


def _ten_mb_workspace(ws: Path, data_dir: str) -> None:
    (ws / data_dir).mkdir(parents=True)
    rng = os.urandom
    for i in range(8):  # eight 1.25 MB data files, the shape of a small tabular task
        (ws / data_dir / f"part{i}.csv").write_bytes(rng(10 * (1 << 20) // 8))
    (ws / "train.py").write_text("print('train')\n" * 50)
    (ws / "description.md").write_text("task\n" * 20)


def _median_ms(fn, n: int) -> float:
    times = []
    for i in range(n):
        t = time.perf_counter()
        fn(i)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def bench_restore(tmp: Path, n: int) -> dict:
    out = {}
    for label, data_dir in (("", "data"), ("_copy", "blobs")):  # "blobs" is not a read-only prefix
        root = tmp / f"e2{label}"
        store, src = Store(root / "store"), root / "src"
        _ten_mb_workspace(src, data_dir)
        snap = store.snapshot(src)
        store.restore(snap, root / "warm")  # first touch of the objects
        out[f"E2_restore{label}_ms"] = _median_ms(lambda i: store.restore(snap, root / f"r{i}"), n)

        def edit_and_snapshot(i: int) -> None:
            (root / f"r{i}" / "train.py").write_text(f"print({i})\n")
            safefs.sanitize(root / f"r{i}")  # what Env does after every job, before snapshotting
            store.snapshot(root / f"r{i}")
        out[f"E2_snapshot{label}_ms"] = _median_ms(edit_and_snapshot, n)
        out[f"E2_snapshot_restore{label}_ms"] = out[f"E2_snapshot{label}_ms"] + out[f"E2_restore{label}_ms"]
        if not label:
            # First sight of 10 MB of new content: hash and copy everything into a fresh store.
            out["E2_ingest_ms"] = _median_ms(lambda i: Store(root / f"s{i}").snapshot(src), max(3, n // 5))
            out["E2_copytree_ms"] = _median_ms(lambda i: shutil.copytree(src, root / f"c{i}"), n)
        for i in range(n):  # keep the disk use of the run small
            safefs.remove_tree(root / f"r{i}")
    out["E2_speedup_vs_copytree"] = out["E2_copytree_ms"] / out["E2_restore_ms"]
    return out


def _turn(action: str, **args) -> str:
    return f"Thought: benchmark step\nAction: {action}\nAction Input: {json.dumps(args)}"


MIX = [
    _turn("List Files", dir_path="."),
    _turn("Inspect Script Lines", script_name="train.py", start_line_number=1, end_line_number=40),
    _turn("Edit Script Segment", script_name="train.py", start_line_number=1, end_line_number=0,
          new_content="# benchmark edit"),
    _turn("Execute Script", script_name="train.py"),
    _turn("Copy File", source="train.py", destination="train_copy.py"),
    _turn("Undo Edit Script", script_name="train.py"),
    "Action: Execute Script\nAction Input: {not json",
    _turn("Final Answer", final_answer="done"),
]


def bench_steps(tmp: Path, quick: bool) -> dict:
    from fastagent.tasks import list_tasks
    tasks = list_tasks("all")[:1 if quick else None]
    root = tmp / "env"
    pool = Pool(workers=2, hide=[root])
    steps, run_wait, step_time, setup_time, skipped = 0, 0.0, 0.0, 0.0, []
    with pool:
        mode = pool.isolation.get("mode")  # waits for the zygote: its start is not counted
        for task in tasks:
            t = time.perf_counter()
            try:  # materializing the task's data is set-up, timed apart from stepping
                envs = [Env(task, pool, root, seed=0) for _ in range(2)]
            except Exception as e:  # a task that cannot materialize here is reported, not fatal
                skipped.append(f"{task.name}: {type(e).__name__}: {e}"[:200])
                continue
            setup_time += time.perf_counter() - t
            t = time.perf_counter()
            for env in envs:
                env.reset()
            for text in MIX:
                for *_, info in step_many(envs, [text, text]):
                    run_wait += info["timings"].get("run_s", 0.0) / 2  # the two runs overlap
                steps += 2
            for env in envs:
                env.close()
            step_time += time.perf_counter() - t
    out = {"env_steps_per_s": steps / step_time, "env_execute_share": min(1.0, run_wait / step_time),
           "env_setup_s": setup_time, "env_tasks": len(tasks) - len(skipped), "env_isolation": mode}
    if skipped:
        out["env_skipped"] = skipped
    return out


def run(args) -> dict:
    with tempfile.TemporaryDirectory(prefix="fa-bench-env-") as d:
        tmp = Path(d)
        result = bench_restore(tmp, n=10 if args.quick else 50)
        print(f"E2 restore: {result['E2_restore_ms']:.2f} ms (copytree {result['E2_copytree_ms']:.2f} ms)",
              file=sys.stderr, flush=True)
        result.update(bench_steps(tmp, args.quick))
    return result
