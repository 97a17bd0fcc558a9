"""The sandboxed side of one job: build its filesystem view, confine it, run the agent's code.

Runs in two forks of the zygote, made by the job's supervisor T (see fastagent/sandbox/__init__.py).
Namespace mode: J is PID 1 of the user, mount, network, PID, IPC and UTS namespaces T created.
As root J first moves itself into the job's memory and pids cgroups (fastagent/sandbox/cgroups.py).
While no job is there yet, J stages a new root (a tmpfs with read-only binds of the system and
Python directories only, a fresh /proc, a minimal /dev, a private /tmp, unreadable covers over
every non-code file inside site-packages, see sitedata.py), forks the job process K, drops its own
capabilities and from then on only reaps. K takes the job: mounts the workspace (a detached mount
tree cloned outside), drops every capability, sets rlimits, tells T over the J/T socket that the
job starts (or why set-up failed), closes that socket and only then runs the code (Python in this
warm interpreter through fastagent/sandbox/run.py, anything else with execve): the job never holds
a channel T believes. When K ends, J SIGKILLs every other process of the namespace, reaps them
all and reports K's status and the tree's CPU and memory use to T. Landlock mode (no namespaces):
J is the job itself and confines itself with Landlock and a seccomp filter; as root it becomes
nobody first. Not a public API.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket

from fastagent.sandbox import run as runner
from fastagent.sandbox.limits import NOBODY
from fastagent.sandbox import syscalls as ss

STAGE = "/tmp"  # where the new root is assembled inside J's private mount namespace
HIDDEN = "/dev/.hidden"  # mode-000 dir holding the empty file and dir bound over hidden paths
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
EXIT_SETUP = 126  # K could not set the job up (T learns why over the socket, never from this code)


def _makedirs(path: str, mode: int = 0o755) -> None:
    os.makedirs(path, mode=mode, exist_ok=True)


def _mount_point(path: str, is_dir: bool) -> None:
    """Create an empty directory or file to mount on (inside the staging tmpfs)."""
    if is_dir:
        _makedirs(path)
    elif not os.path.lexists(path):
        _makedirs(os.path.dirname(path))
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644))


def _bind_ro(fd_or_path, target: str, is_dir: bool, nodev: bool = True) -> None:
    src = f"/proc/self/fd/{fd_or_path}" if isinstance(fd_or_path, int) else fd_or_path
    _mount_point(target, is_dir)
    ss.mount(src, target, None, ss.MS_BIND | ss.MS_REC)
    ss.mount_setattr(target, ss.ATTR_RDONLY | ss.ATTR_NOSUID | (ss.ATTR_NODEV if nodev else 0))


def _switch_uid(plan: dict) -> None:
    """Become the job's unprivileged host uid while keeping the namespace capabilities to mount."""
    if plan["uidmode"] != "nobody":
        return
    ss.prctl(ss.PR_SET_KEEPCAPS, 1)
    os.setresgid(plan["gid"], plan["gid"], plan["gid"])
    os.setresuid(plan["uid"], plan["uid"], plan["uid"])
    ss.raise_all_caps()
    ss.prctl(ss.PR_SET_DUMPABLE, 1)  # the uid change cleared it; /proc/self must stay usable
    ss.set_pdeathsig(signal.SIGKILL)  # cleared by the uid change too


def stage_root(plan: dict) -> None:
    """Build and enter the job's root filesystem (standby time, before the job is known)."""
    ss.unshare(ss.NEWNS)
    ss.mount(None, "/", None, ss.MS_REC | ss.MS_PRIVATE)  # nothing below propagates to the host
    # Open every source while this process can still reach it (the uid switch may lose access to
    # e.g. a Python under /root); binds then go through /proc/self/fd.
    sources = []
    for path in plan["binds"]:
        try:
            sources.append((path, os.open(path, os.O_PATH | os.O_CLOEXEC), os.path.isdir(path)))
        except OSError:
            continue
    devs = [(d, os.open(f"/dev/{d}", os.O_PATH | os.O_CLOEXEC))
            for d in list(DEVICES) + [os.path.relpath(p, "/dev") for p in plan["devices"]]
            if os.path.exists(f"/dev/{d}")]
    _switch_uid(plan)
    uid, gid = os.getuid(), os.getgid()
    ss.mount("tmpfs", STAGE, "tmpfs", ss.MS_NOSUID | ss.MS_NODEV, f"mode=755,uid={uid},gid={gid}")
    root = STAGE
    for path, target in plan["symlinks"]:
        os.symlink(target, root + path)
    _stage_dev(root, devs, plan, uid, gid)
    tmp = f"size={plan['tmp_mb']}m,mode=1777,uid={uid},gid={gid}"
    specials = [("/tmp", "tmp"), ("/proc", "proc")]
    for path, src, is_dir in sorted(sources + [(p, k, True) for p, k in specials], key=lambda t: t[0]):
        if src == "tmp":
            _mount_point(root + path, True)
            ss.mount("tmpfs", root + path, "tmpfs", ss.MS_NOSUID | ss.MS_NODEV, tmp)
            _makedirs(root + "/tmp/home")
        elif src == "proc":
            _mount_point(root + path, True)
            ss.mount("proc", root + path, "proc", ss.MS_NOSUID | ss.MS_NODEV | ss.MS_NOEXEC)
        else:
            _bind_ro(src, root + path, is_dir)
            os.close(src)
    hide(root, plan["hide_dirs"], plan["hide_files"])
    ss.mount(None, root + "/dev", None, ss.MS_REMOUNT | ss.MS_BIND | ss.MS_RDONLY | ss.MS_NOSUID)
    os.chdir(root)
    ss.pivot_root(".", ".")  # the old root ends up stacked on "/": detach it and it is gone
    ss.umount2(".", ss.MNT_DETACH)
    os.chdir("/")


def _stage_dev(root: str, devs: list, plan: dict, uid: int, gid: int) -> None:
    dev = root + "/dev"
    _makedirs(dev)
    ss.mount("tmpfs", dev, "tmpfs", ss.MS_NOSUID, f"mode=755,size=64k,uid={uid},gid={gid}")
    for name, fd in devs:
        _makedirs(os.path.dirname(f"{dev}/{name}"))
        _mount_point(f"{dev}/{name}", os.path.isdir(f"/proc/self/fd/{fd}"))
        ss.mount(f"/proc/self/fd/{fd}", f"{dev}/{name}", None, ss.MS_BIND)
        os.close(fd)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"{dev}/{name}")
    _makedirs(f"{dev}/shm")
    ss.mount("tmpfs", f"{dev}/shm", "tmpfs", ss.MS_NOSUID | ss.MS_NODEV,
             f"size={plan['tmp_mb']}m,mode=1777,uid={uid},gid={gid}")
    # The covers' source: its own tiny read-only mount, so every bind of it is read-only, nosuid,
    # nodev and noexec from the start (one mount call per hidden path, thousands per standby).
    hidden = root + HIDDEN
    _makedirs(hidden)
    ss.mount("tmpfs", hidden, "tmpfs", ss.MS_NOSUID | ss.MS_NODEV | ss.MS_NOEXEC,
             f"mode=000,size=4k,uid={uid},gid={gid}")
    os.mkdir(hidden + "/dir", 0o000)
    os.close(os.open(hidden + "/file", os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o000))
    ss.mount(None, hidden, None, ss.MS_REMOUNT | ss.MS_RDONLY | ss.MS_NOSUID | ss.MS_NODEV | ss.MS_NOEXEC,
             f"mode=000,size=4k,uid={uid},gid={gid}")


def hide(root: str, dirs: list[str], files: list[str]) -> None:
    """Cover each path with an empty, unreadable, read-only dir or file (EACCES to the job)."""
    for paths, src in ((dirs, "/dir"), (files, "/file")):
        for path in paths:
            try:
                ss.mount(root + HIDDEN + src, root + path, None, ss.MS_BIND)
            except (FileNotFoundError, NotADirectoryError):
                continue  # not there (an optional path, or it vanished): nothing to cover


def _under(path: str, base: str) -> bool:
    return path == base or path.startswith(base.rstrip("/") + "/")


def mount_job(spec: dict, fds: dict, plan: dict) -> None:
    """Attach the workspace (read-write) and readonly paths, then freeze the root (job time)."""
    ws = spec["workspace"]
    _makedirs(ws)
    ss.move_mount(fds["ws"], ws)
    os.close(fds["ws"])
    for path, fd in zip(spec["readonly"], fds["readonly"]):
        if fd < 0:  # inside the workspace: bind it onto itself read-only
            ss.mount(path, path, None, ss.MS_BIND | ss.MS_REC)
        else:
            _mount_point(path, spec["readonly_isdir"][path])
            ss.move_mount(fd, path)
            os.close(fd)
        ss.mount_setattr(path, ss.ATTR_RDONLY | ss.ATTR_NOSUID | ss.ATTR_NODEV)
    inside = [p for p in plan["pool_hides"]
              if any(_under(p, b) for b in [ws, *spec["readonly"]]) and os.path.lexists(p)]
    hide("", [p for p in inside if os.path.isdir(p)], [p for p in inside if not os.path.isdir(p)])
    if spec["limits"]["tmp_mb"] != plan["tmp_mb"]:
        for path in ("/tmp", "/dev/shm"):
            ss.mount(None, path, None, ss.MS_REMOUNT | ss.MS_NOSUID | ss.MS_NODEV,
                     f"size={spec['limits']['tmp_mb']}m")
    ss.mount(None, "/", None, ss.MS_REMOUNT | ss.MS_BIND | ss.MS_RDONLY | ss.MS_NOSUID | ss.MS_NODEV)


def landlock_job(spec: dict, plan: dict) -> None:
    """Fallback confinement without namespaces: Landlock for files (and TCP), seccomp for sockets."""
    hidden = plan["hide_dirs"] + plan["hide_files"] + plan["pool_hides"]
    rules = []
    for path in plan["binds"] + spec["readonly"] + ["/proc/cpuinfo", "/proc/meminfo", "/proc/stat",
                                                     "/dev/random", "/dev/urandom"]:
        rules += _expand(path, hidden, "read")
    for path in [spec["workspace"], spec["tmpdir"], "/dev/null", "/dev/zero", "/dev/full", *plan["devices"]]:
        rules += _expand(path, hidden + spec["readonly"], "write")
    if plan["landlock_abi"]:
        ss.landlock_restrict(rules, plan["landlock_abi"])
    if plan["seccomp"]:
        ss.seccomp_deny_inet()
    ss.prctl(ss.PR_SET_NO_NEW_PRIVS, 1)


def _expand(path: str, hidden: list[str], kind: str) -> list[tuple[str, str]]:
    """Landlock grants whole trees: to keep a hidden path out of a granted tree, grant the tree's
    directories for listing only and its other entries one by one (hidden names stay listable,
    their contents do not). Symlinks there are skipped: a rule on one grants where it points."""
    if any(_under(path, h) for h in hidden):
        return []
    if not any(_under(h, path) and h != path for h in hidden) or not os.path.isdir(path):
        return [(path, kind)]
    out = [(path, "list")]
    for name in os.listdir(path):
        full = os.path.join(path, name)
        if not os.path.islink(full):
            out += _expand(full, hidden, kind)
    return out


def set_limits(limits: dict, plan: dict, python_fork: bool) -> None:
    """Per-process rlimits. Memory: the job's cgroup caps the whole tree where there is one (then no
    RLIMIT_AS, so CUDA's address-space reservations need no headroom), else RLIMIT_AS per process."""
    mb = 1 << 20
    if not plan["cgroups"]:
        memory = limits["memory_mb"] + (plan["baseline_mb"] if python_fork else 0)
        resource.setrlimit(resource.RLIMIT_AS, (memory * mb, memory * mb))
    if limits["cpu_s"]:
        cpu = max(1, int(limits["cpu_s"] + 0.999))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits["file_mb"] * mb, limits["file_mb"] * mb))
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits["nofile"], limits["nofile"]))
    nproc = limits["nproc"] + (0 if plan["mode"] == "namespaces" else _threads_of_uid(os.getuid()))
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _threads_of_uid(uid: int) -> int:
    """Tasks the kernel already counts against RLIMIT_NPROC for this uid. Without a user namespace
    the limit is per user, machine-wide: the job's budget comes on top of what the user runs."""
    count = 0
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            if int(fields["Uid"].split()[0]) == uid:
                count += int(fields["Threads"])
        except (OSError, ValueError, KeyError):
            continue
    return count


def _fail_setup(sock: socket.socket, exc: BaseException) -> None:
    """Tell T why the job could not be set up (the sandbox's failure, never the job's), then exit."""
    try:
        sock.send(json.dumps({"setup_error": f"{type(exc).__name__}: {exc}"[:4000]}).encode())
    finally:
        os._exit(EXIT_SETUP)


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))


def _become_nobody(plan: dict) -> None:
    """Fallback modes as root: the job runs as nobody, never as uid 0 (namespace mode maps it)."""
    if os.geteuid() == 0 and plan["uidmode"] == "nobody":
        os.setgroups([])
        os.setresgid(NOBODY, NOBODY, NOBODY)
        os.setresuid(NOBODY, NOBODY, NOBODY)


def _recv_job(sock: socket.socket) -> tuple[dict, dict]:
    msg, fds, _, _ = socket.recv_fds(sock, 1 << 20, 64)
    if not msg:
        os._exit(0)  # the supervisor went away before a job came
    spec = json.loads(msg)
    layout = spec.pop("fd_layout")
    named = {name: fds[i] for name, i in layout.items() if name != "readonly"}
    named["readonly"] = [fds[i] if i >= 0 else -1 for i in layout.get("readonly", [])]
    return spec, named


def child_main(sock: socket.socket, plan: dict, group=None) -> None:
    """J's whole life. Namespace mode: join the job's cgroups (group: a cgroups.JobGroup, as root),
    stage the root, fork the job K, then be its PID 1 (reap, kill the rest when K ends, report).
    Fallback modes: J is the job itself. Never returns."""
    try:
        if group is not None:
            group.join()
            group.close()
        if plan["mode"] == "namespaces":
            stage_root(plan)
    except BaseException as e:  # noqa: BLE001 - report the reason to the supervisor, then die
        try:
            sock.send(f"failed {type(e).__name__}: {e}".encode())
        finally:
            os._exit(EXIT_SETUP)
    if plan["mode"] != "namespaces":
        sock.send(b"staged")
        job_main(sock, plan)
    kpid = os.fork()
    if kpid == 0:
        ss.set_pdeathsig(signal.SIGKILL)
        job_main(sock, plan)
    init_main(sock, kpid)


def init_main(sock: socket.socket, kpid: int) -> None:
    """PID 1 of the job's namespace: reap everything; when the job K ends, SIGKILL every other
    process in the namespace, reap them all, then report K's status and the tree's usage."""
    for fd in set(int(f) for f in os.listdir("/proc/self/fd")) - {0, 1, 2, sock.fileno()}:
        try:
            os.close(fd)
        except OSError:
            pass
    ss.drop_all_caps()  # K already has its own copy; PID 1 needs none from here on
    ss.prctl(ss.PR_SET_DUMPABLE, 0)  # and the job may not ptrace or read PID 1's memory
    sock.send(b"staged")
    status = None
    while True:
        try:
            pid, st = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        if pid == kpid:
            status = st
            try:
                os.kill(-1, signal.SIGKILL)  # from PID 1: every other process of the namespace
            except ProcessLookupError:
                pass  # there was none
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        sock.send(json.dumps({"status": status, "cpu_s": usage.ru_utime + usage.ru_stime,
                              "maxrss_kb": usage.ru_maxrss}).encode())
    finally:
        os._exit(0)


def job_main(sock: socket.socket, plan: dict) -> None:
    """The job process: take the job, confine itself, run the code. Never returns."""
    spec, fds = _recv_job(sock)
    status_fd = fds["mux"]
    try:
        rss = _rss_kb()  # the job's baseline memory (before confinement may hide /proc/self)
        os.set_inheritable(status_fd, False)  # exec'd programs write fds 1 and 2 only
        os.dup2(fds["stdout"], 1)
        os.dup2(fds["stderr"], 2)
        null = os.open("/dev/null", os.O_RDONLY)
        os.dup2(null, 0)
        keep = {0, 1, 2, status_fd, sock.fileno()} | ({fds["ws"]} if "ws" in fds else set()) | {
            fd for fd in fds["readonly"] if fd >= 0}
        for fd in sorted(set(int(f) for f in os.listdir("/proc/self/fd")) - keep):
            try:
                os.close(fd)
            except OSError:
                pass
        if plan["mode"] == "namespaces":
            mount_job(spec, fds, plan)
        os.chdir(spec["workspace"])
        os.setsid()
        py = runner.python_command(spec["argv"])
        set_limits(spec["limits"], plan, py is not None)
        if plan["mode"] == "namespaces":
            ss.drop_all_caps()
        else:
            _become_nobody(plan)
            if plan["mode"] == "landlock":
                landlock_job(spec, plan)
        ss.set_pdeathsig(signal.SIGKILL)  # a uid switch clears it; the parent's death ends us
        # The last word T takes from this process: from here on it runs the job's code.
        sock.send(json.dumps({"started": rss}).encode())
        sock.close()
    except BaseException as e:  # noqa: BLE001
        _fail_setup(sock, e)
    if py is None:
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # exec'd programs expect default dispositions
        try:
            os.execvpe(spec["argv"][0], spec["argv"], spec["env"])
        except OSError as e:
            os.write(2, f"sandbox: cannot execute {spec['argv'][0]!r}: {e.strerror}\n".encode())
            os._exit(127)
    kind, target, argv = py
    runner.reset_interpreter(spec, plan, argv, kind, target, status_fd)
    code = runner.run_python(kind, target)
    runner.finish_python(code)
