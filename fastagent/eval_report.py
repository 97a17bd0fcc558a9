"""The evaluation's report: summary statistics, the Table 1 markdown, results.json and the PNG charts,
plus MLE-bench leaderboard medals. fastagent/eval.py plays the episodes and calls write_report.

    summary = summarize(results, specs, tasks)      # per agent and task; held-out / held-in means
    write_report(summary, results, out_dir)         # table.md, results.json, gain_by_task.png, score_over_steps.png
    medal_thresholds(leaderboard_scores, "max")     # {"gold", "silver", "bronze", "median"}
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any


def rel_gain(score: float, starter: float, sign: int) -> float | None:
    """s * (score - starter) / |starter|; None when the starter scored 0 (no scale to compare with)."""
    return sign * (score - starter) / abs(starter) if starter != 0 else None


def write_json(path: Path, obj: Any) -> None:
    """Atomic: a reader (or a rerun after a kill) sees the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------- MLE-bench leaderboards

def read_leaderboard(task: Any) -> list[float] | None:
    """The scores of an MLE-bench task's leaderboard.csv (best team first), or None without one."""
    board = Path(task.dir) / "leaderboard.csv"
    if task.split != "mlebench" or not board.is_file():
        return None
    import pandas as pd
    df = pd.read_csv(board)
    col = next((c for c in ("score", "scoreNullable") if c in df.columns), None)
    scores = df[col].dropna().astype(float).tolist() if col else []
    return scores or None


def medal_thresholds(scores: list[float], direction: str) -> dict[str, float]:
    """Kaggle's medal thresholds for a leaderboard, as MLE-bench applies them (by the number of teams N):
    N < 100: gold top 10%, silver top 20%, bronze top 40%; 100 <= N < 250: gold top 10 teams, silver 20%,
    bronze 40%; 250 <= N < 1000: gold top 10 + 0.2% N, silver top 50, bronze top 100; N >= 1000: gold top
    10 + 0.2% N, silver top 5%, bronze top 10%. A threshold is the score of the team at that position;
    a score reaching it (>= where higher is better, <= where lower) earns the medal. Also the median."""
    n = len(scores)
    if n == 0:
        raise ValueError("an empty leaderboard has no medal thresholds")
    ranked = sorted(scores, reverse=direction == "max")

    def at(position: int) -> float:
        return ranked[min(max(position, 1), n) - 1]
    if n < 100:
        pos = (int(n * 0.1), int(n * 0.2), int(n * 0.4))
    elif n < 250:
        pos = (10, int(n * 0.2), int(n * 0.4))
    elif n < 1000:
        pos = (10 + int(n * 0.002), 50, 100)
    else:
        pos = (10 + int(n * 0.002), int(n * 0.05), int(n * 0.1))
    mid = sorted(scores)
    median = (mid[(n - 1) // 2] + mid[n // 2]) / 2
    return {"gold": at(pos[0]), "silver": at(pos[1]), "bronze": at(pos[2]), "median": median}


def medal_shares(finals: list[float], scores: list[float], direction: str) -> dict[str, float]:
    """Share of final scores strictly above the median and at each medal threshold (or better)."""
    th = medal_thresholds(scores, direction)
    s = 1 if direction == "max" else -1
    n = max(len(finals), 1)
    out = {"above_median": sum(s * (f - th["median"]) > 0 for f in finals) / n}
    for medal in ("gold", "silver", "bronze"):
        out[medal] = sum(s * (f - th[medal]) >= 0 for f in finals) / n
    out["any_medal"] = out["bronze"]
    return out


# ---------------------------------------------------------------- summary, table, plots

def _mean(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def summarize(results: list[dict[str, Any]], specs: list, tasks: list) -> dict[str, Any]:
    """Per agent and task: avg / best final score, relative gains, beat-starter share, valid-action rate,
    steps, wall time, tokens (and medals); per agent: the mean relative gain held-out and held-in."""
    out: dict[str, Any] = {"agents": {}, "tasks": {t.name: {"split": t.split, "metric": t.metric,
                                                            "direction": t.direction} for t in tasks}}
    for spec in specs:
        per_task = {}
        for t in tasks:
            eps = [r for r in results if r["agent"] == spec.name and r["task"] == t.name]
            finals = [r["final"] for r in eps]
            steps = sum(r["steps"] for r in eps)
            best = max(finals, key=lambda f: t.sign * f)
            starter = _mean([r["starter"] for r in eps])
            row = {"episodes": len(eps), "starter": starter, "avg": _mean(finals), "best": best,
                   "avg_gain": _mean([r["gain"] for r in eps]), "best_gain": rel_gain(best, starter, t.sign),
                   "beat_starter": _mean([float(r["beat_starter"]) for r in eps]),
                   "valid_rate": sum(r["valid"] for r in eps) / steps if steps else None,
                   "execute_rate": sum(r["executed"] for r in eps) / steps if steps else None,
                   "steps": _mean([r["steps"] for r in eps]), "wall_s": _mean([r["wall_s"] for r in eps]),
                   "tokens": _mean([r["tokens"] for r in eps]) if all(r["tokens"] is not None for r in eps) else None,
                   "ends": dict(Counter(r["end"] for r in eps))}
            board = read_leaderboard(t)
            if board:
                row["leaderboard"] = medal_shares(finals, board, t.direction)
            per_task[t.name] = row
        overall = {}
        for group, members in (("heldout", [t for t in tasks if t.split != "train"]),
                               ("heldin", [t for t in tasks if t.split == "train"])):
            if members:
                overall[group] = {"avg_gain": _mean([per_task[t.name]["avg_gain"] for t in members]),
                                  "best_gain": _mean([per_task[t.name]["best_gain"] for t in members]),
                                  "beat_starter": _mean([per_task[t.name]["beat_starter"] for t in members]),
                                  "tasks": len(members)}
        out["agents"][spec.name] = {**asdict(spec), "tasks": per_task, "overall": overall}
    return out


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:+.1%}"


def _share(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def format_table(summary: dict[str, Any]) -> str:
    """Markdown: Table 1 (tasks x agents, avg / best final score; mean relative gain rows), then details."""
    agents, tasks = summary["agents"], summary["tasks"]
    names = list(agents)
    head = ["task", "metric", "starter"] + [f"{a} {c}" for a in names for c in ("avg", "best")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t, meta in tasks.items():
        arrow = "↑" if meta["direction"] == "max" else "↓"
        first = agents[names[0]]["tasks"][t]
        cells = [t + ("" if meta["split"] != "train" else " (held-in)"), f"{meta['metric']} {arrow}", _num(first["starter"])]
        cells += [_num(agents[a]["tasks"][t][c]) for a in names for c in ("avg", "best")]
        lines.append("| " + " | ".join(cells) + " |")
    for group, label in (("heldout", "relative gain, held-out"), ("heldin", "relative gain, held-in")):
        if group in agents[names[0]]["overall"]:
            cells = [f"**{label}**", "", ""] + [_pct(agents[a]["overall"][group][c]) for a in names
                                                 for c in ("avg_gain", "best_gain")]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| agent | episodes | beat starter | valid actions | executed | steps/episode | wall s/episode "
                  "| tokens/episode | ends |", "|---|---|---|---|---|---|---|---|---|"]
    for a in names:
        rows = list(agents[a]["tasks"].values())
        eps = sum(r["episodes"] for r in rows)

        def w(key: str) -> float | None:  # episode-weighted mean over tasks
            vals = [(r[key], r["episodes"]) for r in rows if r[key] is not None]
            return sum(v * n for v, n in vals) / sum(n for _, n in vals) if vals else None
        ends = Counter()
        for r in rows:
            ends.update(r["ends"])
        lines.append(f"| {a} | {eps} | {_share(w('beat_starter'))} | {_share(w('valid_rate'))} | "
                     f"{_share(w('execute_rate'))} | {_num(w('steps'))} | {_num(w('wall_s'))} | "
                     f"{_num(w('tokens'))} | {', '.join(f'{k} {v}' for k, v in ends.most_common())} |")
    boards = [(a, t, r["leaderboard"]) for a in names for t, r in agents[a]["tasks"].items() if "leaderboard" in r]
    if boards:
        lines += ["", "| agent | task | above median | gold | silver | bronze |", "|---|---|---|---|---|---|"]
        lines += [f"| {a} | {t} | {b['above_median']:.0%} | {b['gold']:.0%} | {b['silver']:.0%} | {b['bronze']:.0%} |"
                  for a, t, b in boards]
    return "\n".join(lines) + "\n"


def write_report(summary: dict[str, Any], results: list[dict[str, Any]], out_dir: Path) -> None:
    table = format_table(summary)
    (out_dir / "table.md").write_text(table)
    write_json(out_dir / "results.json", {"summary": summary,
                                           "episodes": [{k: v for k, v in r.items() if k != "turns"} for r in results]})
    plot_results(summary, results, out_dir)


def plot_results(summary: dict[str, Any], results: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """gain_by_task.png: avg relative gain per task, agents side by side (best as dots);
    score_over_steps.png: mean relative gain of the standing submission after each step, per agent."""
    import matplotlib
    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt
    agents, tasks = summary["agents"], list(summary["tasks"])
    width = 0.8 / max(len(agents), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(tasks) * max(1, len(agents)) ** 0.5 + 2), 4))
    for i, (name, a) in enumerate(agents.items()):
        xs = [j + (i - (len(agents) - 1) / 2) * width for j in range(len(tasks))]
        avg = [100 * (a["tasks"][t]["avg_gain"] or 0.0) for t in tasks]
        best = [100 * (a["tasks"][t]["best_gain"] or 0.0) for t in tasks]
        ax.bar(xs, avg, width, label=name)
        ax.plot(xs, best, "k.", markersize=4)
    ax.axhline(0, color="gray", linewidth=0.8)
    ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("relative gain over starter (%)")
    ax.set_title("avg relative gain per task (bars), best episode (dots)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    paths = [out_dir / "gain_by_task.png"]
    fig.savefig(paths[0], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name in agents:
        curves = []
        for r in results:
            if r["agent"] != name or r["starter"] == 0:
                continue
            sign = 1 if r["direction"] == "max" else -1
            curves.append([0.0] + [100 * rel_gain(m, r["starter"], sign) for m in r["curve"]])
        if not curves:
            continue
        n = max(len(c) for c in curves)
        padded = [c + [c[-1]] * (n - len(c)) for c in curves]  # an ended episode keeps its final score
        ax.plot(range(n), [sum(c[s] for c in padded) / len(padded) for s in range(n)], marker=".", label=name)
    ax.axhline(0, color="gray", linewidth=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("mean relative gain (%)")
    ax.set_title("standing submission's score over steps")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out_dir / "score_over_steps.png")
    fig.savefig(paths[1], dpi=100)
    plt.close(fig)
    return paths
