"""Helpers shared by the tests: process trees, markers, polling (sandbox), Triton interpreter runs (kernels)."""

from __future__ import annotations

import os
import time

from fastagent.sandbox.supervisor import descendants as _descendants  # noqa: F401 (re-exported)


def _with_marker(marker: str) -> list[int]:
    """Pids (other than ours) whose command line contains marker."""
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        found.append(int(pid))
            except OSError:
                pass
    return found


def _eventually(cond, timeout: float = 30.0) -> bool:
    """Poll a condition that settles asynchronously (a generous bound, not a speed check)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def run_triton_interpreted(script: str, **env: str) -> None:
    """Run a script that exercises Triton kernels under TRITON_INTERPRET=1 (Triton's CPU interpreter)
    in a fresh process: the variable must be set before triton is imported. The script prints
    TRITON_OK when every check passed."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # the scripts may import the test module itself, which imports this one: both folders on the path,
    # after the caller's PYTHONPATH, and no cwd first (-P): without an install bench/gpu_check.sh puts
    # a fastagent overlay (with kernels/) there that the checkout's fastagent/ must not shadow.
    path = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    full_env = dict(os.environ, TRITON_INTERPRET="1",
                    PYTHONPATH=os.pathsep.join([*path, root, os.path.join(root, "tests")]), **env)
    out = subprocess.run([sys.executable, "-P", "-c", script], env=full_env, cwd=root,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "TRITON_OK" in out.stdout, out.stderr[-3000:]
