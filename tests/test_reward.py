"""The reward module alone: each kind's constant, the sigmoid score term, the seed-search options.

Run: .venv/bin/pytest tests/test_reward.py -q
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastagent.config import Config
from fastagent.reward import KINDS, RewardConfig, run_kind, sigmoid, step_reward


def test_constants_match_the_mission():
    cfg = RewardConfig()
    assert step_reward("format_error", cfg).value == -1.0
    assert step_reward("invalid_action", cfg).value == -1.0
    assert step_reward("corner_case", cfg).value == 0.0
    assert step_reward("no_score", cfg).value == 0.0


def test_score_term_is_the_papers_sigmoid():
    r = step_reward("score", metric_before=0.80, metric_after=0.85, alpha=20.0, sign=1)
    assert r.kind == "score" and r.value == pytest.approx(1 / (1 + math.exp(-20 * 0.05)))
    assert r.metric_before == 0.80 and r.metric_after == 0.85 and r.delta == pytest.approx(0.05)
    # lower is better: a drop in rmse is an improvement
    r = step_reward("score", metric_before=3.0, metric_after=2.0, alpha=1.0, sign=-1)
    assert r.value == pytest.approx(sigmoid(1.0)) and r.delta == pytest.approx(1.0)
    assert step_reward("score", metric_before=1.0, metric_after=1.0).value == 0.5


def test_settable_constants_and_from_config():
    cfg = RewardConfig.from_config(Config(reward_format_error=-2.0, reward_corner_case=-0.1, alpha_scale=2.0))
    assert step_reward("format_error", cfg).value == -2.0
    assert step_reward("corner_case", cfg).value == -0.1
    r = step_reward("score", cfg, metric_before=0.0, metric_after=0.5, alpha=1.0, sign=1)
    assert r.alpha == 2.0 and r.value == pytest.approx(sigmoid(1.0))


def test_best_baseline_and_centering_blunt_seed_search():
    # A re-roll that lands between the best and the last score: "last" pays above 0.5, "best" below.
    last = step_reward("score", metric_before=0.80, metric_after=0.82, best=0.85, alpha=10, sign=1)
    best = step_reward("score", RewardConfig(baseline="best"), metric_before=0.80, metric_after=0.82,
                       best=0.85, alpha=10, sign=1)
    assert last.value > 0.5 > best.value and best.baseline == 0.85
    centered = step_reward("score", RewardConfig(center=True), metric_before=0.8, metric_after=0.8)
    assert centered.value == 0.0


def test_breakdown_reports_every_part():
    d = step_reward("score", metric_before=1.0, metric_after=2.0, alpha=0.5, sign=1, reason="new score").as_dict()
    assert set(d) >= {"kind", "value", "metric_before", "metric_after", "baseline", "delta", "alpha", "sign", "reason"}


def test_run_causes_map_to_kinds():
    assert run_kind("ok") is None
    assert run_kind("error") == "invalid_action"
    assert run_kind("timeout") == run_kind("oom") == "corner_case"


def test_user_errors_raise_value_error():
    with pytest.raises(ValueError, match="unknown reward kind"):
        step_reward("great")
    with pytest.raises(ValueError, match="sign"):
        step_reward("score", metric_before=0, metric_after=1, sign=0)
    with pytest.raises(ValueError, match="baseline"):
        RewardConfig(baseline="median")
    with pytest.raises(ValueError, match="cause"):
        run_kind("exploded")


def test_non_finite_score_is_invalid():
    r = step_reward("score", metric_before=0.5, metric_after=float("nan"))
    assert r.kind == "invalid_action" and r.value == -1.0


@given(m=st.floats(-1e6, 1e6), m2=st.floats(-1e6, 1e6), alpha=st.floats(1e-3, 1e3), sign=st.sampled_from([1, -1]))
def test_score_is_bounded_and_monotone(m, m2, alpha, sign):
    r = step_reward("score", metric_before=m, metric_after=m2, alpha=alpha, sign=sign)
    assert r.kind in KINDS and 0.0 <= r.value <= 1.0
    better = step_reward("score", metric_before=m, metric_after=m2 + sign * 1.0, alpha=alpha, sign=sign)
    assert better.value >= r.value
