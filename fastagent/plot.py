"""Turn a metrics.jsonl file into PNG plots: one panel per metric against step.

Run:
    python -m fastagent.plot runs/cpu/metrics.jsonl            # writes runs/cpu/plots/*.png
    python -m fastagent.plot runs/cpu/metrics.jsonl -o out/ --keys loss,reward
Writes metrics.png (all panels in a grid) and one <metric>.png per metric.
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Plot a fastagent metrics.jsonl file to PNGs.")
    parser.add_argument("metrics", help="path to metrics.jsonl")
    parser.add_argument("-o", "--out", default=None, help="output folder (default: <run_dir>/plots)")
    parser.add_argument("--keys", default=None, help="comma-separated metric names (default: all)")
    args = parser.parse_args(argv)
    try:
        paths = plot(args.metrics, args.out, args.keys.split(",") if args.keys else None)
    except ValueError as e:
        parser.error(str(e))
    print("\n".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
