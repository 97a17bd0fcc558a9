"""Hostile workspaces through the real path: Env on a bundled task, scripts in the sandbox Pool.

Every byte, name and inode in a workspace is hostile. An agent writes files with Edit Script Segment
and runs them with Execute Script; what they leave (links to the hidden answers, /proc/self/mem or
/etc/shadow, fifos, hard links, a directory named submission.csv, 10,000-level and 100,000-file
trees, a 99 MB file, sparse files, undecodable names) must be contained: the step earns the reward
the rule says (links, specials and over-cap submissions -1; a workspace over a cap -1, rolled back),
the host keeps its memory and its files, env.close() leaves nothing, and the next step works. Links
planted directly in the workspace (as if a run had left them) check every file-taking action too.

Run: .venv/bin/python -m pytest -q tests/test_integrity_env.py            (-m "not slow": ~1 min)
"""

from __future__ import annotations

import hashlib
import json
import os
import tracemalloc
from pathlib import Path

import pytest

from fastagent.data import StepRecord, TrajectoryWriter, read_records
from fastagent.env import Env
from fastagent.reward import RewardConfig
from fastagent.sandbox import Pool
from fastagent.tasks import get_task


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("integrity-env")


@pytest.fixture(scope="module")
def pool(root):
    with Pool(workers=2, hide=[root]) as p:
        yield p


@pytest.fixture(scope="module")
def digits():
    return get_task("digits")


@pytest.fixture
def env(digits, pool, root):
    """A fresh episode; afterwards: its workspace and every scratch dir are gone from the host."""
    e = Env(digits, pool, root, helper=_Helper())
    e.reset()
    answers = _answer_hashes(e)
    yield e
    ws = e.ws
    e.close()
    assert ws is None or not os.path.lexists(ws)
    assert not list((root / "episodes").iterdir()), "env.close() left a workspace behind"
    assert not [p for p in root.iterdir() if p.name.startswith(".score-")], "a scoring scratch dir is left"
    assert _answer_hashes(e) == answers  # the hidden answers are untouched


class _Helper:
    """A helper model that records every prompt it is sent (to check what left the workspace)."""

    def __init__(self):
        self.prompts: list[str] = []

    def __call__(self, prompt: str) -> str:
        self.prompts.append(prompt)
        return f"read {len(prompt)} characters"


def _answer_hashes(env: Env) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(env.answers.iterdir())}


def act(env: Env, action: str, **args) -> tuple[str, float, str]:
    obs, r, _, info = env.step(f"Thought: t\nAction: {action}\nAction Input: {json.dumps(args)}")
    assert obs.encode("utf-8")  # valid UTF-8, always
    return obs, r, info["reward"]["kind"]


def run(env: Env, code: str, name: str = "evil.py") -> tuple[str, float, str]:
    """What the agent does: write a script with Edit Script Segment, run it with Execute Script."""
    assert act(env, "Edit Script Segment", script_name=name, start_line_number=1, end_line_number=0,
               new_content=code)[2] == "no_score"
    return act(env, "Execute Script", script_name=name)


def next_step_works(env: Env) -> None:
    obs, r, kind = act(env, "List Files", dir_path=".")
    assert kind == "no_score" and "train.py" in obs


def peak_rss_mb() -> float:
    return int(next(ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:")).split()[1]) / 1024


def reset_peak_rss() -> float:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    return peak_rss_mb()


# --- submissions: a link, special file, hard link or over-cap file is malformed (-1) -------------

SUBMISSIONS = {
    "symlink to the hidden answers": "os.symlink({answers!r}, 'submission.csv')",
    "symlink to /proc/self/mem": "os.symlink('/proc/self/mem', 'submission.csv')",
    "symlink to /etc/shadow": "os.symlink('/etc/shadow', 'submission.csv')",
    "fifo": "os.mkfifo('submission.csv')",
    "hard link": "open('mine.csv', 'w').write('id,label\\n')\nos.link('mine.csv', 'submission.csv')",
    "directory": "os.mkdir('submission.csv')\nopen('submission.csv/x', 'w').write('x')",
    "over the cap (70 MB)": "open('submission.csv', 'wb').write(b'0' * (70 << 20))",
}


@pytest.mark.parametrize("attack", list(SUBMISSIONS))
def test_hostile_submission_is_malformed(env, attack):
    answers = os.path.relpath(sorted(env.answers.iterdir())[0], env.ws)  # ../../tasks/digits-0/answers/...
    obs, r, kind = run(env, "import os\n" + SUBMISSIONS[attack].format(answers=answers))
    assert (kind, r) == ("invalid_action", -1.0), obs
    assert "malformed submission" in obs and "script ran to the end" in obs
    assert env.state().metric == env.start_metric  # nothing was scored
    assert not os.path.islink(env.ws / "submission.csv")  # sanitize removed links and fifos
    obs, r, kind = act(env, "Execute Script", script_name="train.py")
    if attack in ("hard link", "directory"):  # still there: the starter writes through it or fails
        assert (kind, r) == ("invalid_action", -1.0), obs
    else:  # the untouched starter's submission scores exactly the starting metric: 0.5
        assert (kind, r) == ("score", 0.5) and env.state().metric == env.start_metric, obs
    next_step_works(env)


def test_special_files_left_by_a_run_are_removed(env):
    code = ("import os\nos.symlink('/etc/shadow', 'shadow')\nos.symlink('/', 'rootdir')\nos.mkfifo('pipe')\n"
            "os.symlink('train.py', 'link.py')\nimport socket\ns = socket.socket(socket.AF_UNIX)\n"
            "s.bind('sock')\nopen('ok.txt', 'w').write('fine')\nos.chmod('ok.txt', 0o4755)\nprint('made')")
    obs, r, kind = run(env, code)
    assert (kind, r) == ("no_score", 0.0) and "made" in obs
    for name in ("shadow", "rootdir", "pipe", "link.py", "sock"):
        assert not os.path.lexists(env.ws / name), name
    assert (env.ws / "ok.txt").read_text() == "fine" and (env.ws / "ok.txt").stat().st_mode & 0o7000 == 0
    for action, args in [("Inspect Script Lines", dict(script_name="shadow", start_line_number=1, end_line_number=5)),
                         ("Execute Script", dict(script_name="link.py")),
                         ("List Files", dict(dir_path="rootdir"))]:
        obs, r, kind = act(env, action, **args)
        assert (kind, r) == ("invalid_action", -1.0) and "root:" not in obs, (action, obs)
    next_step_works(env)


# --- links planted in the workspace: every file-taking action refuses them ----------------------

def _plant(env: Env) -> dict[str, str]:
    """Links and special files put straight into the workspace, as if a run had left them."""
    answers = sorted(env.answers.iterdir())[0]
    links = {"ans.csv": str(answers), "shadow.py": "/etc/shadow", "mem.py": "/proc/self/mem",
             "link.py": "train.py", "etc": "/etc", "rel.py": os.path.relpath(answers, env.ws)}
    for name, target in links.items():
        os.symlink(target, env.ws / name)
    os.mkfifo(env.ws / "pipe.py")
    return links


def test_file_actions_refuse_planted_links(env):
    _plant(env)
    secret = sorted(env.answers.iterdir())[0].read_bytes()[:40].decode()
    names = ["ans.csv", "shadow.py", "mem.py", "link.py", "rel.py", "pipe.py", "etc/passwd"]
    for name in names:
        attempts = [
            ("Inspect Script Lines", dict(script_name=name, start_line_number=1, end_line_number=5)),
            ("Understand File", dict(file_name=name, things_to_look_for="everything")),
            ("Copy File", dict(source=name, destination="copy.csv")),
            ("Copy File", dict(source="train.py", destination=name)),
            ("Edit Script Segment", dict(script_name=name, start_line_number=1, end_line_number=0, new_content="x")),
            ("Edit Script Segment", dict(script_name="train.py", start_line_number=1, end_line_number=0,
                                         new_content="x", save_name=name)),
            ("Edit Script (AI)", dict(script_name=name, edit_instruction="x", save_name="new.py")),
            ("Execute Script", dict(script_name=name)),
        ]
        for action, args in attempts:
            obs, r, kind = act(env, action, **args)
            assert (kind, r) == ("invalid_action", -1.0), (name, action, obs)
            assert secret not in obs and "root:" not in obs, (name, action)
    assert env.helper.prompts == []  # no link's target was read for the helper
    assert not os.path.lexists(env.ws / "copy.csv") and not os.path.lexists(env.ws / "new.py")
    obs, r, kind = act(env, "List Files", dir_path="etc")
    assert (kind, r) == ("invalid_action", -1.0)
    obs, r, kind = act(env, "List Files", dir_path=".")
    assert "etc [symbolic link]" in obs and "pipe.py [not a regular file]" in obs
    assert os.readlink(env.ws / "link.py") == "train.py"  # refused, never rewritten through


def test_undo_refuses_a_file_swapped_for_a_link(env):
    act(env, "Edit Script Segment", script_name="u.py", start_line_number=1, end_line_number=0, new_content="a")
    act(env, "Edit Script Segment", script_name="u.py", start_line_number=1, end_line_number=1, new_content="b")
    (env.ws / "u.py").unlink()
    os.symlink("/etc/shadow", env.ws / "u.py")
    obs, r, kind = act(env, "Undo Edit Script", script_name="u.py")
    assert (kind, r) == ("invalid_action", -1.0) and os.readlink(env.ws / "u.py") == "/etc/shadow"
    (env.ws / "u.py").unlink()
    obs, r, kind = act(env, "Undo Edit Script", script_name="u.py")  # the stack survived the refusal
    assert kind == "no_score" and (env.ws / "u.py").read_text() == "a\n"


# --- trees over the caps: invalid action, the workspace back as it was ---------------------------

def test_deep_tree_is_over_the_cap_and_rolled_back(env):
    code = "import os\nfor i in range(10_000):\n    os.mkdir('d')\n    os.chdir('d')\nprint('deep')"
    obs, r, kind = run(env, code)
    assert (kind, r) == ("invalid_action", -1.0) and "deep" in obs and "nested more than" in obs
    assert not (env.ws / "d").exists() and (env.ws / "evil.py").is_file()  # as before the run
    next_step_works(env)


def test_wide_tree_is_over_the_cap_and_rolled_back(env):
    code = "import os\nos.mkdir('w')\nfor i in range(100_000):\n    open(f'w/{i}', 'w').close()\nprint('wide')"
    obs, r, kind = run(env, code)
    assert (kind, r) == ("invalid_action", -1.0) and "wide" in obs and "more than" in obs
    assert not (env.ws / "w").exists()
    next_step_works(env)


def test_sparse_files(env):
    # the sandbox caps a file at Limits.file_mb (1 GB): a 100 GB truncate fails in the run
    obs, r, kind = run(env, "open('s100', 'wb').truncate(100 << 30)")
    assert (kind, r) == ("invalid_action", -1.0) and "File too large" in obs
    # 1000 MB of holes is within the sandbox's cap but over the workspace's per-file cap
    obs, r, kind = run(env, "open('s1', 'wb').truncate(1000 << 20)\nprint('sparse')", name="s2.py")
    assert (kind, r) == ("invalid_action", -1.0) and "larger than" in obs and not (env.ws / "s1").exists()
    # a 100 GB sparse file planted on the host: refused or read within the caps, never in full
    with open(env.ws / "big.bin", "wb") as f:
        f.truncate(100 << 30)
    tracemalloc.start()
    try:
        assert act(env, "Copy File", source="big.bin", destination="c.bin")[2] == "invalid_action"
        assert act(env, "Inspect Script Lines", script_name="big.bin", start_line_number=1,
                   end_line_number=5)[2] == "invalid_action"  # 1 MB of zeros holds no whole line
        assert act(env, "Understand File", file_name="big.bin", things_to_look_for="x")[2] == "no_score"
        assert act(env, "Edit Script Segment", script_name="big.bin", start_line_number=1, end_line_number=0,
                   new_content="x")[2] == "invalid_action"
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 << 20, peak
    assert not (env.ws / "c.bin").exists()
    next_step_works(env)


def test_huge_file_keeps_host_memory_small(env):
    code = ("with open('big.txt', 'w') as f:\n    for i in range(1_000_000):\n"
            "        f.write(f'{i:098d}\\n')\nprint('written')")  # 99 MB, 1,000,000 lines
    obs, r, kind = run(env, code)
    assert (kind, r) == ("no_score", 0.0) and (env.ws / "big.txt").stat().st_size == 99_000_000
    base = reset_peak_rss()
    tracemalloc.start()
    try:
        obs, r, kind = act(env, "Inspect Script Lines", script_name="big.txt", start_line_number=3, end_line_number=4)
        assert kind == "no_score" and f"{2:098d}" in obs and "more than" in obs
        obs, r, kind = act(env, "Inspect Script Lines", script_name="big.txt", start_line_number=999_990,
                           end_line_number=999_999)
        assert kind == "invalid_action" and "too large to scan" in obs
        assert act(env, "Understand File", file_name="big.txt", things_to_look_for="x")[2] == "no_score"
        assert len(env.helper.prompts[-1]) < 13_000
        assert act(env, "Copy File", source="big.txt", destination="copy.txt")[2] == "no_score"
        obs, r, kind = act(env, "Edit Script Segment", script_name="big.txt", start_line_number=1,
                           end_line_number=0, new_content="x")
        assert kind == "invalid_action" and "larger than" in obs
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    rss_delta = peak_rss_mb() - base
    print(f"99 MB file: python heap peak {peak / 2**20:.1f} MB, RSS peak delta {rss_delta:.1f} MB")
    assert peak < 20 << 20 and rss_delta < 100, (peak, rss_delta)
    assert (env.ws / "copy.txt").stat().st_size == 99_000_000
    next_step_works(env)


# --- names ---------------------------------------------------------------------------------------

def test_undecodable_names_list_and_record(env, tmp_path):
    code = ("import os\nopen(b'\\xff\\xfe.csv', 'w').write('x')\nopen('new\\nline', 'w').write('x')\n"
            "open('bidi\\u202etxt.py', 'w').write('x')\nos.mkdir(b'dir\\x80')\nprint('named')")
    obs, r, kind = run(env, code)
    assert kind == "no_score" and "named" in obs
    prompt = env.messages()
    obs, r, kind = act(env, "List Files", dir_path=".")
    assert kind == "no_score" and "\ufffd\ufffd.csv" in obs and "new\\x0aline" in obs and "\\u202e" in obs
    assert "dir\ufffd/" in obs
    with TrajectoryWriter(tmp_path / "t.traj") as w:
        w.append(StepRecord(task="digits", episode="e", step=0, prompt=prompt, response="List Files",
                            observation=obs, reward=r))
    assert read_records(tmp_path / "t.traj", strict=True)[0].observation == obs
    next_step_works(env)


def test_tokenize_chat_takes_lone_surrogates():
    from fastagent.chat import tokenize_chat
    from fastagent.model import load_model
    _, tok = load_model("tiny-random")
    msgs = [{"role": "user", "content": "file \udcff\udcfe.csv"}, {"role": "assistant", "content": "ok \ud800"}]
    ids, mask = tokenize_chat(tok, msgs)
    assert len(ids) == len(mask) and sum(mask) > 0
    assert "\ufffd\ufffd.csv" in tok.decode(ids) and "ok \ufffd" in tok.decode(ids)


# --- the starting metric is the starter's score on the episode's own seed ------------------------

@pytest.mark.parametrize("name", ["digits", "car-mpg"])
def test_rerunning_the_untouched_starter_at_seed_3_pays_exactly_one_half(name, pool, root):
    task = get_task(name)
    env = Env(task, pool, root, seed=3, reward=RewardConfig())
    env.reset()
    assert env.start_metric != task.starter_score  # task.toml holds the seed-0 number
    obs, r, kind = act(env, "Execute Script", script_name="train.py")
    assert kind == "score" and r == 0.5, obs  # sigmoid(alpha * s * (m - m)): unchanged metric
    assert env.state().metric == env.start_metric
    cache = json.loads((root / "tasks" / f"{name}-3" / "starter.json").read_text())
    assert cache["seed"] == 3 and cache["score"] == env.start_metric
    env.close()
