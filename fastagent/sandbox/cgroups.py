"""Per-job memory and pids cgroups (cgroup v1, as root): the trusted record of a job's memory use.

The zygote makes one group per pool in the `memory` and `pids` hierarchies, below its own cgroup
(`<mount>/<own path>/fastagent-<zygote pid>`). Each supervisor T makes `job-<T pid>` below it
before it unshares (while it is still root on the host), opens the files it needs, and its J
writes itself into `cgroup.procs` before it forks the job: J and everything below it are then in
the group, and no process of the job can leave it (the job sees no /sys/fs/cgroup, and the files
are root's). At job time T sets memory.limit_in_bytes (= Limits.memory_mb) and pids.max; after
the job it reads the kernel's OOM-kill count and peak usage, which the job cannot write, then
removes the group. Without a writable v1 hierarchy (non-root, cgroup v2 only) there are no groups
and the sandbox falls back to rlimits. Not a public API.
"""

from __future__ import annotations

import os
import time

CONTROLLERS = ("memory", "pids")


def _mounts() -> dict[str, str]:
    """Mount point of each v1 controller we use, from /proc/self/mounts."""
    found = {}
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 4 and parts[2] == "cgroup":
                for c in CONTROLLERS:
                    if c in parts[3].split(","):
                        found.setdefault(c, parts[1])
    return found


def _own_paths() -> dict[str, str]:
    """This process's cgroup path in each v1 controller, from /proc/self/cgroup."""
    found = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, names, path = line.rstrip("\n").split(":", 2)
            for c in CONTROLLERS:
                if c in names.split(","):
                    found[c] = path
    return found


def make_pool_groups(log: list[str]) -> dict[str, str] | None:
    """The pool's group in each controller ({controller: dir}), or None (logged) where v1 memory
    and pids are missing or not writable: the jobs then have rlimits only."""
    if os.geteuid() != 0:
        return None
    try:
        mounts, own = _mounts(), _own_paths()
        if any(c not in mounts or c not in own for c in CONTROLLERS):
            log.append("cgroups: no v1 memory and pids hierarchies (rlimits only)")
            return None
        dirs = {c: os.path.join(mounts[c], own[c].lstrip("/"), f"fastagent-{os.getpid()}") for c in CONTROLLERS}
        for d in dirs.values():
            os.mkdir(d, 0o755)
        return dirs
    except OSError as e:
        log.append(f"cgroups: {e} (rlimits only)")
        return None


class JobGroup:
    """One job's groups: made and opened by T before it unshares (see the module docstring)."""

    def __init__(self, pool_dirs: dict[str, str], tag: int):
        self.dirs = {c: os.path.join(d, f"job-{tag}") for c, d in pool_dirs.items()}
        for d in self.dirs.values():
            os.mkdir(d, 0o755)
        mem, pids = self.dirs["memory"], self.dirs["pids"]
        w = os.O_WRONLY | os.O_CLOEXEC
        self.join_fds = [os.open(os.path.join(d, "cgroup.procs"), w) for d in self.dirs.values()]
        self.limit_fds = [os.open(os.path.join(mem, "memory.limit_in_bytes"), w)]
        if os.path.exists(os.path.join(mem, "memory.memsw.limit_in_bytes")):  # swap counts too
            self.limit_fds.append(os.open(os.path.join(mem, "memory.memsw.limit_in_bytes"), w))
        self.pids_fd = os.open(os.path.join(pids, "pids.max"), w)
        r = os.O_RDONLY | os.O_CLOEXEC
        self.read_fds = {name: os.open(os.path.join(mem, name), r)
                         for name in ("memory.oom_control", "memory.max_usage_in_bytes", "memory.failcnt")}

    def join(self) -> None:
        """Called in J: move the calling process into the groups (its children follow)."""
        for fd in self.join_fds:
            os.write(fd, b"0")

    def set_limits(self, memory_mb: int, nproc: int) -> None:
        """At job time: the tree's memory (RAM, and RAM + swap) and task count."""
        for fd in self.limit_fds:
            os.write(fd, str(memory_mb << 20).encode())
        os.write(self.pids_fd, str(nproc + 1).encode())  # + J, PID 1 of the namespace

    def usage(self) -> dict:
        """What the kernel recorded: OOM kills in the group, peak memory (MB), limit hits."""
        text = {k: os.pread(fd, 4096, 0).decode() for k, fd in self.read_fds.items()}
        oom = dict(line.split() for line in text["memory.oom_control"].splitlines() if len(line.split()) == 2)
        return {"oom_kill": int(oom.get("oom_kill", 0)),
                "peak_mb": int(text["memory.max_usage_in_bytes"]) / (1 << 20),
                "failcnt": int(text["memory.failcnt"])}

    def close(self) -> None:
        for fd in [*self.join_fds, *self.limit_fds, self.pids_fd, *self.read_fds.values()]:
            try:
                os.close(fd)
            except OSError:
                pass
        self.join_fds, self.limit_fds, self.read_fds = [], [], {}

    def remove(self) -> None:
        self.close()
        for d in self.dirs.values():
            _rmdir(d)


def _rmdir(path: str, wait_s: float = 5.0) -> None:
    """rmdir a cgroup, waiting (bounded) while its last tasks finish exiting."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() > deadline:
                return
            time.sleep(0.01)


def remove_job_groups(pool_dirs: dict[str, str], tag: int) -> None:
    """The zygote's clean-up after a supervisor that died before removing its groups."""
    for d in pool_dirs.values():
        if os.path.isdir(os.path.join(d, f"job-{tag}")):
            _rmdir(os.path.join(d, f"job-{tag}"))


def remove_pool_groups(pool_dirs: dict[str, str]) -> None:
    """Remove the pool's groups and any job group left in them (the pool's last clean-up)."""
    for d in pool_dirs.values():
        try:
            names = [n for n in os.listdir(d) if n.startswith("job-")]
        except OSError:
            continue
        for n in names:
            _rmdir(os.path.join(d, n))
        _rmdir(d)
