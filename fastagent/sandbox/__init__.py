"""Sandboxed, forked process pool that runs agent-written code (one Execute Script per job).

Use:
    from fastagent.sandbox import Pool, Limits, Result
    with Pool(workers=2, hide=[Path("/data/answers")]) as pool:       # extra paths to hide
        fut = pool.submit(workspace=ws, script="train.py", args=["--x", "1"],
                          limits=Limits(wall_s=60, memory_mb=4096), readonly=[ws / "data"])
        res: Result = fut.result()          # res.cause, res.output, res.wall_s, ...
        res = pool.run(workspace=ws, argv=["python", "-c", "print(1)"])   # blocking shortcut
    pool.isolation                          # which layers are active on this machine
Pool options: preload (modules the zygote imports), log_dir, queue_size (submit blocks when full),
threads_per_job (OMP/BLAS threads; default cores // workers), isolation ("auto", "namespaces",
"landlock", "none" with allow_unisolated=True), env (added to every job's environment), devices,
default_limits, keep_logs. A job's environment is minimal (PATH, HOME=/tmp/home, TMPDIR=/tmp, LANG,
thread counts): the caller's environment, API keys included, never reaches it.

Errors: bad arguments raise ValueError from submit(); when the sandbox itself fails (the workspace
vanished, a mount or cgroup failed, no isolation works) the job's Future raises SandboxError (a
RuntimeError): such a failure is never a Result, so it is never billed to the agent.

Output logs: by default a job's output is kept in memory only (Result.output: head + tail, with
the cut count), nothing is written per job, and Result.stdout_path / stderr_path are None. With
Pool(keep_logs=True) each stream is also written to log_dir/job-N.stdout / .stderr, capped at
Limits.file_mb each; those files stay until the caller deletes them (a pool-created log_dir goes
at shutdown), so a caller that keeps logs bounds them itself.

Speed: a zygote (a fresh interpreter, never a fork of the caller) imports numpy, pandas,
scikit-learn and torch once; each job is a fork of it whose namespaces and root were prepared
ahead of time, so `python train.py` costs a few tens of milliseconds instead of seconds. Python
commands (`argv[0] == "python"`, or `script=`) run in the fork through runpy as `__main__` with
sys.argv set; any other argv[0] is exec'd.

Process tree: caller (Pool, one event-loop thread) -> zygote -> one supervisor T per job -> PID 1
of the job's namespaces (J) -> the job (K). T, J and K are made before the job arrives (standby);
the pool sends the job straight to T, which drains K's output, enforces the wall clock and reports.

PARTIES, MESSAGES AND WHO MAY WRITE WHAT (trusted: believed by the pool; the job is hostile):
  party        | runs as / where                  | writes                                   | believed
  -------------+----------------------------------+------------------------------------------+---------
  pool thread  | the caller's process             | job specs to T (standby socket), zygote  | -
  (caller)     |                                  | control msgs; chowns the workspace to    |
               |                                  | nobody before a job (ownership.py)       |
  zygote       | caller's uid, host namespaces    | ready/standby/fatal msgs to the pool;    | yes
               |                                  | uid/gid maps of T's user namespace;      |
               |                                  | the pool's cgroups (cgroups.py)          |
  supervisor T | caller's uid, own user ns (after | the job's cgroups + limits; Result or    | yes
               | making its cgroups as root)      | setup_error to the pool; log files       |
               |                                  | (keep_logs); strips set-id bits after    |
  init J       | PID 1 of the job's namespaces,   | its report (K's wait status, tree CPU,   | yes
               | no capabilities once K runs,     | peak RSS) on the J/T socket, after every |
               | not dumpable, in the job cgroup  | process of the namespace is reaped       |
  job K        | nobody (as root) / caller's uid, | before its code runs (trusted code):     | only
  (and all it  | no capabilities, no_new_privs,   | "started" (baseline RSS) or setup_error  | that
  starts)      | in the job cgroup                | on the J/T socket, then closes it. Its   | message
               |                                  | code writes: stdout/stderr pipes, the    | no
               |                                  | mux pipe (framed stdout/stderr), its     | no
               |                                  | workspace and private /tmp, /dev/shm,    | no
               |                                  | its exit code and signals to itself      | no
The cause comes only from believed facts: T's own wall-clock kill, J's report (or J's death),
the tree's CPU as J/T measured it, and the kernel's counters in the job's memory cgroup (OOM
kills, which the job can neither see nor write). What the job writes is output, never status: a
malformed mux frame (unknown tag, length over FRAME_DATA) ends unframing and the rest is shown
raw, so T (outside every limit) never buffers more than one read plus one frame.

Causes: ok (exit 0); error (everything the job did to itself: exit code, exception, MemoryError
without measured exhaustion, a signal it sent itself, a crash, file too large); timeout (T's
wall-clock kill, or an RLIMIT_CPU kill with the tree's measured CPU at the limit); oom (the
kernel OOM-killed a process of the job's cgroup; without cgroups: the job failed after its
measured memory grew to >= 80% of memory_mb); killed (the trusted side ended it for reasons not
the job's: pool shut down, supervisor died).

ISOLATION, namespace mode (the default wherever the kernel allows unprivileged user namespaces):
  * Each job gets its own user, mount, network, PID, IPC and UTS namespaces and its own session.
    It runs with no capabilities at all (empty bounding set, locked securebits, no_new_privs) as
    `nobody` (65534) when the pool runs as root, never as uid 0: before each job the pool lchowns
    the workspace's directories and writable files to nobody (no symlink followed, read-only data
    paths and hard-linked files left alone; ~1 ms for 200 files), so every file a job creates is
    nobody's on the host disk; after the job T clears setuid/setgid bits in the workspace. As an
    unprivileged user the job runs as the pool's own uid. The trusted side reads and writes all.
  * Memory and tasks (as root, cgroup v1 memory and pids writable): J and everything below it are
    in the job's own memory cgroup (limit = memory_mb for the whole tree, swap included) and pids
    cgroup (nproc + 1); /sys/fs/cgroup is hidden from the job.
  * Filesystem: a new root (pivot_root; the host root is detached) that holds only read-only binds
    of /usr, /bin, /sbin, /lib*, /etc, /sys and the Python installation (prefixes, site-packages,
    also when they live under a home directory), the workspace read-write, `readonly=` paths
    read-only, a private size-limited /tmp and /dev/shm that vanish with the job, a fresh /proc and
    a minimal /dev. Everything else does not exist for the job: home directories, other
    workspaces, the project, task answers. Within every site-packages / dist-packages only code,
    libraries, package metadata and a short list of runtime data (fastagent/sandbox/sitedata.py:
    mpl-data fonts, time-zone databases, ...) are readable; every other file, tests' data and the
    bundled tasks' raw sources included, is covered by an empty unreadable mount (EACCES), so
    `sklearn.datasets.load_digits()` fails while `import sklearn` works. `hide=` paths that are
    visible (e.g. inside the workspace) are covered the same way. Nothing the job can see outside
    its workspace and temp dirs is writable. Without capabilities the job cannot unmount the
    covers; in a nested user namespace the kernel locks them.
  * Network: a new network namespace whose loopback is down: no connect, bind, DNS or host
    abstract unix sockets, loopback included.
  * Processes: the job sees (in /proc too) only its own processes, never the pool's or anyone
    else's: it runs as PID 2 under a small init (PID 1) that reaps orphans and, when the job ends,
    kills and reaps every process left, setsid and double-forked ones included, before the result
    is reported. On timeout the supervisor SIGKILLs PID 1 and the kernel empties the namespace.
    The init keeps no capability and cannot be traced or signalled by the job.
  * Limits (per job): the memory cgroup (else RLIMIT_AS = memory_mb per process, above the
    preloaded zygote's own address space for Python jobs), RLIMIT_CPU, RLIMIT_FSIZE,
    RLIMIT_NOFILE, RLIMIT_NPROC (counted per job: each job has its own user namespace), no core
    files, the wall clock, /tmp size. Output goes through pipes that the job's supervisor always
    drains (a flood cannot block it or fill the disk); the observation is the head and tail of
    stdout+stderr in order.

NOT guaranteed:
  * It is not a VM: jobs share the host kernel, so a kernel exploit escapes; there is no syscall
    filter in namespace mode.
  * CPU time and memory bandwidth are not partitioned (a job can slow its neighbours). Without
    cgroups (non-root, cgroup v2 only) memory is capped per process (a job's tree may use up to
    nproc x memory_mb), there is no pids cgroup, and `oom` rests on the measured RSS growth.
  * `oom` and `timeout` mean the limit was really reached, not that the job could not help it: a
    failing script can still exhaust its memory (or CPU) on purpose to turn -1 into a corner case.
  * Disk: RLIMIT_FSIZE caps each file; the workspace has no quota, so many files can fill its disk
    within the wall time. The chown walk before a job and the set-id strip after it stop after
    100,000 entries (files beyond them stay root's / keep their bits; nosuid holds inside jobs).
  * World-readable host configuration under /etc, /usr and /sys stays readable (/etc/shadow,
    /etc/ssh and similar secrets are covered). Devices: only null, zero, full, random, urandom,
    tty and what `devices=` adds (e.g. GPUs: /dev/nvidia*; without cgroups CUDA needs a large
    memory_mb, since RLIMIT_AS counts its address-space reservations).
  * Data in a form the allowlist lets through (a dataset embedded in a .py file) stays readable.
  * Files a job leaves in its workspace are untrusted (symlinks, huge files, odd names): open them
    with care (O_NOFOLLOW).
  * Fallback modes are weaker, and `Pool.isolation["mode"]` says which one runs:
    - "landlock" (no user namespaces, Linux >= 5.13): Landlock limits reads to the system and
      Python directories (minus the hidden ones: their names stay listable) and writes to the
      workspace and a private temp dir; a seccomp filter refuses every non-unix socket (no
      network); Landlock ABI >= 6 stops signals and abstract sockets leaving the job. The job runs
      with the pool's uid, as root as nobody (refused with a SandboxError when nobody cannot
      reach the Python installation, e.g. under /root), sees other processes in ps, and the
      supervisor, a child subreaper, kills every descendant at the end.
    - "none" (only with Pool(allow_unisolated=True)): limits, session and tree kill only.

Requirements: Linux, Python >= 3.11, no extra package. Namespace mode needs unprivileged user
namespaces (or root). As root no mode runs a job as uid 0: where none can, the pool fails with a
SandboxError that says what to change.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import os
import signal
import tempfile
import threading
from collections import deque
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from fastagent.sandbox import ownership
from fastagent.sandbox import pool as _pool_loop
from fastagent.sandbox.limits import CAUSES, NOBODY, Limits, Result, SandboxError

__all__ = ["Pool", "Limits", "Result", "SandboxError", "CAUSES", "DEFAULT_PRELOAD"]

DEFAULT_PRELOAD = ("numpy", "pandas", "scipy", "sklearn", "sklearn.linear_model", "sklearn.ensemble",
                   "sklearn.model_selection", "sklearn.metrics", "sklearn.preprocessing",
                   "sklearn.tree", "sklearn.neighbors", "sklearn.svm", "sklearn.pipeline",
                   "sklearn.impute", "sklearn.decomposition", "torch")
class Pool:
    """A pool of `workers` sandboxed job slots backed by one preloaded zygote (see module doc).

    Threads: callers only queue jobs; one event-loop thread ("sandbox-pool") sends each job to a
    ready standby supervisor, reads results and failures, and restarts a zygote that died.
    """

    def __init__(self, workers: int = 2, hide: Sequence[Path | str] = (),
                 preload: Sequence[str] = DEFAULT_PRELOAD, log_dir: Path | str | None = None,
                 queue_size: int | None = None, threads_per_job: int | None = None,
                 isolation: str = "auto", allow_unisolated: bool = False,
                 env: dict[str, str] | None = None, default_limits: Limits | None = None,
                 devices: Sequence[str] = (), keep_logs: bool = False):
        if not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be an int >= 1, got {workers!r}")
        if isolation not in ("auto", "namespaces", "landlock", "none"):
            raise ValueError(f"isolation must be auto, namespaces, landlock or none; got {isolation!r}")
        for dev in devices:
            if not str(dev).startswith("/dev/") or not os.path.exists(dev):
                raise ValueError(f"devices must be existing paths under /dev, got {dev!r}")
        if isolation == "none" and not allow_unisolated:
            raise ValueError("isolation='none' runs agent code unconfined: pass allow_unisolated=True")
        self.workers = workers
        self.queue_size = queue_size or 16 * workers
        self.default_limits = default_limits or Limits()
        self.keep_logs = keep_logs
        self._own_log_dir = log_dir is None
        self.log_dir = Path(tempfile.mkdtemp(prefix="fastagent-sandbox-") if log_dir is None else log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        threads = threads_per_job or max(1, (os.cpu_count() or 1) // workers)
        self._cfg = {"workers": workers, "preload": list(preload), "hide": [str(Path(p).absolute()) for p in hide],
                     "threads": threads, "isolation": isolation, "allow_unisolated": allow_unisolated,
                     "env": dict(env or {}), "tmp_mb": self.default_limits.tmp_mb,
                     "devices": [os.path.normpath(str(d)) for d in devices]}
        self._lock = threading.Condition()
        self._ids = itertools.count()
        self._pending: deque = deque()  # (future, spec), guarded by _lock
        self._ready = threading.Event()
        self._info: dict = {}
        self._fatal: str | None = None
        self._closing = False
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._loop = _pool_loop.Loop(self)
        self._loop.start_zygote()
        self._thread = threading.Thread(target=self._loop.run, name="sandbox-pool", daemon=True)
        # The loop thread blocks Ctrl-C and SIGTERM (a new thread inherits the mask), so the kernel hands
        # them to the main thread: one delivered to this thread left the main thread asleep in
        # Future.result() until the running job ended (a 60 s job delayed a Ctrl-C by 60 s).
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            self._thread.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

    # ------------------------------------------------------------------ public API
    @property
    def isolation(self) -> dict:
        """Which isolation layers are active here (waits for the zygote to start)."""
        while not self._ready.wait(0.2):
            if self._fatal:
                break
        if self._fatal:
            raise SandboxError(self._fatal)
        return dict(self._info)

    @property
    def zygote_pid(self) -> int:
        return self._loop.proc.pid

    def submit(self, workspace: Path | str, script: str | None = None, args: Sequence[str] = (), *,
               argv: Sequence[str] | None = None, limits: Limits | None = None,
               readonly: Sequence[Path | str] = (), env: dict[str, str] | None = None
               ) -> concurrent.futures.Future:
        """Queue one job; blocks while the queue is full. Returns a Future[Result]; its exception is
        a SandboxError when the sandbox (not the job) failed. Bad arguments raise ValueError here."""
        spec = self._spec(workspace, script, args, argv, limits, readonly, env)
        fut: concurrent.futures.Future = concurrent.futures.Future()
        if os.geteuid() == 0:  # the job runs as nobody: hand it its workspace (see ownership.py)
            try:
                ownership.give_to_job(spec["workspace"], NOBODY, NOBODY, spec["readonly"])
            except OSError as e:
                fut.set_exception(SandboxError(f"cannot hand the workspace {spec['workspace']} to the job: {e}"))
                return fut
        with self._lock:
            while len(self._pending) >= self.queue_size and not self._closing and not self._fatal:
                self._lock.wait()
            if self._closing:
                raise RuntimeError("the sandbox pool is shut down")
            if self._fatal:
                raise SandboxError(self._fatal)
            self._pending.append((fut, spec))
        self._wake()
        return fut

    def run(self, workspace: Path | str, script: str | None = None, args: Sequence[str] = (),
            **kwargs) -> Result:
        """submit(...).result(): run one job and wait for it."""
        return self.submit(workspace, script, args, **kwargs).result()

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        """Stop the pool. wait=True lets queued and running jobs finish first; otherwise they are
        killed. Leaves no process, socket or (pool-created) directory behind."""
        with self._lock:
            if self._closing:
                return
            if cancel_futures or not wait:
                while self._pending:
                    self._pending.popleft()[0].cancel()
            futures = [f for f, _ in self._pending] + [f for _, f, _ in self._loop.busy.values()]
        if wait:
            concurrent.futures.wait(futures)
        with self._lock:
            self._closing = True
            self._lock.notify_all()
        self._wake()
        self._thread.join()
        self._loop.cleanup(remove_log_dir=self._own_log_dir)
        os.close(self._wake_r)
        os.close(self._wake_w)

    close = shutdown

    def __enter__(self) -> "Pool":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown(wait=exc[0] is None)

    # ------------------------------------------------------------------ internals
    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass  # already awake-pending

    def _spec(self, workspace, script, args, argv, limits, readonly, env) -> dict:
        ws = Path(workspace)
        if not ws.is_dir():
            raise ValueError(f"workspace {ws} is not an existing directory")
        ws = ws.resolve()
        if (script is None) == (argv is None):
            raise ValueError("pass exactly one of script= (a file in the workspace) or argv= (a command)")
        if script is not None:
            path = Path(script)
            if path.is_absolute() or not (ws / path).resolve().is_relative_to(ws):
                raise ValueError(f"script {script!r} must be a path relative to and inside the workspace")
            argv = ["python", str(path), *map(str, args)]
        elif not argv or not all(isinstance(a, str) for a in argv):
            raise ValueError(f"argv must be a non-empty list of strings, got {argv!r}")
        limits = limits or self.default_limits
        if not isinstance(limits, Limits):
            raise ValueError(f"limits must be a fastagent.sandbox.Limits, got {type(limits).__name__}")
        ro = []
        for p in readonly:
            if not Path(p).exists():
                raise ValueError(f"readonly path {p} does not exist")
            ro.append(str(Path(p).resolve()))
        job_id = next(self._ids)
        return {"id": job_id, "workspace": str(ws), "argv": list(argv), "limits": asdict(limits),
                "readonly": ro, "env": {str(k): str(v) for k, v in (env or {}).items()},
                "stdout_path": str(self.log_dir / f"job-{job_id}.stdout") if self.keep_logs else None,
                "stderr_path": str(self.log_dir / f"job-{job_id}.stderr") if self.keep_logs else None,
                "tmp_path": str(self.log_dir / f"job-{job_id}.tmp")}  # fallback modes' private /tmp
