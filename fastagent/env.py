"""The ML-task environment: executes agent turns, snapshots the workspace, scores, rewards.

    from fastagent.env import Env, step_many
    from fastagent.sandbox import Pool
    from fastagent.tasks import get_task
    with Pool(workers=2, hide=[root]) as pool:
        env = Env(get_task("digits"), pool, root=Path("runs/x/env"))
        obs = env.reset()                      # the task prompt; env.messages() gives chat messages
        obs, reward, done, info = env.step(llm_text)
        info["reward"]                         # RewardBreakdown.as_dict(): kind, value, metrics...
        state = env.state()                    # snapshot id + episode state: a step-wise RL start
        env2 = Env.from_snapshot(task, pool, root, state)   # a copy, restored from that state
        results = step_many([env, env2], [text1, text2])   # scripts run concurrently on the pool

Per step: parse the turn (actions.parse_response; a malformed turn is a format error, never an
exception), run the action, and for Execute Script score the submission with the task's trusted
evaluator on hidden answers (fastagent.tasks.score_submission) when the run succeeded and changed
the submission file; the reward comes from fastagent.reward. The hidden score is reported in
`info`, not shown to the agent. After an action that may change files the workspace is
snapshotted into the content-addressed store (fastagent.workspace), so any step can be restored.

Helper model (Edit Script (AI), Understand File): `helper=` a callable prompt -> text (e.g. the
policy, passed in by the trainer), or an http(s) URL of an OpenAI-compatible endpoint. Without a
helper those two actions are left out of the prompt and parsing them is a format error.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from fastagent.actions import ACTIONS, MAX_INSPECT_LINES, Parsed, ParseError, Turn, build_messages, parse_response
from fastagent.chat import scrub_text
from fastagent.reward import RewardBreakdown, RewardConfig, run_kind, step_reward
from fastagent.sandbox import Limits
from fastagent.tasks import materialize, score_submission
from fastagent.workspace import Store, file_sha256, remove_workspace

SUBMISSION = "submission.csv"
MAX_OBS_CHARS = 6000  # longest observation returned by one action (head and tail kept)
MAX_READ_CHARS = 12000  # most of a file sent to the helper model by Understand File
Helper = Callable[[str], str]
_INITIAL: dict[tuple[str, str], str] = {}  # (store root, pristine workspace) -> its snapshot id


def http_helper(base_url: str, model: str = "default", timeout_s: float = 120.0,
                max_tokens: int = 2048) -> Helper:
    """A helper calling an OpenAI-compatible /chat/completions endpoint with plain urllib.

    Env(helper="http://host/v1") uses model "default"; for a server that wants a model name, pass
    Env(helper=http_helper(url, model="NAME")). The API key, if the endpoint needs one, is read
    from $OPENAI_API_KEY at call time.
    """
    url = base_url.rstrip("/") + "/chat/completions"

    def call(prompt: str) -> str:
        body = json.dumps({"model": model, "max_tokens": max_tokens, "temperature": 0.0,
                           "messages": [{"role": "user", "content": prompt}]}).encode()
        headers = {"Content-Type": "application/json"}
        if os.environ.get("OPENAI_API_KEY"):
            headers["Authorization"] = "Bearer " + os.environ["OPENAI_API_KEY"]
        req = urllib.request.Request(url, data=body, headers=headers, method="POST")
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return json.loads(resp.read())["choices"][0]["message"]["content"]
    return call


class ActionError(Exception):
    """The action failed because of what the agent asked for (reward kind invalid_action)."""


class HelperError(Exception):
    """The helper model failed: not the agent's fault (reward kind corner_case)."""


class StepError(RuntimeError):
    """step_many: some steps failed outside the agent's control (sandbox, store, evaluator crash).

    Every other step finished, is in its env's history, and its result is in `results`; a failed
    step is in no history and earns no reward (it is not billed to the agent)."""

    def __init__(self, results: list[tuple[str, float, bool, dict[str, Any]] | None],
                 errors: dict[int, BaseException]) -> None:
        self.results = results  # per env, in order: (obs, reward, done, info), or None where it failed
        self.errors = errors  # {index into envs: the exception}
        what = "; ".join(f"env {i}: {type(e).__name__}: {e}" for i, e in errors.items())
        super().__init__(f"{len(errors)} of {len(results)} steps failed outside the agent's control "
                         f"(the others finished; see .results): {what}"[:2000])


@dataclass
class EnvState:
    """Everything about an episode that is not in the workspace files; with `snapshot`, a full state."""
    snapshot: str  # workspace snapshot id in the store
    metric: float  # m: the last score (the task's starter score until a run is scored)
    best: float  # the best score so far in the episode
    submission_sha: str | None = None  # sha256 of the last scored submission file
    steps: int = 0  # agent turns taken
    done: bool = False
    history: list[Turn] = field(default_factory=list)  # every (response, observation)
    undo: dict[str, list[str | None]] = field(default_factory=dict)  # file -> earlier content shas

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["history"] = [[t.response, t.observation] for t in self.history]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EnvState":
        d = dict(d)
        d["history"] = [Turn(*t) if not isinstance(t, Turn) else t for t in d.get("history", [])]
        d["undo"] = {k: list(v) for k, v in d.get("undo", {}).items()}
        return cls(**d)

    def copy(self) -> "EnvState":
        return EnvState.from_dict(self.to_dict())


@dataclass
class _Pending:
    """A step between its start (parse, act, submit) and its end (wait, score, snapshot)."""
    text: str
    t0: float
    parsed: Parsed | ParseError
    observation: str = ""
    kind: str = "no_score"
    reason: str = ""
    changed: bool = False
    job: dict[str, Any] | None = None  # Execute Script: the pool.submit arguments (trusted side)
    future: Any = None  # concurrent.futures.Future of the script run
    script: str = ""
    timings: dict[str, float] = field(default_factory=dict)


def _cut(text: str, limit: int = MAX_OBS_CHARS) -> str:
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}\n[... {len(text) - 2 * half} characters cut ...]\n{text[-half:]}"


def _diff(old: str, new: str, name: str) -> str:
    d = "".join(difflib.unified_diff(old.splitlines(True), new.splitlines(True), f"a/{name}", f"b/{name}"))
    return _cut(d) if d else "(no change)"


def _extract_code(text: str) -> str:
    """The first fenced code block of a helper's answer, or the whole answer."""
    start = text.find("```")
    if start < 0:
        return text
    body_start = text.find("\n", start)
    end = text.find("```", body_start + 1) if body_start >= 0 else -1
    return text[body_start + 1:end] if end >= 0 else text[body_start + 1:]


class Env:
    """One ML-task episode at a time over a shared sandbox pool (see the module docstring)."""

    def __init__(self, task: Any, pool: Any, root: Path | str, *, seed: int = 0, cfg: Any = None,
                 reward: RewardConfig | None = None, helper: Helper | str | None = None,
                 store: Store | None = None, history_k: int = 3, time_limit_s: float | None = None,
                 max_steps: int | None = None) -> None:
        self.task, self.pool, self.root, self.seed = task, pool, Path(root), seed
        self.reward_cfg = reward or (RewardConfig.from_config(cfg) if cfg is not None else RewardConfig())
        if isinstance(helper, str):
            if not helper.startswith(("http://", "https://")):
                raise ValueError(f"helper must be a callable prompt -> text or an http(s) URL of an "
                                 f"OpenAI-compatible endpoint, got {helper!r} (pass the policy as a callable)")
            helper = http_helper(helper)
        self.helper = helper
        self.actions = [n for n, s in ACTIONS.items() if helper is not None or not s.needs_helper]
        self.history_k = history_k
        # A run's wall limit: the smallest of the task's time_limit_s, cfg.step_timeout_s and the
        # time_limit_s argument (each where given); 60 s when none is.
        caps = [float(c) for c in (time_limit_s, getattr(task, "time_limit_s", None),
                                   cfg.step_timeout_s if cfg is not None else None) if c]
        self.time_limit_s = min(caps) if caps else 60.0
        self.memory_mb = int(cfg.step_memory_mb) if cfg is not None else 4096
        self.max_steps = max_steps or (cfg.max_episode_steps if cfg is not None else 1_000_000)
        self.store = store or Store(self.root / "store")
        pristine, self.answers = materialize(task, self.root / "tasks", seed=seed)
        key = (str(self.store.root.resolve()), str(pristine.resolve()))
        self.initial = _INITIAL.get(key, "")
        if not self.store.exists(self.initial):  # hash the task's data once per store, not per Env
            self.initial = _INITIAL[key] = self.store.snapshot(pristine)
        sub = pristine / SUBMISSION
        self._initial_sub = file_sha256(sub) if sub.is_file() else None
        self.ws: Path | None = None
        self.st: EnvState | None = None
        self._failed = ""  # why the last step failed on the trusted side (then reset() is needed)

    @classmethod
    def from_snapshot(cls, task: Any, pool: Any, root: Path | str, state: EnvState | dict,
                      **kwargs: Any) -> "Env":
        """An Env whose episode starts from a saved state (snapshot id + episode state)."""
        env = cls(task, pool, root, **kwargs)
        env.reset(state=state)
        return env

    # --- episode ---
    def reset(self, state: EnvState | dict | None = None, snapshot: str | None = None) -> str:
        """Start an episode in a fresh workspace: from the task's start, a saved state, or a snapshot.

        Returns the observation: the task prompt (the content of the last user message of messages()).
        """
        if state is not None:
            st = state.copy() if isinstance(state, EnvState) else EnvState.from_dict(state)
        else:
            start = float(self.task.starter_score)
            st = EnvState(snapshot=snapshot or self.initial, metric=start, best=start,
                          submission_sha=self._initial_sub)
        if not self.store.exists(st.snapshot):
            raise ValueError(f"snapshot {st.snapshot!r} is not in the store at {self.store.root}")
        self.close()
        self._failed = ""
        self.ws = self.store.restore(st.snapshot, self.root / "episodes" / f"{self.task.name}-{uuid.uuid4().hex[:12]}")
        self.st = st
        return self.messages()[-1]["content"]

    def state(self) -> EnvState:
        """A copy of the current episode state (with its snapshot id): save it to resume from later."""
        self._need_reset()
        return self.st.copy()

    def messages(self) -> list[dict[str, str]]:
        """The chat messages the policy sees for its next turn (last history_k steps kept)."""
        self._need_reset()
        return build_messages(self.task.description, self.st.history, k=self.history_k, names=self.actions)

    def close(self) -> None:
        """Delete the episode's workspace directory (its snapshots stay in the store)."""
        if self.ws is not None:
            remove_workspace(self.ws)
            self.ws = None

    def _need_reset(self) -> None:
        if self.st is None or self.ws is None:
            raise ValueError("call reset() before using the environment")

    # --- stepping ---
    def step(self, text: str) -> tuple[str, float, bool, dict[str, Any]]:
        """Execute one agent turn: (observation, reward, done, info).

        Never raises on what the agent wrote or did: that is a reward kind. It raises only on a
        trusted-side failure (sandbox, store, evaluator crash); that step is not recorded, and the
        env needs reset() (reset(state=env.state()) goes on from before the step)."""
        return self._finish(self._begin(text))

    def _begin(self, text: str) -> _Pending:
        self._need_reset()
        if self._failed:
            raise ValueError(f"the last step failed outside the agent's control ({self._failed}); "
                             f"call reset(state=env.state()) to go on from before it")
        if self.st.done:
            raise ValueError("the episode is done (Final Answer or step limit): call reset()")
        t0 = time.perf_counter()
        text = scrub_text(text) if isinstance(text, str) else text  # history holds valid UTF-8 only
        p = _Pending(text, t0, parse_response(text, allowed=set(self.actions)))
        p.timings["parse_s"] = time.perf_counter() - t0
        if isinstance(p.parsed, ParseError):
            p.observation, p.kind, p.reason = p.parsed.message, "format_error", p.parsed.message
            return p
        try:
            self._ACT[p.parsed.action](self, p, p.parsed.args)
        except ActionError as e:
            p.observation, p.kind, p.reason = f"EnvError: {e}", "invalid_action", str(e)
        except HelperError as e:
            p.observation, p.kind, p.reason = f"EnvError: {e}", "corner_case", str(e)
        except (OSError, UnicodeError) as e:  # e.g. a name too long, text no codec can write
            msg = f"{type(e).__name__}: {e}".replace(f"{self.ws.resolve()}/", "")[:500]
            p.observation, p.kind, p.reason = f"EnvError: {msg}", "invalid_action", msg
        p.timings["act_s"] = time.perf_counter() - t0 - p.timings["parse_s"]
        if p.job is not None:  # trusted side: a failure here propagates and bills nothing
            p.future = self.pool.submit(**p.job, limits=Limits(wall_s=self.time_limit_s,
                                                                memory_mb=self.memory_mb))
        return p

    def _finish(self, p: _Pending) -> tuple[str, float, bool, dict[str, Any]]:
        try:
            return self._end(p)
        except Exception as e:  # trusted side: the step is not recorded; the env needs reset()
            self._failed = f"{type(e).__name__}: {e}"[:300]
            raise

    def _end(self, p: _Pending) -> tuple[str, float, bool, dict[str, Any]]:
        # Work on a copy (its history list is new) and commit it at the end: a failure half-way
        # leaves self.st as it was before this step's end.
        st, metric_before, info = dataclasses.replace(self.st, history=list(self.st.history)), self.st.metric, {}
        if p.future is not None:
            r = self._finish_run(p, st, info)
        else:
            r = step_reward(p.kind, self.reward_cfg, metric_before=metric_before, reason=p.reason)
        if p.changed:
            t = time.perf_counter()
            st.snapshot = self.store.snapshot(self.ws)
            p.timings["snapshot_s"] = time.perf_counter() - t
        st.steps += 1
        action = p.parsed.action if isinstance(p.parsed, Parsed) else None
        st.done = st.done or action == "Final Answer"
        truncated = not st.done and st.steps >= self.max_steps
        st.done = st.done or truncated
        p.observation = scrub_text(p.observation)  # valid UTF-8 whatever a file name or helper held
        st.history.append(Turn(p.text if isinstance(p.text, str) else repr(p.text)[:1000], p.observation))
        self.st = st  # commit: nothing above changed the env's state
        p.timings["total_s"] = time.perf_counter() - p.t0
        info.update(action=action, args=p.parsed.args if action else None,
                    sections=p.parsed.sections, reward=r.as_dict(), metric=st.metric, best=st.best,
                    snapshot=st.snapshot, step=st.steps, truncated=truncated, timings=p.timings)
        return p.observation, r.value, st.done, info

    def _finish_run(self, p: _Pending, st: EnvState, info: dict[str, Any]) -> RewardBreakdown:
        """Wait for a script run, map its cause to a reward, score the submission if it changed."""
        res = p.future.result()
        cfg, before = self.reward_cfg, st.metric
        p.timings["run_s"] = float(res.wall_s)
        info["run"] = {"script": p.script, "cause": res.cause, "exit_code": res.exit_code, "wall_s": res.wall_s,
                       "cpu_s": res.cpu_s, "peak_rss_mb": res.peak_rss_mb, "note": res.note}
        p.observation = self._run_observation(res)
        kind = run_kind(res.cause)
        if kind is not None:
            return step_reward(kind, cfg, metric_before=before, reason=f"script run: {res.cause}")
        sub = self.ws / SUBMISSION
        if not sub.is_file():
            return step_reward("no_score", cfg, metric_before=before, reason="no submission file")
        sha = file_sha256(sub)
        if sha == st.submission_sha:
            return step_reward("no_score", cfg, metric_before=before, reason="submission unchanged")
        t = time.perf_counter()
        try:
            after = float(score_submission(self.task, self.ws, self.answers))
        except ValueError as e:
            return step_reward("invalid_action", cfg, metric_before=before, reason=f"submission rejected: {e}")
        finally:
            p.timings["score_s"] = time.perf_counter() - t
        r = step_reward("score", cfg, metric_before=before, metric_after=after, best=st.best,
                        alpha=float(self.task.alpha), sign=int(self.task.sign), reason="new score")
        if r.kind == "score":
            st.metric, st.submission_sha = after, sha
            st.best = max(st.best, after) if self.task.sign > 0 else min(st.best, after)
        return r

    def _run_observation(self, res: Any) -> str:
        out = _cut(res.output or "")
        if res.cause == "ok":
            return f"The script ran to the end. Output:\n{out}"
        if res.cause == "timeout":
            return f"The script was stopped at the time limit of {self.time_limit_s:g} s. Output so far:\n{out}"
        if res.cause == "oom":
            return f"The script ran out of memory (limit {self.memory_mb} MB). Output so far:\n{out}"
        if res.cause == "error":
            return f"The script failed (exit code {res.exit_code}). Output:\n{out}"
        return f"The script was killed ({res.cause}). Output so far:\n{out}"

    # --- paths ---
    def _path(self, rel: str, what: str, write: bool = False) -> Path:
        """A workspace path for an agent-given relative path; ActionError if it leaves the workspace."""
        if not rel.strip() or "\x00" in rel:
            raise ActionError(f"{what} is empty or invalid")
        root = self.ws.resolve()
        path = (root / rel.strip()).resolve()
        if path != root and root not in path.parents:
            raise ActionError(f"{what} {rel!r} is outside the workspace: use a relative path")
        relp = path.relative_to(root).as_posix()
        if write and (path == root or path.is_dir()):
            raise ActionError(f"{what} {rel!r} is a directory, not a file name")
        if write and any(relp == p or relp.startswith(p + "/") for p in self.store.readonly):
            raise ActionError(f"{what} {rel!r} is read-only (task data)")
        return path

    def _file(self, rel: str, what: str) -> Path:
        path = self._path(rel, what)
        if not path.is_file():
            raise ActionError(f"{what} {rel!r} is a directory, not a file" if path.is_dir()
                              else f"{what} {rel!r} does not exist")
        return path

    def _write(self, path: Path, text: str) -> None:
        """Replace a file (new inode), remembering its old content for Undo Edit Script."""
        rel = path.relative_to(self.ws.resolve()).as_posix()
        data = text.encode()  # fails (UnicodeError) before anything is written
        old = self.store.put_bytes(path.read_bytes()) if path.is_file() else None
        self._replace(path, data)
        self.st.undo.setdefault(rel, []).append(old)

    @staticmethod
    def _replace(path: Path, data: bytes) -> None:
        """Write by replacing: a new file renamed over the old, never an in-place write."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def _ask(self, prompt: str) -> str:
        try:
            return str(self.helper(prompt))
        except Exception as e:  # any helper failure (HTTP, model) is not the agent's fault
            raise HelperError(f"the helper model failed: {type(e).__name__}: {e}"[:500]) from None

    # --- actions: each fills p.observation and sets p.changed / p.future; errors raise ActionError ---
    def _do_list_files(self, p: _Pending, a: dict) -> None:
        path = self._path(a["dir_path"] or ".", "dir_path")
        if not path.is_dir():
            raise ActionError(f"dir_path {a['dir_path']!r} is not a directory")
        names = sorted(e.name + ("/" if e.is_dir() else "") for e in os.scandir(path))
        p.observation = _cut("\n".join(names) or "(empty directory)")

    def _do_copy_file(self, p: _Pending, a: dict) -> None:
        src = self._file(a["source"], "source")
        dst = self._path(a["destination"], "destination", write=True)
        self._replace(dst, src.read_bytes())
        p.observation, p.changed = f"File {a['source']} copied to {a['destination']}.", True

    def _do_undo_edit_script(self, p: _Pending, a: dict) -> None:
        path = self._path(a["script_name"], "script_name", write=True)
        rel = path.relative_to(self.ws.resolve()).as_posix()
        stack = self.st.undo.get(rel)
        if not stack:
            raise ActionError(f"there is no edit of {a['script_name']!r} to undo")
        old = stack.pop()
        if old is None:  # the edit created the file
            path.unlink(missing_ok=True)
            p.observation = f"Undid the edit: {a['script_name']} did not exist before it and is removed."
        else:
            self._replace(path, self.store.get_bytes(old))
            content = path.read_text(errors="replace")
            p.observation = _cut(f"Undid the last edit. Content of {a['script_name']} now:\n{content}")
        p.changed = True

    def _do_execute_script(self, p: _Pending, a: dict) -> None:
        path = self._file(a["script_name"], "script_name")
        if path.suffix != ".py":
            raise ActionError(f"script_name {a['script_name']!r} is not a python script (.py)")
        rel = path.relative_to(self.ws.resolve()).as_posix()
        ro = [self.ws / r for r in self.store.readonly if (self.ws / r).exists()]
        p.script, p.changed = rel, True
        p.job = dict(workspace=self.ws, script=rel, args=[], readonly=ro)

    def _do_final_answer(self, p: _Pending, a: dict) -> None:
        p.observation = "The episode has ended."

    def _do_understand_file(self, p: _Pending, a: dict) -> None:
        path = self._file(a["file_name"], "file_name")
        text = path.read_text(errors="replace")
        note = "" if len(text) <= MAX_READ_CHARS else f"\n[only the first {MAX_READ_CHARS} characters shown]"
        prompt = (f"Read this file, {a['file_name']}:\n```\n{text[:MAX_READ_CHARS]}\n```{note}\n\n"
                  f"Then describe the following, citing line content where useful, and say plainly when "
                  f"something is not in the file: {a['things_to_look_for']}")
        p.observation = _cut(self._ask(prompt))

    def _do_inspect_script_lines(self, p: _Pending, a: dict) -> None:
        path = self._file(a["script_name"], "script_name")
        start, end = a["start_line_number"], a["end_line_number"]
        lines = path.read_text(errors="replace").splitlines()
        if start < 1 or end < start:
            raise ActionError(f"need 1 <= start_line_number <= end_line_number, got {start} and {end}")
        if end - start + 1 > MAX_INSPECT_LINES:
            raise ActionError(f"at most {MAX_INSPECT_LINES} lines at a time; asked for {end - start + 1}")
        if start > max(len(lines), 1):
            raise ActionError(f"{a['script_name']} has only {len(lines)} lines")
        shown = "\n".join(f"{i:4d} | {lines[i - 1]}" for i in range(start, min(end, len(lines)) + 1))
        p.observation = f"Lines {start}-{min(end, len(lines))} of {a['script_name']} ({len(lines)} lines):\n{shown}"

    def _do_edit_script_ai(self, p: _Pending, a: dict) -> None:
        src = self._path(a["script_name"], "script_name")
        dst = self._path(a["save_name"], "save_name", write=True)
        old = src.read_text(errors="replace") if src.is_file() else ""
        prompt = (f"Here is a python script, {a['script_name']}:\n```python\n{old}\n```\n\n"
                  f"Rewrite it following this instruction, and change nothing else:\n{a['edit_instruction']}\n\n"
                  f"Answer with the complete new script in one ```python code block.")
        new = _extract_code(self._ask(prompt))
        base = dst.read_text(errors="replace") if dst.is_file() else ""
        self._write(dst, new)
        p.observation, p.changed = f"Saved {a['save_name']}. Diff:\n{_diff(base, new, a['save_name'])}", True

    def _do_edit_script_segment(self, p: _Pending, a: dict) -> None:
        src = self._path(a["script_name"], "script_name")
        dst = self._path(a.get("save_name") or a["script_name"], "save_name", write=True)
        if src.is_dir():
            raise ActionError(f"script_name {a['script_name']!r} is a directory")
        old = src.read_text(errors="replace") if src.is_file() else ""
        lines = old.splitlines(True)
        start, end = a["start_line_number"], a["end_line_number"]
        if not (1 <= start <= len(lines) + 1 and start - 1 <= end <= len(lines)):
            raise ActionError(f"lines {start}-{end} are not a valid range of {a['script_name']} ({len(lines)} "
                              f"lines): need 1 <= start <= {len(lines) + 1} and start-1 <= end <= {len(lines)}")
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += "\n"
        seg = a["new_content"]
        if seg and not seg.endswith("\n"):
            seg += "\n"
        new = "".join(lines[:start - 1]) + seg + "".join(lines[end:])
        base = dst.read_text(errors="replace") if dst.is_file() else ""
        self._write(dst, new)
        p.observation, p.changed = f"Saved {dst.relative_to(self.ws.resolve()).as_posix()}. Diff:\n" \
                                   f"{_diff(base, new, a.get('save_name') or a['script_name'])}", True


    _ACT = {"List Files": _do_list_files, "Copy File": _do_copy_file, "Undo Edit Script": _do_undo_edit_script,
            "Execute Script": _do_execute_script, "Final Answer": _do_final_answer,
            "Understand File": _do_understand_file, "Inspect Script Lines": _do_inspect_script_lines,
            "Edit Script (AI)": _do_edit_script_ai, "Edit Script Segment": _do_edit_script_segment}


def step_many(envs: list[Env], responses: list[str]) -> list[tuple[str, float, bool, dict[str, Any]]]:
    """Step many environments at once: every script is submitted before any is waited for, so the
    runs proceed concurrently on the pool(s); results come back in the order of `envs`.

    No submitted step is lost: if some env's step fails outside the agent's control (Env.step
    would raise), every other step still finishes and is recorded, and then StepError is raised
    carrying all results (None for the failed ones) and the errors by index."""
    if len(envs) != len(responses):
        raise ValueError(f"step_many got {len(envs)} environments and {len(responses)} responses")
    if len({id(e) for e in envs}) != len(envs):
        raise ValueError("step_many got the same environment twice; step it in separate calls")
    pending: list[_Pending | None] = []
    errors: dict[int, BaseException] = {}
    for i, (env, text) in enumerate(zip(envs, responses)):
        try:
            pending.append(env._begin(text))
        except Exception as e:
            pending.append(None)
            errors[i] = e
    results: list[tuple[str, float, bool, dict[str, Any]] | None] = []
    for i, (env, p) in enumerate(zip(envs, pending)):
        try:
            results.append(env._finish(p) if p is not None else None)
        except Exception as e:
            results.append(None)
            errors[i] = e
    if errors:
        raise StepError(results, errors) from next(iter(errors.values()))
    return results
