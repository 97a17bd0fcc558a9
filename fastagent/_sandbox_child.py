"""The sandboxed side of one job: build its filesystem view, confine it, run the agent's code.

Runs in the job process J, a fork of the zygote (see fastagent/sandbox.py for the process tree).
In namespace mode J is PID 1 of fresh user, mount, network, PID, IPC and UTS namespaces and, while
it waits for a job, stages a new root: a tmpfs holding read-only binds of the system and Python
directories only, a fresh /proc, a minimal /dev, a private /tmp, and unreadable overlays on the
dataset files that ship inside site-packages. When the job arrives it mounts the workspace (a
detached mount tree cloned outside), drops every capability, sets rlimits and runs the code: Python
in this already-warm interpreter (runpy), anything else with execve. In landlock mode (no
namespaces) it confines itself with Landlock and a seccomp filter instead. Not a public API.
"""

from __future__ import annotations

import atexit
import builtins
import importlib.machinery
import io
import json
import os
import resource
import runpy
import signal
import socket
import struct
import sys
import threading
import traceback
import types
import weakref

from fastagent import _sandbox_sys as ss

STAGE = "/tmp"  # where the new root is assembled inside J's private mount namespace
HIDDEN = "/dev/.hidden"  # mode-000 dir holding the empty file and dir bound over hidden paths
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
_KEEP_SUFFIXES = (".py", ".pyc", ".pyi", ".so", ".pyd")
EXIT_SETUP = 126  # J could not set the job up (reported as a sandbox error, not the agent's)
# The mux pipe carries framed writes (tag, length, data) from the job's sys.stdout, sys.stderr and
# status notes, so their relative order survives; raw writes to fds 1 and 2 (C code, subprocesses)
# go through two plain pipes and are merged by arrival.
MUX_STATUS, MUX_OUT, MUX_ERR = 0, 1, 2
_FRAME = struct.Struct("!BI")
_FRAME_DATA = 4096 - _FRAME.size  # a frame fits in PIPE_BUF, so each write is atomic


def mux_write(fd: int, tag: int, data: bytes) -> None:
    for i in range(0, len(data), _FRAME_DATA):
        chunk = data[i:i + _FRAME_DATA]
        os.write(fd, _FRAME.pack(tag, len(chunk)) + chunk)


class _MuxRaw(io.RawIOBase):
    """sys.stdout / sys.stderr of a Python job: frames into the mux pipe; fileno() is the real fd."""

    def __init__(self, mux_fd: int, tag: int, fd: int):
        super().__init__()
        self.mux_fd, self.tag, self.fd = mux_fd, tag, fd

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self.fd

    def write(self, data) -> int:
        mux_write(self.mux_fd, self.tag, bytes(data))
        return len(data)


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
    devs = [(d, os.open(f"/dev/{d}", os.O_PATH | os.O_CLOEXEC)) for d in DEVICES
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
            ro = ss.MS_RDONLY if plan["uidmode"] == "root" else 0
            ss.mount("proc", root + path, "proc", ss.MS_NOSUID | ss.MS_NODEV | ss.MS_NOEXEC | ro)
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
        _mount_point(f"{dev}/{name}", False)
        ss.mount(f"/proc/self/fd/{fd}", f"{dev}/{name}", None, ss.MS_BIND)
        os.close(fd)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"{dev}/{name}")
    _makedirs(f"{dev}/shm")
    ss.mount("tmpfs", f"{dev}/shm", "tmpfs", ss.MS_NOSUID | ss.MS_NODEV,
             f"size={plan['tmp_mb']}m,mode=1777,uid={uid},gid={gid}")
    _makedirs(HIDDEN.replace("/dev", dev) + "/dir", 0o000)
    os.close(os.open(root + HIDDEN + "/file", os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o000))
    os.chmod(root + HIDDEN + "/dir", 0o000)
    os.chmod(root + HIDDEN, 0o000)


def hide(root: str, dirs: list[str], files: list[str]) -> None:
    """Cover each path with an empty, unreadable, read-only dir or file (EACCES to the job)."""
    for paths, src, is_dir in ((dirs, "/dir", True), (files, "/file", False)):
        for path in paths:
            if os.path.lexists(root + path):
                ss.mount(root + HIDDEN + src, root + path, None, ss.MS_BIND)
                ss.mount_setattr(root + path, ss.ATTR_RDONLY | ss.ATTR_NOSUID | ss.ATTR_NODEV, recursive=False)


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
    for path in [spec["workspace"], spec["tmpdir"], "/dev/null", "/dev/zero", "/dev/full"]:
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
    mb = 1 << 20
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


def python_command(argv: list[str]) -> tuple[str, str, list[str]] | None:
    """Parse `python [-u] [-B] (-c CODE | -m MOD | SCRIPT) ARGS...` into (kind, target, argv[0]
    and args) for running in this warm interpreter; None for anything else (exec'd instead)."""
    if not argv or argv[0] not in ("python", "python3", sys.executable):
        return None
    rest = argv[1:]
    while rest and rest[0] in ("-u", "-B"):
        rest = rest[1:]
    if not rest:
        return None
    if rest[0] == "-c" and len(rest) > 1:
        return "code", rest[1], ["-c", *rest[2:]]
    if rest[0] == "-m" and len(rest) > 1:
        return "module", rest[1], [rest[1], *rest[2:]]
    if rest[0].startswith("-"):
        return None
    return "script", rest[0], rest


def _reset_interpreter(spec: dict, plan: dict, argv0_args: list[str], kind: str, target: str,
                       mux_fd: int) -> None:
    """Make the forked interpreter look like a fresh `python ...` to the job's code."""
    os.environ.clear()
    os.environ.update(spec["env"])  # the supervisor merged the plan's base environment in
    unbuffered = "-u" in spec["argv"][1:3]
    def stream(raw, **kw) -> io.TextIOWrapper:
        buffered = io.BufferedReader(raw) if raw.readable() else io.BufferedWriter(raw)
        return io.TextIOWrapper(buffered, encoding="utf-8", **kw)

    sys.stdin = sys.__stdin__ = stream(io.FileIO(0, "r", closefd=False))
    sys.stdout = sys.__stdout__ = stream(_MuxRaw(mux_fd, MUX_OUT, 1), write_through=unbuffered)
    sys.stderr = sys.__stderr__ = stream(_MuxRaw(mux_fd, MUX_ERR, 2), errors="backslashreplace",
                                         line_buffering=True)
    for sig in (signal.SIGTERM, signal.SIGCHLD, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.argv = argv0_args
    path = [p for p in sys.path[1:] if p not in plan["strip_sys_path"]]
    first = os.path.dirname(os.path.abspath(target)) if kind == "script" else os.getcwd()
    sys.path[:] = [first, *path]
    sys.dont_write_bytecode = True  # keep __pycache__ out of the workspace
    if "numpy" in sys.modules:  # a fresh interpreter seeds numpy from the OS; a fork would repeat the zygote's
        sys.modules["numpy"].random.seed()
    _reset_exit_hooks()


def _reset_exit_hooks() -> None:
    """Keep only the exit hooks that matter to the job's own code. The preloads registered ~130
    weakref finalizers (torch op libraries) whose teardown costs ~70 ms of pure in-memory cleanup
    that nobody outside this process can observe; the job's own finalizers and hooks still run."""
    atexit._clear()
    for name, attr in (("logging", "shutdown"), ("multiprocessing.util", "_exit_function")):
        if name in sys.modules:
            atexit.register(getattr(sys.modules[name], attr))
    for info in weakref.finalize._registry.values():
        info.atexit = False
    weakref.finalize._registered_with_atexit = False


def _print_exception(exc: BaseException) -> None:
    """Print the traceback the way `python script.py` would, without the runner's own frames."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename in (__file__, runpy.__file__, "<frozen runpy>"):
        tb = tb.tb_next
    traceback.print_exception(type(exc), exc, tb)


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "not enough memory" in text)


def _run_script(path: str) -> None:
    """Run a file as `python path` does: a fresh __main__ module, sys.argv[0] left as given."""
    if not os.path.isfile(path):  # a directory or zip with __main__.py
        runpy.run_path(path, run_name="__main__")
        return
    with open(path, "rb") as f:
        code = compile(f.read(), path, "exec")
    main = types.ModuleType("__main__")
    main.__dict__.update(__file__=path, __builtins__=builtins, __cached__=None, __spec__=None,
                         __loader__=importlib.machinery.SourceFileLoader("__main__", path))
    sys.modules["__main__"] = main
    exec(code, main.__dict__)


def run_python(kind: str, target: str, status_fd: int) -> int:
    """Run the job's Python code as __main__; return the exit code `python` would have."""
    code = 0
    try:
        if kind == "script":
            if not os.path.exists(target):
                print(f"{sys.executable}: can't open file {os.path.abspath(target)!r}: "
                      f"[Errno 2] No such file or directory", file=sys.stderr)
                return 2
            _run_script(os.path.abspath(target))
        elif kind == "module":
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            main = types.ModuleType("__main__")
            main.__builtins__ = builtins
            sys.modules["__main__"] = main
            exec(compile(target, "<string>", "exec"), main.__dict__)
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException as e:  # noqa: BLE001 - anything the job raises ends it like `python` does
        if _is_oom(e):
            mux_write(status_fd, MUX_STATUS, b"oom\n")
        _print_exception(e)
        code = 1
    return code


def _finish_python(code: int, status_fd: int) -> None:
    """Interpreter shutdown as `python` does it: join threads, run atexit hooks, flush, exit."""
    try:
        threading._shutdown()
        atexit._run_exitfuncs()
    except BaseException as e:  # noqa: BLE001
        if _is_oom(e):
            mux_write(status_fd, MUX_STATUS, b"oom\n")
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001 - a closed or broken stream must not block the exit
            pass
    os._exit(code & 0xFF)


def _fail_setup(status_fd: int, exc: BaseException) -> None:
    try:
        mux_write(status_fd, MUX_STATUS, f"setup {type(exc).__name__}: {exc}\n".encode()[:4000])
    finally:
        os._exit(EXIT_SETUP)


def _recv_job(sock: socket.socket) -> tuple[dict, dict]:
    msg, fds, _, _ = socket.recv_fds(sock, 1 << 20, 64)
    if not msg:
        os._exit(0)  # the supervisor went away before a job came
    spec = json.loads(msg)
    layout = spec.pop("fd_layout")
    named = {name: fds[i] for name, i in layout.items() if name != "readonly"}
    named["readonly"] = [fds[i] if i >= 0 else -1 for i in layout.get("readonly", [])]
    return spec, named


def child_main(sock: socket.socket, plan: dict) -> None:
    """J's whole life. Namespace mode: stage the root, fork the job K, then be its PID 1 (reap,
    kill the rest when K ends, report). Fallback modes: J is the job itself. Never returns."""
    try:
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
        os.set_inheritable(status_fd, False)  # exec'd programs write fds 1 and 2 only
        os.dup2(fds["stdout"], 1)
        os.dup2(fds["stderr"], 2)
        null = os.open("/dev/null", os.O_RDONLY)
        os.dup2(null, 0)
        sock.close()
        keep = {0, 1, 2, status_fd} | ({fds["ws"]} if "ws" in fds else set()) | {
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
        py = python_command(spec["argv"])
        set_limits(spec["limits"], plan, py is not None)
        if plan["mode"] == "namespaces":
            ss.drop_all_caps()
        else:
            if plan["mode"] == "landlock":
                landlock_job(spec, plan)
            if os.geteuid() == 0:  # no user namespace to make root harmless: keep uid 0, lose its powers
                ss.drop_all_caps()
        ss.set_pdeathsig(signal.SIGKILL)  # a uid switch clears it; the parent's death ends us
    except BaseException as e:  # noqa: BLE001
        _fail_setup(status_fd, e)
    if py is None:
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # exec'd programs expect default dispositions
        try:
            os.execvpe(spec["argv"][0], spec["argv"], spec["env"])
        except OSError as e:
            os.write(2, f"sandbox: cannot execute {spec['argv'][0]!r}: {e.strerror}\n".encode())
            os._exit(127)
    kind, target, argv = py
    _reset_interpreter(spec, plan, argv, kind, target, status_fd)
    code = run_python(kind, target, status_fd)
    _finish_python(code, status_fd)
