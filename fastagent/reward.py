"""The agentic ML reward module (ML-Agent, MISSION.md): one scalar per agent step, every part reported.

Usable alone, by any RL stack: it imports nothing from fastagent and needs only the standard library.

    from fastagent.reward import RewardConfig, step_reward
    cfg = RewardConfig()                                     # the constants below, all settable
    r = step_reward("score", cfg, metric_before=0.80, metric_after=0.85, alpha=20.0, sign=+1)
    r.value        # sigmoid(20 * +1 * (0.85 - 0.80)) = 0.731...
    r.as_dict()    # kind, value, metric_before, metric_after, baseline, delta, alpha, sign, reason

Kinds and values (MISSION.md; the paper publishes the shape, not the constants):
    format_error    -1   no parsable action, unknown action, missing/unknown/ill-typed arguments
    invalid_action  -1   the action fails: missing file, path outside the workspace, the agent's
                         script exits with an error, the submission it wrote is malformed
    corner_case      0   not the agent's fault: time limit, out of memory, helper model unreachable
    no_score         0   valid action without a new score (list, inspect, edit, understand, a run
                         whose submission is missing or byte-identical to the last scored one)
    score            sigmoid(alpha * s * (m' - m)), s = +1 if higher is better else -1, alpha the
                         task's scale times `alpha_scale`

The metric m' must come from a trusted evaluator on hidden answers (fastagent.tasks.score_submission),
never from what the agent's script prints. This module only does the arithmetic.

Seed-search reward hacking (a reviewer concern). With m = the last score, re-running a noisy script
with new seeds pays about sigmoid(0) = 0.5 per run on average, more than any other action, so a
policy can learn to re-roll instead of improving. Two settable defences, off by default so the
default is the paper's formula:
  - baseline="best": compare m' with the best score so far in the episode, so a lucky draw raises
    the bar and later re-rolls mostly pay below 0.5;
  - center=True: subtract sigmoid(0) = 0.5, so an unchanged metric pays 0 and a regression is
    negative (the sign of the reward then says whether the step helped).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

KINDS = ("format_error", "invalid_action", "corner_case", "no_score", "score")
# Result.cause (fastagent.sandbox) -> reward kind for a script run; "ok" needs a score to decide.
CAUSE_KIND = {"timeout": "corner_case", "oom": "corner_case", "killed": "corner_case",
              "error": "invalid_action"}


@dataclass(frozen=True)
class RewardConfig:
    """The reward constants. Mirrors the reward fields of fastagent.config.Config."""
    format_error: float = -1.0  # no parsable action / unknown action / bad arguments
    invalid_action: float = -1.0  # failing action: missing file, script crash, malformed submission
    corner_case: float = 0.0  # not the agent's fault: time limit, out of memory
    no_score: float = 0.0  # valid action that produces no new score
    alpha_scale: float = 1.0  # multiplies every task's alpha
    baseline: str = "last"  # last | best: which earlier score m' is compared with
    center: bool = False  # subtract 0.5 from the score term (unchanged metric -> 0)

    def __post_init__(self) -> None:
        if self.baseline not in ("last", "best"):
            raise ValueError(f"RewardConfig.baseline must be 'last' or 'best', got {self.baseline!r}")
        if not math.isfinite(self.alpha_scale) or self.alpha_scale <= 0:
            raise ValueError(f"RewardConfig.alpha_scale must be a positive number, got {self.alpha_scale!r}")

    @classmethod
    def from_config(cls, cfg: Any, **overrides: Any) -> "RewardConfig":
        """Build from any object with fastagent Config's reward_* and alpha_scale attributes."""
        values = dict(format_error=cfg.reward_format_error, invalid_action=cfg.reward_invalid_action,
                      corner_case=cfg.reward_corner_case, no_score=cfg.reward_no_score,
                      alpha_scale=cfg.alpha_scale)
        for field, name in (("baseline", "reward_baseline"), ("center", "reward_center")):
            if hasattr(cfg, name):
                values[field] = getattr(cfg, name)
        values.update(overrides)
        return cls(**values)


@dataclass(frozen=True)
class RewardBreakdown:
    """One step's reward and everything it was computed from."""
    kind: str  # one of KINDS
    value: float  # the scalar reward
    metric_before: float | None = None  # m: the last score before this step
    metric_after: float | None = None  # m': the new score (kind == "score" only)
    baseline: float | None = None  # what m' was compared with (m, or the best so far)
    delta: float | None = None  # s * (m' - baseline): positive means better
    alpha: float | None = None  # effective alpha (task alpha * alpha_scale)
    sign: int | None = None  # +1 higher is better, -1 lower is better
    reason: str = ""  # a short human-readable cause

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def sigmoid(x: float) -> float:
    """A logistic function that never overflows."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def score_reward(metric_after: float, baseline: float, alpha: float, sign: int) -> float:
    """The paper's score term sigmoid(alpha * s * (m' - m))."""
    return sigmoid(alpha * sign * (metric_after - baseline))


def step_reward(kind: str, cfg: RewardConfig = RewardConfig(), *, metric_before: float | None = None,
                metric_after: float | None = None, best: float | None = None, alpha: float = 1.0,
                sign: int = 1, reason: str = "") -> RewardBreakdown:
    """The reward of one step of the given kind.

    For kind "score", pass metric_before (m), metric_after (m'), the task's alpha and sign, and, for
    cfg.baseline == "best", the best score so far in the episode (None: use metric_before).
    A non-finite m' (the evaluator returned nan/inf) counts as an invalid action.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown reward kind {kind!r}; expected one of {', '.join(KINDS)}")
    if kind != "score":
        value = {"format_error": cfg.format_error, "invalid_action": cfg.invalid_action,
                 "corner_case": cfg.corner_case, "no_score": cfg.no_score}[kind]
        return RewardBreakdown(kind, float(value), metric_before=metric_before, reason=reason)
    if sign not in (1, -1):
        raise ValueError(f"sign must be +1 (higher is better) or -1 (lower is better), got {sign!r}")
    if metric_after is None or metric_before is None:
        raise ValueError("kind 'score' needs metric_before and metric_after")
    if not math.isfinite(metric_after):
        return RewardBreakdown("invalid_action", float(cfg.invalid_action), metric_before=metric_before,
                               metric_after=metric_after, reason=reason or "evaluator returned a non-finite score")
    base = metric_before
    if cfg.baseline == "best" and best is not None:
        base = max(best, metric_before) if sign > 0 else min(best, metric_before)
    eff_alpha = alpha * cfg.alpha_scale
    value = score_reward(metric_after, base, eff_alpha, sign) - (0.5 if cfg.center else 0.0)
    return RewardBreakdown("score", value, metric_before=metric_before, metric_after=metric_after,
                           baseline=base, delta=sign * (metric_after - base), alpha=eff_alpha, sign=sign,
                           reason=reason)


def run_kind(cause: str) -> str | None:
    """Reward kind of a script run from its sandbox Result.cause; None for "ok" (score decides)."""
    if cause == "ok":
        return None
    if cause not in CAUSE_KIND:
        raise ValueError(f"unknown run cause {cause!r}; expected ok, {', '.join(CAUSE_KIND)}")
    return CAUSE_KIND[cause]
