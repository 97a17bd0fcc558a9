"""/proc helpers shared by the sandbox tests: process trees, markers, polling."""

from __future__ import annotations

import os
import time

from fastagent._sandbox_supervisor import descendants as _descendants  # noqa: F401 (re-exported)


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
