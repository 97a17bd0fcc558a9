"""Sandbox pool benchmark (E1 and throughput): `python bench/throughput.py --suite sandbox [--quick]`.

E1_ratio: median latency of `python script.py` in a fresh interpreter over the median latency of
the same script run through a warm, sandboxed Pool (submit to result, measured by the caller).
The script imports numpy and scikit-learn and fits a tiny logistic regression. Target >= 30.
pool_jobs_per_s: short jobs (`python -c "print(1)"`) pushed through Pool(workers=2) as fast as
they complete. Both are measured in this one run; the machine may be shared, so read the ratio.
"""

from __future__ import annotations

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


def run(args) -> dict:
    from fastagent.sandbox import Pool

    quick = getattr(args, "quick", False)
    n_fresh, n_pool, n_jobs = (3, 10, 40) if quick else (7, 30, 200)
    with tempfile.TemporaryDirectory(prefix="bench-sandbox-") as tmp:
        ws = Path(tmp)
        (ws / "script.py").write_text(SCRIPT)
        t = time.perf_counter()
        with Pool(workers=2) as pool:
            mode = pool.isolation["mode"]  # waits for the zygote: start-up is not part of E1
            start_s = time.perf_counter() - t
            _pooled_latency(pool, ws, 3)  # warm-up: first jobs pay for the first standbys
            e2e, wall = _pooled_latency(pool, ws, n_pool)
            time.sleep(0.5)  # let the standbys refill before the throughput burst
            jobs_per_s = _throughput(pool, ws, n_jobs)
        fresh = _fresh_latency(ws, n_fresh)
    fresh_ms, pooled_ms = statistics.median(fresh) * 1e3, statistics.median(e2e) * 1e3
    return {"E1_ratio": round(fresh_ms / pooled_ms, 1), "E1_fresh_ms": round(fresh_ms, 1),
            "E1_pooled_ms": round(pooled_ms, 1), "E1_pooled_job_wall_ms": round(statistics.median(wall) * 1e3, 1),
            "pool_jobs_per_s": round(jobs_per_s, 1), "pool_start_s": round(start_s, 2),
            "sandbox_mode": mode}
