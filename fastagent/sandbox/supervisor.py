"""The per-job supervisor T: creates the job's namespaces, forks J, watches the job, reports.

T is a fork of the zygote. On standby it unshares the user, mount, network, PID, IPC and UTS
namespaces (the zygote writes its uid/gid maps), forks J (PID 1 of the new PID namespace, which
stages the root and forks the job process K), and tells the zygote it is ready; the zygote then
hands T's socket to the pool. When the pool sends a job, T passes K the workspace mount, output
pipes and the spec, drains K's output into capped files (no pipe can fill up: T always reads),
enforces the wall clock by SIGKILL to J (PID 1: the kernel then kills every process in the
namespace, setsid or double-forked ones included), and sends the Result back to the pool once J
has reported that the namespace is empty. In landlock/none mode (no namespaces) J is the job, and
T, a child subreaper, kills every descendant itself. Not a public API.
"""

from __future__ import annotations

import json
import os
import resource
import select
import shutil
import signal
import socket
import time

from fastagent.sandbox import child
from fastagent.sandbox import run as runner
from fastagent.sandbox import syscalls as ss

_CRASH_SIGNALS = {signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGABRT,
                  signal.SIGSYS, signal.SIGTRAP}


class Output:
    """Merged stdout+stderr as the observation sees it: the first `head` and last `tail` bytes,
    plus each stream copied into its own file up to `cap` bytes."""

    def __init__(self, head: int, tail: int, cap: int):
        self.head_n, self.tail_n, self.cap = head, tail, cap
        self.head, self.tail, self.total = bytearray(), bytearray(), 0
        self.written: dict[int, int] = {}
        self.dropped = 0

    def feed(self, data: bytes, file_fd: int) -> None:
        n = self.written.get(file_fd, 0)
        keep = max(0, min(len(data), self.cap - n))
        if keep:
            os.write(file_fd, data[:keep])  # regular file: never blocks for long
        self.written[file_fd] = n + keep
        self.dropped += len(data) - keep
        self.total += len(data)
        room = self.head_n - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if data:
            self.tail += data
            if len(self.tail) > self.tail_n:
                del self.tail[:len(self.tail) - self.tail_n]

    def text(self) -> tuple[str, int]:
        cut = self.total - len(self.head) - len(self.tail)
        middle = f"\n[... {cut} bytes of output cut ...]\n" if cut > 0 else ""
        return (self.head.decode("utf-8", "replace") + middle + self.tail.decode("utf-8", "replace"),
                max(0, cut))


def descendants(root: int) -> set[int]:
    """Every live descendant pid of root, read from /proc (children, grandchildren, ...)."""
    parents = {}
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/stat", "rb") as f:
                    parents[int(pid)] = int(f.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    tree, frontier = set(), {root}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - tree
        tree |= frontier
    return tree


def _kill_descendants() -> None:
    """SIGKILL every descendant of this (subreaper) process until none is left, then reap them.
    Orphans re-parent to us, so a setsid or double-forked child is still found."""
    me = os.getpid()
    for _ in range(1000):
        tree = descendants(me)
        for pid in tree:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        while True:
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                return
        time.sleep(0.002)  # killed children are still dying: give them a moment before rescanning


def _cause(status: int, notes: str, timed_out: bool, limits: dict, cpu_s: float,
           peak_mb: float) -> tuple[str, int | None, int | None, str]:
    """(cause, exit_code, signal, note) from J's wait status and what J said about itself."""
    if "setup " in notes:
        return "error", None, None, "sandbox could not set up the job: " + notes.split("setup ", 1)[1].strip()
    if timed_out:
        return "timeout", None, signal.SIGKILL, (f"wall-clock limit of {limits['wall_s']:g} s exceeded: "
                                                  "the job and every process it started were killed")
    if os.WIFEXITED(status):
        code = os.WEXITSTATUS(status)
        if code == 0:
            return "ok", 0, None, ""
        if "oom" in notes:
            return "oom", code, None, f"out of memory (limit {limits['memory_mb']} MB)"
        return "error", code, None, f"exit code {code}"
    sig = os.WTERMSIG(status)
    name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
    if sig == signal.SIGXCPU or (sig == signal.SIGKILL and limits["cpu_s"] and cpu_s >= limits["cpu_s"]):
        return "timeout", None, sig, f"CPU-time limit of {limits['cpu_s']:g} s exceeded"
    if "oom" in notes or (sig == signal.SIGKILL and peak_mb >= 0.9 * limits["memory_mb"]):
        return "oom", None, sig, f"out of memory (limit {limits['memory_mb']} MB)"
    if sig in _CRASH_SIGNALS:
        return "error", None, sig, f"crashed with {name}"
    if sig == signal.SIGXFSZ:
        return "killed", None, sig, f"file size limit of {limits['file_mb']} MB exceeded"
    return "killed", None, sig, f"killed by {name}"


class Supervisor:
    """State of one standby/job; see the module docstring for its life."""

    def __init__(self, zsock: socket.socket, plan: dict):
        self.zsock, self.plan = zsock, plan  # zsock: first to the zygote, then to the pool
        self.jsock: socket.socket | None = None
        self.jpid = self.pidfd = -1

    def start(self) -> None:
        """Standby: namespaces, fork J, wait until J has staged its root."""
        if self.plan["mode"] == "namespaces":
            if os.geteuid() == 0:
                os.setgroups([])  # root's supplementary groups would follow the job otherwise
            ss.unshare(ss.NEWUSER | ss.NEWNS | ss.NEWNET | ss.NEWPID | ss.NEWIPC | ss.NEWUTS)
            self.zsock.send(b"unshared")
            if self.zsock.recv(64) != b"mapped":
                os._exit(0)
        else:
            ss.prctl(ss.PR_SET_CHILD_SUBREAPER, 1)
        tsock, jsock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # SIGTERM (the zygote shutting down) waits until J's pid is known, so it is never orphaned.
        signal.signal(signal.SIGTERM, self._on_term)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        pid = os.fork()
        if pid == 0:
            ss.set_pdeathsig(signal.SIGKILL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
            tsock.close()
            self.zsock.close()
            child.child_main(jsock, self.plan)
            os._exit(0)  # not reached
        jsock.close()
        self.jsock, self.jpid, self.pidfd = tsock, pid, os.pidfd_open(pid)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        reply = self.jsock.recv(4096)
        self.zsock.send(b"ready" if reply == b"staged" else b"failed " + (reply or b"job process died"))

    def _on_term(self, *_) -> None:
        """The zygote is shutting down: end J (and with it the whole namespace), wait, exit."""
        if self.jpid > 0:
            os.kill(self.jpid, signal.SIGKILL)
            try:
                os.waitpid(self.jpid, 0)
            except ChildProcessError:
                pass
        os._exit(0)

    def run_job(self) -> None:
        msg, fds, _, _ = socket.recv_fds(self.zsock, 1 << 20, 4)
        if not msg:  # the pool let this standby go: end J and its namespace before leaving
            self._on_term()
        spec = json.loads(msg)
        spec["env"] = {**self.plan["job_env"], **spec["env"]}
        limits = spec["limits"]
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
            out_fd, err_fd = os.open(spec["stdout_path"], flags, 0o644), os.open(spec["stderr_path"], flags, 0o644)
            send, layout, pipes = self._job_fds(spec, fds)
        except OSError as e:  # e.g. a workspace that vanished or cannot be mounted
            note = f"sandbox could not set up the job: {e}"
            self.zsock.send(json.dumps({
                "op": "result", "id": spec["id"], "cause": "error", "exit_code": None, "signal": None,
                "wall_s": 0.0, "cpu_s": 0.0, "peak_rss_mb": 0.0, "stdout_path": spec["stdout_path"],
                "stderr_path": spec["stderr_path"], "output": f"[sandbox] error: {note}\n",
                "truncated_bytes": 0, "note": note}).encode())
            self._on_term()
        spec["fd_layout"] = layout
        start = time.monotonic()
        socket.send_fds(self.jsock, [json.dumps(spec).encode()], send)
        for fd in send:
            os.close(fd)
        output = Output(limits["head_bytes"], limits["tail_bytes"], limits["file_mb"] << 20)
        status, notes, timed_out, report = self._watch(pipes, {pipes[0]: out_fd, pipes[1]: err_fd},
                                                       output, start + limits["wall_s"])
        wall = time.monotonic() - start
        if "tmpdir" in spec:  # fallback modes: the job's private temp dir goes with the job
            shutil.rmtree(spec["tmpdir"], ignore_errors=True)
        if report is None:  # J was killed (timeout) or is the job itself (fallback modes)
            usage = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu, peak = usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024
        else:
            cpu, peak = report["cpu_s"], report["maxrss_kb"] / 1024
        cause, code, sig, note = _cause(status, notes, timed_out, limits, cpu, peak)
        if output.dropped:
            note += f"{'; ' if note else ''}{output.dropped} output bytes not kept in the files (file_mb cap)"
        text, cut = output.text()
        if note and (cause != "error" or code is None):  # a plain exit code needs no footer
            text += f"\n[sandbox] {cause}: {note}\n"
        result = {"op": "result", "id": spec["id"], "cause": cause, "exit_code": code, "signal": sig,
                  "wall_s": wall, "cpu_s": cpu, "peak_rss_mb": peak, "stdout_path": spec["stdout_path"],
                  "stderr_path": spec["stderr_path"], "output": text, "truncated_bytes": cut, "note": note}
        try:
            self.zsock.send(json.dumps(result, ensure_ascii=False).encode())
        except OSError:
            pass  # the pool is gone; nothing to report to
        if report is not None and self.jpid > 0:
            os.waitpid(self.jpid, 0)  # PID 1 exits right after its report; its namespace is empty
            self.jpid = -1

    def _job_fds(self, spec: dict, fds: list[int]) -> tuple[list[int], dict, tuple[int, int, int]]:
        """The fds J needs (write ends of the output pipes, status pipe, mount trees) + layout."""
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        st_r, st_w = os.pipe2(os.O_CLOEXEC)
        send = [out_w, err_w, st_w]
        layout = {"stdout": 0, "stderr": 1, "mux": 2}
        mode = self.plan["mode"]
        if mode == "namespaces":
            ws = fds[0] if fds else self._clone(spec["workspace"], 0)
            layout["ws"] = len(send)
            send.append(ws)
            layout["readonly"] = []
            for path in spec["readonly"]:
                if child._under(path, spec["workspace"]):
                    layout["readonly"].append(-1)
                else:
                    layout["readonly"].append(len(send))
                    send.append(self._clone(path, ss.ATTR_RDONLY))
            spec["readonly_isdir"] = {p: os.path.isdir(p) for p in spec["readonly"]}
        else:
            for fd in fds:
                os.close(fd)
            spec["tmpdir"] = spec["stdout_path"].rsplit(".", 1)[0] + ".tmp"
            os.mkdir(spec["tmpdir"], 0o700)
            spec["env"].update(TMPDIR=spec["tmpdir"], HOME=spec["tmpdir"])
        return send, layout, (out_r, err_r, st_r)

    @staticmethod
    def _clone(path: str, extra: int) -> int:
        fd = ss.open_tree(path)
        ss.mount_setattr(fd, ss.ATTR_NOSUID | ss.ATTR_NODEV | extra)
        return fd

    @staticmethod
    def _unframe(buf: bytearray, output: Output, out_file: int, err_file: int) -> bytes:
        """Consume the whole frames in buf (see run.mux_write); return status notes."""
        notes, size = b"", runner.FRAME.size
        while len(buf) >= size:
            tag, n = runner.FRAME.unpack_from(buf)
            if len(buf) < size + n:
                break
            data = bytes(buf[size:size + n])
            del buf[:size + n]
            if tag == runner.MUX_STATUS:
                notes += data
            else:
                output.feed(data, out_file if tag == runner.MUX_OUT else err_file)
        return notes

    def _watch(self, pipes, files: dict, output: Output, deadline: float):
        """Pump output until the job and everything it started are gone; kill at the deadline.
        Returns (wait status, J's notes, timed out, PID 1's report or None)."""
        out_r, err_r, st_r = pipes
        poller = select.poll()
        for fd in (out_r, err_r, st_r, self.pidfd, self.jsock.fileno()):
            poller.register(fd, select.POLLIN)
        open_fds, notes, timed_out, status, report = {out_r, err_r, st_r}, b"", False, None, None
        framed = bytearray()
        while status is None or open_fds:
            if status is not None:
                wait = 2000.0  # the job is gone, so are its writers: this only guards a stray holder
            else:
                wait = 500.0 if timed_out else max(0.0, deadline - time.monotonic()) * 1000
            events = poller.poll(wait)
            if not events and status is not None:
                break
            for fd, _ in events:
                if fd == self.jsock.fileno():  # PID 1 reports: the job ended, the namespace is empty
                    poller.unregister(fd)
                    msg = self.jsock.recv(65536)
                    if msg:
                        report = json.loads(msg)
                        status = report["status"]
                elif fd == self.pidfd:
                    poller.unregister(fd)
                    st = os.waitpid(self.jpid, 0)[1]
                    self.jpid = -1  # reaped: never signal that pid again
                    if self.plan["mode"] != "namespaces":
                        _kill_descendants()  # no PID namespace did it for us
                    if report is None:
                        status = st
                else:
                    data = os.read(fd, 1 << 16)
                    if not data:
                        poller.unregister(fd)
                        open_fds.discard(fd)
                    elif fd == st_r:
                        framed += data
                        notes += self._unframe(framed, output, files[out_r], files[err_r])
                    else:
                        output.feed(data, files[fd])
            if status is None and not timed_out and time.monotonic() >= deadline:
                timed_out = True
                os.kill(self.jpid, signal.SIGKILL)
        for fd in (out_r, err_r, st_r, *files.values()):
            os.close(fd)
        return status, notes.decode("utf-8", "replace"), timed_out, report


def supervisor_main(zsock: socket.socket, plan: dict) -> None:
    """Entry point of T (called in the zygote's fork); never returns."""
    code = 0
    try:
        sup = Supervisor(zsock, plan)
        sup.start()
        sup.run_job()
    except BaseException as e:  # noqa: BLE001 - T must never fall back into the zygote's loop
        code = 1
        try:
            os.write(2, f"sandbox supervisor {os.getpid()}: {type(e).__name__}: {e}\n".encode())
        except OSError:
            pass
    os._exit(code)
