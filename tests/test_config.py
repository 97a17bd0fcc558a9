"""Config: presets, --field=value overrides, TOML files, and errors that name the field."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields

import pytest

from fastagent.config import PRESETS, Config, ConfigError, parse_args


def test_default_is_cpu_preset_with_smollm2():
    cfg = parse_args([])
    assert cfg.model == "smollm2-135m-instruct" and cfg == PRESETS["cpu"]()


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_validate(name):
    cfg = parse_args([f"--preset={name}"])
    assert isinstance(cfg, Config)


def test_overrides_are_typed():
    cfg = parse_args(["--preset=smoke", "--seed=7", "--rl_lr=3e-6", "--tensorboard=true", "--run-dir=/tmp/x",
                      "--grad_checkpointing"])
    assert (cfg.seed, cfg.rl_lr, cfg.tensorboard, cfg.run_dir, cfg.grad_checkpointing) == (7, 3e-6, True, "/tmp/x", True)


def test_toml_then_cli(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('seed = 3\nmodel = "tiny-random"\n[rl]\nrl_steps = 5\nclip_high = 0.3\n')
    cfg = parse_args([f"--config={f}", "--seed=4"])
    assert (cfg.seed, cfg.model, cfg.rl_steps, cfg.clip_high) == (4, "tiny-random", 5, 0.3)


@pytest.mark.parametrize("argv, message", [
    (["--rl_lrr=1e-5"], "unknown config field 'rl_lrr'; did you mean 'rl_lr'"),
    (["--seed=abc"], "config field 'seed' must be of type int, got 'abc'"),
    (["--seed=1.5"], "config field 'seed' must be of type int"),
    (["--tensorboard=maybe"], "config field 'tensorboard' must be of type bool"),
    (["--preset=smok"], "unknown preset 'smok'; did you mean 'smoke'"),
    (["--stage=rll"], "config field 'stage' must be one of sft, rl, eval, all; got 'rll'; did you mean 'rl'"),
    (["--workers=0"], "config field 'workers' must be >= 1"),
    (["--batch_size=6", "--micro_batch_size=4"], "batch_size (6) must be a multiple of micro_batch_size (4)"),
    (["seed=1"], "unexpected argument 'seed=1': use --field=value"),
    (["--seed"], "argument --seed needs a value"),
    (["--config=/nonexistent.toml"], "config file /nonexistent.toml does not exist"),
])
def test_errors_name_the_field(argv, message):
    with pytest.raises(ConfigError) as e:
        parse_args(argv)
    assert message in str(e.value)


def test_bad_toml_field_and_syntax(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("sede = 3\n")
    with pytest.raises(ConfigError, match="unknown config field 'sede'; did you mean 'seed'"):
        parse_args([f"--config={f}"])
    f.write_text("seed = = 3\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        parse_args([f"--config={f}"])
    f.write_text('seed = "three"\n')
    with pytest.raises(ConfigError, match="'seed' must be of type int, got 'three'"):
        parse_args([f"--config={f}"])


def test_train_cli_reports_config_error_without_traceback():
    out = subprocess.run([sys.executable, "fastagent/train.py", "--rl_lrr=1"], capture_output=True, text=True)
    assert out.returncode == 2
    assert "did you mean 'rl_lr'" in out.stderr and "Traceback" not in out.stderr


def test_help_lists_every_field_and_the_environment(capsys):
    from fastagent.config import ENV_VARS
    from fastagent.train import main
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for f in fields(Config):
        assert f"--{f.name}=" in out, f.name
    assert all(name in out for name in ENV_VARS) and "FASTAGENT_TASK_DIRS" in out
