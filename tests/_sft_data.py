"""Realistic expert trajectories for the SFT tests and the train benchmark (bench/suite_train.py).

Prompts are built exactly as the policy sees them (fastagent.actions.build_messages over the bundled
tasks' descriptions, last history_k steps, the actions that need no helper model); responses are
agent turns in the MLAgentBench format (Reflection ... Action Input JSON) that list, inspect, run
and edit the task's real starter script. Deterministic for a seed.

    records = expert_records(["digits", "car-mpg"], episodes=2, seed=0)
    write_records(records, tmp_path / "expert.traj")
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from fastagent.actions import ACTIONS, Turn, build_messages
from fastagent.data import StepRecord, TrajectoryWriter
from fastagent.tasks import get_task

NAMES = [n for n, s in ACTIONS.items() if not s.needs_helper]


def _turn(reflection: str, plan: str, fact: str, thought: str, action: str, args: dict) -> str:
    return (f"Reflection: {reflection}\nResearch Plan and Status: {plan}\nFact Check: {fact}\n"
            f"Thought: {thought}\nAction: {action}\nAction Input: {json.dumps(args)}")


def _episode(task, rng: random.Random) -> list[tuple[str, str]]:
    """(response, observation) pairs of one scripted episode on task."""
    lines = (task.dir / "train.py").read_text().splitlines()
    base = rng.uniform(0.55, 0.8)
    better = min(0.99, base + rng.uniform(0.02, 0.15))
    metric = task.metric
    edit_at = max(1, min(len(lines), rng.randint(len(lines) // 3, max(len(lines) // 3, len(lines) - 2))))
    new = rng.choice(["model = LogisticRegression(max_iter=500, C=0.5)",
                      "model = GradientBoostingRegressor(n_estimators=300, learning_rate=0.05)",
                      "model = RandomForestClassifier(n_estimators=400, min_samples_leaf=2)"])
    plan = "1. Look at the files. 2. Run the starter for a baseline. 3. Improve the model. 4. Submit."
    numbered = "\n".join(f"{i + 1}: {x}" for i, x in enumerate(lines[:40]))
    return [
        (_turn("Nothing has happened yet; I need to see the workspace.", plan + " Status: starting.",
               "Nothing is confirmed yet.", "List the files first.", "List Files", {"dir_path": "."}),
         "data/\ntrain.py\n"),
        (_turn("The workspace holds train.py and a data folder.", plan + " Status: 1 done.",
               "The file list is confirmed by the observation.", "Read the starter script.",
               "Inspect Script Lines", {"script_name": "train.py", "start_line_number": 1,
                                        "end_line_number": min(40, len(lines))}),
         f"Here are the lines (the file ends at line {len(lines)}):\n{numbered}"),
        (_turn("The starter fits a weak model and writes submission.csv.", plan + " Status: 1 done, 2 next.",
               "The script content is confirmed.", "Run it to measure the baseline.",
               "Execute Script", {"script_name": "train.py"}),
         f"The script has been executed. Here is the output:\nvalidation {metric}: {base:.4f}\n"),
        (_turn(f"The baseline {metric} is {base:.4f}.", plan + f" Status: baseline {base:.4f}; 3 in progress.",
               f"{base:.4f} is confirmed by the output.", "Replace the model with a stronger one.",
               "Edit Script Segment", {"script_name": "train.py", "start_line_number": edit_at,
                                       "end_line_number": edit_at, "new_content": new}),
         f"The edited file is saved to train.py. Here is the diff:\n-{lines[edit_at - 1]}\n+{new}\n"),
        (_turn("The edit replaced the model line.", plan + " Status: 3 in progress, re-running.",
               "The diff is confirmed; the score is not yet.", "Run the edited script.",
               "Execute Script", {"script_name": "train.py"}),
         f"The script has been executed. Here is the output:\nvalidation {metric}: {better:.4f}\n"),
        (_turn(f"The new model scores {better:.4f} against {base:.4f}.", plan + " Status: all done.",
               "Both scores are confirmed by outputs.", "The improvement holds; finish.",
               "Final Answer", {"final_answer": f"Stronger model: {metric} {base:.4f} -> {better:.4f}."}),
         ""),
    ]


def expert_records(tasks: list[str], episodes: int = 2, seed: int = 0, history_k: int = 3) -> list[StepRecord]:
    """Records of `episodes` scripted episodes per task, prompts windowed to history_k steps."""
    rng = random.Random(seed)
    records = []
    for name in tasks:
        task = get_task(name)
        for e in range(episodes):
            history: list[Turn] = []
            for step, (response, obs) in enumerate(_episode(task, rng)):
                prompt = build_messages(task.description, history, k=history_k, names=NAMES)
                records.append(StepRecord(task=name, episode=f"{name}-{e}", step=step, prompt=prompt,
                                          response=response, observation=obs))
                history.append(Turn(response, obs))
    return records


def write_records(records: list[StepRecord], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with TrajectoryWriter(path) as w:
        w.extend(records)
    return path
