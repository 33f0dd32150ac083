"""The fused CPU kernels (`model/fused_kernels.cpp`, loaded by `model/kernels.py`) against the
PyTorch operations they replace, and the fallback where they cannot be built."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from seqserve.model import kernels
from seqserve.model.loss import label_smoothed_nll_sum
from seqserve.model.training_pass import attention_backward, attention_bias, attention_forward
from seqserve.model.transformer import Transformer
from seqserve.runtime.config import ModelConfig

DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(scope="module")
def ops():  # noqa: ANN201
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler here: training uses PyTorch operations (tested elsewhere)")
    loaded = kernels.load()
    assert loaded is not None, f"the fused kernels did not build: {kernels.unavailable()}"
    return loaded


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """Equal to fp32 rounding, or to bf16 rounding of the largest value for bf16 outputs."""
    scale = expected.abs().max().item()
    tol = 1e-5 if dtype == torch.float32 else 2 ** -7
    torch.testing.assert_close(actual.float(), expected.float(), atol=tol * scale, rtol=0)


# -- the loss ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_loss_and_gradient_match_cross_entropy(ops, dtype: torch.dtype) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    logits = (torch.randn(300, 77) * 4).to(dtype)
    logits[5, 3] = 60.0  # a row whose other targets have probabilities far below 1e-30
    target = torch.randint(1, 77, (300,))
    target[::7] = 0  # padding
    target[5] = 4

    def loss_and_grad(fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
        x = logits.clone().requires_grad_()
        with kernels.switched(fused):
            loss = label_smoothed_nll_sum(x, target, smoothing=0.1, ignore_index=0)
        (loss * 0.37).backward()
        return loss.detach(), x.grad

    reference = F.cross_entropy(logits.float(), target, ignore_index=0, label_smoothing=0.1, reduction="sum")
    loss, grad = loss_and_grad(True)
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-4)
    assert grad.dtype == dtype
    plain_loss, plain_grad = loss_and_grad(False)
    torch.testing.assert_close(loss, plain_loss, rtol=1e-5, atol=1e-4)
    _close(grad, plain_grad, dtype)
    assert not grad[::7].any()  # padding gets no gradient


def test_loss_names_a_target_outside_the_vocabulary(ops) -> None:  # noqa: ANN001
    with pytest.raises(RuntimeError, match="outside the vocabulary"):
        ops.smoothed_loss_forward(torch.zeros(3, 5), torch.tensor([1, 5, 2]), 0.1, 0)


# -- attention -----------------------------------------------------------------------------------

def _attention_inputs(t: int, s: int, causal: bool, dtype: torch.dtype):  # noqa: ANN202
    torch.manual_seed(t * 100 + s)
    q = torch.randn(3, 4, t, 16).to(dtype)
    k, v = torch.randn(3, 4, s, 16).to(dtype), torch.randn(3, 4, s, 16).to(dtype)
    keys = torch.ones(3, s, dtype=torch.bool)
    keys[1, s // 2:] = False  # padded keys
    mask = keys[:, None, None, :]
    if causal:
        mask = mask & torch.ones(t, s, dtype=torch.bool).tril()
    elif t > 1:
        mask = mask.expand(3, 1, t, s).clone()
        mask[2, 0, 1] = False  # a fully masked query: uniform weights, as in `attend`
    return q, k, v, attention_bias(mask)


# key lengths that take each path of the kernel: one, two or four vectors of registers, and longer
@pytest.mark.parametrize("t,s,causal", [(5, 5, True), (12, 12, True), (7, 20, False), (40, 40, True),
                                        (3, 41, False), (100, 100, True), (1, 130, False)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_forward_and_backward_match_torch_ops(ops, t: int, s: int, causal: bool,  # noqa: ANN001
                                                        dtype: torch.dtype) -> None:
    q, k, v, bias = _attention_inputs(t, s, causal, dtype)
    out, weights = attention_forward(q, k, v, bias, 0.0, ops)
    plain_out, plain = attention_forward(q, k, v, bias, 0.0)
    assert weights.low is not None and weights.low.dtype == dtype
    torch.testing.assert_close(weights.p, plain.p, atol=1e-6, rtol=1e-5)
    _close(out, plain_out, dtype)
    if not causal and t > 1:
        torch.testing.assert_close(out[2, :, 1].float(), v[2].float().mean(dim=1), atol=1e-2, rtol=0)

    grad = torch.randn(out.shape).to(dtype)
    for got, expected in zip(attention_backward(grad, q, k, v, weights, ops),
                             attention_backward(grad, q, k, v, plain)):
        assert got.dtype == dtype
        _close(got, expected, dtype)


def test_attention_with_dropout_or_per_head_bias_uses_torch_ops(ops) -> None:  # noqa: ANN001
    q, k, v, bias = _attention_inputs(5, 6, False, torch.float32)
    assert attention_forward(q, k, v, bias, 0.1, ops)[1].low is None
    assert attention_forward(q, k, v, bias.expand(3, 4, 5, 6), 0.0, ops)[1].low is None


# -- head layouts --------------------------------------------------------------------------------

def test_rows_contiguous_copies_any_view_with_contiguous_rows(ops) -> None:  # noqa: ANN001
    y = torch.randn(6, 5, 3, 4, 32).bfloat16()
    views = [y.permute(2, 0, 3, 1, 4), y.permute(1, 3, 0, 2, 4), y[:, 1:4].transpose(0, 1), y[..., :7],
             torch.randn(5, 7, 3, 33).permute(2, 0, 1, 3), torch.randn(4, 6, 70, dtype=torch.float64).transpose(0, 1),
             torch.randn(9), torch.empty(0, 3, 4).transpose(0, 1)]
    for view in views:
        copy = ops.rows_contiguous(view)
        assert copy.is_contiguous() and torch.equal(copy, view.contiguous())
    with pytest.raises(RuntimeError, match="last is contiguous"):
        ops.rows_contiguous(torch.randn(4, 5).t())


# -- residual add and layer norm -----------------------------------------------------------------

@pytest.mark.parametrize("d", [128, 100, 40])  # whole vectors, and rows ending in a part of one
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threads", [1, 2])
def test_add_layer_norm_and_backward_match_torch_ops(ops, d: int, dtype: torch.dtype, threads: int) -> None:  # noqa: ANN001
    torch.manual_seed(d)
    n = 700  # rows in several tasks, so that two threads each sum part of the weights' gradients
    x, sub = (torch.randn(n, d) * 3 + 1).to(dtype), torch.randn(n, d).to(dtype)
    weight, bias = torch.randn(d), torch.randn(d)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y, s, mean, rstd = ops.add_layer_norm(x, sub, weight, bias, 1e-5)
        g, g2 = torch.randn(n, d).to(dtype), torch.randn(n, d).to(dtype)
        gx, gw, gb = ops.layer_norm_backward(g, g2, s, mean, rstd, weight)
        gx_one, _, gb_one = ops.layer_norm_backward(g, None, s, mean, rstd, weight)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(s, x + sub)  # the sum rounded as an eager add rounds it
    y_ref, mean_ref, rstd_ref = torch.native_layer_norm(s, (d,), weight, bias, 1e-5)
    _close(y, y_ref, dtype)
    torch.testing.assert_close(mean, mean_ref.view(-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rstd, rstd_ref.view(-1), atol=1e-5, rtol=1e-4)

    leaf = s.float().requires_grad_()
    w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    F.layer_norm(leaf, (d,), w, b, 1e-5).backward(g.float() + g2.float())
    _close(gx, leaf.grad, dtype)
    torch.testing.assert_close(gw, w.grad, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(gb, b.grad, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(gb_one, g.float().sum(0), atol=1e-3, rtol=1e-4)
    assert not torch.equal(gx_one, gx)  # the second gradient counts


# -- the whole training pass ---------------------------------------------------------------------

class _Counting:
    """The kernels, counting the calls made to each."""

    def __init__(self, ops) -> None:  # noqa: ANN001
        self.ops, self.calls = ops, Counter()

    def __getattr__(self, name: str):  # noqa: ANN204
        def call(*args):  # noqa: ANN002, ANN202
            self.calls[name] += 1
            return getattr(self.ops, name)(*args)
        return call


@pytest.mark.parametrize("dtype", DTYPES)
def test_training_step_with_kernels_matches_torch_ops(ops, dtype: torch.dtype,  # noqa: ANN001
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    counting, real_get = _Counting(ops), kernels.get
    monkeypatch.setattr(kernels, "get", lambda device, dt: None if real_get(device, dt) is None else counting)
    cfg = ModelConfig(vocab_size=50, d_model=64, n_heads=4, encoder_layers=2, decoder_layers=2, d_ff=96,
                      dropout=0.0, max_source_len=32, max_target_len=32, pad_id=0, bos_id=1, eos_id=2, unk_id=3)
    torch.manual_seed(2)
    model = Transformer(cfg).train()
    src, tgt = torch.randint(4, 50, (6, 11)), torch.randint(4, 50, (6, 9))
    src[2, 6:], tgt[4, 3:] = 0, 0

    def step(fused: bool) -> tuple[float, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        with kernels.switched(fused), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            logits = model(src, tgt[:, :-1])
            loss = label_smoothed_nll_sum(logits.flatten(0, 1), tgt[:, 1:].flatten(), smoothing=0.1, ignore_index=0)
            loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss, grads = step(True)
    # every residual's norm, every attention and the loss ran fused, forward and backward
    # (head layouts: 4 self-attentions' Q, K, V and the cross keys and values; 6 outputs merged;
    # 2 cross queries split; the backward: 6 output gradients split, 5 unheaded, 2 queries merged)
    assert counting.calls == {"add_layer_norm": 10, "layer_norm_backward": 10, "attention_softmax": 6,
                              "attention_softmax_backward": 6, "smoothed_loss_forward": 1,
                              "smoothed_loss_backward": 1, "rows_contiguous": 5 + 6 + 2 + 6 + 5 + 2}
    counting.calls.clear()
    plain_loss, plain_grads = step(False)
    assert not counting.calls
    assert loss == pytest.approx(plain_loss, rel=1e-5 if dtype == torch.float32 else 1e-2)
    for name, grad in plain_grads.items():
        # to a fraction of the parameter's largest gradient; bf16 activations round differently.
        # (The keys' biases get no gradient but rounding noise: softmax ignores a shift of its
        # row. They are held to the largest gradient of their layer's other projections.)
        scale = grad.abs().max().item() if not name.endswith("k_proj.bias") else \
            plain_grads[name.replace("k_proj", "q_proj")].abs().max().item()
        tol = 1e-5 if dtype == torch.float32 else 5e-2
        torch.testing.assert_close(grads[name], grad, atol=tol * scale, rtol=0, msg=name)


# -- building, caching, falling back -------------------------------------------------------------

def _python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=120)


PROBE = ("import torch\nfrom seqserve.model import kernels\nfrom seqserve.model.loss import label_smoothed_nll_sum\n"
         "ops = kernels.load()\nprint('ops', ops is not None, kernels.unavailable())\n"
         "x = torch.randn(4, 9, requires_grad=True)\n"
         "label_smoothed_nll_sum(x, torch.tensor([1, 2, 0, 8]), smoothing=0.1, ignore_index=0).backward()\n"
         "print('grad', bool(torch.isfinite(x.grad).all()))\n")


@pytest.fixture
def untried(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """This process's kernels as if never loaded (restored after the test)."""
    monkeypatch.setattr(kernels, "_ops", None)
    monkeypatch.setattr(kernels, "_reason", None)
    monkeypatch.setattr(kernels, "_tried", False)
    return monkeypatch


def _trains_with_torch_ops() -> None:
    x = torch.randn(4, 9, requires_grad=True)
    label_smoothed_nll_sum(x, torch.tensor([1, 2, 0, 8]), smoothing=0.1, ignore_index=0).backward()
    assert torch.isfinite(x.grad).all()


def test_a_machine_without_a_compiler_trains_with_torch_ops(untried: pytest.MonkeyPatch, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    untried.setenv("CXX", str(tmp_path / "no-such-c++"))
    untried.setenv(kernels.CACHE, str(tmp_path / "cache"))
    assert kernels.load() is None and kernels.unavailable()
    assert kernels.get(torch.device("cpu"), torch.bfloat16) is None
    _trains_with_torch_ops()
    err = capsys.readouterr().err
    assert err.count("no fused CPU kernels") == 1 and "training uses PyTorch operations" in err


def test_kernels_can_be_switched_off(untried: pytest.MonkeyPatch, tmp_path: Path) -> None:
    untried.setenv(kernels.SWITCH, "0")
    untried.setenv(kernels.CACHE, str(tmp_path / "cache"))
    assert kernels.load() is None and kernels.unavailable() == f"{kernels.SWITCH}=0"
    _trains_with_torch_ops()
    assert not (tmp_path / "cache").exists()  # nothing built


def test_a_build_killed_earlier_does_not_hang_the_next(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # torch's lock file, left behind by a build that was killed, made every later build wait forever
    env = {"CXX": str(tmp_path / "no-such-c++"), kernels.CACHE: str(tmp_path / "cache")}
    monkeypatch.setenv(kernels.CACHE, env[kernels.CACHE])
    folder = kernels.build_dir()  # the folder the subprocess below builds in
    folder.mkdir(parents=True)
    (folder / "lock").touch()
    run = _python(PROBE, env)  # subprocess.TimeoutExpired if it waits on the stale lock
    assert run.returncode == 0, run.stderr
    assert "ops False" in run.stdout and "grad True" in run.stdout


def test_a_built_library_is_reused_without_building(ops) -> None:  # noqa: ANN001
    assert (kernels.build_dir() / "ready").exists()
    run = _python(PROBE, {})
    assert run.returncode == 0, run.stderr
    assert "ops True None" in run.stdout and "grad True" in run.stdout
    assert "building" not in run.stderr
