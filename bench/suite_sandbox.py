"""Sandbox pool benchmark (E1 and throughput): `python bench/throughput.py --suite sandbox [--quick]`.

E1_ratio: median latency of `python script.py` in a fresh interpreter over the median latency of
the same script run through a warm, sandboxed Pool (submit to result, measured by the caller).
The script imports numpy and scikit-learn and fits a tiny logistic regression. Target >= 30.
pool_jobs_per_s: short jobs (`python -c "print(1)"`) pushed through Pool(workers=2) as fast as
they complete. Both are measured in this one run; the machine may be shared, so read the ratio.
standby_stage_ms: fork + namespaces + staged root of one standby (the zygote's probe, before its
preload), with hidden_paths cover mounts (every non-code file of site-packages). chown_ms /
strip_ms: as root, handing a 20-dir, 200-file workspace to the job's uid (nobody) before a job
and clearing set-id bits after one (fastagent/sandbox/ownership.py), median of 20.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCRIPT = """\
import numpy as np
from sklearn.linear_model import LogisticRegression
X = np.random.rand(200, 4)
y = (X[:, 0] + X[:, 1] > 1).astype(int)
print("accuracy", LogisticRegression().fit(X, y).score(X, y))
"""


def _fresh_latency(ws: Path, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        subprocess.run([sys.executable, "script.py"], cwd=ws, check=True, capture_output=True)
        times.append(time.perf_counter() - t)
    return times


def _pooled_latency(pool, ws: Path, n: int) -> tuple[list[float], list[float]]:
    e2e, wall = [], []
    for _ in range(n):
        t = time.perf_counter()
        res = pool.run(ws, "script.py")
        e2e.append(time.perf_counter() - t)
        wall.append(res.wall_s)
        if not res.ok:
            raise RuntimeError(f"sandboxed benchmark job failed: {res.cause}: {res.output}")
    return e2e, wall


def _throughput(pool, ws: Path, n: int) -> float:
    t = time.perf_counter()
    futures = [pool.submit(ws, argv=["python", "-c", "print(1)"]) for _ in range(n)]
    bad = [f.result().cause for f in futures if not f.result().ok]
    if bad:
        raise RuntimeError(f"{len(bad)} throughput jobs failed: {bad[:3]}")
    return n / (time.perf_counter() - t)


def _ownership_ms(root: Path) -> tuple[float, float]:
    """Median ms of ownership.give_to_job and strip_setid on a small workspace (as root only)."""
    from fastagent.sandbox import ownership
    if os.geteuid() != 0:
        return 0.0, 0.0
    ws = root / "own"
    for d in range(20):
        (ws / f"d{d}").mkdir(parents=True)
        for f in range(10):
            (ws / f"d{d}" / f"f{f}.py").write_text("x = 1\n")
    give, strip = [], []
    for _ in range(20):
        os.chown(ws, 0, 0)
        for p in ws.rglob("*"):
            os.chown(p, 0, 0)
        t = time.perf_counter()
        ownership.give_to_job(str(ws), 65534, 65534, [])
        give.append(time.perf_counter() - t)
        t = time.perf_counter()
        ownership.strip_setid(str(ws), [])
        strip.append(time.perf_counter() - t)
    return statistics.median(give) * 1e3, statistics.median(strip) * 1e3


def run(args) -> dict:
    from fastagent.sandbox import Pool

    quick = getattr(args, "quick", False)
    n_fresh, n_pool, n_jobs = (3, 10, 40) if quick else (7, 30, 200)
    with tempfile.TemporaryDirectory(prefix="bench-sandbox-") as tmp:
        ws = Path(tmp)
        (ws / "script.py").write_text(SCRIPT)
        t = time.perf_counter()
        with Pool(workers=2) as pool:
            info = pool.isolation  # waits for the zygote: start-up is not part of E1
            mode = info["mode"]
            start_s = time.perf_counter() - t
            _pooled_latency(pool, ws, 3)  # warm-up: first jobs pay for the first standbys
            e2e, wall = _pooled_latency(pool, ws, n_pool)
            time.sleep(0.5)  # let the standbys refill before the throughput burst
            jobs_per_s = _throughput(pool, ws, n_jobs)
        fresh = _fresh_latency(ws, n_fresh)
        chown_ms, strip_ms = _ownership_ms(ws)
    fresh_ms, pooled_ms = statistics.median(fresh) * 1e3, statistics.median(e2e) * 1e3
    return {"E1_ratio": round(fresh_ms / pooled_ms, 1), "E1_fresh_ms": round(fresh_ms, 1),
            "E1_pooled_ms": round(pooled_ms, 1), "E1_pooled_job_wall_ms": round(statistics.median(wall) * 1e3, 1),
            "pool_jobs_per_s": round(jobs_per_s, 1), "pool_start_s": round(start_s, 2),
            "sandbox_mode": mode, "standby_stage_ms": info["stage_ms"], "hidden_paths": info["hidden_paths"],
            "cgroups": info["cgroups"], "chown_ms": round(chown_ms, 2), "strip_ms": round(strip_ms, 2)}
