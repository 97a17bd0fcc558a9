"""The zygote: a fresh interpreter that preloads the ML stack and forks one supervisor per job.

Started by fastagent.sandbox.Pool as `python -s -c "from fastagent.sandbox.zygote import main;
main()" FD` with one end of a SOCK_SEQPACKET control socket. It works out which isolation the
kernel allows (by staging a real standby before the heavy imports, while forking is cheap),
imports numpy, pandas, scikit-learn and torch once, moves its heap onto huge pages (cheaper forks),
then keeps `workers` standby supervisors coming: it forks each one (T), writes the uid/gid maps of
the user namespace T creates, and once T's job process is staged hands T's socket to the pool
(SCM_RIGHTS). As root it also makes the pool's memory and pids cgroups (fastagent/sandbox/
cgroups.py), below which each T makes its job's own; build_plan decides what every job sees. Jobs and results then go between the pool and T directly; the zygote is never on a
job's path. On `exit` (or when the pool disappears) it SIGTERMs every supervisor, which kills its
job's namespace and waits for it, and exits. Not a public API.
"""

from __future__ import annotations

import gc
import json
import os
import select
import selectors
import signal
import socket
import sys
import tempfile
import time

from fastagent.sandbox import cgroups
from fastagent.sandbox import child
from fastagent.sandbox import sitedata
from fastagent.sandbox import supervisor
from fastagent.sandbox import syscalls as ss
from fastagent.sandbox.limits import NOBODY

SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/sys")
# Host secrets that stay covered even where /etc is visible (root-owned, readable by uid 0 jobs).
SECRET_FILES = ("/etc/shadow", "/etc/gshadow", "/etc/shadow-", "/etc/gshadow-", "/etc/sudoers",
                "/etc/sudoers.d", "/etc/ssh", "/etc/ssl/private")
# The job's own cgroup files (limits and OOM counts the trusted side reads) and the host's: hidden.
HIDDEN_SYSTEM = ("/sys/fs/cgroup",)


def _under_any(path: str, bases) -> bool:
    return any(child._under(path, b) for b in bases)


def _binds(project: str) -> tuple[list[str], list[tuple[str, str]]]:
    """Read-only binds (system dirs, the Python installation, sys.path minus the project) and the
    top-level symlinks (/bin -> usr/bin) that make up a job's root."""
    home = os.path.realpath(os.path.expanduser("~"))
    binds, symlinks = [], []
    for path in SYSTEM_DIRS:
        if os.path.islink(path) and os.path.dirname(path) == "/":
            symlinks.append((path, os.readlink(path)))
        elif os.path.isdir(path):
            binds.append(path)
    python = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
              os.path.dirname(os.path.dirname(os.path.realpath(sys.executable)))]
    python += [p for p in sys.path if p and os.path.isdir(p) and os.path.abspath(p) != project]
    for path in python:
        for p in {os.path.abspath(path), os.path.realpath(path)}:
            if p != "/" and not child._under(home, p) and os.getcwd() != p:  # never all of home
                binds.append(p)
    kept: list[str] = []
    for path in sorted(set(binds)):
        if not _under_any(path, kept):
            kept.append(path)
    return kept, symlinks


def build_plan(cfg: dict) -> dict:
    """What every job sees: read-only binds, symlinks, hidden paths, environment (JSON-able)."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(child.__file__)))  # fastagent/
    project = os.path.dirname(package)
    kept, symlinks = _binds(project)
    hide_dirs, hide_files = sitedata.hidden_paths([d for d in sitedata.site_dirs() if _under_any(d, kept)])
    hide_dirs += [p for p in HIDDEN_SYSTEM if os.path.isdir(p) and _under_any(p, kept)]
    for path in SECRET_FILES:
        if os.path.lexists(path) and not os.path.islink(path):
            (hide_dirs if os.path.isdir(path) else hide_files).append(path)
    if _under_any(package, kept):  # an installed fastagent carries task answers: jobs never need it
        hide_dirs.append(package)
    pool_hides = [os.path.abspath(p) for p in cfg["hide"]]
    for p in pool_hides:
        if _under_any(p, kept) and os.path.lexists(p):
            (hide_dirs if os.path.isdir(p) else hide_files).append(p)
    venv = sys.prefix != sys.base_prefix
    env = {"PATH": ":".join([os.path.join(sys.prefix, "bin")] * venv + ["/usr/local/bin", "/usr/bin", "/bin"]),
           "HOME": "/tmp/home", "TMPDIR": "/tmp", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
           "PYTHONDONTWRITEBYTECODE": "1", "MPLBACKEND": "Agg", "MALLOC_ARENA_MAX": "2",
           **{k: str(cfg["threads"]) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                "MKL_NUM_THREADS")}}
    if venv:
        env["VIRTUAL_ENV"] = sys.prefix
    env.update(cfg["env"])
    return {"mode": "namespaces", "uidmode": "nobody" if os.geteuid() == 0 else "user",
            "uid": os.getuid(), "gid": os.getgid(), "cgroups": None,
            "binds": kept, "symlinks": symlinks, "hide_dirs": sorted(set(hide_dirs)),
            "hide_files": sorted(set(hide_files)), "pool_hides": pool_hides, "baseline_mb": 0,
            "tmp_mb": cfg["tmp_mb"], "strip_sys_path": [project], "job_env": env, "devices": cfg["devices"],
            "landlock_abi": ss.landlock_abi(), "seccomp": True}


def _nobody_can_run_python() -> str:
    """Fallback modes as root run the job as nobody on the host's own filesystem: "" when nobody can
    reach this Python (interpreter and standard library), else why not (e.g. it lives under /root)."""
    paths = [os.path.realpath(sys.executable), os.path.dirname(os.__file__)]
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setresgid(NOBODY, NOBODY, NOBODY)
            os.setresuid(NOBODY, NOBODY, NOBODY)
            os.listdir(paths[1])
            os._exit(0 if os.access(paths[0], os.X_OK) else 1)
        finally:
            os._exit(1)
    ok = os.waitpid(pid, 0)[1] == 0
    return "" if ok else (f"nobody ({NOBODY}) cannot reach this Python ({paths[0]}, {paths[1]}): "
                          "a fallback mode would have to run the job as uid 0")


def _write_maps(pid: int, uid_map: str, gid_map: str) -> None:
    with open(f"/proc/{pid}/setgroups", "w") as f:
        f.write("deny")
    with open(f"/proc/{pid}/uid_map", "w") as f:
        f.write(uid_map)
    with open(f"/proc/{pid}/gid_map", "w") as f:
        f.write(gid_map)


class Standby:
    def __init__(self, pid: int, sock: socket.socket, pidfd: int, uidmode: str):
        self.pid, self.sock, self.pidfd, self.uidmode = pid, sock, pidfd, uidmode
        self.state, self.error, self.sock_open = "starting", "", True


class Zygote:
    def __init__(self, ctrl: socket.socket, cfg: dict):
        self.ctrl, self.cfg = ctrl, cfg
        self.sel = selectors.DefaultSelector()
        self.standbys: dict[int, Standby] = {}
        self.idle = {"nobody": 0, "user": 0}  # handed to the pool, not yet taken
        self.failures, self.last_error = 0, ""
        self.plan = build_plan(cfg)
        self.probe_log: list[str] = []
        self.handing = True  # False while probing: a ready standby is kept, not handed over

    # ------------------------------------------------------------------ standbys
    def plan_for(self, uidmode: str) -> dict:
        """The plan a standby gets: as root the job runs as nobody, never as uid 0."""
        uid = NOBODY if uidmode == "nobody" else os.getuid()
        gid = NOBODY if uidmode == "nobody" else os.getgid()
        return {**self.plan, "uidmode": uidmode, "uid": uid, "gid": gid}

    def spawn(self, uidmode: str) -> Standby:
        zs, ts = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ts.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        plan = self.plan_for(uidmode)
        pid = os.fork()
        if pid == 0:  # T: drop everything of the zygote's that T must not hold
            try:
                ss.set_pdeathsig(signal.SIGKILL)
                for sb in self.standbys.values():
                    if sb.sock_open:
                        sb.sock.close()
                    os.close(sb.pidfd)
                zs.close()
                self.sel.close()
                self.ctrl.close()
                supervisor.supervisor_main(ts, plan)
            finally:
                os._exit(1)  # never fall back into the zygote's loop
        ts.close()
        sb = Standby(pid, zs, os.pidfd_open(pid), uidmode)
        self.standbys[pid] = sb
        self.sel.register(zs, selectors.EVENT_READ, ("sock", sb))
        self.sel.register(sb.pidfd, selectors.EVENT_READ, ("exit", sb))
        return sb

    def _close_sock(self, sb: Standby) -> None:
        if sb.sock_open:
            self.sel.unregister(sb.sock)
            sb.sock.close()
            sb.sock_open = False

    def on_standby_msg(self, sb: Standby) -> None:
        try:
            msg = sb.sock.recv(65536)
        except OSError:
            msg = b""
        if msg == b"unshared":
            plan = self.plan_for(sb.uidmode)
            try:
                _write_maps(sb.pid, f"{plan['uid']} {plan['uid']} 1", f"{plan['gid']} {plan['gid']} 1")
                sb.sock.send(b"mapped")
            except OSError as e:
                sb.error = f"writing uid/gid maps: {e}"
                os.kill(sb.pid, signal.SIGKILL)
        elif msg == b"ready":
            sb.state = "ready"
            self.failures = 0
            if self.handing:  # from now on T talks to the pool only
                socket.send_fds(self.ctrl, [json.dumps({"op": "standby", "uidmode": sb.uidmode,
                                                        "pid": sb.pid}).encode()], [sb.sock.fileno()])
                self.idle[sb.uidmode] += 1
                self._close_sock(sb)
        elif msg.startswith(b"failed"):
            sb.error = msg.decode("utf-8", "replace")
            os.kill(sb.pid, signal.SIGKILL)
        elif not msg:
            self._close_sock(sb)

    def on_standby_exit(self, sb: Standby) -> None:
        os.waitpid(sb.pid, 0)
        if self.plan["cgroups"]:  # T removes its job's cgroups itself unless it was killed
            cgroups.remove_job_groups(self.plan["cgroups"], sb.pid)
        self._close_sock(sb)
        self.sel.unregister(sb.pidfd)
        os.close(sb.pidfd)
        del self.standbys[sb.pid]
        if sb.state != "ready" and sb.error:
            self.failures += 1
            self.last_error = sb.error
            print(f"sandbox standby failed: {sb.error}", file=sys.stderr, flush=True)

    def send(self, msg: dict, fds: list[int] = ()) -> None:
        socket.send_fds(self.ctrl, [json.dumps(msg).encode()], list(fds))

    def top_up(self) -> None:
        """Keep `workers` standbys of the default mode starting or waiting in the pool."""
        if self.failures >= 3:
            self.send({"op": "fatal", "error": f"cannot start sandboxed workers: {self.last_error}"})
            raise SystemExit(1)
        mode = self.plan["uidmode"]
        starting = sum(1 for s in self.standbys.values() if s.state == "starting" and s.uidmode == mode)
        for _ in range(self.cfg["workers"] - starting - self.idle[mode]):
            self.spawn(mode)

    def on_ctrl(self) -> bool:
        """A message from the pool; False when the zygote should exit."""
        msg = self.ctrl.recv(65536)
        if not msg:
            return False
        op = json.loads(msg)
        if op["op"] == "took":  # the pool gave a standby a job: make its replacement
            self.idle[op["uidmode"]] = max(0, self.idle[op["uidmode"]] - 1)
        return op["op"] != "exit"

    def loop(self) -> None:
        self.sel.register(self.ctrl, selectors.EVENT_READ, ("ctrl", None))
        while True:
            self.top_up()
            for key, _ in self.sel.select():
                kind, sb = key.data
                if kind == "ctrl":
                    if not self.on_ctrl():
                        return
                elif kind == "sock":
                    self.on_standby_msg(sb)
                elif sb.pid in self.standbys:
                    self.on_standby_exit(sb)

    def shutdown(self) -> None:
        """End every supervisor: SIGTERM makes each kill its job's PID 1 and wait until the job's
        namespace is empty; SIGKILL whoever has not exited within 10 s."""
        for sb in self.standbys.values():
            os.kill(sb.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for sb in list(self.standbys.values()):
            if not select.select([sb.pidfd], [], [], max(0.0, deadline - time.monotonic()))[0]:
                os.kill(sb.pid, signal.SIGKILL)
            os.waitpid(sb.pid, 0)
        if self.plan["cgroups"]:
            cgroups.remove_pool_groups(self.plan["cgroups"])

    # ------------------------------------------------------------------ start-up
    def probe(self) -> bool:
        """Stage one real standby in the current plan's mode; True when it got ready."""
        self.handing = False
        t0 = time.monotonic()
        sb = self.spawn(self.plan["uidmode"])
        deadline = time.monotonic() + 60
        while sb.pid in self.standbys and sb.state != "ready" and time.monotonic() < deadline:
            for key, _ in self.sel.select(timeout=1.0):
                kind, s = key.data
                if kind == "sock":
                    self.on_standby_msg(s)
                elif kind == "exit" and s.pid in self.standbys:
                    self.on_standby_exit(s)
        ok = sb.state == "ready"
        self.plan["stage_ms"] = round((time.monotonic() - t0) * 1e3, 1)  # fork + namespaces + root
        if sb.pid in self.standbys:
            os.kill(sb.pid, signal.SIGKILL)
            self.on_standby_exit(sb)
        self.probe_log.append(f"{self.plan['mode']}/{self.plan['uidmode']}: "
                              f"{'ok' if ok else (sb.error or self.last_error or 'failed')}")
        self.failures, self.handing = 0, True
        return ok

    def choose_isolation(self) -> None:
        """Probe namespaces, then Landlock, then (if allowed) none. As root every mode runs the job
        as nobody: there is no uid-0 fallback, a pool that cannot do that fails with advice."""
        want, uidmode = self.cfg["isolation"], self.plan["uidmode"]
        if uidmode == "nobody":
            self.plan["cgroups"] = cgroups.make_pool_groups(self.probe_log)
        if want in ("auto", "namespaces") and self.probe():
            return
        why = _nobody_can_run_python() if uidmode == "nobody" else ""
        if why:
            self.probe_log.append(f"landlock/none: {why}")
        elif want in ("auto", "landlock") and self.plan["landlock_abi"]:
            self.plan.update(mode="landlock")
            if self.probe():
                return
        if not why and (want == "none" or self.cfg["allow_unisolated"]):
            self.plan.update(mode="none", landlock_abi=0, seccomp=False)
            return
        advice = " (Pool(allow_unisolated=True) runs jobs with limits only)"
        if uidmode == "nobody":
            advice = (" As root the sandbox runs every job as nobody (65534), never as uid 0: allow user"
                      " namespaces (sysctl user.max_user_namespaces > 0, kernel.unprivileged_userns_clone=1,"
                      " no seccomp profile blocking unshare), install Python where nobody can read it"
                      " (for the fallback modes), or run the pool as an unprivileged user." + advice)
        if self.plan["cgroups"]:
            cgroups.remove_pool_groups(self.plan["cgroups"])
        self.send({"op": "fatal", "error": "no isolation layer works on this machine: "
                   + "; ".join(self.probe_log) + advice})
        raise SystemExit(1)

    def preload(self) -> list[str]:
        loaded = []
        for name in self.cfg["preload"]:
            try:
                __import__(name)
                loaded.append(name)
            except Exception as e:  # noqa: BLE001 - a missing optional library is fine
                print(f"sandbox: preload {name} failed: {e}", file=sys.stderr, flush=True)
        if "sklearn.linear_model" in sys.modules:  # pull in what a first fit imports lazily
            import numpy as np
            x = np.arange(40.0).reshape(20, 2)
            sys.modules["sklearn.linear_model"].LogisticRegression().fit(x, np.arange(20) % 2)
        gc.collect()
        gc.freeze()  # the children never collect these objects, so never copy their pages
        self.plan["huge_mb"] = ss.collapse_huge_pages() >> 20
        with open("/proc/self/status") as f:
            vm = next(int(line.split()[1]) for line in f if line.startswith("VmSize"))
        self.plan["baseline_mb"] = vm // 1024 + 64
        return loaded


def isolation_report(plan: dict, probe_log: list[str], preloaded: list[str]) -> dict:
    ns = plan["mode"] == "namespaces"
    uid = {"nobody": f"nobody ({NOBODY}) on the host; the pool hands it the workspace (chown)",
           "user": "the pool's own uid"}[plan["uidmode"]]
    return {"mode": plan["mode"], "user_ns": ns, "mount_ns": ns, "net_ns": ns, "pid_ns": ns,
            "ipc_ns": ns, "uts_ns": ns, "job_uid": uid,
            "landlock_abi": plan["landlock_abi"] if plan["mode"] == "landlock" else 0,
            "seccomp_net": plan["mode"] == "landlock" and plan["seccomp"],
            "rlimits": True, "cgroups": bool(plan["cgroups"]), "cgroup_dirs": plan["cgroups"] or {},
            "stage_ms": plan.get("stage_ms"),
            "hidden_paths": len(plan["hide_dirs"]) + len(plan["hide_files"]),
            "readonly_binds": plan["binds"], "preloaded": preloaded, "probe": probe_log,
            "baseline_mb": plan["baseline_mb"], "zygote_huge_pages_mb": plan.get("huge_mb", 0)}


def main() -> None:
    ctrl = socket.socket(fileno=int(sys.argv[1]))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the pool decides when the zygote ends
    cfg = json.loads(ctrl.recv(1 << 20))
    os.chdir("/")
    tempfile.tempdir = None
    zyg = Zygote(ctrl, cfg)
    try:
        zyg.choose_isolation()
        preloaded = zyg.preload()
        zyg.send({"op": "ready", "pid": os.getpid(), "uidmode": zyg.plan["uidmode"],
                  "isolation": isolation_report(zyg.plan, zyg.probe_log, preloaded)})
        zyg.loop()
    except SystemExit:
        pass
    finally:
        zyg.shutdown()
    os._exit(0)
