"""Expert data, for real: idea pools from the starters, the scripted expert through the real Env + Pool,
`python -m fastagent.expert` (parallel episodes, resumable after SIGKILL, nothing duplicated), the
records' prompts and start snapshots, the summary and the ShareGPT export."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from fastagent.config import smoke
from fastagent.data import import_sharegpt, read_records
from fastagent.env import Env
from fastagent.expert.generate import complete_prefix, generate_expert_data, run_episode, state_of
from fastagent.expert.ideas import Idea, plan_edit, table_columns, task_ideas
from fastagent.expert.scripted import ScriptedExpert
from fastagent.sandbox import Pool
from fastagent.tasks import get_task, list_tasks, materialize

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "fastagent.expert"]


def _apply(script: str, idea: Idea) -> str:
    e = plan_edit(idea, script)
    lines = script.splitlines(True)
    return "\n".join(e.imports) + "\n" + "".join(lines[:e.start - 1]) + e.new_content + "\n" + "".join(lines[e.end:])


def test_idea_pool_per_training_task(tmp_path):
    """>= 100 ideas per training task, each a real edit of the starter that still compiles; texts differ."""
    for task in list_tasks("train"):
        ws, _ = materialize(task, tmp_path, seed=0)
        script = (ws / "train.py").read_text()
        ideas = task_ideas(script, table_columns(ws))
        assert len(ideas) >= 100, (task.name, len(ideas))
        assert len({i.text for i in ideas}) == len(ideas)
        for idea in ideas:
            compile(_apply(script, idea), f"{task.name}: {idea.text}", "exec")
        # the target column is never offered as a feature (it is not in the test table)
        assert not any("Miles_per_Gallon" in str(i.params) for i in ideas)


def test_table_columns_leave_out_the_target(tmp_path):
    ws, _ = materialize(get_task("car-mpg"), tmp_path, seed=0)
    cols = table_columns(ws)
    assert "Weight_in_lbs" in cols and "Miles_per_Gallon" not in cols


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    root = tmp_path_factory.mktemp("expert-env")
    with Pool(workers=2, hide=[root]) as p:
        p.test_root = root
        yield p


def test_scripted_expert_recovers_from_its_own_crash(pool):
    """Forced to forget the import: the run crashes with NameError, the expert reads it, adds the import
    and reruns; every step is a valid action and the episode ends with Final Answer."""
    task = get_task("digits")
    env = Env(task, pool, pool.test_root, cfg=replace(smoke(), max_episode_steps=14))
    idea = next(i for i in task_ideas(_starter(env)) if i.kind == "model")
    expert = ScriptedExpert(task, [idea], seed=1, max_steps=14, p_forget=1.0, p_typo=0.0)
    recs = run_episode(env, expert, "t-0", {})
    env.close()
    tags = [t for r in recs for t in r.meta["tags"]]
    kinds = [r.reward_parts["kind"] for r in recs]
    assert "format_error" not in kinds
    crash = next(r for r in recs if "NameError" in r.observation)
    fix = recs[crash.step + 1]
    assert "recovery" in fix.meta["tags"] and fix.action["name"] == "Edit Script Segment"
    assert "import" in fix.action["args"]["new_content"]
    assert recs[crash.step + 2].reward_parts["kind"] == "score"  # the rerun after the fix scores
    assert recs[-1].action["name"] == "Final Answer" and recs[-1].meta["last"]
    assert tags.count("recovery") >= 2


def _starter(env: Env) -> str:
    from fastagent.workspace import Store
    return Store(env.store.root).read(env.initial, "train.py").decode()


def test_records_hold_the_policy_prompt_and_the_start_snapshot(pool, tmp_path):
    """Each record's prompt is what Env.messages() gives from the state it started from, and its
    snapshot is that state's (the previous step's snapshot_after)."""
    cfg = replace(smoke(), train_tasks="car-mpg", max_episode_steps=10, history_k=2, num_diverse_ideas=4)
    out = generate_expert_data(cfg, tmp_path / "e.traj", episodes=1)
    recs = read_records(out)
    assert recs and recs[0].step == 0 and recs[-1].meta["last"]
    env = Env(get_task("car-mpg"), pool, tmp_path / "env", cfg=cfg)
    for k, rec in enumerate(recs):
        env.reset(state=state_of(rec, recs[:k]))
        assert env.messages() == rec.prompt
        assert rec.snapshot == rec.meta["state"]["snapshot"]
        if k:
            assert rec.snapshot == recs[k - 1].meta["snapshot_after"]
    env.close()
    assert any(r.snapshot != r.meta["snapshot_after"] for r in recs)  # edits and runs change the workspace


def test_heldout_tasks_never_make_training_data(tmp_path):
    cfg = replace(smoke(), train_tasks="heldout")
    with pytest.raises(ValueError, match="never makes training data on held-out tasks"):
        generate_expert_data(cfg, tmp_path / "e.traj", episodes=1)
    out = subprocess.run(CLI + [f"--out={tmp_path / 'x.traj'}", "--tasks=heldout", "--episodes=1"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "held-out" in out.stderr and "Traceback" not in out.stderr


def test_complete_prefix_cuts_partial_episodes(tmp_path):
    from fastagent.data import StepRecord, TrajectoryWriter
    path = tmp_path / "t.traj"
    with TrajectoryWriter(path) as w:
        w.append(StepRecord(task="a", episode="a-0", step=0, prompt=[], response="x", meta={"last": True}))
        good = path.stat().st_size
        w.append(StepRecord(task="a", episode="a-1", step=0, prompt=[], response="y"))  # episode cut short
    with open(path, "ab") as f:
        f.write(b"FAT1\x10\x00")  # and a torn frame
    assert complete_prefix(path) == good == path.stat().st_size
    assert [r.episode for r in read_records(path)] == ["a-0"]


def _cli(tmp_path: Path, out: Path, *extra: str) -> list[str]:
    return CLI + [f"--out={out}", "--preset=smoke", "--train_tasks=digits,car-mpg,anes-vote", "--episodes=6",
                  "--max_episode_steps=8", "--workers=2", f"--run_dir={tmp_path}", *extra]


@pytest.mark.slow
def test_expert_command_resumes_after_sigkill(tmp_path):
    """Killed with SIGKILL after its first episodes landed, the same command finishes the job: every
    episode once, steps contiguous, and the records equal an uninterrupted run's."""
    ref = tmp_path / "ref" / "e.traj"
    subprocess.run(_cli(tmp_path, ref), cwd=ROOT, check=True, capture_output=True, timeout=600)
    out = tmp_path / "run" / "e.traj"
    proc = subprocess.Popen(_cli(tmp_path, out), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and sum(r.meta.get("last", False) for r in read_records(out)) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed: make it longer"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = {r.episode for r in read_records(out)}
    assert 0 < len(first) < 6 or not all(r.meta.get("last") for r in read_records(out))
    res = subprocess.run(_cli(tmp_path, out, "--sharegpt"), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "already in" in res.stdout
    recs = read_records(out)
    per_ep = Counter(r.episode for r in recs)
    assert len(per_ep) == 6
    for ep, n in per_ep.items():
        steps = [r.step for r in recs if r.episode == ep]
        assert steps == list(range(n)), (ep, steps)  # contiguous, no duplicates
    ws_path = re.compile(r"\S*/episodes/[\w.-]+/")  # tracebacks name the (random) workspace folder
    key = lambda rs: sorted((r.episode, r.step, r.response, ws_path.sub("", r.observation)) for r in rs)
    assert key(recs) == key(read_records(ref))
    # summary and export
    summary = json.loads((out.parent / "e.summary.json").read_text())
    assert summary["episodes"] == 6 and summary["steps"] == len(recs)
    assert sum(summary["action_mix"].values()) == pytest.approx(1.0, abs=0.01)
    assert summary["distinct_ideas_realised"] >= 3 and set(summary["per_task"]) == {"digits", "car-mpg", "anes-vote"}
    assert "kept_mean_distance" in summary["diversity"]["digits"]
    back = import_sharegpt(out.with_suffix(".sharegpt.json"))
    assert [r.response for r in back] == [r.response for r in recs]
    res = subprocess.run(CLI + [f"--out={out}", "--summary"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "6 episodes" in res.stdout
