"""bench/gpu_check.sh --dry-run: every import and call of the GPU check, run here on CPU.

The GPU machine is borrowed rarely (15 minutes a session), so a broken check must fail here first.
The dry run calls the same benchmark functions with device="cpu", tiny shapes and TRITON_INTERPRET=1
(the Triton kernels run in Triton's interpreter) and collects the CUDA test selection. Like the GPU
machine, the interpreter used sees the installed packages but not the fastagent install, so the
script's overlay for fastagent.kernels is exercised too. `python -m pytest tests/test_gpu_check.py`
(~45 s on 2 busy cores).
"""

from __future__ import annotations

import importlib.util
import json
import os
import site
import subprocess
import sys
from pathlib import Path

import pytest

from fastagent.kernels._cpp import cache_dir

ROOT = Path(__file__).resolve().parent.parent


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _python_without_install(tmp_path: Path) -> str:
    """A venv whose site-packages is this interpreter's, added as a plain path: torch and triton
    import, the editable fastagent install (a finder started by a .pth file there) does not."""
    venv = tmp_path / "venv"
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    inner = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import site; print(site.getsitepackages()[0])"],
                           capture_output=True, text=True, check=True).stdout.strip()
    (Path(inner) / "outer_site.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return str(venv / "bin" / "python")


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    env = dict(os.environ, PYTHON=_python_without_install(tmp_path), FASTAGENT_CACHE=str(cache_dir()))
    env.pop("PYTHONPATH", None)
    env.pop("FASTAGENT_KERNELS", None)
    out = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    log = out.stdout + out.stderr[-4000:]
    assert out.returncode == 0 and "gpu_check: PASS" in out.stdout, log
    lm, kb = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]

    sk, b = _bench("suite_kernels"), _bench("_kernels_b")
    assert lm["row_pass"] == "triton", lm  # the Triton row passes ran, in the interpreter
    assert not [k for k in lm if k.endswith("_error") and "liger" not in k], lm
    for t in sk.DRY_SHAPES["tokens"]:
        assert lm[f"T{t}_logprob_err"] <= sk.TOL["bfloat16"]
        for name in (*sk.VARIANTS, "matmul_floor"):
            assert lm[f"T{t}_{name}_ms"] > 0 and lm[f"T{t}_{name}_peak_mb"] >= 0, (t, name, lm)
        assert f"T{t}_fused_ce_over_naive_time" in lm and f"T{t}_fused_ppo_over_naive_ppo_mem" in lm
    for dtype in ("bfloat16", "float32"):
        assert lm[f"row_stats_gbs_{dtype}"] > 0 and lm[f"row_grad_gbs_{dtype}"] > 0, lm

    for B, T in b.GAE_DRY:
        assert kb[f"gae_gpu_{B}x{T}_us"] > 0 and kb[f"gae_gpu_{B}x{T}_gbs"] > 0, kb
    assert f"gae_gpu_{b.GAE_DRY[0][0]}x{b.GAE_DRY[0][1]}_speedup_vs_loop" in kb
    for n in b.PPO_DRY:
        assert kb[f"ppo_gpu_{n}_fwd_gbs"] > 0 and kb[f"ppo_gpu_{n}_fused_fwd_bwd_us"] > 0, kb
        assert f"ppo_gpu_{n}_speedup" in kb and f"ppo_gpu_{n}_mem_ratio" in kb

    rl = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("rl_gpu "))[len("rl_gpu "):])
    assert rl["rc"] == 0 and rl["rl_steps"] == 2 and rl["eval_table"], rl
    assert rl["step1_rl_update_s"] > 0 and rl["step2_rl_logp_gap"] < 1e-4, rl
