"""The pool's event loop (runs in one thread of the caller's process; see fastagent/sandbox/__init__.py).

It starts the zygote (a fresh interpreter: never a fork of the caller, which may hold threads),
receives ready standby supervisors from it (their sockets, passed with SCM_RIGHTS), sends each
queued job straight to one (the zygote is not on a job's path), turns the supervisors' reports
into Results (or, for a job the sandbox could not set up, a SandboxError on its Future), reports a
supervisor that died as `killed`, and replaces a zygote that died. The only messages it believes
come from the zygote and the supervisors, never from a job. Not a public API.
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import weakref
from collections import deque
from pathlib import Path

from fastagent.sandbox import cgroups
from fastagent.sandbox.limits import Result, SandboxError


def _tail(path: Path, n: int = 800) -> str:
    try:
        return path.read_bytes()[-n:].decode("utf-8", "replace")
    except OSError:
        return ""


def _kill_zygote(proc: subprocess.Popen) -> None:
    """SIGKILL the zygote's process group (it has its own session); its supervisors die with it
    (parent-death signal) and take their jobs along."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            proc.kill()
    proc.wait()


def _finalize(proc: subprocess.Popen, log_dir: Path | None, cgroup_dirs: list[dict]) -> None:
    """Last resort for a Pool that was never shut down (runs at interpreter exit)."""
    _kill_zygote(proc)
    for dirs in cgroup_dirs:
        cgroups.remove_pool_groups(dirs)
    if log_dir is not None:
        shutil.rmtree(log_dir, ignore_errors=True)


class Loop:
    def __init__(self, pool):  # a fastagent.sandbox.Pool
        self.pool = pool
        self.sel = selectors.DefaultSelector()
        self.busy: dict[int, tuple[socket.socket, object, dict]] = {}  # fd -> (sock, future, spec)
        self.idle: dict[str, deque] = {"nobody": deque(), "user": deque()}
        self.uidmode, self.exit_sent = "user", False
        self.cgroup_dirs: list[dict] = []  # every zygote's pool groups, removed at clean-up
        self.sel.register(pool._wake_r, selectors.EVENT_READ, ("wake", None))

    # ------------------------------------------------------------------ zygote
    def start_zygote(self) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        cfg, project = self.pool._cfg, str(Path(__file__).resolve().parents[2])
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
               "HOME": "/tmp/home", "PYTHONPATH": project, "MALLOC_ARENA_MAX": "2",
               "PYTHONDONTWRITEBYTECODE": "1",
               **{k: str(cfg["threads"]) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}}
        with open(self.pool.log_dir / "zygote.log", "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-s", "-c", "from fastagent.sandbox.zygote import main; main()",
                 str(theirs.fileno())], pass_fds=[theirs.fileno()], env=env, cwd="/",
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        theirs.close()
        mine.send(json.dumps(cfg).encode())
        self.ctrl, self.pidfd = mine, os.pidfd_open(self.proc.pid)
        self.sel.register(self.ctrl, selectors.EVENT_READ, ("ctrl", None))
        self.sel.register(self.pidfd, selectors.EVENT_READ, ("zexit", None))
        self.finalizer = weakref.finalize(self.pool, _finalize, self.proc,
                                          self.pool.log_dir if self.pool._own_log_dir else None,
                                          self.cgroup_dirs)

    def to_zygote(self, msg: dict) -> None:
        try:
            self.ctrl.send(json.dumps(msg).encode())
        except OSError:
            pass  # it died: the exit event follows

    def on_ctrl(self) -> None:
        msg, fds, _, _ = socket.recv_fds(self.ctrl, 1 << 20, 4)
        if not msg:
            self.sel.unregister(self.ctrl)
            return
        op = json.loads(msg)
        if op["op"] == "standby":
            sock = socket.socket(fileno=fds[0])
            if self.pool._closing:
                sock.close()
                return
            self.idle[op["uidmode"]].append(sock)
            self.sel.register(sock, selectors.EVENT_READ, ("standby", sock))
        elif op["op"] == "ready":
            self.uidmode = op["uidmode"]
            if op["isolation"]["cgroup_dirs"]:
                self.cgroup_dirs.append(op["isolation"]["cgroup_dirs"])
            self.pool._info = op["isolation"]
            self.pool._ready.set()
        elif op["op"] == "fatal":
            self.fail_all(op["error"])

    def fail_all(self, error: str) -> None:
        pool = self.pool
        with pool._lock:
            pool._fatal = error
            pending, pool._pending = list(pool._pending), deque()
            pool._lock.notify_all()
        for fut, spec in pending:
            if fut.set_running_or_notify_cancel():
                fut.set_exception(SandboxError(error))
        self.fail_busy(error)

    def fail_busy(self, note: str) -> None:
        for fd in list(self.busy):
            sock, fut, spec = self.busy.pop(fd)
            self._drop(sock)
            fut.set_result(_killed(note, spec))

    def on_zygote_exit(self) -> bool:
        """Reap the zygote; True when the loop should end, else a new zygote is started."""
        self.proc.wait()
        for obj in (self.ctrl, self.pidfd):
            if obj in (k.fileobj for k in self.sel.get_map().values()):
                self.sel.unregister(obj)
        self.ctrl.close()
        os.close(self.pidfd)
        self.finalizer.detach()
        if self.pool._closing or self.pool._fatal:
            self.fail_busy("the pool was shut down")
            return True
        if not self.pool._ready.is_set():
            log = self.pool.log_dir / "zygote.log"
            self.fail_all(f"the sandbox zygote exited while starting; see {log}: {_tail(log)}")
            return True
        self.pool._ready.clear()  # jobs it was running fail as their supervisors die (EOF)
        self.start_zygote()
        return False

    # ------------------------------------------------------------------ jobs
    def _drop(self, sock: socket.socket) -> None:
        self.sel.unregister(sock)
        sock.close()

    def dispatch(self) -> None:
        pool = self.pool
        while pool._ready.is_set() and len(self.busy) < pool.workers:
            with pool._lock:
                if not pool._pending:
                    return
                fut, spec = pool._pending[0]
                uidmode = self.uidmode
                if not self.idle[uidmode]:
                    return
                pool._pending.popleft()
                pool._lock.notify_all()
            if not fut.set_running_or_notify_cancel():
                continue
            sock = self.idle[uidmode].popleft()
            try:
                sock.send(json.dumps(spec).encode())
                self.busy[sock.fileno()] = (sock, fut, spec)
            except OSError:
                self._drop(sock)
                fut.set_result(_killed("the job's supervisor died before the job started", spec))
            self.to_zygote({"op": "took", "uidmode": uidmode})

    def on_standby(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(8 << 20)
        except OSError:
            data = b""
        entry = self.busy.pop(sock.fileno(), None)
        if entry is None:  # an idle standby died (or its zygote did): forget it
            for queue in self.idle.values():
                if sock in queue:
                    queue.remove(sock)
            self._drop(sock)
            return
        self._drop(sock)
        _, fut, spec = entry
        if not data:
            fut.set_result(_killed("the job's supervisor died (its zygote was killed or crashed)", spec))
            return
        msg = json.loads(data)
        if msg["op"] == "setup_error":  # the sandbox failed, not the job: never a Result to bill
            fut.set_exception(SandboxError(msg["error"]))
            return
        fields = {k: msg[k] for k in Result.__dataclass_fields__}
        for name in ("stdout_path", "stderr_path"):
            fields[name] = None if msg[name] is None else Path(msg[name])
        fut.set_result(Result(**fields))

    # ------------------------------------------------------------------ the loop
    def run(self) -> None:
        while True:
            if self.pool._closing and not self.exit_sent:
                self.exit_sent = True
                self.to_zygote({"op": "exit"})  # it kills every supervisor, busy ones included
                for queue in self.idle.values():
                    while queue:
                        self._drop(queue.popleft())
            self.dispatch()
            for key, _ in self.sel.select():
                kind, obj = key.data
                if kind == "wake":
                    try:
                        os.read(self.pool._wake_r, 4096)
                    except BlockingIOError:
                        pass
                elif kind == "ctrl":
                    self.on_ctrl()
                elif kind == "standby":
                    if obj.fileno() >= 0:
                        self.on_standby(obj)
                elif self.on_zygote_exit():
                    return

    def cleanup(self, remove_log_dir: bool) -> None:
        """After run() returned: nothing of ours may remain (processes, fds, the log dir)."""
        self.finalizer.detach()
        _kill_zygote(self.proc)
        for sock in [s for s, _, _ in self.busy.values()] + [s for q in self.idle.values() for s in q]:
            sock.close()
        self.busy.clear()
        for dirs in self.cgroup_dirs:  # the zygote removes them itself unless it was killed
            cgroups.remove_pool_groups(dirs)
        self.sel.close()
        if remove_log_dir:
            shutil.rmtree(self.pool.log_dir, ignore_errors=True)


def _killed(note: str, spec: dict) -> "Result":
    """A job the trusted side ended for reasons not the job's (pool shut down, supervisor died)."""
    paths = [None if spec[k] is None else Path(spec[k]) for k in ("stdout_path", "stderr_path")]
    return Result("killed", None, None, 0.0, 0.0, 0.0, *paths, f"[sandbox] killed: {note}\n", 0, note)
