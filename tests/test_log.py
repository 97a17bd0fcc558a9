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


def test_rl_dashboard(tmp_path):
    """The RL page: one PNG from the rows that hold rl_reward_mean (a missing value, e.g. no re-runs
    that step, is a gap, not an error); a metrics file without RL rows says what to run."""
    import json

    import pytest

    from fastagent.plot import moving_average, rl_dashboard
    assert moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 1, "sft_loss": 1.0}] + [
        {"step": s, "rl_reward_mean": -0.5 + 0.1 * s, "rl_kind_format_error": 0.5, "rl_kind_score": 0.5,
         "rl_format_error_rate": 0.5, "rl_reward_rerun": None if s == 2 else -1.0, "rl_generate_s": 3.0,
         "rl_update_s": 5.0, "rl_logp_gap": 1e-6} for s in (1, 2, 3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = rl_dashboard(path)
    assert out == tmp_path / "plots" / "rl_curves.png" and out.stat().st_size > 10_000
    path.write_text(json.dumps(rows[0]) + "\n")
    with pytest.raises(ValueError, match="no RL rows"):
        rl_dashboard(path)
