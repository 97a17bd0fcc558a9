"""Functional tests of fastagent.sandbox: the Pool API, Result fields, Python semantics, limits,
output capture, crash recovery, clean shutdown and a 1000-job soak (marked slow).

Also: the same isolation for a pool run by an unprivileged user (uid 65534 when tests run as root).
Run: `.venv/bin/pytest tests/test_sandbox.py` (add `-m "not slow"` to skip the soak).
Attack tests live in tests/test_sandbox_adversarial.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from fastagent.sandbox import Limits, Pool, Result
from _proc import _descendants, _eventually, _with_marker

TRAIN = """\
import sys
import numpy as np
from sklearn.linear_model import LogisticRegression
X = np.loadtxt("data/train.csv", delimiter=",")
model = LogisticRegression().fit(X[:, :2], X[:, 2])
np.savetxt("predictions.csv", model.predict(X[:, :2]), fmt="%d")
print("name", __name__, "argv", sys.argv, "score", model.score(X[:, :2], X[:, 2]))
"""


def _started(pids) -> set[tuple[int, bytes]]:
    """(pid, start time) pairs: identities that survive pid reuse."""
    out = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                out.add((pid, f.read().rsplit(b")", 1)[1].split()[19]))
        except OSError:
            pass
    return out


def _zombies(pids) -> list[int]:
    out = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    out.append(pid)
        except OSError:
            pass
    return out


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    ws = tmp_path_factory.mktemp("sandbox") / "ws"
    (ws / "data").mkdir(parents=True)
    rows = [f"{i / 40:.3f},{(i * 7 % 40) / 40:.3f},{int(i >= 20)}" for i in range(40)]
    (ws / "data" / "train.csv").write_text("\n".join(rows) + "\n")
    (ws / "train.py").write_text(TRAIN)
    return ws


@pytest.fixture(scope="module")
def pool():
    with Pool(workers=2, devices=["/dev/ptmx"], keep_logs=True) as p:
        yield p


def _ok(pool: Pool, ws: Path) -> None:
    """The pool still runs a normal job correctly."""
    res = pool.run(ws, argv=["python", "-c", "print(6 * 7)"])
    assert res.cause == "ok" and res.output == "42\n", res


def test_isolation_report(pool):
    info = pool.isolation
    assert info["mode"] in ("namespaces", "landlock")
    for key in ("user_ns", "mount_ns", "net_ns", "pid_ns", "job_uid", "rlimits", "readonly_binds",
                "preloaded", "probe"):
        assert key in info
    assert "numpy" in info["preloaded"] and "sklearn" in info["preloaded"]
    assert info["hidden_paths"] > 0


def test_train_script_runs_as_main_and_writes_workspace(pool, ws):
    res = pool.run(ws, "train.py", ["--seed", "3"], readonly=[ws / "data"])
    assert isinstance(res, Result)
    assert res.cause == "ok" and res.exit_code == 0 and res.signal is None, res.output
    assert "name __main__ argv ['train.py', '--seed', '3'] score" in res.output
    assert (ws / "predictions.csv").read_text().count("\n") == 40
    assert res.wall_s > 0 and res.cpu_s >= 0 and res.peak_rss_mb > 0
    assert res.truncated_bytes == 0 and res.stdout_path.read_text() == res.output
    assert res.stderr_path.read_text() == ""


def test_commands_python_c_m_and_exec(pool, ws):
    res = pool.run(ws, argv=["python", "-c", "import sys; print(sys.argv, __name__)", "a"])
    assert res.ok and res.output == "['-c', 'a'] __main__\n"
    res = pool.run(ws, argv=["python", "-m", "json.tool", "--help"])
    assert res.ok and "usage" in res.output
    res = pool.run(ws, argv=["sh", "-c", "echo from-sh; echo oops >&2; exit 3"])
    assert (res.cause, res.exit_code) == ("error", 3)
    assert res.output == "from-sh\noops\n"
    res = pool.run(ws, argv=["no-such-program-xyz"])
    assert (res.cause, res.exit_code) == ("error", 127) and "cannot execute" in res.output


def test_python_exit_semantics(pool, ws):
    res = pool.run(ws, argv=["python", "-c", "raise ValueError('boom')"])
    assert (res.cause, res.exit_code) == ("error", 1)
    assert "Traceback" in res.output and "ValueError: boom" in res.output
    assert "_sandbox" not in res.output and "runpy" not in res.output  # no runner frames
    assert pool.run(ws, argv=["python", "-c", "import sys; sys.exit(5)"]).exit_code == 5
    res = pool.run(ws, argv=["python", "-c", "import sys; sys.exit('bad input')"])
    assert res.exit_code == 1 and "bad input" in res.output
    res = pool.run(ws, "missing.py")
    assert (res.cause, res.exit_code) == ("error", 2) and "can't open file" in res.output
    code = "import atexit, threading\natexit.register(print, 'bye')\n" \
           "threading.Thread(target=lambda: print('thread')).start()"
    res = pool.run(ws, argv=["python", "-c", code])
    assert res.ok and sorted(res.output.split()) == ["bye", "thread"]


def test_self_signal_works_like_a_normal_process(pool, ws):
    """A job that signals itself dies like a normal process, and it is its own error."""
    res = pool.run(ws, argv=["python", "-c", "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"])
    assert (res.cause, res.signal) == ("error", signal.SIGTERM) and "SIGTERM" in res.note


def test_output_merged_in_order_with_separate_files(pool, ws):
    code = "import sys\nfor i in range(3):\n print('out', i, flush=True)\n print('err', i, file=sys.stderr, flush=True)"
    res = pool.run(ws, argv=["python", "-c", code])
    assert res.output == "".join(f"out {i}\nerr {i}\n" for i in range(3))
    assert res.stdout_path.read_text() == "out 0\nout 1\nout 2\n"
    assert res.stderr_path.read_text() == "err 0\nerr 1\nerr 2\n"


def test_output_head_tail_and_cut_count(pool, ws):
    code = "print('HEAD'); print('x' * 100000); print('TAIL')"
    res = pool.run(ws, argv=["python", "-c", code], limits=Limits(head_bytes=100, tail_bytes=100))
    assert res.ok and res.output.startswith("HEAD\n") and res.output.endswith("TAIL\n")
    assert res.truncated_bytes == 100011 - 200
    assert f"[... {res.truncated_bytes} bytes of output cut ...]" in res.output


def test_limits_causes(pool, ws):
    res = pool.run(ws, argv=["python", "-c", "import time\nwhile True: time.sleep(0.05)"], limits=Limits(wall_s=1))
    assert (res.cause, res.signal, res.exit_code) == ("timeout", signal.SIGKILL, None)
    assert "wall-clock limit" in res.note and "wall-clock limit" in res.output
    res = pool.run(ws, argv=["python", "-c", "while True: pass"], limits=Limits(cpu_s=1, wall_s=30))
    assert res.cause == "timeout" and "CPU-time" in res.note
    res = pool.run(ws, argv=["python", "-c", "x = []\nwhile True: x.append(bytearray(32 << 20))"],
                   limits=Limits(memory_mb=512))
    assert res.cause == "oom" and "out of memory" in res.note, res.output
    res = pool.run(ws, argv=["python", "-c", "x = bytearray(64 << 30)"], limits=Limits(memory_mb=512))
    assert res.cause == "error" and "MemoryError" in res.output  # refused at once: nothing was used
    res = pool.run(ws, argv=["python", "-c", "open('big', 'wb').write(b'0' * (3 << 20))"],
                   limits=Limits(file_mb=1))
    assert res.cause == "error" and "File too large" in res.output
    assert not (ws / "big").exists() or (ws / "big").stat().st_size <= 1 << 20
    (ws / "big").unlink(missing_ok=True)
    res = pool.run(ws, argv=["python", "-c", "import os\nfor i in range(100): os.pipe()"],
                   limits=Limits(nofile=32))
    assert res.cause == "error" and "Too many open files" in res.output


def test_private_tmp_is_per_job(pool, ws):
    res = pool.run(ws, argv=["python", "-c", "open('/tmp/mark', 'w').write('1'); print(__import__('os').listdir('/tmp'))"])
    assert res.ok
    res = pool.run(ws, argv=["python", "-c", "import os; print(os.path.exists('/tmp/mark'))"])
    assert res.output == "False\n"


def test_minimal_dev_plus_requested_devices(pool, ws):
    res = pool.run(ws, argv=["python", "-c", "import os; print(sorted(os.listdir('/dev')))"])
    names = set(eval(res.output))
    assert {"null", "zero", "urandom", "shm", "ptmx"} <= names  # ptmx: asked for with devices=
    assert not names & {"sda", "vda", "mem", "kmsg", "nvme0"}


def test_readonly_path_outside_workspace(pool, ws, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "table.csv").write_text("a,b\n")
    code = f"print(open({str(shared / 'table.csv')!r}).read().strip())\n" \
           f"open({str(shared / 'x')!r}, 'w')"
    res = pool.run(ws, argv=["python", "-c", code], readonly=[shared])
    assert res.cause == "error" and "a,b\n" in res.output and "Read-only file system" in res.output
    assert not (shared / "x").exists()


def test_job_runs_unprivileged_and_its_files_are_not_root_s(pool, ws):
    """As root the job is nobody (65534), never uid 0; it can write its workspace (the pool hands
    it over), its files are stored as nobody, and the data it gets read-only stays root's."""
    (ws / "ro").mkdir()
    (ws / "ro" / "table.csv").write_text("1\n")
    code = ("import os\nopen('mine.txt', 'w').write('x')\n"
            "caps = [l for l in open('/proc/self/status') if l.startswith('CapEff')]\n"
            "denied = []\n"
            "for p in ['/etc/shadow', '/usr/pwned', '/proc/sys/kernel/hostname', 'ro/table.csv']:\n"
            "    try:\n        open(p, 'a').close()\n    except OSError:\n        denied.append(p)\n"
            "print(os.getuid(), caps[0].split()[1], len(denied))")
    res = pool.run(ws, argv=["python", "-c", code], readonly=[ws / "ro"])
    expected_uid = 65534 if os.geteuid() == 0 else os.getuid()
    assert res.ok and res.output == f"{expected_uid} 0000000000000000 4\n", res.output
    assert (ws / "mine.txt").stat().st_uid == expected_uid
    assert (ws / "ro" / "table.csv").stat().st_uid == os.geteuid()
    (ws / "mine.txt").unlink()
    shutil.rmtree(ws / "ro")


def test_parallel_jobs_all_complete(pool, ws):
    futures = [pool.submit(ws, argv=["python", "-c", f"print({i} * 2)"]) for i in range(12)]
    assert [f.result().output for f in futures] == [f"{i * 2}\n" for i in range(12)]


def test_submit_validation(pool, ws):
    with pytest.raises(ValueError, match="not an existing directory"):
        pool.submit(ws / "nope", "train.py")
    with pytest.raises(ValueError, match="relative to and inside"):
        pool.submit(ws, "/etc/passwd")
    with pytest.raises(ValueError, match="relative to and inside"):
        pool.submit(ws, "../escape.py")
    with pytest.raises(ValueError, match="exactly one"):
        pool.submit(ws, "train.py", argv=["python"])
    with pytest.raises(ValueError, match="exactly one"):
        pool.submit(ws)
    with pytest.raises(ValueError, match="readonly path"):
        pool.submit(ws, "train.py", readonly=[ws / "missing"])
    with pytest.raises(ValueError, match="Limits.wall_s"):
        Limits(wall_s=0)
    with pytest.raises(ValueError, match="workers"):
        Pool(workers=0)
    with pytest.raises(ValueError, match="allow_unisolated"):
        Pool(isolation="none")


def test_zygote_crash_is_replaced(ws):
    with Pool(workers=1) as pool:
        pool.isolation
        fut = pool.submit(ws, argv=["python", "-c", "import time; time.sleep(60)"])
        while not fut.running():
            time.sleep(0.01)
        time.sleep(0.2)  # let the job start; the outcome is the same if it has not yet
        os.kill(pool.zygote_pid, signal.SIGKILL)
        res = fut.result(timeout=60)
        assert res.cause == "killed" and "supervisor died" in res.note
        _ok(pool, ws)


def test_shutdown_leaves_nothing_behind(ws):
    fds_before = len(os.listdir("/proc/self/fd"))
    pool = Pool(workers=2)
    zpid, log_dir = pool.zygote_pid, pool.log_dir
    daemon = "import os\nif os.fork() == 0:\n os.setsid()\n os.execvp('sleep', ['sleep', '987611'])"
    assert pool.run(ws, argv=["python", "-c", daemon]).ok
    running = pool.submit(ws, argv=["sleep", "987612"])
    while not running.running():
        time.sleep(0.01)
    time.sleep(0.2)  # let the supervisor start it (the checks hold either way)
    tree = _started(_descendants(zpid) | {zpid})
    assert len(tree) > 3, "the zygote should have standby supervisors and a running job"
    pool.shutdown(wait=False)
    assert running.result().cause == "killed"
    assert not _with_marker("987611") and not _with_marker("987612")
    assert not tree & _started(pid for pid, _ in tree)
    assert not log_dir.exists()
    assert len(os.listdir("/proc/self/fd")) == fds_before


@pytest.mark.slow
def test_soak_1000_jobs_leave_no_process_tmp_or_fd(ws):
    fds_before = len(os.listdir("/proc/self/fd"))
    jobs = [["python", "-c", "print('ok')"], ["python", "-c", "raise SystemExit(3)"],
            ["python", "-c", "import os\nfor _ in range(3):\n if os.fork() == 0: os._exit(0)"],  # zombies
            ["python", "-c", "import os\nif os.fork() == 0:\n os.setsid(); os.execvp('sleep', ['sleep', '987613'])"],
            ["python", "-c", "import os; [os.open('/dev/null', 0) for _ in range(50)]"]]
    with Pool(workers=2) as pool:
        zpid, log_dir = pool.zygote_pid, pool.log_dir
        futures = [pool.submit(ws, argv=jobs[i % len(jobs)]) for i in range(1000)]
        causes = [f.result().cause for f in futures]
        assert causes.count("ok") == 800 and causes.count("error") == 200
        assert not _with_marker("987613")
        assert _eventually(lambda: not _zombies(_descendants(zpid)))  # exiting supervisors are reaped
        assert len(os.listdir(f"/proc/{zpid}/fd")) < 40
        assert len(list(log_dir.glob("*.tmp"))) == 0
        tree = _started(_descendants(zpid) | {zpid})
    assert not log_dir.exists()
    assert len(os.listdir("/proc/self/fd")) == fds_before
    assert not tree & _started(pid for pid, _ in tree)


# ------------------------------------------------------------------ a pool run by an unprivileged user

UNPRIVILEGED = """
import json, os, sys
from pathlib import Path
from fastagent.sandbox import Pool
ws = Path(sys.argv[1])
with Pool(workers=1, preload=()) as pool:
    code = ("import os, socket\\nopen('out.txt', 'w').write('x')\\n"
            "try:\\n socket.create_connection(('127.0.0.1', 22), timeout=1); net = 'LEAK'\\n"
            "except OSError: net = 'blocked'\\n"
            "print(os.getuid(), net, os.path.exists('/root'), len([p for p in os.listdir('/proc') if p.isdigit()]))")
    res = pool.run(ws, argv=["python", "-c", code])
    print(json.dumps({"mode": pool.isolation["mode"], "uid": pool.isolation["job_uid"], "cause": res.cause,
                      "output": res.output, "wrote": (ws / "out.txt").exists()}))
"""


def _unprivileged_python() -> str | None:
    """An interpreter that uid 65534 can run (the venv may sit under root's home)."""
    for exe in (sys.executable, "/usr/bin/python3"):
        try:
            probe = subprocess.run([exe, "-c", "pass"], user=65534, group=65534, extra_groups=[],
                                   capture_output=True, cwd="/")
        except OSError:
            continue
        if probe.returncode == 0:
            return exe
    return None


def test_unprivileged_user_gets_the_same_isolation():
    project = str(Path(__file__).resolve().parent.parent)
    ws = Path(tempfile.mkdtemp(prefix="fastagent-unpriv-"))
    try:
        if os.geteuid() == 0:
            exe = _unprivileged_python()
            assert exe, "no Python interpreter that an unprivileged user can run"
            os.chown(ws, 65534, 65534)
            proc = subprocess.run([exe, "-c", UNPRIVILEGED, str(ws)], user=65534, group=65534, extra_groups=[],
                                  env={"PYTHONPATH": project, "PATH": "/usr/bin:/bin"}, cwd="/",
                                  capture_output=True, text=True, timeout=300)
        else:
            proc = subprocess.run([sys.executable, "-c", UNPRIVILEGED, str(ws)], capture_output=True,
                                  text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout.splitlines()[-1])
        assert out["mode"] == "namespaces" and out["uid"] == "the pool's own uid"
        assert out["cause"] == "ok" and out["wrote"], out
        uid, net, root_visible, nprocs = out["output"].split()
        assert int(uid) == (65534 if os.geteuid() == 0 else os.geteuid())
        assert net == "blocked" and root_visible == "False" and int(nprocs) <= 3
    finally:
        shutil.rmtree(ws, ignore_errors=True)
