"""Expert data: N episodes over the tasks, in parallel through one sandbox pool, into a trajectory file.

    from fastagent.expert import generate_expert_data
    path = generate_expert_data(cfg, Path("runs/x/expert/expert.traj"))   # resumes a partial file

Per task: the candidate ideas (fastagent.expert.ideas, >= 100 for the bundled training tasks), the
cfg.num_diverse_ideas most mutually diverse of them (fastagent.expert.diversity), then episodes, each
seeded with 1-3 ideas sampled from those. Episode i of task T is fully determined by (cfg.seed, T, i)
(its ideas, its expert's choices, its workspace data seed), so a resumed run makes the same episodes.

Crash safety: the records of one episode are appended together once it ends, and the last one is
marked `meta["last"] = True`. On start, everything after the last complete episode (a torn write, an
episode cut short by a kill) is cut off, and the episodes already there are skipped: a killed run
restarts where it stopped and nothing is duplicated.

Each record's `prompt` is env.messages() before the step (exactly what the policy sees, with
cfg.history_k steps of history), and its `snapshot` is the workspace snapshot the step STARTED from
(info["snapshot_before"]), which is the state step-wise RL samples from.

The expert never sees held-out tasks when it makes training data: `purpose="train"` refuses them.
`purpose="eval"` (held-out states for measuring a policy, never trained on) marks every record so.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from fastagent.data import HEADER, StepRecord, TrajectoryWriter, _frames, read_records
from fastagent.expert.ideas import Idea, table_columns, task_ideas
from fastagent.expert.scripted import ScriptedExpert, Turn
from fastagent.expert.teacher import TeacherExpert
from fastagent.log import print0, progress


def complete_prefix(path: Path) -> int:
    """Cut the file after its last complete episode; return how many bytes were kept."""
    if not path.exists():
        return 0
    buf = path.read_bytes()
    keep = 0
    for offset, rec, _ in _frames(buf):
        if rec is not None and (rec.get("meta") or {}).get("last"):
            keep = offset + HEADER.size + HEADER.unpack_from(buf, offset)[1]  # the end of that frame
    if keep < len(buf):
        with open(path, "r+b") as f:
            f.truncate(keep)
            os.fsync(f.fileno())
    return keep


def idea_pool(tasks: list, root: Path, cfg: Any) -> dict[str, dict[str, Any]]:
    """Per task: every candidate idea, the indices of the kept diverse ones and the diversity report.
    Cached in root/ideas.json (it is a pure function of the starters, the data and the seed)."""
    from fastagent.expert.diversity import select_diverse
    from fastagent.tasks import materialize

    cache = root / "ideas.json"
    pools = json.loads(cache.read_text()) if cache.exists() else {}
    key = f"{cfg.seed}-{cfg.num_diverse_ideas}-{cfg.num_ideas}"
    for t in tasks:
        if pools.get(t.name, {}).get("key") == key:
            continue
        ws, _ = materialize(t, root / "tasks", seed=cfg.seed)
        ideas = task_ideas((ws / "train.py").read_text(), table_columns(ws), seed=cfg.seed)[:cfg.num_ideas]
        kept, report = select_diverse([i.text for i in ideas], cfg.num_diverse_ideas, seed=cfg.seed) if ideas \
            else ([], {})
        pools[t.name] = {"key": key, "ideas": [[i.text, i.kind, [list(p) for p in i.params]] for i in ideas],
                         "kept": kept, "report": report}
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps(pools, indent=1))
    os.replace(tmp, cache)
    return json.loads(cache.read_text())  # a fresh run and a resumed one read ideas the same way


def _tuples(x: Any) -> Any:
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def _idea(entry: list) -> Idea:
    """An Idea back from its JSON form (lists become the tuples they were: (64,) stays a tuple)."""
    text, kind, params = entry
    return Idea(text, kind, tuple((k, _tuples(v)) for k, v in params))


def run_episode(env: Any, expert: ScriptedExpert, episode: str, meta: dict[str, Any]) -> list[StepRecord]:
    """Play one expert episode in env; return its records (the caller writes them)."""
    env.reset()
    records: list[StepRecord] = []
    turns = expert.turns()
    turn, done = next(turns), False
    while not done:
        prompt = env.messages()
        state = env.state().to_dict()
        state.pop("history")  # the earlier steps' records hold it (state_of rebuilds it)
        obs, reward, done, info = env.step(turn.text)
        r = info["reward"]
        records.append(StepRecord(
            task=env.task.name, episode=episode, step=len(records), prompt=prompt, response=turn.text,
            action={"name": info["action"], "args": info["args"]} if info["action"] else {},
            observation=obs, reward=reward, reward_parts=r, metric_before=r.get("metric_before"),
            metric_after=r.get("metric_after"), snapshot=info["snapshot_before"], timings=info["timings"],
            source="expert", meta={**meta, "tags": turn.tags, "state": state, "snapshot_after": info["snapshot_after"],
                                   "best": info["best"], "start_metric": env.start_metric}))
        if done:
            break
        try:
            turn = turns.send(obs)
        except StopIteration:
            break
    records[-1].meta["last"] = True
    return records


def store_of(traj_path: str | Path) -> Path:
    """The snapshot store that generate_expert_data(cfg, traj_path) recorded its states in."""
    return Path(traj_path).parent / "env" / "store"


def state_of(record: StepRecord, earlier: list[StepRecord]) -> dict[str, Any]:
    """The full EnvState (as a dict, for Env.reset(state=...)) a recorded step started from; earlier:
    the same episode's records before it, in order (their responses and observations are its history)."""
    state = dict(record.meta["state"])
    state["history"] = [[r.response, r.observation] for r in earlier]
    return state


class _TeacherTurns:
    """A TeacherExpert (messages -> text) in the scripted expert's shape (a generator of Turns)."""

    def __init__(self, expert: Any, env: Any) -> None:
        self.expert, self.env = expert, env

    def turns(self):
        while True:
            yield Turn(self.expert(self.env.messages()), ["teacher"])


def generate_expert_data(cfg: Any, out_path: Path, episodes: int | None = None, purpose: str = "train",
                         tasks: str | None = None) -> Path:
    """Run the expert (scripted, or cfg.expert = an OpenAI-compatible URL: a teacher model writes every
    turn) over the tasks (see the module docstring); return out_path. Resumes a partial file."""
    from fastagent.env import Env
    from fastagent.sandbox import Pool
    from fastagent.tasks import hide_paths, list_tasks

    teacher = None
    if cfg.expert != "scripted":
        from fastagent.expert.teacher import Teacher
        if not cfg.expert.startswith(("http://", "https://")):
            raise ValueError(f"expert must be 'scripted' or the http(s) URL of an OpenAI-compatible endpoint, "
                             f"got {cfg.expert!r}")
        teacher = Teacher.from_url(cfg.expert, model=cfg.teacher_model, max_tokens=cfg.max_new_tokens)
        teacher.wait_ready(timeout_s=60.0)  # fail before any episode if the server or model name is wrong
    chosen = list_tasks(tasks or (cfg.train_tasks if purpose == "train" else cfg.eval_tasks))
    if purpose == "train" and any(t.split != "train" for t in chosen):
        bad = ", ".join(t.name for t in chosen if t.split != "train")
        raise ValueError(f"the expert never makes training data on held-out tasks ({bad}); use purpose='eval' "
                         f"(python -m fastagent.expert --purpose=eval) for evaluation states")
    out_path = Path(out_path)
    root = out_path.parent
    root.mkdir(parents=True, exist_ok=True)
    n = episodes if episodes is not None else cfg.expert_episodes * len(chosen)
    plan = [(chosen[i % len(chosen)], i // len(chosen)) for i in range(n)]  # round-robin over tasks
    complete_prefix(out_path)
    have = {r.episode for r in read_records(out_path)} if out_path.exists() else set()
    todo = [(t, i) for t, i in plan if f"{t.name}-{i:04d}" not in have]
    print0(f"[expert] {n} episodes over {len(chosen)} tasks ({purpose}); {n - len(todo)} already in {out_path}")
    pools = idea_pool(chosen, root, cfg)
    t0 = time.time()
    lock = threading.Lock()
    env_root = store_of(out_path).parent
    with Pool(workers=cfg.workers, hide=[root, *hide_paths(chosen)]) as pool, \
            TrajectoryWriter(out_path) as writer:
        envs_free: dict[str, list] = defaultdict(list)  # task -> idle Envs (each materialises once)

        def one(task: Any, i: int) -> int:
            with lock:  # Envs are reused; a new one is built under the lock: materialising races
                env = envs_free[task.name].pop() if envs_free[task.name] else Env(task, pool, env_root,
                                                                                 seed=cfg.seed, cfg=cfg)
            rng = random.Random(f"{cfg.seed}-{task.name}-{i}")
            entry = pools[task.name]
            kept = [_idea(entry["ideas"][j]) for j in entry["kept"]]
            seeded = rng.sample(kept, min(len(kept), rng.randint(1, 3))) if kept else []
            if teacher is None:
                expert = ScriptedExpert(task, seeded, seed=rng.randrange(1 << 30), max_steps=env.max_steps)
            else:
                expert = _TeacherTurns(TeacherExpert(teacher, [s.text for s in seeded], set(env.actions)), env)
            meta = {"ideas": [s.text for s in seeded], "purpose": purpose,
                    "expert": "scripted" if teacher is None else f"{cfg.expert}#{cfg.teacher_model}",
                    "actions": env.actions, "history_k": env.history_k}
            try:
                recs = run_episode(env, expert, f"{task.name}-{i:04d}", meta)
            finally:
                env.close()
                with lock:
                    envs_free[task.name].append(env)
            with lock:
                writer.extend(recs)
            return len(recs)

        threads = max(1, cfg.workers + 1)  # the trusted side (edits, snapshots, scoring) overlaps the runs
        with ThreadPoolExecutor(threads) as ex:
            futures = [ex.submit(one, t, i) for t, i in todo]
            steps = sum(f.result() for f in progress(as_completed(futures), total=len(futures), desc="expert",
                                                    unit="episode"))
    wall = time.time() - t0
    summary = summarize(read_records(out_path), pools)
    summary.update(new_episodes=len(todo), new_steps=steps, wall_s=round(wall, 1),
                   episodes_per_hour=round(len(todo) / max(wall, 1e-9) * 3600, 1))
    (root / (out_path.stem + ".summary.json")).write_text(json.dumps(summary, indent=1))
    print0(format_summary(summary))
    return out_path


def summarize(records: list[StepRecord], pools: dict[str, dict] | None = None) -> dict[str, Any]:
    """Episodes, steps, action mix, failure/recovery/dead-end rates, metric gain per task, diversity."""
    from fastagent.data import episodes as by_episode
    from fastagent.tasks import get_task
    eps = by_episode(records)
    actions = Counter(r.action.get("name", "(format error)") for r in records)
    tags = Counter(tag for r in records for tag in r.meta.get("tags", []))
    kinds = Counter(r.reward_parts.get("kind", "?") for r in records)
    gain: dict[str, list[float]] = defaultdict(list)
    for ep in eps:
        start, best = ep[0].meta.get("start_metric"), ep[-1].meta.get("best")
        if start is not None and best is not None and start != 0:
            sign = 1 if get_task(ep[0].task).direction == "max" else -1
            gain[ep[0].task].append(sign * (best - start) / abs(start))
    per_task = {t: {"episodes": len(g), "mean_rel_gain": round(sum(g) / len(g), 4), "best_rel_gain": round(max(g), 4)}
                for t, g in sorted(gain.items())}
    realised = {i for ep in eps for i in ep[0].meta.get("ideas", [])}
    n = max(len(records), 1)
    out = {"episodes": len(eps), "steps": len(records), "steps_per_episode": round(len(records) / max(len(eps), 1), 2),
           "action_mix": {a: round(c / n, 3) for a, c in actions.most_common()},
           "reward_kinds": dict(kinds.most_common()),
           "failure_rate": round((kinds["invalid_action"] + kinds["format_error"]) / n, 3),
           "recovery_share": round(tags["recovery"] / n, 3), "dead_end_share": round(tags["dead_end"] / n, 3),
           "final_answer_share": round(sum(1 for ep in eps if ep[-1].action.get("name") == "Final Answer")
                                       / max(len(eps), 1), 3),
           "distinct_ideas_realised": len(realised), "per_task": per_task}
    if pools:
        out["diversity"] = {t: p["report"] for t, p in pools.items() if p.get("report")}
    return out


def format_summary(s: dict[str, Any]) -> str:
    lines = [f"[expert] {s['episodes']} episodes, {s['steps']} steps ({s['steps_per_episode']}/episode); "
             f"failures {s['failure_rate']:.1%}, recoveries {s['recovery_share']:.1%}, dead ends "
             f"{s['dead_end_share']:.1%}, Final Answer in {s['final_answer_share']:.0%}; "
             f"{s['distinct_ideas_realised']} distinct ideas",
             "[expert] actions: " + ", ".join(f"{a} {v:.0%}" for a, v in s["action_mix"].items())]
    for t, g in s["per_task"].items():
        d = s.get("diversity", {}).get(t, {})
        div = (f"; kept ideas' mean distance {d['kept_mean_distance']:.3f} vs random {d['random_mean_distance']:.3f}"
               if d else "")
        lines.append(f"[expert]   {t}: {g['episodes']} episodes, relative gain mean {g['mean_rel_gain']:+.2%} "
                     f"best {g['best_rel_gain']:+.2%}{div}")
    if "wall_s" in s:
        lines.append(f"[expert] {s['new_episodes']} new episodes in {s['wall_s']:.0f} s "
                     f"({s['episodes_per_hour']:.0f} episodes/hour)")
    return "\n".join(lines)
