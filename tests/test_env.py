"""The environment end to end on a small real task: parser fuzzing, every action's happy and failure
path, a scripted episode that earns exactly the reward module's values, snapshots/resume, step_many.

The task here is a complete task folder (task.toml, prepare/train/evaluate) written into a tmp dir
and found through FASTAGENT_TASK_DIRS; its scripts use only the standard library, so runs are fast.
Scripts run on fastagent.sandbox.Pool.
Run: .venv/bin/pytest tests/test_env.py -q
"""

from __future__ import annotations

import http.server
import json
import math
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastagent.actions import ACTIONS, ParseError, Parsed, build_messages, parse_response
from fastagent.config import Config
from fastagent.env import Env, EnvState, http_helper, step_many
from fastagent.sandbox import Pool
from fastagent.reward import RewardConfig, sigmoid

TRAIN_Y = list(range(1, 11))  # mean 5.5
TEST_Y = [5.0, 6.0, 7.0]
ALPHA = 4.0


def rmse(pred: float) -> float:
    return math.sqrt(sum((pred - y) ** 2 for y in TEST_Y) / len(TEST_Y))


STARTER = rmse(5.5)
TASK_FILES = {
    "task.toml": f'name = "toy-mean"\nsplit = "train"\nmetric = "rmse"\ndirection = "min"\n'
                 f'starter_score = {STARTER!r}\nreference_score = {rmse(6.0)!r}\nalpha = {ALPHA}\n'
                 f'source = "tests"\ntime_limit_s = 20\n',
    "description.md": "Predict y for data/test.csv; write submission.csv (id,y). Metric: RMSE.\n",
    "prepare.py": f'''"""Toy data: train y = 1..10, three test rows."""
def prepare(workspace, answers, seed):
    (workspace / "data").mkdir()
    (workspace / "data" / "train.csv").write_text("y\\n" + "".join(f"{{y}}\\n" for y in {TRAIN_Y}))
    (workspace / "data" / "test.csv").write_text("id\\n0\\n1\\n2\\n")
    (answers / "test.csv").write_text("id,y\\n" + "".join(f"{{i}},{{y}}\\n" for i, y in enumerate({TEST_Y})))
''',
    "train.py": '''"""Starter: predict the training mean."""
import csv
ys = [float(r["y"]) for r in csv.DictReader(open("data/train.csv"))]
pred = sum(ys) / len(ys)
print("validation rmse: n/a")
with open("submission.csv", "w") as f:
    f.write("id,y\\n" + "".join(f"{i},{pred}\\n" for i in range(3)))
''',
    "evaluate.py": '''"""RMSE of submission.csv against answers/test.csv."""
import csv, math
def score(submission, answers):
    if not submission.is_file():
        raise ValueError("no submission.csv")
    try:
        sub = {r["id"]: float(r["y"]) for r in csv.DictReader(open(submission))}
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"malformed submission: {e}")
    ans = {r["id"]: float(r["y"]) for r in csv.DictReader(open(answers / "test.csv"))}
    if set(sub) != set(ans):
        raise ValueError("submission ids differ from the test ids")
    return math.sqrt(sum((sub[k] - ans[k]) ** 2 for k in ans) / len(ans))
''',
    "reference.py": "print('reference: predict 6.0')\n",
}


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    import os
    from fastagent.tasks import get_task
    parent = tmp_path_factory.mktemp("tasks")
    (parent / "toy-mean").mkdir()
    for name, text in TASK_FILES.items():
        (parent / "toy-mean" / name).write_text(text)
    old = os.environ.get("FASTAGENT_TASK_DIRS")
    os.environ["FASTAGENT_TASK_DIRS"] = str(parent)
    yield get_task("toy-mean")
    if old is None:
        os.environ.pop("FASTAGENT_TASK_DIRS", None)
    else:
        os.environ["FASTAGENT_TASK_DIRS"] = old


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("envroot")


@pytest.fixture(scope="module")
def pool(root):
    with Pool(workers=2, hide=[root]) as p:
        yield p


def turn(action: str, **args) -> str:
    return (f"Reflection: n/a\nResearch Plan and Status: 1. improve\nFact Check: none\nThought: go\n"
            f"Action: {action}\nAction Input: {json.dumps(args)}")


def make_env(task, pool, root, **kw) -> Env:
    env = Env(task, pool, root, **kw)
    env.reset()
    return env


# --- the parser ---

def test_parser_lenient_forms():
    p = parse_response("**Thought:** x\n**Action:** `execute script`\n**Action Input:**\n```json\n"
                       '{"script_name": "train.py"}\n```\nThat is all.\nObservation: fake')
    assert isinstance(p, Parsed) and p.action == "Execute Script" and p.args == {"script_name": "train.py"}
    p = parse_response("Action: Inspect Script Lines\nAction Input: {'script_name': 'a.py', "
                       "'start_line_number': '1', 'end_line_number': 5}")
    assert isinstance(p, Parsed) and p.args["start_line_number"] == 1
    code = 'import os\nprint("Thought: not a header")\n'
    p = parse_response(turn("Edit Script Segment", script_name="a.py", start_line_number=1,
                            end_line_number=0, new_content=code))
    assert isinstance(p, Parsed) and p.args["new_content"] == code
    p = parse_response('Action: Final Answer\nAction Input: {"final_answer": "a\nb\tc"}')  # raw newline, tab
    assert isinstance(p, Parsed) and p.args["final_answer"] == "a\nb\tc"
    p = parse_response('Action: List Files\nAction Input: {"dir_path": "a\nb"}')  # not in a path
    assert isinstance(p, ParseError) and "control character" in p.message


@pytest.mark.parametrize("text, msg", [
    ("I think we should run it.", "no 'Action:'"),
    ("Action: Run Everything\nAction Input: {}", "unknown action"),
    ("Action: List Files", "no 'Action Input:'"),
    ("Action: List Files\nAction Input: dir_path = .", "no JSON object"),
    ("Action: List Files\nAction Input: {dir_path: [}", "not a valid JSON"),
    ('Action: List Files\nAction Input: {"path": "."}', "takes no argument 'path'"),
    ('Action: Copy File\nAction Input: {"source": "a"}', "needs argument 'destination'"),
    ('Action: Inspect Script Lines\nAction Input: {"script_name": "a", "start_line_number": "x", '
     '"end_line_number": 2}', "must be an integer"),
    ('Action: List Files\nAction Input: {"dir_path": 3}', "must be a string"),
])
def test_parser_format_errors(text, msg):
    p = parse_response(text)
    assert isinstance(p, ParseError) and msg in p.message


def test_parser_require_sections():
    assert isinstance(parse_response('Action: List Files\nAction Input: {"dir_path": "."}',
                                     require_sections=True), ParseError)
    assert isinstance(parse_response(turn("List Files", dir_path="."), require_sections=True), Parsed)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(), st.builds(lambda a, b, c: a + "\nAction: " + b + "\nAction Input: " + c,
                                      st.text(max_size=40), st.sampled_from([*ACTIONS, "x"]), st.text())))
def test_parser_never_raises(text):
    assert isinstance(parse_response(text), (Parsed, ParseError))


@pytest.mark.parametrize("literal, value", [
    ("12", 12), ('"12"', 12), ('" -3 "', -3), ('"+7"', 7), ("999999999", 999999999), ("-0", 0),
    ("1234567890", None), ('"1234567890"', None), ('"+-5"', None), ('"1²"', None), ('"١٢"', None),
    ('"𝟙"', None), ('"1_000"', None), ("1" * 5000, None), ('"' + "1" * 5000 + '"', None), ("5.0", None),
    ("1e3", None), ("NaN", None), ("-Infinity", None), ("true", None), ("null", None), ("[1]", None),
    ('{"a": 1}', None), ('"\\ud800"', None), ('"0x10"', None), ('"12\\n"', None), ('""', None),
])
def test_parser_integer_arguments_are_plain_ascii_decimal(literal, value):
    p = parse_response(f'Action: Inspect Script Lines\nAction Input: {{"script_name": "a.py", '
                       f'"start_line_number": {literal}, "end_line_number": 3}}')
    if value is None:
        assert isinstance(p, ParseError) and "must be an integer of at most 9 plain digits" in p.message, p
        assert len(p.message) < 400 and p.message.encode("utf-8")
    else:
        assert isinstance(p, Parsed) and p.args["start_line_number"] == value


@pytest.mark.parametrize("field, text, ok", [
    ("script_name", "a\\ud800.py", False), ("script_name", "a\\u0000.py", False),
    ("script_name", "a\\n.py", False), ("script_name", "a\\u009b.py", False),
    ("new_content", "x\\ty\\r\\n", True), ("new_content", "x\\u0007", False),
    ("new_content", "\\udfff", False), ("new_content", "emoji \\ud83d\\ude00 pair", True),
])
def test_parser_rejects_surrogates_and_control_characters(field, text, ok):
    args = {"script_name": "a.py", "start_line_number": 1, "end_line_number": 0, "new_content": "x"}
    body = json.dumps(args).replace(f'"{args[field]}"' if field == "new_content" else '"a.py"', f'"{text}"', 1)
    p = parse_response("Action: Edit Script Segment\nAction Input: " + body)
    assert isinstance(p, Parsed) == ok, p
    if not ok:
        assert field in p.message and ("surrogate" in p.message or "control character" in p.message)


_SPECIAL = ["NaN", "Infinity", "-Infinity", "1" * 5000, "-" + "9" * 5000, "1e999", "-0.0", '"+-5"', '"1²"',
            '"١٢"', '"\\ud800"', '"a\\udfffb"', '"\\u0000"', '"\\u001b[31m"', "[" * 3000, "{" * 3000,
            "true", "null", '"' + "9" * 20 + '"', "0x1F", "'single'", "1_0"]
_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                     lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=5), kids, max_size=3),
                     max_leaves=8)
_chars = st.one_of(st.characters(), st.integers(0xD800, 0xDFFF).map(chr), st.sampled_from("\x00\x1b\x7f\x85"))


def _literal(v) -> str:
    try:
        return json.dumps(v)
    except ValueError:  # an int json cannot print (over 4300 digits)
        return "1" * 5000


@settings(max_examples=400, deadline=None)
@given(name=st.sampled_from([*ACTIONS, "list files", "x"]), data=st.data())
def test_parser_never_raises_on_arguments_of_any_type(name, data):
    spec = ACTIONS.get(name)
    keys = list(spec.args) if spec else ["a"]
    keys += data.draw(st.lists(st.text(max_size=6), max_size=2))
    parts = []
    for k in keys:
        lit = data.draw(st.one_of(_json.map(_literal), st.sampled_from(_SPECIAL),
                                  st.lists(_chars, max_size=12).map(lambda c: json.dumps("".join(c)))))
        parts.append(f"{json.dumps(k)}: {lit}")
    tail = data.draw(st.sampled_from(["}", "", "}\n```\nmore", "}}", ", }"]))
    quote = data.draw(st.booleans())
    body = "{" + ", ".join(parts) + tail
    text = f"Thought: t\nAction: {name}\nAction Input: " + (body.replace('"', "'") if quote else body)
    p = parse_response(text)
    assert isinstance(p, (Parsed, ParseError)) and "internal parser error" not in getattr(p, "message", "")
    if isinstance(p, ParseError):
        assert p.message.encode("utf-8") and len(p.message) < 1000
    else:
        for k, v in p.args.items():
            if k in ACTIONS[p.action].int_args:
                assert type(v) is int and abs(v) < 10 ** 9
            else:
                assert isinstance(v, str) and v.encode("utf-8") is not None


@settings(max_examples=300, deadline=None)
@given(st.lists(_chars, max_size=200).map("".join))
def test_parser_never_raises_on_raw_text_with_surrogates(text):
    for t in (text, "Action: List Files\nAction Input: {\"dir_path\": \"" + text + "\"}"):
        p = parse_response(t)
        assert isinstance(p, (Parsed, ParseError)) and "internal parser error" not in getattr(p, "message", "")


def _model_responses() -> list[dict]:
    path = Path(__file__).parent / "fixtures" / "smollm2_responses.json"
    return json.loads(path.read_text())["responses"]


def test_parser_on_real_untrained_model_responses():
    """40 responses of SmolLM2-135M-Instruct to real Env prompts (tests/fixtures/make_model_responses.py)."""
    responses = _model_responses()
    assert len(responses) == 40
    kinds = []
    for r in responses:
        p = parse_response(r["response"])
        assert isinstance(p, (Parsed, ParseError)) and "internal parser error" not in getattr(p, "message", "")
        kinds.append(type(p).__name__)
    assert "ParseError" in kinds  # an untrained model mostly misses the format; each miss is reported


def test_env_steps_real_model_responses(task, pool, root, tmp_path):
    """The model's real text through Env.step, as is and as an argument: never raises, every
    observation is valid UTF-8, and each step's record goes into a trajectory file."""
    from fastagent.data import StepRecord, TrajectoryWriter, read_records
    env = make_env(task, pool, root)
    with TrajectoryWriter(tmp_path / "t.traj") as w:
        for i, r in enumerate(_model_responses()):
            edit = turn("Edit Script Segment", script_name=f"m{i}.py", start_line_number=1, end_line_number=0,
                        new_content=r["response"])
            for text in (r["response"], edit):
                prompt = env.messages()
                obs, rew, done, info = env.step(text)
                assert obs.encode("utf-8") and not done and rew in (-1.0, 0.0)
                w.append(StepRecord(task=task.name, episode="e", step=info["step"], prompt=prompt, response=text,
                                    observation=obs, reward=rew, reward_parts=info["reward"]))
            assert info["reward"]["kind"] in ("no_score", "format_error")  # format error: a control char
    assert len(read_records(tmp_path / "t.traj", strict=True)) == 80
    env.close()


def test_prompt_builder_lists_tools_and_truncates_history():
    from fastagent.actions import Turn
    hist = [Turn(f"resp {i}", f"obs {i}" + "z" * (5000 if i == 4 else 0)) for i in range(5)]
    msgs = build_messages("Predict y.", hist, k=3)
    assert [m["role"] for m in msgs] == ["system", "user"] + ["assistant", "user"] * 3
    for spec in ACTIONS.values():
        assert spec.name in msgs[0]["content"] and all(f'"{a}"' in msgs[0]["content"] for a in spec.args)
    assert "Action Input:" in msgs[0]["content"] and "Predict y." in msgs[1]["content"]
    assert "2 earlier steps" in msgs[1]["content"] and msgs[2]["content"] == "resp 2"
    assert "characters cut" in msgs[-1]["content"]
    assert len(build_messages("t", hist, k=0)) == 2
    for n in range(6):  # exactly the last min(n, k) turns, for every history length
        for k in (1, 2, 3):
            msgs = build_messages("t", hist[:n], k=k)
            assert [m["content"] for m in msgs[2::2]] == [f"resp {i}" for i in range(max(0, n - k), n)]
            assert ("earlier steps are not shown" in msgs[1]["content"]) == (n > k)


# --- the scripted episode: exact rewards ---

def test_scripted_episode_earns_the_defined_rewards(task, pool, root):
    env = Env(task, pool, root)
    obs = env.reset()
    assert "Predict y" in obs
    rewards, kinds = [], []

    def do(text):
        o, r, d, info = env.step(text)
        rewards.append(r)
        kinds.append(info["reward"]["kind"])
        return o, d, info

    o, d, _ = do(turn("Inspect Script Lines", script_name="train.py", start_line_number=1, end_line_number=10))
    assert "pred = sum(ys) / len(ys)" in o and not d
    o, _, _ = do(turn("Edit Script Segment", script_name="train.py", start_line_number=4, end_line_number=4,
                      new_content="pred = 6.0"))
    assert "+pred = 6.0" in o
    o, _, info = do(turn("Execute Script", script_name="train.py"))
    assert "validation rmse" in o and info["run"]["cause"] == "ok"
    assert info["metric"] == pytest.approx(rmse(6.0))
    do("Action: Execute Script\nAction Input: {script_name: train.py}")  # format error
    do(turn("Execute Script", script_name="missing.py"))  # invalid action
    _, d, info = do(turn("Final Answer", final_answer="predict 6.0"))
    assert d
    expected = [0.0, 0.0, sigmoid(ALPHA * -1 * (rmse(6.0) - STARTER)), -1.0, -1.0, 0.0]
    assert rewards == pytest.approx(expected)
    assert kinds == ["no_score", "no_score", "score", "format_error", "invalid_action", "no_score"]
    with pytest.raises(ValueError, match="done"):
        env.step(turn("List Files", dir_path="."))
    env.close()


def test_execute_outcomes(task, pool, root):
    env = make_env(task, pool, root, cfg=Config(step_memory_mb=300), time_limit_s=2.0, max_steps=50)
    steps = {
        "crash.py": ("raise SystemExit('boom')\n", "invalid_action", -1.0),
        "slow.py": ("import time\ntime.sleep(60)\n", "corner_case", 0.0),
        "hog.py": ("x = bytearray(2 << 30)\nx[::4096] = b'1' * len(x[::4096])\n", "corner_case", 0.0),
        "quiet.py": ("print('no submission here')\n", "no_score", 0.0),
        "bad.py": ("open('submission.csv', 'w').write('id,y\\n0,oops\\n')\n", "invalid_action", -1.0),
        # float('nan') parses, so the evaluator returns nan: a malformed submission, never a nan reward
        "nan.py": ("open('submission.csv', 'w').write('id,y\\n0,nan\\n1,nan\\n2,nan\\n')\n", "invalid_action", -1.0),
        # task data is mounted read-only: the write fails, and the linked store objects stay intact
        "taint.py": ("open('data/train.csv', 'a').write('99\\n')\n", "invalid_action", -1.0),
    }
    for name, (code, kind, value) in steps.items():
        env.step(turn("Edit Script Segment", script_name=name, start_line_number=1, end_line_number=0,
                      new_content=code))
        _, r, _, info = env.step(turn("Execute Script", script_name=name))
        assert (info["reward"]["kind"], r) == (kind, value), (name, info["run"], info["reward"])
    env.step(turn("Edit Script Segment", script_name="bad.py", start_line_number=1, end_line_number=1,
                  new_content="pass"))
    _, r1, _, i1 = env.step(turn("Execute Script", script_name="train.py"))
    _, r2, _, i2 = env.step(turn("Execute Script", script_name="train.py"))  # same submission again
    assert i1["reward"]["kind"] == "score" and r1 == pytest.approx(0.5)  # the starter's own score
    assert i2["reward"]["kind"] == "no_score" and i2["reward"]["reason"] == "submission unchanged"
    assert env.store.verify() == []
    env.close()


# --- every other action: happy and failure paths ---

def test_file_actions(task, pool, root):
    env = make_env(task, pool, root)

    def step(action, **a):
        o, r, _, info = env.step(turn(action, **a))
        return o, info["reward"]["kind"]

    o, k = step("List Files", dir_path=".")
    assert k == "no_score" and "data/" in o and "train.py" in o
    assert step("List Files", dir_path="nope")[1] == "invalid_action"
    assert step("List Files", dir_path="../..")[1] == "invalid_action"
    assert step("Copy File", source="train.py", destination="t2.py")[1] == "no_score"
    assert (env.ws / "t2.py").read_text() == (env.ws / "train.py").read_text()
    assert step("Copy File", source="nope.py", destination="x.py")[1] == "invalid_action"
    assert step("Copy File", source="train.py", destination="data/train.csv")[1] == "invalid_action"
    assert step("Copy File", source="/etc/hostname", destination="x")[1] == "invalid_action"
    hidden = env.answers / "test.csv"  # the evaluator's answers: outside the workspace, unreachable
    assert hidden.is_file() and step("Copy File", source=str(hidden), destination="a.csv")[1] == "invalid_action"
    rel = "../" * len(env.ws.relative_to(env.root).parts) + hidden.relative_to(env.root).as_posix()
    assert step("Inspect Script Lines", script_name=rel, start_line_number=1, end_line_number=3)[1] \
        == "invalid_action"
    assert step("Inspect Script Lines", script_name="train.py", start_line_number=1, end_line_number=101)[1] \
        == "invalid_action"
    assert step("Inspect Script Lines", script_name="train.py", start_line_number=50, end_line_number=60)[1] \
        == "invalid_action"
    assert step("Edit Script Segment", script_name="train.py", start_line_number=99, end_line_number=99,
                new_content="x")[1] == "invalid_action"
    before = (env.ws / "train.py").read_text()
    o, k = step("Edit Script Segment", script_name="train.py", start_line_number=1, end_line_number=1,
                new_content="# new first line", save_name="v2.py")
    assert k == "no_score" and (env.ws / "v2.py").read_text().startswith("# new first line\n")
    assert (env.ws / "train.py").read_text() == before
    step("Edit Script Segment", script_name="v2.py", start_line_number=1, end_line_number=1, new_content="# again")
    o, k = step("Undo Edit Script", script_name="v2.py")
    assert k == "no_score" and (env.ws / "v2.py").read_text().startswith("# new first line\n")
    step("Undo Edit Script", script_name="v2.py")
    assert not (env.ws / "v2.py").exists()  # the first edit created it
    assert step("Undo Edit Script", script_name="v2.py")[1] == "invalid_action"
    assert step("Execute Script", script_name="description.md")[1] == "invalid_action"
    assert step("Copy File", source="train.py", destination=".")[1] == "invalid_action"
    assert step("Edit Script Segment", script_name="u.py", start_line_number=1, end_line_number=0,
                new_content="\ud800")[1] == "format_error"  # a lone surrogate no file can hold
    assert not (env.ws / "u.py").exists() and not list(env.ws.glob(".*"))  # nothing half-written
    # without a helper the helper actions are not offered: a format error
    assert step("Understand File", file_name="train.py", things_to_look_for="x")[1] == "format_error"
    env.close()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["a\n", "b\n", "c\n", "d"]), max_size=30),
       st.lists(st.sampled_from(["a\n", "b\n", "x\n"]), max_size=30))
def test_diff_of_the_changed_region_equals_difflib(old, new):
    import difflib
    from fastagent.env_actions import _diff
    a, b = "".join(old), "".join(new)
    ref = "".join(difflib.unified_diff(a.splitlines(True), b.splitlines(True), "a/f", "b/f"))
    assert _diff(a, b, "f") == (ref or "(no change)")


def _apply_unified(old: list[str], diff: str) -> list[str]:
    """old with a unified diff applied (hunks in order), to check a diff without comparing its text."""
    import re
    out, pos, lines = [], 0, diff.splitlines(True)[2:]
    for line in lines:
        m = re.match(r"@@ -(\d+)(?:,(\d+))? \+\d+(?:,\d+)? @@", line)
        if m:
            start = int(m[1]) - (0 if m[2] == "0" else 1)
            out += old[pos:start]
            pos = start
        elif line[0] in " -":
            assert old[pos] == line[1:], (pos, old[pos], line)
            pos += 1
            if line[0] == " ":
                out.append(line[1:])
        elif line[0] == "+":
            out.append(line[1:])
    return out + old[pos:]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(["a\n", "b\n", "c\n"]), min_size=1, max_size=20), st.integers(0, 2200),
       st.lists(st.sampled_from(["a\n", "x\n"]), max_size=20))
def test_diff_of_a_long_file_applies(edit_old, at, edit_new):
    """Past MAX_DIFF_LINES the diff covers the changed region only; applied to the old text it must
    give the new one exactly."""
    from fastagent.env_actions import MAX_DIFF_LINES, _diff
    base = [f"line {i}\n" for i in range(MAX_DIFF_LINES + 300)]
    old = base[:at] + edit_old + base[at:]
    new = base[:at] + edit_new + base[at:]
    d = _diff("".join(old), "".join(new), "f")
    assert d == "(no change)" if old == new else _apply_unified(old, d) == new


def test_editing_a_large_file_diffs_only_the_edit(task, pool, root):
    env = make_env(task, pool, root)
    from fastagent.env_actions import _replace
    _replace(env, "big.py", "".join(f"x_{i} = {i}\n" for i in range(60_000)).encode())  # 0.9 MB, 60,000 lines
    o, r, _, info = env.step(turn("Edit Script Segment", script_name="big.py", start_line_number=50_000,
                                  end_line_number=50_000, new_content="changed = True"))
    assert info["reward"]["kind"] == "no_score" and "@@ -49997,7 +49997,7 @@" in o
    assert "-x_49999 = 49999" in o and "+changed = True" in o
    o, r, _, info = env.step(turn("Edit Script Segment", script_name="big.py", start_line_number=1,
                                  end_line_number=60_000, new_content="\n".join(f"y{i}" for i in range(5000))))
    assert info["reward"]["kind"] == "no_score" and "diff not shown" in o
    env.close()


def test_helper_actions_with_a_callable_and_over_http(task, pool, root):
    def helper(prompt: str) -> str:
        if "Rewrite it" in prompt:
            return "Sure:\n```python\nprint('edited by helper')\n```\n"
        return "The file reads data/train.csv."
    env = make_env(task, pool, root, helper=helper)
    o, r, _, info = env.step(turn("Understand File", file_name="train.py", things_to_look_for="the data"))
    assert o == "The file reads data/train.csv." and info["reward"]["kind"] == "no_score"
    o, r, _, info = env.step(turn("Edit Script (AI)", script_name="train.py", edit_instruction="simplify",
                                  save_name="train.py"))
    assert (env.ws / "train.py").read_text() == "print('edited by helper')\n" and "+print('edited" in o
    assert env.step(turn("Understand File", file_name="nope", things_to_look_for="x"))[3]["reward"]["kind"] \
        == "invalid_action"

    def broken(prompt: str) -> str:
        raise ConnectionError("endpoint down")
    env.helper = broken
    _, r, _, info = env.step(turn("Understand File", file_name="train.py", things_to_look_for="x"))
    assert info["reward"]["kind"] == "corner_case" and r == 0.0
    env.close()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            text = "echo: " + body["messages"][0]["content"][:20]
            out = json.dumps({"choices": [{"message": {"content": text}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *a):
            pass
    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/v1"
        assert http_helper(url)("hello there") == "echo: hello there"
        env = make_env(task, pool, root, helper=url)
        o, *_ = env.step(turn("Understand File", file_name="train.py", things_to_look_for="x"))
        assert o.startswith("echo: Read this file")
        env.close()
    finally:
        server.shutdown()
    with pytest.raises(ValueError, match="callable"):
        Env(task, pool, root, helper="policy")


# --- snapshots, resume, batching ---

def test_snapshots_and_resume_from_state(task, pool, root):
    env = make_env(task, pool, root)
    s0 = env.state()
    _, _, _, info = env.step(turn("List Files", dir_path="."))
    assert info["snapshot_after"] == info["snapshot_before"] == s0.snapshot  # nothing changed, nothing new stored
    env.step(turn("Edit Script Segment", script_name="train.py", start_line_number=4, end_line_number=4,
                  new_content="pred = 6.0"))
    _, _, _, info = env.step(turn("Execute Script", script_name="train.py"))
    mid = env.state()
    assert mid.snapshot != s0.snapshot and mid.metric == pytest.approx(rmse(6.0))
    env.step(turn("Edit Script Segment", script_name="train.py", start_line_number=4, end_line_number=4,
                  new_content="pred = 100.0"))
    assert env.store.read(mid.snapshot, "train.py").decode().count("pred = 6.0") == 1
    # a second environment starts from the saved state (as step-wise RL does), via a dict round trip
    env2 = Env.from_snapshot(task, pool, root, EnvState.from_dict(json.loads(json.dumps(mid.to_dict()))),
                             store=env.store)
    assert "pred = 6.0" in (env2.ws / "train.py").read_text() and env2.state().steps == mid.steps
    assert len(env2.messages()) == 2 + 2 * 3
    _, r, _, info = env2.step(turn("Execute Script", script_name="train.py"))
    assert info["reward"]["reason"] == "submission unchanged" and r == 0.0
    env2.step(turn("Undo Edit Script", script_name="train.py"))  # the undo stack travels with the state
    assert "pred = sum(ys)" in (env2.ws / "train.py").read_text()
    env.reset(snapshot=s0.snapshot)
    assert "pred = sum(ys)" in (env.ws / "train.py").read_text() and env.state().steps == 0
    with pytest.raises(ValueError, match="not in the store"):
        env.reset(snapshot="f" * 64)
    env.close()
    env2.close()


def test_step_many_runs_scripts_concurrently(task, pool, root):
    # Each script prints the host clock when it starts and when it ends, sleeping in between. Run one
    # after the other, the second would start after the first ended; run concurrently on the pool's two
    # workers, the two intervals overlap. An order of events, not a duration, is asserted.
    envs = [make_env(task, pool, root) for _ in range(2)]
    code = "import time\nprint('start', time.time(), flush=True)\ntime.sleep(2)\nprint('end', time.time())\n"
    for env in envs:
        env.step(turn("Edit Script Segment", script_name="span.py", start_line_number=1, end_line_number=0,
                      new_content=code))
    out = step_many(envs, [turn("Execute Script", script_name="span.py")] * 2)
    spans = []
    for o, *_ in out:
        words = o.split()
        spans.append((float(words[words.index("start") + 1]), float(words[words.index("end") + 1])))
    (s0, e0), (s1, e1) = spans
    assert s1 < e0 and s0 < e1, spans
    for env in envs:
        env.close()


def test_step_many_on_the_pool(task, pool, root):
    envs = [make_env(task, pool, root) for _ in range(3)]
    preds = [6.0, 5.0, 5.5]
    for env, pred in zip(envs, preds):
        env.step(turn("Edit Script Segment", script_name="train.py", start_line_number=4, end_line_number=4,
                      new_content=f"pred = {pred}"))
    out = step_many(envs, [turn("Execute Script", script_name="train.py")] * 3)
    for (o, r, done, info), pred in zip(out, preds):  # results come back in the order of envs
        assert info["metric"] == pytest.approx(rmse(pred)) and not done
        assert r == pytest.approx(sigmoid(ALPHA * -1 * (rmse(pred) - STARTER)))
    out = step_many(envs[:2], [turn("List Files", dir_path="."), "garbage"])
    assert [info["reward"]["kind"] for *_, info in out] == ["no_score", "format_error"]
    with pytest.raises(ValueError, match="same environment"):
        step_many([envs[0], envs[0]], ["a", "b"])
    for env in envs:
        env.close()


def test_history_window_shows_the_last_k_turns(task, pool, root):
    env = make_env(task, pool, root, history_k=2)
    for i in range(3):
        env.step(turn("List Files", dir_path="."))
        shown = [m for m in env.messages()[2:] if m["role"] == "assistant"]
        assert len(shown) == min(i + 1, 2)
    env.close()


def test_step_timeout_caps_the_task_time_limit(task, pool, root):
    # the toy task allows 20 s; cfg.step_timeout_s = 1 must win, so a 5 s sleep is a timeout
    env = make_env(task, pool, root, cfg=Config(step_timeout_s=1.0))
    assert env.time_limit_s == 1.0
    assert make_env(task, pool, root, cfg=Config(step_timeout_s=600.0)).time_limit_s == 20.0
    assert make_env(task, pool, root, cfg=Config(step_timeout_s=600.0), time_limit_s=3.0).time_limit_s == 3.0
    env.step(turn("Edit Script Segment", script_name="nap.py", start_line_number=1, end_line_number=0,
                  new_content="import time\ntime.sleep(5)\nprint('woke')"))
    o, r, _, info = env.step(turn("Execute Script", script_name="nap.py"))
    assert info["run"]["cause"] == "timeout" and (info["reward"]["kind"], r) == ("corner_case", 0.0)
    assert "time limit of 1 s" in o and "woke" not in o
    env.close()


def test_a_trusted_side_failure_loses_no_other_step(task, pool, root):
    """One env's sandbox is gone (its pool shut down): step_many still finishes, records and returns the
    other steps, then raises StepError with them; the failed step is in no history and billed nothing."""
    from fastagent.env import StepError
    dead = Pool(workers=1, hide=[root])
    dead.shutdown()
    envs = [make_env(task, pool, root), make_env(task, dead, root), make_env(task, pool, root)]
    for env, pred in zip(envs, (6.0, 6.0, 5.0)):
        env.step(turn("Edit Script Segment", script_name="train.py", start_line_number=4, end_line_number=4,
                      new_content=f"pred = {pred}"))
    before = [env.state() for env in envs]
    with pytest.raises(StepError, match="shut down") as ei:
        step_many(envs, [turn("Execute Script", script_name="train.py")] * 3)
    res, errors = ei.value.results, ei.value.errors
    assert list(errors) == [1] and res[1] is None and isinstance(errors[1], RuntimeError)
    for i in (0, 2):
        o, r, done, info = res[i]
        assert info["run"]["cause"] == "ok" and info["reward"]["kind"] == "score"
        assert envs[i].state().steps == before[i].steps + 1 and envs[i].state().history[-1].observation == o
    assert res[0][3]["metric"] == pytest.approx(rmse(6.0)) and res[2][3]["metric"] == pytest.approx(rmse(5.0))
    assert envs[1].state().to_dict() == before[1].to_dict()  # not recorded, not billed
    with pytest.raises(RuntimeError, match="shut down"):  # a single step raises the same failure
        envs[1].step(turn("Execute Script", script_name="train.py"))
    assert envs[1].state().steps == before[1].steps
    _, r, _, info = envs[1].step(turn("List Files", dir_path="."))  # agent-side steps still work
    assert info["reward"]["kind"] == "no_score"
    for env in envs:
        env.close()


def test_a_failure_after_the_run_marks_the_env_for_reset(task, pool, root, tmp_path):
    """The store vanishes under a run (a trusted-side failure in the step's end): step() raises, the step
    is not recorded, and the env refuses to step until reset()."""
    import shutil
    from fastagent.workspace import Store
    store = Store(tmp_path / "store")
    env = make_env(task, pool, root, store=store)
    before = env.state()
    shutil.rmtree(store.root / "objects")
    with pytest.raises(OSError):
        env.step(turn("Execute Script", script_name="train.py"))
    assert env.state().to_dict() == before.to_dict()
    with pytest.raises(ValueError, match="reset"):
        env.step(turn("List Files", dir_path="."))
    env.close()


def test_best_baseline_option_reaches_the_env(task, pool, root):
    env = make_env(task, pool, root, reward=RewardConfig(baseline="best", center=True))
    _, r, _, info = env.step(turn("Execute Script", script_name="train.py"))
    assert r == pytest.approx(0.0) and info["reward"]["baseline"] == pytest.approx(STARTER)
    env.close()


values = st.one_of(st.text(max_size=30), st.integers(-5, 200),
                   st.sampled_from(["train.py", "data", "data/train.csv", "..", ".", "/", "../../etc/passwd", ""]))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), name=st.sampled_from([n for n in ACTIONS if n not in ("Execute Script", "Final Answer")]))
def test_env_step_never_raises(task, pool, root, data, name):
    # Mostly well-named arguments with hostile values, sometimes a stray key: reaches the actions.
    keys = list(ACTIONS[name].args) + data.draw(st.lists(st.sampled_from(["x", "path"]), max_size=1))
    args = {k: data.draw(values) for k in keys if data.draw(st.integers(0, 9)) > 0}
    env = fuzz_env(task, pool, root)
    obs, r, done, info = env.step(f"Action: {name}\nAction Input: {json.dumps(args)}")
    assert isinstance(obs, str) and r in (-1.0, 0.0) and not done
    assert info["reward"]["kind"] in ("format_error", "invalid_action", "no_score")


_fuzz: dict = {}


def fuzz_env(task, pool, root) -> Env:
    if "env" not in _fuzz:
        _fuzz["env"] = Env(task, pool, root)
    _fuzz["env"].reset()
    return _fuzz["env"]


def _bundled() -> list[str]:
    from fastagent.tasks import list_tasks
    return [t.name for t in list_tasks("all")]


@pytest.mark.slow
@pytest.mark.parametrize("name", _bundled())
def test_scripted_episode_on_bundled_task(name, pool, root):
    """Inspect, edit, execute, final answer on a bundled task: the execute step earns exactly
    sigmoid(alpha * sign * (m' - m0)), m' from the trusted evaluator, m0 the measured starter score."""
    from fastagent.tasks import get_task, score_submission
    task = get_task(name)
    env = make_env(task, pool, root)
    rewards = [env.step(turn("Inspect Script Lines", script_name="train.py", start_line_number=1,
                             end_line_number=20))[1],
               env.step(turn("Edit Script Segment", script_name="train.py", start_line_number=1,
                             end_line_number=0, new_content="# scripted policy was here"))[1]]
    obs, r, _, info = env.step(turn("Execute Script", script_name="train.py"))
    assert info["run"]["cause"] == "ok", obs
    m = score_submission(task, env.ws, env.answers)
    rewards += [r, env.step(turn("Final Answer", final_answer="ran the starter"))[1]]
    assert rewards == pytest.approx([0.0, 0.0, sigmoid(task.alpha * task.sign * (m - env.start_metric)), 0.0])
    # the starting metric is the starter's measured score on this seed, close to task.toml's seed-0 number
    assert env.start_metric == pytest.approx(task.starter_score, abs=max(1e-4, 0.05 * abs(
        task.reference_score - task.starter_score)))
    env.close()
