"""The per-job supervisor T: creates the job's namespaces, forks J, watches the job, reports.

T is a fork of the zygote. On standby it makes the job's cgroups (as root, see cgroups.py),
unshares the user, mount, network, PID, IPC and UTS namespaces (the zygote writes its uid/gid
maps), forks J (PID 1 of the new PID namespace, which joins the cgroups, stages the root and forks
the job process K), and tells the zygote it is ready; the zygote then hands T's socket to the pool.
When the pool sends a job, T sets the cgroup limits, passes K the workspace mount, output pipes and
the spec, drains K's output (no pipe can fill up: T always reads; into capped files only with
keep_logs), enforces the wall clock by SIGKILL to J (PID 1: the kernel then kills every process
in the namespace, setsid or double-forked ones included), and once J has reported that the
namespace is empty, clears set-id bits in the workspace and sends the Result (or, when the sandbox
itself failed to set the job up, a setup_error the pool raises as SandboxError). The cause comes
only from what T, J, K-before-the-job and the kernel (cgroup counters) say; nothing the job can
write (output, exit code, signals it sends itself) can earn it `timeout` or `oom`. In
landlock/none mode (no namespaces) J is the job, and T, a child subreaper, kills every descendant
itself. Not a public API.
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

from fastagent.sandbox import cgroups
from fastagent.sandbox import child
from fastagent.sandbox import ownership
from fastagent.sandbox import run as runner
from fastagent.sandbox import syscalls as ss
from fastagent.sandbox.limits import NOBODY

_CRASH_SIGNALS = {signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGABRT,
                  signal.SIGSYS, signal.SIGTRAP}
OOM_FRACTION = 0.8  # without cgroups: measured memory growth that makes a failure count as oom


class Output:
    """Merged stdout+stderr as the observation sees it: the first `head` and last `tail` bytes,
    plus (keep_logs) stream 0 / 1 copied into files[0] / files[1] up to `cap` bytes each."""

    def __init__(self, head: int, tail: int, cap: int, files: tuple[int, int] | None):
        self.head_n, self.tail_n, self.cap, self.files = head, tail, cap, files
        self.head, self.tail, self.total = bytearray(), bytearray(), 0
        self.written = [0, 0]
        self.dropped = 0

    def feed(self, data: bytes, stream: int) -> None:
        if self.files is not None:
            n = self.written[stream]
            keep = max(0, min(len(data), self.cap - n))
            if keep:
                os.write(self.files[stream], data[:keep])  # regular file: never blocks for long
            self.written[stream] = n + keep
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


def _signal_name(sig: int) -> str:
    return signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)


def _cause(status: int | None, timed_out: bool, limits: dict, usage: dict) -> tuple[str, int | None, int | None, str]:
    """(cause, exit_code, signal, note) from trusted facts only: T's own wall-clock kill, the wait
    status (K's, from J; J's own when J died), the tree's CPU and memory as J/T and the kernel
    measured them (usage: cpu_s, growth_mb, oom_kill: None without cgroups). A job choosing its
    exit code or signalling itself can only land on `error`; `timeout` and `oom` need the limit to
    have been really reached."""
    mem = limits["memory_mb"]
    if timed_out:
        return "timeout", None, signal.SIGKILL, (f"wall-clock limit of {limits['wall_s']:g} s exceeded: "
                                                  "the job and every process it started were killed")
    if status is None:  # PID 1 died before reporting (namespace mode); only the kernel kills it
        if usage["oom_kill"]:
            return "oom", None, signal.SIGKILL, f"out of memory (limit {mem} MB): the kernel killed the job"
        return "error", None, None, "the job's namespace ended without a report"
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
    sig = None if os.WIFEXITED(status) else os.WTERMSIG(status)
    if code == 0:
        return "ok", 0, None, ""
    # RLIMIT_CPU is whole seconds (child.set_limits); rusage samples CPU time, hence the 10% slack.
    cpu_limit = max(1, int(limits["cpu_s"] + 0.999)) if limits["cpu_s"] else None
    if sig in (signal.SIGXCPU, signal.SIGKILL) and cpu_limit and usage["cpu_s"] >= 0.9 * cpu_limit:
        return "timeout", None, sig, f"CPU-time limit of {limits['cpu_s']:g} s exceeded"
    if usage["oom_kill"]:  # the kernel OOM-killed a process of this job's cgroup
        return "oom", code, sig, f"out of memory (limit {mem} MB): the kernel killed a process of the job"
    if usage["oom_kill"] is None and (code is not None or sig == signal.SIGKILL) and (
            usage["growth_mb"] >= OOM_FRACTION * mem):  # rlimits only: memory really used up
        return "oom", code, sig, f"out of memory (limit {mem} MB; {usage['growth_mb']:.0f} MB used)"
    if sig is None:
        return "error", code, None, f"exit code {code}"
    if sig in _CRASH_SIGNALS:
        return "error", None, sig, f"crashed with {_signal_name(sig)}"
    if sig == signal.SIGXFSZ:
        return "error", None, sig, f"file size limit of {limits['file_mb']} MB exceeded"
    return "error", None, sig, f"killed by {_signal_name(sig)} (not sent by the sandbox)"


class Supervisor:
    """State of one standby/job; see the module docstring for its life."""

    def __init__(self, zsock: socket.socket, plan: dict):
        self.zsock, self.plan = zsock, plan  # zsock: first to the zygote, then to the pool
        self.jsock: socket.socket | None = None
        self.jpid = self.pidfd = -1
        self.group: cgroups.JobGroup | None = None

    def start(self) -> None:
        """Standby: cgroups, namespaces, fork J, wait until J has staged its root."""
        try:
            if self.plan["cgroups"]:  # while still root on the host: make and open the job's groups
                self.group = cgroups.JobGroup(self.plan["cgroups"], os.getpid())
        except OSError as e:
            self.zsock.send(f"failed making the job's cgroups: {e}".encode())
            raise
        if self.plan["mode"] == "namespaces":
            if os.geteuid() == 0:
                os.setgroups([])  # root's supplementary groups would follow the job otherwise
            ss.unshare(ss.NEWUSER | ss.NEWNS | ss.NEWNET | ss.NEWPID | ss.NEWIPC | ss.NEWUTS)
            self.zsock.send(b"unshared")
            if self.zsock.recv(64) != b"mapped":
                self._leave()
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
            child.child_main(jsock, self.plan, self.group)
            os._exit(0)  # not reached
        jsock.close()
        if self.group is not None:
            for fd in self.group.join_fds:  # only J joins; T stays outside every job limit
                os.close(fd)
            self.group.join_fds = []
        self.jsock, self.jpid, self.pidfd = tsock, pid, os.pidfd_open(pid)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        reply = self.jsock.recv(4096)
        self.zsock.send(b"ready" if reply == b"staged" else b"failed " + (reply or b"job process died"))

    def _leave(self) -> None:
        """End J (and with it the whole namespace), wait for it, drop the cgroups, exit."""
        if self.jpid > 0:
            os.kill(self.jpid, signal.SIGKILL)
            try:
                os.waitpid(self.jpid, 0)
            except ChildProcessError:
                pass
            self.jpid = -1
        if self.group is not None:
            self.group.remove()
        os._exit(0)

    def _on_term(self, *_) -> None:
        """The zygote is shutting down."""
        self._leave()

    def _report(self, msg: dict) -> None:
        try:
            self.zsock.send(json.dumps(msg, ensure_ascii=False).encode())
        except OSError:
            pass  # the pool is gone; nothing to report to

    def run_job(self) -> None:
        msg, fds, _, _ = socket.recv_fds(self.zsock, 1 << 20, 4)
        if not msg:  # the pool let this standby go
            self._leave()
        spec = json.loads(msg)
        spec["env"] = {**self.plan["job_env"], **spec["env"]}
        limits = spec["limits"]
        try:
            files = self._open_logs(spec)
            send, layout, pipes = self._job_fds(spec, fds)
            if self.group is not None:
                self.group.set_limits(limits["memory_mb"], limits["nproc"])
        except OSError as e:  # e.g. a workspace that vanished or cannot be mounted
            self._report({"op": "setup_error", "id": spec["id"], "error": f"sandbox could not set up the job: {e}"})
            self._leave()
        spec["fd_layout"] = layout
        start = time.monotonic()
        socket.send_fds(self.jsock, [json.dumps(spec).encode()], send)
        for fd in send:
            os.close(fd)
        output = Output(limits["head_bytes"], limits["tail_bytes"], limits["file_mb"] << 20, files)
        seen = self._watch(pipes, output, start + limits["wall_s"])
        wall = time.monotonic() - start
        for fd in files or ():
            os.close(fd)
        if "tmpdir" in spec:  # fallback modes: the job's private temp dir goes with the job
            shutil.rmtree(spec["tmpdir"], ignore_errors=True)
        if "setup_error" in seen:
            self._report({"op": "setup_error", "id": spec["id"],
                          "error": "sandbox could not set up the job: " + seen["setup_error"]})
            self._leave()
        self._report(self._result(spec, seen, output, wall))
        self._leave()

    def _result(self, spec: dict, seen: dict, output: Output, wall: float) -> dict:
        """The Result message, from what T saw (seen: status, report, started, timed_out)."""
        limits, report = spec["limits"], seen.get("report")
        if report is None:  # J was killed (timeout) or is the job itself (fallback modes)
            usage = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu, peak_kb = usage.ru_utime + usage.ru_stime, usage.ru_maxrss
        else:
            cpu, peak_kb = report["cpu_s"], report["maxrss_kb"]
        facts = {"cpu_s": cpu, "growth_mb": max(0, peak_kb - seen.get("started", peak_kb)) / 1024, "oom_kill": None}
        if self.group is not None:
            facts.update(self.group.usage())
        status = seen["status"]
        if self.plan["mode"] == "namespaces" and report is None and not seen["timed_out"]:
            status = None  # J itself died: its wait status says nothing about the job
        cause, code, sig, note = _cause(status, seen["timed_out"], limits, facts)
        try:  # the job is gone: no set-id file of its may stay on the host
            ownership.strip_setid(spec["workspace"], spec["readonly"])
        except OSError as e:
            note += f"{'; ' if note else ''}could not check set-id bits: {e}"
        if output.dropped:
            note += f"{'; ' if note else ''}{output.dropped} output bytes not kept in the files (file_mb cap)"
        text, cut = output.text()
        if note and (cause != "error" or code is None):  # a plain exit code needs no footer
            text += f"\n[sandbox] {cause}: {note}\n"
        return {"op": "result", "id": spec["id"], "cause": cause, "exit_code": code, "signal": sig,
                "wall_s": wall, "cpu_s": cpu, "peak_rss_mb": peak_kb / 1024, "stdout_path": spec["stdout_path"],
                "stderr_path": spec["stderr_path"], "output": text, "truncated_bytes": cut, "note": note}

    @staticmethod
    def _open_logs(spec: dict) -> tuple[int, int] | None:
        """The stdout/stderr files (keep_logs only; else output is kept in memory, head + tail)."""
        if spec["stdout_path"] is None:
            return None
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW
        out = os.open(spec["stdout_path"], flags, 0o600)
        try:
            return out, os.open(spec["stderr_path"], flags, 0o600)
        except OSError:
            os.close(out)
            raise

    def _job_fds(self, spec: dict, fds: list[int]) -> tuple[list[int], dict, tuple[int, int, int]]:
        """The fds K needs (write ends of the output pipes, mux pipe, mount trees) + layout."""
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        mux_r, mux_w = os.pipe2(os.O_CLOEXEC)
        send = [out_w, err_w, mux_w]
        layout = {"stdout": 0, "stderr": 1, "mux": 2}
        for fd in fds:
            os.close(fd)
        if self.plan["mode"] == "namespaces":
            layout["ws"] = len(send)
            send.append(self._clone(spec["workspace"], 0))
            layout["readonly"] = []
            for path in spec["readonly"]:
                if child._under(path, spec["workspace"]):
                    layout["readonly"].append(-1)
                else:
                    layout["readonly"].append(len(send))
                    send.append(self._clone(path, ss.ATTR_RDONLY))
            spec["readonly_isdir"] = {p: os.path.isdir(p) for p in spec["readonly"]}
        else:
            spec["tmpdir"] = spec["tmp_path"]
            os.mkdir(spec["tmpdir"], 0o700)
            if os.geteuid() == 0 and self.plan["uidmode"] == "nobody":  # the job runs as nobody
                os.chown(spec["tmpdir"], NOBODY, NOBODY)
                os.chmod(os.path.dirname(spec["tmpdir"]), 0o711)  # it may reach its own dir only
            spec["env"].update(TMPDIR=spec["tmpdir"], HOME=spec["tmpdir"])
        return send, layout, (out_r, err_r, mux_r)

    @staticmethod
    def _clone(path: str, extra: int) -> int:
        fd = ss.open_tree(path)
        ss.mount_setattr(fd, ss.ATTR_NOSUID | ss.ATTR_NODEV | extra)
        return fd

    @staticmethod
    def _unframe(buf: bytearray, output: Output) -> bool:
        """Feed the whole frames in buf (see run.mux_write) to output. False at the first frame
        that breaks the protocol (unknown tag, length over FRAME_DATA): the caller then takes the
        rest of the mux pipe as raw stderr. So buf never holds more than one read plus a frame."""
        size = runner.FRAME.size
        while len(buf) >= size:
            tag, n = runner.FRAME.unpack_from(buf)
            if tag not in (runner.MUX_OUT, runner.MUX_ERR) or n > runner.FRAME_DATA:
                return False
            if len(buf) < size + n:
                break
            output.feed(bytes(buf[size:size + n]), 0 if tag == runner.MUX_OUT else 1)
            del buf[:size + n]
        return True

    def _on_jsock(self, seen: dict, flags: int = 0) -> bool:
        """One message from J or K (the only writers of jsock; K closes it before the job's code
        runs). Returns True when the socket is done."""
        msg = self.jsock.recv(65536, flags)
        if not msg:
            return True
        msg = json.loads(msg)
        if "status" in msg:  # PID 1's report: the job ended, the namespace is empty
            seen["report"], seen["status"] = msg, msg["status"]
            return True
        if "started" in msg:
            seen["started"] = msg["started"]
        elif "setup_error" in msg:
            seen["setup_error"] = msg["setup_error"]
        return False

    def _watch(self, pipes, output: Output, deadline: float) -> dict:
        """Pump output until the job and everything it started are gone; kill at the deadline.
        Returns what T saw: status, timed_out, and report / started / setup_error when sent."""
        out_r, err_r, mux_r = pipes
        poller = select.poll()
        for fd in (out_r, err_r, mux_r, self.pidfd, self.jsock.fileno()):
            poller.register(fd, select.POLLIN)
        open_fds, framed, raw_mux, jsock_open = {out_r, err_r, mux_r}, bytearray(), False, True
        seen: dict = {"status": None, "timed_out": False}
        while seen["status"] is None or open_fds:
            if seen["status"] is not None:
                wait = 2000.0  # the job is gone, so are its writers: this only guards a stray holder
            else:
                wait = 500.0 if seen["timed_out"] else max(0.0, deadline - time.monotonic()) * 1000
            events = poller.poll(wait)
            if not events and seen["status"] is not None:
                break
            for fd, _ in events:
                if fd == self.jsock.fileno():
                    if jsock_open and self._on_jsock(seen):
                        poller.unregister(fd)
                        jsock_open = False
                elif fd == self.pidfd:
                    poller.unregister(fd)
                    st = os.waitpid(self.jpid, 0)[1]
                    self.jpid = -1  # reaped: never signal that pid again
                    if self.plan["mode"] != "namespaces":
                        _kill_descendants()  # no PID namespace did it for us
                    while jsock_open:  # J reported before it exited: take the report first
                        try:
                            done = self._on_jsock(seen, socket.MSG_DONTWAIT)
                        except BlockingIOError:
                            break
                        if done:
                            poller.unregister(self.jsock.fileno())
                            jsock_open = False
                    if "report" not in seen:
                        seen["status"] = st
                else:
                    data = os.read(fd, 1 << 16)
                    if not data:
                        poller.unregister(fd)
                        open_fds.discard(fd)
                    elif fd != mux_r:
                        output.feed(data, 0 if fd == out_r else 1)
                    elif raw_mux:
                        output.feed(data, 1)
                    else:
                        framed += data
                        if not self._unframe(framed, output):
                            raw_mux = True  # a protocol violation: unframed from here on
                            output.feed(bytes(framed), 1)
                            framed.clear()
            if seen["status"] is None and not seen["timed_out"] and time.monotonic() >= deadline:
                seen["timed_out"] = True
                os.kill(self.jpid, signal.SIGKILL)
        for fd in (out_r, err_r, mux_r):
            os.close(fd)
        return seen


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
