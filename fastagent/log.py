"""Logging: rank-0 printing, progress bars, metrics appended to JSONL (and TensorBoard when installed).

Use:
    from fastagent.log import print0, progress, Metrics
    metrics = Metrics("runs/x")              # appends runs/x/metrics.jsonl, one JSON object per line
    for step in progress(range(100), desc="sft"):
        metrics.log(step, loss=1.23, tokens_per_s=410.0)
    metrics.close()
Plots: `python -m fastagent.plot runs/x/metrics.jsonl` (see fastagent/plot.py).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable, TypeVar

T = TypeVar("T")


def rank() -> int:
    """This process's global rank (0 without torchrun), read from the environment torchrun sets."""
    return int(os.environ.get("RANK", "0"))


def print0(*args: Any, **kwargs: Any) -> None:
    """print() on rank 0 only, flushed (torchrun interleaves ranks' output otherwise)."""
    if rank() == 0:
        print(*args, **kwargs, flush=True)


def progress(it: Iterable[T], total: int | None = None, desc: str = "", unit: str = "it") -> Iterable[T]:
    """A tqdm progress bar on rank 0 (stderr); the bare iterable on other ranks."""
    if rank() != 0:
        return it
    from tqdm.auto import tqdm
    return tqdm(it, total=total, desc=desc, unit=unit, dynamic_ncols=True, mininterval=1.0)


def _clean(value: Any) -> Any:
    """JSON-safe scalars: tensors/numpy to float, NaN/inf to None (JSON has neither)."""
    if hasattr(value, "item"):
        value = value.item()  # host sync: callers pass already-reduced scalars
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class Metrics:
    """Appends one JSON line per `log()` to run_dir/metrics.jsonl, flushed at once so a crash loses
    nothing logged before it. Rank 0 writes; other ranks' calls are no-ops."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = False, filename: str = "metrics.jsonl"):
        self.path = Path(run_dir) / filename
        self.enabled = rank() == 0
        self.file = None
        self.tb = None
        self.t0 = time.time()
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(self.path.parent / "tb"))
            except ImportError:  # tensorboard is optional
                self.tb = None

    def log(self, step: int, **metrics: Any) -> dict[str, Any]:
        row = {"step": step, "time": round(time.time() - self.t0, 3)} | {k: _clean(v) for k, v in metrics.items()}
        if self.file:
            self.file.write(json.dumps(row) + "\n")
            if self.tb:
                for k, v in row.items():
                    if isinstance(v, (int, float)) and k not in ("step", "time"):
                        self.tb.add_scalar(k, v, step)
        return row

    def close(self) -> None:
        if self.file:
            self.file.close()
            self.file = None
        if self.tb:
            self.tb.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl file; a torn last line (crash mid-write) is skipped."""
    rows = []
    for n, line in enumerate(Path(path).read_text().splitlines()):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            print(f"{path}:{n + 1}: skipping an unreadable line", file=sys.stderr)
    return rows
