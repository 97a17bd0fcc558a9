"""One Config dataclass for every stage, presets as plain functions, `--field=value` overrides.

Use:
    cfg = parse_args(["--preset=smoke", "--rl_lr=1e-6"])     # from a command line
    cfg = parse_args(["--config=run.toml", "--seed=3"])      # TOML file, then overrides
    cfg = replace(smoke(), seed=3)                           # in code

Order of application: preset (default `cpu`), then the TOML file's keys, then `--field=value` flags.
Unknown or ill-typed fields raise `ConfigError` naming the field and the closest valid name.
"""

from __future__ import annotations

import difflib
import sys
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable


class ConfigError(ValueError):
    """A user error in a config file or command line: says which field and what to do."""


@dataclass
class Config:
    # --- run ---
    stage: str = "all"  # sft | rl | eval | all (sft, rl, then eval): which stages train.py runs
    run_dir: str = "runs/default"  # checkpoints, metrics.jsonl, plots, trajectories
    seed: int = 0  # seeds torch, numpy, python and the generation engine
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    # --- model ---
    model: str = "smollm2-135m-instruct"  # built-in name (smollm2-135m-instruct, tiny-random) or a HF folder
    cache_dir: str = "~/.cache/fastagent"  # converted models, compiled C++ kernels
    max_seq_len: int = 2048  # prompt + response tokens; longer prompts are left-truncated
    grad_checkpointing: bool = False  # recompute activations in backward (for long contexts)
    # --- tasks and environment ---
    train_tasks: str = "train"  # split name (train | heldout | all) or comma-separated task names
    eval_tasks: str = "heldout"  # the same, for evaluation
    workers: int = 2  # sandbox pool processes running agent code
    step_timeout_s: float = 60.0  # wall-clock limit for one Execute Script
    step_memory_mb: int = 4096  # address-space limit for one Execute Script
    max_episode_steps: int = 12  # agent turns per full episode (expert runs, evaluation)
    history_k: int = 3  # past steps shown in every prompt: expert data, SFT, RL and evaluation alike
    max_obs_chars: int = 4000  # characters of each past observation kept in prompts (the middle is cut)
    helper_model: str = "policy"  # Edit Script (AI) / Understand File: policy | http://host/v1 (OpenAI-compatible)
    # --- expert trajectories (exploration-enriched SFT data) ---
    expert: str = "scripted"  # scripted | http://host/v1 (OpenAI-compatible teacher)
    teacher_model: str = "default"  # model name sent to an OpenAI-compatible teacher endpoint
    expert_data: str = ""  # a trajectory file to train SFT on (empty: generate into run_dir/expert/)
    num_ideas: int = 100  # candidate improvement ideas generated per task
    num_diverse_ideas: int = 10  # ideas kept per task by embedding distance
    expert_episodes: int = 8  # expert episodes per training task
    # --- SFT ---
    sft_lr: float = 2e-5  # peak learning rate, cosine decay
    sft_epochs: int = 2  # passes over the expert trajectories
    sft_max_steps: int = 0  # stop SFT after this many optimizer steps (0: run every epoch)
    batch_size: int = 64  # sequences per optimizer step (global, over ranks and accumulation)
    micro_batch_size: int = 4  # sequences per forward/backward per rank
    warmup_ratio: float = 0.03  # fraction of optimizer steps with linear warmup
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # max global grad norm (0 disables)
    # --- step-wise RL ---
    rl_steps: int = 100  # PPO iterations
    rl_mode: str = "step"  # step (single actions from expert states, the paper's) | episode (whole episodes
    #                        of up to max_episode_steps turns from the task's start, GAE over the turns)
    states_per_step: int = 16  # expert states sampled per iteration
    samples_per_state: int = 4  # actions sampled per state (the group for the group baseline)
    ppo_epochs: int = 1  # passes over each rollout batch
    share_prefix: str = "auto"  # the K samples of a state in the update: kv (the prompt's own forward, the
    #   completions in one masked row on its KV cache; auto with sdpa) | mask (one masked row) | off (a row each)
    rl_lr: float = 1e-6  # policy learning rate
    critic_lr: float = 1e-5  # value head learning rate (PPO with critic)
    advantage: str = "gae"  # gae (PPO with a critic, the paper's) | group (critic-free group baseline)
    gamma: float = 1.0  # discount (one action per sample: 1.0 is the paper's setting)
    lam: float = 1.0  # GAE lambda (step-wise: one action per sample; gamma = lam = 1 makes A_t = R - V_t)
    clip_low: float = 0.2  # PPO ratio clip below 1
    clip_high: float = 0.28  # PPO ratio clip above 1 (clip-higher)
    dual_clip: float = 3.0  # dual-clip bound for negative advantages (0 disables)
    kl_coef: float = 0.0  # KL penalty to the reference policy
    entropy_coef: float = 0.0  # entropy bonus
    value_clip: float = 0.2  # value loss clip range
    # --- generation ---
    engine: str = "auto"  # auto (vllm if installed, else hf) | vllm | hf
    temperature: float = 1.0  # sampling temperature for RL rollouts
    top_p: float = 1.0  # nucleus sampling for RL rollouts
    max_new_tokens: int = 512  # tokens per agent turn
    # --- evaluation ---
    eval_episodes: int = 8  # full episodes per task and agent (the paper's 8)
    eval_max_steps: int = 0  # agent turns per evaluation episode (0: max_episode_steps)
    eval_time_limit_s: float = 3600.0  # wall clock per evaluation episode: a turn starts only if one as long as the last fits
    eval_temperature: float = 1.0  # sampling temperature of evaluated models (0: greedy, then one episode suffices)
    # --- reward module (MISSION.md; constants are the paper's where published) ---
    reward_format_error: float = -1.0  # no parsable action, unknown action, bad arguments
    reward_invalid_action: float = -1.0  # action fails: missing file, agent script crashes
    reward_corner_case: float = 0.0  # not the agent's fault: time limit, out of memory
    reward_no_score: float = 0.0  # valid action that produces no new score
    alpha_scale: float = 1.0  # multiplies every task's alpha in sigmoid(alpha * s * (m' - m))
    reward_baseline: str = "last"  # last | best: the earlier score a new one is compared with ("best": a
    # re-run that reaches an old best by luck earns nothing)
    reward_center: bool = False  # subtract 0.5 from the score term, so an unchanged metric pays 0
    # --- logging and checkpoints ---
    log_every: int = 1  # optimizer steps between metric lines
    save_every: int = 50  # optimizer steps between checkpoints (0: only at the end)
    tensorboard: bool = True  # also write TensorBoard events when tensorboard is installed


def smoke() -> Config:
    """Tiny random model, two tasks, a few steps: seconds, for tests."""
    # max_seq_len 4096: the tiny byte-level tokenizer makes agent prompts 2,000-3,200 tokens long; SFT
    # drops (never cuts) longer samples
    return Config(model="tiny-random", run_dir="runs/smoke", max_seq_len=4096, workers=1,
                  step_timeout_s=30.0, max_episode_steps=4, num_ideas=8, num_diverse_ideas=3,
                  expert_episodes=1, sft_epochs=1, batch_size=2, micro_batch_size=2, rl_steps=2,
                  states_per_step=2, samples_per_state=2, max_new_tokens=64, rl_lr=1e-4, advantage="group",
                  sft_lr=1e-4, save_every=0, tensorboard=False, eval_episodes=1, eval_max_steps=2)


def cpu() -> Config:
    """SmolLM2-135M-Instruct on a 2-core CPU machine: the default."""
    # Sized so the whole main job fits ~60 min on 2 cores. Measured from a fresh clone, 2026-12-02: 53.1 min
    # (63 min on 2026-12-01 with 5 RL steps and the masked-row update): setup ~3 min; expert data 17 s (10
    # episodes, 105 samples); SFT 18.7 min (27 steps of 4 samples, ~1,700 tokens each, 165 training tokens/s);
    # RL 14.7 min: 4 steps of 4 states x 4 samples (generate 83-124 s, update 81-144 s); eval 15 min (below).
    return Config(run_dir="runs/cpu", max_seq_len=2560, history_k=1, max_obs_chars=1500, expert_episodes=1,
                  sft_epochs=1, batch_size=4, micro_batch_size=2, sft_lr=1e-4, rl_steps=4, states_per_step=4,
                  samples_per_state=4, max_new_tokens=640,  # expert turns: median 262 tokens, max ~550
                  rl_lr=2e-6, advantage="group",  # a critic would double the update's cost on 2 cores
                  # eval: 3 models x 11 held-out tasks x 1 episode of <= 5 turns, batched (prompts ~1,700
                  # tokens): 276-314 s per model (3 turns), capped by the 5-min wall limit; 911 s in all
                  eval_episodes=1, eval_max_steps=5, eval_time_limit_s=300.0)


def qwen2_5_7b() -> Config:
    """The paper's scale: Qwen2.5-7B, full fine-tune, bf16, 8 GPUs."""
    return Config(model="Qwen/Qwen2.5-7B", run_dir="runs/qwen2.5-7b", device="cuda", dtype="bf16",
                  max_seq_len=15360, grad_checkpointing=True, workers=16, step_timeout_s=1800.0,
                  step_memory_mb=65536, max_episode_steps=15, num_ideas=100, num_diverse_ideas=10,
                  expert_episodes=64, sft_lr=2e-5, sft_epochs=2, batch_size=64, micro_batch_size=1,
                  rl_steps=200, states_per_step=64, samples_per_state=4, max_new_tokens=2048)


PRESETS: dict[str, Callable[[], Config]] = {"smoke": smoke, "cpu": cpu, "qwen2.5-7b": qwen2_5_7b}
_TYPES = {"str": str, "int": int, "float": float, "bool": bool}
FIELD_TYPES: dict[str, type] = {f.name: _TYPES[f.type] for f in fields(Config)}  # annotations are strings


def _closest(name: str, options) -> str:
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.0)
    return f"; did you mean '{match[0]}'?" if match else ""


def coerce(name: str, value: Any) -> Any:
    """Convert a string (CLI) or TOML value to the type of field `name`, or raise ConfigError."""
    if name not in FIELD_TYPES:
        raise ConfigError(f"unknown config field '{name}'{_closest(name, FIELD_TYPES)} "
                          f"(see fastagent/config.py for every field)")
    typ = FIELD_TYPES[name]
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
    elif typ is int and not isinstance(value, bool):
        try:
            if isinstance(value, int) or (isinstance(value, str) and value.strip().lstrip("+-").isdigit()):
                return int(value)
        except ValueError:
            pass
    elif typ is float and not isinstance(value, bool):
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    elif typ is str and isinstance(value, str):
        return value
    raise ConfigError(f"config field '{name}' must be of type {typ.__name__}, got {value!r}")


def apply(cfg: Config, overrides: dict[str, Any]) -> Config:
    """Return a copy of cfg with overrides applied (values coerced to the field types)."""
    return replace(cfg, **{k: coerce(k, v) for k, v in overrides.items()})


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file of config fields; nested tables are flattened (their keys must be fields)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    flat: dict[str, Any] = {}
    for key, value in data.items():
        flat.update(value if isinstance(value, dict) else {key: value})
    return flat


ENV_VARS = {  # what the environment (not the Config) sets; shown by --help
    "FASTAGENT_TASK_DIRS": "extra task folders (os.pathsep-separated; each a parent of task folders or a task "
                           "folder): they join the bundled suite (see fastagent/tasks/README.md)",
    "FASTAGENT_CACHE": "where converted models and C++ kernel builds are cached (default ~/.cache/fastagent)",
    "FASTAGENT_KERNELS": "torch | cpp | triton: force one backend for the log-prob and fused lm_head ops",
}


def usage() -> str:
    """The --help text: every field with its default and comment (read from this file), the
    presets and the environment variables."""
    import inspect
    lines = ["usage: torchrun [--nproc_per_node=N] fastagent/train.py [--preset=NAME] [--config=FILE.toml] "
             "[--field=value ...]", "", f"presets: {', '.join(PRESETS)} (default cpu)", "", "fields:"]
    for line in inspect.getsource(Config).splitlines()[2:]:
        line = line.strip()
        if line.startswith("# ---"):
            lines.append(f"  {line[2:]}")
        elif ":" in line and "=" in line:
            decl, _, comment = line.partition("  #")
            name, _, default = decl.partition("=")
            flag = f"  --{name.split(':')[0].strip()}={default.strip()}"
            lines.append(f"{flag:<44} {comment.strip()}")
    lines += ["", "environment:"] + [f"  {k}: {v}" for k, v in ENV_VARS.items()]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> Config:
    """Build a Config from `--preset=NAME`, `--config=FILE.toml` and `--field=value` arguments."""
    argv = sys.argv[1:] if argv is None else argv
    preset, toml_path, overrides = "cpu", None, {}
    for arg in argv:
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: use --field=value (e.g. --seed=1)")
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if not eq:  # a bare --flag sets a boolean field
            if FIELD_TYPES.get(key) is not bool:
                raise ConfigError(f"argument --{key} needs a value: --{key}=VALUE"
                                  + ("" if key in FIELD_TYPES or key in ("preset", "config")
                                     else _closest(key, FIELD_TYPES)))
            value = "true"
        if key == "preset":
            if value not in PRESETS:
                raise ConfigError(f"unknown preset '{value}'{_closest(value, PRESETS)} "
                                  f"(presets: {', '.join(PRESETS)})")
            preset = value
        elif key == "config":
            toml_path = value
        else:
            overrides[key] = value
    cfg = PRESETS[preset]()
    if toml_path:
        cfg = apply(cfg, load_toml(toml_path))
    cfg = apply(cfg, overrides)
    validate(cfg)
    return cfg


CHOICES = {"stage": ("sft", "rl", "eval", "all"), "device": ("auto", "cpu", "cuda"),
           "dtype": ("auto", "fp32", "bf16"), "advantage": ("gae", "group"), "rl_mode": ("step", "episode"),
           "reward_baseline": ("last", "best"), "engine": ("auto", "vllm", "hf"),
           "share_prefix": ("auto", "kv", "mask", "off")}


def validate(cfg: Config) -> None:
    """Check choices and ranges that a type alone cannot; raise ConfigError naming the field."""
    for name, options in CHOICES.items():
        value = getattr(cfg, name)
        if value not in options:
            raise ConfigError(f"config field '{name}' must be one of {', '.join(options)}; "
                              f"got '{value}'{_closest(value, options)}")
    for name in ("workers", "micro_batch_size", "batch_size", "max_seq_len", "max_new_tokens",
                 "samples_per_state", "states_per_step", "ppo_epochs", "max_episode_steps", "eval_episodes"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"config field '{name}' must be >= 1, got {getattr(cfg, name)}")
    if cfg.eval_max_steps < 0 or not cfg.eval_time_limit_s > 0 or cfg.eval_temperature < 0:
        raise ConfigError(f"eval_max_steps must be >= 0 (0: max_episode_steps), eval_time_limit_s > 0 and "
                          f"eval_temperature >= 0; got {cfg.eval_max_steps}, {cfg.eval_time_limit_s}, "
                          f"{cfg.eval_temperature}")
    if cfg.batch_size % cfg.micro_batch_size:
        raise ConfigError(f"batch_size ({cfg.batch_size}) must be a multiple of micro_batch_size "
                          f"({cfg.micro_batch_size})")
