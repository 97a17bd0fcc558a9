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
An episode starts from the starter's score on its own seed (fastagent.tasks.starter_score, measured
once per (task, seed) and cached).

Every byte, name and inode in a workspace is hostile (the agent's code made it). The trusted side
touches workspace files only through fastagent.safefs: no symlink is followed, only regular files
are read, every read is capped (Inspect Script Lines scans at most MAX_SCAN_BYTES, Understand File
reads MAX_READ_CHARS worth, edits read at most MAX_EDIT_BYTES, Copy File streams sparse-aware up to
MAX_COPY_BYTES). After every run the workspace is sanitized (links, fifos, sockets, devices
removed; setuid bits stripped) and checked against safefs.Caps; a workspace beyond the caps is an
invalid action and is put back as it was before the step. The submission is scored from a trusted
copy (copy_out: a regular file of one link, at most MAX_SUBMISSION_BYTES) whose sha256 is the
submission's identity; a link, fifo, hard link, directory or over-cap file is a malformed
submission (invalid action). Observations are valid UTF-8 (names through safefs.safe_name, contents
decoded with replacement), so data.TrajectoryWriter and chat.tokenize_chat take them as they are.

Helper model (Edit Script (AI), Understand File): `helper=` a callable prompt -> text (e.g. the
policy, passed in by the trainer), or an http(s) URL of an OpenAI-compatible endpoint. Without a
helper those two actions are left out of the prompt and parsing them is a format error.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import stat
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from fastagent.actions import ACTIONS, MAX_INSPECT_LINES, Parsed, ParseError, Turn, build_messages, parse_response
from fastagent import safefs
from fastagent.chat import scrub_text
from fastagent.reward import RewardBreakdown, RewardConfig, run_kind, step_reward
from fastagent.safefs import UnsafePath, safe_name
from fastagent.sandbox import Limits
from fastagent.tasks import materialize, score_submission, starter_score
from fastagent.workspace import Store, file_sha256

SUBMISSION = "submission.csv"
MAX_OBS_CHARS = 6000  # longest observation returned by one action (head and tail kept)
MAX_READ_CHARS = 12000  # most of a file sent to the helper model by Understand File
MAX_SCAN_BYTES = 1 << 20  # Inspect Script Lines reads at most this much of a file to find its lines
MAX_EDIT_BYTES = 1 << 20  # largest file the edit actions (and Undo) read and rewrite
MAX_COPY_BYTES = safefs.Caps().max_file_bytes  # largest file Copy File copies
MAX_SUBMISSION_BYTES = 64 << 20  # largest submission.csv that is scored
MAX_LIST_NAMES = 1000  # names shown by List Files (the rest are counted)
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
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
    metric: float  # m: the last score (the starter's score on this seed until a run is scored)
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
    undo: dict[str, list[str | None]] = field(default_factory=dict)  # the undo stacks before the step
    future: Any = None  # concurrent.futures.Future of the script run
    script: str = ""
    timings: dict[str, float] = field(default_factory=dict)


def _cut(text: str, limit: int = MAX_OBS_CHARS) -> str:
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}\n[... {len(text) - 2 * half} characters cut ...]\n{text[-half:]}"


def _kind(mode: int) -> str:
    """What a non-regular inode is, for an observation."""
    return ("a directory" if stat.S_ISDIR(mode) else "a symbolic link" if stat.S_ISLNK(mode) else
            "a named pipe" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else
            "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")


MAX_DIFF_LINES = 2000  # difflib is superlinear: a changed region longer than this gets a summary
_HUNK = re.compile(r"@@ -(\d+)(,\d+)? \+(\d+)(,\d+)? @@")


def _diff(old: str, new: str, name: str) -> str:
    """A unified diff of the changed region only: common leading and trailing lines are cut first
    (linear time), so a one-line edit of a 1 MB file costs what the line does."""
    a, b = old.splitlines(True), new.splitlines(True)
    pre = 0
    while pre < min(len(a), len(b)) and a[pre] == b[pre]:
        pre += 1
    suf = 0
    while suf < min(len(a), len(b)) - pre and a[-1 - suf] == b[-1 - suf]:
        suf += 1
    if a == b:
        return "(no change)"
    lo, keep = max(0, pre - 3), max(0, suf - 3)  # 3 lines of context, as unified_diff gives
    a_mid, b_mid = a[lo:len(a) - keep], b[lo:len(b) - keep]
    if len(a_mid) + len(b_mid) > MAX_DIFF_LINES:
        return (f"(diff not shown: lines {pre + 1}-{len(a) - suf} ({len(a) - pre - suf} lines) became "
                f"{len(b) - pre - suf} new lines, too many to show; Inspect Script Lines shows them)")
    out = []
    for line in difflib.unified_diff(a_mid, b_mid, f"a/{name}", f"b/{name}"):
        m = _HUNK.match(line)  # hunk line numbers are relative to the cut region: shift them back
        out.append(f"@@ -{int(m[1]) + lo}{m[2] or ''} +{int(m[3]) + lo}{m[4] or ''} @@{line[m.end():]}" if m else line)
    return _cut("".join(out))


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
        self.caps = self.store.caps  # bounds on the workspace after each step (beyond: invalid action)
        # m at the start: the starter's score on this seed (measured once per (task, seed), cached)
        self.start_metric = float(starter_score(task, self.root / "tasks", seed, pool))
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
            start = self.start_metric
            st = EnvState(snapshot=snapshot or self.initial, metric=start, best=start,
                          submission_sha=self._initial_sub)
        if not self.store.exists(st.snapshot):
            raise ValueError(f"snapshot {st.snapshot!r} is not in the store at {self.store.root}")
        self.close()
        self._failed = ""
        self.ws = self._restore(st.snapshot)
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
        """Delete the episode's workspace directory, whatever the agent left in it (its snapshots
        stay in the store)."""
        if self.ws is not None:
            safefs.remove_tree(self.ws)
            self.ws = None

    def _restore(self, snap: str) -> Path:
        return self.store.restore(snap, self.root / "episodes" / f"{self.task.name}-{uuid.uuid4().hex[:12]}")

    def _roll_back(self, snap: str) -> None:
        """Replace the workspace by snapshot `snap` (a fresh directory; the old one is removed)."""
        old, self.ws = self.ws, self._restore(snap)
        safefs.remove_tree(old)

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
        p.undo = {k: list(v) for k, v in self.st.undo.items()}
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
        except UnsafePath as e:  # a link, special file or over-cap file where a file was asked for
            p.observation, p.kind, p.reason = f"EnvError: {e}", "invalid_action", str(e)
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
            try:
                st.snapshot = self.store.snapshot(self.ws)  # walks with the caps before reading
            except UnsafePath as e:  # over a cap: invalid, and the workspace goes back to before
                r = self._over_cap(p, st, str(e))
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

    def _over_cap(self, p: _Pending, st: EnvState, why: str) -> RewardBreakdown:
        """The workspace passed a cap: back to the step's start (files, undo stacks, scores)."""
        self._roll_back(st.snapshot)
        st.undo, st.metric, st.best, st.submission_sha = p.undo, self.st.metric, self.st.best, self.st.submission_sha
        p.observation = (f"{p.observation}\n\nEnvError: {why}. The workspace is back as it was before "
                         f"this step.").lstrip()
        return step_reward("invalid_action", self.reward_cfg, metric_before=st.metric,
                           reason=f"workspace over a cap: {why}")

    def _finish_run(self, p: _Pending, st: EnvState, info: dict[str, Any]) -> RewardBreakdown:
        """Wait for a script run, contain what it left, map its cause to a reward, score the
        submission (a trusted copy of it) if it changed."""
        res = p.future.result()
        cfg, before = self.reward_cfg, st.metric
        p.timings["run_s"] = float(res.wall_s)
        info["run"] = {"script": p.script, "cause": res.cause, "exit_code": res.exit_code, "wall_s": res.wall_s,
                       "cpu_s": res.cpu_s, "peak_rss_mb": res.peak_rss_mb, "note": res.note}
        p.observation = self._run_observation(res)
        sub = self._lstat(SUBMISSION)  # before sanitize, which removes a link or fifo put there
        t = time.perf_counter()
        p.changed = False  # snapshotted here, before scoring: an over-cap workspace is not scored
        try:
            safefs.sanitize(self.ws, self.caps)
            st.snapshot = self.store.snapshot(self.ws)
        except UnsafePath as e:
            return self._over_cap(p, st, str(e))
        finally:
            p.timings["snapshot_s"] = time.perf_counter() - t
        kind = run_kind(res.cause)
        if kind is not None:
            return step_reward(kind, cfg, metric_before=before, reason=f"script run: {res.cause}")
        if sub is None:
            return step_reward("no_score", cfg, metric_before=before, reason="no submission file")
        t = time.perf_counter()
        scratch = Path(tempfile.mkdtemp(prefix=".score-", dir=self.root))
        try:
            if not stat.S_ISREG(sub.st_mode):
                raise UnsafePath(f"{SUBMISSION!r} is {_kind(sub.st_mode)}: write a regular file")
            sha = safefs.copy_out(self.ws, SUBMISSION, scratch / SUBMISSION, MAX_SUBMISSION_BYTES)
            if sha == st.submission_sha:
                return step_reward("no_score", cfg, metric_before=before, reason="submission unchanged")
            after = float(score_submission(self.task, scratch, self.answers))
            if not math.isfinite(after):
                raise ValueError(f"the evaluator scored it {after}")
        except (UnsafePath, ValueError, LookupError, TypeError, ArithmeticError) as e:
            # a link/special/over-cap file, or content the evaluator cannot read (its I/O errors
            # are the trusted side's and propagate)
            p.observation += f"\n\nEnvError: malformed submission: {e}"
            return step_reward("invalid_action", cfg, metric_before=before, reason=f"malformed submission: {e}")
        finally:
            safefs.remove_tree(scratch)
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

    # --- paths: agent-given names are checked here; every open goes through safefs ---
    def _rel(self, rel: str, what: str, write: bool = False) -> str:
        """The normalized workspace-relative form of an agent-given path; ActionError if it leaves
        the workspace (absolute, '..') or, for a write, names the workspace or read-only task data."""
        parts = [q for q in rel.strip().split("/") if q not in ("", ".")]
        if not rel.strip() or "\x00" in rel:
            raise ActionError(f"{what} is empty or invalid")
        if rel.strip().startswith("/") or ".." in parts:
            raise ActionError(f"{what} {safe_name(rel)!r} is outside the workspace: use a relative path "
                              f"inside it (no leading '/', no '..')")
        relp = "/".join(parts)
        if write and not relp:
            raise ActionError(f"{what} {safe_name(rel)!r} is a directory, not a file name")
        if write and any(relp == r or relp.startswith(r + "/") for r in self.store.readonly):
            raise ActionError(f"{what} {safe_name(rel)!r} is read-only (task data)")
        return relp

    def _lstat(self, rel: str) -> os.stat_result | None:
        """lstat of rel in the workspace (never following a link on the way), None if missing."""
        parent, _, name = rel.rpartition("/")
        try:
            fd = safefs.open_beneath(self.ws, parent or ".", os.O_RDONLY | os.O_DIRECTORY)
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            return os.stat(name, dir_fd=fd, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            return None
        finally:
            os.close(fd)

    def _file(self, rel: str, what: str) -> str:
        """rel of an existing regular file (not a link, fifo, device, directory)."""
        relp = self._rel(rel, what)
        st = self._lstat(relp)
        if st is None:
            raise ActionError(f"{what} {safe_name(rel)!r} does not exist")
        if not stat.S_ISREG(st.st_mode):
            raise ActionError(f"{what} {safe_name(rel)!r} is {_kind(st.st_mode)}, not a regular file")
        return relp

    def _target(self, rel: str, what: str) -> tuple[str, bool]:
        """(rel of a file to write, whether it exists); ActionError for a directory, link or special."""
        relp = self._rel(rel, what, write=True)
        st = self._lstat(relp)
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise ActionError(f"{what} {safe_name(rel)!r} is {_kind(st.st_mode)}, not a file name to write")
        return relp, st is not None

    def _read_old(self, relp: str, exists: bool) -> bytes:
        """The content of a file an edit replaces (b"" if new); ActionError above MAX_EDIT_BYTES."""
        if not exists:
            return b""
        try:
            return safefs.read_bytes(self.ws, relp, MAX_EDIT_BYTES, allow_links=True)
        except UnsafePath as e:
            raise ActionError(f"{e} (edits take files of at most {MAX_EDIT_BYTES} bytes)") from None

    def _dir_fd(self, rel_dir: str) -> int:
        """An fd of workspace directory rel_dir, made if missing, never through a link."""
        fd = os.open(self.ws, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for part in [q for q in rel_dir.split("/") if q]:
                try:
                    os.mkdir(part, 0o755, dir_fd=fd)
                except FileExistsError:
                    pass
                try:
                    nfd = os.open(part, _DIR, dir_fd=fd)
                except OSError as e:
                    raise ActionError(f"{safe_name(rel_dir)!r}: {safe_name(part)!r} is not a directory "
                                      f"(a file or a link)") from None
                os.close(fd)
                fd = nfd
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _write(self, relp: str, old: bytes, exists: bool, text: str) -> None:
        """Replace a file (new inode), remembering its old content for Undo Edit Script."""
        data = text.encode()  # fails (UnicodeError) before anything is written
        self._replace(relp, data)
        self.st.undo.setdefault(relp, []).append(self.store.put_bytes(old) if exists else None)

    def _replace(self, relp: str, data: bytes) -> None:
        """Write by replacing: a new file renamed over the old, never an in-place write."""
        parent, _, name = relp.rpartition("/")
        pfd = self._dir_fd(parent)
        tmp = f".{name[:100]}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                         dir_fd=pfd)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.rename(tmp, name, src_dir_fd=pfd, dst_dir_fd=pfd)
            except BaseException:
                try:
                    os.unlink(tmp, dir_fd=pfd)
                except OSError:
                    pass
                raise
        finally:
            os.close(pfd)

    def _ask(self, prompt: str) -> str:
        try:
            return str(self.helper(prompt))
        except Exception as e:  # any helper failure (HTTP, model) is not the agent's fault
            raise HelperError(f"the helper model failed: {type(e).__name__}: {e}"[:500]) from None

    # --- actions: each fills p.observation and sets p.changed / p.job; errors raise ActionError ---
    def _do_list_files(self, p: _Pending, a: dict) -> None:
        relp = self._rel(a["dir_path"] or ".", "dir_path")
        try:
            fd = safefs.open_beneath(self.ws, relp or ".", os.O_RDONLY | os.O_DIRECTORY)
        except (FileNotFoundError, NotADirectoryError):
            raise ActionError(f"dir_path {safe_name(a['dir_path'])!r} is not a directory") from None
        names, more = [], 0
        try:
            with os.scandir(fd) as it:  # names only: lstat-free, never following a link
                for e in it:
                    if len(names) >= MAX_LIST_NAMES:
                        more += 1
                        if more >= 100_000:
                            break
                        continue
                    kind = "/" if e.is_dir(follow_symlinks=False) else "" if e.is_file(follow_symlinks=False) \
                        else " [symbolic link]" if e.is_symlink() else " [not a regular file]"
                    names.append(safe_name(e.name) + kind)
        finally:
            os.close(fd)
        tail = f"\n[... and {more}{'+' if more >= 100_000 else ''} more entries]" if more else ""
        p.observation = _cut("\n".join(sorted(names)) + tail or "(empty directory)")

    def _do_copy_file(self, p: _Pending, a: dict) -> None:
        src = self._file(a["source"], "source")
        dst, _ = self._target(a["destination"], "destination")
        parent = dst.rpartition("/")[0]
        os.close(self._dir_fd(parent))  # make the destination's folders, as the edits do
        safefs.copy_file(self.ws, src, dst, MAX_COPY_BYTES)
        p.observation, p.changed = f"File {safe_name(src)} copied to {safe_name(dst)}.", True

    def _do_undo_edit_script(self, p: _Pending, a: dict) -> None:
        relp, exists = self._target(a["script_name"], "script_name")
        stack = self.st.undo.get(relp)
        if not stack:
            raise ActionError(f"there is no edit of {safe_name(a['script_name'])!r} to undo")
        old = stack[-1]
        if old is None:  # the edit created the file
            if exists:
                parent = relp.rpartition("/")[0]
                fd = safefs.open_beneath(self.ws, parent or ".", os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.unlink(relp.rpartition("/")[2], dir_fd=fd)
                finally:
                    os.close(fd)
            p.observation = f"Undid the edit: {safe_name(relp)} did not exist before it and is removed."
        else:
            data = self.store.get_bytes(old)  # at most MAX_EDIT_BYTES: an edit read it with that cap
            self._replace(relp, data)
            p.observation = _cut(f"Undid the last edit. Content of {safe_name(relp)} now:\n"
                                 f"{data.decode('utf-8', 'replace')}")
        stack.pop()
        p.changed = True

    def _do_execute_script(self, p: _Pending, a: dict) -> None:
        rel = self._file(a["script_name"], "script_name")
        if not rel.endswith(".py"):
            raise ActionError(f"script_name {safe_name(a['script_name'])!r} is not a python script (.py)")
        ro = [self.ws / r for r in self.store.readonly if self._lstat(r) is not None]
        p.script, p.changed = rel, True
        p.job = dict(workspace=self.ws, script=rel, args=[], readonly=ro)

    def _do_final_answer(self, p: _Pending, a: dict) -> None:
        p.observation = "The episode has ended."

    def _do_understand_file(self, p: _Pending, a: dict) -> None:
        rel = self._file(a["file_name"], "file_name")
        head, longer = safefs.read_head(self.ws, rel, 4 * MAX_READ_CHARS, allow_links=True)
        text = head.decode("utf-8", "replace")
        longer = longer or len(text) > MAX_READ_CHARS
        note = f"\n[only the first {MAX_READ_CHARS} characters shown]" if longer else ""
        prompt = (f"Read this file, {safe_name(rel)}:\n```\n{text[:MAX_READ_CHARS]}\n```{note}\n\n"
                  f"Then describe the following, citing line content where useful, and say plainly when "
                  f"something is not in the file: {a['things_to_look_for']}")
        p.observation = _cut(self._ask(prompt))

    def _do_inspect_script_lines(self, p: _Pending, a: dict) -> None:
        rel = self._file(a["script_name"], "script_name")
        start, end = a["start_line_number"], a["end_line_number"]
        if start < 1 or end < start:
            raise ActionError(f"need 1 <= start_line_number <= end_line_number, got {start} and {end}")
        if end - start + 1 > MAX_INSPECT_LINES:
            raise ActionError(f"at most {MAX_INSPECT_LINES} lines at a time; asked for {end - start + 1}")
        head, longer = safefs.read_head(self.ws, rel, MAX_SCAN_BYTES, allow_links=True)
        lines = head.decode("utf-8", "replace").splitlines()
        if longer:  # the last line may be cut: only lines before it are known whole
            lines = lines[:-1]
            if end > len(lines):
                raise ActionError(f"{safe_name(rel)} is too large to scan to line {end}: its first "
                                  f"{MAX_SCAN_BYTES} bytes hold {len(lines)} whole lines")
        if start > max(len(lines), 1):
            raise ActionError(f"{safe_name(rel)} has only {len(lines)} lines")
        count = f"more than {len(lines)}" if longer else str(len(lines))
        shown = "\n".join(f"{i:4d} | {lines[i - 1]}" for i in range(start, min(end, len(lines)) + 1))
        p.observation = _cut(f"Lines {start}-{min(end, len(lines))} of {safe_name(rel)} ({count} lines):\n{shown}")

    def _do_edit_script_ai(self, p: _Pending, a: dict) -> None:
        src, src_exists = self._target(a["script_name"], "script_name")
        dst, dst_exists = self._target(a["save_name"], "save_name")
        src_bytes = self._read_old(src, src_exists)
        old = src_bytes.decode("utf-8", "replace")
        base_bytes = src_bytes if dst == src else self._read_old(dst, dst_exists)
        prompt = (f"Here is a python script, {safe_name(src)}:\n```python\n{old}\n```\n\n"
                  f"Rewrite it following this instruction, and change nothing else:\n{a['edit_instruction']}\n\n"
                  f"Answer with the complete new script in one ```python code block.")
        new = _extract_code(self._ask(prompt))
        self._write(dst, base_bytes, dst_exists, new)
        p.observation, p.changed = (f"Saved {safe_name(dst)}. Diff:\n"
                                    f"{_diff(base_bytes.decode('utf-8', 'replace'), new, safe_name(dst))}"), True

    def _do_edit_script_segment(self, p: _Pending, a: dict) -> None:
        src, src_exists = self._target(a["script_name"], "script_name")
        dst, dst_exists = self._target(a.get("save_name") or a["script_name"], "save_name")
        src_bytes = self._read_old(src, src_exists)
        lines = src_bytes.decode("utf-8", "replace").splitlines(True)
        start, end = a["start_line_number"], a["end_line_number"]
        if not (1 <= start <= len(lines) + 1 and start - 1 <= end <= len(lines)):
            raise ActionError(f"lines {start}-{end} are not a valid range of {safe_name(src)} ({len(lines)} "
                              f"lines): need 1 <= start <= {len(lines) + 1} and start-1 <= end <= {len(lines)}")
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += "\n"
        seg = a["new_content"]
        if seg and not seg.endswith("\n"):
            seg += "\n"
        new = "".join(lines[:start - 1]) + seg + "".join(lines[end:])
        base_bytes = src_bytes if dst == src else self._read_old(dst, dst_exists)
        self._write(dst, base_bytes, dst_exists, new)
        p.observation, p.changed = (f"Saved {safe_name(dst)}. Diff:\n"
                                    f"{_diff(base_bytes.decode('utf-8', 'replace'), new, safe_name(dst))}"), True


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
