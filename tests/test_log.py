"""Metrics JSONL logging and the plot command."""

from __future__ import annotations

import math
import subprocess
import sys

import torch

from fastagent.log import Metrics, read_metrics
from fastagent.plot import plot


def test_metrics_jsonl_and_plots(tmp_path):
    m = Metrics(tmp_path)
    for step in range(20):
        m.log(step, loss=torch.tensor(2.0 - 0.05 * step), reward=math.sin(step), note="text is kept", bad=float("nan"))
    m.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 20, "loss": 1.')  # a crash mid-line
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert len(rows) == 20 and abs(rows[3]["loss"] - 1.85) < 1e-6 and rows[0]["bad"] is None and rows[0]["note"] == "text is kept"
    paths = plot(tmp_path / "metrics.jsonl")
    assert {p.name for p in paths} == {"metrics.png", "loss.png", "reward.png"}
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def test_plot_cli_errors_clearly(tmp_path):
    out = subprocess.run([sys.executable, "-m", "fastagent.plot", str(tmp_path / "none.jsonl")],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "does not exist" in out.stderr
