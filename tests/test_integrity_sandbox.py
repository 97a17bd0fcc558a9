"""Reward integrity through the real path: Env(get_task("digits"), Pool, root) stepped with agent
turns (Edit Script Segment writes evil.py, Execute Script runs it). A script that fakes a corner
case (kills itself, raises MemoryError, forges mux frames) gets invalid_action (-1); only a real
time-limit or memory kill is a corner case (0); a set-id copy of a shell leaves no root-owned or
set-id file on the host; packaged data stays unreadable; nothing is left after close + shutdown.
Run: `.venv/bin/python -m pytest -q tests/test_integrity_sandbox.py`.
"""

from __future__ import annotations

import json
import os
import stat
import textwrap
from pathlib import Path

import pytest

from fastagent.config import Config
from fastagent.env import Env
from fastagent.sandbox import Pool
from fastagent.tasks import get_task
from _proc import _descendants

def _edit(code: str, script: str) -> str:
    args = {"script_name": script, "start_line_number": 1, "end_line_number": 0,
            "new_content": textwrap.dedent(code).strip() + "\n"}
    return "Action: Edit Script Segment\nAction Input: " + json.dumps(args)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("integrity")


@pytest.fixture(scope="module")
def pool(root):
    with Pool(workers=2, hide=[root]) as p:
        yield p


def _run(env: Env, code: str, script: str = "evil.py") -> tuple[str, dict]:
    """Write a new script in one turn, execute it in the next: (observation, info) of the run."""
    _, _, _, info = env.step(_edit(code, script))
    assert info["reward"]["kind"] == "no_score", info["reward"]
    execute = "Action: Execute Script\nAction Input: " + json.dumps({"script_name": script})
    obs, _, _, info = env.step(execute)
    return obs, info


def _episode(pool: Pool, root: Path, **kw) -> Env:
    env = Env(get_task("digits"), pool, root, **kw)
    env.reset()
    return env


FAKES = {
    "self_sigkill": "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)",
    "self_sigxcpu": "import os, signal\nsignal.signal(signal.SIGXCPU, signal.SIG_DFL)\nos.kill(os.getpid(), signal.SIGXCPU)",
    "small_memoryerror": "x = bytearray(1 << 20)\nraise MemoryError('out of memory')",
    "forged_oom_frame": ("import os, struct, sys\n"
                         "os.write(sys.stdout.buffer.raw.mux_fd, struct.pack('!BI', 0, 4) + b'oom\\n')\n"
                         "raise SystemExit(1)"),
    # A forged status report on every socket the job holds: the job must hold none that T believes
    # (K closes its J/T socket before the job's code runs), so this stays a failing script.
    "forged_report_on_its_sockets": ("import json, os, socket\n"
                                     "msg = json.dumps({'status': 0, 'cpu_s': 0.0, 'maxrss_kb': 0, 'started': 0}).encode()\n"
                                     "for fd in map(int, os.listdir('/proc/self/fd')):\n"
                                     "    try:\n"
                                     "        socket.socket(fileno=os.dup(fd)).send(msg)\n"
                                     "        print('sent on', fd)\n"
                                     "    except OSError:\n"
                                     "        pass\n"
                                     "raise SystemExit(1)"),
    "giant_frame_length": ("import os, struct, sys\n"
                           "os.write(sys.stdout.buffer.raw.mux_fd, struct.pack('!BI', 1, 0xFFFFFFF0) + b'x' * 100)\n"
                           "raise SystemExit(1)"),
}


@pytest.mark.parametrize("name", sorted(FAKES))
def test_faked_corner_cases_are_invalid_actions(pool, root, name):
    env = _episode(pool, root)
    _, info = _run(env, FAKES[name])
    assert info["run"]["cause"] == "error", info["run"]
    assert (info["reward"]["kind"], info["reward"]["value"]) == ("invalid_action", -1.0), info["reward"]
    obs, info = _run(env, "print('still fine')", "next.py")  # the next step still works
    assert info["run"]["cause"] == "ok" and "still fine" in obs
    assert info["reward"]["kind"] == "no_score"
    ws = env.ws
    env.close()
    assert not ws.exists()


def test_real_time_limit_is_a_corner_case(pool, root):
    env = _episode(pool, root, time_limit_s=2)
    _, info = _run(env, "import time\ntime.sleep(60)")
    assert info["run"]["cause"] == "timeout"
    assert (info["reward"]["kind"], info["reward"]["value"]) == ("corner_case", 0.0)
    env.close()


def test_real_memory_blowup_is_a_corner_case(pool, root):
    assert pool.isolation["cgroups"] == (os.geteuid() == 0)  # as root here and in CI
    env = _episode(pool, root, cfg=Config(step_memory_mb=512, step_timeout_s=60))
    _, info = _run(env, "x = []\nwhile True:\n    x.append(bytearray(64 << 20))")
    assert info["run"]["cause"] == "oom", info["run"]
    assert (info["reward"]["kind"], info["reward"]["value"]) == ("corner_case", 0.0)
    env.close()


def test_setid_shell_copy_leaves_nothing_root_owned_or_setid(pool, root):
    env = _episode(pool, root)
    _, info = _run(env, """
        import os, shutil
        shutil.copy("/bin/sh", "sh"); os.chmod("sh", 0o6755)
        os.makedirs("deep/er"); shutil.copy("/bin/sh", "deep/er/sh"); os.chmod("deep/er/sh", 0o4755)
        os.chmod("deep", 0o2777)
        print("made", oct(os.stat("sh").st_mode))
        """)
    assert info["run"]["cause"] == "ok", info["run"]
    data = env.ws / "data"
    seen = 0
    for path, dirs, files in os.walk(env.ws):
        for name in dirs + files:
            full = Path(path) / name
            st = full.lstat()
            seen += 1
            assert not st.st_mode & (stat.S_ISUID | stat.S_ISGID), (full, oct(st.st_mode))
            if not full.is_relative_to(data):  # task data: read-only hard links into the store
                assert st.st_uid != 0 and st.st_gid != 0, (full, st.st_uid)
    assert seen >= 5 and (env.ws / "sh").exists() and (env.ws / "deep" / "er" / "sh").exists()
    env.close()


def test_packaged_data_is_unreadable(pool, root):
    import sklearn
    import statsmodels
    targets = [Path(sklearn.__file__).parent / "datasets" / "data" / "digits.csv.gz",
               Path(statsmodels.__file__).parent / "datasets" / "co2" / "co2.csv"]
    assert all(t.is_file() for t in targets)
    env = _episode(pool, root)
    obs, info = _run(env, f"""
        for p in {[str(t) for t in targets]!r}:
            try:
                open(p, "rb").read(10); print("LEAK", p)
            except OSError as e:
                print("denied", type(e).__name__)
        from sklearn.datasets import load_digits
        load_digits()
        """)
    assert "LEAK" not in obs and obs.count("denied PermissionError") == 2, obs
    assert info["run"]["cause"] == "error" and info["reward"]["kind"] == "invalid_action"
    env.close()


def test_nothing_is_left_after_close_and_shutdown(tmp_path):
    root = tmp_path / "env"
    pool = Pool(workers=2, hide=[root])
    try:
        env = _episode(pool, root)
        obs, info = _run(env, "import numpy as np\nprint(np.load('data/train.npz')['X'].shape[1])\n"
                              "open('junk.bin', 'wb').write(b'0' * 4096)")
        assert info["run"]["cause"] == "ok", obs
        zygote, log_dir, groups = pool.zygote_pid, pool.log_dir, list(pool.isolation["cgroup_dirs"].values())
        assert all(Path(g).is_dir() for g in groups) and len(groups) == (2 if os.geteuid() == 0 else 0)
        assert sorted(p.name for p in log_dir.iterdir()) == ["zygote.log"]  # no per-job log files
        tree = _descendants(zygote) | {zygote}  # zygote, supervisors, inits and jobs of standbys
        env.close()
    finally:
        pool.shutdown()
    assert not any(Path(g).exists() for g in groups)
    assert not log_dir.exists() and not os.path.exists(f"/proc/{zygote}")
    assert not [pid for pid in tree if os.path.exists(f"/proc/{pid}")]
    assert not any((root / "episodes").iterdir())
