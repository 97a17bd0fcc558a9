"""Adversarial tests of fastagent.sandbox: each attack runs as agent code through a real Pool and
must be contained, reported with the right cause, and leave the pool able to run the next job.

Covers network and DNS, hidden answers, other workspaces, home, packaged dataset files and their
loaders, writes outside the workspace, modifying installed packages, fork/memory/disk bombs,
infinite loops, daemons, signals to the pool, other processes' environment, output floods, fd and
zombie leaks, undoing the mounts; then the same attacks against the Landlock fallback.
Run: `.venv/bin/pytest tests/test_sandbox_adversarial.py`.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import tempfile
import textwrap
from pathlib import Path

import pytest

from fastagent.sandbox import Limits, Pool
from _proc import _descendants, _eventually, _with_marker

SITE = Path(importlib.util.find_spec("sklearn").origin).parent.parent
DATASET_FILES = [p for p in [SITE / "sklearn/datasets/data/digits.csv.gz", SITE / "sklearn/datasets/data/iris.csv",
                             SITE / "sklearn/datasets/descr/iris.rst"] if p.exists()]
DATASET_FILES += sorted((SITE / "statsmodels/datasets").glob("*/*.csv"))[:5]
DATASET_FILES += [p for d in ("vega_datasets/_data", "palmerpenguins/data", "sktime/datasets/data",
                              "mlxtend/data/data")
                  for p in sorted((SITE / d).rglob("*.*"))[:3] if p.is_file() and p.suffix not in (".py", ".pyc")]


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("adv")
    ws, other, answers = root / "ws", root / "ws_other", root / "answers"
    for d in (ws / "data", ws / ".answers", other, answers):
        d.mkdir(parents=True)
    (ws / "data" / "train.csv").write_text("1,2,3\n")
    (ws / ".answers" / "labels.csv").write_text("SECRET-INSIDE\n")
    (answers / "labels.csv").write_text("SECRET-ANSWERS\n")
    (other / "notes.txt").write_text("SECRET-OTHER\n")
    home = Path(os.path.expanduser("~"))
    fd, secret = tempfile.mkstemp(dir=home if os.access(home, os.W_OK) else root, prefix=".fastagent-secret-")
    os.write(fd, b"SECRET-HOME\n")
    os.close(fd)
    yield {"root": root, "ws": ws, "other": other, "answers": answers, "home_secret": Path(secret)}
    os.unlink(secret)


def _make_pool(layout: dict, **kw) -> Pool:
    return Pool(workers=2, hide=[layout["answers"], layout["ws"] / ".answers"], **kw)


@pytest.fixture(scope="module")
def pool(layout):
    with _make_pool(layout) as p:
        yield p


def run(pool: Pool, ws: Path, code: str, **limits) -> "object":
    return pool.run(ws, argv=["python", "-c", textwrap.dedent(code)], limits=Limits(**limits),
                    readonly=[ws / "data"])


def healthy(pool: Pool, ws: Path) -> None:
    res = pool.run(ws, argv=["python", "-c", "print(6 * 7)"])
    assert res.cause == "ok" and res.output == "42\n", res


PROBE_READS = """
import os, sys
for p in sys.argv[1:]:
    try:
        with open(p, "rb") as f:
            print("LEAK", p, f.read(20))
    except OSError as e:
        print("denied", p, type(e).__name__)
"""


def _reads(pool, ws, paths) -> str:
    res = pool.run(ws, argv=["python", "-c", PROBE_READS, *map(str, paths)])
    assert res.cause == "ok", res.output
    return res.output


# ------------------------------------------------------------------ namespace mode (default)

def test_isolation_is_namespaces_here(pool):
    info = pool.isolation
    assert info["mode"] == "namespaces", f"expected namespaces on this kernel: {info['probe']}"
    assert all(info[k] for k in ("user_ns", "mount_ns", "net_ns", "pid_ns", "ipc_ns", "uts_ns"))


def test_network_connect_and_dns_blocked(pool, layout):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    res = run(pool, layout["ws"], f"""
        import socket
        for addr in [("127.0.0.1", {port}), ("1.1.1.1", 53), ("151.101.0.223", 443)]:
            try:
                socket.create_connection(addr, timeout=2); print("LEAK", addr)
            except OSError as e:
                print("blocked", e.errno)
        try:
            print("LEAK", socket.getaddrinfo("pypi.org", 443))
        except OSError:
            print("dns blocked")
        try:
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("8.8.8.8", 53)); print("LEAK udp")
        except OSError:
            print("udp blocked")
        """)
    listener.setblocking(False)
    with pytest.raises(BlockingIOError):
        listener.accept()  # nothing ever reached the host's loopback
    listener.close()
    assert res.ok and "LEAK" not in res.output and res.output.count("blocked") == 5
    healthy(pool, layout["ws"])


def test_hidden_answers_other_workspaces_and_home_unreadable(pool, layout):
    project = Path(__file__).resolve().parent.parent
    paths = [layout["answers"] / "labels.csv", layout["ws"] / ".answers" / "labels.csv",
             layout["other"] / "notes.txt", layout["home_secret"], project / "fastagent" / "sandbox" / "__init__.py",
             project / "pyproject.toml"]
    out = _reads(pool, layout["ws"], paths)
    assert "LEAK" not in out and out.count("denied") == len(paths)
    res = run(pool, layout["ws"], f"""
        import os
        print(sorted(os.listdir({str(layout['ws'].parent)!r})))
        print(open("data/train.csv").read().strip())
        """)
    assert res.output == "['ws']\n1,2,3\n"  # siblings (other workspaces, answers) do not exist
    healthy(pool, layout["ws"])


def test_packaged_dataset_files_unreadable_while_libraries_import(pool, layout):
    assert len(DATASET_FILES) >= 3
    out = _reads(pool, layout["ws"], DATASET_FILES)
    assert "LEAK" not in out and out.count("denied") == len(DATASET_FILES)
    libs = [m for m in ("sklearn.datasets", "statsmodels.api", "vega_datasets", "palmerpenguins",
                        "sktime.datasets", "mlxtend.data") if importlib.util.find_spec(m.split(".")[0])]
    res = run(pool, layout["ws"], f"import importlib\nfor m in {libs!r}: importlib.import_module(m)\nprint('imported')")
    assert res.ok and res.output == "imported\n", res.output


def test_every_task_data_file_is_hidden_without_being_named(pool, layout):
    """The raw data (labels included) of every bundled task ships in site-packages: the pool's default
    hide list must cover all of it, with no hide= from the caller."""
    from fastagent.tasks._prepare import package_data_paths
    files = []
    for p in package_data_paths():
        files += [p] if p.is_file() else [f for f in sorted(p.rglob("*")) if f.is_file()][:2]
    assert len(files) >= 10
    probe = ("import sys\nleaks = []\nfor p in sys.argv[1:]:\n    try:\n        open(p, 'rb').read(1)\n"
             "        leaks.append(p)\n    except OSError:\n        pass\nprint('checked', len(sys.argv) - 1, leaks)")
    res = pool.run(layout["ws"], argv=["python", "-c", probe, *map(str, files)])
    assert res.cause == "ok" and res.output.strip() == f"checked {len(files)} []", res.output


def test_bundled_dataset_loaders_fail(pool, layout):
    loaders = ["sklearn.datasets:load_digits", "sklearn.datasets:load_iris", "sklearn.datasets:load_wine",
               "sklearn.datasets:load_breast_cancer", "sklearn.datasets:load_diabetes",
               "sklearn.datasets:load_linnerud", "statsmodels.datasets.longley:load",
               "palmerpenguins:load_penguins", "mlxtend.data:iris_data", "sktime.datasets:load_airline"]
    loaders = [lo for lo in loaders if importlib.util.find_spec(lo.split(".")[0].split(":")[0])]
    res = run(pool, layout["ws"], f"""
        import importlib
        for spec in {loaders!r}:
            mod, fn = spec.split(":")
            try:
                data = getattr(importlib.import_module(mod), fn)()
                print("LEAK", spec)
            except Exception as e:
                print("failed", spec, type(e).__name__)
        """)
    assert res.ok and "LEAK" not in res.output and res.output.count("failed") == len(loaders), res.output


def test_writes_outside_workspace_fail(pool, layout):
    sk_init = SITE / "sklearn" / "__init__.py"
    before = sk_init.stat().st_mtime_ns
    project = Path(__file__).resolve().parent.parent
    targets = [project / "pwned", SITE / "pwned", sk_init, "/etc/pwned", "/pwned", "/usr/pwned",
               layout["other"] / "pwned", layout["ws"] / "data" / "pwned", layout["home_secret"],
               pool.log_dir / "pwned", "/proc/sys/kernel/hostname", "/sys/kernel/pwned"]
    res = run(pool, layout["ws"], f"""
        for p in {[str(t) for t in targets]!r} + ["/tmp/ok", "/dev/shm/ok", "ok.txt"]:
            try:
                with open(p, "a") as f:
                    f.write("x")
                print("wrote", p)
            except OSError as e:
                print("denied", p)
        """)
    # A project checked out under /tmp (as CI may do) shares its path prefix with the job's private
    # /tmp tmpfs: a write there lands in that tmpfs, never in the host project (asserted below).
    in_private_tmp = str(project).startswith("/tmp/")
    must_deny = [t for t in targets if not (in_private_tmp and t == project / "pwned")]
    assert res.ok and all(f"denied {t}\n" in res.output for t in must_deny), res.output
    assert all(f"wrote {p}\n" in res.output for p in ("/tmp/ok", "/dev/shm/ok", "ok.txt")), res.output
    assert sk_init.stat().st_mtime_ns == before
    assert not any(Path(t).exists() for t in targets if str(t).endswith("pwned"))
    assert (layout["ws"] / "ok.txt").exists() and not Path("/tmp/ok").exists()


def test_installed_packages_cannot_be_modified(pool, layout):
    res = run(pool, layout["ws"], f"""
        import os, numpy
        target = {str(SITE / 'sklearn' / '__init__.py')!r}
        for name, op in [("chmod", lambda: os.chmod(target, 0o777)), ("utime", lambda: os.utime(target)),
                         ("rename", lambda: os.rename(target, target + ".x")), ("unlink", lambda: os.unlink(target)),
                         ("truncate", lambda: os.truncate(numpy.__file__, 0)),
                         ("mkdir", lambda: os.mkdir(os.path.dirname(target) + "/evil"))]:
            try:
                op(); print("LEAK", name)
            except OSError:
                print("denied", name)
        """)
    assert res.ok and "LEAK" not in res.output and res.output.count("denied") == 6, res.output
    import numpy
    assert Path(numpy.__file__).stat().st_size > 0


def test_fork_bomb_contained(pool, layout):
    res = run(pool, layout["ws"], """
        import os
        while True:
            try:
                os.fork()
            except OSError:
                pass
        """, wall_s=3, nproc=16)
    assert res.cause == "timeout" and res.signal == signal.SIGKILL
    healthy(pool, layout["ws"])


def test_memory_bombs_report_oom(pool, layout):
    for code in ["chunks = []\nwhile True: chunks.append(bytearray(64 << 20))",
                 "import numpy as np\nx = np.ones((1 << 16, 1 << 16))",
                 "import torch\nx = torch.empty(1 << 36)"]:
        res = run(pool, layout["ws"], code, memory_mb=512)
        assert res.cause == "oom" and res.exit_code == 1, res.output
    healthy(pool, layout["ws"])


def test_disk_fill_stopped(pool, layout):
    res = run(pool, layout["ws"], "f = open('fill.bin', 'wb')\nwhile True: f.write(b'0' * (1 << 20))", file_mb=4)
    assert res.cause == "error" and "File too large" in res.output
    assert (layout["ws"] / "fill.bin").stat().st_size <= 4 << 20
    (layout["ws"] / "fill.bin").unlink()
    res = run(pool, layout["ws"], "i = 0\nwhile True:\n open(f'/tmp/f{i}', 'wb').write(b'0' * (1 << 20)); i += 1",
              tmp_mb=8)
    assert res.cause == "error" and "No space left" in res.output
    healthy(pool, layout["ws"])


def test_infinite_loops_time_out(pool, layout):
    res = run(pool, layout["ws"], "while True: pass", wall_s=1.5)
    assert res.cause == "timeout" and "wall-clock" in res.note
    res = run(pool, layout["ws"], "import numpy as np\nwhile True: np.linalg.svd(np.ones((200, 200)))",
              cpu_s=1, wall_s=60)
    assert res.cause == "timeout" and "CPU-time" in res.note
    healthy(pool, layout["ws"])


def test_daemon_cannot_outlive_its_job(pool, layout):
    res = run(pool, layout["ws"], """
        import os, threading, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                os.execvp("sleep", ["sleep", "987621"])
            os._exit(0)
        threading.Thread(target=lambda: (time.sleep(30), open("late.txt", "w")), daemon=True).start()
        print("main done")
        """)
    assert res.ok and res.output == "main done\n"
    assert not _with_marker("987621")  # gone before the result was reported
    healthy(pool, layout["ws"])


def test_signals_cannot_reach_pool_or_host(pool, layout):
    victim = subprocess.Popen(["sleep", "987622"])
    try:
        targets = [os.getpid(), pool.zygote_pid, victim.pid]
        res = run(pool, layout["ws"], f"""
            import os, signal
            assert os.getpid() < 10, "not in a PID namespace: refusing to send kill(-1)"
            for pid in {targets!r}:
                try:
                    os.kill(pid, signal.SIGKILL); print("sent", pid)
                except ProcessLookupError:
                    print("no such process")
            os.kill(os.getppid(), signal.SIGKILL)  # PID 1 of the namespace: ignored from inside
            try:
                os.kill(-1, signal.SIGKILL)  # every process it can see but itself: there is none
            except ProcessLookupError:
                print("nobody else")
            print("survived")
            """)
        assert res.ok and res.output.count("no such process") + res.output.count("sent") == 3
        assert "nobody else\nsurvived" in res.output
        assert victim.poll() is None  # the host process is untouched
        healthy(pool, layout["ws"])
    finally:
        victim.kill()
        victim.wait()


def test_other_processes_environment_unreadable(pool, layout, monkeypatch):
    monkeypatch.setenv("FASTAGENT_TEST_SECRET", "SECRET-ENV-123")
    victim = subprocess.Popen(["sleep", "987623"], env={"FASTAGENT_TEST_SECRET": "SECRET-ENV-123"})
    try:
        res = run(pool, layout["ws"], """
            import os
            seen = 0
            for pid in os.listdir("/proc"):
                if pid.isdigit():
                    seen += 1
                    for name in ("environ", "cmdline"):
                        try:
                            if b"SECRET-ENV" in open(f"/proc/{pid}/{name}", "rb").read():
                                print("LEAK", pid, name)
                        except OSError:
                            pass
            print("LEAK own env" if "FASTAGENT_TEST_SECRET" in os.environ else "clean", seen)
            for p in ("/proc/1/environ", "/proc/1/mem", "/proc/1/root/etc/hostname"):  # the init
                try:
                    open(p, "rb").read(1); print("LEAK", p)
                except OSError:
                    print("denied")
            """)
        assert res.ok and "LEAK" not in res.output and res.output.startswith("clean")
        assert int(res.output.split()[1]) <= 3  # PID 1, the job, nothing of the host
        assert res.output.count("denied") == 3
    finally:
        victim.kill()
        victim.wait()


def test_output_flood_is_capped(pool, layout):
    res = run(pool, layout["ws"], "print('FIRST')\nwhile True: print('y' * 1000)", wall_s=2, file_mb=1)
    assert res.cause == "timeout" and res.output.startswith("FIRST\n")
    assert res.truncated_bytes > 1 << 20 and f"[... {res.truncated_bytes} bytes" in res.output
    assert res.stdout_path.stat().st_size <= 1 << 20
    res = run(pool, layout["ws"], "import sys\nsys.stdout.write('z' * (20 << 20))\nprint('LAST')")
    assert res.ok and res.output.endswith("zLAST\n") and res.truncated_bytes > 19 << 20
    healthy(pool, layout["ws"])


def test_fd_and_zombie_leaks_stay_inside_the_job(pool, layout):
    def quiet() -> bool:  # every standby ready (T, PID 1, job process) and handed to the pool
        idle = sum(len(q) for q in pool._loop.idle.values())
        return idle == pool.workers and len(_descendants(pool.zygote_pid)) == 3 * pool.workers
    assert _eventually(quiet)
    zfds, my_fds = len(os.listdir(f"/proc/{pool.zygote_pid}/fd")), len(os.listdir("/proc/self/fd"))
    leak = """
        import os
        fds = []
        try:
            while True:
                fds.append(os.open("/dev/null", os.O_RDONLY))
        except OSError as e:
            print("fd limit", e.errno, len(fds) > 100)
        for _ in range(20):
            if os.fork() == 0:
                os._exit(0)
        """
    for _ in range(6):
        res = run(pool, layout["ws"], leak)
        assert res.ok and res.output == "fd limit 24 True\n", res.output
    assert _eventually(quiet)
    states = [open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[0] for p in _descendants(pool.zygote_pid)]
    assert "Z" not in states
    assert len(os.listdir(f"/proc/{pool.zygote_pid}/fd")) == zfds
    assert len(os.listdir("/proc/self/fd")) == my_fds


def test_mounts_and_capabilities_cannot_be_regained(pool, layout):
    hidden = layout["ws"] / ".answers" / "labels.csv"
    res = run(pool, layout["ws"], f"""
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        status = open("/proc/self/status").read()
        caps = [l for l in status.splitlines() if l.startswith(("CapEff", "CapPrm", "CapBnd", "NoNewPrivs"))]
        print(caps)
        print("umount", libc.umount2({str(hidden.parent).encode()!r}, 2), ctypes.get_errno() != 0)
        # A nested user namespace grants capabilities again, but the kernel locks inherited mounts.
        if libc.unshare(0x10000000 | 0x20000) == 0:
            print("umount nested", libc.umount2({str(hidden.parent).encode()!r}, 2))
        try:
            print("LEAK", open({str(hidden)!r}).read())
        except OSError:
            print("still hidden")
        """)
    assert res.ok and "LEAK" not in res.output and "still hidden" in res.output
    assert "'CapEff:\\t0000000000000000', 'CapBnd:\\t0000000000000000'" in res.output
    assert "NoNewPrivs:\\t1" in res.output and "umount -1 True" in res.output


# ------------------------------------------------------------------ fallback: Landlock without namespaces

@pytest.fixture(scope="module")
def landlock_pool(layout):
    with _make_pool(layout, isolation="landlock") as p:
        assert p.isolation["mode"] == "landlock", p.isolation["probe"]
        yield p


def test_landlock_fallback_files_network_and_writes(landlock_pool, layout):
    ws = layout["ws"]
    paths = [layout["answers"] / "labels.csv", ws / ".answers" / "labels.csv", layout["other"] / "notes.txt",
             layout["home_secret"], *DATASET_FILES[:3]]
    out = _reads(landlock_pool, ws, paths)
    assert "LEAK" not in out and out.count("denied") == len(paths)
    res = run(landlock_pool, ws, f"""
        import socket
        try:
            socket.create_connection(("127.0.0.1", 22), timeout=1); print("LEAK net")
        except OSError:
            print("net blocked")
        for p in [{str(SITE / 'pwned')!r}, {str(ws / 'data' / 'pwned')!r}, "ok.txt"]:
            try:
                open(p, "w").write("x"); print("wrote", p)
            except OSError:
                print("denied", p)
        import sklearn.datasets
        try:
            sklearn.datasets.load_iris(); print("LEAK iris")
        except OSError:
            print("loader failed")
        """)
    assert res.ok and "LEAK" not in res.output and res.output.count("denied") == 2, res.output
    assert "wrote ok.txt" in res.output and "loader failed" in res.output


def test_landlock_fallback_kills_the_whole_tree(landlock_pool, layout):
    res = run(landlock_pool, layout["ws"], """
        import os
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                os.execvp("sleep", ["sleep", "987631"])
            os._exit(0)
        print("main done")
        """)
    assert res.ok and not _with_marker("987631")
    res = run(landlock_pool, layout["ws"], "import os\nif os.fork() == 0: os.execvp('sleep', ['sleep', '987632'])\n"
              "while True: pass", wall_s=1.5)
    assert res.cause == "timeout" and not _with_marker("987632")
    signal_scoped = landlock_pool.isolation["landlock_abi"] >= 6
    res = run(landlock_pool, layout["ws"], f"import os\nos.kill({os.getpid()}, 0)\nprint('can signal')")
    assert (res.cause == "error") == signal_scoped  # ABI >= 6: signals cannot leave the job
    healthy(landlock_pool, layout["ws"])
