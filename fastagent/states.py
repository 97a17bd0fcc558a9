"""The states pool of step-wise RL: every step of every expert trajectory, ready to restart from.

    pool = StatesPool.build(traj_paths, tokenizer, heldout={"gunpoint", ...}, max_prompt_tokens=1920)
    pool.save(run_dir / "rl" / "states.pt"); pool = StatesPool.load(...)
    sampler = StateSampler(pool, seed=0, weights="uniform")   # by task: uniform | steps | {task: w}
    batch = sampler.next(16)                                  # 16 State objects; sampler.state_dict() checkpoints

A State is one expert step's starting point: the prompt token ids the agent saw (rendered once from the
record's messages with the policy's chat template, so an RL sample is token in, token out), the full
EnvState dict to restore (workspace snapshot + history, `fastagent.expert.generate.state_of`), the
snapshot store it lives in, the metric at that point, and the actions its env offered. Held-out tasks
never enter: building from a trajectory that holds one is an error, not a silent filter.

Sampling is by task, then uniformly over that task's states: weights="uniform" gives every task the
same share (a task with long episodes does not dominate), "steps" weights tasks by their number of
states, or a {task: weight} dict. The sampler's draw is a pure function of (seed, number drawn so
far), so its checkpoint is one integer and a resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fastagent.chat import tokenize_chat
from fastagent.data import episodes, read_records


@dataclass
class State:
    task: str
    episode: str
    step: int
    prompt_ids: list[int]
    env_state: dict[str, Any]  # EnvState.from_dict input: snapshot, metric, best, history, ...
    store: str  # the snapshot store holding env_state["snapshot"]
    metric: float | None
    actions: list[str] = field(default_factory=list)  # the actions the env offered (parse_response's allowed)

    @property
    def snapshot(self) -> str:
        return self.env_state["snapshot"]


class StatesPool:
    """All states of a set of expert trajectory files (see the module docstring)."""

    def __init__(self, states: list[State], dropped: int = 0) -> None:
        if not states:
            raise ValueError("the states pool is empty: generate expert data first (python -m fastagent.expert)")
        self.states = states
        self.dropped = dropped  # steps whose prompt was longer than max_prompt_tokens
        self.by_task: dict[str, list[int]] = {}
        for i, s in enumerate(states):
            self.by_task.setdefault(s.task, []).append(i)

    @classmethod
    def build(cls, traj_paths: list[str | Path], tokenizer: Any, heldout: set[str],
              max_prompt_tokens: int) -> "StatesPool":
        from fastagent.expert.generate import state_of, store_of
        states, dropped = [], 0
        for path in traj_paths:
            store = str(store_of(path))
            for ep in episodes(read_records(path)):
                for k, rec in enumerate(ep):
                    if rec.task in heldout or rec.meta.get("purpose") == "eval":
                        raise ValueError(f"{path} holds a step of held-out task {rec.task!r} (episode {rec.episode}): "
                                         f"RL states come from training tasks only; use a --purpose=train file")
                    if "state" not in rec.meta:
                        raise ValueError(f"{path}: record {rec.episode} step {rec.step} has no saved state; "
                                         f"regenerate it with python -m fastagent.expert")
                    ids = tokenize_chat(tokenizer, rec.prompt, add_generation_prompt=True)[0]
                    if len(ids) > max_prompt_tokens:
                        dropped += 1
                        continue
                    states.append(State(rec.task, rec.episode, rec.step, ids, state_of(rec, ep[:k]), store,
                                        rec.metric_before, list(rec.meta.get("actions") or [])))
        return cls(states, dropped)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save({"states": [s.__dict__ for s in self.states], "dropped": self.dropped}, tmp)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> "StatesPool":
        d = torch.load(path, weights_only=False)
        states = [State(**s) for s in d["states"]]
        gone = sorted({s.store for s in states if not (Path(s.store) / "snapshots").is_dir()})
        if gone:  # the expert data (and its snapshot store) moved or was deleted after the pool was built
            raise ValueError(f"{path} refers to snapshot stores that no longer exist ({', '.join(gone)}): "
                             f"delete {path} and rerun; it is rebuilt from the expert data")
        return cls(states, d["dropped"])

    def __len__(self) -> int:
        return len(self.states)

    def summary(self) -> str:
        per = ", ".join(f"{t} {len(ix)}" for t, ix in sorted(self.by_task.items()))
        return f"{len(self.states)} states over {len(self.by_task)} tasks ({per}); {self.dropped} too long, dropped"


class StateSampler:
    """Draws states by task weight, then uniformly within the task; checkpoint = the draw count."""

    def __init__(self, pool: StatesPool, seed: int = 0, weights: str | dict[str, float] = "uniform") -> None:
        self.pool, self.seed, self.drawn = pool, seed, 0
        tasks = sorted(pool.by_task)
        if weights == "uniform":
            w = {t: 1.0 for t in tasks}
        elif weights == "steps":
            w = {t: float(len(pool.by_task[t])) for t in tasks}
        elif isinstance(weights, dict):
            unknown = set(weights) - set(tasks)
            if unknown:
                raise ValueError(f"state weights name tasks not in the pool: {sorted(unknown)} (pool: {tasks})")
            w = {t: float(weights.get(t, 0.0)) for t in tasks}
        else:
            raise ValueError(f"weights must be 'uniform', 'steps' or a {{task: weight}} dict, got {weights!r}")
        if any(v < 0 for v in w.values()) or sum(w.values()) <= 0:
            raise ValueError(f"state weights must be >= 0 with a positive sum, got {w}")
        self.tasks = [t for t in tasks if w[t] > 0]
        self.weights = [w[t] for t in self.tasks]

    def next(self, n: int) -> list[State]:
        out = []
        for _ in range(n):
            rng = random.Random(f"{self.seed}:{self.drawn}")  # a pure function of (seed, draw number)
            task = rng.choices(self.tasks, self.weights)[0]
            out.append(self.pool.states[rng.choice(self.pool.by_task[task])])
            self.drawn += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"drawn": self.drawn, "seed": self.seed}

    def load_state_dict(self, d: dict[str, int]) -> None:
        if d.get("seed", self.seed) != self.seed:
            raise ValueError(f"the checkpoint's sampler seed {d['seed']} differs from this run's {self.seed}")
        self.drawn = int(d["drawn"])
