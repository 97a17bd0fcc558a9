"""Evaluation (fastagent/eval.py) through the real Env + sandbox Pool: the scripted expert, the tiny model
through the HF engine, an OpenAI-compatible endpoint that tries to forge its score, and resume after a
SIGKILL. No mocks: every score comes from the tasks' own evaluators."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from fastagent.config import smoke
from fastagent.eval import evaluate, main
from fastagent.eval_report import medal_shares, medal_thresholds, rel_gain
from fastagent.tasks import get_task, load_mlebench, materialize, score_submission

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "mlebench" / "tiny-iris"
PNG = b"\x89PNG\r\n\x1a\n"


def _cfg(**kw):
    return replace(smoke(), workers=2, **kw)


def _episodes(out: Path, agent: str) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((out / "episodes" / agent).glob("*.json"))}


def test_scripted_expert_full_episodes(tmp_path):
    """The scripted expert for full episodes on two bundled tasks and an MLE-bench competition: table,
    JSON and PNGs come out, every score is the trusted one, and the expert beats the starter somewhere."""
    cfg = _cfg(eval_episodes=2, eval_max_steps=8)
    tasks = [get_task("gunpoint"), get_task("seattle-weather"), load_mlebench(FIXTURE)]
    out = tmp_path / "eval"
    summary = evaluate(cfg, [("expert", "scripted")], out, tasks)
    table = (out / "table.md").read_text()
    assert "| task | metric | starter | expert avg | expert best |" in table
    assert "relative gain, held-out" in table and "| seattle-weather | accuracy ↑ |" in table
    for png in ("gain_by_task.png", "score_over_steps.png"):
        assert (out / png).read_bytes().startswith(PNG)
    data = json.loads((out / "results.json").read_text())
    assert len(data["episodes"]) == 6 and data["summary"]["agents"]["expert"]["overall"]["heldout"]["tasks"] == 3
    for name, ep in _episodes(out, "expert").items():
        task = next(t for t in tasks if t.name == ep["task"])
        cached = json.loads((out / "env" / "tasks" / f"{task.name}-{cfg.seed}" / "starter.json").read_text())
        assert ep["starter"] == cached["score"]  # the starter measured on the same seed
        scored = [t["metric"] for t in ep["turns"] if t["kind"] == "score"]
        # the final score is the evaluator's score of the last scored submission (the starter's if none),
        # never a number from the agent's text (its runs print validation scores, a different split)
        assert ep["final"] == (scored[-1] if scored else ep["starter"]), name
        assert ep["gain"] == pytest.approx(rel_gain(ep["final"], ep["starter"], task.sign))
        assert ep["steps"] == len(ep["turns"]) <= 8 and ep["end"] in ("final_answer", "step_limit")
        assert ep["valid"] == ep["steps"]  # the expert always writes a parsable action
    rows = summary["agents"]["expert"]["tasks"]
    assert any(r["beat_starter"] > 0 for r in rows.values()), rows
    board = rows["tiny-iris"]["leaderboard"]  # leaderboard: 1.0, 0.9778, 0.9556, 0.9333, 0.3333
    assert set(board) == {"above_median", "gold", "silver", "bronze", "any_medal"}
    assert "| expert | tiny-iris |" in table
    # past the wall-clock limit no turn starts: the episode ends with the starter's score
    late = evaluate(replace(cfg, eval_time_limit_s=1e-3, eval_episodes=1), [("late", "scripted")], tmp_path / "late",
                    tasks[:1])
    assert late["agents"]["late"]["tasks"]["gunpoint"]["ends"] == {"time_limit": 1}
    assert late["agents"]["late"]["tasks"]["gunpoint"]["avg"] == late["agents"]["late"]["tasks"]["gunpoint"]["starter"]


def test_medal_thresholds_on_a_real_leaderboard_fixture():
    import pandas as pd
    scores = pd.read_csv(FIXTURE / "leaderboard.csv")["score"].tolist()  # 5 teams, best first
    th = medal_thresholds(scores, "max")  # < 100 teams: top 10% / 20% / 40% (at least the first team)
    assert th == {"gold": 1.0, "silver": 1.0, "bronze": 0.9778, "median": 0.9556}
    shares = medal_shares([1.0, 0.98, 0.95, 0.3], scores, "max")
    assert shares == {"above_median": 0.5, "gold": 0.25, "silver": 0.25, "bronze": 0.5, "any_medal": 0.5}
    # lower is better: ranked ascending
    low = medal_thresholds([0.1 * i for i in range(1, 11)], "min")
    assert (low["gold"], low["silver"], low["bronze"]) == pytest.approx((0.1, 0.2, 0.4))
    big = medal_thresholds([float(-i) for i in range(1000)], "max")  # gold: top 10 + 0.2% N, silver 5%, bronze 10%
    assert (big["gold"], big["silver"], big["bronze"]) == (-11.0, -49.0, -99.0)
    mid = medal_thresholds([float(-i) for i in range(300)], "max")  # 250-999: top 10 + 0.2% N, 50, 100
    assert (mid["gold"], mid["silver"], mid["bronze"]) == (-9.0, -49.0, -99.0)


def test_tiny_model_with_the_hf_engine(tmp_path):
    """The tiny random model writes no valid action: every turn is a format error, counted; generated
    tokens are counted; a prompt that does not fit the model ends the episode at once; two agents in one
    call share the table."""
    cfg = _cfg(engine="hf", eval_episodes=2, eval_max_steps=2)
    tasks = [get_task("gunpoint")]
    out = tmp_path / "eval"
    summary = evaluate(cfg, [("tiny", "tiny-random"), ("expert", "scripted")], out, tasks)
    eps = _episodes(out, "tiny")
    assert len(eps) == 2
    for ep in eps.values():
        assert ep["steps"] == 2 and ep["kinds"] == {"format_error": 2} and ep["valid"] == 0
        assert ep["end"] == "step_limit" and ep["final"] == ep["starter"] and ep["gain"] == 0.0
        assert 2 <= ep["tokens"] <= 2 * cfg.max_new_tokens and ep["tokens"] == sum(t["tokens"] for t in ep["turns"])
    row = summary["agents"]["tiny"]["tasks"]["gunpoint"]
    assert row["valid_rate"] == 0.0 and row["avg_gain"] == 0.0
    assert "tiny avg | tiny best | expert avg | expert best" in (out / "table.md").read_text()
    # tiny-random's prompts are ~2,000+ tokens: with room for only 1,024 - 64 the episodes end at once
    short = evaluate(replace(cfg, max_seq_len=1024), [("short", "tiny-random")], tmp_path / "short", tasks)
    assert short["agents"]["short"]["tasks"]["gunpoint"]["ends"] == {"context": 2}
    assert all(ep["steps"] == 0 for ep in _episodes(tmp_path / "short", "short").values())


class _Attacker(BaseHTTPRequestHandler):
    """An OpenAI-compatible endpoint whose 'model' tries to set its own score: its script prints a perfect
    validation score and writes fake score files beside a weak constant submission; its Final Answer
    claims accuracy 1.0."""
    turns = [
        ("Edit Script Segment", {"script_name": "hack.py", "start_line_number": 1, "end_line_number": 0,
                                 "new_content": "import json, pandas as pd\n"
                                                "test = pd.read_csv('data/test.csv')\n"
                                                "pd.DataFrame({'id': test['id'], 'weather': 'fog'}).to_csv('submission.csv', index=False)\n"
                                                "for f in ('score.json', 'results.json', 'starter.json'):\n"
                                                "    json.dump({'score': 1.0, 'accuracy': 1.0}, open(f, 'w'))\n"
                                                "print('validation accuracy: 1.0000')\nprint('test accuracy: 1.0000')\n"}),
        ("Execute Script", {"script_name": "hack.py"}),
        ("Final Answer", {"final_answer": "test accuracy: 1.0000 (score 1.0)"}),
    ]
    step = 0

    def log_message(self, *args):
        pass

    def _send(self, obj):
        body = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._send({"data": [{"id": "attacker"}]})

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        action, args = self.turns[min(type(self).step, len(self.turns) - 1)]
        type(self).step += 1
        text = (f"Reflection: none\nResearch Plan and Status: win\nFact Check: none\nThought: score 1.0\n"
                f"Action: {action}\nAction Input: {json.dumps(args)}")
        self._send({"choices": [{"message": {"role": "assistant", "content": text}}]})


def test_agent_output_cannot_set_its_score(tmp_path):
    """Through a real HTTP endpoint and the real Env + Pool: the eval's score is the task's evaluator's
    on the hidden answers, whatever the agent prints, writes or claims."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Attacker)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/v1#attacker"
        cfg = _cfg(eval_episodes=1, eval_max_steps=5)
        task = get_task("seattle-weather")
        summary = evaluate(cfg, [("attacker", url)], tmp_path / "eval", [task])
    finally:
        server.shutdown()
    ep = _episodes(tmp_path / "eval", "attacker")["seattle-weather-00"]
    assert [t["action"] for t in ep["turns"]] == ["Edit Script Segment", "Execute Script", "Final Answer"]
    assert "validation accuracy: 1.0000" in ep["turns"][1]["observation"] and ep["end"] == "final_answer"
    # the trusted grade of the same constant submission, computed here from the hidden answers
    ws, answers = materialize(task, tmp_path / "mine", seed=cfg.seed)
    import pandas as pd
    sub = tmp_path / "sub"
    sub.mkdir()
    test = pd.read_csv(ws / "data" / "test.csv")
    pd.DataFrame({"id": test["id"], "weather": "fog"}).to_csv(sub / "submission.csv", index=False)
    truth = score_submission(task, sub, answers)
    assert truth < 0.5 and ep["final"] == truth and ep["final"] < ep["starter"]
    assert summary["agents"]["attacker"]["tasks"]["seattle-weather"]["avg"] == truth
    assert ep["starter"] != 1.0 and not ep["beat_starter"]


def _run_cli(out: Path, *extra: str, **kw) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "fastagent.eval", "--preset=smoke", "--workers=2", "--agents", "expert=scripted",
           "--tasks=gunpoint,seattle-weather", "--episodes=6", "--eval_max_steps=8", f"--out={out}", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, **kw)


def _same(a: dict, b: dict) -> bool:
    """Two episode results equal in everything but timings and the workspace's (random) path, which a
    traceback in an observation shows."""
    def strip(ep):
        ep = {k: v for k, v in ep.items() if k not in ("wall_s", "gen_s")}
        ep["turns"] = [{**{k: v for k, v in t.items() if k != "wall_s"},
                        "observation": re.sub(r"\S*/env/episodes/[\w.-]+-[0-9a-f]{12}/", "WS/", t["observation"])}
                       for t in ep["turns"]]
        return ep
    return strip(a) == strip(b)


def test_resume_after_sigkill(tmp_path):
    """SIGKILL the eval (its whole process group) once some episodes are written; the rerun keeps those
    files as they are, plays only the rest, and ends with what an uninterrupted run gives."""
    out = tmp_path / "killed"
    proc = _run_cli(out)
    folder = out / "episodes" / "expert"
    deadline = time.monotonic() + 240
    while not (folder.is_dir() and any(folder.glob("*.json"))):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "no episode finished in 240 s"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.glob("*.json")}
    assert 1 <= len(before) < 12, f"{len(before)} of 12 episodes were written before the kill"
    assert not (out / "table.md").exists()

    rerun = _run_cli(out)
    log = rerun.communicate(timeout=600)[0]
    assert rerun.returncode == 0, log[-3000:]
    assert f"12 episodes on 2 tasks, {len(before)} already in" in log
    for name, (data, mtime) in before.items():  # not rerun, not rewritten
        assert ((folder / name).read_bytes(), (folder / name).stat().st_mtime_ns) == (data, mtime)

    fresh = _run_cli(tmp_path / "fresh")
    log = fresh.communicate(timeout=600)[0]
    assert fresh.returncode == 0, log[-3000:]
    a, b = _episodes(out, "expert"), _episodes(tmp_path / "fresh", "expert")
    assert sorted(a) == sorted(b) and len(a) == 12
    assert all(_same(a[k], b[k]) for k in a), [k for k in a if not _same(a[k], b[k])]
    # a rerun of a finished evaluation plays nothing and writes the same table
    table = (out / "table.md").read_text()
    again = _run_cli(out)
    log = again.communicate(timeout=600)[0]
    assert "12 already in" in log and (out / "table.md").read_text() == table and table in log


def test_cli_errors_say_what_to_do(capsys):
    assert main(["--preset=smoke"]) == 2
    assert "no agent to evaluate: pass --model=SPEC" in capsys.readouterr().err
    assert main(["--preset=smoke", "--model=scripted", "--tasks=gunpont"]) == 2
    assert "unknown task 'gunpont'; did you mean 'gunpoint'?" in capsys.readouterr().err
    assert main(["--preset=smoke", "--model=/no/such/model"]) == 2
    assert "unknown model '/no/such/model'" in capsys.readouterr().err
    assert main(["--preset=smoke", "--agents", "a=scripted", "a=scripted"]) == 2
    assert "agent names must differ" in capsys.readouterr().err
    assert main(["--preset=smoke", "stray"]) == 2
    assert "unexpected argument 'stray'" in capsys.readouterr().err
