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
import json
import math
import os
import stat
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from fastagent.actions import ACTIONS, Parsed, ParseError, Turn, build_messages, parse_response
from fastagent import safefs
from fastagent.chat import scrub_text
from fastagent.reward import RewardBreakdown, RewardConfig, run_kind, step_reward
from fastagent.safefs import UnsafePath, kind_of
from fastagent.sandbox import Limits
from fastagent.tasks import materialize, score_submission, starter_score
from fastagent.workspace import Store, file_sha256
from fastagent.env_actions import (ACT, MAX_SUBMISSION_BYTES, SUBMISSION, ActionError, HelperError, Pending,
                                  _cut, _lstat)

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


class Env:
    """One ML-task episode at a time over a shared sandbox pool (see the module docstring)."""

    def __init__(self, task: Any, pool: Any, root: Path | str, *, seed: int = 0, cfg: Any = None,
                 reward: RewardConfig | None = None, helper: Helper | str | None = None,
                 store: Store | None = None, history_k: int | None = None, time_limit_s: float | None = None,
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
        self.history_k = history_k if history_k is not None else (cfg.history_k if cfg is not None else 3)
        self.max_obs_chars = cfg.max_obs_chars if cfg is not None else 4000
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
        return build_messages(self.task.description, self.st.history, k=self.history_k, names=self.actions,
                              max_obs_chars=self.max_obs_chars)

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

    def _begin(self, text: str) -> Pending:
        self._need_reset()
        if self._failed:
            raise ValueError(f"the last step failed outside the agent's control ({self._failed}); "
                             f"call reset(state=env.state()) to go on from before it")
        if self.st.done:
            raise ValueError("the episode is done (Final Answer or step limit): call reset()")
        t0 = time.perf_counter()
        text = scrub_text(text) if isinstance(text, str) else text  # history holds valid UTF-8 only
        p = Pending(text, t0, parse_response(text, allowed=set(self.actions)))
        p.undo = {k: list(v) for k, v in self.st.undo.items()}
        p.timings["parse_s"] = time.perf_counter() - t0
        if isinstance(p.parsed, ParseError):
            p.observation, p.kind, p.reason = p.parsed.message, "format_error", p.parsed.message
            return p
        try:
            ACT[p.parsed.action](self, p, p.parsed.args)
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

    def _finish(self, p: Pending) -> tuple[str, float, bool, dict[str, Any]]:
        try:
            return self._end(p)
        except Exception as e:  # trusted side: the step is not recorded; the env needs reset()
            self._failed = f"{type(e).__name__}: {e}"[:300]
            raise

    def _end(self, p: Pending) -> tuple[str, float, bool, dict[str, Any]]:
        # Work on a copy (its history list is new) and commit it at the end: a failure half-way
        # leaves self.st as it was before this step's end.
        st, metric_before, info = dataclasses.replace(self.st, history=list(self.st.history)), self.st.metric, {}
        info["snapshot_before"] = self.st.snapshot  # the state this step started from (StepRecord.snapshot)
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
                    snapshot_after=st.snapshot, step=st.steps, truncated=truncated, timings=p.timings)
        return p.observation, r.value, st.done, info

    def _over_cap(self, p: Pending, st: EnvState, why: str) -> RewardBreakdown:
        """The workspace passed a cap: back to the step's start (files, undo stacks, scores)."""
        self._roll_back(st.snapshot)
        st.undo, st.metric, st.best, st.submission_sha = p.undo, self.st.metric, self.st.best, self.st.submission_sha
        p.observation = (f"{p.observation}\n\nEnvError: {why}. The workspace is back as it was before "
                         f"this step.").lstrip()
        return step_reward("invalid_action", self.reward_cfg, metric_before=st.metric,
                           reason=f"workspace over a cap: {why}")

    def _finish_run(self, p: Pending, st: EnvState, info: dict[str, Any]) -> RewardBreakdown:
        """Wait for a script run, contain what it left, map its cause to a reward, score the
        submission (a trusted copy of it) if it changed."""
        res = p.future.result()
        cfg, before = self.reward_cfg, st.metric
        p.timings["run_s"] = float(res.wall_s)
        info["run"] = {"script": p.script, "cause": res.cause, "exit_code": res.exit_code, "wall_s": res.wall_s,
                       "cpu_s": res.cpu_s, "peak_rss_mb": res.peak_rss_mb, "note": res.note}
        p.observation = self._run_observation(res)
        sub = _lstat(self, SUBMISSION)  # before sanitize, which removes a link or fifo put there
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
                raise UnsafePath(f"{SUBMISSION!r} is {kind_of(sub.st_mode)}: write a regular file")
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
    pending: list[Pending | None] = []
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
