"""Turn a metrics.jsonl file into PNG plots: one panel per metric against step.

Run:
    python -m fastagent.plot runs/cpu/metrics.jsonl            # writes runs/cpu/plots/*.png
    python -m fastagent.plot runs/cpu/metrics.jsonl -o out/ --keys loss,reward
    python -m fastagent.plot runs/cpu/metrics.jsonl --rl        # also rl_curves.png: the RL dashboard
Writes metrics.png (all panels in a grid) and one <metric>.png per metric; --rl adds rl_curves.png, the
RL stage on one page (reward with its moving average, reward kinds, format errors, reward by action, KL,
entropy, clip fraction, train/inference log-prob gap, time per phase).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from fastagent.log import read_metrics


def series(rows: list[dict], keys: list[str] | None = None) -> dict[str, tuple[list, list]]:
    """{metric: (steps, values)} for every numeric metric (or the given keys)."""
    out: dict[str, tuple[list, list]] = {}
    for row in rows:
        for k, v in row.items():
            if k in ("step", "time") or not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            if keys and k not in keys:
                continue
            xs, ys = out.setdefault(k, ([], []))
            xs.append(row.get("step", len(xs)))
            ys.append(v)
    return out


def plot(metrics_path: str | Path, out_dir: str | Path | None = None, keys: list[str] | None = None) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    metrics_path = Path(metrics_path)
    if not metrics_path.is_file():
        raise ValueError(f"{metrics_path} does not exist; pass the metrics.jsonl a run wrote")
    data = series(read_metrics(metrics_path), keys)
    if not data:
        raise ValueError(f"{metrics_path} has no numeric metrics" + (f" named {keys}" if keys else ""))
    out_dir = Path(out_dir) if out_dir else metrics_path.parent / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    cols = min(3, len(data))
    rows = math.ceil(len(data) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.2 * rows), squeeze=False)
    for ax, (name, (xs, ys)) in zip(axes.flat, data.items()):
        ax.plot(xs, ys, marker="." if len(xs) < 50 else None)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(data):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out_dir / "metrics.png", dpi=100)
    plt.close(fig)
    written.append(out_dir / "metrics.png")
    for name, (xs, ys) in data.items():
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(xs, ys)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out_dir / f"{name.replace('/', '_')}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def moving_average(ys: list[float], window: int) -> list[float]:
    """Mean of the last `window` values at each point (fewer at the start)."""
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y - (ys[i - window] if i >= window else 0.0)
        out.append(acc / min(i + 1, window))
    return out


def rl_dashboard(metrics_path: str | Path, out: str | Path | None = None, window: int = 5) -> Path:
    """One PNG of the RL stage's curves from a run's metrics.jsonl (the rows that have rl_reward_mean)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    metrics_path = Path(metrics_path)
    rows = [r for r in read_metrics(metrics_path) if "rl_reward_mean" in r] if metrics_path.is_file() else []
    if not rows:
        raise ValueError(f"{metrics_path} has no RL rows (rl_reward_mean): run --stage=rl first")
    steps = [r["step"] for r in rows]
    get = lambda k: [r.get(k) if r.get(k) is not None else math.nan for r in rows]  # noqa: E731
    keys = sorted({k for r in rows for k in r})
    fig, axes = plt.subplots(3, 3, figsize=(16, 11))
    ax = axes[0, 0]
    ax.plot(steps, get("rl_reward_mean"), ".", alpha=0.5, label="per step")
    ax.plot(steps, moving_average(get("rl_reward_mean"), window), label=f"mean of last {window}")
    ax.set_title("mean step reward")
    ax.legend()
    ax = axes[0, 1]
    kinds = [k for k in keys if k.startswith("rl_kind_")]
    ax.stackplot(steps, *[get(k) for k in kinds], labels=[k[len("rl_kind_"):] for k in kinds], alpha=0.8)
    ax.set_title("reward kinds (share of samples)")
    ax.legend(fontsize=7, loc="lower left")
    ax = axes[0, 2]
    for k in ("rl_format_error_rate", "rl_invalid_action_rate", "rl_rerun_share"):
        ax.plot(steps, moving_average(get(k), window), label=k[len("rl_"):])
    ax.set_title(f"failure rates (mean of last {window})")
    ax.legend(fontsize=8)
    ax = axes[1, 0]
    for k in [k for k in keys if k.startswith("rl_reward_action_")]:
        ax.plot(steps, get(k), ".-", ms=3, label=k[len("rl_reward_action_"):])
    ax.set_title("mean reward by action")
    ax.legend(fontsize=7)
    for ax, (title, ks) in zip([axes[1, 1], axes[1, 2], axes[2, 0], axes[2, 1]],
                               [("KL (approx) to the behaviour policy", ["rl_approx_kl", "rl_kl"]),
                                ("entropy of the sampled tokens", ["rl_entropy"]),
                                ("clip fraction", ["rl_clip_frac"]),
                                ("|trainer - engine| log-prob gap", ["rl_logp_gap"])]):
        for k in ks:
            if k in keys:
                ax.plot(steps, get(k), ".-", ms=3, label=k[len("rl_"):])
        ax.set_title(title)
        ax.legend(fontsize=8)
    ax = axes[2, 2]
    phases = [k for k in ("rl_generate_s", "rl_execute_s", "rl_advantages_s", "rl_update_s", "rl_sync_s") if k in keys]
    ax.stackplot(steps, *[get(k) for k in phases], labels=[k[3:-2] for k in phases], alpha=0.8)
    ax.set_title("seconds per phase")
    ax.legend(fontsize=8, loc="upper left")
    for a in axes.flat:
        a.set_xlabel("RL step")
        a.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(out) if out else metrics_path.parent / "plots" / "rl_curves.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Plot a fastagent metrics.jsonl file to PNGs.")
    parser.add_argument("metrics", help="path to metrics.jsonl")
    parser.add_argument("-o", "--out", default=None, help="output folder (default: <run_dir>/plots)")
    parser.add_argument("--keys", default=None, help="comma-separated metric names (default: all)")
    parser.add_argument("--rl", action="store_true", help="also rl_curves.png: the RL stage on one page")
    args = parser.parse_args(argv)
    try:
        paths = plot(args.metrics, args.out, args.keys.split(",") if args.keys else None)
        if args.rl:
            paths.append(rl_dashboard(args.metrics, Path(args.out) / "rl_curves.png" if args.out else None))
    except ValueError as e:
        parser.error(str(e))
    print("\n".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
