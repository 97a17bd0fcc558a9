"""What a sandbox job may use and what it gives back: Limits (per-job caps), Result, SandboxError.

Plain dataclasses shared by the pool (fastagent/sandbox/__init__.py, pool.py) and its callers;
importing this module starts nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

NOBODY = 65534  # the host uid of every job when the pool runs as root (never uid 0)

# ok: exit 0. error: anything the job did to itself (exit code, exception, own signal, crash, file
# too large, MemoryError without a measured memory exhaustion). timeout: the supervisor's own
# wall-clock kill, or a CPU-limit kill with the tree's measured CPU >= Limits.cpu_s. oom: the
# kernel OOM-killed a process of the job's memory cgroup (as root with cgroup v1), or, without
# cgroups, the job failed after its measured memory grew to >= 80% of Limits.memory_mb. killed:
# the trusted side ended the job for reasons not the job's (pool shut down, supervisor died).
CAUSES = ("ok", "error", "timeout", "oom", "killed")


class SandboxError(RuntimeError):
    """The sandbox could not run the job (workspace vanished, a mount or cgroup failed, no usable
    isolation): raised to the caller through the job's Future; never a Result billed to the job."""


@dataclass(frozen=True)
class Limits:
    wall_s: float = 60.0  # wall clock; then the job and everything it started are killed
    memory_mb: int = 4096  # address space per process (Python jobs: on top of the preloaded zygote)
    cpu_s: float | None = None  # CPU seconds per process (None: no limit)
    file_mb: int = 1024  # largest file the job may write; also caps each captured output file
    nofile: int = 256  # open file descriptors per process
    nproc: int = 64  # processes and threads of the job together
    tmp_mb: int = 512  # size of the private /tmp (and of /dev/shm)
    head_bytes: int = 4000  # bytes of the output's start kept in Result.output
    tail_bytes: int = 4000  # bytes of the output's end kept in Result.output

    def __post_init__(self):
        for name in ("wall_s", "memory_mb", "file_mb", "nofile", "nproc", "tmp_mb"):
            if not getattr(self, name) > 0:
                raise ValueError(f"Limits.{name} must be > 0, got {getattr(self, name)!r}")
        if self.cpu_s is not None and not self.cpu_s > 0:
            raise ValueError(f"Limits.cpu_s must be > 0 or None, got {self.cpu_s!r}")
        for name in ("head_bytes", "tail_bytes"):
            if not 0 <= getattr(self, name) <= 65536:
                raise ValueError(f"Limits.{name} must be in [0, 65536], got {getattr(self, name)!r}")


@dataclass(frozen=True)
class Result:
    cause: str  # ok | error | timeout | oom | killed
    exit_code: int | None  # when the job exited by itself
    signal: int | None  # when a signal ended it (SIGKILL for a timeout)
    wall_s: float
    cpu_s: float  # user + system, the job and the children it waited for
    peak_rss_mb: float  # largest resident set of one process (includes pages shared with the zygote)
    stdout_path: Path | None  # the job's stdout file, capped at file_mb: only with Pool(keep_logs=True)
    stderr_path: Path | None  # (the caller removes kept files; the pool's own log_dir goes at shutdown)
    output: str  # head + tail of stdout and stderr merged in order, with a note of what was cut
    truncated_bytes: int  # bytes left out of `output`
    note: str = ""  # why, in words, when cause is not ok

    @property
    def ok(self) -> bool:
        return self.cause == "ok"
