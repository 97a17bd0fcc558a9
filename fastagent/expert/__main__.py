"""python -m fastagent.expert: make expert trajectories, resumable; summarise; export to ShareGPT.

    python -m fastagent.expert --out=runs/x/expert/expert.traj --episodes=100     # training tasks
    python -m fastagent.expert --out=runs/x/eval/heldout.traj --purpose=eval --episodes=22
    python -m fastagent.expert --out=runs/x/expert/expert.traj --summary           # just summarise
    python -m fastagent.expert --out=... --sharegpt=sft.json                       # also export

Flags of its own: --out (default <run_dir>/expert/expert.traj), --episodes (default
expert_episodes x number of tasks), --purpose=train|eval, --tasks (split or names; default
train_tasks, or eval_tasks for --purpose=eval), --summary, --sharegpt[=PATH]. Every other flag is a
Config field (--seed, --workers, --max_episode_steps, --history_k, --num_diverse_ideas, ...). A run
killed at any point restarts where it stopped when given the same command.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from fastagent.config import ConfigError, parse_args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if {"-h", "--help"} & set(argv):
        print(__doc__)
        return 0
    own: dict[str, str] = {}
    rest = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        if key in ("--out", "--episodes", "--purpose", "--tasks", "--summary", "--sharegpt"):
            own[key[2:]] = value if eq else ""
        else:
            rest.append(arg)
    try:
        cfg = parse_args(rest)
        episodes = int(own["episodes"]) if own.get("episodes") else None
        if episodes is not None and episodes < 0:
            raise ConfigError("--episodes must be >= 0")
        if own.get("purpose", "train") not in ("train", "eval"):
            raise ConfigError(f"--purpose must be train or eval, got {own['purpose']!r}")
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(own.get("out") or Path(cfg.run_dir) / "expert" / "expert.traj")
    from fastagent.data import export_sharegpt, read_records
    from fastagent.expert.generate import format_summary, generate_expert_data, summarize
    if "summary" in own:
        if not out.exists():
            print(f"error: {out} does not exist; run without --summary to make it", file=sys.stderr)
            return 2
        s = summarize(read_records(out))
        print(format_summary(s))
        print(json.dumps(s))
    else:
        try:
            generate_expert_data(cfg, out, episodes=episodes, purpose=own.get("purpose", "train"),
                                 tasks=own.get("tasks") or None)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    if "sharegpt" in own:
        path = Path(own["sharegpt"] or out.with_suffix(".sharegpt.json"))
        print(f"[expert] {export_sharegpt(read_records(out), path)} samples written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
