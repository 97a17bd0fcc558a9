"""Tests for the log-prob op and the fused lm_head + loss ops (kernels/logprob.py, fused_linear.py).

Liger style: the kernel in low precision and the reference in low precision are each compared with
the reference in fp32 (same rounded inputs), values and gradients, with tolerances per dtype; odd
shapes (N=1, N=37, V not a multiple of any block, many token chunks) and realistic vocabularies
(49152, 151936). The Triton kernels run on CPU under TRITON_INTERPRET=1 in a subprocess (the
variable must be set before triton is imported). `python -m pytest tests/test_logprob.py`.
"""

from __future__ import annotations

import importlib
import textwrap
import warnings

import pytest
import torch

from fastagent.kernels import (fused_linear_cross_entropy, fused_linear_cross_entropy_ref,
                               fused_linear_ppo_loss, fused_linear_ppo_loss_ref, logprob, logprob_ref)
from fastagent.kernels._cpp import try_load_cpp
from fastagent.kernels.ppo_loss import token_mean_weights
from _proc import run_triton_interpreted

LP = importlib.import_module("fastagent.kernels.logprob")  # the module (the package exports the op)

# max |actual - expected| <= TOL * max(|expected|, 1): per dtype, for values and gradients.
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}
BACKENDS = ["cpp", "torch"]  # CPU row passes; Triton runs in test_triton_interpreter


def _err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.float(), expected.float()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1.0)).item()


def _check3(kernel, ref_lp, ref32, dtype, what=""):
    """kernel (low precision) and reference (low precision) vs reference fp32, tensor by tensor."""
    for i, (k, r, r32) in enumerate(zip(kernel, ref_lp, ref32)):
        ek, er = _err(k, r32), _err(r, r32)
        assert ek <= TOL[dtype], f"{what}[{i}] kernel {dtype} vs fp32 reference: {ek:.2e}"
        # the kernel must not be much worse than the plain low-precision reference
        assert ek <= 2 * er + TOL[torch.float32], f"{what}[{i}] kernel {ek:.2e} vs reference {er:.2e}"


def _inputs(n, h, v, dtype, seed=0, ignore=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) * 3 * h ** -0.5).to(dtype)  # peaked rows, entropy ~5
    labels = torch.randint(0, v, (n,), generator=g)
    if ignore and n > 2:
        labels[1] = -100  # an ignored (prompt) token
    return hidden, weight, labels


def _logprob_run(fn, hidden, weight, labels, temperature, seed=1):
    """(logp, entropy, grad_hidden, grad_weight) for a random linear loss of logp and entropy."""
    g = torch.Generator().manual_seed(seed)
    a, b = (torch.randn(labels.shape, generator=g).to(labels.device) for _ in range(2))
    h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    logp, entropy = fn(h, w, labels, temperature)
    gh, gw = torch.autograd.grad((a * logp + b * entropy).sum(), (h, w))
    return logp.detach(), entropy.detach(), gh, gw


@pytest.fixture
def small_chunks(monkeypatch):
    """Force many token and vocabulary blocks (partial last ones) on small shapes."""
    monkeypatch.setitem(LP.CHUNK_ELEMENTS, "cpu", 5000)
    monkeypatch.setitem(LP.VOCAB_BLOCK, "cpu", 384)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,h,v,temperature", [(1, 16, 1000, 1.0), (37, 64, 1000, 0.7),
                                               (37, 32, 2500, 1.0), (5, 48, 1031, 1.3)])
def test_logprob_odd_shapes(backend, dtype, n, h, v, temperature, small_chunks, monkeypatch):
    monkeypatch.setenv("FASTAGENT_KERNELS", backend)
    hidden, weight, labels = _inputs(n, h, v, dtype)
    kernel = _logprob_run(logprob, hidden, weight, labels, temperature)
    ref_lp = _logprob_run(logprob_ref, hidden, weight, labels, temperature)
    ref32 = _logprob_run(logprob_ref, hidden.float(), weight.float(), labels, temperature)
    _check3(kernel, ref_lp, ref32, dtype, f"logprob {backend}")
    if n > 2:
        assert kernel[0][1] == 0  # ignored token: logp 0
    assert kernel[2].dtype == dtype and kernel[3].dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("v", [49152, 151936])
def test_logprob_realistic_vocab(dtype, v):
    hidden, weight, labels = _inputs(6, 64, v, dtype)
    kernel = _logprob_run(logprob, hidden, weight, labels, 1.0)
    ref_lp = _logprob_run(logprob_ref, hidden, weight, labels, 1.0)
    ref32 = _logprob_run(logprob_ref, hidden.float(), weight.float(), labels, 1.0)
    _check3(kernel, ref_lp, ref32, dtype, f"logprob V={v}")


def test_logprob_no_grad_batched_and_entropy_only():
    hidden, weight, labels = _inputs(12, 32, 700, torch.float32)
    with torch.no_grad():
        logp, entropy = logprob(hidden.view(3, 4, 32), weight, labels.view(3, 4))
    ref_logp, ref_ent = logprob_ref(hidden, weight, labels)
    assert logp.shape == (3, 4) and logp.dtype == torch.float32
    assert _err(logp.flatten(), ref_logp) < 1e-5 and _err(entropy.flatten(), ref_ent) < 1e-5
    # only entropy used: the logp gradient is absent, not garbage
    h = hidden.clone().requires_grad_()
    _, ent = logprob(h, weight, labels)
    (gh,) = torch.autograd.grad(ent.sum(), h)
    h2 = hidden.clone().requires_grad_()
    (gr,) = torch.autograd.grad(logprob_ref(h2, weight, labels)[1].sum(), h2)
    assert _err(gh, gr) < 1e-5


def test_strided_inputs():
    """Every other token of a batch: non-contiguous hidden rows and labels."""
    hidden, weight, labels = _inputs(20, 16, 500, torch.float32)
    h, y = hidden[::2], labels[::2]
    ref_logp, ref_ent = logprob_ref(h, weight, y)
    logp, ent = logprob(h, weight, y)
    assert _err(logp, ref_logp) < 1e-5 and _err(ent, ref_ent) < 1e-5
    loss = fused_linear_cross_entropy(h, weight.t().contiguous().t(), y)  # weight as a transpose view
    assert _err(loss, fused_linear_cross_entropy_ref(h, weight, y)) < 1e-5


# ---------------------------------------------------------------- fused cross-entropy
def _ce_run(fn, hidden, weight, labels, token_weight, temperature, freeze_weight=False):
    h = hidden.detach().requires_grad_()
    w = weight.detach().requires_grad_(not freeze_weight)
    loss = fn(h, w, labels, token_weight, temperature)
    grads = torch.autograd.grad(2.5 * loss, (h,) if freeze_weight else (h, w))  # grad_output 2.5
    return (loss.detach(), *grads)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,h,v,temperature", [(1, 16, 1000, 1.0), (37, 64, 2500, 0.8),
                                               (8, 64, 151936, 1.0)])
def test_fused_ce_vs_autograd(backend, dtype, n, h, v, temperature, small_chunks, monkeypatch):
    monkeypatch.setenv("FASTAGENT_KERNELS", backend)
    hidden, weight, labels = _inputs(n, h, v, dtype)
    tw = token_mean_weights(labels >= 0)
    kernel = _ce_run(fused_linear_cross_entropy, hidden, weight, labels, tw, temperature)
    ref_lp = _ce_run(fused_linear_cross_entropy_ref, hidden, weight, labels, tw, temperature)
    ref32 = _ce_run(fused_linear_cross_entropy_ref, hidden.float(), weight.float(), labels, tw,
                    temperature)
    _check3(kernel, ref_lp, ref32, dtype, f"fused CE {backend}")


def test_fused_ce_frozen_weight_mask_and_batch_dims(small_chunks):
    hidden, weight, labels = _inputs(24, 32, 1500, torch.float32)
    mask = torch.rand(24, generator=torch.Generator().manual_seed(3)) > 0.3  # bool mask: a sum
    kernel = _ce_run(fused_linear_cross_entropy, hidden, weight, labels, mask, 1.0, freeze_weight=True)
    ref = _ce_run(fused_linear_cross_entropy_ref, hidden, weight, labels, mask, 1.0, freeze_weight=True)
    assert _err(kernel[0], ref[0]) < 1e-5 and _err(kernel[1], ref[1]) < 1e-5
    h = hidden.view(4, 6, 32).requires_grad_()
    loss = fused_linear_cross_entropy(h, weight, labels.view(4, 6))  # no weights: plain sum
    loss.backward()
    assert h.grad.shape == (4, 6, 32) and not h.grad.requires_grad
    assert _err(loss, fused_linear_cross_entropy_ref(hidden, weight, labels)) < 1e-5
    with torch.no_grad():  # no-grad: the loss only
        assert _err(fused_linear_cross_entropy(hidden, weight, labels), loss.detach()) < 1e-6


# ---------------------------------------------------------------- fused PPO
PPO_CASES = [dict(clip_low=0.2, clip_high=0.28),
             dict(clip_low=0.2, clip_high=0.2, dual_clip=3.0, kl_coef=0.1, kl_estimator="k3",
                  entropy_coef=0.01, temperature=0.9),
             dict(clip_low=0.1, clip_high=0.3, kl_coef=0.05, kl_estimator="k1", entropy_coef=0.02)]


def _ppo_data(hidden, weight, labels, seed=5):
    """old/ref log-probs near the current ones (so some ratios clip), advantages of both signs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        logp, _ = logprob_ref(hidden.float(), weight.float(), labels)
    noise = torch.randn(3, labels.shape[0], generator=g).to(labels.device)
    old, ref, adv = logp + 0.3 * noise[0], logp + 0.2 * noise[1], noise[2]
    return old, adv, token_mean_weights(labels >= 0), ref


def _ppo_run(fn, hidden, weight, labels, data, kw):
    h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    old, adv, tw, ref = data
    loss, stats = fn(h, w, labels, old, adv, tw, ref, **kw)
    gh, gw = torch.autograd.grad(-1.5 * loss, (h, w))
    return loss.detach(), gh, gw, torch.stack(list(stats))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", range(len(PPO_CASES)))
def test_fused_ppo_vs_autograd(backend, dtype, case, small_chunks, monkeypatch):
    monkeypatch.setenv("FASTAGENT_KERNELS", backend)
    kw = PPO_CASES[case]
    hidden, weight, labels = _inputs(37, 64, 2500, dtype, seed=case)
    data = _ppo_data(hidden, weight, labels)
    kernel = _ppo_run(fused_linear_ppo_loss, hidden, weight, labels, data, kw)
    ref_lp = _ppo_run(fused_linear_ppo_loss_ref, hidden, weight, labels, data, kw)
    ref32 = _ppo_run(fused_linear_ppo_loss_ref, hidden.float(), weight.float(), labels, data, kw)
    _check3(kernel[:3], ref_lp[:3], ref32[:3], dtype, f"fused PPO {backend} case {case}")
    assert _err(kernel[3], ref32[3]) <= TOL[dtype] * 10  # stats (clip fractions jump with bf16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_ppo_extreme_log_ratios(backend, small_chunks, monkeypatch):
    """old / reference log-probs 100 nats off: finite loss and gradients (verl-style clamps, on by
    default), equal to the clamped autograd reference; with the clamps off the reference is not."""
    monkeypatch.setenv("FASTAGENT_KERNELS", backend)
    hidden, weight, labels = _inputs(37, 64, 2500, torch.float32, seed=3)
    old, adv, tw, ref = _ppo_data(hidden, weight, labels)
    old[:6] -= torch.tensor([100.0, -100.0, 100.0, -100.0, 25.0, -25.0])
    ref[6:12] += torch.tensor([100.0, -100.0, 100.0, -100.0, 15.0, -15.0])
    adv[:12] = torch.tensor([-1.0, 1.0] * 6)
    data = (old, adv, tw, ref)
    for kw in (PPO_CASES[1], dict(PPO_CASES[2], log_ratio_clamp=3.0, kl_clamp=None)):
        kernel = _ppo_run(fused_linear_ppo_loss, hidden, weight, labels, data, kw)
        ref32 = _ppo_run(fused_linear_ppo_loss_ref, hidden, weight, labels, data, kw)
        assert all(torch.isfinite(t).all() for t in kernel)
        for k, r in zip(kernel, ref32):
            assert _err(k, r) <= TOL[torch.float32]
    off = dict(PPO_CASES[1], log_ratio_clamp=None, kl_clamp=None)
    loss_off = fused_linear_ppo_loss_ref(hidden, weight, labels, old, adv, tw, ref, **off)[0]
    assert not torch.isfinite(loss_off)


def test_fused_ppo_realistic_vocab():
    hidden, weight, labels = _inputs(6, 64, 151936, torch.float32)
    data = _ppo_data(hidden, weight, labels)
    kw = PPO_CASES[1]
    kernel = _ppo_run(fused_linear_ppo_loss, hidden, weight, labels, data, kw)
    ref = _ppo_run(fused_linear_ppo_loss_ref, hidden, weight, labels, data, kw)
    for k, r in zip(kernel, ref):
        assert _err(k, r) <= TOL[torch.float32]


# ---------------------------------------------------------------- dispatch, errors, compile
def test_user_errors():
    hidden, weight, labels = _inputs(4, 8, 50, torch.float32)
    with pytest.raises(ValueError, match="temperature"):
        logprob(hidden, weight, labels, temperature=0.0)
    with pytest.raises(ValueError, match="labels must have shape"):
        logprob(hidden, weight, labels[:3])
    with pytest.raises(ValueError, match="share a float dtype"):
        fused_linear_cross_entropy(hidden, weight.double(), labels)
    with pytest.raises(ValueError, match="int64"):
        logprob(hidden, weight, labels.int())
    old, adv, tw, ref = _ppo_data(hidden, weight, labels)
    with pytest.raises(ValueError, match="needs ref_logp"):
        fused_linear_ppo_loss(hidden, weight, labels, old, adv, tw, None, kl_coef=0.1)
    with pytest.raises(ValueError, match="requires grad"):
        fused_linear_ppo_loss(hidden, weight, labels, old, adv.requires_grad_(), tw)
    with pytest.raises(ValueError, match="out of range"):  # every backend (test_labels_out_of_range)
        logprob(hidden, weight, torch.full((4,), 50))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("offset", [0, 5])
def test_labels_out_of_range(backend, offset, monkeypatch):
    """A label >= V raises ValueError on every row pass (torch and Triton used to read a wrong
    logp silently); labels < 0 (-1, -100) stay ignored tokens."""
    monkeypatch.setenv("FASTAGENT_KERNELS", backend)
    assert LP.row_pass(torch.device("cpu")).name == backend
    v = 50
    hidden, weight, labels = _inputs(6, 8, v, torch.float32)
    labels[3] = v + offset
    old, adv, tw, ref = _ppo_data(hidden, weight, labels.clamp(max=v - 1))
    calls = {"logprob": lambda y: logprob(hidden, weight, y),
             "fused CE": lambda y: fused_linear_cross_entropy(hidden.requires_grad_(), weight, y),
             "fused PPO": lambda y: fused_linear_ppo_loss(hidden, weight, y, old, adv, tw, ref)}
    for name, call in calls.items():
        with pytest.raises(ValueError, match=f"label {v + offset} out of range for vocabulary size {v}"):
            call(labels)
        ok = labels.clone()
        ok[3] = -1
        call(ok)  # negative labels are fine


def test_cpp_row_pass_still_checks_labels():
    """The C++ row pass keeps its own bounds check (it indexes the logits block with the label)."""
    ext = LP._cpp()
    logits, labels = torch.randn(3, 10), torch.tensor([0, 10, -100])
    state = LP.new_state(3, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="out of range"):
        ext.row_stats_(logits, labels, 0, 10, 1.0, *state)


def test_failed_cpp_build_warns_once_and_falls_back():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert try_load_cpp("fastagent_test_missing", ["does_not_exist.cpp"]) is None
        assert try_load_cpp("fastagent_test_missing", ["does_not_exist.cpp"]) is None
    assert len([w for w in caught if "falling back" in str(w.message)]) == 1


def test_row_pass_choice(monkeypatch):
    monkeypatch.setenv("FASTAGENT_KERNELS", "auto")
    assert LP.row_pass(torch.device("cpu")).name == "cpp"  # the C++ build works here
    monkeypatch.setenv("FASTAGENT_KERNELS", "bogus")
    with pytest.raises(ValueError):
        LP.row_pass(torch.device("cpu"))


def test_custom_op_registrations():
    """Schema, fake kernels (torch.compile tracing), autograd registration, AOT dispatch."""
    hidden, weight, labels = _inputs(5, 8, 30, torch.float32)
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    tw, lse, ent = torch.rand(5), torch.randn(5), torch.rand(5)
    cases = {
        "logprob": (h, w, labels, 0.9),
        "logprob_backward": (torch.randn(5), None, hidden.detach(), weight.detach(), labels, lse, ent,
                             1.0, True, True),
        "fused_linear_ce": (h, w, labels, tw, 0.9, True, True),
        "fused_linear_ppo": (h, w, labels, tw - 2, torch.randn(5), tw, None, 1.0, 0.2, 0.2, 0.0, 0.0,
                             "k3", 0.01, 20.0, 10.0, True, True),
    }
    for name, args in cases.items():
        utils = ("test_schema", "test_autograd_registration", "test_faketensor")
        if not name.startswith("fused"):  # the fused ops scale their saved grad outputs in place:
            utils += ("test_aot_dispatch_dynamic",)  # fine unless those outputs leave the graph
        result = torch.library.opcheck(getattr(torch.ops.fastagent, name).default, args,
                                       test_utils=utils)
        assert all(v == "SUCCESS" for v in result.values()), (name, result)


def test_fused_double_backward_raises_instead_of_scaling_twice():
    hidden, weight, labels = _inputs(6, 8, 40, torch.float32)
    h = hidden.requires_grad_()
    loss = fused_linear_cross_entropy(h, weight, labels)
    (g1,) = torch.autograd.grad(loss, h, retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        torch.autograd.grad(loss, h)


def test_torch_compile_fullgraph():
    hidden, weight, labels = _inputs(9, 16, 300, torch.float32)

    def f(h, w, y):
        logp, entropy = logprob(h, w, y, 0.9)
        return fused_linear_cross_entropy(h, w, y) + logp.sum() - 0.1 * entropy.sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out, grads = [], []
    for fn in (f, compiled):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = fn(h, w, labels)
        grads.append(torch.autograd.grad(loss, (h, w)))
        out.append(loss.detach())
    assert _err(out[1], out[0]) < 1e-6
    assert all(_err(a, b) < 1e-6 for a, b in zip(grads[1], grads[0]))


# ---------------------------------------------------------------- Triton on CUDA (GPU machines)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (no GPU here)")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,h,v,rows", [(1, 64, 1000, 20), (37, 128, 5003, 20),
                                        (256, 512, 152064, 64)])
def test_cuda_triton(dtype, n, h, v, rows, monkeypatch):
    monkeypatch.setitem(LP.CHUNK_ELEMENTS, "cuda", rows * v)  # several chunks, a partial last one
    assert LP.row_pass(torch.device("cuda")).name == "triton"
    hidden, weight, labels = (t.cuda() for t in _inputs(n, h, v, dtype))
    h32, w32 = hidden.float(), weight.float()
    args = (labels, 0.9)
    _check3(_logprob_run(logprob, hidden, weight, *args), _logprob_run(logprob_ref, hidden, weight, *args),
            _logprob_run(logprob_ref, h32, w32, *args), dtype, "cuda logprob")
    tw = token_mean_weights(labels >= 0)
    args = (labels, tw, 0.9)
    _check3(_ce_run(fused_linear_cross_entropy, hidden, weight, *args),
            _ce_run(fused_linear_cross_entropy_ref, hidden, weight, *args),
            _ce_run(fused_linear_cross_entropy_ref, h32, w32, *args), dtype, "cuda fused CE")
    data, kw = _ppo_data(hidden, weight, labels), PPO_CASES[1]
    args = (labels, data, kw)
    _check3(_ppo_run(fused_linear_ppo_loss, hidden, weight, *args)[:3],
            _ppo_run(fused_linear_ppo_loss_ref, hidden, weight, *args)[:3],
            _ppo_run(fused_linear_ppo_loss_ref, h32, w32, *args)[:3], dtype, "cuda fused PPO")


TRITON_SCRIPT = textwrap.dedent("""
    import importlib, torch
    from fastagent.kernels import *
    from fastagent.kernels.ppo_loss import token_mean_weights
    LP = importlib.import_module("fastagent.kernels.logprob")
    assert LP.row_pass(torch.device("cpu")).name == "triton"
    LP.CHUNK_ELEMENTS["cpu"] = 12000  # 2-row blocks; V=5000: vocab blocks of 4096 and 904
    LP.VOCAB_BLOCK["cpu"] = 4096
    torch.manual_seed(0)
    def err(a, b):
        return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1)).item()
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
        n, h, v = 5, 16, 5000
        hid = torch.randn(n, h).to(dtype); w = (torch.randn(v, h) * 0.7).to(dtype)
        y = torch.randint(0, v, (n,)); y[1] = -100
        a, b = torch.randn(n), torch.randn(n)
        outs = []
        for fn, (hh, ww) in ((logprob, (hid, w)), (logprob_ref, (hid.float(), w.float()))):
            hh, ww = hh.clone().requires_grad_(), ww.clone().requires_grad_()
            lp, ent = fn(hh, ww, y, 0.8)
            outs.append((lp, ent, *torch.autograd.grad((a * lp + b * ent).sum(), (hh, ww))))
        errs = [err(k, r) for k, r in zip(*outs)]
        assert max(errs) < tol, ("logprob", dtype, errs)
    LP.CHUNK_ELEMENTS["cpu"] = 900  # fused losses: whole rows, 3 per chunk
    hid, w = torch.randn(7, 16), torch.randn(300, 16) * 0.5
    y = torch.randint(0, 300, (7,)); y[2] = -100
    tw = token_mean_weights(y >= 0)
    with torch.no_grad():
        lp0, _ = logprob_ref(hid, w, y)
    old, adv, ref = lp0 + 0.3 * torch.randn(7), torch.randn(7), lp0 + 0.2 * torch.randn(7)
    kw = dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0, kl_coef=0.1, entropy_coef=0.01)
    for name, fn, rfn, args in (
            ("ce", fused_linear_cross_entropy, fused_linear_cross_entropy_ref, (tw,)),
            ("ppo", lambda *x: fused_linear_ppo_loss(*x, **kw)[0],
             lambda *x: fused_linear_ppo_loss_ref(*x, **kw)[0], (old, adv, tw, ref))):
        outs = []
        for f in (fn, rfn):
            hh, ww = hid.clone().requires_grad_(), w.clone().requires_grad_()
            loss = f(hh, ww, y, *args)
            outs.append((loss, *torch.autograd.grad(loss, (hh, ww))))
        errs = [err(k, r) for k, r in zip(*outs)]
        assert max(errs) < 1e-4, (name, errs)
    # far-off old / reference log-probs: clamped like the reference (finite loss and gradients)
    old2, ref2, adv2 = old.clone(), ref.clone(), adv.clone()
    old2[:2] -= torch.tensor([100.0, -100.0]); ref2[3:5] += torch.tensor([100.0, -100.0])
    adv2[:2] = torch.tensor([-1.0, 1.0])
    outs = []
    for f in (fused_linear_ppo_loss, fused_linear_ppo_loss_ref):
        hh, ww = hid.clone().requires_grad_(), w.clone().requires_grad_()
        loss = f(hh, ww, y, old2, adv2, tw, ref2, **kw)[0]
        outs.append((loss, *torch.autograd.grad(loss, (hh, ww))))
    assert all(torch.isfinite(t).all() for t in outs[0])
    errs = [err(k, r) for k, r in zip(*outs)]
    assert max(errs) < 1e-4, ("ppo extreme", errs)
    # labels >= V raise before any kernel runs (labels < 0 are ignored tokens)
    for bad in (300, 305):
        yb = y.clone(); yb[0] = bad
        for f in (lambda: logprob(hid, w, yb), lambda: fused_linear_cross_entropy(hid, w, yb, tw),
                  lambda: fused_linear_ppo_loss(hid, w, yb, old, adv, tw, ref, **kw)):
            try:
                f()
            except ValueError as exc:
                assert "out of range" in str(exc), exc
            else:
                raise AssertionError(f"label {bad} accepted")
    print("TRITON_OK")
""")


def test_triton_interpreter():
    run_triton_interpreted(TRITON_SCRIPT, FASTAGENT_KERNELS="triton")
